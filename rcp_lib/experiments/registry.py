"""The one list of result files: which notebook or command writes each, what the README generator reads, what a
smoke run must produce, and which the ``table`` command can compute.

Everything that names result files derives from :data:`TABLES`: :data:`NOTEBOOKS` (the notebooks that
``python -m rcp_lib reproduce`` can run, in the order of their number prefix; which ones a profile runs:
:func:`profile_notebooks`), the file look-ups of
:mod:`rcp_lib.report`, the choices of ``python -m rcp_lib table`` and the smoke-run checks of
``tests/integration/test_notebooks.py``. A notebook writes its table with ``write_rows(rows, P, "<name>")``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from ..paths import results_dir, results_root
from ..profiles import Profile


#: the notebook of the seeded ablation and the GSR decision: run by the profiles that name it in ``Profile.notebooks``
#: (the ``ablation`` profile), not by the main run of the others (its rows need several seeds each)
SEEDED_NOTEBOOK = "06_ablation.ipynb"
#: the notebook of the recipe search (rcp_lib.experiments.search: hours on the cpu profile), run only when named
#: (``reproduce --notebooks 07_recipe_search.ipynb``), never by a profile's main run
SEARCH_NOTEBOOK = "07_recipe_search.ipynb"


@dataclass(frozen=True)
class Table:
    """One result file (or a family of files, when :attr:`file` is a glob pattern).

    Attributes:
        name: registry key; for a notebook table also the stem given to ``write_rows``.
        file: file name under ``results/<profile>/`` (or directly under the results root when not
            :attr:`per_profile`); a glob pattern for a family (``perplexity_qat_*.csv``).
        notebook: the notebook that writes it, or None when a command does (:attr:`command`).
        command: how to write it when no notebook does (a CLI call, a benchmark or a script).
        per_profile: False for files of one machine rather than of a profile (``results/gpu/kernel_speed.csv``).
        smoke: the ``smoke`` run of the notebooks writes it (checked by ``tests/integration/test_notebooks.py``).
        readme: the README generator (:mod:`rcp_lib.report`) reads it.
        figures: stems of the figures (``figures/<profile>/<stem>.png`` and ``.pdf``) drawn from it.
        rows: name of the :mod:`rcp_lib.experiments` function ``f(profile, **kw) -> list[dict]`` that computes it
            (``python -m rcp_lib table --table <name>``); None when it cannot be computed on its own.
        families: for perplexity tables, the method families of its rows (``--families`` overrides them).
        description: one line for humans.
    """

    name: str
    file: str
    notebook: str | None = None
    command: str | None = None
    per_profile: bool = True
    smoke: bool = False
    readme: bool = False
    figures: tuple[str, ...] = ()
    rows: str | None = None
    families: tuple[str, ...] | None = None
    description: str = ""

    @property
    def is_pattern(self) -> bool:
        """True when :attr:`file` names a family of files (a glob pattern)."""
        return any(c in self.file for c in "*?[")

    def matches(self, filename: str) -> bool:
        """True when ``filename`` (a bare file name) is this table's file or one of its family."""
        return fnmatch.fnmatchcase(filename, self.file)


