"""Run the companion notebooks in order with papermill (``python -m rcp_lib reproduce --profile cpu``).

The notebooks are those of the table registry (:data:`rcp_lib.experiments.registry.NOTEBOOKS`). Executed copies
go to ``runs/<profile>/`` (ignored by git; the roots are in :mod:`rcp_lib.paths`), each with an HTML copy
(``<name>.html``, nbconvert's HTML exporter) for reading without Jupyter; the notebooks in ``notebooks/`` stay
clean. A run with overrides (``--set qat_steps=80``, papermill's ``-p overrides '{"qat_steps": 80}'``) writes to
``<profile>-<hash of the overrides>/`` folders instead (:attr:`rcp_lib.profiles.Profile.run_name`).

Progress: the notebook kernels write their progress bars, cache log lines and warnings to
``runs/<profile>/reproduce.log`` (``$RCP_PROGRESS_LOG``, see :mod:`rcp_lib.progress`), never into the executed
notebooks; this process copies that log to its stderr as it grows, and prints one line per notebook with an
estimate of the time left (from the last full run's ``reproduce_timing.json``, when there is one).

The first failing notebook stops the run with the notebook and the cell named. Work already done for the
same config and the same code (see :func:`rcp_lib.io.code_fingerprint`) is reused through the row and model
caches of :mod:`rcp_lib.experiments`. A checkout with uncommitted changes to code or configs is refused before
any notebook runs, unless dirty runs are allowed (``allow_dirty=True``, ``--allow-dirty`` or
``RCP_ALLOW_DIRTY=1``; the notebook kernels inherit the environment variable).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from .experiments.registry import NOTEBOOKS, profile_notebooks, result_path
from .paths import absolutize_env, notebooks_dir, runs_dir
from .profiles import PROFILES, get_profile
from .progress import PROGRESS_LOG_ENV


class NotebookFailed(RuntimeError):
    pass


def run_notebook(path: Path, profile: str, out_dir: Path, kernel: str = "python3", timeout: int | None = None,
                 parameters: dict | None = None) -> Path:
    """Execute one notebook with papermill; raise :class:`NotebookFailed` naming the notebook and cell."""
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    params = {"profile": profile, **(parameters or {})}  # dicts are injected as Python literals
    try:
        pm.execute_notebook(str(path), str(out), parameters=params, kernel_name=kernel, cwd=str(path.parent),
                            progress_bar=False, log_output=False, execution_timeout=timeout)
    except pm.PapermillExecutionError as e:
        raise NotebookFailed(
            f"{path.name} failed in cell {e.cell_index} (execution count {e.exec_count}): {e.ename}: {e.evalue}\n"
            f"executed copy with the traceback: {out}") from e
    except Exception as e:  # dead kernel, timeout, missing kernel spec ...
        raise NotebookFailed(f"{path.name} did not finish: {type(e).__name__}: {e}\npartial copy: {out}") from e
    return out


def write_html(notebook: Path) -> Path:
    """An HTML copy of an executed notebook next to it (``<name>.html``, nbconvert's HTML exporter)."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_filename(str(notebook))
    out = notebook.with_suffix(".html")
    out.write_text(body, encoding="utf-8")
    return out


class _LogTail:
    """Copies the lines appended to the batch log to this process's stderr (indented) while a notebook runs, and
    counts the row-cache hits and misses among them."""

    def __init__(self, path: Path, prefix: str = "    "):
        self.path, self.prefix, self.hits, self.misses = path, prefix, 0, 0
        self._pos = path.stat().st_size if path.exists() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _drain(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8", errors="replace") as f:
            f.seek(self._pos)
            chunk = f.read()
        if not chunk:
            return
        complete, _, _ = chunk.rpartition("\n")
        if not complete:
            return
        self._pos += len((complete + "\n").encode("utf-8"))
        for line in complete.split("\n"):
            self.hits += line.startswith("[rcp_lib cache] hit")
            self.misses += line.startswith("[rcp_lib cache] miss")
            print(self.prefix + line, file=sys.stderr, flush=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._drain()

    def __enter__(self) -> "_LogTail":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._drain()


def _run_kind(hits: int, misses: int) -> str:
    """How a notebook run used the row cache: ``cold`` (computed every row), ``cached`` (read every row),
    ``mixed``, or ``none`` (the notebook has no row cache)."""
    if hits and misses:
        return "mixed"
    return "cold" if misses else "cached" if hits else "none"


def _fmt_s(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def reproduce(profile: str = "cpu", notebooks: list[str] | None = None, kernel: str = "python3",
              allow_dirty: bool = False, overrides: dict | None = None, html: bool = True) -> list[Path]:
    """Execute the notebooks (all, in order, or the named ones) for a profile; stop at the first failure.

    ``overrides`` (profile fields) are passed to every notebook as its ``overrides`` parameter; outputs then go to
    the ``<profile>-<hash>`` folders. ``html`` writes an HTML copy of each executed notebook. A full run records
    its wall time per notebook, with how each notebook used the row cache, in ``reproduce_timing.json``
    (``measured``: the last ``cold`` / ``cached`` / ``mixed`` / ``none`` time of each notebook, kept across runs); a
    run of named notebooks adds their times to ``measured`` of that file when it exists.

    Raises :class:`rcp_lib.io.DirtyTreeError` up front when code or configs have uncommitted changes, unless
    ``allow_dirty`` (or ``RCP_ALLOW_DIRTY=1``); ``allow_dirty=True`` sets that variable for the notebook kernels.
    """
    from .io import ALLOW_DIRTY_ENV, code_fingerprint, git_commit, require_clean_tree

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    P = get_profile(profile, **(overrides or {}))
    full = profile_notebooks(P)
    names = notebooks or full
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise ValueError(f"unknown notebooks {unknown}; available: {NOTEBOOKS}")
    if allow_dirty:
        os.environ[ALLOW_DIRTY_ENV] = "1"
    absolutize_env()  # the kernels run in notebooks/: relative output roots must not move with them
    # the kernels' Hugging Face look-ups are offline unless the caller says otherwise (set to 0 for the network); set
    # here, before the kernels start, because importing rcp_lib imports transformers, which reads them once
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    require_clean_tree()
    tag = f"[reproduce:{P.run_name}]"
    print(f"{tag} git {git_commit()}, code fingerprint {code_fingerprint()}", file=sys.stderr, flush=True)
    from .paths import cache_dir

    timing_path = result_path("reproduce_timing", P)
    last = json.loads(timing_path.read_text()) if timing_path.exists() else {}
    # a notebook's time in the last full run, else its last measured one (named runs, e.g. 06 / 07, are only there),
    # a cold measurement preferred
    measured_s = {n: m.get("seconds") for kind in ("none", "cached", "mixed", "cold")
                  for n, m in last.get("measured", {}).get(kind, {}).items()}
    last_s = {**measured_s, **last.get("notebooks", {})}
    rows_dir = cache_dir() / "rows"
    cached_at_start = len(list(rows_dir.glob("*.json"))) if rows_dir.exists() else 0
    out_dir = runs_dir(P)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "reproduce.log"
    log_path.write_text("")
    print(f"{tag} progress of the notebook kernels: {log_path} (copied below)", file=sys.stderr, flush=True)
    params = {"overrides": P.overrides} if P.overrides else {}
    previous_log = os.environ.get(PROGRESS_LOG_ENV)
    os.environ[PROGRESS_LOG_ENV] = str(log_path)
    done, seconds, rows, start = [], {}, {}, time.time()
    try:
        for i, name in enumerate(names):
            left = [last_s.get(n) for n in names[i:]]
            eta = (f"about {_fmt_s(sum(left))} left (measured times)" if all(x is not None for x in left)
                   else "time left not measured")
            print(f"{tag} ({i + 1}/{len(names)}) {name} ... {eta}", file=sys.stderr, flush=True)
            t0 = time.time()
            with _LogTail(log_path) as tail:
                out = run_notebook(notebooks_dir() / name, profile, out_dir, kernel=kernel, parameters=params)
            seconds[name] = round(time.time() - t0, 1)
            rows[name] = {"hits": tail.hits, "computed": tail.misses, "kind": _run_kind(tail.hits, tail.misses)}
            if html:
                write_html(out)
            done.append(out)
            print(f"{tag} ({i + 1}/{len(names)}) {name} done in {_fmt_s(seconds[name])} "
                  f"(rows: {tail.hits} from the cache, {tail.misses} computed); "
                  f"{_fmt_s(time.time() - start)} so far", file=sys.stderr, flush=True)
    finally:
        if previous_log is None:
            os.environ.pop(PROGRESS_LOG_ENV, None)
        else:
            os.environ[PROGRESS_LOG_ENV] = previous_log
    from .io import atomic_write_json, provenance

    commit = git_commit()
    measured = {k: dict(v) for k, v in last.get("measured", {}).items()}
    for name, r in rows.items():
        measured.setdefault(r["kind"], {})[name] = {"seconds": seconds[name], "git_commit": commit}
    if names != full and last:  # named notebooks: their times join the last full run's file (what setup() quotes)
        atomic_write_json({**last, "measured": measured}, timing_path)
    if names == full:  # a full run of the profile: record how long it took (the README quotes it from this file)
        atomic_write_json({"profile": P.name, "run_name": P.run_name, "overrides": P.overrides,
                           "total_seconds": round(time.time() - start, 1), "notebooks": seconds,
                           "rows": rows, "measured": measured, "cached_rows_at_start": cached_at_start,
                           **provenance()}, timing_path)
    return done


# ---------------------------------------------------------------------------------------------------------------------
# dry-run of a GPU profile on the CPU
# ---------------------------------------------------------------------------------------------------------------------

#: the stand-in of LLaMA-2-7B: LLaMA architecture, hidden 256 and intermediate 512 (multiples of the paper's group 128),
#: head_dim 64 with GQA, the embedded model's tokenizer (vocabulary 49152)
DRY_RUN_MODEL = dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, max_position_embeddings=2048)
#: budgets scaled down for the CPU; every other field (recipe, group 128, bf16 base, QAT recipe file) is the profile's
DRY_RUN_BUDGETS = dict(
    corpus="wiki-excerpt", device="cpu", dtype="bfloat16", seqlen=128, eval_windows=2, calib_windows=4,
    calib_seqlen=128, qat_steps=2, qat_seqlen=64, qat_grad_accum=2, qat_val_every=2, analysis_layers=[0],
    analysis_rotations=["none", "random_hadamard", "gsr:128", "block_hadamard:128"],
    zero_shot_tasks=["wiki_lastword", "wiki_nextsent"], zero_shot_limit=8, settings=["W2A4KV4"],
    methods=["FP", "RTN", "QuaRot-GPTQ", "GSR-GPTQ", "RCP", "RCP w/o Rotate"], full_eval_methods=[])


def make_dry_run_model(folder: Path, seed: int = 0) -> Path:
    """Save a tiny random LLaMA (:data:`DRY_RUN_MODEL`) with the embedded model's tokenizer into ``folder``, marked
    with :data:`rcp_lib.paths.RANDOM_WEIGHTS_MARKER` (its outputs are refused in the checkout's results/)."""
    import json

    from .models import _load_embedded_float32, tiny_llama
    from .paths import RANDOM_WEIGHTS_MARKER

    _, tok = _load_embedded_float32()
    model = tiny_llama(vocab=len(tok), seed=seed, **DRY_RUN_MODEL)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / RANDOM_WEIGHTS_MARKER).write_text(json.dumps(
        {"note": "random weights: a stand-in for a dry-run, never for results", "seed": seed, **DRY_RUN_MODEL}))
    return folder


def dry_run(profile: str = "paper", notebooks: list[str] | None = None, kernel: str = "python3",
            workdir: str | os.PathLike | None = None) -> Path:
    """Run the notebooks of ``profile`` on the CPU with :func:`make_dry_run_model` and the wiki excerpt standing in for
    the profile's model and corpus, budgets scaled down (:data:`DRY_RUN_BUDGETS`), every other field unchanged.

    Everything goes into ``workdir`` (default: a new temporary folder): results, figures, executed notebooks and the
    caches (``$RCP_RESULTS_DIR``, ``$RCP_FIGURES_DIR``, ``$RCP_RUNS_DIR``, ``$RCP_CACHE`` are set for the run and
    restored after it); nothing is written into the checkout. Uncommitted changes are allowed (nothing is a result).

    Returns:
        ``workdir``; its ``results/<profile>-<hash of the overrides>/`` holds the tables the notebooks wrote (the
        scaled budgets are overrides, :attr:`rcp_lib.profiles.Profile.run_name`).
    Raises:
        NotebookFailed: the first notebook that fails, naming the cell.
    """
    import json
    import tempfile

    from .io import ALLOW_DIRTY_ENV
    from .paths import REPO_ROOT

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix=f"rcp-dry-run-{profile}-"))
    work = work.resolve()
    try:
        work.relative_to(REPO_ROOT.resolve())
        raise ValueError(f"the dry-run folder {work} is inside the checkout; use a folder outside it")
    except ValueError as e:
        if "inside the checkout" in str(e):
            raise
    model_dir = make_dry_run_model(work / "model")
    env = {"RCP_RESULTS_DIR": work / "results", "RCP_FIGURES_DIR": work / "figures", "RCP_RUNS_DIR": work / "runs",
           "RCP_CACHE": work / "cache", ALLOW_DIRTY_ENV: "1", "CUDA_VISIBLE_DEVICES": ""}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    overrides = {**DRY_RUN_BUDGETS, "model": str(model_dir)}
    names = notebooks or profile_notebooks(PROFILES[profile])
    try:
        print(f"[dry-run:{profile}] {work}: tiny random LLaMA {DRY_RUN_MODEL}, overrides {json.dumps(overrides)}",
              file=sys.stderr, flush=True)
        for name in names:
            t0 = time.time()
            run_notebook(notebooks_dir() / name, profile, work / "runs" / profile, kernel=kernel,
                         parameters={"overrides": overrides})
            print(f"[dry-run:{profile}] {name} done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return work
