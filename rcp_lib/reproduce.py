"""Run the companion notebooks in order with papermill (``python -m rcp_lib reproduce --profile cpu``).

The notebooks are those of the table registry (:data:`rcp_lib.experiments.registry.NOTEBOOKS`). Executed copies
go to ``runs/<profile>/`` (ignored by git; the roots are in :mod:`rcp_lib.paths`); the notebooks in ``notebooks/``
stay clean.
The first failing notebook stops the run with the notebook and the cell named. Work already done for the
same config and the same code (see :func:`rcp_lib.io.code_fingerprint`) is reused through the row and model
caches of :mod:`rcp_lib.experiments`. A checkout with uncommitted changes to code or configs is refused before
any notebook runs, unless dirty runs are allowed (``allow_dirty=True``, ``--allow-dirty`` or
``RCP_ALLOW_DIRTY=1``; the notebook kernels inherit the environment variable).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .experiments.registry import NOTEBOOKS, result_path
from .paths import absolutize_env, notebooks_dir, runs_dir
from .profiles import PROFILES


class NotebookFailed(RuntimeError):
    pass


def run_notebook(path: Path, profile: str, out_dir: Path, kernel: str = "python3", timeout: int | None = None,
                 parameters: dict | None = None) -> Path:
    """Execute one notebook with papermill; raise :class:`NotebookFailed` naming the notebook and cell."""
    import papermill as pm

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    params = {"profile": profile, **(parameters or {})}
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


def reproduce(profile: str = "cpu", notebooks: list[str] | None = None, kernel: str = "python3",
              allow_dirty: bool = False) -> list[Path]:
    """Execute the notebooks (all, in order, or the named ones) for a profile; stop at the first failure.

    Raises :class:`rcp_lib.io.DirtyTreeError` up front when code or configs have uncommitted changes, unless
    ``allow_dirty`` (or ``RCP_ALLOW_DIRTY=1``); ``allow_dirty=True`` sets that variable for the notebook kernels.
    """
    from .io import ALLOW_DIRTY_ENV, code_fingerprint, git_commit, require_clean_tree

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    names = notebooks or list(NOTEBOOKS)
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise ValueError(f"unknown notebooks {unknown}; available: {NOTEBOOKS}")
    if allow_dirty:
        os.environ[ALLOW_DIRTY_ENV] = "1"
    absolutize_env()  # the kernels run in notebooks/: relative output roots must not move with them
    require_clean_tree()
    print(f"[reproduce:{profile}] git {git_commit()}, code fingerprint {code_fingerprint()}", file=sys.stderr,
          flush=True)
    from .paths import cache_dir

    rows_dir = cache_dir() / "rows"
    cached_at_start = len(list(rows_dir.glob("*.json"))) if rows_dir.exists() else 0
    done, seconds, start = [], {}, time.time()
    for name in names:
        t0 = time.time()
        print(f"[reproduce:{profile}] {name} ...", file=sys.stderr, flush=True)
        done.append(run_notebook(notebooks_dir() / name, profile, runs_dir(profile), kernel=kernel))
        seconds[name] = round(time.time() - t0, 1)
        print(f"[reproduce:{profile}] {name} done in {seconds[name]:.0f} s", file=sys.stderr, flush=True)
    if names == list(NOTEBOOKS):  # a full run: record how long it took (the README quotes it from this file)
        from .io import atomic_write_json, provenance

        atomic_write_json({"profile": profile, "total_seconds": round(time.time() - start, 1), "notebooks": seconds,
                           "cached_rows_at_start": cached_at_start, **provenance()},
                          result_path("reproduce_timing", profile))
    return done
