import os
from pathlib import Path

# Hub and dataset look-ups must fail fast in tests (offline by design).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests run from dirty checkouts during development and write results/smoke/: allow that for the session
# (rows record `allow_dirty` in their provenance). Tests of the refusal itself unset it with monkeypatch.
os.environ["RCP_ALLOW_DIRTY"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402


#: the tiers (``make test-fast`` runs the first): a test is ``integration`` when its file is under
#: ``tests/integration/`` (notebooks, the command line, several processes, the embedded model throughout), when it uses
#: one of these fixtures (it loads the real embedded model) or when it carries ``@pytest.mark.integration``;
#: everything else, short single-subprocess checks included, is a unit test of a pure function or a tiny synthetic
#: model. ``heavy`` (a unit test that takes seconds: a tiny model trained end to end, a kernel under the interpreter
#: at a realistic shape, a compile for sm_90, a subprocess; ``make test`` runs it, ``make test-fast`` does not) and
#: ``slow`` (minutes; ``make test-slow``) are marked in the test itself.
INTEGRATION_FIXTURES = frozenset({"embedded", "excerpt_test_ids", "real_text_ids"})
INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_FIXTURES & set(item.fixturenames) or INTEGRATION_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


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
