"""Helper for tests/integration/test_distributed.py: a short QAT run on a tiny random LLaMA, launched by accelerate.

Usage: torchrun --nproc_per_node N tests/integration/dist_qat_script.py OUT_JSON GRAD_ACCUM STEPS [OUT_DIR STOP_AFTER]
"""

import copy
import json
import sys

import torch

from rcp_lib import models as M
from rcp_lib.qat import QATConfig, train
from rcp_lib.quant.apply import preset, quantize_model
from rcp_lib.rotation.fuse import RotationConfig, rotate_model


def main():
    out_json, grad_accum, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    out_dir = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] != "-" else None
    stop_after = int(sys.argv[5]) if len(sys.argv) > 5 else None
    torch.manual_seed(0)
    fp = M.tiny_llama(hidden=64, intermediate=128, heads=2, kv_heads=1, layers=2, vocab=128, seed=0)
    student = copy.deepcopy(fp)
    rotate_model(student, RotationConfig(r1="random_hadamard"))
    quantize_model(student, preset("W2A4KV4", w_group_size=32))
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 128, (1, 8000), generator=g)
    cfg = QATConfig(steps=steps, seqlen=64, grad_accum=grad_accum, lr_weights=1e-3, lr_quant=1e-2, warmup_steps=1,
                    val_every=1000, checkpoint_every=2, seed=0, mixed_precision="no")
    res = train(student, fp, data, cfg, out_dir=out_dir, resume=out_dir is not None, progress=False, stop_after=stop_after)
    from accelerate import PartialState

    if PartialState().is_main_process:
        w = student.model.layers[0].self_attn.q_proj.weight
        with open(out_json, "w") as f:
            json.dump({"losses": [h["loss"] for h in res.history], "w_sum": float(w.double().sum()),
                       "num_processes": PartialState().num_processes}, f)


if __name__ == "__main__":
    main()
