"""Paths and defaults that tie the packages together, overridable by environment."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Retrieval for grounded answers (serving, evaluation, validation while fine-tuning): FAISS and BM25
# fused by reciprocal rank. It ranks the right passage higher than FAISS alone (bench/retrieval.py:
# gold-section MRR 0.844 against 0.793, group18 own-answer MRR 0.722 against 0.710) for about 1.3 ms
# more a query, and the answers grounded in it are level: ROUGE-L at k=3 on the validation questions
# (2026-12-02), gemma-270m +0.035 on aiml_qa (p = 0.05) and -0.007 on group18, the retrieval-aware
# adapter +0.009 and -0.005 (p >= 0.47).
MODES = ("dense", "bm25", "hybrid")
DEFAULT_MODE = "hybrid"

# What `aimlqa ask` answers with and `make run` serves: the embedded Gemma 3 270M with the
# retrieval-aware adapter shipped in rag/adapters/ (its manifest says how it was trained), on
# llama.cpp, the fastest back end on a CPU (bench/results/llamacpp.json). The same adapter on
# transformers is one name away and serves beside it (it also takes adapters loaded live), as
# does the untuned base; without llama.cpp built, the transformers one is the default.
DEFAULT_MODEL = "gemma-270m-aiml-cpp"
TRANSFORMERS_MODEL = "gemma-270m-aiml"
BASE_MODEL = "gemma-270m"


def default_model() -> str:
    import importlib.util

    return DEFAULT_MODEL if importlib.util.find_spec("llama_cpp") is not None else TRANSFORMERS_MODEL


def default_models() -> list[str]:
    """What `aimlqa serve` serves when no --model is given; the first is the default."""
    return list(dict.fromkeys([default_model(), TRANSFORMERS_MODEL, BASE_MODEL]))


def threads() -> int:
    """CPU threads a model may use: all the machine's, or `AIMLQA_THREADS` (a Ray replica's share)."""
    return int(os.environ.get("AIMLQA_THREADS") or 0) or os.cpu_count() or 1


def home() -> Path:
    """Where converted models, indexes and fine-tuned adapters live (`AIMLQA_HOME`)."""
    return Path(os.environ.get("AIMLQA_HOME", Path.home() / ".cache" / "aimlqa")).expanduser()


def data_dir() -> Path:
    """The project's own course notes and Q&A set (`AIMLQA_DATA`, default the shipped `data/`)."""
    return Path(os.environ.get("AIMLQA_DATA", REPO_ROOT / "data"))


def group18_dir() -> Path:
    """The seed course project's Q&A data, for developers' tests and benchmarks only (never shipped):
    `AIMLQA_GROUP18`, else `shared/data/group18` beside the checkout."""
    return Path(os.environ.get("AIMLQA_GROUP18", REPO_ROOT.parent / "shared" / "data" / "group18"))


def course_dir() -> Path:
    return data_dir() / "course"


def qa_file() -> Path:
    return data_dir() / "qa" / "aiml_qa.jsonl"


def adapters_dir() -> Path:
    """Where `aimlqa finetune` writes adapters, and the only place a server loads them from live."""
    return home() / "finetuned"


def default_index_dir() -> Path:
    return Path(os.environ.get("AIMLQA_INDEX", home() / "indexes" / "course"))


class UserError(Exception):
    """A problem with the user's input: shown as one clear line, never as a traceback."""


def check_mode(mode: str) -> str:
    """The one check of a retrieval mode, for the command line, the Answerer and the Retriever."""
    if mode not in MODES:
        raise UserError(f"unknown retrieval mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


def check_out_dir(path: Path, flag: str = "--out") -> Path:
    """An output directory that can be made or written, checked before the work whose results go there
    and without making it, so that a stopped run leaves no trace."""
    path = Path(path)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file; pass a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not writable; pass a writable directory")
    return path


def ensure_dir(path: Path, flag: str = "--out") -> Path:
    """An output directory, made if missing."""
    path = check_out_dir(path, flag)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create it ({e.strerror}); pass a writable directory") from None
    return path


def read_yaml_mapping(path: Path, expected: str) -> dict:
    """A YAML file that must hold a mapping; bad YAML or another shape is a UserError naming the file."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected {expected}")
    return data


def validation_message(error, model=None) -> str:
    """A pydantic ValidationError's first problem as `field.path: message` (`config: ...` for the whole)."""
    err = error.errors()[0]
    return error_message(err, model, [str(x) for x in err["loc"]] or ["config"])


def error_message(err: dict, model=None, loc: list[str] | None = None) -> str:
    """One pydantic error as `field.path: message` (`loc`: the path, when the caller trims it). An
    unknown field names the fields its place knows, when `model` (the validated class) is given,
    since a typo is the usual cause."""
    loc = [str(x) for x in err.get("loc", ())] if loc is None else loc
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden" and (known := known_fields(model, loc[:-1])):
        msg = f"unknown field; known: {', '.join(known)}"
    return f"{'.'.join(loc)}: {msg}" if loc else msg


def known_fields(model, path: list[str]) -> list[str]:
    """The field names of the (nested) pydantic model at a validation error's location (list indexes
    skipped); none when the model is unknown or the place is not a model."""
    from typing import get_args

    from pydantic import BaseModel

    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    for part in path:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        kinds = [field.annotation, *get_args(field.annotation)]
        model = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
        if model is None:
            return []
    return sorted(model.model_fields)
