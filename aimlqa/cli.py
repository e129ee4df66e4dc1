"""The `aimlqa` command: each package mounts its own sub-commands here."""

from __future__ import annotations

import os
import sys
import warnings

import typer

from aimlqa.settings import UserError

app = typer.Typer(help="Question answering for an AI/ML course.", no_args_is_help=True, pretty_exceptions_enable=False)


def _mount() -> None:
    from index.cli import app as index_app
    from index.cli import data_app

    app.add_typer(index_app, name="index", help="Build, inspect and search a course-material index.")
    app.add_typer(data_app, name="data", help="Check the project's course notes and Q&A set.")
    for module in ("rag.cli", "finetune.cli", "server.cli", "eval.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.register(app)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # model-loading bars; our own progress stays
    # peft asks transformers a deprecated question when it loads an adapter: noise to a user, not news
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    _mount()
    try:
        app()
    except UserError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted; nothing half-written was kept", fg=typer.colors.YELLOW, err=True)
        sys.exit(130)
