"""How far ROUGE can go on group18: two of the course team's answers to the same question, scored
against each other.

The seed's files hold the same question more than once, worded a little differently and answered
by different writers. Their answers agree with each other only so far, and no answerer, however
right, scores much above that agreement against one writer's reference. The baseline, measured in
the same run, is chance: each answer against a random answer to another question from the same unit.
The ablation's group18 cells (bench/results/ablation/summary.json, when present) are then placed
on that scale.

    python bench/agreement.py [--threshold 0.95]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from common import RESULTS, write  # noqa: E402  (sets sys.path)

from aimlqa import settings  # noqa: E402

from eval.bootstrap import mean_ci
from eval.metrics import ROUGE_TYPES, rouge_per_example
from index.embed import Embedder
from index.qa import load_qa

GROUP18 = settings.group18_dir() / "dev.jsonl"  # developers' data, not shipped
BUCKETS = ((0.97, 1.01), (0.95, 0.97), (0.92, 0.95), (0.90, 0.92))


def paraphrase_pairs(similarity: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Distinct records whose questions are at least this close (the file is de-duplicated on the normalised question)."""
    i, j = np.nonzero(np.triu(similarity >= threshold, k=1))
    return [(int(a), int(b), float(similarity[a, b])) for a, b in zip(i, j)]


def chance_partners(records, pairs, rng) -> list[int]:
    """For each pair's first answer, a random other record of the same unit that is no paraphrase of it."""
    close = {(a, b) for a, b, _ in pairs} | {(b, a) for a, b, _ in pairs}
    by_unit: dict[str, list[int]] = {}
    for n, r in enumerate(records):
        by_unit.setdefault(r.unit, []).append(n)
    out = []
    for a, _, _ in pairs:
        pool = [n for n in by_unit[records[a].unit] if n != a and (a, n) not in close]
        out.append(int(rng.choice(pool)))
    return out


def summarise(scores: dict[str, list[float]]) -> dict:
    return {t: mean_ci(v).to_dict() | {"median": float(np.median(v))} for t, v in scores.items()}


def ablation_cells(ceiling: float, floor: float) -> list[dict]:
    """The ablation's group18 ROUGE-L, as a share of the way from chance to the writers' agreement."""
    path = RESULTS / "ablation" / "summary.json"
    if not path.is_file():
        return []
    cells = [c for c in json.loads(path.read_text())["cells"] if c["dataset"] == "group18" and (not c["rag"] or (c["k"], c["mode"]) == (3, "hybrid"))]
    return [
        {"cell": c["id"], "rougeL": round(c["rougeL"]["mean"], 4), "share_of_agreement": round((c["rougeL"]["mean"] - floor) / (ceiling - floor), 3)}
        for c in cells
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threshold", type=float, default=0.95, help="question cosine at which two records ask the same thing")
    ap.add_argument("--data", type=Path, default=GROUP18)
    args = ap.parse_args()

    records = load_qa(args.data)
    q = Embedder().encode([r.question for r in records])
    similarity = q @ q.T
    pairs = paraphrase_pairs(similarity, min(args.threshold, BUCKETS[-1][0]))
    same = [p for p in pairs if p[2] >= args.threshold]
    if not same:
        raise SystemExit(f"no two questions in {args.data} are within cosine {args.threshold}; lower --threshold")

    scores = rouge_per_example([records[b].answer for _, b, _ in pairs], [records[a].answer for a, _, _ in pairs])
    within = lambda lo, hi=2.0: {t: [v for v, (_, _, s) in zip(scores[t], pairs) if lo <= s < hi] for t in ROUGE_TYPES}
    agree = within(args.threshold)
    rng = np.random.default_rng(0)
    partners = chance_partners(records, same, rng)
    chance = rouge_per_example([records[n].answer for n in partners], [records[a].answer for a, _, _ in same])
    by_bucket = {f"{lo:.2f}-{min(hi, 1.0):.2f}": mean_ci(r).to_dict() for lo, hi in BUCKETS if (r := within(lo, hi)["rougeL"])}

    ceiling, floor = float(np.mean(agree["rougeL"])), float(np.mean(chance["rougeL"]))
    examples = [
        {"similarity": round(s, 3), "question_a": records[a].question, "question_b": records[b].question,
         "answer_a": records[a].answer, "answer_b": records[b].answer, "rougeL": round(agree["rougeL"][n], 3)}
        for n, (a, b, s) in enumerate(same[:5])
    ]
    result = {
        "data": str(args.data),
        "records": len(records),
        "threshold": args.threshold,
        "pairs": len(same),
        "identical_answers": sum(records[a].answer.strip() == records[b].answer.strip() for a, b, _ in same),
        "agreement": summarise(agree),
        "baseline_chance_same_unit": summarise(chance),
        "ratio_agreement_to_chance": {t: round(float(np.mean(agree[t])) / float(np.mean(chance[t])), 2) for t in ROUGE_TYPES},
        "rougeL_by_similarity": by_bucket,
        "ablation_group18": ablation_cells(ceiling, floor),
        "examples": examples,
    }
    write("agreement", result)
    print(f"{len(same)} pairs at cosine >= {args.threshold}: ROUGE-L {ceiling:.3f} between the writers' answers, "
          f"{floor:.3f} by chance (x{ceiling / floor:.2f})")
    for c in result["ablation_group18"]:
        print(f"  {c['cell']:<45} {c['rougeL']:.3f}  {c['share_of_agreement']:.0%} of the way from chance to agreement")


if __name__ == "__main__":
    main()
