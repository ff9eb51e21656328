"""Run profiles: one dataclass drives the notebooks (papermill parameters), the CLI and the tests.

A profile says where and how much: model, corpus, device, evaluation / calibration / QAT budgets, which settings
and methods the tables hold, and the weight group of its model (``w_group_size``, a divisor of every layer input),
plus the path of its QAT recipe (``qat_recipe``). What a method does is its recipe file (``configs/recipes/*.yaml``,
:mod:`rcp_lib.recipe`); :meth:`rcp_lib.experiments.Method.recipe` resolves it with the profile's :attr:`Profile.budget`
(group, seed, QAT budget) and QAT recipe.

* ``smoke`` - CI: every notebook end to end in minutes on 2 CPU cores (tiny eval slices, a few QAT steps).
  Its numbers only prove the pipeline runs; they are written under ``results/smoke/``.
* ``cpu``   - the embedded default (real SmolLM2-135M, real wiki-excerpt text), the README main command.
* ``gpu``   - the embedded model on one CUDA GPU with budgets that use it (80x the ``cpu`` profile's QAT tokens, the
  whole test split for perplexity, bf16), written under ``results/gpu/``.
* ``paper`` - LLaMA-2-7B on a GPU with WikiText-2, the paper's setting (needs the data set and the weights). Its QAT
  recipe is ``configs/paper-llama2-7b.yaml`` (``qat_recipe``; the budget fields here must agree with that file,
  ``tests/test_recipe.py`` checks that its recipe is the table's RCP row's). ``python -m rcp_lib reproduce --profile
  paper --dry-run`` runs its path on the CPU with a tiny random model (:mod:`rcp_lib.reproduce`).
* ``ablation`` - the ``cpu`` setting at W2A4KV4 only: RCP against uniform-grid QAT (= w/o Partition) and RCP with its
  levels or its clip frozen at the start, each trained and scored once per seed of
  ``ablation_seeds`` (the seed sets the R1 signs, the calibration windows and the QAT data order);
  ``results/ablation/ablation.csv`` (:func:`rcp_lib.experiments.ablation_table`).

Results of each profile go to ``results/<profile>/`` and figures to ``figures/<profile>/`` so that one
profile never overwrites another's files. A profile with overrides (``get_profile("cpu", qat_steps=80)``, papermill's
``-p overrides``, ``--set``) records the fields it changed in :attr:`Profile.overrides` and writes to
``results/<profile>-<hash of the overrides>/`` (:attr:`Profile.run_name`), never into the unmodified profile's folder.
"""

from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .recipe import Budget


#: an override value that sets a field to None (a plain None is ignored, so that an unset keyword changes nothing):
#: ``--set KEY=null`` arrives as this string, and :attr:`Profile.overrides` records such a field with it, so that the
#: overrides reproduce hands to the notebooks (as JSON) still set the field to None there
NULL = "null"


