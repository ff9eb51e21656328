import pytest

from rcp_lib.experiments import REFERENCE_CONFIGS
from rcp_lib.memory import count_linear_weights
from rcp_lib.train_memory import qat_memory_per_gpu


def test_fsdp_shards_states_and_ddp_replicates():
    cfg = REFERENCE_CONFIGS["LLaMA-2-7B"]
    one = qat_memory_per_gpu(cfg, 1, "ddp")
    eight = qat_memory_per_gpu(cfg, 8, "fsdp")
    assert eight["student_states_gb"] == pytest.approx(one["student_states_gb"] / 8)
    assert eight["teacher_gb"] == pytest.approx(one["teacher_gb"])  # train() keeps one whole bf16 teacher per GPU
    assert qat_memory_per_gpu(cfg, 8, "fsdp", shard_teacher=True)["teacher_gb"] == pytest.approx(one["teacher_gb"] / 8)
    assert qat_memory_per_gpu(cfg, 8, "ddp")["total_gb"] == pytest.approx(one["total_gb"])
    # AdamW (8 B) + grads (4 B) + fp32 master (4 B) per trainable weight dominate
    assert one["student_states_gb"] > 16 * count_linear_weights(cfg) / 1e9
    assert one["teacher_gb"] == pytest.approx(2 * (count_linear_weights(cfg) + 2 * 32000 * 4096 + 65 * 4096) / 1e9)
    with pytest.raises(ValueError):
        qat_memory_per_gpu(cfg, 0)
