"""Zero-shot evaluation: offline task construction (deterministic, leak-free) and lm_eval runs."""

from __future__ import annotations

import re
import time

import pandas as pd
import pytest

from rcp_lib.data import wiki_excerpt_split
from rcp_lib.evaluation.offline_tasks import (
    OFFLINE_TASKS,
    article_sentences,
    build_offline_tasks,
    load_docs,
    make_nextsent_docs,
    manifest,
    position_class,
    split_sentences,
    train_sentences,
)
from rcp_lib.evaluation.zero_shot import (
    AVERAGE_METRIC,
    ZeroShotDataUnavailableError,
    average_accuracy,
    zero_shot,
)


@pytest.fixture(scope="module")
def task_dir():
    return build_offline_tasks()


@pytest.fixture(scope="module")
def splits():
    test = {a.title: a.text for a in wiki_excerpt_split("test")}
    train = {a.title: a.text for a in wiki_excerpt_split("train")}
    return test, train


def test_sentence_splitter_rules():
    text = "E. E. Evans-Pritchard wrote it in 1937. Dr. Smith agreed (c. 1950). Was it true? \"Yes.\" The end."
    assert split_sentences(text) == [
        "E. E. Evans-Pritchard wrote it in 1937.",
        "Dr. Smith agreed (c. 1950).",
        "Was it true?",
        '"Yes."',
        "The end.",
    ]


def test_build_is_deterministic(tmp_path):
    a = build_offline_tasks(n_max=300, seed=0, out_dir=tmp_path / "a")
    b = build_offline_tasks(n_max=300, seed=0, out_dir=tmp_path / "b")
    c = build_offline_tasks(n_max=300, seed=1, out_dir=tmp_path / "c")
    for task in OFFLINE_TASKS:
        ja, jb = (a / f"{task}.jsonl").read_bytes(), (b / f"{task}.jsonl").read_bytes()
        assert ja == jb and len(ja) > 0
        assert str((a / f"{task}.jsonl").resolve()) in (a / f"{task}.yaml").read_text()  # absolute data path
    assert (a / "wiki_nextsent.jsonl").read_bytes() != (c / "wiki_nextsent.jsonl").read_bytes()  # seed matters
    m = manifest(a)
    assert m["tasks"]["wiki_lastword"]["n_docs"] == 300 and m["tasks"]["wiki_nextsent"]["n_docs"] == 300


def test_task_sizes_recorded(task_dir):
    m = manifest(task_dir)
    for task in OFFLINE_TASKS:
        n = m["tasks"][task]["n_docs"]
        assert 300 <= n <= 1000, (task, n)
        assert len(load_docs(task_dir, task)) == n


def test_lastword_docs_are_real_test_text(task_dir, splits):
    test, train = splits
    train_text = "\n".join(train.values())
    docs = load_docs(task_dir, "wiki_lastword")
    for d in docs:
        assert d["article"] in test and d["article"] not in train
        assert d["passage"] in test[d["article"]]  # verbatim text of its (test) source article
        assert d["passage"].startswith(d["context"] + d["target"])
        word = d["target"][1:]
        assert d["target"][0] == " " and word.isalpha() and len(word) >= 3
        assert len(d["passage"].split()) >= 40
        assert d["context"] not in train_text  # no leak into the train split
    assert len({d["id"] for d in docs}) == len(docs)


def test_nextsent_docs_distractors_from_the_same_article(task_dir, splits):
    test, train = splits
    train_text = "\n".join(train.values())
    docs = load_docs(task_dir, "wiki_nextsent")
    labels = [d["label"] for d in docs]
    for d in docs:
        assert d["article"] in test and d["article"] not in train
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
        gold = d["choices"][d["label"]]
        assert re.search(re.escape(d["context"]) + r"\s+" + re.escape(gold), test[d["article"]])  # true next sentence
        assert d["choice_articles"] == [d["article"]] * 4
        paragraph = next(p for p in test[d["article"]].split("\n") if d["context"] in p)
        for i, text in enumerate(d["choices"]):
            assert text in test[d["article"]] and text not in train_text
            if i != d["label"]:
                assert text not in paragraph  # another paragraph of the same article
        assert d["context"] not in train_text
    # the gold position varies and is roughly uniform
    counts = pd.Series(labels).value_counts()
    assert set(counts.index) == {0, 1, 2, 3} and counts.min() > 0.15 * len(docs)


