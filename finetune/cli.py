"""`aimlqa finetune RECIPE [--data FILE...] [--context none|rag] [--out DIR] [--set k=v]`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def finetune_cmd(
    recipe: str = typer.Argument(..., help="gemma-270m-lora | gpt2-lora | bart-large-xsum | mistral-7b-qlora | llama-3.1-8b-qlora, or a YAML path"),
    more: Optional[list[Path]] = typer.Argument(None, metavar="FILE", help="More Q&A files, as --data (so `--data a.jsonl b.csv` reads both)"),
    data: Optional[list[Path]] = typer.Option(None, "--data", help="Q&A files (default: the shipped data/qa/aiml_qa.jsonl)"),
    context: Optional[str] = typer.Option(None, help="none | rag (retrieval-aware training)"),
    out: Optional[Path] = typer.Option(None, help="Output dir (default: $AIMLQA_HOME/finetuned/NAME)"),
    name: Optional[str] = typer.Option(None, help="Registry name (default: the recipe name, -rag with --context rag)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a recipe field: key=value (repeatable)"),
    register_on: Optional[str] = typer.Option(None, "--register", metavar="URL", help="Then serve the adapter on this running server (replacing one of the same name)"),
):
    """Fine-tune a model on course Q&A and register it for `aimlqa ask --model NAME` and the server."""
    from aimlqa import settings
    from finetune.recipe import load_recipe
    from finetune.run import finetune

    if register_on:
        from rag.remote import ServerClient

        client = ServerClient(register_on)
        client.models()  # a server that cannot be reached is said now, not after the training
    overrides = list(set_ or [])
    if context:
        overrides.append(f"context={context}")
    r = load_recipe(recipe, overrides)
    files = list(data or []) + list(more or [])
    manifest = finetune(r, files or [settings.qa_file()], out, name)
    if manifest.get("stopped"):
        typer.echo(f"stopped at step {manifest['step']}; checkpoint {manifest['checkpoint']}; run the same command to resume")
        raise typer.Exit(130)
    typer.echo(json.dumps({k: manifest[k] for k in ("name", "method", "steps", "wall_s", "best_metric", "final_metrics")}, indent=2))
    typer.echo(f"registered {manifest['name']!r}: aimlqa ask --model {manifest['name']} \"...\"")
    if register_on:
        from rag.cli import load_on_server

        if manifest.get("method") == "full":
            typer.echo(f"not loaded on {register_on}: a full fine-tune is a model, not an adapter; serve it with `aimlqa serve -m {manifest['name']}`")
        else:
            typer.echo(load_on_server(client, manifest["name"], Path(manifest["registered"]["adapter"]).parent, replace=True))


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune_cmd)
