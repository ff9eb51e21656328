"""Offline zero-shot tasks built from the wiki-excerpt TEST articles, run as local lm_eval tasks.

The standard zero-shot suite of the quantization papers (ARC, HellaSwag, PIQA, WinoGrande, BoolQ,
LAMBADA) needs data sets from the Hugging Face hub. Where those cannot be downloaded, the two tasks below
measure the same kind of degradation (a quantized model ranking real continuations worse than its
full-precision parent) on real Wikipedia text. They are built only from the *test* articles of the
``wiki-excerpt`` corpus (:func:`rcp_lib.data.wiki_excerpt_split`); train and test are disjoint by article,
so the text was never seen by the model during QAT/calibration on the train split. As an extra guard,
every sentence that also occurs verbatim in a train article is excluded (no passage, context, target or
distractor contains such a sentence). No sentence is made up: every string of a document is a verbatim
piece of one test article.

Sentence splitting (deterministic, documented, deliberately simple):

* Each article is cut into lines; heading lines (those starting with ``" = "``, WikiText-raw style) are
  skipped; every other line is a paragraph.
* A paragraph is split with the regex :data:`SENTENCE_BOUNDARY`: after ``.``, ``!`` or ``?`` (optionally
  followed by a closing quote/bracket) and whitespace, when the next character is an upper-case letter,
  a digit or an opening quote/bracket. A boundary is ignored when the word ending with the period is a
  single letter (initials such as ``"E. E. Evans"``) or a known abbreviation (:data:`ABBREVIATIONS`).
* A sentence is *usable* if it has 5..60 words, ends with ``.``, ``!`` or ``?`` (optionally followed by
  a closing quote/bracket), contains no ``" = "`` heading marker and does not occur in the train split.

Task 1, ``wiki_lastword`` (LAMBADA-style, ``output_type: loglikelihood``):
  passages of 2-5 consecutive usable sentences of one paragraph, at least :data:`LASTWORD_MIN_WORDS`
  words (grown sentence by sentence until reached, at most :data:`LASTWORD_MAX_WORDS`); windows do not
  overlap. The target is the passage's final word with its trailing punctuation removed; it must be
  alphabetic and at least 3 letters long (as in LAMBADA, where the target is a real word, not a number or
  symbol). ``context`` is the passage up to (not including) the space before that word; ``target`` is
  ``" " + word``. Metrics: ``acc`` (the whole target word is the greedy continuation) and ``perplexity``
  of the target word (exp of the mean negative log-likelihood of the target over documents).

Task 2, ``wiki_nextsent`` (HellaSwag-style, ``output_type: multiple_choice``):
  a context of 2 consecutive usable sentences of one paragraph (3 if the two have fewer than 25 words),
  followed by 4 candidates: the true next sentence of that paragraph and 3 distractors. A distractor must
  not be tellable from the gold by its *form* or by shallow word matching alone, so it is a real sentence
  of the SAME test article, from another paragraph, chosen as follows (builder version 4):

  * position class: the gold is never the first or second sentence of its paragraph (it follows 2-3
    context sentences), so a distractor is also a sentence at index >= :data:`NEXTSENT_MIN_POSITION` (2,
    i.e. the third sentence or later) of its own paragraph (:func:`position_class`). Paragraph openers
    introduce their subject by name and read differently; version 2 allowed them as distractors, and
    always preferring the candidate that never opens a paragraph picked the gold in 52 % of its documents;
  * word overlap: among those, the :data:`NEXTSENT_SAME_ARTICLE_POOL` (3) candidates whose number of
    shared content words with the context (:func:`content_words`) is closest to the gold's, then closest
    in character length, ties broken by the seeded generator. Version 3 drew distractors from other
    articles, where the gold alone shares names and words with its context: picking the candidate with
    the most shared words found the gold in 78 % of the documents, and plain RTN W2A4KV4 SmolLM2-135M
    (perplexity ~1e6) kept acc 0.33 +- 0.03 (chance 0.25) on the first 200 documents. With this version
    the word-overlap rule finds the gold in about a third of the documents (ties go to the first
    candidate), and the same broken model scores acc 0.32 +- 0.03 and acc_norm 0.255 +- 0.031, FP 0.47 /
    0.48 (first 200 documents; the task is harder than version 3, where FP scored 0.72).

  The gold index is drawn uniformly from 0..3 with the seeded generator. Windows (context + true next
  sentence) do not overlap. Each document also records the source article and the in-paragraph position
  of every choice (``choice_articles``, ``choice_positions``). Metrics: ``acc`` and ``acc_norm``
  (lm_eval's length-normalised accuracy; chance 0.25).

Both tasks keep at most ``n_max`` documents (a seeded sample, then restored to corpus order) and record
the number of candidates and documents per task in ``manifest.json`` next to the JSONL and YAML files.
The files live outside the repository, in ``rcp_lib.paths.cache_dir() / "lm_eval_tasks" / <hash>``, where
the hash covers the builder version, the parameters and the text of the source articles; the folder is
written to a temporary name and renamed, so readers never see a half-written task set.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OFFLINE_TASKS: tuple[str, ...] = ("wiki_lastword", "wiki_nextsent")
BUILDER_VERSION = 4  # 3: distractors never open a paragraph; 4: same article, matched on word overlap with the context
DEFAULT_N_MAX = 1000

LASTWORD_MIN_WORDS = 40
LASTWORD_MAX_WORDS = 150
LASTWORD_MAX_SENTENCES = 5
NEXTSENT_SHORT_CONTEXT_WORDS = 25
NEXTSENT_N_CHOICES = 4
NEXTSENT_NEAREST_POOL = 40
NEXTSENT_SAME_ARTICLE_POOL = 3
NEXTSENT_MIN_POSITION = 2
SENTENCE_MIN_WORDS = 5
SENTENCE_MAX_WORDS = 60

ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc eg ie e.g i.e no nos vol vols c ca cf approx gen col lt sgt capt "
    "lit maj rev fr inc ltd co corp mt ft al fig figs op ed eds repr trans b d fl r hon esp dept univ est "
    "jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k a.d b.c".split()
)
SENTENCE_BOUNDARY = re.compile(r"(?<=[.!?])([\"'”’)\]]?)\s+(?=[A-Z0-9\"'“‘(\[])")
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]?$")
_LASTWORD = re.compile(r"^(.*\S)\s+([^\W\d_]{3,})[.!?][\"'”’)\]]?$", re.DOTALL)


@dataclass(frozen=True)
class Sentence:
    """One sentence of a test article: its text and where it lives (article index, paragraph, position)."""

    text: str
    article: int
    paragraph: int
    position: int
    start: int = 0
    end: int = 0

    @property
    def n_words(self) -> int:
        return len(self.text.split())


def sentence_spans(paragraph: str) -> list[tuple[int, int]]:
    """``(start, end)`` offsets of the sentences of one paragraph (rule in the module doc); text is not altered."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in SENTENCE_BOUNDARY.finditer(paragraph):
        end = m.end(1)  # keep a closing quote/bracket with the sentence it closes
        piece = paragraph[start:end]
        words = piece.split()
        last = words[-1].rstrip("\"'”’)]").rstrip(".!?").lstrip("(\"'“‘[") if words else ""
        if piece.rstrip("\"'”’)]").endswith(".") and (len(last) == 1 or last.lower() in ABBREVIATIONS):
            continue  # initial or abbreviation: not a sentence end
        if piece.strip():
            spans.append(_strip_span(paragraph, start, end))
        start = m.end()
    if paragraph[start:].strip():
        spans.append(_strip_span(paragraph, start, len(paragraph)))
    return spans


