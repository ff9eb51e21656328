"""Training-step time of the fake-quantized RCP student vs the same step of the FP model, side by side.

python benchmarks/bench_qat_step.py [--seqlen 512] [--repeats 3] [--model smollm2-135m]
python benchmarks/bench_qat_step.py --autocast [--curve-steps 100]   # fp32 vs bf16 autocast, side by side

``--autocast`` times the RCP W2A4KV4 student's step three ways in one run, interleaved: ``fp32``; ``bf16_teacher``
(the teacher's forward under bf16 autocast, ``QATConfig(teacher_precision="bf16")``); ``bf16_all`` (teacher and
student forward under bf16 autocast, ``QATConfig(mixed_precision="bf16", teacher_precision="bf16")``), and reports
tokens/s of each (median step). ``--curve-steps N`` additionally trains the student for N steps with
:func:`rcp_lib.qat.train` in each mode and in fp32 with a second seed (the seed-noise reference), and reports the mean
loss of the last fifth of each curve and its gap to fp32, next to the seed gap (adopt bf16 only where its gap is
within the seed gap).

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
    ap.add_argument("--autocast", action="store_true", help="fp32 vs bf16 autocast (teacher, then student too) instead")
    ap.add_argument("--curve-steps", type=int, default=0, help="with --autocast: also train N steps per mode")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N decoder blocks (smoke runs)")
    args = ap.parse_args()
    if args.autocast:
        return autocast_main(args)

    teacher, tok = load(args.model)
    ids = calibration_windows(corpus_tokens(tok, "wiki-excerpt", "train"), 2 * args.repeats + 2, args.seqlen, seed=0)
    cfg = QATConfig(seqlen=args.seqlen)
    fp = copy.deepcopy(teacher)
    student = copy.deepcopy(teacher)
    rotate_model(student, RotationConfig(r1="random_hadamard"))
    quantize_model(student, preset("W2A4KV4", w_group_size=args.group_size))
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


AUTOCAST_MODES = {"fp32": ("no", "same"), "bf16_teacher": ("no", "bf16"), "bf16_all": ("bf16", "bf16")}


def _truncate(model, n: int | None):
    """Keep the first ``n`` decoder blocks (a smaller model for a smoke run); None: unchanged."""
    if n is not None:
        from rcp_lib.models import decoder_layers

        layers = decoder_layers(model)
        del layers[n:]
        model.config.num_hidden_layers = n
    return model


def autocast_main(args) -> None:
    """fp32 vs bf16 autocast of the QAT step (see module docstring)."""
    import contextlib

    from rcp_lib import QATConfig, QuantConfig, RotationConfig, quantize_model, rotate_model
    from rcp_lib.data import calibration_windows, corpus_tokens
    from rcp_lib.models import load
    from rcp_lib.qat import distillation_loss, parameter_groups, train

    teacher, tok = load(args.model)
    _truncate(teacher, args.layers)
    train_ids = corpus_tokens(tok, "wiki-excerpt", "train")
    ids = calibration_windows(train_ids, 3 * args.repeats + 3, args.seqlen, seed=0)
    base = copy.deepcopy(teacher)
    rotate_model(base, RotationConfig(r1="random_hadamard"))
    quantize_model(base, preset("W2A4KV4", w_group_size=args.group_size))
    teacher.eval()
    cfg = QATConfig(seqlen=args.seqlen)

    def ac(on: bool):
        return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()

    students, opts = {}, {}
    for mode in AUTOCAST_MODES:
        students[mode] = copy.deepcopy(base).train()
        lat, qp = parameter_groups(students[mode], cfg)
        opts[mode] = torch.optim.AdamW(lat + qp, lr=1e-6)

    def step(mode, batch):
        mp, tp = AUTOCAST_MODES[mode]
        t0 = time.perf_counter()
        with torch.no_grad(), ac(tp == "bf16"):
            t_logits = teacher(input_ids=batch, use_cache=False).logits
        with ac(mp == "bf16"):
            s_logits = students[mode](input_ids=batch, use_cache=False).logits
            loss = distillation_loss(s_logits, t_logits, batch, cfg)
        loss.backward()
        opts[mode].step()
        opts[mode].zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times = {m: [] for m in AUTOCAST_MODES}
    for m in AUTOCAST_MODES:  # warm-up
        step(m, ids[:1])
    k = 1
    for _ in range(args.repeats):
        for m in AUTOCAST_MODES:
            times[m].append(step(m, ids[k : k + 1]))
            k += 1
    out = {"model": args.model, "layers": args.layers, "seqlen": args.seqlen, "batch": 1, "repeats": args.repeats,
           "threads": torch.get_num_threads(), "modes": {}}
    for m, ts in times.items():
        med = statistics.median(ts)
        out["modes"][m] = {"step_s": round(med, 3), "tokens_per_s": round(args.seqlen / med, 1)}
    if args.curve_steps > 0:
        data = train_ids
        curves = {}
        runs = [(m, 0) for m in AUTOCAST_MODES] + [("fp32", 1)]
        for m, seed in runs:
            mp, tp = AUTOCAST_MODES[m]
            c = QATConfig(steps=args.curve_steps, seqlen=args.seqlen, mixed_precision=mp, teacher_precision=tp,
                          seed=seed, val_every=10 ** 9, checkpoint_every=10 ** 9, warmup_steps=min(10, args.curve_steps // 10))
            st = copy.deepcopy(base)
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(True)  # accelerate keeps one mixed-precision state per process
            res = train(st, teacher, data, c, progress=False)
            losses = [h["loss"] for h in res.history]
            tail = losses[-max(1, len(losses) // 5):]
            curves[f"{m}/seed{seed}"] = {"tail_mean_loss": statistics.fmean(tail), "seconds": round(res.seconds, 1),
                                         "tokens_per_s": round(res.tokens / max(res.seconds, 1e-9), 1)}
        ref = curves["fp32/seed0"]["tail_mean_loss"]
        out["seed_gap"] = abs(curves["fp32/seed1"]["tail_mean_loss"] - ref)
        for name, c in curves.items():
            c["gap_to_fp32"] = c["tail_mean_loss"] - ref
        out["curves"] = curves
    print(json.dumps(out, indent=2))
    if args.json:
        from rcp_lib.io import atomic_write_json, provenance

        atomic_write_json({**out, **provenance()}, args.json)


if __name__ == "__main__":
    main()
