"""Choosing the attribution thresholds on validation data, never on the test split.

Abstention trades two errors: answering a question the notes do not cover, and refusing one
they do. Each threshold is placed where out-of-course validation questions abstain most while
in-course ones abstain at most `budget` of the time, in the middle of the range that does best
(the furthest from both kinds of question). Relevance is placed first (it is checked before
generating); support then on the questions relevance lets through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

BUDGET = 0.05  # in-course validation questions that may abstain: half the 10% allowed on test


@dataclass
class Choice:
    threshold: float | None  # abstain below it; None: no threshold does better than none
    in_rate: float  # in-course validation questions it abstains on
    out_rate: float  # out-of-course ones


def pick_threshold(in_course: Sequence[float], out_of_course: Sequence[float], budget: float = BUDGET) -> Choice:
    """The threshold t (abstain when value < t) maximising out-rate minus in-rate with in-rate <= budget."""
    if not in_course or not out_of_course:
        raise ValueError("calibration needs in-course and out-of-course questions")
    values = sorted(set(in_course) | set(out_of_course))
    cuts = [values[0] - 1e-6] + [(a + b) / 2 for a, b in zip(values, values[1:])] + [values[-1] + 1e-6]
    rate = lambda xs, t: sum(x < t for x in xs) / len(xs)
    scored = [(rate(out_of_course, t) - rate(in_course, t), t) for t in cuts if rate(in_course, t) <= budget]
    best = max(s for s, _ in scored)
    if best <= 0:
        return Choice(None, 0.0, 0.0)
    tied = [t for s, t in scored if s == best]
    # the middle of the best run of cuts: between the last value below and the first above
    lo, hi = max([v for v in values if v < tied[0]], default=tied[0]), min([v for v in values if v > tied[-1]], default=tied[-1])
    t = round((lo + hi) / 2, 4)
    return Choice(t, rate(in_course, t), rate(out_of_course, t))


def pick_abstention(in_course: list[tuple[float, float]], out_of_course: list[tuple[float, float]], budget: float = BUDGET) -> tuple[Choice, Choice]:
    """(relevance, support) choices from (relevance, support) pairs of validation answers."""
    relevance = pick_threshold([r for r, _ in in_course], [r for r, _ in out_of_course], budget)
    t = relevance.threshold
    keep = lambda rows: [s for r, s in rows if t is None or r >= t]
    left = budget - relevance.in_rate
    kept_in, kept_out = keep(in_course), keep(out_of_course)
    if not kept_in or not kept_out:
        return relevance, Choice(None, 0.0, 0.0)
    support = pick_threshold(kept_in, kept_out, max(left, 0.0) * len(in_course) / len(kept_in))
    return relevance, support