@dataclass
class Profile:
    name: str
    model: str = "smollm2-135m"
    corpus: str = "wiki-excerpt"
    device: str = "cpu"
    seqlen: int = 512
    eval_windows: int | None = 32  # None: the whole test split
    eval_spread: bool = True  # eval_windows evenly spaced over the whole split (every k-th window), not the first ones
    full_eval_methods: list[str] = field(default_factory=lambda: ["FP", "RCP"])  # also scored on the whole split
    calib_windows: int = 32
    calib_seqlen: int = 512
    w_group_size: int = 64  # the weight group of every recipe of this profile; 576 (SmolLM2) is not divisible by 128
    # the QAT budget of every QAT row (how much; how they train is the QAT recipe, qat_recipe below)
    qat_steps: int = 40
    qat_seqlen: int = 256
    qat_batch_size: int = 1
    qat_grad_accum: int = 1
    qat_val_every: int = 20
    ablation_seeds: list[int] = field(default_factory=lambda: [0])  # seeds of the ablation table (one run each)
    # weight groups of the GSR decision's weight part (each smaller than the R1 block, rcp_lib.experiments.gsr);
    # empty: the activation part only
    gsr_weight_groups: list[int] = field(default_factory=lambda: [16, 32])
    # the notebooks `reproduce` runs (rcp_lib.experiments.registry.profile_notebooks); None: every notebook but the
    # seeded ablation's (06_ablation.ipynb), which the ``ablation`` profile runs, and the recipe search's
    # (07_recipe_search.ipynb), run only when named
    notebooks: list[str] | None = None
    # the one-seed QAT ablation rows (w/o Clip, Uniform-QAT = w/o Partition, w/o Rotate, the block-Hadamard control) in the tables;
    # False: left to the ``ablation`` profile, which has the seeds to order them (rcp_lib.experiments.SEEDED_ABLATIONS)
    qat_ablation_rows: bool = True
    sweep_val_windows: int = 16  # held-out train-tail windows (at seqlen) that select a recipe in the sweep
    # seeds of the recipe search (07_recipe_search.ipynb, rcp_lib.experiments.search): each point and variant once per seed
    search_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    search_points: int | None = None  # only the first n points of each search (sweep points, variants); None: all
    search_curve_length: int = 16  # the recipe search's token curve trains this many times qat_steps
    analysis_layers: list[int] | None = None  # None: all
    # R1 specs "kind[:block][/g<group>]" (block kinds default to block = group; group defaults to w_group_size):
    # each "gsr:<b>" has its "block_hadamard:<b>" control; "/g32" quantizes Walsh blocks of 64 in groups of 32, the
    # one setting where the sequency order inside a block can change per-group statistics (block > group)
    analysis_rotations: list[str] = field(default_factory=lambda: [
        "none", "hadamard", "random_hadamard", "block_hadamard:64", "gsr:64", "gsr:16", "block_hadamard:16",
        "block_hadamard:64/g32", "gsr:64/g32"])
    zero_shot_tasks: list[str] = field(default_factory=lambda: ["wiki_lastword", "wiki_nextsent"])
    zero_shot_limit: int | None = 100  # documents per task (None: every document)
    # the rows of the zero-shot table at the first setting (None: FP, the PTQ baselines, RCP and Uniform-QAT among the
    # profile's methods, rcp_lib.experiments.tables.ZERO_SHOT_ROWS)
    zero_shot_methods: list[str] | None = None
    settings: list[str] = field(default_factory=lambda: ["W2A4KV4", "W2A16KV16", "W4A4KV4"])
    methods: list[str] | None = None  # None: every method of the tables; else only these names
    seed: int = 0
    dtype: str | None = None  # parameter dtype of the base model: None = bfloat16 on CUDA, float32 elsewhere
    # the QAT recipe of every QAT row (rcp_lib.recipe.QATRecipe, a file relative to the checkout): its `qat` section
    # (learning rates, gradient clip, precision, Block-AP, GPTQ start) and the start fields of its `quant.weight`; the
    # budget above sets steps, seqlen, batch, accumulation, validation. configs/recipes/qat/cpu.yaml says why its values
    qat_recipe: str = "configs/recipes/qat/cpu.yaml"
    # fields on top of that file, in its layout: {"qat": {QATConfig fields}, "quant": {"weight": {start fields}}}
    # (e.g. a point of python -m rcp_lib.experiments.sweep: --set 'qat_overrides={"qat": {"lr_quant": 3e-3}}')
    qat_overrides: dict = field(default_factory=dict)
    # the fields changed from the named profile (set by with_overrides; not a setting: excluded from cache keys)
    overrides: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def budget(self) -> "Budget":
        """How much every recipe of this profile gets (:class:`rcp_lib.recipe.Budget`): the weight group, the seed
        and the QAT budget."""
        from .recipe import Budget

        return Budget(group_size=self.w_group_size, seed=self.seed, steps=self.qat_steps, seqlen=self.qat_seqlen,
                      batch_size=self.qat_batch_size, grad_accum=self.qat_grad_accum, val_every=self.qat_val_every)

    @property
    def run_name(self) -> str:
        """Folder name of this profile's outputs: :attr:`name`, or ``<name>-<8 hex digits>`` (a hash of
        :attr:`overrides`) when fields were overridden, so that a modified run never writes into the unmodified
        profile's ``results/<name>/`` or ``figures/<name>/``."""
        if not self.overrides:
            return self.name
        digest = hashlib.sha256(json.dumps(self.overrides, sort_keys=True, default=str).encode()).hexdigest()
        return f"{self.name}-{digest[:8]}"

    def check_model_sizes(self) -> None:
        """ValueError when an overridden ``w_group_size`` or ``model`` does not fit: the group must divide every block
        projection's input of the model (:func:`rcp_lib.quant.apply.check_model_sizes`), whose sizes are read from its
        config without loading weights (:func:`rcp_lib.models.model_dims`). The named profiles fit their models; the
        CLI calls this before computing anything."""
        if not {"w_group_size", "model"} & set(self.overrides):
            return
        from .models import model_dims
        from .quant.apply import check_model_sizes, preset

        try:
            dims = model_dims(self.model)
        except ValueError as e:
            raise ValueError(f"Profile.model: {e}") from e
        try:
            check_model_sizes(preset("W2A4KV4", w_group_size=self.w_group_size), dims, self.model)
        except ValueError as e:
            raise ValueError(f"Profile.w_group_size: {e}") from e

    def with_overrides(self, **kw) -> "Profile":
        """A copy with fields replaced (None values ignored; the string :data:`NULL`, ``"null"``, sets a field that
        allows None to None: ``--set zero_shot_limit=null``). Numeric strings are converted (``"2e-5"``); a value
        of the wrong type raises ValueError naming the field. Changed fields are recorded in :attr:`overrides`."""
        from .config import coerce_fields

        known = {f.name for f in fields(self)} - {"name", "overrides"}
        bad = set(kw) - known
        if bad:
            raise ValueError(f"unknown profile fields {sorted(bad)}; known: {sorted(known)}")
        nulls = {k for k, v in kw.items() if isinstance(v, str) and v == NULL}
        for k in sorted(nulls):
            if type(None) not in typing.get_args(typing.get_type_hints(Profile)[k]):
                raise ValueError(f"profile field {k!r} cannot be null (None)")
        kw = {**coerce_fields(Profile, {k: v for k, v in kw.items() if v is not None and k not in nulls}),
              **dict.fromkeys(nulls)}
        out = replace(self, **kw)
        _check_names(out, set(kw))
        if {"qat_recipe", "qat_overrides"} & set(kw):  # a misspelt recipe field fails now, not at the first QAT row
            from .recipe import QATRecipe

            QATRecipe.load(out.qat_recipe, out.qat_overrides)
        base = PROFILES.get(self.name)
        changed = {**self.overrides, **{k: v for k, v in kw.items() if v != getattr(self, k)}}
        if base is not None:  # a value set back to the named profile's is no override
            changed = {k: v for k, v in changed.items() if v != getattr(base, k)}
        # a field set to None is recorded as NULL: overrides travel as JSON (papermill) and a None would be ignored
        out.overrides = {k: NULL if v is None else v for k, v in sorted(changed.items())}
        return out


