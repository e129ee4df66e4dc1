"""Files that many processes may need at once: built by the first, read whole by all."""

from __future__ import annotations

import fcntl
import shutil
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
