"""`aimlqa eval score` (one cell) and `aimlqa eval ablate CONFIG` (the matrix)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import typer

from aimlqa.options import mode_option

app = typer.Typer(no_args_is_help=True)


def _print_cells(summary: dict, out: Path) -> None:
    from eval.report import f3, with_ci

    for c in summary["cells"]:
        extra = ""
        if c["rag"]:
            r = c["retrieval"]
            key = "recall" if "recall" in r else "hit"
            extra = f"  grounding {f3(c['grounding']['mean'])}  {key}@{c['k']} {f3(r[key]['mean'])}"
            if c.get("abstained"):
                extra += (f"  abstained {with_ci(c['abstained'])}  cited P/R {f3(c['citation_precision']['mean'])}/{f3(c['citation_recall']['mean'])}"
                          f"  unsupported {f3(c['unsupported']['mean'])}  R-L served {f3(c['rougeL_served']['mean'])}")
        if c.get("expect") == "abstain":
            typer.echo(f"{c['id']:48} n={c['n']:<4} out of course: abstained {with_ci(c.get('abstained'))}")
            continue
        typer.echo(f"{c['id']:48} n={c['n']:<4} R-1 {f3(c['rouge1']['mean'])}  R-2 {f3(c['rouge2']['mean'])}  "
                   f"R-L {with_ci(c['rougeL'])}  R-Lsum {f3(c['rougeLsum']['mean'])}{extra}  empty/degenerate {c['empty']}/{c['degenerate']}")
    for n in summary["notes"]:
        typer.echo(f"note: {n}", err=True)
    typer.echo(f"wrote {out}/report.md, summary.csv, summary.json, predictions.jsonl, rouge_l.png ({summary['run']['wall_s']:.0f} s)")


@app.command()
def score(
    qa: Path = typer.Option(..., "--qa", help="Q&A file (any supported CSV layout or JSONL)"),
    split: str = typer.Option("test", help="train | validation | test | all"),
    model: str = typer.Option(..., "--model", "-m", help="A registered model (see `aimlqa models`), or one the --server serves"),
    server: Optional[str] = typer.Option(None, help="Answer through a running server's REST API (e.g. http://127.0.0.1:8000): scores what students get"),
    rag: bool = typer.Option(True, "--rag/--no-rag", help="Ground answers in retrieved passages"),
    k: int = typer.Option(3, "-k", help="Passages to retrieve"),
    mode: str = mode_option(),
    index: Optional[Path] = typer.Option(None, help="A built index (default: build one from the course notes and the file's training split)"),
    out_of_course: bool = typer.Option(False, "--out-of-course", help="The questions are not in the notes (data/ooc): report how often the service abstains"),
    allow_leak: bool = typer.Option(False, "--allow-leak", help="Accept an index that holds evaluated pairs (the report flags it)"),
    limit: Optional[int] = typer.Option(None, help="Evaluate the first N questions of the split"),
    max_new_tokens: int = typer.Option(64, help="Generation limit"),
    beams: int = typer.Option(1, "--beams", min=1, max=16, help="Beam search width (1: greedy)"),
    threads: Optional[int] = typer.Option(None, help="Torch threads (1 is fastest on a CPU shared with other jobs)"),
    out: Optional[Path] = typer.Option(None, help="Output dir (default: $AIMLQA_HOME/eval/runs/score)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Score one model in one setting on one Q&A file: ROUGE, grounding and retrieval, with 95% intervals."""
    from eval.ablation import run_ablation
    from eval.config import make_config

    corpus = {"index": index, "index_evaluated": allow_leak}
    config = make_config(
        name="score", models=[model], rag=[rag], top_k=[k], modes=[mode], headline={"k": k, "mode": mode},
        datasets=[{"name": re.sub(r"[^A-Za-z0-9_.-]+", "_", qa.stem).strip("._-") or "qa", "path": qa, "split": split,
                   "expect": "abstain" if out_of_course else "answer"}],
        corpus=corpus, limit=limit, max_new_tokens=max_new_tokens, num_beams=beams, threads=threads, out=out, server=server,
    )
    summary, out_dir = run_ablation(config, progress=progress)
    _print_cells(summary, out_dir)


@app.command()
def ablate(
    config: Path = typer.Argument(..., help="Ablation YAML (e.g. bench/ablation.yaml)"),
    limit: Optional[int] = typer.Option(None, help="Evaluate the first N questions of each dataset's split"),
    out: Optional[Path] = typer.Option(None, help="Output dir (default: the config's `out`, else $AIMLQA_HOME/eval/runs/NAME)"),
    threads: Optional[int] = typer.Option(None, help="Torch threads (1 is fastest on a CPU shared with other jobs)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
):
    """Run every cell of an ablation matrix (cached: a stopped run resumes) and write its report."""
    from eval.ablation import run_ablation
    from eval.config import load_config

    cfg = load_config(config, limit=limit, threads=threads, out=str(out.resolve()) if out else None)
    summary, out_dir = run_ablation(cfg, progress=progress)
    _print_cells(summary, out_dir)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="eval", help="Score models on Q&A data and run the retrieval/fine-tuning ablation.")
