"""Files written so that no reader sees half of one: replaced atomically (`atomic_path`), or, when many
processes may need one at once, built by the first (`built_once`)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


def built_once(out: Path, build: Callable[[Path], Path], ready: Callable[[Path], bool] = Path.exists) -> Path:
    """`out`, built by the first process to need it: under a file lock, in a scratch directory, then
    published by rename, so that processes starting at once neither build twice nor read half a file.

    `build(workdir)` makes the file or directory and returns its path inside `workdir`.
    """
    out = Path(out)
    if ready(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready(out):  # another process built it while we waited
            return out
        work = out.parent / f".{out.name}.tmp"
        shutil.rmtree(work, ignore_errors=True)
        try:
            work.mkdir()
            Path(build(work)).rename(out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary sibling path; it replaces `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
