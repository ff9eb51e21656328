"""Command line: ``python -m rcp_lib {ppl,qat,reproduce,table,readme,train-rows,export,eval,compare}``
(``python -m rcp_lib <command> --help``).

Known errors (bad input: a malformed or mistyped config, an unknown model, profile, method or field, a corpus or
device that is not available here, a path that cannot be read or written, something not implemented) print one line
on stderr and exit with status 2; ``--debug`` (anywhere on the line) shows the traceback instead. Every input is
checked before a model is loaded. Ctrl-C prints one line and exits with status 130 (finished rows, QAT checkpoints
and cached models stay in the cache: the same command resumes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from pathlib import Path


class CliError(Exception):
    """Bad input found by the command line itself: printed as one line, exit status 2."""


def _known_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input or a missing resource (one line, exit 2), not a bug: every subcommand
    inherits this mapping through :func:`main`. ValueError covers unknown profiles, fields, corpora and model
    families, wrong field types (:func:`rcp_lib.config.coerce_value`), JSON errors and packed-format errors."""
    import yaml

    from .data import CorpusUnavailableError
    from .experiments.build import QATDoesNotFitError
    from .paths import OutputRootError

    # OSError: a missing, unreadable or unwritable path (FileNotFoundError, PermissionError, IsADirectoryError,
    # NotADirectoryError, FileExistsError), a model or hub file that is not there, a connection refused;
    # NotImplementedError: something this library does not do (e.g. a weight width the packed format cannot hold)
    return (CliError, ValueError, OSError, NotImplementedError, yaml.YAMLError, ConnectionError,
            CorpusUnavailableError, OutputRootError, QATDoesNotFitError, _model_not_found())


def _model_not_found() -> type[BaseException]:
    from .models import ModelNotFoundError

    return ModelNotFoundError


