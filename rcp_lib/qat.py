"""Quantization-aware training: the RCP loop (rotate -> clip -> partition, trained jointly).

``train(student, teacher, data, QATConfig)`` trains a rotated, fake-quantized student (its latent weights
and its quantizer parameters - LWC clip logits, LDP partition logits - in two AdamW parameter groups with
their own learning rates; a static range's absolute lo / hi in a third with ``lr_range``, :func:`optimizer_groups`) against a full-precision teacher (self-distillation, the BitDistiller recipe RCP
builds on: KL on the teacher's logits by default, or cross-entropy on the data, or a mix).

Our reading of the paper's recipe (its body is not available to us; every item is a config field):
AdamW, linear warm-up then cosine decay, gradient clipping, gradient accumulation, optional gradient
checkpointing, bf16 autocast on GPU and fp32 on CPU (``mixed_precision="bf16"`` autocasts the student on CPU too,
``teacher_precision="bf16"`` the teacher's forward alone), an optional block-wise reconstruction pre-stage
(``block_ap_steps``, :mod:`rcp_lib.block_ap`), random windows of the train split (or teacher-generated
text), validation perplexity on a held-out tail of the train split (never the test split).

The loop is written once on Hugging Face Accelerate (``prepare`` / ``accumulate`` / ``backward`` /
``save_state`` / ``load_state``): a single CPU process and ``accelerate launch`` on several GPUs run the
same code. Batches are drawn from a generator seeded by ``(seed, step)``, so a run resumed from a
checkpoint sees exactly the batches an uninterrupted run sees. A non-finite loss stops the run with
:class:`NonFiniteLossError` naming the step; the last good checkpoint is kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from .progress import bar as tqdm

from .config import JsonConfig
from .data import calibration_windows, split_holdout
from .io import atomic_write_json

LOSSES = ("kl", "ce", "mix")
TEACHER_PRECISIONS = ("same", "bf16")
FREEZABLE = ("levels", "clip", "weights")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN/inf; the message names the step."""