def _strip_span(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def split_sentences(paragraph: str) -> list[str]:
    """Split one paragraph into sentences (verbatim substrings) with the regex rule of the module doc."""
    return [paragraph[a:b] for a, b in sentence_spans(paragraph)]


def paragraphs(article_text: str) -> list[str]:
    """Non-heading lines of a cleaned article (heading lines start with ``" = "``)."""
    return [line.strip() for line in article_text.split("\n") if line.strip() and not line.startswith(" = ")]


def _usable(text: str, banned: frozenset[str]) -> bool:
    n = len(text.split())
    return (
        SENTENCE_MIN_WORDS <= n <= SENTENCE_MAX_WORDS
        and bool(_SENTENCE_END.search(text))
        and " = " not in text
        and any(ch.isalpha() for ch in text)
        and text not in banned
    )


def _span_text(articles: Sequence[Any], first: Sentence, last: Sentence) -> str:
    """Verbatim paragraph text from the start of ``first`` to the end of ``last`` (same paragraph)."""
    return paragraphs(articles[first.article].text)[first.paragraph][first.start : last.end]


def article_sentences(articles: Sequence[Any], banned: frozenset[str] = frozenset()) -> list[list[list[Sentence | None]]]:
    """Sentences per article per paragraph; unusable sentences are kept as ``None`` (they break windows).

    Args:
        articles: objects with ``title`` and ``text`` (``rcp_lib.data.Article``).
        banned: sentences that must not be used (those that also occur in the train split).
    """
    out: list[list[list[Sentence | None]]] = []
    for ai, art in enumerate(articles):
        paras: list[list[Sentence | None]] = []
        for pi, para in enumerate(paragraphs(art.text)):
            spans = sentence_spans(para)
            paras.append([Sentence(para[a:b], ai, pi, si, a, b) if _usable(para[a:b], banned) else None for si, (a, b) in enumerate(spans)])
        out.append(paras)
    return out


def train_sentences(train_articles: Sequence[Any]) -> frozenset[str]:
    """All sentences of the train articles (same splitter), used to exclude any text shared with train."""
    return frozenset(s for art in train_articles for para in paragraphs(art.text) for s in split_sentences(para))


def _subsample(docs: list[dict[str, Any]], n_max: int, seed: int) -> list[dict[str, Any]]:
    if len(docs) <= n_max:
        return docs
    keep = sorted(random.Random(seed).sample(range(len(docs)), n_max))
    return [docs[i] for i in keep]


def make_lastword_docs(articles: Sequence[Any], n_max: int = DEFAULT_N_MAX, seed: int = 0, banned: frozenset[str] = frozenset()) -> tuple[list[dict[str, Any]], int]:
    """Build the ``wiki_lastword`` documents (see module doc).

    Returns:
        ``(docs, n_candidates)``; each doc has ``id``, ``article`` (title), ``context``, ``target``
        (``" " + word``) and ``passage`` (the verbatim source text, ending with the word's punctuation).
    """
    docs: list[dict[str, Any]] = []
    for paras in article_sentences(articles, banned):
        for para in paras:
            i = 0
            while i < len(para):
                if para[i] is None:
                    i += 1
                    continue
                window: list[Sentence] = []
                j = i
                while j < len(para) and para[j] is not None and len(window) < LASTWORD_MAX_SENTENCES:
                    window.append(para[j])  # type: ignore[arg-type]
                    j += 1
                    if len(window) >= 2 and sum(s.n_words for s in window) >= LASTWORD_MIN_WORDS:
                        break
                n_words = sum(s.n_words for s in window)
                passage = _span_text(articles, window[0], window[-1])
                m = _LASTWORD.match(passage)
                if len(window) >= 2 and LASTWORD_MIN_WORDS <= n_words <= LASTWORD_MAX_WORDS and m:
                    first = window[0]
                    docs.append(
                        {
                            "id": f"{first.article}-{first.paragraph}-{first.position}",
                            "article": articles[first.article].title,
                            "context": m.group(1),
                            "target": " " + m.group(2),
                            "passage": passage,
                        }
                    )
                    i = j
                else:
                    i += 1
    return _subsample(docs, n_max, seed), len(docs)


def position_class(position: int) -> int:
    """Position class of a sentence in its paragraph: its index, capped at :data:`NEXTSENT_MIN_POSITION`.

    Classes are 0 (paragraph opener), 1 (second sentence) and 2 (third sentence or later). A ``wiki_nextsent``
    gold always follows 2-3 context sentences, so it is in class 2, and so is every distractor.
    """
    return min(position, NEXTSENT_MIN_POSITION)


def content_words(text: str) -> frozenset[str]:
    """Lower-cased words of 3+ letters of ``text`` (the unit of the word-overlap matching of ``wiki_nextsent``)."""
    return frozenset(w.lower() for w in re.findall(r"[A-Za-z]{3,}", text))


def _nearest_in_length(pool: list[Sentence], lengths: list[int], gold: Sentence, other_articles: bool = True,
                       k: int | None = None) -> list[Sentence]:
    """The ``k`` (default :data:`NEXTSENT_NEAREST_POOL`) sentences of ``pool`` (sorted by length) closest in length
    to ``gold``, from other articles only when ``other_articles``."""
    k_max = NEXTSENT_NEAREST_POOL if k is None else k
    n = len(gold.text)
    k = bisect.bisect_left(lengths, n)
    lo, hi = k - 1, k
    near: list[Sentence] = []
    while len(near) < k_max and (lo >= 0 or hi < len(pool)):
        take_hi = lo < 0 or (hi < len(pool) and lengths[hi] - n <= n - lengths[lo])
        cand = pool[hi] if take_hi else pool[lo]
        if take_hi:
            hi += 1
        else:
            lo -= 1
        if (cand.article != gold.article or not other_articles) and cand.text != gold.text:
            near.append(cand)
    return near


def make_nextsent_docs(articles: Sequence[Any], n_max: int = DEFAULT_N_MAX, seed: int = 0, banned: frozenset[str] = frozenset()) -> tuple[list[dict[str, Any]], int]:
    """Build the ``wiki_nextsent`` documents (see module doc).

    Returns:
        ``(docs, n_candidates)``; each doc has ``id``, ``article``, ``context``, ``choices`` (4 sentences),
        ``label`` (gold index), ``choice_articles`` (source article title of each choice) and
        ``choice_positions`` (index of each choice in its source paragraph).
    """
    sents = article_sentences(articles, banned)
    usable = [s for paras in sents for para in paras for s in para if s is not None]
    # one length-sorted distractor pool per position class
    pools: dict[tuple[int, int], list[Sentence]] = {}  # (article, position class) -> length-sorted sentences
    for s in sorted(usable, key=lambda s: (len(s.text), s.article, s.paragraph, s.position)):
        pools.setdefault((s.article, position_class(s.position)), []).append(s)
    rng = random.Random(seed)
    docs: list[dict[str, Any]] = []
    for paras in sents:
        for para in paras:
            i = 0
            while i < len(para):
                n_ctx = 2
                if all(s is not None for s in para[i : i + 2]) and len(para[i : i + 2]) == 2:
                    if sum(s.n_words for s in para[i : i + 2]) < NEXTSENT_SHORT_CONTEXT_WORDS:  # type: ignore[union-attr]
                        n_ctx = 3
                window = para[i : i + n_ctx + 1]
                if len(window) < n_ctx + 1 or any(s is None for s in window):
                    i += 1
                    continue
                ctx = [s for s in window[:-1] if s is not None]
                gold = window[-1]
                assert gold is not None
                # same article and position class, other paragraphs; the candidates whose word overlap with the
                # context is closest to the gold's (so sharing words with the context does not find the gold),
                # then closest in length; ties broken by the seeded generator
                ctx_words = content_words(" ".join(c.text for c in ctx))
                g_ov = len(ctx_words & content_words(gold.text))
                pool = [c for c in pools.get((gold.article, position_class(gold.position)), [])
                        if c.paragraph != gold.paragraph and c.text != gold.text]
                keyed = [(abs(len(ctx_words & content_words(c.text)) - g_ov), abs(len(c.text) - len(gold.text)),
                          rng.random(), c) for c in pool]
                near = [c for *_, c in sorted(keyed, key=lambda t: t[:3])][:NEXTSENT_SAME_ARTICLE_POOL]
                rng.shuffle(near)
                distractors: list[Sentence] = []
                for cand in near:
                    if cand.text != gold.text and all(cand.text != d.text for d in distractors):
                        distractors.append(cand)
                    if len(distractors) == NEXTSENT_N_CHOICES - 1:
                        break
                if len(distractors) < NEXTSENT_N_CHOICES - 1:  # pragma: no cover - needs >= 4 articles
                    i += 1
                    continue
                label = rng.randrange(NEXTSENT_N_CHOICES)
                choices = list(distractors)
                choices.insert(label, gold)
                docs.append(
                    {
                        "id": f"{ctx[0].article}-{ctx[0].paragraph}-{ctx[0].position}",
                        "article": articles[gold.article].title,
                        "context": _span_text(articles, ctx[0], ctx[-1]),
                        "choices": [c.text for c in choices],
                        "label": label,
                        "choice_articles": [articles[c.article].title for c in choices],
                        "choice_positions": [c.position for c in choices],
                    }
                )
                i += n_ctx + 1
    return _subsample(docs, n_max, seed), len(docs)


def _yaml(task: str, jsonl: Path) -> str:
    """Task YAML for lm_eval (``dataset_path: json`` with an absolute ``data_files`` path)."""
    common = (
        f"task: {task}\n"
        "tag:\n  - rcp_offline\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(jsonl.resolve()))}\n"
        "test_split: test\n"
        "doc_to_text: context\n"
    )
    if task == "wiki_lastword":
        return common + (
            "output_type: loglikelihood\n"
            "doc_to_target: target\n"
            "metric_list:\n"
            "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
            "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            f"metadata:\n  version: {BUILDER_VERSION}.0\n"
        )
    return common + (
        "output_type: multiple_choice\n"
        "doc_to_target: label\n"
        "doc_to_choice: choices\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        f"metadata:\n  version: {BUILDER_VERSION}.0\n"
    )


def _jsonl(docs: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs)


def task_set_key(n_max: int, seed: int) -> str:
    """Version hash of a task set: builder version, parameters, and the text of all wiki-excerpt articles."""
    from ..data import wiki_excerpt_split

    h = hashlib.sha1(f"v{BUILDER_VERSION}:n{n_max}:s{seed}".encode())
    for split in ("test", "train"):  # train matters too: it decides which sentences are excluded
        for a in wiki_excerpt_split(split):
            h.update(a.title.encode())
            h.update(a.text.encode())
    return h.hexdigest()[:16]


def build_offline_tasks(n_max: int = DEFAULT_N_MAX, seed: int = 0, out_dir: str | os.PathLike | None = None) -> Path:
    """Build (or reuse) the offline task set and return the folder to pass as lm_eval ``include_path``.

    Args:
        n_max: at most this many documents per task (seeded sample if more are available).
        seed: seed of the subsample, the distractor choice and the gold positions.
        out_dir: where to write; default ``cache_dir()/"lm_eval_tasks"/<version-hash>``. An existing
            complete folder (with ``manifest.json``) is reused as is.

    Returns:
        The folder holding ``wiki_lastword.{jsonl,yaml}``, ``wiki_nextsent.{jsonl,yaml}`` and ``manifest.json``.
    """
    from ..data import wiki_excerpt_split
    from ..paths import cache_dir

    if n_max < 1:
        raise ValueError(f"n_max must be >= 1, got {n_max}")
    final = Path(out_dir) if out_dir is not None else cache_dir() / "lm_eval_tasks" / task_set_key(n_max, seed)
    final = final.resolve()
    if (final / "manifest.json").exists():
        return final
    test, train = wiki_excerpt_split("test"), wiki_excerpt_split("train")
    banned = train_sentences(train)
    lastword, n_lw = make_lastword_docs(test, n_max, seed, banned)
    nextsent, n_ns = make_nextsent_docs(test, n_max, seed, banned)
    manifest = {
        "builder_version": BUILDER_VERSION,
        "corpus": "wiki-excerpt test",
        "n_max": n_max,
        "seed": seed,
        "n_test_articles": len(test),
        "tasks": {
            "wiki_lastword": {"n_candidates": n_lw, "n_docs": len(lastword)},
            "wiki_nextsent": {"n_candidates": n_ns, "n_docs": len(nextsent)},
        },
    }
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        for task, docs in (("wiki_lastword", lastword), ("wiki_nextsent", nextsent)):
            (tmp / f"{task}.jsonl").write_text(_jsonl(docs), encoding="utf-8")
            (tmp / f"{task}.yaml").write_text(_yaml(task, final / f"{task}.jsonl"), encoding="utf-8")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if final.exists() and not (final / "manifest.json").exists():
            shutil.rmtree(final)  # an incomplete folder from an interrupted older writer
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "manifest.json").exists():  # not a concurrent writer's complete copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def manifest(include_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``manifest.json`` of a built task set (document counts, seed, parameters)."""
    return json.loads((Path(include_dir) / "manifest.json").read_text(encoding="utf-8"))


def load_docs(include_dir: str | os.PathLike, task: str) -> list[dict[str, Any]]:
    """Documents of one offline task, as written to its JSONL file."""
    if task not in OFFLINE_TASKS:
        raise ValueError(f"Unknown offline task {task!r}; available: {OFFLINE_TASKS}.")
    text = (Path(include_dir) / f"{task}.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line]
