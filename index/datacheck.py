"""Checks on the project's Q&A set against its course notes (`aimlqa data check`).

Support: the share of an answer's content words that occur in its gold sections. An answer
key that paraphrases its notes keeps most of its terms, so 0.6 is the bar: below it, an
answer says things its cited sections do not. Near-copies: a question whose embedding has
cosine >= 0.92 with a third-party question is treated as copied from it.
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

from index.corpus import markdown_sections
from index.qa import load_qa, read_text
from index.text import content_words, normalise_question

SUPPORT_THRESHOLD = 0.6
NEAR_COPY_THRESHOLD = 0.92


def course_sections(course: Path) -> dict[str, str]:
    """section id → section text, for every `##` section of every note."""
    out = {}
    for path in sorted(Path(course).rglob("*.md")):
        doc_id = path.relative_to(course).as_posix()[: -len(".md")]
        for sec in markdown_sections(read_text(path), doc_id + ".md", doc_id):
            out[sec.section_id] = sec.text
    return out


def support(answer: str, sections: list[str]) -> float:
    words = content_words(answer)
    if not words:
        return 0.0
    vocab = set(content_words(" ".join(sections)))
    return sum(w in vocab for w in words) / len(words)


def check_dataset(qa_path: Path, course: Path, against: Path | None = None) -> dict:
    records = load_qa(qa_path)
    sections = course_sections(course)
    problems: list[str] = []
    missing = [(r.id, g) for r in records for g in r.gold if g not in sections]
    problems += [f"{rid}: gold id {g} does not exist" for rid, g in missing]
    problems += [f"{r.id}: no gold ids" for r in records if not r.gold]
    dupes = [q for q, n in Counter(r.key for r in records).items() if n > 1]
    problems += [f"duplicate question: {q!r}" for q in dupes]
    scores = {r.id: support(r.answer, [sections[g] for g in r.gold if g in sections]) for r in records}
    weak = {i: s for i, s in scores.items() if s < SUPPORT_THRESHOLD}
    problems += [f"{i}: support {s:.2f} < {SUPPORT_THRESHOLD}" for i, s in sorted(weak.items())]
    words = sum(len(read_text(p).split()) for p in Path(course).rglob("*.md"))
    topics = len(list(Path(course).rglob("*.md")))
    splits = Counter(r.split or "unsplit" for r in records)
    report = {
        "qa_pairs": len(records),
        "topics": topics,
        "sections": len(sections),
        "words": words,
        "splits": dict(splits),
        "units": dict(Counter(r.unit for r in records)),
        "support_min": round(min(scores.values()), 3),
        "support_mean": round(statistics.mean(scores.values()), 3),
        "support_threshold": SUPPORT_THRESHOLD,
    }
    if against is not None:
        report |= near_copies(records, load_qa(against))
        problems += [f"{q!r} near-copies {o!r} (cos {s:.3f})" for q, o, s in report.pop("copies")]
    report["problems"] = problems
    report["ok"] = not problems
    report["lines"] = [f"{k}: {v}" for k, v in report.items() if k not in ("problems", "lines")] + problems
    return report


def near_copies(ours, theirs) -> dict:
    from index.embed import Embedder

    emb = Embedder()
    a = emb.encode([r.question for r in ours])
    b = emb.encode([r.question for r in theirs])
    sims = a @ b.T
    best = sims.argmax(axis=1)
    top = sims.max(axis=1)
    exact = {normalise_question(r.question) for r in theirs} & {r.key for r in ours}
    copies = [(ours[i].question, theirs[best[i]].question, float(top[i])) for i in range(len(ours)) if top[i] >= NEAR_COPY_THRESHOLD]
    return {
        "near_copy_threshold": NEAR_COPY_THRESHOLD,
        "max_similarity_to_reference": round(float(top.max()), 3),
        "mean_similarity_to_reference": round(float(top.mean()), 3),
        "exact_copies": len(exact),
        "copies": copies,
    }
