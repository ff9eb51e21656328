"""Corpora (real text only), deterministic splits, tokenization and calibration windows.

Two corpora:

* ``"wikitext2"`` - WikiText-2 raw (``wikitext-2-raw-v1``) through ``datasets``; splits joined with
  ``"\\n\\n"``, the protocol of GPTQ/QuaRot/SpinQuant. Needs the data set (network or a local HF cache).
* ``"wiki-excerpt"`` - the offline default: the English Wikipedia dump excerpt shipped inside the
  ``gensim`` wheel (``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
  real articles, CC BY-SA). Redirect pages are skipped, wiki markup is removed with gensim's
  ``filter_wiki``, headings are written in WikiText raw style (`` = Title = ``, `` = = Section = = ``),
  reference/link list sections are dropped. Articles are split deterministically: sorted by the SHA-1
  of their title, every 5th article goes to ``test`` (20 %), the rest to ``train``. No article is in both.

One corpus is never substituted for another: a corpus that cannot be loaded raises
:class:`CorpusUnavailableError` saying how to get it or how to use the bundled one.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

CORPORA = ("wiki-excerpt", "wikitext2")
SPLITS = ("train", "test")
WIKI_EXCERPT_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
TEST_EVERY = 5  # every 5th article (in SHA-1 order) is a test article
_DROP_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography", "sources", "citations"}


class CorpusUnavailableError(RuntimeError):
    """A requested corpus cannot be loaded here (offline, missing package...)."""


@dataclass(frozen=True)
class Article:
    title: str
    text: str


def wiki_excerpt_path() -> Path:
    """Path of the Wikipedia excerpt inside the installed gensim package."""
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise CorpusUnavailableError("The wiki-excerpt corpus ships inside the gensim wheel: pip install gensim==4.4.0")
    p = Path(spec.origin).parent / WIKI_EXCERPT_FILE
    if not p.exists():
        raise CorpusUnavailableError(f"gensim is installed but {p} is missing; reinstall gensim==4.4.0.")
    return p


def _clean_article(title: str, raw: str) -> str:
    """Wiki markup -> WikiText-raw-like plain text (headings as ' = = Sec = = ', paragraphs kept)."""
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(raw)
    text = text.replace("'''", "").replace("''", "")
    out: list[str] = [f" = {title} = "]
    skipping = False
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        m = re.fullmatch(r"(={2,6})\s*(.*?)\s*\1", line)
        if m:
            name = m.group(2).strip()
            skipping = name.lower() in _DROP_SECTIONS
            if not skipping and name:
                level = len(m.group(1))
                eq = " ".join(["="] * level)
                out.append(f" {eq} {name} {eq} ")
            continue
        if skipping:
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list/indent markers
        if re.search(r"(\[\[|\]\]|\{\{|\}\}|<ref|</ref|\|\s*\w+\s*=|^thumb\|)", line):
            line = re.sub(r"\[\[|\]\]|\{\{|\}\}|<\/?ref[^>]*>", "", line)
            if "|" in line:  # table rows and template remnants
                continue
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # empty parentheses left by removed templates
        line = re.sub(r"\s{2,}", " ", line).strip()
        if len(line.split()) < 3:  # stray fragments
            continue
        out.append(line)
    return "\n".join(out)


@functools.lru_cache(maxsize=1)
def wiki_excerpt_articles() -> tuple[Article, ...]:
    """All non-redirect articles of the excerpt, cleaned, in file order."""
    from gensim.corpora.wikicorpus import extract_pages

    arts = []
    with bz2.BZ2File(wiki_excerpt_path()) as f:
        for title, raw, _pageid in extract_pages(f):
            if raw.lstrip().lower().startswith("#redirect") or not raw.strip():
                continue
            text = _clean_article(title, raw)
            if len(text.split()) < 50:
                continue
            arts.append(Article(title, text))
    return tuple(arts)


def wiki_excerpt_split(split: str) -> tuple[Article, ...]:
    """Articles of one split of wiki-excerpt (deterministic, disjoint, ~20 % test)."""
    _check_split(split)
    arts = sorted(wiki_excerpt_articles(), key=lambda a: hashlib.sha1(a.title.encode()).hexdigest())
    test = [a for i, a in enumerate(arts) if i % TEST_EVERY == 0]
    train = [a for i, a in enumerate(arts) if i % TEST_EVERY != 0]
    return tuple(test if split == "test" else train)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def load_wikitext2(split: str) -> str:
    """WikiText-2 raw, split joined with ``"\\n\\n"``. Raises :class:`CorpusUnavailableError` offline."""
    _check_split(split)
    hint = (
        "WikiText-2 could not be loaded ({why}). Either make it available to `datasets` "
        "(network access, or a populated HF cache: python -c \"import datasets; "
        "datasets.load_dataset('wikitext', 'wikitext-2-raw-v1')\"), or use the bundled offline corpus: "
        "corpus='wiki-excerpt' (--corpus wiki-excerpt)."
    )
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise CorpusUnavailableError(hint.format(why=f"datasets not installed: {e}")) from e
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as e:  # offline: ConnectionError / OfflineModeIsEnabled / FileNotFoundError ...
        why = "offline mode (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and no cached copy" if _offline() else f"{type(e).__name__}: {e}"
        raise CorpusUnavailableError(hint.format(why=why)) from e
    return "\n\n".join(ds["text"])


def load_corpus(name: str, split: str) -> str:
    """Raw text of a corpus split.

    Args:
        name: ``"wiki-excerpt"`` (offline, bundled in gensim) or ``"wikitext2"``.
        split: ``"train"`` or ``"test"``.
    Returns:
        The split as one string (articles / lines joined with ``"\\n\\n"``).
    """
    if name not in CORPORA:
        raise ValueError(f"Unknown corpus {name!r}; available: {CORPORA}.")
    _check_split(split)
    if name == "wikitext2":
        return load_wikitext2(split)
    return "\n\n".join(a.text for a in wiki_excerpt_split(split))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole corpus once (no special tokens added, as in the GPTQ/QuaRot protocol).

    Returns:
        ``LongTensor [1, n_tokens]``.
    """
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long).unsqueeze(0)


