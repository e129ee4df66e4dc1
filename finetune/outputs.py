"""A run's output folder: what may be written there, which checkpoint resumes it, and refusing to
resume another run's checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint

from aimlqa.settings import UserError, ensure_dir


def last_checkpoint(out: Path) -> str | None:
    ck = out / "checkpoints"
    return get_last_checkpoint(str(ck)) if ck.is_dir() else None


RUN_MARKS = ("manifest.json", "checkpoints", "loss.csv", "train_index")  # what only a run writes


def output_dir(out: Path) -> Path:
    """The run's output dir, made if missing. A run replaces its adapter/model and checkpoints there,
    so a folder holding anything else (not a run's output) is refused rather than written into."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not any((out / f).exists() for f in RUN_MARKS):
        raise UserError(f"--out {out} holds other files, not a fine-tuning run's output; pass a new or empty directory")
    return ensure_dir(out)


def _flat(d: dict, prefix: str = "") -> dict:
    items = {}
    for k, v in d.items():
        items.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return items


def guard_resume(out: Path, run: dict) -> str | None:
    """The checkpoint to resume from, only if it came from this very run (recipe, base and data).

    Resuming another run's checkpoint would load its optimizer and schedule under new settings or
    new data and mix the two without a word; so a difference is refused, naming what changed."""
    path = out / "checkpoints" / "run.json"
    checkpoint = last_checkpoint(out)
    if checkpoint and path.is_file():
        before = _flat(json.loads(path.read_text()))
        now = _flat(json.loads(json.dumps(run)))
        changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)]
        if changed:
            more = f"; and {len(changed) - 6} more" if len(changed) > 6 else ""
            raise UserError(
                f"{out} holds checkpoints of a stopped run with other settings ({'; '.join(changed[:6])}{more}); "
                f"run the same command as before to resume it, or pass another --out (or delete {out / 'checkpoints'}) to start afresh"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json(path, run)
    return checkpoint


def save_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
