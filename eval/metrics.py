"""Per-question scores: ROUGE (through `evaluate`), retrieval ranking, grounding, length, degeneracy.

Everything here is per question so the ablation can average with bootstrap intervals and pair
cells question by question; `rouge_scores` is the plain mean for callers that want one number.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from index.text import content_words, normalise_question

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
METRIC_DIR = Path(__file__).with_name("rouge_metric")

# A retrieved passage "hits" a reference answer (on data without gold sections) when it holds at
# least this share of the answer's distinct content words. Chosen on the group18 validation split:
# see eval/README.md ("Hit rate without gold passages").
HIT_THRESHOLD = 0.5


@lru_cache(maxsize=1)
def rouge_module():
    """The shipped metric module (`evaluate.load("rouge")` needs the hub); in memory, no cache files."""
    import evaluate

    return evaluate.load(str(METRIC_DIR), keep_in_memory=True)


def rouge_per_example(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """F-measures per example with Porter stemming, as the hub's `rouge` metric computes them."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {t: [] for t in ROUGE_TYPES}
    out = rouge_module().compute(
        predictions=list(predictions), references=list(references), rouge_types=list(ROUGE_TYPES), use_stemmer=True, use_aggregator=False
    )
    return {t: [float(v) for v in out[t]] for t in ROUGE_TYPES}


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean F-measures: deterministic, unlike the aggregator's bootstrap "mid"."""
    per = rouge_per_example(predictions, references)
    return {t: (sum(v) / len(v) if v else 0.0) for t, v in per.items()}


# --- retrieval -------------------------------------------------------------------------------


def gold_ranking(retrieved: Sequence[str], gold: Iterable[str], k: int) -> dict:
    """recall@k, reciprocal rank (its mean is MRR) and nDCG@k of retrieved section ids against gold section ids.

    Several chunks can come from one section: a gold section counts once, at its best rank.
    """
    gold = set(gold)
    if not gold:
        raise ValueError("gold_ranking needs at least one gold id")
    seen: set[str] = set()
    gains = []
    for sid in list(retrieved)[:k]:
        new = sid in gold and sid not in seen
        seen.add(sid)
        gains.append(1.0 if new else 0.0)
    found = sum(gains)
    first = next((i for i, g in enumerate(gains, 1) if g), None)
    dcg = sum(g / math.log2(i + 1) for i, g in enumerate(gains, 1))
    idcg = sum(1 / math.log2(i + 1) for i in range(1, min(len(gold), k) + 1))
    return {"recall": found / len(gold), "mrr": 1 / first if first else 0.0, "ndcg": dcg / idcg}


def answer_overlap(passage: str, reference: str) -> float:
    """The share of the reference's distinct content words that the passage contains."""
    ref = set(content_words(reference))
    if not ref:
        return 0.0
    return len(ref & set(content_words(passage))) / len(ref)


def answer_hits(passages: Sequence[str], reference: str, k: int, threshold: float = HIT_THRESHOLD, own: Sequence[bool] | None = None) -> dict:
    """Hit@k and reciprocal rank where no gold passages are known: a passage is relevant when it
    covers the reference (`answer_overlap` >= threshold) or, only when the evaluated pairs were
    indexed on purpose, when it is the question's own Q&A chunk (`own`, reported as own@k)."""
    rel = [answer_overlap(p, reference) >= threshold for p in list(passages)[:k]]
    first = next((i for i, r in enumerate(rel, 1) if r), None)
    out = {"hit": float(first is not None), "hit_mrr": 1 / first if first else 0.0}
    if own is not None:
        out["own"] = float(any(list(own)[:k]))
    return out


# --- answers ---------------------------------------------------------------------------------


def grounding(answer: str, passages: Sequence[str]) -> float | None:
    """The share of the answer's distinct content words found in the passages it was shown;
    None when there is nothing to judge (no passages, or an answer without content words)."""
    words = set(content_words(answer))
    if not words or not passages:
        return None
    seen = set(content_words(" ".join(passages)))
    return len(words & seen) / len(words)


MIN_WORDS = 3
MIN_DISTINCT_SHARE = 0.4  # of words, for answers of 10+ words


def degenerate(answer: str, question: str = "") -> str | None:
    """Why an answer is unusable, or None: "empty", "too-short", "repetitive" or "echo"."""
    words = normalise_question(answer).split()
    if not words:
        return "empty"
    if len(words) < MIN_WORDS:
        return "too-short"
    if len(words) >= 10 and len(set(words)) / len(words) < MIN_DISTINCT_SHARE:
        return "repetitive"
    if question and " ".join(words) == normalise_question(question):
        return "echo"
    return None


def word_count(text: str) -> int:
    return len(text.split())


# --- citations ---------------------------------------------------------------------------------


def citation_scores(cited: Iterable[str], gold: Iterable[str]) -> tuple[float | None, float]:
    """Precision (None when nothing is cited) and recall of the sections an answer cites, against
    the question's gold sections; a section cited by several sentences counts once."""
    cited, gold = set(cited), set(gold)
    if not gold:
        raise ValueError("citation scores need gold sections")
    hit = len(cited & gold)
    return (hit / len(cited) if cited else None), hit / len(gold)