def _tokenizer_key(tokenizer) -> str:
    vocab = getattr(tokenizer, "vocab_size", 0)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    h = hashlib.sha1(f"{name}:{vocab}:{len(tokenizer)}".encode())
    # fingerprint a few token ids so two different tokenizers never share a cache entry
    h.update(str(tokenizer("The quick brown fox, 1984.", add_special_tokens=False)["input_ids"]).encode())
    return h.hexdigest()[:12]


def corpus_tokens(tokenizer, name: str, split: str, cache: bool = True) -> torch.Tensor:
    """Tokenized corpus split ``LongTensor [1, n]``, cached on disk (outside the repo) per tokenizer."""
    from .paths import cache_dir

    path = cache_dir() / "tokens" / f"{name}-{split}-{_tokenizer_key(tokenizer)}.pt"
    if cache and path.exists():
        return torch.load(path)
    ids = tokenize(tokenizer, load_corpus(name, split))
    if cache:
        from .io import atomic_save_torch

        atomic_save_torch(ids, path)
    return ids


def calibration_windows(input_ids: torch.Tensor, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``n`` random windows of ``seqlen`` tokens (the GPTQ/QuaRot calibration sampler).

    Args:
        input_ids: ``LongTensor [1, N]`` or ``[N]`` (a tokenized *train* split).
    Returns:
        ``LongTensor [n, seqlen]``; identical for identical (input_ids, n, seqlen, seed).
    """
    ids = input_ids.reshape(-1)
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if ids.numel() <= seqlen:
        raise ValueError(f"the text has {ids.numel()} tokens, not more than seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def split_holdout(input_ids: torch.Tensor, holdout_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a tokenized train split into (train part, held-out tail) for validation during QAT.

    The tail is never the test split: it comes from the train split's own last tokens.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    ids = input_ids.reshape(-1)
    cut = int(ids.numel() * (1.0 - holdout_fraction))
    return ids[:cut].unsqueeze(0), ids[cut:].unsqueeze(0)
