import pytest
import torch

from rcp_lib import data


@pytest.mark.heavy
def test_splits_are_disjoint_and_deterministic():
    train = data.wiki_excerpt_split("train")
    test = data.wiki_excerpt_split("test")
    assert {a.title for a in train}.isdisjoint({a.title for a in test})
    n = len(train) + len(test)
    assert 95 <= n <= 110  # ~106 real articles in the excerpt
    assert 0.15 <= len(test) / n <= 0.25
    data.wiki_excerpt_articles.cache_clear()
    assert [a.title for a in data.wiki_excerpt_split("test")] == [a.title for a in test]
    assert data.load_corpus("wiki-excerpt", "test") == data.load_corpus("wiki-excerpt", "test")


def test_cleaning_and_size():
    for split, lo, hi in (("train", 300_000, 450_000), ("test", 50_000, 130_000)):
        text = data.load_corpus("wiki-excerpt", split)
        for bad in ("[[", "]]", "{{", "}}", "<ref", "'''"):
            assert bad not in text, (split, bad)
        assert lo <= len(text.split()) <= hi
        assert text.lstrip().startswith("= ")  # WikiText-style title heading


def test_unknown_corpus_and_split():
    with pytest.raises(ValueError, match="wiki-excerpt"):
        data.load_corpus("c5", "test")
    with pytest.raises(ValueError, match="split"):
        data.load_corpus("wiki-excerpt", "validation2")


def test_wikitext2_offline_fails_fast_with_hint(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t = time.time()
    try:
        data.load_corpus("wikitext2", "test")
    except data.CorpusUnavailableError as e:
        assert "wiki-excerpt" in str(e)
    else:  # a populated local HF cache is allowed to serve it
        pytest.skip("WikiText-2 is available from a local cache")
    assert time.time() - t < 30


def test_calibration_windows_deterministic():
    ids = torch.arange(10_000).unsqueeze(0)
    a = data.calibration_windows(ids, 8, 128, seed=3)
    b = data.calibration_windows(ids, 8, 128, seed=3)
    c = data.calibration_windows(ids, 8, 128, seed=4)
    assert a.shape == (8, 128) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous windows
    with pytest.raises(ValueError):
        data.calibration_windows(ids[:, :100], 1, 128)


def test_holdout_split():
    ids = torch.arange(1000).unsqueeze(0)
    tr, va = data.split_holdout(ids, 0.1)
    assert tr.numel() == 900 and va.numel() == 100 and tr[0, -1] + 1 == va[0, 0]


def test_tokenized_corpus(embedded):
    tok = embedded[1]
    ids = data.corpus_tokens(tok, "wiki-excerpt", "test")
    assert ids.dim() == 2 and ids.shape[0] == 1 and ids.dtype == torch.long
    assert 100_000 < ids.shape[1] < 250_000
    assert torch.equal(ids, data.corpus_tokens(tok, "wiki-excerpt", "test"))