_ALL = ("baseline", "ptq", "qat")
_TABLES = (
    Table("quickstart", "quickstart.json", notebook="00_quickstart.ipynb", smoke=True, figures=("quickstart",),
          description="FP -> rotate -> W2A4KV4 -> a few QAT steps on the embedded model, with generations"),
    Table("rotation_impact_layers", "rotation_impact_layers.csv", notebook="01_rotation_impact.ipynb", smoke=True,
          description="per layer and projection: kurtosis, max/std and the four 2-bit errors, per rotation"),
    Table("rotation_impact_summary", "rotation_impact_summary.csv", notebook="01_rotation_impact.ipynb", smoke=True,
          readme=True, figures=("rotation_impact_summary", "rotation_impact_histograms"),
          description="means over layers per rotation, with the range and shape gains"),
    Table("perplexity", "perplexity.csv", notebook="02_perplexity.ipynb", smoke=True, readme=True,
          figures=("perplexity", "qat_curves"), rows="ppl_table", families=_ALL,
          description="the main table: FP, PTQ baselines and QAT rows at every setting of the profile"),
    Table("perplexity_full_split", "perplexity_full_split.csv", notebook="02_perplexity.ipynb", readme=True,
          rows="full_split_table", description="profile.full_eval_methods scored on the whole test split"),
    Table("zero_shot", "zero_shot.csv", notebook="03_zero_shot.ipynb", smoke=True, readme=True, figures=("zero_shot",),
          rows="zero_shot_table", description="zero-shot accuracy (lm-evaluation-harness) of the main rows"),
    Table("zero_shot_all", "zero_shot_all.csv", notebook="06_ablation.ipynb", readme=True, rows="zero_shot_table",
          description="zero-shot on every document with per-document outcomes (the ablation profile's rows)"),
    Table("memory", "memory.csv", notebook="04_memory.ipynb", smoke=True, readme=True, figures=("memory",),
          rows="memory_table", description="footprints of the reference models and the profile's model per scheme"),
    Table("memory_vs_saved", "memory_vs_saved.csv", notebook="04_memory.ipynb", smoke=True, readme=True,
          description="memory accountant vs the bytes save_quantized writes (profile's model, W2A4KV4)"),
    Table("kernel_correctness", "kernel_correctness.csv", notebook="05_kernel_speed.ipynb", smoke=True,
          figures=("kernel_correctness",), rows="kernel_correctness", description="W2A4 GEMV backends vs a float64 product"),
    Table("kernel_speed", "gpu/kernel_speed.csv", command="python benchmarks/bench_kernel.py (CUDA GPU)",
          per_profile=False, figures=("kernel_speed",), description="W2A4 GEMV speed vs fp16 (notebook 05 plots it)"),
    Table("kernel_sass", "kernel/kernel_sass.csv", command="python benchmarks/kernel_sass.py", per_profile=False,
          description="static sm_90 instruction counts of the W2A4 GEMV loops (per weight, barriers, popcounts, "
                      "load widths): no GPU needed, not a speed"),
    Table("kernel_bound", "kernel/kernel_bound.csv", command="python benchmarks/kernel_bound.py", per_profile=False,
          description="a floor under each GEMV candidate's own GPU time from its bytes and static issue slots "
                      "(kernel_sass) against the measured fp16 rows (kernel_speed): not a measurement"),
    Table("perplexity_ptq", "perplexity_ptq.csv", command="python -m rcp_lib table --profile <profile>",
          rows="ppl_table", families=("baseline", "ptq"), description="the PTQ part of the perplexity table alone"),
    Table("perplexity_qat", "perplexity_qat_*.csv", readme=True, rows="ppl_table", families=("qat",),
          command="python -m rcp_lib table --families qat --name perplexity_qat_<steps> --set qat_steps=<steps>",
          description="QAT rows re-trained with a longer budget"),
    Table("reproduce_timing", "reproduce_timing.json", command="python -m rcp_lib reproduce --profile <profile>",
          readme=True, description="wall time of the last full reproduce run, per notebook (and in `measured` the "
                                   "last time of every notebook, named runs included)"),
    Table("hadamard_speed", "hadamard_speed.json", readme=True,
          command="python benchmarks/bench_hadamard.py --json results/<profile>/hadamard_speed.json",
          description="fast Hadamard transform vs the dense product"),
    Table("qat_step", "qat_step.json", readme=True,
          command="python benchmarks/bench_qat_step.py --json results/<profile>/qat_step.json",
          description="one QAT step, fake-quantized student vs FP"),
    Table("ablation", "ablation.csv", notebook=SEEDED_NOTEBOOK, smoke=True, rows="ablation_table", readme=True, figures=("ablation",),
          description="RCP and its ablations at W2A4KV4, one row per seed (ppl, step-0 ppl, movement, tokens, seconds)"),
    Table("ablation_summary", "ablation_summary.csv", notebook=SEEDED_NOTEBOOK, smoke=True, rows="ablation_summary", readme=True,
          description="mean ± SE per ablation row, QAT against its own start (paired), an order vs RCP only from a "
                      "t-test (paired by seed, else Welch; p < 0.05)"),
    Table("ablation_start", "ablation_start.csv", readme=True,
          command="python -m rcp_lib.experiments.ablation_start --profile ablation",
          description="the ablation rows' clip ratio against the rotated FP weights and level offset from the uniform "
                      "grid, at the start (before GPTQ) and after QAT"),
    Table("gsr_decision", "gsr_decision.csv", notebook=SEEDED_NOTEBOOK, smoke=True, rows="gsr_decision", readme=True,
          description="GSR decided: W16A4KV16 per R1 (the activation effect of a block-diagonal R1) and GSR vs its "
                      "control with weight groups smaller than the block (W2A16KV16 GPTQ), seeds of the profile"),
    Table("r4_blocks", "r4_blocks.csv", notebook=SEEDED_NOTEBOOK, smoke=True, rows="r4_blocks", readme=True,
          description="what a power-of-two R4 block (the fused pre-kernel's) costs against the full R4: W16A4KV16 "
                      "perplexity per R4, seeds of the profile, orders from seed-paired t-tests"),
    Table("recipe_sweep", "recipe_sweep.csv", readme=True,
          command="python -m rcp_lib.experiments.sweep --profile <profile>",
          description="QAT recipe grid (lr_quant, lr_weights, grad_clip, clip init) selected by held-out train-tail ppl"),
    Table("recipe_sweep_gptq", "recipe_sweep_gptq.csv", notebook=SEARCH_NOTEBOOK, smoke=True, readme=True,
          figures=("recipe_sweep_gptq",),
          description="the learning rates under the GPTQ start (weights, so that codes can flip; the scale-free range), "
                      "selected by held-out train-tail ppl over 3 seeds"),
    Table("recipe_sweep_lrq", "recipe_sweep_lrq.csv", readme=True,
          command="python -m rcp_lib.experiments.sweep --profile cpu --name recipe_sweep_lrq --grid lr_quant=1e-3,3e-3,1e-2 "
                  "grad_clip=0.3 init=search lr_weights=2e-5,2e-4,1e-3 lr_range=1e-3,1e-2 --only 12,6 --seeds <s> "
                  "(s = 0..7, one call each; then --only 13 at seeds 0..2)",
          description="the levels' learning rate under the GPTQ start: the table's recipe (lr_quant 1e-2, point 12) "
                      "against 3e-3 (point 6) at 8 seeds, a close call at 3; the range at 1e-2 (point 13)"),
    Table("recipe_variants", "recipe_variants.csv", notebook=SEARCH_NOTEBOOK, smoke=True, readme=True,
          figures=("recipe_variants",),
          description="the selected QAT recipe vs Block-AP, a GPTQ start with a static range and QAT at seqlen 512"),
    Table("qat_tokens", "qat_tokens.csv", notebook=SEARCH_NOTEBOOK, rows="token_curve", figures=("qat_tokens",),
          readme=True,
          description="RCP W2A4KV4 validation ppl vs training tokens, FP as a line"),
    Table("zero_shot_fp_embedded", "zero_shot_fp_embedded.csv", per_profile=False,
          command="python scripts/zero_shot_fp_embedded.py",
          description="zero-shot accuracy of the FP embedded model on the full offline tasks"),
)
#: every result file, by name
TABLES: dict[str, Table] = {t.name: t for t in _TABLES}
#: the notebooks that write tables, in run order (their number prefix)
NOTEBOOKS: tuple[str, ...] = tuple(sorted({t.notebook for t in _TABLES if t.notebook}))


