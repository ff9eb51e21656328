"""Make ``rcp_lib.kernels`` resolve to the ``kernels/`` folder of the checkout whose ``rcp_lib`` is imported.

``kernels/`` is mapped to ``rcp_lib.kernels`` by the setuptools ``package-dir`` of an install. A second checkout (a
git worktree) tested through ``PYTHONPATH`` next to an editable install of another checkout would otherwise import
its own ``rcp_lib`` but the *installed* checkout's ``kernels/``, silently testing the wrong code. :func:`install`
puts a finder first on ``sys.meta_path`` that maps ``rcp_lib.kernels`` to this checkout's folder when ``rcp_lib``
comes from this checkout; elsewhere (an installed package, the installed checkout itself) it changes nothing.
Used by ``tests/conftest.py`` and by the tests that start a Python subprocess.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class _CheckoutKernelsFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "rcp_lib.kernels":
            return None
        rcp = sys.modules.get("rcp_lib")
        init = ROOT / "kernels" / "__init__.py"
        if rcp is None or getattr(rcp, "__file__", None) is None or not init.exists():
            return None
        if Path(rcp.__file__).resolve().parent != ROOT / "rcp_lib":
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


def install() -> None:
    """Idempotent."""
    if _CheckoutKernelsFinder not in sys.meta_path and not any(
        getattr(f, "__name__", "") == "_CheckoutKernelsFinder" for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _CheckoutKernelsFinder)
