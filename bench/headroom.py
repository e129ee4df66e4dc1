"""How much better an answer the model already holds: its greedy answer against the best of a few
sampled ones.

Each question gets the greedy answer (the baseline, in the same run) and N answers sampled at a
temperature. Two selections over those candidates are scored against the reference:
- the oracle picks the candidate closest to the reference. No system can, since it reads the
  reference; it bounds what any reranker of these candidates could reach;
- minimum Bayes risk (MBR) picks the candidate that agrees most with the others (mean ROUGE-L to
  them), the usual reference-free way to turn samples into one answer.
If the oracle stays under a target, no choice among the model's own answers reaches it, and the
gap is the model's, not the decoding's.

Every run is an `eval` cell (cached, leak-guarded index of the course notes and the training split).

    python bench/headroom.py --model gemma-270m-lora-rag [--samples 5] [--temperature 0.7] [--limit 100]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rouge_score import rouge_scorer

from common import RESULTS, write  # noqa: E402  (sets sys.path)

from aimlqa import settings
from eval.ablation import run_ablation
from eval.bootstrap import mean_ci, paired_test
from eval.config import make_config
from eval.files import read_jsonl
from eval.metrics import rouge_per_example

GROUP18 = settings.group18_dir() / "dev.jsonl"  # developers' data, not shipped


def candidates(out: Path) -> dict[str, dict]:
    """One run's answers by question id, with the reference and ROUGE-L."""
    return {r["id"]: r for r in read_jsonl(out / "predictions.jsonl")}


def mbr_choice(texts: list[str]) -> int:
    """The candidate with the highest mean ROUGE-L against the others (ROUGE-L F is symmetric)."""
    n = len(texts)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    f = rouge_per_example([texts[i] for i, _ in pairs], [texts[j] for _, j in pairs])["rougeL"]
    agree = np.zeros((n, n))
    for (i, j), v in zip(pairs, f):
        agree[i, j] = agree[j, i] = v
    return int(np.argmax(agree.sum(axis=1)))


def precision_recall(predictions: list[str], references: list[str]) -> dict:
    """ROUGE-L precision and recall: which way an answer's length misses the reference."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    s = [scorer.score(r, p)["rougeL"] for p, r in zip(predictions, references)]
    return {"precision": float(np.mean([x.precision for x in s])), "recall": float(np.mean([x.recall for x in s]))}


def agreement_scale() -> tuple[float, float] | None:
    """Chance and the course writers' agreement (bench/agreement.py), when it has run."""
    path = RESULTS / "agreement.json"
    if not path.is_file():
        return None
    a = json.loads(path.read_text())
    return a["baseline_chance_same_unit"]["rougeL"]["mean"], a["agreement"]["rougeL"]["mean"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma-270m-lora-rag", help="a registered model (`aimlqa models`)")
    ap.add_argument("--data", type=Path, default=GROUP18)
    ap.add_argument("--split", default="validation", help="the split to measure on (validation: the test split stays unseen)")
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("-k", type=int, default=3)
    ap.add_argument("--mode", default=settings.DEFAULT_MODE)
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args()
    if args.samples < 1:
        raise SystemExit("--samples must be at least 1")

    greedy = make_config(
        name="headroom", models=[args.model], rag=[True], top_k=[args.k], modes=[args.mode],
        headline={"k": args.k, "mode": args.mode}, datasets=[{"name": "group18", "path": args.data, "split": args.split}],
        limit=args.limit, out=settings.home() / "eval" / "runs" / "headroom" / "greedy",
    )
    configs = {"greedy": greedy} | {
        f"sample{s}": greedy.model_copy(update={"temperature": args.temperature, "seed": s, "out": greedy.out.with_name(f"sample{s}")})
        for s in range(args.samples)
    }
    runs = {name: run_ablation(config, progress=False) for name, config in configs.items()}
    answers = {name: candidates(out) for name, (_, out) in runs.items()}

    ids = sorted(answers["greedy"])
    names = list(configs)
    refs = [answers["greedy"][i]["reference"] for i in ids]
    score = np.array([[answers[n][i]["scores"]["rougeL"] for i in ids] for n in names])  # candidates x questions
    texts = [[answers[n][i]["prediction"] for n in names] for i in ids]
    mbr = np.array([score[mbr_choice(t), q] for q, t in enumerate(texts)])
    oracle_by_n = {n + 1: float(score[: n + 1].max(axis=0).mean()) for n in range(len(names))}
    g = score[0]
    oracle = score.max(axis=0)
    result = {
        "model": args.model, "data": str(args.data), "split": args.split, "questions": len(ids),
        "k": args.k, "mode": args.mode, "samples": args.samples, "temperature": args.temperature,
        "rougeL": {
            "greedy (baseline)": mean_ci(g).to_dict(),
            "one sample": mean_ci(score[1:].mean(axis=0)).to_dict(),
            "MBR over all candidates": mean_ci(mbr).to_dict(),
            "oracle over all candidates": mean_ci(oracle).to_dict(),
        },
        "oracle_by_candidates": oracle_by_n,
        "ratio_to_greedy": {"one sample": float(score[1:].mean() / g.mean()), "MBR": float(mbr.mean() / g.mean()), "oracle": float(oracle.mean() / g.mean())},
        "mbr_vs_greedy": paired_test(mbr, g).to_dict(),
        "greedy_precision_recall": precision_recall([t[0] for t in texts], refs),
        "words_median": {"greedy": float(np.median([len(t[0].split()) for t in texts])), "reference": float(np.median([len(r.split()) for r in refs]))},
        "seconds": {name: summary["cells"][0]["seconds"] for name, (summary, _) in runs.items()},
    }
    if scale := agreement_scale():
        chance, writers = scale
        result["share_of_agreement"] = {k: round((v["mean"] - chance) / (writers - chance), 3) for k, v in result["rougeL"].items()}
    write("headroom", result)
    for label, ci in result["rougeL"].items():
        print(f"{label:28s} ROUGE-L {ci['mean']:.3f} [{ci['lo']:.3f}, {ci['hi']:.3f}]")
    print("oracle by candidates: " + ", ".join(f"{n}: {v:.3f}" for n, v in oracle_by_n.items()))
    t = result["mbr_vs_greedy"]
    print(f"MBR - greedy {t['delta']:+.3f} [{t['lo']:+.3f}, {t['hi']:+.3f}] p={t['p']:.3f}; oracle / greedy x{result['ratio_to_greedy']['oracle']:.2f}")


if __name__ == "__main__":
    main()
