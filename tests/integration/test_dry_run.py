"""Dry-runs of the paper path on the CPU (issue 17).

* ``test_distributed_qat_eval_and_export_from_sharded_state`` (default suite): 2 CPU processes (torchrun, gloo)
  train with the paper recipe through Accelerate (DDP: Accelerate 1.15 builds FSDP only on GPU-type distributed
  states, not MULTI_CPU), then shard the student with torch's FSDP2 ``fully_shard`` and evaluate on every rank and
  export from the sharded state (full state dict gathered, rank 0 writes).
* ``test_reproduce_paper_dry_run`` (``slow``, several minutes): every notebook's paper branch with a tiny random
  LLaMA in a temporary folder (``python -m rcp_lib reproduce --profile paper --dry-run``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_distributed_qat_eval_and_export_from_sharded_state(tmp_path):
    exe = Path(sys.executable).parent / "torchrun"
    if not exe.exists():
        pytest.skip("torchrun not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="1")
    out = tmp_path / "dist.json"
    r = subprocess.run([str(exe), "--nproc_per_node", "2", "--master_port", "29531",
                        str(ROOT / "tests" / "integration" / "dist_export_script.py"), str(out), str(tmp_path / "packed")],
                       env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    d = json.loads(out.read_text())
    assert d["num_processes"] == 2 and d["train_steps"] == 2
    assert d["teacher_dtype"] == "torch.bfloat16"  # the paper recipe trains under bf16: the teacher is kept in bf16
    assert d["sharded"] and d["local_fraction"] < 0.75  # each rank holds about half of the parameters
    assert d["sharded_ppl"] == pytest.approx(d["ref_ppl"], rel=1e-5)  # every rank evaluated the sharded model
    assert d["packed_ppl"] == pytest.approx(d["ref_ppl"], rel=1e-2)  # exported from the gathered state (fp16 LUTs)
    assert (tmp_path / "packed" / "quant_map.json").exists()


@pytest.mark.slow
def test_reproduce_paper_dry_run(tmp_path):
    from rcp_lib.experiments.registry import profile_notebooks
    from rcp_lib.profiles import PROFILES
    from rcp_lib.reproduce import dry_run

    results_before = sorted(p for p in (ROOT / "results").rglob("*") if p.is_file())
    work = dry_run("paper", workdir=tmp_path / "dry")
    assert work == (tmp_path / "dry").resolve()
    for nb in profile_notebooks(PROFILES["paper"]):
        assert (work / "runs" / "paper" / nb).exists()
    outs = list((work / "results").iterdir())  # the budgets are overrides: results/paper-<hash of them>/
    assert len(outs) == 1 and outs[0].name.startswith("paper-")
    written = sorted(p.name for p in outs[0].iterdir())
    assert "perplexity.csv" in written and "quickstart.json" in written
    import pandas as pd

    ppl = pd.read_csv(outs[0] / "perplexity.csv")
    assert set(ppl["method"]) >= {"FP", "RCP"} and ppl["ppl"].notna().all()
    assert sorted(p for p in (ROOT / "results").rglob("*") if p.is_file()) == results_before
