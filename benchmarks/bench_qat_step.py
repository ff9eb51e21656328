"""Training-step time of the fake-quantized RCP student vs the same step of the FP model, side by side.

python benchmarks/bench_qat_step.py [--seqlen 512] [--repeats 3] [--model smollm2-135m]

Both steps: forward of the model being trained + teacher forward (no grad) + KL loss + backward + AdamW step,
batch 1, and both train the same parameters (``rcp_lib.qat.parameter_groups``: the linears of the decoder blocks;
the student also its quantizer parameters). ``--fp-train all`` instead trains every parameter of the FP model
(embedding and norms too), a more expensive FP step and therefore a smaller ratio. FP and quantized steps are interleaved so that machine load affects both alike; the script reports
the median of each, their ratio (target: fake-quant overhead <= 1.5x) and the peak resident memory of the
process while running each kind of step (Linux ru_maxrss / VmHWM, reset between kinds where possible).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import time

import torch


def _rss_peak_mb() -> float:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    try:  # Linux: writing 5 to clear_refs resets VmHWM
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def main() -> None:
    from rcp_lib import QATConfig, QuantConfig, RotationConfig, quantize_model, rotate_model
    from rcp_lib.data import calibration_windows, corpus_tokens
    from rcp_lib.models import load
    from rcp_lib.qat import distillation_loss, parameter_groups

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--fp-train", choices=("same", "all"), default="same",
                    help="FP model trains the student's parameter set (default) or all its parameters")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()

    teacher, tok = load(args.model)
    ids = calibration_windows(corpus_tokens(tok, "wiki-excerpt", "train"), 2 * args.repeats + 2, args.seqlen, seed=0)
    cfg = QATConfig(seqlen=args.seqlen)
    fp = copy.deepcopy(teacher)
    student = copy.deepcopy(teacher)
    rotate_model(student, RotationConfig(r1="random_hadamard"))
    quantize_model(student, QuantConfig(w_bits=2, a_bits=4, kv_bits=4, w_group_size=args.group_size))
    opts = {}
    for name, m in (("fp", fp), ("rcp_w2a4kv4", student)):
        if name == "fp" and args.fp_train == "all":
            for p in m.parameters():
                p.requires_grad_(True)
            params = [p for p in m.parameters()]
        else:
            lat, qp = parameter_groups(m, cfg)
            params = lat + qp
        opts[name] = torch.optim.AdamW(params, lr=1e-6)
        m.train()
    teacher.eval()

    def step(name, m, batch):
        t0 = time.perf_counter()
        with torch.no_grad():
            t_logits = teacher(input_ids=batch, use_cache=False).logits
        s_logits = m(input_ids=batch, use_cache=False).logits
        loss = distillation_loss(s_logits, t_logits, batch, cfg)
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times = {"fp": [], "rcp_w2a4kv4": []}
    peaks = {"fp": 0.0, "rcp_w2a4kv4": 0.0}
    models = {"fp": fp, "rcp_w2a4kv4": student}
    for name in models:  # warm-up
        step(name, models[name], ids[:1])
    for r in range(args.repeats):
        for i, name in enumerate(models):
            _reset_peak()
            times[name].append(step(name, models[name], ids[1 + 2 * r + i : 2 + 2 * r + i]))
            peaks[name] = max(peaks[name], _rss_peak_mb())
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"model": args.model, "seqlen": args.seqlen, "batch": 1, "repeats": args.repeats, "fp_train": args.fp_train,
           "fp_step_s": round(med["fp"], 3), "rcp_step_s": round(med["rcp_w2a4kv4"], 3),
           "overhead_ratio": round(med["rcp_w2a4kv4"] / med["fp"], 3),
           "fp_peak_rss_mb": round(peaks["fp"]), "rcp_peak_rss_mb": round(peaks["rcp_w2a4kv4"]),
           "threads": torch.get_num_threads()}
    print(json.dumps(out, indent=2))
    if args.json:
        from rcp_lib.io import atomic_write_json, provenance

        atomic_write_json({**out, **provenance()}, args.json)


if __name__ == "__main__":
    main()
