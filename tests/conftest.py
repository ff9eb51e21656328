import os

# Hub and dataset look-ups must fail fast in tests (offline by design).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests run from dirty checkouts during development and write results/smoke/: allow that for the session
# (rows record `allow_dirty` in their provenance). Tests of the refusal itself unset it with monkeypatch.
os.environ["RCP_ALLOW_DIRTY"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from checkout_kernels import install as _install_checkout_kernels  # noqa: E402

# `rcp_lib.kernels` from this checkout's kernels/ even when another checkout is installed (see checkout_kernels.py)
_install_checkout_kernels()


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2-135M (float32) and its tokenizer, loaded once per test session."""
    from rcp_lib.models import load

    return load("smollm2-135m")


@pytest.fixture(scope="session")
def excerpt_test_ids(embedded):
    from rcp_lib.data import corpus_tokens

    return corpus_tokens(embedded[1], "wiki-excerpt", "test")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
