"""Greedy generation on the CPU: the packed (exported, reloaded) model against the FP model, side by side.

python benchmarks/packed_cpu_speed.py [--method RTN] [--setting W2A4KV4] [--profile cpu] [--tokens 20] [--repeats 3]
                                      [--uncached] [--json results/cpu/packed_cpu_speed.json]

The FP model of the profile and the method's packed folder (built through the tables' code,
:func:`rcp_lib.experiments.build.build`, PTQ weights from the cache; written with ``save_quantized``'s default storage
and read back with ``load_quantized``, as a user would) each generate ``--tokens`` greedy tokens from the same prompt
(the first ``--prompt-tokens`` tokens of the corpus' test split, KV cache on, batch 1). The runs are interleaved repeat
by repeat so that machine load affects every model alike; the script prints the median seconds of each and the ratio
packed / FP. The packed model's first generation (the warm-up, reported apart) decodes every projection once into its
decode cache (``PackedLinear.decode_cache``); the timed runs reuse it. ``--uncached`` also times the packed model with ``PackedLinear.decode_cache = False``: every projection
calls the W2A4 op's torch reference, which unpacks and dequantizes its codes on every call (the CPU path before the
decode cache). That path computes the op's integer activation form, equal to the cached (fake-quant) form only to float
rounding, so on a 2-bit PTQ model its greedy tokens may differ (``same_tokens_cached_uncached``). Times depend on the
machine and its load (other processes on a shared machine move single runs by several x); compare ratios from one
run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch


def _generate(model, prompt: torch.Tensor, tokens: int) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return time.perf_counter() - t, out[0, prompt.shape[1]:]


def _set_decode_cache(model, on: bool) -> None:
    """Switch the decode cache of every PackedLinear (a decoded weight already held is kept, unused while off)."""
    from rcp_lib.deploy import PackedLinear

    for mod in model.modules():
        if isinstance(mod, PackedLinear):
            mod.decode_cache = on


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="RTN", help="a named quantized method (rcp_lib.experiments.methods)")
    ap.add_argument("--setting", default="W2A4KV4")
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--tokens", type=int, default=20, help="greedy tokens per generation")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--uncached", action="store_true", help="also time the packed model without its decode cache")
    ap.add_argument("--json", default=None, help="also write the result (with provenance) to this file")
    args = ap.parse_args(argv)

    from rcp_lib.experiments.build import base_model, build, tokens
    from rcp_lib.experiments.methods import method
    from rcp_lib.deploy import load_quantized, save_quantized
    from rcp_lib.profiles import get_profile

    P = get_profile(args.profile)
    fp, tok = base_model(P)
    fp.eval()
    m = method(args.method, args.setting)
    t0 = time.perf_counter()
    quant = build(m, P, progress=True)
    with tempfile.TemporaryDirectory() as d:
        folder = save_quantized(quant, os.path.join(d, "packed"), tokenizer=tok)
        storage = json.loads((folder / "config.json").read_text())["quantization_config"]["storage_dtype"]
        del quant
        packed, _ = load_quantized(folder)
    print(f"packed {m.name} {m.setting} ({storage} storage) ready in {time.perf_counter() - t0:.0f} s", flush=True)
    prompt = tokens(P, "test")[:, : args.prompt_tokens]

    kinds = ["fp", "packed"] + (["packed_uncached"] if args.uncached else [])
    times: dict[str, list[float]] = {k: [] for k in kinds}
    outs: dict[str, torch.Tensor] = {}
    _generate(fp, prompt, 2)  # warm-up (first-call allocations, thread pool)
    first_s = _generate(packed, prompt, 2)[0]  # includes the one-time decode of every projection into its cache
    print(f"packed warm-up (2 tokens, decodes every projection once): {first_s:.2f} s", flush=True)
    for r in range(args.repeats):
        for k in kinds:
            model = fp if k == "fp" else packed
            if k != "fp":
                _set_decode_cache(packed, k == "packed")
            s, out = _generate(model, prompt, args.tokens)
            times[k].append(s)
            outs[k] = out
            print(f"repeat {r + 1}/{args.repeats} {k:16s} {s:8.2f} s", flush=True)
    _set_decode_cache(packed, True)
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"method": m.name, "setting": m.setting, "profile": P.name, "model": P.model, "storage_dtype": storage,
           "tokens": args.tokens, "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
           "packed_first_call_s": first_s,
           **{f"{k}_s": med[k] for k in kinds}, "packed_vs_fp": med["packed"] / med["fp"],
           "same_tokens_cached_uncached": (bool(torch.equal(outs["packed"], outs["packed_uncached"]))
                                           if args.uncached else None),
           "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    if args.uncached:
        res["uncached_vs_fp"] = med["packed_uncached"] / med["fp"]
    line = (f"{args.tokens} greedy tokens, median of {args.repeats}: FP {med['fp']:.2f} s, "
            f"packed {med['packed']:.2f} s ({res['packed_vs_fp']:.2f}x FP)")
    if args.uncached:
        line += (f", packed without decode cache {med['packed_uncached']:.2f} s ({res['uncached_vs_fp']:.1f}x FP; "
                 f"same tokens: {res['same_tokens_cached_uncached']})")
    print(line, flush=True)
    if args.json:
        from rcp_lib.io import atomic_write_json, provenance

        atomic_write_json({**res, "times_s": times, **provenance()}, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
