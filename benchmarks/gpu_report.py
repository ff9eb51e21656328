"""One GPU visit, at most about 8 minutes, the most information: ``make gpu-report`` (``python benchmarks/gpu_report.py
[--out DIR] [--budget 480] [--sections ...] [--list]``).

Prepared for the short, rare loan of one NVIDIA H100 / H200 with no network, run from the root of a copy of the
working tree (no ``.git``: results are identified by a content hash of the sources,
:func:`bench_kernel.tree_provenance`). Sections run in order of value (:data:`SECTIONS`), each in its own process
under its own time limit; a section that fails or runs out of time is recorded and the next one starts; a section
starts only while at least its ``min_s`` of the total budget (:data:`BUDGET_S`) is left (:func:`decide`), and never
gets more time than is left, so the report ends within the budget plus a few seconds. Each section writes its JSON /
CSV into the output folder as soon as it has it:

====== ===================================================================================== ====================
warmup parallel Triton compile warm-up into Triton's disk cache (``gpu_sections.py warm``,    warmup.json,
       several workers, in the background while ``export`` runs: export times nothing), and     kernel_sass.csv
       the static sm_90 counts of ``kernel_sass.py`` with the device's Triton (the counts
       ``kernel_bound.py --sass`` sets beside this run's times)
export whole-model fused-vs-reference localisation: ``gpu_check.py --sections export          check_export.json
       --no-tune`` (teacher-forced per-linear error, first code flip, kernel_code_mismatches)
kernel kernel correctness vs float64 and a fixed-configuration table at batch 1 / 4 / 16:      check_kernel.json
       ``gpu_check.py --sections kernel``
bench  autotuned batch-1 table (select, bit-serial in one and in two launches, generic op,     kernel_speed.csv,
       cuBLAS fp16) and a LLaMA-2-7B-shaped decode stack, one CUDA graph per token            tuned.json
       (``gpu_sections.py bench``; 8 layers, 4 when time is short)
peers  gemlite A16W2 / A16W4 at group 128 (from ``.gpu-wheels/``), torch's tinygemm int4,      peers.json
       the project's paths, cuBLAS fp16 (``gpu_sections.py peers``)
ncu    Nsight Compute on one launch per path at 4096 x 11008, when ``ncu`` exists              ncu.csv
qat    the QAT section, shortened: ``gpu_check.py --sections qat --qat-steps 2``               check_qat.json
====== ===================================================================================== ====================

Also written: ``log.txt`` (everything printed, with elapsed seconds), ``env.json`` (GPU, clocks, versions, the tree,
the gemlite wheel) and ``sections.json`` (per section: status, seconds, files; rewritten after each). The output
folder is ``--out``, else ``$OUT``, else ``results/gpu/report-<UTC timestamp>/``. gemlite: if it is not importable,
the wheel in ``.gpu-wheels/`` (``make gpu-wheels`` on a machine with network) is installed with ``pip install
--no-index --no-deps --target`` into a temporary folder; without a wheel, ``peers`` records ``skipped: wheel missing``.

Without CUDA it prints one line and exits with status 2, writing nothing. Speed is only ever measured here, on a GPU.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import glob
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

#: the total budget in seconds (the visit is 15 minutes of device time, machine start included)
BUDGET_S = 480
WHEELS_DIR = REPO / ".gpu-wheels"
#: grace between SIGTERM and SIGKILL of a section that ran past its limit
KILL_GRACE_S = 5


@dataclass(frozen=True)
class Section:
    """One step of the report: ``limit_s`` its own time limit; it starts only while at least ``min_s`` of the budget
    is left; ``beside``: the sections that may run while this one runs in the background (none times anything); any
    other section waits for it (at most until its time limit)."""

    name: str
    limit_s: int
    min_s: int
    outputs: tuple[str, ...]
    what: str
    beside: tuple[str, ...] = ()

    @property
    def background(self) -> bool:
        return bool(self.beside)


#: in order of value; the later ones are the first to be skipped
SECTIONS: tuple[Section, ...] = (
    Section("warmup", 150, 120, ("warmup.json", "kernel_sass.csv"),
            "parallel Triton compile warm-up into Triton's cache, and the static sm_90 counts with the device's Triton "
            "(kernel_sass.py; in the background, beside export)",
            beside=("export",)),
    Section("export", 170, 60, ("check_export.json",),
            "whole-model fused-vs-reference localisation (gpu_check.py --sections export --no-tune)"),
    Section("kernel", 120, 60, ("check_kernel.json",),
            "kernel correctness vs float64 + fixed-config table at batch 1/4/16 (gpu_check.py --sections kernel)"),
    Section("bench", 180, 100, ("kernel_speed.csv", "tuned.json"),
            "autotuned batch-1 table (select, bit-serial one / two launches, generic op, cuBLAS fp16) + decode "
            "stack under a CUDA graph per token"),
    Section("peers", 150, 80, ("peers.json",),
            "peers at batch 1: gemlite A16W2 / A16W4 g128, tinygemm int4, the project's paths, cuBLAS fp16"),
    Section("ncu", 90, 45, ("ncu.csv",), "Nsight Compute, one launch per path at 4096x11008 (if ncu exists)"),
    Section("qat", 110, 80, ("check_qat.json",), "QAT section, shortened (gpu_check.py --sections qat --qat-steps 2)"),
)
SECTION_NAMES = tuple(s.name for s in SECTIONS)


# ----------------------------------------------------------------------------------------------- the budget (pure)
def decide(section: Section, elapsed_s: float, budget_s: float = BUDGET_S) -> tuple[bool, float, str]:
    """Whether ``section`` starts after ``elapsed_s`` of ``budget_s`` seconds, and with which time limit:
    ``(run, limit_s, reason)``. It runs while at least its ``min_s`` is left, for ``min(limit_s, time left)``."""
    left = budget_s - elapsed_s
    if left < section.min_s:
        return False, 0.0, f"skipped: needs {section.min_s} s, {max(left, 0):.0f} s of the {budget_s:.0f} s budget left"
    return True, float(min(section.limit_s, left)), ""


def plan(sections: tuple[Section, ...] = SECTIONS, budget_s: float = BUDGET_S,
         durations: dict[str, float] | None = None) -> list[tuple[str, bool, float, str]]:
    """What would run if each section took ``durations[name]`` seconds (default: its whole time limit, the worst
    case): ``[(name, runs, limit_s, reason)]`` in order. A background section overlaps the sections it may run
    beside (together they take the longer); any other section starts after it."""
    durations = durations or {}
    elapsed, out = 0.0, []
    bg: tuple[Section, float] | None = None  # the background section and when it ends
    for s in sections:
        if bg is not None and s.name not in bg[0].beside:
            elapsed, bg = max(elapsed, bg[1]), None
        run, limit, reason = decide(s, elapsed, budget_s)
        out.append((s.name, run, limit, reason))
        took = min(durations.get(s.name, limit), limit) if run else 0.0
        if s.background:
            bg = (s, elapsed + took) if run else None
        else:
            elapsed += took
    return out


def bench_layers(left_s: float) -> int:
    """Decode-stack depth of the ``bench`` section: 8 layers, 4 when less than 240 s of the budget is left."""
    return 8 if left_s >= 240 else 4


def peers_rotating(left_s: float) -> bool:
    """The peers' steady-decode timer (the costly one) only while at least 200 s of the budget is left."""
    return left_s >= 200


