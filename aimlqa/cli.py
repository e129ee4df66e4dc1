"""The `aimlqa` command: each package mounts its own sub-commands here.

The packages are found through the `aimlqa.commands` entry points (pyproject.toml), not imported
by name: this module sits in the bottom layer beside the settings that every package imports, so
it must import none of them.
"""

from __future__ import annotations

import os
import sys
import warnings

import typer

from aimlqa.settings import UserError

app = typer.Typer(help="Question answering for an AI/ML course.", no_args_is_help=True, pretty_exceptions_enable=False)


ORDER = ("index", "rag", "finetune", "server", "eval")  # as `aimlqa --help` lists them: the data flow


def _mount() -> None:
    """Add every installed package's sub-commands to `app`, once."""
    from importlib.metadata import entry_points

    if app.registered_groups or app.registered_commands:
        return
    found = sorted(entry_points(group="aimlqa.commands"), key=lambda ep: (ORDER.index(ep.name) if ep.name in ORDER else len(ORDER), ep.name))
    if not found:
        raise UserError("no aimlqa commands are installed; reinstall the project: make install (or pip install -e .)")
    for ep in found:
        try:
            register = ep.load()
        except ModuleNotFoundError as e:  # a package left out of this install
            if e.name and e.name.split(".")[0] == ep.value.split(".")[0]:
                continue
            raise
        register(app)


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