@dataclass
class QATConfig(JsonConfig):
    """Training recipe. Round-trips to JSON; its hash is part of the trained-model cache key."""

    steps: int = 200
    batch_size: int = 1
    grad_accum: int = 1
    seqlen: int = 512
    lr_weights: float = 2e-5
    lr_quant: float = 1e-3
    # learning rate of a learnable static range (range_mode="static"): its lo / hi in weight units (range_param
    # "absolute": AdamW's step is about the learning rate, so 1e-2 shifts a range of ~0.1 by 10% per step) or their
    # log-multipliers (range_param "log": a step of lr stretches an end by a factor exp(lr) in every layer). None: lr_quant
    lr_range: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    loss: str = "kl"
    temperature: float = 1.0
    ce_weight: float = 0.5  # weight of CE in "mix" (KL gets 1 - ce_weight)
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto: bf16 on GPU, no on CPU
    train_embeddings: bool = False
    teacher_generated: bool = False  # BitDistiller's recipe: train on text sampled from the teacher
    generated_samples: int = 64
    holdout_fraction: float = 0.05
    val_every: int = 50
    val_windows: int = 8
    checkpoint_every: int = 50
    log_every: int = 1
    seed: int = 0
    # recipe options (issue "a recipe under which Clip and Partition learn"); the defaults keep the loop as it was
    teacher_precision: str = "same"  # "same": as the student (mixed_precision); "bf16": teacher forward under bf16 autocast
    block_ap_steps: int = 0  # > 0: Block-AP pre-stage, this many steps per decoder block (rcp_lib.block_ap)
    block_ap_samples: int = 32  # calibration windows (of seqlen tokens, train part) cached for Block-AP
    block_ap_lr_weights: float = 2e-5  # EfficientQAT's Block-AP learning rates (weights / quantizer)
    block_ap_lr_quant: float = 1e-4
    gptq_start: bool = False  # start from GPTQ on the quantizer's own grid (needs range_mode="static"; applied by the
    #                           model builder, rcp_lib.experiments.build, before train)
    # parts of the student left at their start (the ablations that show what training a part buys): "levels" (LDP's
    # theta), "clip" (the range: LWC logits, static lo / hi or their log-multipliers), "weights" (the latent weights)
    freeze: list[str] = field(default_factory=list)

    def validate(self) -> None:
        errs = []
        if self.steps < 1:
            errs.append(f"steps must be >= 1 (got {self.steps})")
        for n in ("batch_size", "grad_accum", "val_windows", "checkpoint_every", "val_every", "log_every", "generated_samples"):
            if getattr(self, n) < 1:
                errs.append(f"{n} must be >= 1 (got {getattr(self, n)})")
        if self.seqlen < 2:
            errs.append(f"seqlen must be >= 2 (got {self.seqlen})")
        for n in ("lr_weights", "lr_quant", "lr_range"):
            v = getattr(self, n)
            if n == "lr_range" and v is None:
                continue
            if not (v > 0 and math.isfinite(v)):
                errs.append(f"{n} must be > 0 (got {v})")
        if self.loss not in LOSSES:
            errs.append(f"loss must be one of {LOSSES} (got {self.loss!r})")
        if self.temperature <= 0:
            errs.append(f"temperature must be > 0 (got {self.temperature})")
        if not 0 <= self.ce_weight <= 1:
            errs.append(f"ce_weight must be in [0, 1] (got {self.ce_weight})")
        if not 0 < self.holdout_fraction < 1:
            errs.append(f"holdout_fraction must be in (0, 1) (got {self.holdout_fraction})")
        if self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            errs.append("warmup_steps must be >= 0 and min_lr_ratio in [0, 1]")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            errs.append(f"mixed_precision must be auto/no/bf16/fp16 (got {self.mixed_precision!r})")
        if self.teacher_precision not in TEACHER_PRECISIONS:
            errs.append(f"teacher_precision must be one of {TEACHER_PRECISIONS} (got {self.teacher_precision!r})")
        if self.block_ap_steps < 0 or self.block_ap_samples < 1:
            errs.append(f"block_ap_steps must be >= 0 and block_ap_samples >= 1 (got {self.block_ap_steps}, "
                        f"{self.block_ap_samples})")
        for n in ("block_ap_lr_weights", "block_ap_lr_quant"):
            v = getattr(self, n)
            if not (v > 0 and math.isfinite(v)):
                errs.append(f"{n} must be > 0 (got {v})")
        bad = [f for f in self.freeze if f not in FREEZABLE]
        if bad or len(set(self.freeze)) != len(self.freeze):
            errs.append(f"freeze takes distinct names among {FREEZABLE} (got {self.freeze})")
        elif set(self.freeze) == set(FREEZABLE):
            errs.append("freeze names every part of the student: nothing would train")
        if self.freeze and self.block_ap_steps > 0:
            errs.append("freeze with a Block-AP stage (block_ap_steps > 0) is not supported: Block-AP trains every part")
        if errs:
            raise ValueError("invalid QATConfig: " + "; ".join(errs))



