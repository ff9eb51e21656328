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


@pytest.fixture
def tiny_experiment(monkeypatch, tmp_path):
    """The experiments' model and scores on a tiny random LLaMA (hidden 64, MLP 128, 2 layers; tests only): the
    profile's base model, its test perplexity (the loss on 128 fixed tokens, each scored model appended to the
    returned list), its calibration windows and its model sizes are patched in :mod:`rcp_lib.experiments.build`
    and :mod:`rcp_lib.models`, and the cache is a fresh folder. Returns ``(fp model, scored models)``."""
    import importlib
    import math

    import torch

    from rcp_lib import models as M

    B = importlib.import_module("rcp_lib.experiments.build")  # the module (the package exports a function "build")
    monkeypatch.setenv("RCP_CACHE", str(tmp_path))
    fp = M.tiny_llama(hidden=64, intermediate=128, heads=2, kv_heads=1, layers=2, vocab=128, seed=0)
    data = torch.randint(0, 128, (1, 512), generator=torch.Generator().manual_seed(3))
    seen = []

    def ppl(model, profile, progress):
        seen.append(model)
        with torch.no_grad():
            out = model(input_ids=data[:, :128], labels=data[:, :128])
        return float(math.exp(out.loss))

    monkeypatch.setattr(B, "base_model", lambda profile: (fp, None))
    monkeypatch.setattr(B, "_test_ppl", ppl)
    monkeypatch.setattr(B, "calibration", lambda profile: torch.randint(
        0, 128, (4, 32), generator=torch.Generator().manual_seed(profile.seed)))
    monkeypatch.setattr(M, "model_dims", lambda name: M.dims(fp))
    return fp, seen