def _unknown(field_name: str, names: list[str] | None, known: list[str]) -> str | None:
    """The message for the first name of ``names`` not in ``known`` (with the closest known spelling), else None."""
    import difflib

    for n in names or []:
        if n not in known:
            folded = {k.lower(): k for k in known}
            close = [folded[c] for c in difflib.get_close_matches(str(n).lower(), list(folded), n=1, cutoff=0.6)]
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"Profile.{field_name}: unknown method {n!r}{hint} (known: {', '.join(known)})"
    return None


def _check_names(profile: "Profile", changed: set[str]) -> None:
    """ValueError for an overridden ``methods`` / ``full_eval_methods`` naming no method of
    :data:`rcp_lib.experiments.methods.NAMED` (a misspelt name would silently select no row), or a ``settings``
    entry that is not a ``W<w>A<a>KV<kv>`` name."""
    import re

    if changed & {"methods", "full_eval_methods", "zero_shot_methods"}:
        from .experiments.methods import NAMED

        for f in ("methods", "full_eval_methods", "zero_shot_methods"):
            msg = _unknown(f, getattr(profile, f), list(NAMED))
            if msg:
                raise ValueError(msg)
    if "settings" in changed:
        for s in profile.settings:
            if not isinstance(s, str) or not re.fullmatch(r"W\d+A\d+KV\d+", s):
                raise ValueError(f"Profile.settings: {s!r} is not a setting name like 'W2A4KV4'")


