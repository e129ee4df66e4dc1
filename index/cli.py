"""`aimlqa index build|info|search` and `aimlqa data check`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from aimlqa.options import mode_option
from index.store import INDEX_TYPES, BuildConfig, read_manifest

app = typer.Typer(no_args_is_help=True)
data_app = typer.Typer(no_args_is_help=True)


@app.command()
def build(
    sources: list[Path] = typer.Argument(..., help="Files or directories: .md .txt .pdf and Q&A .csv/.jsonl"),
    out: Path = typer.Option(..., "--out", "-o", help="Index directory to write"),
    embed_model: str = typer.Option("all-MiniLM-L6-v2", help="sentence-transformers model name or path"),
    chunk_size: int = typer.Option(200, help="Chunk size in the embedding model's tokens"),
    chunk_overlap: int = typer.Option(30, help="Overlap between chunks in tokens"),
    index_type: str = typer.Option("flat", help=f"FAISS index: {' | '.join(INDEX_TYPES)}"),
    qa_split: Optional[str] = typer.Option(None, help="Index only this split of Q&A files (train|validation|test)"),
    force: bool = typer.Option(False, "--force", help="Rebuild even when the corpus is unchanged"),
):
    """Chunk, embed and index course material; skipped when nothing changed."""
    from index.retriever import build_index

    t0 = time.perf_counter()
    config = BuildConfig(embed_model, chunk_size, chunk_overlap, index_type, qa_split)
    manifest, built = build_index(sources, out, config, force=force, progress=True)
    verb = "built" if built else "unchanged, kept"
    typer.echo(f"{verb} {out}: {manifest['n_chunks']} chunks from {manifest['n_sources']} files "
               f"({manifest['embed_model']}, {manifest['index_type']}) in {time.perf_counter() - t0:.1f}s")


@app.command()
def info(path: Path):
    """Print an index's manifest."""
    typer.echo(json.dumps(read_manifest(path), indent=2))


@app.command()
def search(
    path: Path,
    query: str,
    k: int = typer.Option(5, "-k", help="Number of passages"),
    mode: str = mode_option(),
    as_json: bool = typer.Option(False, "--json", help="Print JSON"),
):
    """Search an index and print the top passages."""
    from index.retriever import Retriever

    hits = Retriever.load(path).search(query, k, mode)
    if as_json:
        typer.echo(json.dumps([h.to_dict() for h in hits], indent=2, ensure_ascii=False))
        return
    for n, h in enumerate(hits, 1):
        snippet = " ".join(h.text.split())[:200]
        typer.echo(f"{n}. [{h.score:.3f}] {h.section_id}\n   {snippet}")


@data_app.command("check")
def check(
    qa: Optional[Path] = typer.Option(None, help="Q&A file (default: the shipped data/qa/aiml_qa.jsonl)"),
    course: Optional[Path] = typer.Option(None, help="Course notes directory (default: data/course)"),
    against: Optional[Path] = typer.Option(None, help="Q&A file our questions must not copy (e.g. group18 dev.jsonl)"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Gold ids exist, no duplicate questions, answers supported by their gold sections, no near-copies."""
    from aimlqa import settings
    from index.datacheck import check_dataset

    report = check_dataset(qa or settings.qa_file(), course or settings.course_dir(), against)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        for line in report["lines"]:
            typer.echo(line)
    if not report["ok"]:
        raise typer.Exit(1)


@data_app.command("split")
def split_cmd(
    files: list[Path] = typer.Argument(..., help="Q&A files in any supported layout"),
    out: Path = typer.Option(..., "--out", "-o", help="JSONL to write, each record with its `split`"),
    fractions: str = typer.Option("0.8,0.1,0.1", help="train,validation,test fractions"),
):
    """Merge, de-duplicate and fix a split (by a hash of the normalised question) into one JSONL file."""
    from collections import Counter

    from aimlqa.settings import UserError
    from index.qa import load_many, split_of, write_jsonl

    try:
        fr = tuple(float(x) for x in fractions.split(","))
    except ValueError:
        raise UserError(f"--fractions {fractions!r}: expected three numbers like 0.8,0.1,0.1") from None
    records = load_many(files)
    for r in records:
        r.split = split_of(r.question, fr)
    write_jsonl(records, out)
    typer.echo(f"wrote {len(records)} records to {out}: {dict(Counter(r.split for r in records))}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="index", help="Build, inspect and search a course-material index.")
    root.add_typer(data_app, name="data", help="Check the project's course notes and Q&A set.")