@dataclass
class TrainResult:
    steps: int
    final_loss: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # the whole run's wall time, including the processes before a resume
    tokens: int = 0
    out_dir: str | None = None
    block_ap: list[dict] = field(default_factory=list)  # per block {layer, mse_before, mse_after, seconds}


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                      cfg: QATConfig) -> torch.Tensor:
    """Loss over next-token positions. Logits ``[B, T, V]``, labels ``[B, T]`` (ids; position t predicts t+1).

    kl: ``T² · KL(p_teacher^T || p_student^T)`` averaged over tokens; ce: cross-entropy on the data;
    mix: ``(1 - ce_weight) · kl + ce_weight · ce``.
    """
    s = student_logits[:, :-1].float()
    loss = torch.zeros((), device=s.device)
    if cfg.loss in ("ce", "mix"):
        ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels[:, 1:].reshape(-1))
        loss = loss + (cfg.ce_weight if cfg.loss == "mix" else 1.0) * ce
    if cfg.loss in ("kl", "mix"):
        T = cfg.temperature
        t = teacher_logits[:, :-1].float()
        log_ps = F.log_softmax(s / T, dim=-1)
        log_pt = F.log_softmax(t / T, dim=-1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * T * T
        loss = loss + ((1 - cfg.ce_weight) if cfg.loss == "mix" else 1.0) * kl
    return loss


def optimizer_groups(student: nn.Module, latent: list[nn.Parameter], quant: list[nn.Parameter],
                     cfg: QATConfig) -> list[dict]:
    """AdamW parameter groups of :func:`parameter_groups`' output: ``"weights"`` (``lr_weights``, ``weight_decay``),
    ``"quantizer"`` (``lr_quant``, no decay) and, when ``cfg.lr_range`` is set, ``"range"``: the static ranges'
    absolute ``lo, hi`` (:meth:`~rcp_lib.quant.quantizers.WeightQuantizer.range_parameters`) at ``lr_range``. Empty
    groups are left out."""
    ranges: set[int] = set()
    if cfg.lr_range is not None:
        ranges = {id(p) for m in student.modules() if hasattr(m, "range_parameters") for p in m.range_parameters()}
    groups = [
        {"params": latent, "lr": cfg.lr_weights, "weight_decay": cfg.weight_decay, "name": "weights"},
        {"params": [p for p in quant if id(p) not in ranges], "lr": cfg.lr_quant, "weight_decay": 0.0,
         "name": "quantizer"},
        {"params": [p for p in quant if id(p) in ranges], "lr": cfg.lr_range, "weight_decay": 0.0, "name": "range"},
    ]
    return [g for g in groups if g["params"]]


def parameter_groups(student: nn.Module, cfg: QATConfig) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(latent weights, quantizer parameters). Everything else is frozen, and so are the parts ``cfg.freeze`` names.

    Latent weights: the weights (and biases) of the linears inside decoder blocks, plus the embedding and
    lm_head if ``train_embeddings``. Quantizer parameters: every parameter of a module whose class defines
    ``quant_parameters`` (LWC γ/β, static lo / hi or their log-multipliers, LDP θ); ``level_parameters`` names the
    levels (θ) among them, the rest is the clip.
    """
    from .models import embedding, lm_head, named_block_linears

    quant: list[nn.Parameter] = []
    seen: set[int] = set()
    frozen: set[int] = set()
    levels = {id(p) for m in student.modules() if hasattr(m, "level_parameters") for p in m.level_parameters()}
    for m in student.modules():
        if hasattr(m, "quant_parameters"):
            for p in m.quant_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    if ("levels" in cfg.freeze and id(p) in levels) or ("clip" in cfg.freeze and id(p) not in levels):
                        frozen.add(id(p))
                    else:
                        quant.append(p)
    latent: list[nn.Parameter] = []
    for _, lin in named_block_linears(student):
        for p in (lin.weight, getattr(lin, "bias", None)):
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                if "weights" in cfg.freeze:
                    frozen.add(id(p))
                else:
                    latent.append(p)
    if cfg.train_embeddings:
        for p in (embedding(student).weight, lm_head(student).weight):
            if id(p) not in seen:
                seen.add(id(p))
                latent.append(p)
    for p in student.parameters():
        p.requires_grad_(id(p) in seen and id(p) not in frozen)
    return latent, quant


def _lr_lambda(cfg: QATConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _teacher_autocast(cfg: QATConfig, device: torch.device):
    """bf16 autocast around the teacher's forward (``teacher_precision="bf16"``), else no change."""
    import contextlib

    if cfg.teacher_precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batch_for_step(train_ids: torch.Tensor, cfg: QATConfig, step: int, micro: int) -> torch.Tensor:
    seed = int(hashlib.sha256(f"{cfg.seed}:{step}:{micro}".encode()).hexdigest()[:8], 16)
    return calibration_windows(train_ids, cfg.batch_size, cfg.seqlen, seed=seed)


@torch.no_grad()
def teacher_generated_data(teacher: nn.Module, prompts: torch.Tensor, cfg: QATConfig) -> torch.Tensor:
    """BitDistiller-style data: continue short real prompts with the teacher (sampling, seeded).

    Args:
        prompts: ``LongTensor [1, N]`` tokens to draw 16-token prompts from.
    Returns:
        ``LongTensor [1, generated_samples * seqlen]`` of teacher text.
    """
    torch.manual_seed(cfg.seed)
    starts = calibration_windows(prompts, cfg.generated_samples, 16, seed=cfg.seed)
    dev = next(teacher.parameters()).device
    outs = []
    for p in tqdm(starts, desc="teacher generation", leave=False):
        g = teacher.generate(p[None].to(dev), max_new_tokens=cfg.seqlen - 16, min_new_tokens=cfg.seqlen - 16,
                             do_sample=True, top_p=0.95, temperature=1.0)
        outs.append(g[0, : cfg.seqlen].cpu())
    return torch.cat(outs).unsqueeze(0)


def _reset_single_process_accelerate_state() -> None:
    """Accelerate keeps one state per process and refuses a second ``Accelerator`` with another mixed precision. In a
    single process (no ``torchrun``: ``WORLD_SIZE`` unset or 1) nothing is shared, so a previous ``train()``'s state is
    dropped and each call uses its own recipe's precision; under ``torchrun`` the state (and its process group) stays."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        AcceleratorState._reset_state(True)


def resolve_mixed_precision(cfg: QATConfig) -> str:
    """``cfg.mixed_precision`` with "auto" resolved: "bf16" when CUDA is available, else "no"."""
    if cfg.mixed_precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return cfg.mixed_precision


def teacher_dtype(mixed_precision: str, teacher: nn.Module) -> torch.dtype:
    """The dtype :func:`train` keeps the teacher in: bfloat16 under bf16 mixed precision, else its own dtype."""
    return torch.bfloat16 if str(mixed_precision) == "bf16" else next(teacher.parameters()).dtype


def tokens_per_optimizer_step(cfg: QATConfig, num_processes: int = 1) -> int:
    """Tokens in one optimizer step: ``batch_size x grad_accum x seqlen x num_processes``."""
    return cfg.batch_size * cfg.grad_accum * cfg.seqlen * num_processes


def check_world(num_processes: int, device_type: str, available: int) -> None:
    """Refuse a launch that asks for more GPU processes than GPUs (each process needs its own device)."""
    if device_type == "cuda" and num_processes > available:
        raise RuntimeError(
            f"accelerate launched {num_processes} processes but only {available} CUDA devices are visible; "
            f"use --num_processes <= {available} (or a config file for this machine, see configs/accelerate/)")


def _atomic_save_state(accelerator, out_dir: Path, step: int, log_len: int, config: dict, seconds: float) -> None:
    """accelerator.save_state into a temp folder, then rename to ``checkpoint`` (never half-written). ``seconds``: the
    run's time so far, all processes that worked on it together (a resumed run adds its own)."""
    final = out_dir / "checkpoint"
    tmp = out_dir / f".checkpoint-tmp-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json({"step": step, "log_len": log_len, "qat": config, "seconds": round(seconds, 3)},
                          tmp / "rcp_step.json")
        old = out_dir / ".checkpoint-old"
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        if old.exists():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _recover_checkpoint(out_dir: Path) -> bool:
    """A crash between the two renames of :func:`_atomic_save_state` leaves the last complete checkpoint in
    ``.checkpoint-old`` and none in ``checkpoint``: move it back so that a resume finds it. Returns whether it did."""
    final, old = out_dir / "checkpoint", out_dir / ".checkpoint-old"
    if final.exists() or not (old / "rcp_step.json").exists():
        return False
    os.replace(old, final)
    return True


