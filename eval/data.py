"""The evaluated questions, the index they are answered from, and the guard that keeps them apart.

An index for evaluation holds the course notes and the *training* split of the evaluated file, so
retrieval can help with near-duplicate questions but never hands the model the reference answer.
The guard checks the built index itself (not the config's intent): a Q&A chunk whose question or
answer equals an evaluated one is a leak, and the run stops unless the config asked for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from aimlqa import settings
from aimlqa.settings import UserError
from eval.config import AblationConfig, DatasetConfig
from index.corpus import qa_answer
from index.qa import QARecord, load_many, load_qa, records_hash, select_split, split_records
from index.text import normalise_question, sha256_text


@dataclass
class EvalSet:
    """One dataset's evaluated questions (its split, limited), with the hashes that identify them."""

    config: DatasetConfig
    records: list[QARecord]
    file_hash: str
    split_hash: str
    split_size: int
    gold_of: dict = field(default_factory=dict)  # Q&A chunk section id -> its pair's gold sections (all splits)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def has_gold(self) -> bool:
        return any(r.gold for r in self.records)


def question_key(record: QARecord) -> str:
    """A stable id for a question: its own id when the file has one, else a hash of its text."""
    return record.id or sha256_text(record.key)[:12]


def load_evalset(ds: DatasetConfig, limit: int | None) -> EvalSet | None:
    """None when an optional dataset's file is missing (the caller notes it)."""
    if not ds.path.is_file() and ds.optional:
        return None
    records = load_qa(ds.path)
    split = select_split(records, ds.split)
    if not split:
        raise UserError(f"{ds.path}: the {ds.split!r} split is empty; choose another split for dataset {ds.name!r}")
    chosen = split[:limit] if limit else split
    # a cited training pair of this file counts as citing the sections it was written from
    gold_of = {f"{ds.path.stem}#{r.id}": r.gold for r in records if r.id and r.gold}
    return EvalSet(ds, chosen, records_hash(records), records_hash(chosen), len(split), gold_of)


# --- the index --------------------------------------------------------------------------------


@dataclass
class EvalIndex:
    retriever: object
    path: Path
    manifest_hash: str
    manifest: dict
    leaked: list[str] = field(default_factory=list)  # evaluated questions found in the index

    @property
    def leaky(self) -> bool:
        return bool(self.leaked)

    def is_own(self, chunk_id: int, record: QARecord) -> bool:
        """Whether a retrieved chunk is the evaluated question's own Q&A pair."""
        return record.owns(self.retriever.chunks[chunk_id])


def _index_plan(config: AblationConfig, evalset: EvalSet) -> tuple[list[Path], str | None]:
    corpus = config.corpus
    sources = list(corpus.sources)
    if corpus.index_evaluated:
        return sources + [evalset.config.path], None  # every split of the file, on purpose
    if corpus.dataset_split is None:
        return sources, None
    return sources + [evalset.config.path], (None if corpus.dataset_split == "all" else corpus.dataset_split)


def index_dir(config: AblationConfig, evalset: EvalSet) -> Path:
    """One directory per distinct corpus, so configs that index differently do not rebuild each other's."""
    sources, qa_split = _index_plan(config, evalset)
    c = config.corpus
    key = sha256_text(*map(str, sources), str(qa_split), c.embed_model, str(c.chunk_size), str(c.chunk_overlap))[:10]
    return settings.home() / "eval" / "indexes" / f"{evalset.name}-{key}"


def prepare_index(config: AblationConfig, evalset: EvalSet, embedder=None, progress: bool = True) -> EvalIndex:
    """Build (or reuse) the evaluation index for a dataset, open it, and run the leakage guard."""
    from index.embed import Embedder
    from index.retriever import Retriever, build_index
    from index.store import BuildConfig

    c = config.corpus
    if c.index is not None:
        path = c.index
    else:
        sources, qa_split = _index_plan(config, evalset)
        missing = [s for s in sources if not Path(s).exists()]
        if missing:
            raise UserError(f"corpus source {missing[0]} does not exist; fix corpus.sources in the config")
        path = index_dir(config, evalset)
        embedder = embedder or Embedder(c.embed_model)
        build_index(sources, path, BuildConfig(c.embed_model, c.chunk_size, c.chunk_overlap, "flat", qa_split), progress=progress, embedder=embedder)
    retriever = Retriever.load(path, embedder=embedder) if embedder else Retriever.load(path)
    return guarded(config, evalset, retriever, Path(path))


def guarded(config: AblationConfig, evalset: EvalSet, retriever, path: Path) -> EvalIndex:
    """The index for a dataset, once the leakage guard has passed it."""
    c = config.corpus
    leaked = find_leaks(retriever.chunks, evalset.records)
    if leaked and not c.index_evaluated:
        raise UserError(
            f"leakage: {len(leaked)} of the {len(evalset.records)} evaluated questions of {evalset.name!r} "
            f"({evalset.config.split} split) have their Q&A pair in the index {path}, e.g. {leaked[0]!r}. "
            "Index another split (corpus.dataset_split: train) or, to measure with the answers indexed on purpose, "
            "set corpus.index_evaluated: true (eval score: --allow-leak); the report then flags the run"
        )
    return EvalIndex(retriever, Path(path), retriever.manifest_hash, retriever.manifest, leaked)


def find_leaks(chunks, records: list[QARecord]) -> list[str]:
    """Evaluated questions whose pair is in the index: a Q&A chunk with the same question or the
    same answer (both normalised). Prose notes are course material, not the Q&A set: a note that
    states what an answer says is what retrieval is for, and is not counted."""
    by_question = {r.key: r for r in records}
    by_answer = {a: r for r in records if (a := normalise_question(r.answer))}
    leaked: dict[str, str] = {}
    for c in chunks:
        if c.kind != "qa":
            continue
        answer = qa_answer(c.text)
        answer = c.text if answer is None else answer
        for r in (by_question.get(normalise_question(c.section)), by_answer.get(normalise_question(answer) or None)):
            if r is not None:
                leaked[r.key] = r.question
    return list(leaked.values())


def trained_on(finetune: dict, evalset: EvalSet) -> int:
    """How many evaluated questions were in a fine-tune's training split, recomputed from the data
    files and split fractions its manifest records (0 when those files are not here)."""
    files = [Path(d) for d in finetune.get("data") or [] if Path(d).is_file()]
    if not files:
        return 0
    fractions = tuple(finetune.get("split_fractions") or (0.8, 0.1, 0.1))
    train = {r.key for r in split_records(load_many(files), fractions)["train"]}
    return sum(r.key in train for r in evalset.records)