def warm_workers(cpus: int | None) -> int:
    """Compile workers: the CPUs less three (one for the export section beside them, one for ``kernel_sass.py``),
    between 1 and 12."""
    return max(1, min(12, (cpus or 1) - 3))


def default_out(now: _dt.datetime | None = None) -> Path:
    """``results/gpu/report-<UTC timestamp>/`` of this checkout."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return REPO / "results" / "gpu" / f"report-{now.strftime('%Y%m%dT%H%M%SZ')}"


# ----------------------------------------------------------------------------------------------- running
class Log:
    """Everything printed goes to stdout and to ``log.txt``, with the seconds elapsed since the start."""

    def __init__(self, path: Path, t0: float):
        self.f = open(path, "a", buffering=1, encoding="utf-8")
        self.t0 = t0
        self.lock = threading.Lock()

    def __call__(self, msg: str) -> None:
        line = f"[+{time.time() - self.t0:5.0f}s] {msg}"
        with self.lock:
            print(line, flush=True)
            self.f.write(line + "\n")

    def elapsed(self) -> float:
        return time.time() - self.t0


class Job:
    """A child process in its own process group, its output streamed into the log with a tag."""

    live: list["Job"] = []  # started and not yet waited for: stopped when the report itself is interrupted

    def __init__(self, tag: str, cmd: list[str], env: dict, log: Log):
        self.tag, self.log = tag, log
        log(f"[{tag}] $ {' '.join(cmd)}")
        self.p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  bufsize=1, errors="replace", start_new_session=True)
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()
        Job.live.append(self)

    def _pump(self) -> None:
        for line in self.p.stdout:
            self.log(f"[{self.tag}] {line.rstrip()}")

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.p.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.p.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def wait(self, deadline: float) -> int | None:
        """Exit status, or None when it ran past ``deadline`` (then stopped)."""
        try:
            rc = self.p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            self.stop()
            rc = None
        self.reader.join(timeout=5)
        if self in Job.live:
            Job.live.remove(self)
        return rc


def _write_json(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def _find_ncu() -> str | None:
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu", "/usr/local/cuda-*/bin/ncu"):
        hits = sorted(glob.glob(pattern))
        if hits:
            return hits[-1]
    return None


def _gemlite(env: dict, log: Log) -> str:
    """Make gemlite importable for the peers: already there, or installed from ``.gpu-wheels/`` into a temporary
    folder put on ``env['PYTHONPATH']``. Returns the status recorded in the report."""
    if importlib.util.find_spec("gemlite") is not None:
        return f"installed ({importlib.metadata.version('gemlite')})"
    wheels = sorted(WHEELS_DIR.glob("gemlite-*.whl"))
    if not wheels:
        return "skipped: wheel missing"
    target = Path(tempfile.mkdtemp(prefix="rcp-gpu-report-site-"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target",
           str(target), str(wheels[-1])]
    log(f"gemlite: $ {' '.join(cmd)}")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return f"skipped: pip install of {wheels[-1].name} took more than 120 s"
    if r.returncode != 0:
        return f"skipped: pip install of {wheels[-1].name} failed: {(r.stderr or r.stdout).strip()[-300:]}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(target)) if p)
    return f"from {wheels[-1].name}"


def _environment(out: Path, log: Log, env: dict) -> dict:
    import torch

    info: dict = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name(0), "cpus": os.cpu_count(),
                  "sms": torch.cuda.get_device_properties(0).multi_processor_count,
                  "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)}
    for pkg in ("triton", "transformers", "gemlite"):
        try:
            info[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            info[pkg] = None
    try:
        import bench_kernel

        info.update(bench_kernel.tree_provenance(REPO))
    except Exception as e:
        info["tree_error"] = f"{type(e).__name__}: {e}"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
                              "power.draw,power.limit,temperature.gpu", "--format=csv"],
                             capture_output=True, text=True, timeout=15)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except Exception as e:
        info["nvidia_smi"] = f"{type(e).__name__}: {e}"
    info["ncu"] = _find_ncu()
    info["triton_cache_dir"] = env["TRITON_CACHE_DIR"]
    info["wheels"] = sorted(p.name for p in WHEELS_DIR.glob("*.whl"))
    for k, v in info.items():
        log(f"env: {k}: {v}")
    return info


def _section_env(base: dict) -> dict:
    env = dict(base)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)  # compiled kernels only
    env.pop("RCP_KERNEL_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.setdefault("TRITON_CACHE_DIR", str(Path(tempfile.gettempdir()) / "rcp-gpu-report-triton-cache"))
    return env


def _commands(name: str, out: Path, left_s: float, env: dict) -> list[tuple[str, list[str]]]:
    """The processes of one section: ``[(tag, argv)]``."""
    py, check, sections = sys.executable, str(BENCH / "gpu_check.py"), str(BENCH / "gpu_sections.py")
    if name == "warmup":
        n = warm_workers(os.cpu_count())
        return [(f"warm{i}", [py, sections, "warm", "--worker", str(i), "--workers", str(n)]) for i in range(n)] + [
            ("sass", [py, str(BENCH / "kernel_sass.py"), "--out", str(out / "kernel_sass.csv")])]
    if name == "export":
        return [(name, [py, check, "--sections", "export", "--no-tune", "--out", str(out / "check_export.json")])]
    if name == "kernel":
        return [(name, [py, check, "--sections", "kernel", "--no-speed-csv", "--reps", "30",
                        "--out", str(out / "check_kernel.json")])]
    if name == "bench":
        return [(name, [py, sections, "bench", "--out", str(out), "--layers", str(bench_layers(left_s))])]
    if name == "peers":
        rotating = [] if peers_rotating(left_s) else ["--no-rotating"]
        return [(name, [py, sections, "peers", "--out", str(out), *rotating])]
    if name == "ncu":
        return [(name, [env["RCP_NCU"], "--profile-from-start", "off", "--target-processes", "all", "--clock-control",
                        "none", "--section", "SpeedOfLight", "--section", "LaunchStats", "--section", "Occupancy",
                        "--section", "WarpStateStats", "--metrics", "smsp__inst_executed.sum,dram__bytes_read.sum",
                        "--csv", "--log-file", str(out / "ncu.csv"), py, sections, "ncu-target"])]
    if name == "qat":
        return [(name, [py, check, "--sections", "qat", "--qat-steps", "2", "--qat-seqlen", "512",
                        "--out", str(out / "check_qat.json")])]
    raise ValueError(name)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: $OUT, else results/gpu/report-<UTC timestamp>/)")
    p.add_argument("--budget", type=float, default=BUDGET_S, help=f"total seconds (default {BUDGET_S})")
    p.add_argument("--sections", nargs="+", choices=SECTION_NAMES, default=list(SECTION_NAMES),
                   help="a subset, run in the report's order (default: all)")
    p.add_argument("--list", action="store_true", help="print the plan and exit (no GPU needed, nothing written)")
    return p.parse_args(argv)


def describe(sections: tuple[Section, ...], budget_s: float) -> list[str]:
    lines = [f"gpu-report: {len(sections)} sections in this order, total budget {budget_s:.0f} s (a section starts "
             "only while its minimum is left, and never runs past the budget):"]
    for i, s in enumerate(sections, 1):
        lines.append(f"  {i}. {s.name:6s} limit {s.limit_s:3d} s, starts with >= {s.min_s:3d} s left -> "
                     f"{', '.join(s.outputs)}: {s.what}")
    worst = [n for n, run, _, _ in plan(sections, budget_s) if not run]
    lines.append("  if every section used its whole limit, these would be skipped: " + (", ".join(worst) or "none"))
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sections = tuple(s for s in SECTIONS if s.name in args.sections)
    if args.list:
        print("\n".join(describe(sections, args.budget)))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu-report: needs a CUDA GPU; nothing run, nothing written", file=sys.stderr)
        return 2
    old = signal.signal(signal.SIGTERM, _on_sigterm)  # a caller's time limit: stop the children, keep the files
    try:
        return _run(args, sections)
    finally:
        signal.signal(signal.SIGTERM, old)


def _run(args: argparse.Namespace, sections: tuple[Section, ...]) -> int:
    t0 = time.time()
    out = (args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else default_out())).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "log.txt", t0)
    log(f"output folder: {out}")
    for line in describe(sections, args.budget):
        log(line)
    env = _section_env(os.environ)
    Path(env["TRITON_CACHE_DIR"]).mkdir(parents=True, exist_ok=True)
    info = _environment(out, log, env)
    if any(s.name in ("peers", "ncu") for s in sections):
        info["gemlite_status"] = _gemlite(env, log)
        env["RCP_GEMLITE_STATUS"] = info["gemlite_status"]
        log(f"gemlite: {info['gemlite_status']}")
    _write_json(info, out / "env.json")

    status: dict[str, dict] = {}

    def record(name: str, **kw) -> None:
        status[name] = kw
        _write_json({"budget_s": args.budget, "elapsed_s": round(log.elapsed(), 1), "sections": status},
                    out / "sections.json")

    background: list[tuple[Section, list[Job], float, float]] = []

    def finish_background() -> None:
        for s, jobs, started, deadline in background:
            rcs = [j.wait(deadline) for j in jobs]
            timed_out = sum(rc is None for rc in rcs)
            failed = sum(rc not in (0, None) for rc in rcs)
            st = "ok" if not timed_out and not failed else f"{failed} failed, {timed_out} timed out of {len(jobs)}"
            _write_json({"workers": len(jobs), "exit_codes": rcs, "seconds": round(time.time() - started, 1)},
                        out / "warmup.json")
            record(s.name, status=st, seconds=round(time.time() - started, 1), files=_present(out, s))
            log(f"== {s.name}: {st} ({time.time() - started:.0f} s)")
        background.clear()

    try:
        for s in sections:
            if background and s.name not in background[0][0].beside:
                finish_background()  # nothing else runs beside it
            run, limit, reason = decide(s, log.elapsed(), args.budget)
            if run and s.name == "ncu" and not info.get("ncu"):
                run, reason = False, "skipped: ncu not found"
            if not run:
                record(s.name, status=reason, seconds=0, files=[])
                log(f"== {s.name}: {reason}")
                continue
            env["RCP_NCU"] = info.get("ncu") or ""
            log(f"== {s.name} (limit {limit:.0f} s): {s.what}")
            started = time.time()
            deadline = started + limit
            try:
                cmds = _commands(s.name, out, args.budget - log.elapsed(), env)
                jobs = [Job(tag, cmd, env, log) for tag, cmd in cmds]
            except Exception as e:
                record(s.name, status=f"failed to start: {type(e).__name__}: {e}", seconds=0, files=[])
                log(f"== {s.name}: failed to start: {e}")
                continue
            if s.background:
                background.append((s, jobs, started, deadline))
                continue
            rcs = [j.wait(deadline) for j in jobs]
            secs = round(time.time() - started, 1)
            if any(rc is None for rc in rcs):
                st = f"timed out after {limit:.0f} s"
            elif all(rc == 0 for rc in rcs):
                st = "ok"
            else:
                st = f"failed (exit {','.join(map(str, rcs))})"
            record(s.name, status=st, seconds=secs, files=_present(out, s))
            log(f"== {s.name}: {st} ({secs:.0f} s; files: {', '.join(_present(out, s)) or 'none'})")
        finish_background()
    except KeyboardInterrupt:
        log("interrupted: stopping the running sections")
        for j in list(Job.live):
            j.stop()
        status.setdefault("interrupted", {"status": "interrupted (SIGTERM or Ctrl-C): later sections not run"})
    log(f"done in {log.elapsed():.0f} s of the {args.budget:.0f} s budget; files in {out}: "
        f"{', '.join(sorted(p.name for p in out.iterdir()))}")
    _summary(out, log)
    bad = [n for n, st in status.items() if not (st["status"] == "ok" or st["status"].startswith("skipped"))]
    return 1 if bad else 0


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def _present(out: Path, s: Section) -> list[str]:
    return [f for f in s.outputs if (out / f).exists()]


def _summary(out: Path, log: Log) -> None:
    """A few lines of the main numbers, into the log (the files hold everything)."""
    import csv

    try:
        p = out / "kernel_speed.csv"
        if p.exists():
            for r in csv.DictReader(open(p)):
                log(f"summary {r['bench']:6s} {r['N_out']:>6}x{r['K_in']:<6} B={r['batch']} {r['method']:26s} "
                    f"{r['median_us']:>9} us  x{r['speedup_vs_fp16']} vs fp16  {r.get('pct_of_peak_bw', '')}% of peak")
        for name in ("check_export.json", "check_kernel.json", "check_qat.json"):
            q = out / name
            if q.exists():
                d = json.loads(q.read_text())
                sec = next((d[k] for k in ("export", "kernel", "qat") if isinstance(d.get(k), dict)), {})
                keys = ("ok", "fused_path_ok", "fused_bitplane_ok", "kernel_code_mismatches", "first_code_flip_linear",
                        "teacher_forced_max_rel_triton", "error", "peak_over_estimate")
                log(f"summary {name}: " + json.dumps({k: sec[k] for k in keys if k in sec}, default=str))
        q = out / "peers.json"
        if q.exists():
            for r in json.loads(q.read_text()).get("rows", []):
                log(f"summary peers {r['N_out']}x{r['K_in']} {r['method']:26s} single {r.get('single_op_us', '-')} us "
                    f"(x{r.get('single_op_speedup_vs_fp16', '-')}), rotating {r.get('rotating_us', '-')} us "
                    f"(x{r.get('rotating_speedup_vs_fp16', '-')}) {r.get('error', '')}")
    except Exception as e:  # the summary only repeats the files
        log(f"summary failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
