"""Command-line options that several sub-commands share, defined once."""

from __future__ import annotations

import typer

from aimlqa.settings import DEFAULT_MODE, MODES


def _check_mode(value: str) -> str:
    if value not in MODES:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(MODES)}")
    return value


def mode_option():
    """`--mode`, checked when the command line is read (not at the first search, or never without an index)."""
    return typer.Option(DEFAULT_MODE, callback=_check_mode, help="Retrieval: dense | bm25 | hybrid (reciprocal-rank fusion of the two)")
