"""Q&A pairs from every layout the course has used, as one record type, de-duplicated and split.

Layouts: CSV with `,Q,A,Unit` (leading index column), `,Q,A,unit` (float units, empty cells),
`Question,Answer`, `Questions,Answers` (newlines inside quoted answers), and JSONL with
`question`/`answer`/`unit`. Bytes are decoded as UTF-8 (BOM stripped), falling back to cp1252.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from aimlqa.settings import UserError
from index.text import normalise_question, sha256_text

QUESTION_KEYS = ("q", "question", "questions")
ANSWER_KEYS = ("a", "answer", "answers")
UNIT_KEYS = ("unit", "units")
SPLITS = ("train", "validation", "test")


@dataclass
class QARecord:
    question: str
    answer: str
    unit: str = ""
    source: str = ""
    id: str = ""
    gold: list[str] = field(default_factory=list)
    split: str = ""

    @property
    def key(self) -> str:
        return normalise_question(self.question)

    def owns(self, chunk) -> bool:
        """Whether an index chunk is this record's own Q&A pair."""
        return chunk.kind == "qa" and normalise_question(chunk.section) == self.key

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in ("", [], None)}


def read_text(path: Path) -> str:
    """UTF-8 first (BOM stripped); cp1252 where that fails, with undecodable bytes replaced."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def _unit(value) -> str:
    """'3', 3, 3.0 and '3.0' are all unit '3'; empty or NaN is ''."""
    if value is None:
        return ""
    text = str(value).strip()
    if not text or text.lower() == "nan":
        return ""
    try:
        f = float(text)
        return str(int(f)) if f.is_integer() else text
    except ValueError:
        return text


def _pick(row: dict, keys: tuple[str, ...]):
    for k, v in row.items():
        if k is not None and k.strip().lower() in keys:
            return v
    return None


def _from_rows(rows: list[dict], path: Path, columns: list[str]) -> list[QARecord]:
    lowered = {c.strip().lower() for c in columns if c is not None}
    if not lowered & set(QUESTION_KEYS) or not lowered & set(ANSWER_KEYS):
        raise UserError(
            f"{path}: no question/answer columns (found {sorted(lowered) or 'none'}); "
            "expected a header with Q/Question/Questions and A/Answer/Answers, or JSONL with 'question' and 'answer'"
        )
    out = []
    for row in rows:
        q, a = (_pick(row, QUESTION_KEYS) or "").strip(), (_pick(row, ANSWER_KEYS) or "").strip()
        if not q or not a:
            continue
        gold = row.get("gold") or []
        out.append(
            QARecord(
                question=q,
                answer=a,
                unit=_unit(_pick(row, UNIT_KEYS)),
                source=str(row.get("source") or path.name),
                id=str(row.get("id") or ""),
                gold=list(gold) if isinstance(gold, list) else [str(gold)],
                split=str(row.get("split") or ""),
            )
        )
    return out


def load_qa(path: str | Path) -> list[QARecord]:
    """Read one Q&A file (CSV or JSONL) into records; an unusable file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such Q&A file")
    text = read_text(path)
    if not text.strip():
        raise UserError(f"{path}: the file is empty; expected Q&A rows (CSV with a Q/A header, or JSONL)")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows, columns = [], set()
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg}); expected one object per line") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n}: expected a JSON object with 'question' and 'answer'")
            rows.append(row)
            columns |= set(row)
        records = _from_rows(rows, path, sorted(columns))
    else:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        records = _from_rows(list(reader), path, reader.fieldnames or [])
    if not records:
        raise UserError(f"{path}: has a header but no rows with both a question and an answer")
    return records


def load_many(paths) -> list[QARecord]:
    return dedupe([r for p in paths for r in load_qa(p)])


def dedupe(records: list[QARecord]) -> list[QARecord]:
    """Keep the first record for each normalised question."""
    seen, out = set(), []
    for r in records:
        if r.key not in seen:
            seen.add(r.key)
            out.append(r)
    return out


def split_of(question: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), salt: str = "aimlqa") -> str:
    """Deterministic split by a hash of the normalised question: duplicates always land together."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise UserError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    digest = hashlib.sha256(f"{salt}:{normalise_question(question)}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "validation" if u < fractions[0] + fractions[1] else "test"


def split_records(records: list[QARecord], fractions=(0.8, 0.1, 0.1), salt: str = "aimlqa") -> dict[str, list[QARecord]]:
    """train/validation/test; a record's own `split` field (a fixed split) wins over the hash."""
    out: dict[str, list[QARecord]] = {s: [] for s in SPLITS}
    for r in dedupe(records):
        out[r.split if r.split in SPLITS else split_of(r.question, fractions, salt)].append(r)
    return out


def select_split(records: list[QARecord], split: str | None, fractions=(0.8, 0.1, 0.1)) -> list[QARecord]:
    if split in (None, "", "all"):
        return dedupe(records)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)} or 'all'")
    return split_records(records, fractions)[split]


def records_hash(records: list[QARecord]) -> str:
    return sha256_text(*(f"{r.question}\t{r.answer}" for r in records))[:16]


def write_jsonl(records: list[QARecord], path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
    tmp.replace(path)