def train(
    student: nn.Module,
    teacher: nn.Module | None,
    data: torch.Tensor,
    cfg: QATConfig,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    accelerator=None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``student`` (rotated + fake-quantized) in place.

    Args:
        student: model whose quantized linears expose ``quant_parameters()``.
        teacher: full-precision model (required for loss "kl"/"mix" and ``teacher_generated``); never trained.
        data: ``LongTensor [1, N]``: the tokenized *train* split. Its last ``holdout_fraction`` is held out
            for validation perplexity.
        cfg: the recipe.
        out_dir: where checkpoints (``checkpoint/``) and ``metrics.jsonl`` go (None: no checkpoints).
        resume: continue from ``out_dir/checkpoint`` if present (same result as an uninterrupted run).
        accelerator: an ``accelerate.Accelerator`` (created if None: CPU single process by default, or whatever
            ``accelerate launch`` / ``torchrun`` set up); pass ``step_scheduler_with_optimizer=False`` to one
            you create, the loop steps the schedule once per optimizer step.
        stop_after: stop (after checkpointing) once this step count is reached - used to simulate a kill.
    """
    cfg.validate()
    if cfg.loss in ("kl", "mix") or cfg.teacher_generated:
        if teacher is None:
            raise ValueError(f"loss={cfg.loss!r}/teacher_generated needs a teacher model")
    if data.dim() == 1:
        data = data.unsqueeze(0)
    train_ids, val_ids = split_holdout(data, cfg.holdout_fraction)
    if train_ids.numel() <= cfg.seqlen or val_ids.numel() < cfg.seqlen:
        raise ValueError(f"not enough tokens ({data.numel()}) for seqlen={cfg.seqlen} with holdout {cfg.holdout_fraction}")
    from accelerate import Accelerator

    from .evaluation import perplexity

    if accelerator is None:
        mp = resolve_mixed_precision(cfg)
        _reset_single_process_accelerate_state()
        # the schedule counts optimizer steps of the global batch: stepped by us once per step, not per process
        accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mp,
                                  cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False)
    check_world(accelerator.num_processes, accelerator.device.type,
                torch.cuda.device_count() if accelerator.device.type == "cuda" else 0)
    torch.manual_seed(cfg.seed)
    if cfg.teacher_generated:
        teacher.to(accelerator.device)
        train_ids = teacher_generated_data(teacher, train_ids, cfg)

    t_start = time.perf_counter()
    block_stats: list[dict] = []
    if resume and out_dir is not None:
        if accelerator.is_main_process:
            _recover_checkpoint(Path(out_dir))
        accelerator.wait_for_everyone()
    has_ckpt = resume and out_dir is not None and (Path(out_dir) / "checkpoint" / "rcp_step.json").exists()
    if cfg.block_ap_steps > 0 and not has_ckpt:  # a checkpoint already holds the reconstructed blocks
        from .block_ap import block_ap

        calib = calibration_windows(train_ids, cfg.block_ap_samples, cfg.seqlen, seed=cfg.seed)
        student.to(accelerator.device)
        block_stats = block_ap(student, calib.to(accelerator.device), cfg.block_ap_steps, cfg.block_ap_lr_weights,
                               cfg.block_ap_lr_quant, cfg.grad_clip, seed=cfg.seed, progress=progress)

    latent, quant = parameter_groups(student, cfg)
    if not latent and not quant:
        raise ValueError("the student has no trainable parameters (was it quantized with quantize_model?)")
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(optimizer_groups(student, latent, quant, cfg), betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    from .quant.linear import clear_weight_cache

    clear_weight_cache(student)  # an evaluation before training must not leave a copy of every weight behind
    student, opt, sched = accelerator.prepare(student, opt, sched)
    if teacher is not None:
        # the teacher is never trained: in bf16 under bf16 mixed precision (half the memory of fp32), one whole copy
        # per process (not sharded; rcp_lib.train_memory counts it so)
        teacher.to(device=accelerator.device, dtype=teacher_dtype(accelerator.mixed_precision, teacher)).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

    out = Path(out_dir) if out_dir is not None else None
    log_path = out / "metrics.jsonl" if out else None
    history: list[dict] = []
    start = 0
    prior_seconds = 0.0  # time spent by earlier processes of a resumed run
    if out is not None and accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json({"qat": cfg.to_dict()}, out / "qat_config.json")
    if resume and out is not None and (out / "checkpoint" / "rcp_step.json").exists():
        meta = json.loads((out / "checkpoint" / "rcp_step.json").read_text())
        saved = meta.get("qat", {})
        # the step count may grow on resume; anything else must match the run that wrote the checkpoint
        diff = sorted(k for k in set(saved) | set(cfg.to_dict()) if k != "steps" and saved.get(k) != cfg.to_dict().get(k))
        if diff:
            raise ValueError(f"cannot resume from {out / 'checkpoint'}: it was written with a different QATConfig "
                             f"(fields {diff}); use another out_dir or the same config")
        accelerator.load_state(str(out / "checkpoint"))
        start = int(meta["step"])
        prior_seconds = float(meta.get("seconds", 0.0))
        if log_path.exists():
            history = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()][: meta["log_len"]]
    elif out is not None and log_path.exists() and accelerator.is_main_process:
        log_path.unlink()
    if log_path is not None and accelerator.is_main_process:
        from .io import atomic_write_text

        atomic_write_text("".join(json.dumps(h) + "\n" for h in history), log_path)

    tokens_per_step = tokens_per_optimizer_step(cfg, accelerator.num_processes)
    if accelerator.is_main_process and progress:
        import sys

        print(f"[qat] tokens per optimizer step: {cfg.batch_size} (batch) x {cfg.grad_accum} (accumulation) x "
              f"{cfg.seqlen} (seqlen) x {accelerator.num_processes} (processes) = {tokens_per_step:,}; "
              f"{cfg.steps} steps = {cfg.steps * tokens_per_step:,} tokens", file=sys.stderr, flush=True)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(total=cfg.steps, initial=start, desc="QAT", unit="step",
               disable=not (progress and accelerator.is_main_process))
    t0 = time.perf_counter()
    last = float("nan")
    student.train()
    for step in range(start, end):
        step_loss = 0.0
        for micro in range(cfg.grad_accum):
            idx = micro * accelerator.num_processes + accelerator.process_index
            batch = _batch_for_step(train_ids, cfg, step, idx).to(accelerator.device)
            with accelerator.accumulate(student):
                with accelerator.autocast():
                    s_logits = student(input_ids=batch, use_cache=False).logits
                    t_logits = None
                    if cfg.loss in ("kl", "mix"):
                        with torch.no_grad(), _teacher_autocast(cfg, accelerator.device):
                            t_logits = teacher(input_ids=batch, use_cache=False).logits
                    loss = distillation_loss(s_logits, t_logits, batch, cfg)
                if not torch.isfinite(loss):
                    bar.close()
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss.item()}) at step {step} (micro-batch {micro}); the last good "
                        f"checkpoint (if any) is kept in {out / 'checkpoint' if out else 'nowhere (no out_dir)'}. "
                        "Lower the learning rates or check the quantizer config.")
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.grad_clip > 0:
                    accelerator.clip_grad_norm_(student.parameters(), cfg.grad_clip)
                opt.step()
                if accelerator.sync_gradients:
                    sched.step()
                opt.zero_grad(set_to_none=True)
            step_loss += loss.detach().float().item() / cfg.grad_accum
        last = float(accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), reduction="mean"))
        elapsed = time.perf_counter() - t0
        done = step + 1 - start
        rec = {"step": step + 1, "loss": last, "lr_weights": sched.get_last_lr()[0],
               "tokens": (step + 1) * tokens_per_step, "tokens_per_s": done * tokens_per_step / max(elapsed, 1e-9)}
        if (step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps:
            student.eval()
            rec["val_ppl"] = perplexity(accelerator.unwrap_model(student), val_ids, seqlen=cfg.seqlen,
                                        max_windows=cfg.val_windows, progress=False)
            clear_weight_cache(student)
            student.train()
        if (step + 1) % cfg.log_every == 0 or "val_ppl" in rec:
            history.append(rec)
            if log_path is not None and accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{last:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if out is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == end):
            _atomic_save_state(accelerator, out, step + 1, len(history), cfg.to_dict(),
                               prior_seconds + time.perf_counter() - t_start)
    bar.close()
    student.eval()
    if cfg.gradient_checkpointing:
        accelerator.unwrap_model(student).gradient_checkpointing_disable()
    for p in student.parameters():
        p.requires_grad_(False)
    seconds = prior_seconds + time.perf_counter() - t_start
    return TrainResult(steps=end, final_loss=last, history=history, seconds=seconds,
                       tokens=end * tokens_per_step, out_dir=str(out) if out else None, block_ap=block_stats)
