"""Zero-shot accuracy of the embedded full-precision SmolLM2-135M on the offline tasks (full task size).

Writes ``results/zero_shot_fp_embedded.csv`` (one row per task/metric, with config and provenance).
Run: ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python scripts/zero_shot_fp_embedded.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import time  # noqa: E402


def main() -> None:
    """Evaluate, print the table and save it with provenance."""
    from rcp_lib.evaluation.offline_tasks import OFFLINE_TASKS, build_offline_tasks, manifest
    from rcp_lib.evaluation.zero_shot import average_accuracy, zero_shot
    from rcp_lib.io import atomic_write_csv, provenance
    from rcp_lib.models import EMBEDDED_NOTE, load

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=None,
                    help="CSV to write (default: results/zero_shot_fp_embedded.csv, see rcp_lib.experiments.registry)")
    args = ap.parse_args()
    if args.out is None:
        from rcp_lib.experiments.registry import result_path

        args.out = str(result_path("zero_shot_fp_embedded"))

    model, tok = load("smollm2-135m")
    config = {"model": "smollm2-135m", "note": EMBEDDED_NOTE, "corpus": "wiki-excerpt test", "task_set": manifest(build_offline_tasks())}
    t0 = time.perf_counter()
    df = zero_shot(model, tok, tasks=OFFLINE_TASKS, limit=args.limit, batch_size=args.batch_size, config=config)
    seconds = time.perf_counter() - t0
    prov = provenance()
    rows = [{**r, **prov} for r in df.to_dict("records")]
    atomic_write_csv(rows, args.out)
    print(df.drop(columns=["config"]).to_string())
    print(f"average ({'/'.join(OFFLINE_TASKS)}): {average_accuracy(df):.4f}; {seconds:.1f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
