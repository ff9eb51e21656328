"""Atomic file writing and result provenance (so results are never half-written and always traceable).

Also: the cache keys (:func:`config_hash` of a config, :func:`code_fingerprint` of the code), the dirty-tree guard
that keeps results from uncommitted code out of the results root (:func:`require_clean_tree`), and deterministic
figure files (:func:`save_figure`). Where the results root is: :mod:`rcp_lib.paths`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import hashlib
import importlib.util
import io
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .paths import REPO_ROOT, is_under_results

ALLOW_DIRTY_ENV = "RCP_ALLOW_DIRTY"
# Outputs of a run (and the README block that `rcp_lib readme` regenerates): changes there do not make a tree
# "dirty"; only uncommitted changes to code or configs do.
OUTPUT_PATHS = ("results", "figures", "runs", "README.md")


def _atomic_write_bytes(data: bytes, path: str | os.PathLike) -> Path:
    path = Path(path)
    check_results_write(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` via a temporary file + rename (readers never see a partial file)."""
    return _atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", path)


def atomic_save_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write named tensors as one safetensors file via a temporary file + rename."""
    from safetensors.torch import save

    return _atomic_write_bytes(save(dict(tensors)), path)


def atomic_save_torch(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return _atomic_write_bytes(buf.getvalue(), path)


def atomic_write_csv(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write dict rows as CSV atomically; the header is the union of keys in first-seen order."""
    rows = list(rows)
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow({k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v) for k, v in r.items()})
    return atomic_write_text(buf.getvalue(), path)


def _is_output(rel: str) -> bool:
    return any(rel == o or rel.startswith(o + "/") for o in OUTPUT_PATHS)


def dirty_files(repo: str | os.PathLike | None = None) -> list[str]:
    """Tracked files with uncommitted changes to code or configs (repo-relative paths).

    Changes to a run's own outputs (``results/``, ``figures/``, ``runs/``, ``README.md``) and untracked files are
    ignored. Outside a git checkout (or without git) the list is empty.
    """
    repo = Path(repo) if repo else REPO_ROOT
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "-z"], cwd=repo,
                             capture_output=True, text=True, timeout=10)
    except Exception:
        return []
    if out.returncode != 0:
        return []
    files: list[str] = []
    entries = out.stdout.split("\0")
    i = 0
    while i < len(entries):
        e = entries[i]
        i += 1
        if len(e) < 4:
            continue
        status, rel = e[:2], e[3:]
        if "R" in status or "C" in status:  # rename/copy: the next entry is the source path
            src = entries[i] if i < len(entries) else ""
            i += 1
            for f in (rel, src):
                if f and not _is_output(f):
                    files.append(f)
            continue
        if not _is_output(rel):
            files.append(rel)
    return sorted(set(files))


def git_commit(repo: str | os.PathLike | None = None) -> str:
    """Commit hash of the checkout this library runs from, or 'unknown'.

    '+dirty' is appended when tracked code or configs have uncommitted changes (see :func:`dirty_files`); a
    run's own outputs under ``results/``, ``figures/``, ``runs/`` and untracked files do not count.
    """
    repo = Path(repo) if repo else REPO_ROOT
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "unknown"
    if not sha:
        return "unknown"
    return sha + ("+dirty" if dirty_files(repo) else "")


# ---------------------------------------------------------------------------------------------------
# dirty-tree guard for results/
# ---------------------------------------------------------------------------------------------------


class DirtyTreeError(RuntimeError):
    """Refusal to write results from a checkout with uncommitted changes to code or configs."""


