"""Helper for tests/integration/test_dry_run.py: the distributed QAT path on 2 CPU processes (gloo), launched by torchrun.

Trains a tiny random LLaMA (hidden 256, the paper's group 128) with the paper's QAT recipe (configs/paper-llama2-7b.yaml,
budgets cut) through Accelerate (MULTI_CPU: DDP), shards the trained student with torch's FSDP2 ``fully_shard``
(Accelerate builds FSDP only on GPU-type states), then evaluates on every rank and exports from the sharded state
(:func:`rcp_lib.run_config.export_run`: full state dict gathered, rank 0 writes). Writes OUT_JSON on rank 0.

Usage: torchrun --nproc_per_node 2 tests/integration/dist_export_script.py OUT_JSON EXPORT_DIR
"""

import copy
import dataclasses
import json
import sys
from pathlib import Path

import torch

from rcp_lib import models as M
from rcp_lib.evaluation import perplexity_details
from rcp_lib.qat import train
from rcp_lib.quant.apply import quantize_model
from rcp_lib.rotation.fuse import rotate_model
from rcp_lib.run_config import RunConfig, export_run

ROOT = Path(__file__).resolve().parents[2]
DIMS = dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=128)


def main():
    out_json, export_dir = sys.argv[1], sys.argv[2]
    cfg = RunConfig.load(ROOT / "configs" / "paper-llama2-7b.yaml")
    cfg.recipe.qat = dataclasses.replace(cfg.recipe.qat, steps=2, seqlen=64, grad_accum=1, warmup_steps=1, val_every=2,
                                         val_windows=1, checkpoint_every=2)
    torch.manual_seed(0)
    fp = M.tiny_llama(**DIMS, seed=0)
    student = copy.deepcopy(fp)
    rotate_model(student, cfg.recipe.rotation)
    quantize_model(student, cfg.recipe.quant)
    data = torch.randint(0, DIMS["vocab"], (1, 6000), generator=torch.Generator().manual_seed(0))
    test_ids = torch.randint(0, DIMS["vocab"], (1, 4 * 64), generator=torch.Generator().manual_seed(1))
    res = train(student, fp, data, cfg.recipe.qat, out_dir=None, progress=False)
    from accelerate import PartialState

    state = PartialState()
    ref = perplexity_details(student, test_ids, seqlen=64, progress=False).ppl  # unsharded, every rank
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (state.num_processes,))
    for layer in M.decoder_layers(student):
        fully_shard(layer, mesh=mesh)
    fully_shard(student, mesh=mesh)
    sharded = any(type(p).__name__ == "DTensor" for p in student.parameters())
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in student.parameters())
    total = sum(p.numel() for p in student.parameters())
    ppl = perplexity_details(student, test_ids, seqlen=64, progress=False).ppl  # every rank takes part
    export_run(student, cfg, export_dir, state.is_main_process, skeleton=lambda: M.tiny_llama(**DIMS, seed=0))
    state.wait_for_everyone()
    if state.is_main_process:
        from rcp_lib.deploy import load_quantized

        packed, _ = load_quantized(export_dir)
        packed_ppl = perplexity_details(packed, test_ids, seqlen=64, progress=False).ppl
        with open(out_json, "w") as f:
            json.dump({"num_processes": state.num_processes, "train_steps": res.steps, "ref_ppl": ref,
                       "sharded_ppl": ppl, "packed_ppl": packed_ppl, "sharded": sharded,
                       "local_fraction": local / total, "teacher_dtype": str(next(fp.parameters()).dtype)}, f)


if __name__ == "__main__":
    main()