def profile_notebooks(profile: Profile) -> list[str]:
    """The notebooks ``reproduce`` runs for ``profile``, in order: ``profile.notebooks`` when set, else every notebook
    but :data:`SEEDED_NOTEBOOK` and :data:`SEARCH_NOTEBOOK`. Unknown names raise ValueError."""
    names = (list(profile.notebooks) if profile.notebooks is not None
             else [n for n in NOTEBOOKS if n not in (SEEDED_NOTEBOOK, SEARCH_NOTEBOOK)])
    unknown = [n for n in names if n not in NOTEBOOKS]
    if unknown:
        raise ValueError(f"Profile.notebooks: unknown notebooks {unknown}; available: {list(NOTEBOOKS)}")
    return sorted(names)


def result_path(name: str, profile: str | Profile | None = None) -> Path:
    """Path of the result file ``name`` (a concrete file, not a family): ``results/<profile>/<file>``, or
    ``results/<file>`` for a table that is not per profile (then ``profile`` is ignored)."""
    t = TABLES[name]
    if t.is_pattern:
        raise ValueError(f"table {name!r} is a family of files ({t.file}); list them with result_files")
    if not t.per_profile:
        return results_root() / t.file
    if profile is None:
        raise ValueError(f"table {name!r} lives under results/<profile>/: pass the profile")
    return results_dir(profile) / t.file


def table_for_file(filename: str) -> Table | None:
    """The registered table whose file (or family) ``filename`` is, or None."""
    return next((t for t in _TABLES if t.matches(filename)), None)
