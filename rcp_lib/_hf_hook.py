"""Register rcp_lib's transformers quantization method ("rcp", :mod:`rcp_lib.hf`) as soon as transformers' quantizer
registry is imported, without importing transformers here.

``import rcp_lib`` must stay free of Hugging Face imports (the notebooks' :func:`rcp_lib.experiments.setup` sets the
offline defaults before any of them reads its environment). :func:`install` registers at once when
``transformers.quantizers.auto`` is already imported, else puts a one-shot finder first on ``sys.meta_path`` that
registers right after that module has executed; ``from_pretrained`` imports it before it reads a config.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

TARGET = "transformers.quantizers.auto"


def _register() -> None:
    from .hf import register

    register()


class _RegisterAfter(importlib.abc.Loader):
    """Wraps the real loader of :data:`TARGET`: executes it, then registers."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET:
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]  # one shot
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfter(spec.loader)
        return spec


def install() -> None:
    """Register now if transformers' quantizer registry is loaded, else when it is (idempotent)."""
    if TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
