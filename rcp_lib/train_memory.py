"""Estimated GPU memory of RCP's QAT per device, from a transformers config alone.

An *estimate* (stated as such wherever it is shown), built from parameter counts:

* student: fp32 master copy of every parameter (Accelerate's bf16 autocast keeps fp32 weights), fp32 gradients
  and two fp32 AdamW moments for the trainable ones (block linears + quantizer parameters: LWC γ, β and LDP θ,
  i.e. ``2 + (2^bits − 1)`` per group of ``group_size`` weights); embedding / lm_head / norms frozen;
* teacher: bf16 weights, no gradients, one whole copy per GPU (what :func:`rcp_lib.qat.train` builds under bf16
  mixed precision: it casts the teacher to bf16 and does not shard it; ``shard_teacher=True`` estimates a teacher
  sharded by FSDP, which the loop does not do);
* activations with gradient checkpointing: one bf16 hidden state per layer boundary, plus the peak of one layer's
  recomputation (≈ 16 hidden-size tensors and the attention scores in bf16), plus the fp32 logits of student
  and teacher and their softmaxes for the KL (4 × vocab × tokens × 4 bytes);
* FSDP divides the student's states by the number of GPUs; DDP does not.
Not counted: the CUDA context (~0.5–1 GB), allocator fragmentation, communication buffers.
"""

from __future__ import annotations

from typing import Any

from .memory import PAPER_GROUP, count_linear_weights, model_dims

GB = 1e9


def qat_memory_per_gpu(config: Any, n_gpus: int = 1, strategy: str = "fsdp", w_bits: int = 2, group_size: int = PAPER_GROUP,
                       seq_len: int = 2048, micro_batch: int = 1, shard_teacher: bool = False) -> dict[str, float]:
    """Estimated bytes per GPU (in GB) of one QAT process; see the module docstring for what is counted.

    Args:
        config: transformers config or dict (sizes only).
        strategy: "fsdp" (states sharded over ``n_gpus``) or "ddp" (replicated).
    """
    if strategy not in ("fsdp", "ddp"):
        raise ValueError("strategy must be 'fsdp' or 'ddp'")
    if n_gpus < 1:
        raise ValueError("n_gpus must be >= 1")
    d = model_dims(config)
    h, L, V = d["hidden"], d["layers"], d["vocab"]
    linear = count_linear_weights(config)
    other = V * h * 2 + (2 * L + 1) * h  # rotation unties embedding and lm_head
    quant = linear // group_size * (2 + 2**w_bits - 1)
    trainable = linear + quant
    shard = n_gpus if strategy == "fsdp" else 1
    student = (4 * (linear + other + quant) + 4 * trainable + 8 * trainable) / shard
    teacher = 2 * (linear + other) / (n_gpus if (strategy == "fsdp" and shard_teacher) else 1)
    tokens = seq_len * micro_batch
    heads = d["heads"]
    act = 2 * tokens * h * L + 2 * (16 * tokens * h + heads * tokens * tokens) + 4 * 4 * V * tokens
    total = student + teacher + act
    return {"student_states_gb": student / GB, "teacher_gb": teacher / GB, "activations_gb": act / GB,
            "total_gb": total / GB, "trainable_params": float(trainable), "n_gpus": float(n_gpus)}