def _one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (a YAML error: its problem and position)."""
    import yaml

    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        m = e.problem_mark
        text = f"malformed YAML: {e.problem} (line {m.line + 1}, column {m.column + 1})"
        if e.context:
            text += f", {e.context}"
    else:
        text = str(e) or type(e).__name__
        if isinstance(e, KeyError) and e.args:
            text = str(e.args[0])
    return " ".join(text.split())


def _check_device(device: str) -> None:
    """CliError when ``device`` asks for CUDA on a machine without a usable CUDA device."""
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise CliError(f"--device {device}: no CUDA device is available here (torch {torch.__version__}, "
                       f"CUDA build {torch.version.cuda or 'none'}); use --device cpu")


def _check_model_name(name: str, what: str = "--model") -> None:
    """CliError when a packed quantized folder (``quant_map.json``) is given where a model name is expected."""
    p = Path(name).expanduser()
    if p.is_dir() and (p / "quant_map.json").is_file():
        raise CliError(f"{what} {name}: this is a packed quantized folder (quant_map.json), not a full-precision "
                       f"model: load it with rcp_lib.deploy.load_quantized")


def _cmd_ppl(args: argparse.Namespace) -> int:
    import torch

    from .data import corpus_tokens
    from .evaluation import perplexity_details
    from .models import describe, load

    _check_model_name(args.model)
    _check_device(args.device)
    if args.corpus != "wiki-excerpt":  # a corpus that needs the network fails before the model loads
        from .data import load_corpus

        load_corpus(args.corpus, args.split)
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

    import yaml

    try:
        cfg = RunConfig.load(args.config)
    except yaml.YAMLError as e:
        raise CliError(f"{args.config}: {_one_line(e)}") from e
    except ValueError as e:
        raise CliError(f"{args.config}: {_one_line(e)}") from e
    _check_model_name(cfg.model, "model:")
    _check_device(cfg.device)
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
    from .profiles import get_profile, parse_set_items

    overrides = parse_set_items(args.set)
    if overrides:
        # unknown fields / wrong types / method names, a group that does not fit the model: one line before any
        # notebook runs
        get_profile(args.profile, **overrides).check_model_sizes()
    try:
        done = reproduce(args.profile, notebooks=args.notebooks or None, overrides=overrides or None,
                         html=not args.no_html)
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
            raise CliError(f"--name {args.name!r} is no registered table that the CLI computes; pass --table "
                             f"or register it in rcp_lib/experiments/registry.py")
    else:
        t = TABLES["perplexity_ptq"]
    stem = args.name or t.file.rsplit(".", 1)[0]
    if not t.matches(f"{stem}.csv"):
        raise CliError(f"--name {stem!r} is not a file of table {t.name!r} ({t.file})")
    if t.is_pattern and not args.name:
        raise CliError(f"table {t.name!r} is a family of files ({t.file}): name one with --name")
    if args.families and t.families is None:
        raise CliError(f"--families applies to the perplexity tables, not to {t.name!r}")
    return t, stem


def _cmd_table(args: argparse.Namespace) -> int:
    from . import experiments as X
    from .io import DirtyTreeError, require_clean_tree
    from .profiles import get_profile, parse_set_items

    _apply_allow_dirty(args)
    t, stem = _table_for(args)
    P = get_profile(args.profile, **parse_set_items(args.set))
    P.check_model_sizes()
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


def _cmd_compare(args: argparse.Namespace) -> int:
    """``compare``: every CSV cell of two results folders (:mod:`rcp_lib.compare`); exit 1 when a cell differs."""
    from .compare import compare_folders

    res = compare_folders(args.a, args.b, rtol=args.rtol, atol=args.atol)
    for d in res.diffs:
        print(d.line())
    for n in res.notes:
        print(f"note: {n}")
    print(res.summary(args.rtol, args.atol))
    return 0 if res.ok else 1


def _cmd_readme(args: argparse.Namespace) -> int:
    from .report import results_markdown, update_readme

    if args.print_only:
        import os

        from .paths import figures_root

        print(results_markdown(args.profile, link_root=os.path.relpath(figures_root()) + "/"))
    else:
        print(update_readme(args.profile))
    return 0


def _computable_tables() -> list[str]:
    """Names of the registered tables that ``table`` can compute (those with a rows function)."""
    from .experiments.registry import TABLES

    return [n for n, t in TABLES.items() if t.rows]


def _cmd_train_rows(args: argparse.Namespace) -> int:
    """``train-rows``: train the QAT students of a profile's table rows into the cache (under ``accelerate launch``
    for the ``paper`` profile, whose QAT does not fit one GPU; :func:`rcp_lib.experiments.build.train_rows`)."""
    import os

    from . import experiments as X
    from .experiments.build import train_rows
    from .profiles import get_profile, parse_set_items

    P = get_profile(args.profile, **parse_set_items(args.set))
    P.check_model_sizes()
    if args.method:
        rows = [X.method(args.method, s) for s in ([args.setting] if args.setting else P.settings)]
    else:
        rows = [m for m in X.all_methods(P) if m.qat and (args.setting is None or m.setting == args.setting)]
    if not rows:
        raise CliError(f"profile {args.profile!r} has no QAT row" + (f" at {args.setting}" if args.setting else ""))
    paths = train_rows(rows, P, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        for m, path in zip(rows, paths):
            print(f"{m.name} {m.setting}: {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    """``export``: a finished QAT run (``--run``) or a cached method of a profile (``--method``) -> packed folder."""
    import torch

    from .export import export_method, export_run

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    try:  # the output folder is checked before any model is built (check_output_folder)
        if args.run:
            path = export_run(args.run, args.out, dtype=dtype, max_shard_size=args.max_shard_size,
                              overwrite=args.overwrite)
        else:
            path = export_method(args.method, args.setting, args.profile, args.out, dtype=dtype,
                                 max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except FileExistsError as e:
        raise CliError(f"--out {_one_line(e)}") from e
    print(path)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    """``eval``: perplexity (and zero-shot with ``--tasks``) of a packed folder."""
    from .export import evaluate_folder

    out = evaluate_folder(args.model, corpus=args.corpus, seqlen=args.seqlen, max_windows=args.max_windows,
                          tasks=args.tasks, limit=args.limit, device=args.device, spread=args.spread)
    if args.json:
        print(json.dumps(out, default=str))
    else:
        print(f"{args.model} on {args.corpus}/test @ seqlen {args.seqlen}: ppl = {out['ppl']:.4f} "
              f"({out['windows']} windows)")
        s = out.get("source")
        if s:
            what = (f"{s.get('method')} {s.get('setting', '')} seed {s.get('seed', '?')} of the "
                    f"{s.get('profile', '?')} profile" if "method" in s else f"the run {s.get('run')}")
            print(f"built from {what} by code {s.get('code_fingerprint')} (git {str(s.get('git_commit'))[:8]}) on "
                  f"{s.get('device')} {s.get('cpu_flags') or ''}".rstrip())
        for r in out.get("zero_shot", []):
            print(f"{r['task']:16s} {r['metric']:10s} {r['value']:.4f} ± {r['stderr']:.4f} (n={r['n_examples']})")
    return 0


def _shard_size(text: str) -> int:
    """argparse ``type`` of ``--max-shard-size``: :func:`rcp_lib.deploy.format._max_shard_bytes` (one parser for the CLI and
    ``save_quantized``), its ValueError as a usage error (one line, exit 2, before anything is built)."""
    from .deploy.format import _max_shard_bytes

    try:
        return _max_shard_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _add_checkpoint_commands(sub) -> None:
    """Parser entries of ``export`` and ``eval`` (packed Hugging Face folders, :mod:`rcp_lib.export`)."""
    from .profiles import PROFILES

    e = sub.add_parser("export", help="write a packed Hugging Face folder (from_pretrained / lm_eval) from a "
                                      "finished QAT run or a cached method of a profile",
                       epilog=_example("python -m rcp_lib export --method RCP --setting W2A4KV4 --profile cpu --out packed/",
                                       "python -m rcp_lib export --run runs/qat-smoke --out packed/"))
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a `python -m rcp_lib qat` output folder (summary.json + checkpoint/)")
    src.add_argument("--method", help="a named method (rcp_lib.experiments.methods), built from the cache of "
                                      "--profile (computed first if not cached)")
    e.add_argument("--setting", default="W2A4KV4", help="with --method (default W2A4KV4)")
    e.add_argument("--profile", default="cpu", choices=sorted(PROFILES), help="with --method")
    e.add_argument("--out", required=True, help="output folder: new or empty (a folder holding other files is "
                                                "refused and left as it is)")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it holds a packed model already")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16"],
                   help="storage of the LUTs and full-precision tensors; auto: as evaluated (the model's compute "
                        "dtype, float32 on the CPU: the folder's perplexity is the table row's); float16: smaller, "
                        "not bit-identical to the evaluated row")
    e.add_argument("--max-shard-size", default="2GB", type=_shard_size,
                   help="bytes per safetensors file, e.g. 2GB, 500MB")
    e.set_defaults(func=_cmd_export)

    v = sub.add_parser("eval", help="perplexity (and zero-shot with --tasks) of a packed folder",
                       epilog=_example("python -m rcp_lib eval --model packed/ --max-windows 8 --tasks wiki_lastword"))
    v.add_argument("--model", required=True, help="a folder written by export / save_quantized")
    v.add_argument("--corpus", default="wiki-excerpt", choices=["wiki-excerpt", "wikitext2"],
                   help="corpus of the perplexity (wikitext2 needs the network or the datasets cache)")
    v.add_argument("--seqlen", type=int, default=512, help="tokens per window")
    v.add_argument("--max-windows", type=int, default=32, help="score at most this many windows")
    v.add_argument("--first-windows", action="store_false", dest="spread",
                   help="score the first windows instead of windows evenly spread over the split (the tables' "
                        "windows: with the profile's --seqlen and --max-windows, eval gives the row's perplexity)")
    v.add_argument("--tasks", nargs="*", help="lm_eval tasks, e.g. wiki_lastword wiki_nextsent (offline)")
    v.add_argument("--limit", type=int, default=None, help="documents per task")
    v.add_argument("--device", default="cpu", help="torch device (cuda needs a CUDA build and a GPU)")
    v.add_argument("--json", action="store_true", help="print one JSON line")
    v.set_defaults(func=_cmd_eval)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option's help; the epilog (the example) printed as written."""


