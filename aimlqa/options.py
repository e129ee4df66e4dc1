"""Command-line options that several sub-commands share, defined once."""

from __future__ import annotations

import typer

from aimlqa.settings import DEFAULT_MODE, UserError, check_mode


def _check_mode(value: str) -> str:
    try:
        return check_mode(value)
    except UserError as e:
        raise typer.BadParameter(str(e)) from None


def mode_option():
    """`--mode`, checked when the command line is read (not at the first search, or never without an index)."""
    return typer.Option(DEFAULT_MODE, callback=_check_mode, help="Retrieval: dense | bm25 | hybrid (reciprocal-rank fusion of the two)")
