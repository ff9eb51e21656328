"""Command line: ``python -m rcp_lib {ppl,reproduce,...}``."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _cmd_ppl(args: argparse.Namespace) -> int:
    import torch

    from .data import corpus_tokens
    from .evaluation import perplexity_details
    from .models import describe, load

    torch.manual_seed(args.seed)
    model, tok = load(args.model, device=args.device)
    ids = corpus_tokens(tok, args.corpus, args.split)
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    r = perplexity_details(model, ids, seqlen=args.seqlen, max_windows=args.max_windows, batch_size=args.batch_size)
    out = {
        "model": args.model,
        "model_note": describe(args.model),
        "corpus": args.corpus,
        "split": args.split,
        "seqlen": args.seqlen,
        "windows": r.windows,
        "tokens_scored": r.tokens_scored,
        "ppl": round(r.ppl, 4),
        "seconds": round(r.seconds, 1),
        "tokens_per_second": round(r.tokens_per_second, 1),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.model} on {args.corpus}/{args.split} @ seqlen {args.seqlen}: ppl = {r.ppl:.4f} "
              f"({r.windows} windows, {r.tokens_scored} tokens scored, {r.seconds:.1f} s, {r.tokens_per_second:.0f} tok/s)")
    return 0


def _cmd_qat(args: argparse.Namespace) -> int:
    from .run_config import RunConfig, run_qat

    cfg = RunConfig.load(args.config)
    if args.steps is not None:
        cfg.recipe.qat.steps = args.steps
    summary = run_qat(cfg, progress=not args.quiet)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, default=str))
    return 0


def _apply_allow_dirty(args: argparse.Namespace) -> None:
    """``--allow-dirty`` sets ``RCP_ALLOW_DIRTY=1`` (inherited by the notebook kernels that ``reproduce`` starts)."""
    import os

    from .io import ALLOW_DIRTY_ENV

    if getattr(args, "allow_dirty", False):
        os.environ[ALLOW_DIRTY_ENV] = "1"


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .io import DirtyTreeError
    from .reproduce import NotebookFailed, reproduce

    _apply_allow_dirty(args)
    if getattr(args, "dry_run", False):
        from .reproduce import dry_run

        try:
            work = dry_run(args.profile, notebooks=args.notebooks or None)
        except NotebookFailed as e:
            print(f"[rcp_lib] dry-run stopped: {e}", file=sys.stderr)
            return 1
        print(f"dry-run of profile {args.profile!r} passed; outputs in {work}")
        return 0
    try:
        done = reproduce(args.profile, notebooks=args.notebooks or None)
    except (NotebookFailed, DirtyTreeError) as e:
        print(f"[rcp_lib] reproduce stopped: {e}", file=sys.stderr)
        return 1
    print("\n".join(str(p) for p in done))
    return 0


def _table_for(args: argparse.Namespace):
    """The registered table a ``table`` call computes and the file stem it writes: ``--table``, else the table
    whose file (family) ``--name`` belongs to, else ``perplexity_ptq``."""
    from .experiments.registry import TABLES, table_for_file

    if args.table:
        t = TABLES[args.table]
    elif args.name:
        t = table_for_file(f"{args.name}.csv")
        if t is None or t.rows is None:
            raise SystemExit(f"--name {args.name!r} is no registered table that the CLI computes; pass --table "
                             f"or register it in rcp_lib/experiments/registry.py")
    else:
        t = TABLES["perplexity_ptq"]
    stem = args.name or t.file.rsplit(".", 1)[0]
    if not t.matches(f"{stem}.csv"):
        raise SystemExit(f"--name {stem!r} is not a file of table {t.name!r} ({t.file})")
    if t.is_pattern and not args.name:
        raise SystemExit(f"table {t.name!r} is a family of files ({t.file}): name one with --name")
    if args.families and t.families is None:
        raise SystemExit(f"--families applies to the perplexity tables, not to {t.name!r}")
    return t, stem


def _cmd_table(args: argparse.Namespace) -> int:
    from . import experiments as X
    from .io import DirtyTreeError, require_clean_tree
    from .profiles import get_profile

    _apply_allow_dirty(args)
    t, stem = _table_for(args)
    P = get_profile(args.profile, **_parse_overrides(args.set))
    try:
        require_clean_tree()  # fail before computing, not after
    except DirtyTreeError as e:
        print(f"[rcp_lib] table refused: {e}", file=sys.stderr)
        return 1
    kwargs = {} if t.families is None else {"families": tuple(args.families or t.families)}
    rows = getattr(X, t.rows)(P, **kwargs)
    path = X.write_rows(rows, P, stem)
    for r in rows:
        if "ppl" in r:
            print(f"{r['method']:34s} {r['setting']:10s} ppl {r['ppl']:.2f}")
    print(path)
    return 0


def _parse_overrides(items: list[str] | None) -> dict:
    """``["qat_steps=160", 'methods=["RCP"]']`` -> ``{"qat_steps": 160, "methods": ["RCP"]}`` (values parsed as
    JSON where possible, else kept as strings)."""
    import json

    out: dict = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _cmd_readme(args: argparse.Namespace) -> int:
    from .report import update_readme

    print(update_readme(args.profile))
    return 0


def _computable_tables() -> list[str]:
    """Names of the registered tables that ``table`` can compute (those with a rows function)."""
    from .experiments.registry import TABLES

    return [n for n, t in TABLES.items() if t.rows]


def _cmd_export(args: argparse.Namespace) -> int:
    """``export``: a finished QAT run (``--run``) or a cached method of a profile (``--method``) -> packed folder."""
    import torch

    from .export import export_method, export_run

    dtype = getattr(torch, args.dtype)
    if args.run:
        path = export_run(args.run, args.out, dtype=dtype, max_shard_size=args.max_shard_size)
    else:
        path = export_method(args.method, args.setting, args.profile, args.out, dtype=dtype,
                             max_shard_size=args.max_shard_size)
    print(path)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """``eval``: perplexity (and zero-shot with ``--tasks``) of a packed folder."""
    from .export import evaluate_folder

    out = evaluate_folder(args.model, corpus=args.corpus, seqlen=args.seqlen, max_windows=args.max_windows,
                          tasks=args.tasks, limit=args.limit, device=args.device)
    if args.json:
        print(json.dumps(out, default=str))
    else:
        print(f"{args.model} on {args.corpus}/test @ seqlen {args.seqlen}: ppl = {out['ppl']:.4f} "
              f"({out['windows']} windows)")
        for r in out.get("zero_shot", []):
            print(f"{r['task']:16s} {r['metric']:10s} {r['value']:.4f} ± {r['stderr']:.4f} (n={r['n_examples']})")
    return 0


def _add_checkpoint_commands(sub) -> None:
    """Parser entries of ``export`` and ``eval`` (packed Hugging Face folders, :mod:`rcp_lib.export`)."""
    e = sub.add_parser("export", help="write a packed Hugging Face folder (from_pretrained / lm_eval) from a "
                                      "finished QAT run or a cached method of a profile")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a `python -m rcp_lib qat` output folder (summary.json + checkpoint/)")
    src.add_argument("--method", help="a named method (rcp_lib.experiments.methods), built from the cache of "
                                      "--profile (computed first if not cached)")
    e.add_argument("--setting", default="W2A4KV4", help="with --method (default W2A4KV4)")
    e.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "paper"], help="with --method")
    e.add_argument("--out", required=True, help="output folder")
    e.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="storage of the LUTs and full-precision tensors (float32: bit-exact)")
    e.add_argument("--max-shard-size", default="2GB", help="bytes per safetensors file, e.g. 2GB, 500MB")
    e.set_defaults(func=_cmd_export)

    v = sub.add_parser("eval", help="perplexity (and zero-shot with --tasks) of a packed folder")
    v.add_argument("--model", required=True, help="a folder written by export / save_quantized")
    v.add_argument("--corpus", default="wiki-excerpt", choices=["wiki-excerpt", "wikitext2"])
    v.add_argument("--seqlen", type=int, default=512)
    v.add_argument("--max-windows", type=int, default=32)
    v.add_argument("--tasks", nargs="*", help="lm_eval tasks, e.g. wiki_lastword wiki_nextsent (offline)")
    v.add_argument("--limit", type=int, default=None, help="documents per task")
    v.add_argument("--device", default="cpu")
    v.add_argument("--json", action="store_true", help="print one JSON line")
    v.set_defaults(func=_cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rcp_lib", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("ppl", help="perplexity of a (full-precision) model on a corpus split")
    q.add_argument("--model", default="smollm2-135m")
    q.add_argument("--corpus", default="wiki-excerpt", choices=["wiki-excerpt", "wikitext2"])
    q.add_argument("--split", default="test", choices=["train", "test"])
    q.add_argument("--seqlen", type=int, default=2048)
    q.add_argument("--max-windows", type=int, default=None)
    q.add_argument("--batch-size", type=int, default=1)
    q.add_argument("--device", default="cpu")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", action="store_true", help="print one JSON line")
    q.set_defaults(func=_cmd_ppl)

    t = sub.add_parser("qat", help="rotate + quantize + QAT-train a model from a YAML/JSON run config")
    t.add_argument("--config", required=True, help="e.g. configs/cpu.yaml")
    t.add_argument("--steps", type=int, default=None, help="override qat.steps")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_qat)

    r = sub.add_parser("reproduce", help="execute the notebooks with papermill for a profile")
    r.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "gpu", "paper"])
    r.add_argument("--notebooks", nargs="*", help="only these notebooks (file names)")
    r.add_argument("--dry-run", action="store_true",
                   help="run the profile's notebooks on the CPU with a tiny random LLaMA and the wiki excerpt, budgets "
                        "scaled down, everything in a temporary folder (never results/)")
    r.add_argument("--allow-dirty", action="store_true",
                   help="write results even with uncommitted changes to code or configs (sets RCP_ALLOW_DIRTY=1)")
    r.set_defaults(func=_cmd_reproduce)

    tb = sub.add_parser("table", help="compute (or read from the cache) a registered table of a profile and write "
                                      "its CSV (default: the PTQ perplexity rows)")
    tb.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "paper"])
    tb.add_argument("--table", choices=_computable_tables(),
                    help="a table of rcp_lib.experiments.registry (default: the one --name belongs to, else "
                         "perplexity_ptq)")
    tb.add_argument("--families", nargs="+", choices=["baseline", "ptq", "qat"],
                    help="method families of a perplexity table (default: the table's)")
    tb.add_argument("--name", help="results/<profile>/<name>.csv (default: the table's file; required for a family "
                                   "such as perplexity_qat_<steps>)")
    tb.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help='override a profile field (JSON value), e.g. --set qat_steps=160 --set \'methods=["RCP"]\'')
    tb.add_argument("--allow-dirty", action="store_true",
                    help="write the CSV even with uncommitted changes to code or configs (sets RCP_ALLOW_DIRTY=1)")
    tb.set_defaults(func=_cmd_table)

    rd = sub.add_parser("readme", help="rewrite the README results block from results/<profile>/ (no computation)")
    rd.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "paper"])
    rd.set_defaults(func=_cmd_readme)

    _add_checkpoint_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t = time.time()
    rc = args.func(args)
    print(f"[rcp_lib] {args.cmd} done in {time.time() - t:.1f} s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
