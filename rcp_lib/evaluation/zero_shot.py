"""Zero-shot accuracy through lm-evaluation-harness, for any in-memory causal LM.

:func:`zero_shot` wraps a model object (full precision, rotated, fake-quantized, packed: anything that is an
``nn.Module`` with the Hugging Face causal-LM ``forward``) in lm_eval's ``HFLM`` and runs
``lm_eval.simple_evaluate`` 0-shot. It returns one tidy row per (task, metric).

Tasks:

* the paper's usual standard suite :data:`DEFAULT_TASKS` (needs the data sets from the Hugging Face hub or
  a local ``datasets`` cache), and any other task lm_eval knows;
* the offline tasks :data:`~rcp_lib.evaluation.offline_tasks.OFFLINE_TASKS` (``wiki_lastword``,
  ``wiki_nextsent``), built from the wiki-excerpt test articles and run as local lm_eval tasks; they need
  no network at all.

Offline behaviour: before any lm_eval work, if standard tasks are requested and the hub is unreachable
(``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set, or a 2-second TCP probe of the hub fails), the data sets
of the known standard tasks are looked up in the local cache only; if one is missing,
:class:`ZeroShotDataUnavailableError` is raised at once (milliseconds, no 20-second download retries),
naming the offline tasks as the alternative. While offline, ``datasets``/``huggingface_hub`` are switched to
offline mode for the duration of the call so that no retries happen for other tasks either.

Which metric enters the average (column ``used_in_average``), the convention of this module
(:data:`AVERAGE_METRIC`): ``acc_norm`` for ``arc_challenge``, ``hellaswag`` and ``wiki_nextsent`` (the
HellaSwag-style offline task), ``acc`` for ``arc_easy``, ``piqa``, ``winogrande``, ``boolq``,
``lambada_openai`` and ``wiki_lastword``, and ``acc`` for any other task. Both ``acc`` and ``acc_norm`` are
always reported where lm_eval computes them (papers disagree on which one they quote), and LAMBADA-style
tasks also report ``perplexity`` of the target word (never averaged).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .offline_tasks import DEFAULT_N_MAX, OFFLINE_TASKS, build_offline_tasks

DEFAULT_TASKS: tuple[str, ...] = ("arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande", "boolq", "lambada_openai")
AVERAGE_METRIC: dict[str, str] = {
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "wiki_nextsent": "acc_norm",
    "arc_easy": "acc",
    "piqa": "acc",
    "winogrande": "acc",
    "boolq": "acc",
    "lambada_openai": "acc",
    "wiki_lastword": "acc",
}
# Hub data set (path, config name) of the standard tasks, as in the lm_eval 0.4.13 task YAMLs. Used only to
# check the local cache quickly before lm_eval indexes its ~15k tasks (which takes several seconds).
STANDARD_TASK_DATASETS: dict[str, tuple[str, str | None]] = {
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "hellaswag": ("Rowan/hellaswag", None),
    "piqa": ("baber/piqa", None),
    "winogrande": ("allenai/winogrande", "winogrande_xl"),
    "boolq": ("aps/super_glue", "boolq"),
    "lambada_openai": ("EleutherAI/lambada_openai", "default"),
}
_METRICS = ("acc", "acc_norm", "perplexity")
_TRUE = ("1", "true", "yes", "on")


class ZeroShotDataUnavailableError(ConnectionError):
    """The data of a standard lm_eval task cannot be obtained here (offline and not cached)."""


def _offline_message(tasks: Sequence[str], why: str) -> str:
    return (
        f"The data of the lm_eval task(s) {list(tasks)} cannot be loaded: {why}. Standard zero-shot tasks "
        "download their data sets from the Hugging Face hub. Either provide network access (or a populated "
        "`datasets` cache, then set HF_HUB_OFFLINE=1), or use the offline tasks built from the wiki-excerpt "
        f"test articles: zero_shot(model, tokenizer, tasks={OFFLINE_TASKS!r}) "
        "(rcp_lib.evaluation.offline_tasks.OFFLINE_TASKS)."
    )


def hub_offline(timeout: float = 2.0) -> bool:
    """True if the Hugging Face hub cannot be used: offline env flags set, or a short TCP probe fails."""
    if any(os.environ.get(v, "").lower() in _TRUE for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return True
    return False


@contextlib.contextmanager
def _forced_offline(active: bool) -> Iterator[None]:
    """Switch ``datasets`` and ``huggingface_hub`` to offline mode for the duration (no download retries)."""
    if not active:
        yield
        return
    import datasets.config as dcfg
    import huggingface_hub.constants as hcst

    saved = (dcfg.HF_HUB_OFFLINE, getattr(dcfg, "HF_DATASETS_OFFLINE", None), hcst.HF_HUB_OFFLINE)
    dcfg.HF_HUB_OFFLINE = True
    if saved[1] is not None:
        dcfg.HF_DATASETS_OFFLINE = True
    hcst.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dcfg.HF_HUB_OFFLINE = saved[0]
        if saved[1] is not None:
            dcfg.HF_DATASETS_OFFLINE = saved[1]
        hcst.HF_HUB_OFFLINE = saved[2]


def _cached_locally(path: str, name: str | None) -> bool:
    """Whether ``datasets`` can build the data set from its local cache alone (checked in offline mode)."""
    import datasets

    with _forced_offline(True):
        try:
            datasets.load_dataset_builder(path, name)
        except Exception:
            return False
    return True


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None, include_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def available_tasks() -> list[str]:
    """All task names usable here: the offline tasks plus every task lm_eval registers (slow: indexes ~15k)."""
    return list(OFFLINE_TASKS) + sorted(_task_manager(None, True).all_tasks)


def _resolve(tasks: Sequence[str], n_max: int, seed: int) -> tuple[Any, bool]:
    """Validate task names, fail fast offline, and return ``(task_manager, offline)``."""
    ours = [t for t in tasks if t in OFFLINE_TASKS]
    standard = [t for t in tasks if t not in OFFLINE_TASKS]
    offline = bool(standard) and hub_offline()
    if offline:
        known = [t for t in standard if t in STANDARD_TASK_DATASETS]
        missing = [t for t in known if not _cached_locally(*STANDARD_TASK_DATASETS[t])]
        if missing:
            raise ZeroShotDataUnavailableError(_offline_message(missing, "the Hugging Face hub is not reachable (offline) and no local copy is cached"))
    include = str(build_offline_tasks(n_max=n_max, seed=seed)) if ours else None
    tm = _task_manager(include, bool(standard))
    if standard:
        unknown = [t for t in standard if t not in tm.all_tasks]
        if unknown:
            raise ValueError(
                f"Unknown zero-shot task(s) {unknown}. Available: the offline tasks {list(OFFLINE_TASKS)}, the "
                f"paper's standard suite {list(DEFAULT_TASKS)}, or any of the {len(tm.all_tasks)} tasks lm_eval "
                f"{_lm_eval_version()} registers (list them with rcp_lib.evaluation.zero_shot.available_tasks() "
                "or `lm_eval ls tasks`)."
            )
    return tm, offline


def _lm_eval_version() -> str:
    try:
        from importlib.metadata import version

        return version("lm_eval")
    except Exception:  # pragma: no cover
        import lm_eval

        return getattr(lm_eval, "__version__", "unknown")


def _n_examples(results: Mapping[str, Any], task: str) -> int | None:
    ns = results.get("n-samples", {}).get(task, {})
    n = ns.get("effective", ns.get("original")) if isinstance(ns, Mapping) else None
    return int(n) if n is not None else None


#: the metrics whose per-document value is a right / wrong outcome (McNemar pairs them between rows)
OUTCOME_METRICS = ("acc", "acc_norm")


def per_document(samples: Sequence[Mapping[str, Any]], metric: str) -> tuple[str, str]:
    """The per-document outcomes of one task and metric from lm_eval's logged samples: ``("wccw...", sha256)``, one
    character per document in ``doc_id`` order (``c``: correct, ``w``: wrong; letters, so that a CSV reader never takes
    the string for a number), and the SHA-256 of the documents' hashes in that order (two rows are paired only when it
    agrees). ``("", "")`` for a metric that is not a per-document accuracy (:data:`OUTCOME_METRICS`) or that the
    samples do not carry."""
    if metric not in OUTCOME_METRICS:
        return "", ""
    rows = [s for s in samples if metric in s]
    if any(s.get("filter") == "none" for s in rows):  # one logged sample per filter: keep the unfiltered one
        rows = [s for s in rows if s.get("filter") == "none"]
    rows = sorted(rows, key=lambda s: int(s["doc_id"]))
    if not rows:
        return "", ""
    outcomes = "".join("c" if float(s[metric]) > 0.5 else "w" for s in rows)
    h = hashlib.sha256("\n".join(str(s.get("doc_hash", s["doc_id"])) for s in rows).encode()).hexdigest()
    return outcomes, h


def zero_shot(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    num_fewshot: int = 0,
    config: Mapping[str, Any] | None = None,
    *,
    n_max: int = DEFAULT_N_MAX,
    seed: int = 0,
    bootstrap_iters: int = 1000,
) -> Any:
    """Zero-shot evaluation of an in-memory causal LM with lm-evaluation-harness.

    Args:
        model: a torch causal LM with the Hugging Face ``forward`` (``PreTrainedModel``), on its device.
        tokenizer: its tokenizer object.
        tasks: task names; default :data:`DEFAULT_TASKS` (needs the hub). Offline: :data:`OFFLINE_TASKS`.
        limit: at most this many documents per task (lm_eval's ``limit``; a float < 1 is a fraction).
        batch_size: lm_eval batch size (an int, or ``"auto"``).
        num_fewshot: few-shot examples (0 for the papers' zero-shot protocol; the offline tasks have no
            training split, so they accept only 0).
        config: the caller's description of the model/run (method, bits, ...), stored as JSON per row.
        n_max: size cap of the offline tasks (see :func:`build_offline_tasks`).
        seed: seed of the offline task construction.
        bootstrap_iters: bootstrap draws for the stderr of non-mean metrics (perplexity); ``acc`` and
            ``acc_norm`` have closed-form stderr.

    Returns:
        ``pandas.DataFrame`` with one row per (task, metric) and columns ``task``, ``metric`` (``acc``,
        ``acc_norm``, ``perplexity``), ``value``, ``stderr``, ``n_examples``, ``used_in_average`` (see
        :data:`AVERAGE_METRIC`), ``num_fewshot``, ``limit``, ``lm_eval_version``, ``seconds`` (wall time of
        the whole call), ``config`` (JSON string of ``config``, keys sorted), ``per_doc`` and ``docs_sha256``
        (:func:`per_document`: each document's 0/1 outcome, for paired tests between rows; empty for perplexity).

    Raises:
        ZeroShotDataUnavailableError: a standard task's data cannot be loaded offline (raised before any
            evaluation, in milliseconds for the default suite).
        ValueError: an unknown task name (the message lists what is available).
    """
    import pandas as pd

    t0 = time.perf_counter()
    task_list = list(DEFAULT_TASKS if tasks is None else ([tasks] if isinstance(tasks, str) else tasks))
    if not task_list:
        raise ValueError("tasks is empty; give task names, e.g. OFFLINE_TASKS or DEFAULT_TASKS.")
    if num_fewshot and any(t in OFFLINE_TASKS for t in task_list):
        raise ValueError(f"The offline tasks {OFFLINE_TASKS} have no training split; use num_fewshot=0.")
    tm, offline = _resolve(task_list, n_max, seed)

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    with _forced_offline(offline):
        try:
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=task_list,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=tm,
                bootstrap_iters=bootstrap_iters,
                log_samples=True,  # per-document outcomes: paired (McNemar) tests between rows
            )
        except (ConnectionError, OSError) as e:
            if not (offline or isinstance(e, ConnectionError)):
                raise
            raise ZeroShotDataUnavailableError(_offline_message([t for t in task_list if t not in OFFLINE_TASKS], f"{type(e).__name__}: {str(e)[:300]}")) from e
    seconds = time.perf_counter() - t0
    version = _lm_eval_version()
    cfg_json = json.dumps(dict(config or {}), sort_keys=True, default=str)
    rows: list[dict[str, Any]] = []
    for task in task_list:
        res = out["results"].get(task, {})
        avg_metric = AVERAGE_METRIC.get(task, "acc")
        for metric in _METRICS:
            key = f"{metric},none"
            if key not in res:
                continue
            stderr = res.get(f"{metric}_stderr,none")
            outcomes, docs = per_document(out.get("samples", {}).get(task, []), metric)
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "value": float(res[key]),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else float("nan"),
                    "n_examples": _n_examples(out, task),
                    "used_in_average": metric == avg_metric,
                    "num_fewshot": num_fewshot,
                    "limit": limit,
                    "lm_eval_version": version,
                    "seconds": round(seconds, 2),
                    "config": cfg_json,
                    "per_doc": outcomes,
                    "docs_sha256": docs,
                }
            )
    return pd.DataFrame(rows)


def average_accuracy(df: Any) -> float:
    """Mean of the rows flagged ``used_in_average`` (one accuracy per task, see :data:`AVERAGE_METRIC`).

    Raises:
        ValueError: no row is flagged, or a task has more than one flagged row.
    """
    sel = df[df["used_in_average"].astype(bool)]
    if sel.empty:
        raise ValueError("No row has used_in_average=True; nothing to average.")
    counts = sel.groupby("task").size()
    if (counts > 1).any():
        raise ValueError(f"Tasks with several averaged rows (concatenated runs?): {list(counts[counts > 1].index)}")
    return float(sel["value"].mean())


def offline_include_dir(n_max: int = DEFAULT_N_MAX, seed: int = 0) -> Path:
    """The folder of the offline task YAML/JSONL files (built if needed); pass it to lm_eval's ``--include_path``."""
    return build_offline_tasks(n_max=n_max, seed=seed)