def test_nextsent_word_overlap_cue_gives_chance(task_dir):
    # Version 3 drew distractors from other articles: the candidate sharing the most words with the context was
    # the gold in 78 % of the documents. Now distractors are matched on that overlap, so the rule is near chance
    # (ties go to the first candidate, which is gold in about a quarter of the documents).
    from rcp_lib.evaluation.offline_tasks import content_words

    docs = load_docs(task_dir, "wiki_nextsent")
    ov = lambda d, j: len(content_words(d["context"]) & content_words(d["choices"][j]))  # noqa: E731
    hits = sum(max(range(4), key=lambda j: (ov(d, j), -j)) == d["label"] for d in docs)
    assert hits / len(docs) < 0.40, hits / len(docs)


@pytest.fixture(scope="module")
def test_sentences():
    """Usable sentences of the test articles (train sentences excluded), as the builder sees them."""
    test, train = wiki_excerpt_split("test"), wiki_excerpt_split("train")
    sents = article_sentences(test, train_sentences(train))
    return test, [s for paras in sents for para in paras for s in para if s is not None]


def test_nextsent_distractors_match_gold_form(task_dir, test_sentences):
    # Version 2 drew distractors from any sentence, paragraph openers included, while the gold never opens
    # a paragraph: a model with perplexity ~1e6 scored 0.42 (chance 0.25) from that form cue alone.
    articles, usable = test_sentences
    where: dict[tuple[str, str], set[int]] = {}  # (article title, sentence) -> positions in its paragraph(s)
    for s in usable:
        where.setdefault((articles[s.article].title, s.text), set()).add(s.position)
    docs = load_docs(task_dir, "wiki_nextsent")
    n_openers = 0
    for d in docs:
        positions = d["choice_positions"]
        assert position_class(positions[d["label"]]) == 2  # the gold follows 2-3 context sentences
        for text, art, pos in zip(d["choices"], d["choice_articles"], positions):
            assert pos in where[(art, text)]  # the recorded position is the real one (independent re-split)
            assert position_class(pos) == position_class(positions[d["label"]])
            n_openers += pos == 0
    assert n_openers == 0 and len(docs) > 300


def test_nextsent_position_cue_gives_chance(task_dir, test_sentences):
    # A "model" that only knows where sentences sit in their paragraphs (prefers the candidate that is
    # rarely a paragraph opener anywhere in the corpus) must not beat chance: all candidates tie, so it
    # picks index 0, which is gold in about a quarter of the documents.
    articles, usable = test_sentences
    min_pos: dict[str, int] = {}
    for s in usable:
        min_pos[s.text] = min(min_pos.get(s.text, 99), s.position)
    docs = load_docs(task_dir, "wiki_nextsent")
    hits = sum(max(range(4), key=lambda i: (min(min_pos[d["choices"][i]], 2), -i)) == d["label"] for d in docs)
    assert abs(hits / len(docs) - 0.25) < 0.06, hits / len(docs)


def test_nextsent_builder_is_seeded():
    test, train = wiki_excerpt_split("test"), wiki_excerpt_split("train")
    banned = train_sentences(train)
    a, na = make_nextsent_docs(test, n_max=100, seed=3, banned=banned)
    b, nb = make_nextsent_docs(test, n_max=100, seed=3, banned=banned)
    c, _ = make_nextsent_docs(test, n_max=100, seed=4, banned=banned)
    assert a == b and na == nb and len(a) == 100
    assert a != c


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError) as e:
        zero_shot(None, None, tasks=["no_such_task_xyz"])
    msg = str(e.value)
    assert "no_such_task_xyz" in msg and "wiki_nextsent" in msg and "arc_easy" in msg


