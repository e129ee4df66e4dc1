"""The default ablation (bench/ablation.yaml): plain vs grounded ROUGE per model, k and mode.

    python bench/ablation.py [--limit 100] [--out DIR] [--threads 1]

Writes the full report to the config's `out` (bench/results/ablation/) and a short JSON with the
machine, the wall time and the headline cells to bench/results/ablation.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import write  # noqa: E402  (sets sys.path)

from eval.ablation import run_ablation
from eval.config import load_config
from eval.report import headline_cells

CONFIG = Path(__file__).with_name("ablation.yaml")


def report_path(out: Path) -> str:
    """Relative to the repository when inside it: a result file must not carry this machine's paths."""
    report = (out / "report.md").resolve()
    root = Path(__file__).resolve().parents[1]
    return report.relative_to(root).as_posix() if report.is_relative_to(root) else report.name


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None, help="questions per dataset (the first N of its split)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--config", type=Path, default=CONFIG)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a CPU shared with other jobs)")
    args = ap.parse_args()
    config = load_config(args.config, limit=args.limit, threads=args.threads, out=str(args.out.resolve()) if args.out else None)
    summary, out = run_ablation(config)
    headline = {
        ds: {f"{c['model']} / {c['setting']}": {"rouge1": c["rouge1"]["mean"], "rougeL": c["rougeL"], "n": c["n"]} for pair in headline_cells(summary, ds) for c in pair if c}
        for ds in summary["datasets"]
    }
    write("ablation" if config.name == "default" else f"ablation-{config.name}", {"run": summary["run"]["id"], "limit": args.limit, "wall_s": summary["run"]["wall_s"], "report": report_path(out),
                       "headline": headline, "notes": summary["notes"]})
    print((out / "report.md").read_text().split("### What retrieval adds")[0])


if __name__ == "__main__":
    main()
