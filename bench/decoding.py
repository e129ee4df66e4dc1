"""Beam search against greedy decoding (bench/ablation-beams.yaml): ROUGE-L per cell, paired on the
same questions, and each cell's generation time, as ratios to greedy.

    python bench/decoding.py [--limit 100] [--beams 4]

Both decodings run the same cells (models x plain / grounded x datasets) with the same settings
but `num_beams`. Cells are cached per decoding (eval/ablation.py): a rerun generates only what is
missing, and a cell's seconds are those of the run that generated it (`batch_size` is not part of
a cell's identity: greedy cells cached by bench/ablation.py were generated at its batch size).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from common import write  # noqa: E402  (sets sys.path)

from eval.ablation import run_ablation
from eval.bootstrap import paired_test
from eval.config import load_config
from eval.files import read_jsonl

CONFIG = Path(__file__).with_name("ablation-beams.yaml")


def per_question(out: Path) -> dict[str, dict[str, float]]:
    rows = defaultdict(dict)
    for r in read_jsonl(out / "predictions.jsonl"):
        rows[r["cell"]][r["id"]] = r["scores"]["rougeL"]
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None, help="questions per dataset (the first N of its split)")
    ap.add_argument("--beams", type=int, default=None, help="beam width (default: the config's)")
    ap.add_argument("--config", type=Path, default=CONFIG)
    args = ap.parse_args()
    beams = load_config(args.config, limit=args.limit, **({"num_beams": args.beams} if args.beams else {}))
    greedy = beams.model_copy(update={"num_beams": 1, "out": beams.out / "greedy"})
    runs = {name: run_ablation(config) for name, config in (("greedy", greedy), ("beams", beams))}
    scores = {name: per_question(out) for name, (_, out) in runs.items()}
    seconds = {name: {c["id"]: c["seconds"] for c in summary["cells"]} for name, (summary, _) in runs.items()}
    cells = {}
    for cell, by_id in scores["beams"].items():
        ids = sorted(by_id)
        b, g = [by_id[i] for i in ids], [scores["greedy"][cell][i] for i in ids]
        test = paired_test(b, g, beams.bootstrap, beams.seed)
        cells[cell] = {
            "n": len(ids), "greedy_rougeL": sum(g) / len(g), "beams_rougeL": sum(b) / len(b),
            "delta": test.delta, "ci": [test.lo, test.hi], "p": test.p,
            "greedy_s": seconds["greedy"][cell], "beams_s": seconds["beams"][cell],
            "time_ratio": seconds["beams"][cell] / max(seconds["greedy"][cell], 1e-9),
        }
        print(f"{cell:45s} greedy {cells[cell]['greedy_rougeL']:.3f}  {beams.num_beams} beams {cells[cell]['beams_rougeL']:.3f}  "
              f"delta {test.delta:+.3f} [{test.lo:+.3f}, {test.hi:+.3f}] p={test.p:.3f}  time x{cells[cell]['time_ratio']:.1f}")
    write("decoding", {"num_beams": beams.num_beams, "limit": args.limit, "batch_size": beams.batch_size,
                       "runs": {name: summary["run"]["id"] for name, (summary, _) in runs.items()}, "cells": cells})


if __name__ == "__main__":
    main()
