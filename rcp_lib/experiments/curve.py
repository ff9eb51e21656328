"""How far would more tokens go: RCP W2A4KV4 validation perplexity vs training tokens, with FP as a line.

    python -m rcp_lib.experiments.curve --profile cpu --steps 640 --val-every 40 [--set 'qat_overrides={"qat": {"lr_quant": 1e-2}}' ...]

Trains (or loads from the QAT cache) the RCP W2A4KV4 student of the profile with ``qat_steps = --steps`` and a
validation point every ``--val-every`` steps (the QAT loop's validation: ``val_windows`` windows of ``qat_seqlen``
tokens from the held-out tail of the train split), scores the FP model on the same windows, and writes
``results/<profile>/qat_tokens.csv`` and ``figures/<profile>/qat_tokens.{png,pdf}``
(:func:`rcp_lib.experiments.token_curve`, :func:`rcp_lib.experiments.plot_token_curve`). Results are refused from a
dirty tree unless ``--allow-dirty``. Run it alone on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rcp_lib.experiments.curve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="QAT steps (default: the profile's qat_steps)")
    ap.add_argument("--val-every", type=int, default=None, help="steps between validation points")
    ap.add_argument("--set", nargs="*", default=[], help="profile overrides KEY=VALUE (JSON values)")
    ap.add_argument("--allow-dirty", action="store_true")
    args = ap.parse_args(argv)
    if args.allow_dirty:
        os.environ["RCP_ALLOW_DIRTY"] = "1"
    from ..profiles import parse_set_items
    from . import plot_token_curve, token_curve, write_rows
    from ..io import require_clean_tree, save_figure
    from ..paths import figures_dir
    from ..profiles import get_profile

    # --steps / --val-every win over the same fields in --set (None: the --set or profile value)
    P = get_profile(args.profile, **{**parse_set_items(args.set),
                                     **{k: v for k, v in (("qat_steps", args.steps), ("qat_val_every", args.val_every))
                                        if v is not None}})
    require_clean_tree()
    rows = token_curve(P)
    path = write_rows(rows, P, "qat_tokens")
    save_figure(plot_token_curve(rows), figures_dir(P), "qat_tokens")
    for r in rows:
        print(f"{r['tokens']:>10d} tokens  val ppl {r['val_ppl']:.2f}  (FP {r['fp_val_ppl']:.2f})")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
