"""Where things live: the source checkout, and the roots that runs write into (results, figures, executed notebooks).

Every path of the library comes from here, so nothing writes into the source tree by accident:

* :data:`REPO_ROOT` is the folder above the ``rcp_lib`` package. It is a *source checkout* (:func:`in_checkout`)
  when it holds ``pyproject.toml`` and ``notebooks/``: an editable install or ``PYTHONPATH`` on a clone. Read-only
  uses (the notebooks, ``configs/``, git status, ``README.md``) go through it.
* Output roots, each overridable by an environment variable (absolute paths recommended; a relative one is taken
  from the current directory of the process that reads it, so :func:`absolutize_env` fixes it before notebook
  kernels start in ``notebooks/``):

  ======================  =======================  ===================================================
  root                    variable                 default (only inside a source checkout)
  ======================  =======================  ===================================================
  :func:`results_root`    ``$RCP_RESULTS_DIR``     ``<checkout>/results`` (tables: ``<root>/<run name>/``)
  :func:`figures_root`    ``$RCP_FIGURES_DIR``     ``<checkout>/figures`` (figures: ``<root>/<run name>/``)
  :func:`runs_root`       ``$RCP_RUNS_DIR``        ``<checkout>/runs`` (executed notebooks)
  ======================  =======================  ===================================================

  Outside a source checkout (a regular ``pip install``) there is no default: asking for a root without its
  variable raises :class:`OutputRootError` instead of writing next to ``site-packages``.

The per-profile folder is the profile's :attr:`~rcp_lib.profiles.Profile.run_name`: its name, or
``<name>-<8 hex digits>`` for a profile with overrides, so a modified run never overwrites the unmodified profile's
files.

Caches (models, tokenized corpora, result rows) live outside the repository, under
:func:`cache_dir` (``$RCP_CACHE``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .profiles import Profile

#: the folder above the ``rcp_lib`` package (a source checkout when :func:`in_checkout`)
REPO_ROOT: Path = Path(__file__).resolve().parent.parent
RESULTS_ENV = "RCP_RESULTS_DIR"
FIGURES_ENV = "RCP_FIGURES_DIR"
RUNS_ENV = "RCP_RUNS_DIR"
_DEFAULTS = {RESULTS_ENV: "results", FIGURES_ENV: "figures", RUNS_ENV: "runs"}


class OutputRootError(RuntimeError):
    """An output root was asked for outside a source checkout without its environment variable."""


def in_checkout() -> bool:
    """True when :data:`REPO_ROOT` is a source checkout of this project (``pyproject.toml`` and ``notebooks/``)."""
    return (REPO_ROOT / "pyproject.toml").is_file() and (REPO_ROOT / "notebooks").is_dir()


def _root(env: str) -> Path:
    value = os.environ.get(env)
    if value:
        return Path(value).expanduser()
    if in_checkout():
        return REPO_ROOT / _DEFAULTS[env]
    raise OutputRootError(f"rcp_lib does not run from a source checkout ({REPO_ROOT}), so there is no default "
                          f"{_DEFAULTS[env]}/ folder: set ${env} to the folder to write into")


def results_root() -> Path:
    """Root of the result tables: ``$RCP_RESULTS_DIR``, else ``<checkout>/results``."""
    return _root(RESULTS_ENV)


def figures_root() -> Path:
    """Root of the figures: ``$RCP_FIGURES_DIR``, else ``<checkout>/figures``."""
    return _root(FIGURES_ENV)


def runs_root() -> Path:
    """Root of the executed notebook copies: ``$RCP_RUNS_DIR``, else ``<checkout>/runs``."""
    return _root(RUNS_ENV)


def _profile_name(profile: str | Profile) -> str:
    """The output folder name: a name as given, or a profile's :attr:`~rcp_lib.profiles.Profile.run_name`
    (``<name>-<hash of its overrides>`` when fields were overridden)."""
    return profile if isinstance(profile, str) else profile.run_name


#: a file in a model folder that marks its weights as random (the dry-run's stand-in): never written into results/
RANDOM_WEIGHTS_MARKER = "rcp_random_weights.json"


class RandomWeightsOutputError(RuntimeError):
    """A profile whose model has random weights (a dry-run stand-in) would write into the checkout's results/."""


def _refuse_random_weights(profile: str | Profile, d: Path) -> Path:
    model = getattr(profile, "model", None)
    if model and (Path(str(model)) / RANDOM_WEIGHTS_MARKER).is_file():
        for root in (REPO_ROOT / "results", REPO_ROOT / "figures"):
            try:
                d.resolve().relative_to(root.resolve())
            except ValueError:
                continue
            raise RandomWeightsOutputError(
                f"{model} holds random weights (a dry-run stand-in): its outputs never go to {root}; set "
                "RCP_RESULTS_DIR / RCP_FIGURES_DIR to a temporary folder (reproduce --dry-run does)")
    return d


def results_dir(profile: str | Profile) -> Path:
    """``results_root()/<profile>`` for a profile or a profile name (not created). Raises
    :class:`RandomWeightsOutputError` for a random-weights model when that folder is in the checkout's results/."""
    return _refuse_random_weights(profile, results_root() / _profile_name(profile))


def figures_dir(profile: str | Profile) -> Path:
    """``figures_root()/<profile>`` for a profile or a profile name, created if missing (random-weights models:
    never in the checkout's figures/, see :func:`results_dir`)."""
    d = _refuse_random_weights(profile, figures_root() / _profile_name(profile))
    d.mkdir(parents=True, exist_ok=True)
    return d


def runs_dir(profile: str | Profile) -> Path:
    """``runs_root()/<profile>`` for a profile or a profile name (not created)."""
    return runs_root() / _profile_name(profile)


def notebooks_dir() -> Path:
    """The notebooks of the source checkout (read, never written: executed copies go to :func:`runs_dir`)."""
    return REPO_ROOT / "notebooks"


def readme_path() -> Path:
    """The checkout's ``README.md`` (its generated results block is rewritten by ``python -m rcp_lib readme``)."""
    return REPO_ROOT / "README.md"


def is_under_results(path: str | os.PathLike) -> bool:
    """True when ``path`` lies under :func:`results_root` (False when there is no results root)."""
    try:
        root = results_root()
    except OutputRootError:
        return False
    try:
        Path(path).resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def absolutize_env() -> None:
    """Make the output-root variables that are set absolute (from the current directory), so that processes
    started elsewhere (notebook kernels run in ``notebooks/``) write to the same folders."""
    for env in _DEFAULTS:
        value = os.environ.get(env)
        if value:
            os.environ[env] = str(Path(value).expanduser().resolve())


def cache_dir() -> Path:
    """Folder for caches (dequantized model, tokenized corpora, trained models). Outside the repo.

    ``$RCP_CACHE`` if set, else ``$XDG_CACHE_HOME/rcp_lib`` or ``~/.cache/rcp_lib``.
    """
    env = os.environ.get("RCP_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rcp_lib"
