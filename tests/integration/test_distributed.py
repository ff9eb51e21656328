"""The QAT loop on 2 CPU processes (gloo) equals one process with the same global batch.

accelerate 1.15's `accelerate launch --cpu --num_processes 2` starts several CPU processes only through MPI;
`torchrun --nproc_per_node 2` with ACCELERATE_USE_CPU=1 gives the same Accelerate MULTI_CPU state without MPI,
and the training code is identical (Accelerator picks the distributed state up from the environment).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "integration" / "dist_qat_script.py"


def _torchrun():
    exe = Path(sys.executable).parent / "torchrun"
    if not exe.exists():
        pytest.skip("torchrun not installed")
    return str(exe)


def _run(args, nproc, tmp):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="1")
    if nproc == 1:
        cmd = [sys.executable, str(SCRIPT), *args]
    else:
        cmd = [_torchrun(), "--nproc_per_node", str(nproc), "--master_port", "29517", str(SCRIPT), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp)
    assert r.returncode == 0, r.stderr[-4000:]


def test_two_processes_match_one_process_with_same_global_batch(tmp_path):
    _run([str(tmp_path / "one.json"), "2", "4"], 1, tmp_path)  # 1 process x grad_accum 2
    _run([str(tmp_path / "two.json"), "1", "4"], 2, tmp_path)  # 2 processes x grad_accum 1
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert len(one["losses"]) == len(two["losses"]) == 4
    for a, b in zip(one["losses"], two["losses"]):
        assert a == pytest.approx(b, rel=1e-4)
    assert one["w_sum"] == pytest.approx(two["w_sum"], rel=1e-4, abs=1e-4)


def test_resume_from_checkpoint_under_two_processes(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    _run([str(tmp_path / "a.json"), "1", "4", str(full)], 2, tmp_path)
    _run([str(tmp_path / "b0.json"), "1", "4", str(part), "2"], 2, tmp_path)  # stopped after step 2
    assert json.loads((part / "checkpoint" / "rcp_step.json").read_text())["step"] == 2
    _run([str(tmp_path / "b.json"), "1", "4", str(part)], 2, tmp_path)  # resumed to step 4
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    assert a["w_sum"] == pytest.approx(b["w_sum"], rel=1e-5, abs=1e-5)
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)


def test_more_processes_than_devices_is_refused():
    from rcp_lib.qat import check_world

    check_world(num_processes=2, device_type="cpu", available=0)  # CPU processes need no device
    check_world(num_processes=4, device_type="cuda", available=8)
    with pytest.raises(RuntimeError, match="8 processes.*4 CUDA"):
        check_world(num_processes=8, device_type="cuda", available=4)
