"""The training record a run leaves beside its adapter: loss.csv and loss.png (train loss and
validation ROUGE-L by step)."""

from __future__ import annotations

import csv
from pathlib import Path


def write_loss_curve(log_history: list[dict], out: Path) -> None:
    rows = [{"step": h["step"], "loss": h.get("loss"), "eval_rougeL": h.get("eval_rougeL")} for h in log_history if "loss" in h or "eval_rougeL" in h]
    with (out / "loss.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "loss", "eval_rougeL"])
        w.writeheader()
        w.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    train = [(r["step"], r["loss"]) for r in rows if r["loss"] is not None]
    if train:
        ax.plot(*zip(*train), label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    evals = [(r["step"], r["eval_rougeL"]) for r in rows if r["eval_rougeL"] is not None]
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", color="tab:orange", label="validation ROUGE-L")
        ax2.set_ylabel("ROUGE-L (generated)")
    ax.set_title("fine-tuning")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