#: the rows of the ``cpu`` profile's tables: every named method of the tables but the equal-bits rival
#: (rcp_lib.experiments.methods.EQUAL_BITS, W2A4KV4 only), which the ``ablation`` profile runs with seeds, and the
#: GSR controls (BlockHadamard-GPTQ; RCP+GSR, whose control RCP+BlockHadamard is a seeded ablation), which the
#: ``ablation`` profile's GSR decision and ``--set methods=[...]`` hold: one seed of a pair decides nothing
CPU_METHODS = ("FP", "RTN", "QuaRot-RTN", "QuaRot-GPTQ", "QuaRot-GPTQ static", "GSR-GPTQ",
               "RCP", "Uniform-QAT", "RCP w/o Clip", "RCP w/o Rotate", "RCP levels frozen",
               "RCP clip frozen", "RCP+BlockHadamard")

PROFILES: dict[str, Profile] = {
    # the pipeline check (make test runs every notebook with it): the first 4 of the embedded model's 30 decoder
    # layers (real weights, rcp_lib.models.split_model_name), tiny windows and budgets; a number of it means nothing
    "smoke": Profile(
        name="smoke", model="smollm2-135m@layers=4", seqlen=128, eval_windows=2, calib_windows=4, calib_seqlen=128, qat_steps=2, qat_seqlen=64,
        qat_val_every=2, full_eval_methods=[], analysis_layers=[0],
        analysis_rotations=["none", "gsr:64", "block_hadamard:64"], zero_shot_limit=8,
        settings=["W2A4KV4"], methods=["FP", "QuaRot-GPTQ", "RCP"], gsr_weight_groups=[], search_seeds=[0],
        search_points=1, search_curve_length=4,
    ),
    # the seeded ablation rows run in the ``ablation`` profile (its seed 0 shares the cpu rows' cache keys)
    # budget (issue 15: a cold `make reproduce` within 75 minutes on 2 cores): the rotation analysis on every third
    # decoder layer of 30 (0, 3, ..., 27: the whole depth, a third of the single-threaded cost) and the whole test
    # split for FP, RCP and QuaRot-GPTQ only (the sample / whole check of the spread windows, about 6 min a
    # quantized row; the gpu profile scores every row on the whole split)
    # and (issue 35: the extra rows go to the ablation profile) the equal-bits rival (Uniform-QAT g32, W2A4KV4 only),
    # which the ``ablation`` profile runs with seeds, is left to it: about 13 of the 121 min measured at fb9e844; and
    # (about 19 min more) the GSR pairs, one seed of which decides nothing: BlockHadamard-GPTQ (W2A4KV4, W2A16KV16)
    # and RCP+GSR. GSR is decided by the ablation profile's gsr_decision (three seeds: GSR's R1 on 4-bit activations,
    # and GSR-GPTQ against BlockHadamard-GPTQ at W2A16KV16 with groups smaller than the block); the pairs at W2A4KV4,
    # GSR-GPTQ / BlockHadamard-GPTQ and RCP+GSR / RCP+BlockHadamard, run with --set 'methods=[...]' in either profile.
    # QuaRot-GPTQ static and Uniform-QAT stay at every setting (their W2A16KV16 / W4A4KV4 rows are in no other
    # cpu-sized table); the seeded ablations stay out through qat_ablation_rows=False
    "cpu": Profile(name="cpu", qat_ablation_rows=False, analysis_layers=list(range(0, 30, 3)),
                   full_eval_methods=["FP", "RCP", "QuaRot-GPTQ"], methods=list(CPU_METHODS)),
    # one CUDA GPU: QAT 400 steps x 4 x 512 tokens = 819,200 (80x the cpu profile's 40 x 1 x 256 = 10,240), the whole
    # test split for perplexity, 64 calibration windows of 512; the models of the cpu profile otherwise, every method of
    # the tables (the seeded ablations and the equal-bits row included)
    "gpu": Profile(
        name="gpu", device="cuda", eval_windows=None, calib_windows=64, qat_steps=400, qat_seqlen=512,
        qat_batch_size=4, qat_grad_accum=1, qat_val_every=100, zero_shot_limit=None, ablation_seeds=[0, 1, 2],
    ),
    "ablation": Profile(
        name="ablation", settings=["W2A4KV4"], full_eval_methods=[], ablation_seeds=[0, 1, 2],
        notebooks=["06_ablation.ipynb"],
        # zero-shot on every document (issue 35), seed 0, for the pairs the README tests with McNemar: RCP against
        # the best PTQ row and the fair QAT rival, FP, and RTN (a broken model: the measured floor)
        zero_shot_limit=None, zero_shot_methods=["RCP", "QuaRot-GPTQ", "Uniform-QAT", "FP", "RTN"],
        # RCP against the fair rival (uniform-grid QAT, same start / budget / learning rates), the equal-bits rival
        # (Uniform-QAT g32: 3.0 bits per weight, as LDP at group 64), with each learnable part frozen at its start, and
        # the best PTQ rows, each once per seed (issue 35); the earlier ablations (w/o Clip, w/o Rotate, GSR,
        # block-Hadamard) are methods of their own and join with --set methods=[...] (results/ablation-<hash>/)
        methods=["RCP", "Uniform-QAT", "RCP levels frozen", "RCP clip frozen", "Uniform-QAT g32", "QuaRot-GPTQ",
                 "QuaRot-GPTQ static"],
    ),
    "paper": Profile(
        name="paper", model="meta-llama/Llama-2-7b-hf", corpus="wikitext2", device="cuda", seqlen=2048,
        eval_windows=None, calib_windows=128, calib_seqlen=2048, w_group_size=128, qat_steps=8000, qat_seqlen=2048,
        qat_batch_size=1, qat_grad_accum=8, qat_val_every=500, full_eval_methods=[],
        # the yaml's recipe (the searched start, no GPTQ start, lr_quant 1e-3): LWC relative to the latent weight, not
        # the cpu choice's static range (absolute lo / hi would move 1e-3 per step)
        qat_recipe="configs/paper-llama2-7b.yaml",
        zero_shot_tasks=["arc_challenge", "arc_easy", "hellaswag", "piqa", "winogrande", "boolq", "lambada_openai"],
        zero_shot_limit=None,
    ),
}


def get_profile(name: str, **overrides) -> Profile:
    """A named profile with optional field overrides (None values are ignored)."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[name].with_overrides(**overrides)


def parse_set_items(items: list[str] | None) -> dict:
    """``--set`` items of the command lines -> profile overrides for :func:`get_profile`:
    ``["qat_steps=160", 'methods=["RCP"]', "zero_shot_limit=null"]`` -> ``{"qat_steps": 160, "methods": ["RCP"],
    "zero_shot_limit": NULL}`` (values parsed as JSON where possible, else kept as strings; ``null`` becomes
    :data:`NULL`, which sets the field to None, where a plain None changes nothing). ValueError for an item without
    ``=``."""
    import json

    out: dict = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
        if out[key] is None:
            out[key] = NULL
    return out