def allow_dirty() -> bool:
    """True when ``$RCP_ALLOW_DIRTY`` is set to a true value (``--allow-dirty`` of the CLI sets it)."""
    return os.environ.get(ALLOW_DIRTY_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def require_clean_tree(repo: str | os.PathLike | None = None) -> None:
    """Raise :class:`DirtyTreeError` if code or configs have uncommitted changes, unless dirty runs are allowed."""
    if allow_dirty():
        return
    files = dirty_files(repo)
    if files:
        shown = ", ".join(files[:5]) + (f", ... (+{len(files) - 5} more)" if len(files) > 5 else "")
        raise DirtyTreeError(f"uncommitted changes to code or configs ({shown}); commit them, "
                             f"or pass --allow-dirty / set {ALLOW_DIRTY_ENV}=1")


def check_results_write(path: str | os.PathLike) -> None:
    """Apply :func:`require_clean_tree` when ``path`` lies under the results root (:func:`rcp_lib.paths.results_root`;
    called by every atomic write)."""
    if is_under_results(path):
        require_clean_tree()


# ---------------------------------------------------------------------------------------------------
# cache keys: config hash and code fingerprint
# ---------------------------------------------------------------------------------------------------


def config_hash(*parts: Mapping[str, Any]) -> str:
    """Stable 16-hex-digit hash of JSON-serialisable config dicts (keys sorted; non-JSON values by ``str``): the
    name of every cached model, row and run."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def source_roots() -> dict[str, Path]:
    """The source trees the fingerprint covers: the installed ``rcp_lib`` and ``rcp_lib.kernels`` packages and
    the repository's ``configs/`` (when present), as ``{prefix: directory}``."""
    roots = {"rcp_lib": Path(__file__).resolve().parent}
    spec = importlib.util.find_spec("rcp_lib.kernels")  # imports rcp_lib only, not the kernels package
    if spec is not None and spec.submodule_search_locations:
        roots["kernels"] = Path(list(spec.submodule_search_locations)[0]).resolve()
    if (REPO_ROOT / "configs").is_dir():
        roots["configs"] = REPO_ROOT / "configs"
    return roots


#: files the fingerprint leaves out, because no cached object depends on their code:
#: * the named profiles are settings, not code: every profile field that changes a number is in the cache key of what
#:   it changes (a row's key holds the whole profile but its table selections, a student's key its recipe and budget;
#:   ``--set`` overrides are keyed the same way), so editing which rows a profile lists, or its budgets, recomputes only
#:   what they change instead of every cache;
#: * the README formatter and the progress bars only format what was computed, ``compare`` only reads results, and the
#:   tests of :mod:`rcp_lib.stats` only order rows already computed;
#: * ``configs/claims.yaml`` holds the README's claim sentences, which :mod:`rcp_lib.report` fills from rows already
#:   computed (rewording a claim must not recompute every table).
FINGERPRINT_EXCLUDE = frozenset({"rcp_lib/profiles.py", "rcp_lib/report.py", "rcp_lib/progress.py",
                                 "rcp_lib/compare.py", "rcp_lib/stats.py", "configs/claims.yaml"})


def fingerprint_tree(roots: Mapping[str, str | os.PathLike]) -> str:
    """12-hex-digit hash of the files under ``roots`` (``{prefix: directory}``): ``*.py`` under the
    ``rcp_lib`` and ``kernels`` prefixes, every file under any other prefix (configs), as sorted
    ``prefix/relative/path`` names plus bytes. Byte caches (``__pycache__``, ``*.pyc``) and
    :data:`FINGERPRINT_EXCLUDE` are skipped."""
    h = hashlib.sha256()
    items: list[tuple[str, Path]] = []
    for prefix, root in roots.items():
        root = Path(root)
        if not root.is_dir():
            continue
        for f in root.rglob("*"):
            if not f.is_file() or "__pycache__" in f.parts or f.suffix == ".pyc":
                continue
            if prefix in ("rcp_lib", "kernels") and f.suffix != ".py":
                continue
            rel = f"{prefix}/{f.relative_to(root).as_posix()}"
            if rel not in FINGERPRINT_EXCLUDE:
                items.append((rel, f))
    for rel, f in sorted(items):
        data = f.read_bytes()
        h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """Hash of the code and configs this process runs (:func:`fingerprint_tree` of :func:`source_roots`),
    computed once per process. Every row/model cache key includes it, so a code change invalidates caches."""
    return fingerprint_tree(source_roots())


#: the vector extensions that decide which float kernels oneDNN / MKL / ATen run (x86 and Arm names as in
#: ``/proc/cpuinfo``): two machines that differ here may round differently (see :func:`cpu_info`)
VECTOR_FLAGS = ("avx", "avx2", "fma", "avx_vnni", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16",
                "asimd", "asimdhp", "sve", "sve2", "i8mm", "bf16")


def parse_cpuinfo(text: str) -> tuple[str, str]:
    """``(model name, the VECTOR_FLAGS present, space-separated in that order)`` of a ``/proc/cpuinfo`` text (the
    first processor's; x86 "flags" or Arm "Features"); ``("", "")`` for an empty text."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and not model:
            model = val.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(val.split())
    return model, " ".join(f for f in VECTOR_FLAGS if f in flags)


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """What decides the float rounding of a CPU run, beyond the library versions: ``cpu_model`` (``/proc/cpuinfo``'s
    "model name", else :func:`platform.processor`), ``cpu_flags`` (the :data:`VECTOR_FLAGS` present, space-separated),
    ``torch_cpu_capability`` (the ATen kernel level torch dispatches to, e.g. AVX2 / AVX512), ``blas`` (the BLAS and
    oneDNN builds of torch, from ``torch.__config__.show()``). Float results are bit-identical only between runs that
    agree on these (and on ``torch_threads``); another CPU type rounds differently (docs/reproducing.md, "Reproducibility
    across machines")."""
    import re

    import torch

    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    model, flags = parse_cpuinfo(text)
    show = torch.__config__.show()
    blas = []
    for pat, fmt in ((r"BLAS_INFO=(\w+)", "BLAS {}"), (r"Math Kernel Library Version ([\d.]*\d)", "MKL {}"),
                     (r"OpenBLAS\s*v?(\S+)", "OpenBLAS {}"), (r"(?:MKL-DNN|oneDNN) v(\S+)", "oneDNN {}")):
        m = re.search(pat, show)
        if m:
            blas.append(fmt.format(m.group(1).rstrip(",")))
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        capability = ""
    return {"cpu_model": model or platform.processor() or "unknown",
            "cpu_flags": flags,
            "torch_cpu_capability": capability,
            "blas": ", ".join(blas) or "unknown"}


def platform_key(device: str = "cpu") -> str:
    """What a float result computed on ``device`` depends on besides the code, as one cache-key string: on the CPU,
    torch's kernel level and the :data:`VECTOR_FLAGS` (e.g. ``"cpu AVX512 avx avx2 fma avx512f ..."``); on CUDA, the
    GPU's name (``"cuda NVIDIA H100 80GB HBM3"``), not the host's CPU, so that students trained by ``train-rows`` on
    other nodes are found. Every cache key carries it (:func:`rcp_lib.experiments.rows.code_key`), so a cache copied to,
    or a disk kept on, a machine that rounds differently recomputes instead of mixing CPU types in one table (the CPU
    type acts like a seed: docs/reproducing.md). The thread count is recorded with every row but not keyed: processes
    of one ``torchrun`` launch and the notebooks that read their students may differ in it."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return "cuda " + (torch.cuda.get_device_name(torch.device(device)) if torch.cuda.is_available() else "?")
    if kind != "cpu":
        return kind
    info = cpu_info()
    return " ".join(p for p in ("cpu", info["torch_cpu_capability"] or "?", info["cpu_flags"]) if p)


#: the keys of :func:`provenance`: the columns that say where and when a row was computed, not what it measured
#: (``python -m rcp_lib compare`` skips them)
PROVENANCE_KEYS = ("rcp_lib", "torch", "transformers", "python", "machine", "device", "cpu_model", "cpu_flags",
                   "torch_cpu_capability", "torch_threads", "blas", "git_commit", "code_fingerprint", "allow_dirty",
                   "date_utc")


def provenance() -> dict[str, Any]:
    """Versions, machine (CPU model, vector extensions, torch's kernel level and thread count, BLAS: see
    :func:`cpu_info`), git commit, code fingerprint and UTC date, to be stored with every result row (the keys are
    :data:`PROVENANCE_KEYS`).

    ``allow_dirty`` is true when the commit is dirty and dirty runs were allowed (``--allow-dirty``).
    """
    import torch
    import transformers

    from . import __version__

    commit = git_commit()
    out = {
        "rcp_lib": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu x{os.cpu_count()}",
        **cpu_info(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": commit,
        "code_fingerprint": code_fingerprint(),
        "allow_dirty": commit.endswith("+dirty") and allow_dirty(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return {k: out[k] for k in PROVENANCE_KEYS}


# ---------------------------------------------------------------------------------------------------
# deterministic figures
# ---------------------------------------------------------------------------------------------------

# Metadata that would make two saves of the same figure differ (dates) or tie it to a library version.
_FIG_METADATA: dict[str, dict[str, Any]] = {
    "pdf": {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None},
    "png": {"Software": None},
    "svg": {"Date": None, "Creator": None},
}


def save_figure(fig: Any, directory: str | os.PathLike, stem: str, exts: Sequence[str] = ("png", "pdf"),
                dpi: int = 150, **kwargs: Any) -> list[Path]:
    """Save a matplotlib figure as ``directory/stem.<ext>`` for each ext, byte-reproducibly and atomically.

    Dates and software versions are left out of the file metadata (PDF ``CreationDate``/``Producer``, PNG
    ``Software``, SVG ``Date``), so the same figure saved twice gives identical bytes. Extra keyword arguments
    go to ``fig.savefig``. Returns the written paths.
    """
    user_meta = kwargs.pop("metadata", None) or {}
    paths = []
    for ext in exts:
        buf = io.BytesIO()
        meta = {**_FIG_METADATA.get(ext, {}), **user_meta}
        import matplotlib

        with matplotlib.rc_context({"svg.hashsalt": "rcp_lib"} if ext == "svg" else {}):  # SVG ids are random without it
            fig.savefig(buf, format=ext, dpi=dpi, **({"metadata": meta} if meta else {}), **kwargs)
        paths.append(_atomic_write_bytes(buf.getvalue(), Path(directory) / f"{stem}.{ext}"))
    return paths
