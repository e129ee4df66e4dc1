"""The ablation matrix as a validated config: which models, settings, datasets and index corpus.

Relative paths in a YAML file are resolved against the file's directory (so `bench/ablation.yaml`
runs from any working directory); `~` and `$VARS` are expanded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from aimlqa import settings
from aimlqa.settings import MODES, UserError, read_yaml_mapping, validation_message
from eval.metrics import HIT_THRESHOLD

Split = Literal["train", "validation", "test", "all"]
Mode = Literal[MODES]  # the retriever's own list: dense, bm25, hybrid


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetConfig(_Strict):
    """One Q&A file (any layout `index.qa.load_qa` reads) and the split to evaluate on."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    path: Path
    split: Split = "test"
    optional: bool = False  # a missing file is skipped with a note in the report, not an error
    compare_seed: bool = False  # show the seed's published figures beside this dataset's table
    # abstain: questions the notes do not answer (data/ooc): the figure is how often the service says so
    expect: Literal["answer", "abstain"] = "answer"
    index_with: Optional[str] = None  # answer from another dataset's index (out-of-course questions: the served one)


class CorpusConfig(_Strict):
    """What the evaluation index holds: prose sources plus one split of the evaluated file.

    By default the course notes and the evaluated file's training split; never the evaluated
    answers, unless `index_evaluated` asks for it (the report then flags the run as leaky).
    """

    sources: list[Path] = Field(default_factory=lambda: [settings.course_dir()])
    dataset_split: Optional[Split] = "train"  # None: index none of the evaluated file
    index_evaluated: bool = False
    index: Optional[Path] = None  # an index already built: used as is (the leakage guard still runs)
    embed_model: str = "all-MiniLM-L6-v2"
    chunk_size: int = Field(200, ge=16)
    chunk_overlap: int = Field(30, ge=0)


class Headline(_Strict):
    """The grounded setting the headline table and chart show (fixed in advance, not the best cell)."""

    k: int = Field(3, ge=1)
    mode: Mode = "hybrid"


class AblationConfig(_Strict):
    name: str = "ablation"
    models: list[str] = Field(min_length=1)
    rag: list[bool] = [False, True]
    top_k: list[int] = [1, 3, 5]
    modes: list[Mode] = ["dense", "hybrid"]
    datasets: list[DatasetConfig] = Field(min_length=1)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    headline: Headline = Field(default_factory=Headline)
    max_new_tokens: int = Field(64, ge=1, le=2048)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    num_beams: int = Field(1, ge=1, le=16)  # beam search for every generated cell (greedy only); ~num_beams x the time
    batch_size: int = Field(32, ge=1)  # decoding a small model on a CPU is memory-bound: wide batches are nearly free
    threads: Optional[int] = Field(None, ge=1)  # torch threads; 1 is much faster on a CPU other jobs share
    limit: Optional[int] = Field(None, ge=1)  # questions per dataset, the first N of the split
    seed: int = 0
    bootstrap: int = Field(1000, ge=100)
    hit_threshold: float = Field(HIT_THRESHOLD, gt=0.0, le=1.0)
    out: Optional[Path] = None
    server: Optional[str] = Field(None, pattern=r"^https?://")  # answer through a running server's REST API

    @field_validator("models", "top_k", "modes", "rag")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"has duplicates: {v}")
        return v

    @field_validator("top_k")
    @classmethod
    def _positive(cls, v):
        if not v or any(k < 1 for k in v):
            raise ValueError("every k must be at least 1")
        return v

    @model_validator(mode="after")
    def _names(self):
        names = [d.name for d in self.datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}")
        for d in self.datasets:
            if d.index_with is not None and d.index_with not in names:
                raise ValueError(f"dataset {d.name!r}: index_with names {d.index_with!r}, which is not a dataset here ({', '.join(names)})")
        if not self.rag:
            raise ValueError("rag must list at least one of false, true")
        if True in self.rag and not self.modes:
            raise ValueError("grounded cells need at least one retrieval mode")
        return self

    def resolved(self, base: Path) -> "AblationConfig":
        """A copy with every path expanded and made absolute against `base`."""

        def fix(p: Path) -> Path:
            p = Path(os.path.expandvars(os.path.expanduser(str(p))))
            return p if p.is_absolute() else (base / p).resolve()

        data = self.model_copy(deep=True)
        for d in data.datasets:
            d.path = fix(d.path)
        data.corpus.sources = [fix(s) for s in data.corpus.sources]
        if data.corpus.index is not None:
            data.corpus.index = fix(data.corpus.index)
        if data.out is not None:
            data.out = fix(data.out)
        return data


def load_config(path: str | Path, **overrides) -> AblationConfig:
    """Read and validate a YAML config; overrides (e.g. limit, out) win over the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such config file")
    data = read_yaml_mapping(path, "a mapping with models, datasets, ...")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = AblationConfig(**data)
    except ValidationError as e:
        raise UserError(f"{path}: {validation_message(e, AblationConfig)}") from None
    return config.resolved(path.resolve().parent)


def make_config(**fields) -> AblationConfig:
    """A config built in code (the one-cell `eval score`), validated the same way."""
    try:
        return AblationConfig(**fields).resolved(Path.cwd())
    except ValidationError as e:
        raise UserError(validation_message(e, AblationConfig)) from None

