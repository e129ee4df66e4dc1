"""JSON lines of results, written whole or not at all (`aimlqa.files.write_text`)."""

from __future__ import annotations

import json
from pathlib import Path

from aimlqa.files import write_text


def write_jsonl(path: str | Path, rows) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
