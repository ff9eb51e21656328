"""Kernel tests run the Triton kernel on CPU through the triton interpreter (correctness only).

triton 3.9 reads ``TRITON_INTERPRET`` when ``triton.jit`` decorates a function (``triton.knobs.runtime.interpret``
reads the environment on every access), and ``rcp_lib.kernels.triton_gemv`` decorates its kernel lazily at the
first launch, so setting the variable per test (monkeypatch) is enough even if triton was already imported.
The variable is set only for the tests of this folder; ``test_gemv.py`` also runs the kernel in a subprocess
that has it from the start.
"""

import pytest


@pytest.fixture(autouse=True)
def _triton_interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("RCP_KERNEL_BACKEND", raising=False)