class _Parser(argparse.ArgumentParser):
    """Every (sub)parser: defaults and the example in ``--help``, and a usage error as one line (exit 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # argparse prints the usage block; one line is enough (--help shows the rest)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _example(*lines: str) -> str:
    return "example:\n" + "\n".join(f"  {line}" for line in lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m rcp_lib`` parser. Subcommands added with ``sub.add_parser`` inherit the help format
    (defaults and the ``epilog`` example) and the one-line usage errors."""
    from .profiles import PROFILES

    profiles = sorted(PROFILES)
    p = _Parser(prog="python -m rcp_lib", description=__doc__,
                epilog=_example("python -m rcp_lib reproduce --profile smoke"))
    p.add_argument("--debug", action="store_true", help="show the traceback of a known error (anywhere on the line)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    q = sub.add_parser("ppl", help="perplexity of a (full-precision) model on a corpus split",
                       description="Perplexity of a full-precision model: non-overlapping windows of a test split.",
                       epilog=_example("python -m rcp_lib ppl --seqlen 512 --max-windows 8"))
    q.add_argument("--model", default="smollm2-135m",
                   help="model name: the embedded alias, a Hugging Face id or a local transformers folder")
    q.add_argument("--corpus", default="wiki-excerpt", choices=["wiki-excerpt", "wikitext2"],
                   help="corpus (wikitext2 needs the network or the datasets cache)")
    q.add_argument("--split", default="test", choices=["train", "test"], help="corpus split")
    q.add_argument("--seqlen", type=int, default=2048, help="tokens per window")
    q.add_argument("--max-windows", type=int, default=None, help="score at most this many windows (None: all)")
    q.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    q.add_argument("--device", default="cpu", help="torch device (cuda needs a CUDA build and a GPU)")
    q.add_argument("--seed", type=int, default=0, help="torch seed")
    q.add_argument("--json", action="store_true", help="print one JSON line")
    q.set_defaults(func=_cmd_ppl)

    t = sub.add_parser("qat", help="rotate + quantize + QAT-train a model from a YAML/JSON run config",
                       description="Rotate, quantize and QAT-train the model of a run config (YAML or JSON).",
                       epilog=_example("python -m rcp_lib qat --config configs/smoke.yaml --steps 2"))
    t.add_argument("--config", required=True, help="run config file, e.g. configs/cpu.yaml")
    t.add_argument("--steps", type=int, default=None, help="override qat.steps (None: the config's)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=_cmd_qat)

    r = sub.add_parser("reproduce", help="execute the notebooks with papermill for a profile",
                       description="Execute the notebooks in order with papermill; executed copies (.ipynb and "
                                   ".html) go to runs/<profile>/, tables to results/<profile>/. With --set the "
                                   "folders are <profile>-<hash of the overrides>/, never the profile's own.",
                       epilog=_example("python -m rcp_lib reproduce --profile smoke --notebooks 02_perplexity.ipynb",
                                       "python -m rcp_lib reproduce --profile cpu --set qat_steps=80"))
    r.add_argument("--profile", default="cpu", choices=profiles, help="run profile (rcp_lib/profiles.py)")
    r.add_argument("--notebooks", nargs="*", help="only these notebooks (file names; default: all, in order)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help='override a profile field (JSON value), e.g. --set qat_steps=80 --set \'methods=["RCP"]\'')
    r.add_argument("--dry-run", action="store_true",
                   help="run the profile's notebooks on the CPU with a tiny random LLaMA and the wiki excerpt, budgets "
                        "scaled down, everything in a temporary folder (never results/)")
    r.add_argument("--no-html", action="store_true", help="skip the HTML copies of the executed notebooks")
    r.add_argument("--allow-dirty", action="store_true",
                   help="write results even with uncommitted changes to code or configs (sets RCP_ALLOW_DIRTY=1)")
    r.set_defaults(func=_cmd_reproduce)

    tb = sub.add_parser("table", help="compute (or read from the cache) a registered table of a profile and write "
                                      "its CSV (default: the PTQ perplexity rows)",
                        description="Compute (or read from the row cache) one registered table and write its CSV.",
                        epilog=_example("python -m rcp_lib table --profile cpu --families qat "
                                        "--name perplexity_qat_160 --set qat_steps=160"))
    tb.add_argument("--profile", default="cpu", choices=profiles, help="run profile (rcp_lib/profiles.py)")
    tb.add_argument("--table", choices=_computable_tables(),
                    help="a table of rcp_lib.experiments.registry (None: the one --name belongs to, else "
                         "perplexity_ptq)")
    tb.add_argument("--families", nargs="+", choices=["baseline", "ptq", "qat"],
                    help="method families of a perplexity table (None: the table's)")
    tb.add_argument("--name", help="results/<profile>/<name>.csv (None: the table's file; required for a family "
                                   "such as perplexity_qat_<steps>)")
    tb.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help='override a profile field (JSON value), e.g. --set qat_steps=160 --set \'methods=["RCP"]\'')
    tb.add_argument("--allow-dirty", action="store_true",
                    help="write the CSV even with uncommitted changes to code or configs (sets RCP_ALLOW_DIRTY=1)")
    tb.set_defaults(func=_cmd_table)

    rd = sub.add_parser("readme", help="rewrite the README claim table and results/cpu/SUMMARY.md from results/cpu/ (no computation)",
                        description="Rewrite README.md's claim table and results/cpu/SUMMARY.md (every table) from "
                                    "results/cpu/; other profiles only print their tables (--print).",
                        epilog=_example("python -m rcp_lib readme --profile cpu",
                                        "python -m rcp_lib readme --profile smoke --print"))
    rd.add_argument("--profile", default="cpu", choices=profiles, help="run profile whose results to show")
    rd.add_argument("--print", action="store_true", dest="print_only",
                    help="print every table (the SUMMARY.md text) instead of writing files")
    rd.set_defaults(func=_cmd_readme)

    tr = sub.add_parser("train-rows", help="train the QAT students of a profile's table rows into the cache "
                                           "(run it under accelerate launch for the paper profile)",
                        description="Train the QAT students of a profile's rows (all its QAT rows, or --method / "
                                    "--setting) into the cache that the notebooks and `table` read; students already "
                                    "trained are skipped. Under `accelerate launch` every process trains on its own "
                                    "GPU (DDP or FSDP from the launch config) and rank 0 writes.",
                        epilog=_example("accelerate launch --config_file configs/accelerate/8gpu-fsdp.yaml -m rcp_lib "
                                        "train-rows --profile paper --method RCP --setting W2A4KV4",
                                        "python -m rcp_lib train-rows --profile smoke"))
    tr.add_argument("--profile", default="cpu", choices=profiles, help="run profile (rcp_lib/profiles.py)")
    tr.add_argument("--method", help="a named QAT method (None: every QAT row of the profile)")
    tr.add_argument("--setting", help="only this setting, e.g. W2A4KV4 (None: the profile's settings)")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a profile field (JSON value), as for reproduce and table")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    tr.set_defaults(func=_cmd_train_rows)

    c = sub.add_parser("compare", help="compare every CSV cell of two results folders (or two CSV files)",
                       description="Compare every CSV cell present in both folders (same relative paths; rows by "
                                   "position): numbers within the tolerances, text exactly; provenance and timing "
                                   "columns skipped (rcp_lib/compare.py). One line per differing cell, then a summary; "
                                   "exit 0 when nothing differs, 1 otherwise.",
                       epilog=_example("python -m rcp_lib compare results/cpu other-checkout/results/cpu",
                                       "python -m rcp_lib compare results/cpu /tmp/rerun/cpu --rtol 1e-4"))
    c.add_argument("a", metavar="RESULTS_A", help="a results folder (e.g. results/cpu) or a CSV file")
    c.add_argument("b", metavar="RESULTS_B", help="the folder (or file) to compare it with")
    c.add_argument("--rtol", type=float, default=0.0, help="relative tolerance of numeric cells (0: bit-identical)")
    c.add_argument("--atol", type=float, default=0.0, help="absolute tolerance of numeric cells")
    c.set_defaults(func=_cmd_compare)

    _add_checkpoint_commands(sub)
    return p


@contextlib.contextmanager
def _one_line_warnings(cmd: str):
    """Inside: a warning prints as one line, ``python -m rcp_lib CMD: warning: MESSAGE``, not as the file, line and
    source of the library call that raised it; the warning machinery as it was is restored on exit."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"python -m rcp_lib {cmd}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    """Run one command; known errors (:func:`_known_errors`) print one line and return 2 (``--debug``: raise)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    t = time.time()
    try:
        with contextlib.nullcontext() if debug else _one_line_warnings(args.cmd):
            rc = args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"python -m rcp_lib {args.cmd}: interrupted; finished rows are cached", file=sys.stderr)
        return 130
    except _known_errors() as e:
        if debug:
            raise
        print(f"python -m rcp_lib {args.cmd}: error: {_one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        return 2
    print(f"[rcp_lib] {args.cmd} done in {time.time() - t:.1f} s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
