"""The text_similarity metrics, each computed by a well-kept library rather than by hand.

- ``fuzzy_match``: rapidfuzz ``fuzz.ratio`` (normalised Indel similarity of the two strings) / 100.
- ``bleu``: sacrebleu ``sentence_bleu`` (its default 13a tokenizer and exp smoothing) / 100.
- ``gleu``: nltk ``sentence_gleu`` (Google-BLEU, 1-4 grams) over ``wordpunct_tokenize`` tokens.
- ``meteor``: nltk ``single_meteor_score`` over ``wordpunct_tokenize`` tokens: exact and Porter-stem
  matches, plus WordNet synonyms only where nltk's WordNet corpus is installed (nltk ships none; this
  server downloads nothing), so without it the score counts no synonyms.
- ``rouge_1`` .. ``rouge_5``, ``rouge_l``: Google's rouge-score ``RougeScorer`` F-measure (no stemming).

Each score is clamped to [0, 1]; both texts empty counts as identical (1.0).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any


class _NoSynonyms:
    """Stands in for nltk's WordNet reader when its corpus is absent: no word has synonyms."""

    def synsets(self, word: str, *args: Any, **kwargs: Any) -> list[Any]:
        return []


@lru_cache(maxsize=1)
def _wordnet() -> Any:
    from nltk.corpus import wordnet  # type: ignore[import-untyped]

    try:
        wordnet.ensure_loaded()
    except LookupError:
        return _NoSynonyms()
    return wordnet


@lru_cache(maxsize=8)
def _rouge(kind: str) -> Any:
    from rouge_score import rouge_scorer  # type: ignore[import-untyped]

    return rouge_scorer.RougeScorer([kind], use_stemmer=False)


def _tokens(text: str) -> list[str]:
    from nltk.tokenize import wordpunct_tokenize  # type: ignore[import-untyped]

    return wordpunct_tokenize(text)


def _raw(metric: str, text: str, reference: str) -> float:
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz

        return fuzz.ratio(text, reference) / 100.0
    if metric == "bleu":
        import sacrebleu

        return sacrebleu.sentence_bleu(text, [reference]).score / 100.0
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu  # type: ignore[import-untyped]

        return float(sentence_gleu([_tokens(reference)], _tokens(text)))
    if metric == "meteor":
        from nltk.translate.meteor_score import single_meteor_score  # type: ignore[import-untyped]

        return float(single_meteor_score(_tokens(reference), _tokens(text), wordnet=_wordnet()))
    if metric.startswith("rouge_"):
        kind = "rougeL" if metric == "rouge_l" else "rouge" + metric.removeprefix("rouge_")
        return float(_rouge(kind).score(reference, text)[kind].fmeasure)
    raise ValueError(f"unknown evaluation_metric {metric!r}")


def similarity(metric: str, text: str, reference: str) -> float:
    """How close ``text`` is to ``reference`` by ``metric``, in [0, 1]."""
    if not text.strip() and not reference.strip():
        return 1.0
    return min(1.0, max(0.0, _raw(metric, text, reference)))
