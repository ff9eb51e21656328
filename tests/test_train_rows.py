"""The paper profile's QAT rows on several GPUs (issue 17, item 5): a row whose QAT does not fit one GPU is refused
with the ``accelerate launch ... train-rows`` command, and what that launch writes is what the notebooks' ``build``
loads.

* the refusal: LLaMA-2-7B's estimate (rcp_lib.train_memory, docs/reproducing.md's memory table) against an 80 GB device;
* ``train-rows`` under ``torchrun --nproc_per_node 2`` on the CPU (gloo, Accelerate's MULTI_CPU: DDP) with the paper
  profile's dry-run stand-ins (tiny random LLaMA of hidden 256, the paper's group 128 and QAT recipe file, budgets
  cut), then ``build`` in this process loads the student without training.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rcp_lib.experiments import method
from rcp_lib.experiments.footprints import REFERENCE_CONFIGS
from rcp_lib.profiles import get_profile
from rcp_lib.train_memory import qat_memory_per_gpu

ROOT = Path(__file__).resolve().parent.parent
B = importlib.import_module("rcp_lib.experiments.build")  # the module (the package exports its build())


def test_a_row_too_large_for_one_gpu_is_refused_with_the_launch_command():
    P = get_profile("paper")
    m = method("RCP", "W2A4KV4")
    cfg = REFERENCE_CONFIGS["LLaMA-2-7B"]
    want = qat_memory_per_gpu(cfg, n_gpus=1, strategy="ddp", w_bits=2, group_size=128, seq_len=2048, micro_batch=1)
    assert B.qat_memory_gb(m, P, cfg) == pytest.approx(want["total_gb"])
    assert 100 < want["total_gb"] < 150  # docs/reproducing.md's memory table: ~124 GB, more than one 80 GB GPU
    with pytest.raises(B.QATDoesNotFitError) as e:
        B.check_qat_fits(m, P, cfg, device_bytes=80 * 10**9)
    msg = str(e.value)
    assert "\n" not in msg and f"{want['total_gb']:.1f} GB" in msg and "80.0 GB" in msg
    assert ("accelerate launch --config_file configs/accelerate/8gpu-fsdp.yaml -m rcp_lib train-rows --profile paper "
            "--method RCP --setting W2A4KV4") in msg
    assert B.qat_key(m, P) in msg  # the cache folder that build() reads afterwards
    B.check_qat_fits(m, P, cfg, device_bytes=200 * 10**9)  # fits: no error
    B.check_qat_fits(method("RCP"), get_profile("cpu"), cfg)  # off CUDA nothing is checked


def test_launch_command_carries_the_profile_overrides():
    P = get_profile("paper", seed=1, methods=["RCP", "RCP w/o Clip"])
    cmd = B.launch_command(method("RCP w/o Clip", "W2A4KV4"), P)
    assert "--method 'RCP w/o Clip' --setting W2A4KV4" in cmd
    assert "--set 'methods=[\"RCP\", \"RCP w/o Clip\"]'" in cmd and "--set seed=1" in cmd


def test_train_rows_refuses_rows_without_qat():
    from rcp_lib.__main__ import main

    with pytest.raises(ValueError, match="QAT rows only"):
        B.train_rows([method("FP"), method("QuaRot-GPTQ")], get_profile("cpu"))
    assert main(["train-rows", "--profile", "cpu", "--method", "QuaRot-GPTQ", "--setting", "W2A4KV4"]) == 2


@pytest.mark.integration  # two processes (tests/conftest.py)
def test_train_rows_under_two_processes_is_what_build_loads(tmp_path, monkeypatch):
    exe = Path(sys.executable).parent / "torchrun"
    if not exe.exists():
        pytest.skip("torchrun not installed")
    from rcp_lib.reproduce import DRY_RUN_BUDGETS, make_dry_run_model

    model_dir = make_dry_run_model(tmp_path / "model")
    overrides = {**DRY_RUN_BUDGETS, "model": str(model_dir), "methods": ["RCP"]}
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    cache = tmp_path / "cache"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="1", RCP_CACHE=str(cache),
               CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([str(exe), "--nproc_per_node", "2", "--master_port", "29547", "-m", "rcp_lib", "train-rows",
                        "--profile", "paper", "--quiet", *sets],
                       env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.count("RCP W2A4KV4: ") == 1  # rank 0 reports, once

    monkeypatch.setenv("RCP_CACHE", str(cache))
    P = get_profile("paper", **overrides)
    m = method("RCP", "W2A4KV4")
    out = cache / "qat" / B.qat_key(m, P)
    assert str(out / "student.pt") in r.stdout
    assert not (out / "checkpoint").exists()  # finished: the checkpoints are dropped
    stats = json.loads((out / "qat_stats.json").read_text())
    q = m.recipe(P).qat
    assert stats["tokens"] == q.steps * q.batch_size * q.grad_accum * q.seqlen * 2  # two processes' batches
    assert stats["processes"] == 2
    assert stats["step0_ppl"] > 0

    def no_training(*a, **k):
        raise AssertionError("build() trained although train-rows had written the student")

    monkeypatch.setattr(B, "_train_and_save", no_training)
    model = B.build(m, P, progress=False)
    saved = torch.load(out / "student.pt", map_location="cpu")
    state = model.state_dict()
    assert set(saved) == set(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    assert stats["weight_shift"] > 0  # the latent weights were trained
