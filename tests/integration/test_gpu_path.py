"""The GPU path, as far as a CPU can check it (issue 17): dtypes of load(), the teacher and student train() builds
against the memory estimator, the evaluation cache freed for training, one paper recipe, the random-weights guard,
and the CPU self-test of benchmarks/gpu_check.py."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcp_lib import models as M
from rcp_lib.qat import QATConfig, train
from rcp_lib.quant.apply import preset, quantize_model
from rcp_lib.quant.linear import cached_weight_bytes
from rcp_lib.rotation.fuse import RotationConfig, rotate_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    M.tiny_llama(hidden=64, intermediate=128, heads=2, kv_heads=1, vocab=128).save_pretrained(d)
    return d


def test_load_dtype(tiny_folder, monkeypatch):
    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: None)  # no tokenizer saved
    m, _ = M.load(str(tiny_folder), dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    m, _ = M.load(str(tiny_folder))  # CPU default: float32
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    assert M.default_dtype("cuda") == torch.bfloat16 and M.default_dtype("cpu") == torch.float32


def _student(fp):
    s = copy.deepcopy(fp)
    rotate_model(s, RotationConfig(r1="random_hadamard"))
    quantize_model(s, preset("W2A4KV4", w_group_size=32))
    return s


def test_train_builds_what_the_estimator_counts():
    """bf16 mixed precision: a bf16 teacher (one whole copy), an fp32 student whose trainable set is the block
    linears + quantizer parameters, exactly the counts of rcp_lib.train_memory."""
    from rcp_lib.qat import parameter_groups
    from rcp_lib.train_memory import qat_memory_per_gpu

    fp = M.tiny_llama(hidden=64, intermediate=128, heads=2, kv_heads=1, vocab=128)
    student = _student(fp)
    data = torch.randint(0, 128, (1, 3000), generator=torch.Generator().manual_seed(0))
    cfg = QATConfig(steps=1, seqlen=32, warmup_steps=0, val_every=1, val_windows=1, mixed_precision="bf16",
                    gradient_checkpointing=True)
    latent, quant = parameter_groups(student, cfg)
    trainable = sum(p.numel() for p in latent + quant)
    from accelerate.state import AcceleratorState

    try:
        train(student, fp, data, cfg, progress=False)
    finally:  # Accelerate's state is a per-process singleton: the next test's Accelerator uses mixed_precision "no"
        AcceleratorState._reset_state(True)
    assert {p.dtype for p in fp.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    est = qat_memory_per_gpu(fp.config, n_gpus=1, strategy="ddp", group_size=32, seq_len=32)
    assert est["trainable_params"] == trainable
    teacher_bytes = sum(p.numel() * p.element_size() for p in fp.parameters())
    assert est["teacher_gb"] * 1e9 == pytest.approx(teacher_bytes)
    # FSDP shards the student, not the teacher (train() keeps one whole teacher per process)
    assert qat_memory_per_gpu(fp.config, 8, "fsdp", group_size=32, seq_len=32)["teacher_gb"] == est["teacher_gb"]


def test_eval_cache_freed_when_training_resumes():
    fp = M.tiny_llama(hidden=64, intermediate=128, heads=2, kv_heads=1, vocab=128)
    student = _student(fp)
    ids = torch.randint(0, 128, (1, 32))
    with torch.no_grad():
        student(ids)  # a validation forward fills the cache
    assert cached_weight_bytes(student) > 0
    data = torch.randint(0, 128, (1, 3000), generator=torch.Generator().manual_seed(0))
    cfg = QATConfig(steps=2, seqlen=32, warmup_steps=0, val_every=1, val_windows=1, mixed_precision="no")
    train(student, fp, data, cfg, progress=False)  # validates after each step, then trains again
    assert cached_weight_bytes(student) == 0


def test_paper_profile_and_yaml_are_one_recipe():
    from rcp_lib.experiments.methods import method, qat_config
    from rcp_lib.profiles import get_profile
    from rcp_lib.run_config import RunConfig

    P = get_profile("paper")
    y = RunConfig.load(ROOT / "configs" / "paper-llama2-7b.yaml")
    assert qat_config(P) == y.recipe.qat
    r = method("RCP").recipe(P)
    assert r.rotation == y.recipe.rotation and r.quant == y.recipe.quant
    assert (P.model, P.corpus, P.device, P.w_group_size) == (y.model, y.corpus, y.device, y.recipe.quant.weight.group_size)
    assert y.recipe.qat.gradient_checkpointing and y.recipe.qat.mixed_precision == "bf16"
    # scaled budgets keep the rest of the recipe
    small = qat_config(get_profile("paper", qat_steps=3, qat_seqlen=64))
    assert (small.steps, small.seqlen, small.warmup_steps) == (3, 64, 0)
    assert (small.lr_weights, small.loss, small.gradient_checkpointing) == (y.recipe.qat.lr_weights, "kl", True)


def test_gpu_profile_budgets():
    from rcp_lib.profiles import get_profile

    cpu, gpu = get_profile("cpu"), get_profile("gpu")

    def tokens(p):
        return p.qat_steps * p.qat_batch_size * p.qat_grad_accum * p.qat_seqlen

    assert tokens(gpu) >= 20 * tokens(cpu)
    assert gpu.eval_windows is None and gpu.device == "cuda" and gpu.model == cpu.model


def test_random_weights_never_write_into_results(tmp_path, monkeypatch):
    from rcp_lib.paths import RANDOM_WEIGHTS_MARKER, RandomWeightsOutputError, figures_dir, results_dir
    from rcp_lib.profiles import get_profile

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / RANDOM_WEIGHTS_MARKER).write_text("{}")
    P = get_profile("paper", model=str(tmp_path / "m"))
    monkeypatch.delenv("RCP_RESULTS_DIR", raising=False)
    monkeypatch.delenv("RCP_FIGURES_DIR", raising=False)
    with pytest.raises(RandomWeightsOutputError, match="random weights"):
        results_dir(P)
    with pytest.raises(RandomWeightsOutputError):
        figures_dir(P)
    monkeypatch.setenv("RCP_RESULTS_DIR", str(tmp_path / "r"))
    assert results_dir(P) == tmp_path / "r" / P.run_name  # a modified profile: its own folder


@pytest.mark.slow
def test_gpu_check_export_fused_paths_under_interpreter(tmp_path):
    """The export section with the fused paths (select and bit-serial decode) in the triton interpreter (~2 min):
    the kernels' quantizer gives quantize_per_token's codes, every linear agrees teacher-forced, both verdicts pass."""
    out = tmp_path / "check.json"
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                        "--sections", "export", "--out", str(out)], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ex = json.loads(out.read_text())["export"]
    assert ex["kernel_code_mismatches"] == 0 and ex["kernel_code_mismatches_hadamard"] == 0
    assert ex["fused_path_ok"] and ex["fused_bitplane_ok"]
    assert ex["teacher_forced_decode_max_rel_triton_bitplane"] < 1e-4 and ex["packed_linears_triton_bitplane"] == 14
    assert ex["merged_ok"] and ex["merged_groups_triton"] == 4
    assert ex["glu_ok"] and ex["glu_mlps_triton"] == 2 and ex["glu_in_kernel_mlps_triton"] == 2
    assert set(ex["glu_quantizer_mismatches"]) == {"float16", "bfloat16", "float32"}
    assert ex["fused_bitplane_tiled_ok"] and ex["teacher_forced_decode_max_rel_triton_bitplane_tiled"] < 1e-4


def test_gpu_check_self_test_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                        "--sections", "kernel", "export", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["failed_sections"] == [] and "git_commit" in rep
    assert rep["kernel"]["max_rel_err"] < 1e-3
    ex = rep["export"]
    assert ex["packed_linears"] == 14 and ex["ok"]
    # every packed linear, fed the input its fake-quant twin saw, gives the same output to float32 rounding (prompt
    # and decode batches)
    assert ex["teacher_forced_max_rel"] < 1e-4 and ex["teacher_forced_decode_max_rel"] < 1e-4
    # end to end: close, or apart only from a code flipped by a rounding-level input difference (seen on one CPU: one
    # code at layer 0's o_proj, input 3e-7, logits 9 %)
    assert ex["rel_logits_vs_fakequant"] < 1e-2 or (ex["first_code_flip_linear"] is not None
                                                    and ex["input_rel_at_first_code_flip"] < 1e-5)
    assert 0 < rep["export"]["fakequant_sensitivity_rel_logits_1e-6"] < 10  # > 0: the perturbation reached the model
    # without CUDA and without --device cpu: one line, status 2, nothing written
    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path / "x.json")],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "needs a CUDA GPU" in r.stderr and not (tmp_path / "x.json").exists()
