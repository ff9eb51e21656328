"""Experiments: named methods -> built models -> cached result rows with provenance -> registered result files.

Used by the notebooks (``from rcp_lib import experiments as X``) and the CLI; holds no algorithm of its own (it
composes ``rotate_model``, ``quantize_model``, GPTQ, ``train`` and the evaluators). Every row carries its full
config (model, rotation, quantization, PTQ/QAT recipe), corpus, seqlen, tokens, seed, versions, git commit and date.

One module per concern:

* :mod:`~rcp_lib.experiments.methods`: :class:`Method`, the named methods (:data:`NAMED`, each a
  :class:`~rcp_lib.recipe.Recipe` for a profile) and the rows of the tables (:func:`all_methods`);
* :mod:`~rcp_lib.experiments.build`: the FP base model, its data and :func:`build` (PTQ weights and QAT students
  cached);
* :mod:`~rcp_lib.experiments.rows`: cache keys, the row cache and :func:`write_rows`;
* :mod:`~rcp_lib.experiments.tables` (perplexity, zero-shot), :mod:`~rcp_lib.experiments.rotation`,
  :mod:`~rcp_lib.experiments.footprints` (memory), :mod:`~rcp_lib.experiments.kernel`: the tables of the notebooks;
* :mod:`~rcp_lib.experiments.registry`: :data:`TABLES`, the one list of result files;
* :mod:`~rcp_lib.experiments.notebook`: :func:`setup`, the first cell of every notebook;
* the recipe search and the checks behind the recipe, each a resumable command on the same row cache
  (``python -m rcp_lib.experiments.<name> --help``): :mod:`~rcp_lib.experiments.sweep` (the QAT learning-rate / clip /
  start grid), :mod:`~rcp_lib.experiments.variants` (recipe variants at equal budget),
  :mod:`~rcp_lib.experiments.curve` (validation perplexity vs training tokens) and
  :mod:`~rcp_lib.experiments.ablation_start` (where each ablation row's quantizer starts and ends);
  :mod:`~rcp_lib.experiments.search` runs the first three as one job (``07_recipe_search.ipynb``).

Rows are cached as JSON under ``cache_dir()/rows/<kind>-<hash>.json`` (outside the repo) keyed by the hash of
everything that determines them plus a fingerprint of the code (:func:`rcp_lib.io.code_fingerprint`), so re-running
a notebook reuses finished work and a code change recomputes it; trained QAT students and the frozen weights of PTQ
rows (GPTQ, clip-searched RTN) are cached likewise under ``cache_dir()/qat/<hash>/`` and ``cache_dir()/ptq/``.
"""

from ..paths import figures_dir, results_dir
from .ablation import (
    ABLATION_COLUMNS,
    ablation_methods,
    ablation_summary,
    ablation_table,
    plot_token_curve,
    separation,
    summarize_ablation,
    token_curve,
)
from .build import (
    _ptq_cached,
    base_model,
    build,
    calibration,
    gptq_start,
    qat_history,
    qat_stats,
    start_key,
    tokens,
    train_student,
)
from .footprints import REFERENCE_CONFIGS, kv_curve, memory_table, memory_vs_saved
from .gsr import gsr_decision
from .r4 import r4_blocks
from .kernel import kernel_correctness, kernel_speed_table
from .methods import (
    CONTROL_SETTINGS,
    NAMED,
    SEEDED_ABLATIONS,
    SEEDED_PTQ,
    Method,
    all_methods,
    method,
    ptq_methods,
    qat_config,
    qat_methods,
)
from .notebook import setup
from .registry import NOTEBOOKS, TABLES, Table, result_path
from .rotation import _parse_rotation, _rotation_setting, rotation_analysis, rotation_example, summarize_rotation
from .rows import cached_row, qat_key, row_key, method_config, ptq_key, write_rows
from .tables import (
    chance_level,
    full_split_table,
    ppl_row,
    ppl_table,
    qat_curves,
    zero_shot_methods,
    zero_shot_table,
)

__all__ = [
    "ABLATION_COLUMNS", "ablation_methods", "ablation_summary", "ablation_table", "plot_token_curve", "separation",
    "summarize_ablation", "token_curve", "qat_stats", "train_student",
    "CONTROL_SETTINGS", "NAMED", "NOTEBOOKS", "REFERENCE_CONFIGS", "TABLES", "Method",
    "Table", "SEEDED_ABLATIONS", "SEEDED_PTQ", "all_methods", "method", "base_model", "build", "calibration", "chance_level", "figures_dir", "full_split_table",
    "gptq_start",
    "gsr_decision", "r4_blocks", "cached_row", "row_key", "qat_key",
    "start_key",
    "kernel_correctness", "kernel_speed_table", "kv_curve", "memory_table", "memory_vs_saved", "method_config",
    "ppl_row", "ppl_table", "ptq_key", "ptq_methods", "qat_config", "qat_curves", "qat_history", "qat_methods",
    "result_path", "results_dir", "rotation_analysis", "rotation_example", "setup", "summarize_rotation", "tokens",
    "write_rows", "zero_shot_methods", "zero_shot_table",
]