def test_standard_task_offline_fails_fast():
    t0 = time.perf_counter()
    with pytest.raises(ZeroShotDataUnavailableError) as e:
        zero_shot(None, None, tasks=["wiki_nextsent", "piqa"])
    assert time.perf_counter() - t0 < 5.0
    msg = str(e.value)
    assert "piqa" in msg and "wiki_lastword" in msg and "offline" in msg


def test_average_accuracy_uses_flagged_rows():
    df = pd.DataFrame(
        [
            {"task": "a", "metric": "acc", "value": 0.2, "used_in_average": False},
            {"task": "a", "metric": "acc_norm", "value": 0.4, "used_in_average": True},
            {"task": "b", "metric": "acc", "value": 0.8, "used_in_average": True},
            {"task": "b", "metric": "perplexity", "value": 12.0, "used_in_average": False},
        ]
    )
    assert average_accuracy(df) == pytest.approx(0.6)
    with pytest.raises(ValueError):
        average_accuracy(pd.concat([df, df]))
    assert AVERAGE_METRIC["wiki_nextsent"] == "acc_norm" and AVERAGE_METRIC["wiki_lastword"] == "acc"


def test_random_tiny_model_is_near_chance(embedded):
    from rcp_lib.models import tiny_llama

    tok = embedded[1]
    model = tiny_llama(hidden=64, intermediate=128, layers=1, heads=2, kv_heads=1, vocab=49152)
    df = zero_shot(model, tok, tasks=["wiki_nextsent"], limit=200, batch_size=16, config={"model": "tiny-random"})
    assert set(df.columns) >= {"task", "metric", "value", "stderr", "n_examples", "used_in_average", "lm_eval_version", "config"}
    ns = df.set_index("metric")
    assert set(ns.index) == {"acc", "acc_norm"}
    assert (ns["n_examples"] == 200).all()
    # a random-weight model: chance level 0.25 within 0.12
    assert abs(ns.loc["acc", "value"] - 0.25) < 0.12
    assert abs(ns.loc["acc_norm", "value"] - 0.25) < 0.12
    assert 0.0 < ns.loc["acc", "stderr"] < 0.05
    assert df["config"].iloc[0] == '{"model": "tiny-random"}'
    assert df.loc[df.used_in_average, "metric"].tolist() == ["acc_norm"]
    # per-document outcomes (for McNemar between rows): one 0/1 per document, their mean is the accuracy
    for metric in ("acc", "acc_norm"):
        per_doc = ns.loc[metric, "per_doc"]
        assert len(per_doc) == 200 and set(per_doc) <= {"c", "w"}
        assert per_doc.count("c") / 200 == pytest.approx(ns.loc[metric, "value"], abs=1e-12)
    assert len(ns.loc["acc", "docs_sha256"]) == 64 and ns.loc["acc", "docs_sha256"] == ns.loc["acc_norm", "docs_sha256"]

    lw = zero_shot(model, tok, tasks=["wiki_lastword"], limit=50, batch_size=16).set_index("metric")
    assert set(lw.index) == {"acc", "perplexity"}
    assert lw.loc["perplexity", "per_doc"] == "" and len(lw.loc["acc", "per_doc"]) == 50  # outcomes: accuracies only
    assert lw.loc["acc", "value"] < 0.05  # a random model does not predict the word
    assert lw.loc["perplexity", "value"] > 1000  # measured ~1.2e5: vocabulary-sized perplexity per word
    assert average_accuracy(pd.concat([df, lw.reset_index()])) == pytest.approx((ns.loc["acc_norm", "value"] + lw.loc["acc", "value"]) / 2)


def test_embedded_model_beats_chance(embedded):
    # builder v4 (same-article distractors matched on word overlap), FP embedded model: acc_norm 0.47 +- 0.05 on
    # the first 100 docs (0.48 +- 0.035 on 200); chance 0.25
    model, tok = embedded
    df = zero_shot(model, tok, tasks=["wiki_nextsent"], limit=100, batch_size=8).set_index("metric")
    acc, se = df.loc["acc_norm", "value"], df.loc["acc_norm", "stderr"]
    assert acc - 0.25 > 3 * se, df
