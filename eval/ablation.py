"""The ablation runner: every cell of the matrix (model x rag x k x mode x dataset), cached.

Each cell's predictions are cached under a fingerprint of everything that determines them (model
and adapter, index, k, mode, generation settings), one file per cell rewritten atomically after
each batch. A stopped run therefore resumes at the batch it stopped in, a changed model or index
starts a fresh cell, and a larger `--limit` only generates the questions that are new.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

from aimlqa import settings
from aimlqa.settings import UserError
from eval import provenance
from eval.config import AblationConfig
from eval.data import EvalIndex, EvalSet, guarded, load_evalset, prepare_index, question_key, trained_on
from eval.files import read_jsonl, write_jsonl

CACHE_VERSION = 1


@dataclass(frozen=True)
class Cell:
    dataset: str
    model: str
    rag: bool
    k: int = 0
    mode: str = ""

    @property
    def name(self) -> str:
        return f"rag-{self.mode}-k{self.k}" if self.rag else "plain"

    @property
    def id(self) -> str:
        return f"{self.dataset}/{self.model}/{self.name}"

    @property
    def setting(self) -> str:
        return f"grounded k={self.k} {self.mode}" if self.rag else "plain"


def served_specs(server: str) -> dict:
    """What a running server serves, as registry entries (its `/v1/models` cards)."""
    from rag.registry import ModelSpec
    from rag.remote import ServerClient

    return {c["id"]: ModelSpec(name=c["id"], family=c["family"], backend=c["backend"], base=c.get("parent") or "",
                               description=c.get("description", "")) for c in ServerClient(server).models()}


def resolve_models(names: list[str], notes: list[str], server: str | None = None) -> dict:
    """Registered specs for the listed names (or those a server serves); an unknown one is skipped with a note."""
    from rag.registry import load_registry

    registry = served_specs(server) if server else load_registry()
    specs = {}
    for name in names:
        if name in registry:
            specs[name] = registry[name]
        else:
            notes.append(f"model `{name}` skipped: not served by {server} (it serves {', '.join(registry)})" if server else
                         f"model `{name}` skipped: not registered (fine-tune it, or see `aimlqa models`)")
    if not specs:
        where = f"served by {server} (it serves {', '.join(registry)})" if server else "registered; see `aimlqa models`"
        raise UserError(f"none of the listed models is {where}: {', '.join(names)}")
    return specs


def plan_cells(config: AblationConfig, specs: dict, datasets: list[str], notes: list[str]) -> list[Cell]:
    """Plain cells once per model (they depend on neither k nor mode); grounded ones per k and mode.
    The retrieval-only floor always retrieves, so it has grounded cells only."""
    cells = []
    for name, spec in specs.items():
        floor = spec.backend == "retrieval"
        if floor and True not in config.rag:
            notes.append(f"model `{name}` has no cells: the retrieval-only floor needs rag on")
            continue
        for ds in datasets:
            if False in config.rag and not floor:
                cells.append(Cell(ds, name, False))
            if True in config.rag:
                cells += [Cell(ds, name, True, k, mode) for mode in config.modes for k in config.top_k]
    return cells


class MemoGenerator:
    """Greedy decoding is a function of the prompt, so a prompt already answered in this run (the
    same top passage under dense and hybrid, say) is answered from memory instead of again."""

    def __init__(self, inner):
        self.inner = inner
        self.context_window = inner.context_window
        self.memo: dict = {}
        self.hits = 0

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def generate(self, prompts, config):
        if not config.greedy:
            return self.inner.generate(prompts, config)
        tag = (config.max_new_tokens, config.stop, config.repetition_penalty, config.num_beams)
        todo = list(dict.fromkeys(p for p in prompts if (p, tag) not in self.memo))
        for p, g in zip(todo, self.inner.generate(todo, config) if todo else []):
            self.memo[(p, tag)] = g
        self.hits += len(prompts) - len(todo)
        return [self.memo[(p, tag)] for p in prompts]


class CellCache:
    """One cell's finished predictions by question key; rewritten whole (temp + rename) per batch."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = {r["key"]: r for r in read_jsonl(path)}

    def add(self, rows: list[dict]) -> None:
        self.rows.update((r["key"], r) for r in rows)
        write_jsonl(self.path, self.rows.values())


@dataclass
class Plan:
    """Everything a run needs before generating: resolved models, data, indexes, retrieval, cells."""

    config: AblationConfig
    specs: dict
    infos: dict
    evalsets: dict[str, EvalSet]
    indexes: dict[str, EvalIndex]
    retrieval: dict  # (dataset, mode, k) -> per-question retrieval records, in evalset order
    cells: list[Cell]
    notes: list[str]
    trained_on: dict  # fine-tuned model -> dataset -> evaluated questions in its training split
    attributors: dict = field(default_factory=dict)  # dataset -> rag.attribution.Attributor, made when scoring

    def fingerprint(self, cell: Cell) -> str:
        """What determines a cell's predictions (not the question list: a question's answer does not depend on it)."""
        c = self.config
        # num_beams only when beam search is on, so greedy cells cached before the field existed stay valid
        generation = None if self.specs[cell.model].backend == "retrieval" else (c.max_new_tokens, c.temperature, c.seed) + ((c.num_beams,) if c.num_beams > 1 else ())
        index = self.indexes[cell.dataset].manifest_hash if cell.rag else None
        return provenance.fingerprint(CACHE_VERSION, self.infos[cell.model], cell.rag, cell.k, cell.mode, index, generation)

    def drop_model(self, model: str, note: str) -> None:
        self.cells = [c for c in self.cells if c.model != model]
        self.specs.pop(model, None)
        self.infos.pop(model, None)
        self.notes.append(note)

    def cache(self, cell: Cell) -> CellCache:
        root = settings.home() / "eval" / "cache" / cell.dataset / cell.model
        return CellCache(root / f"{cell.name}-{self.fingerprint(cell)}.jsonl")


def retrieve_all(config: AblationConfig, evalsets: dict, indexes: dict, cells: list[Cell]) -> dict:
    """The passages for every (dataset, mode, k) a cell uses, each retrieved once, with the
    retrieval metrics that go with them (gold sections where known, answer hits everywhere)."""
    from eval.metrics import answer_hits, gold_ranking

    out = {}
    for ds, mode, k in sorted({(c.dataset, c.mode, c.k) for c in cells if c.rag}):
        es, ix = evalsets[ds], indexes[ds]
        hits = ix.retriever.search_many([r.question for r in es.records], k, mode)
        rows = []
        for r, passages in zip(es.records, hits):
            own = [ix.is_own(p.chunk_id, r) for p in passages] if ix.leaky else None
            row = {"sections": [p.section_id for p in passages], "chars": sum(len(p.text) for p in passages)}
            row |= answer_hits([p.text for p in passages], r.answer, k, config.hit_threshold, own)
            if r.gold:
                row |= gold_ranking(row["sections"], r.gold, k)
            rows.append(row)
        out[(ds, mode, k)] = rows
    return out


def prepare(config: AblationConfig, embedder=None, progress: bool = True) -> Plan:
    notes: list[str] = []
    specs = resolve_models(config.models, notes, config.server)
    if config.server:
        notes.append(f"answers came through {config.server}'s REST API, grounded by the server's own index; "
                     "the retrieval figures are those of the local evaluation index")
    evalsets = {}
    for ds in config.datasets:
        es = load_evalset(ds, config.limit)
        if es is None:
            notes.append(f"dataset `{ds.name}` skipped: {ds.path} is missing (marked optional)")
            continue
        evalsets[ds.name] = es
    if not evalsets:
        raise UserError("no dataset to evaluate: every listed dataset file is missing")
    cells = plan_cells(config, specs, list(evalsets), notes)
    if not cells:
        raise UserError("the config names no cell to run (check models and rag)")
    indexes = {}
    if any(c.rag for c in cells):
        from index.embed import Embedder

        embedder = embedder or Embedder(config.corpus.embed_model)
        for name, es in sorted(evalsets.items(), key=lambda kv: kv[1].config.index_with is not None):
            other = es.config.index_with
            if other is not None and other in indexes:
                indexes[name] = guarded(config, es, indexes[other].retriever, indexes[other].path)
                continue
            indexes[name] = prepare_index(config, es, embedder, progress)
            if indexes[name].leaky:
                notes.append(
                    f"LEAKY: the index for `{name}` holds {len(indexes[name].leaked)} of the evaluated Q&A pairs "
                    "(corpus.index_evaluated is set); its grounded scores are not a test of generalisation"
                )
    infos = {name: provenance.model_info(spec) | ({"merged_for_eval": True} if spec.adapter else {}) for name, spec in specs.items()}
    if config.server:
        # what a served name means can change between runs (an adapter reloaded under it): never reuse
        infos = {name: info | {"server": config.server, "fine_tuned": bool(specs[name].base), "asked_at": provenance.now()}
                 for name, info in infos.items()}
    trained = {name: {ds: trained_on(info["finetune"], es) for ds, es in evalsets.items()} for name, info in infos.items() if info.get("finetune")}
    notes += [f"LEAKY: `{name}` was fine-tuned on {n} of the {len(evalsets[ds].records)} evaluated questions of `{ds}`; "
              "its scores there are not a test of generalisation" for name, per in trained.items() for ds, n in per.items() if n]
    return Plan(config, specs, infos, evalsets, indexes, retrieve_all(config, evalsets, indexes, cells), cells, notes, trained)


def _answer_row(key: str, question: str, a) -> dict:
    return {
        "key": key,
        "question": question,
        "prediction": a.text,
        "sources": [{"section_id": s.section_id, "source": s.source, "score": s.score, "text": s.text, "chunk_id": s.chunk_id} for s in a.sources],
        "prompt_tokens": a.prompt_tokens,
        "completion_tokens": a.completion_tokens,
        "retrieve_ms": a.timings.get("retrieve_ms", 0.0),
        "generate_ms": a.timings.get("generate_ms", 0.0),
    }


def _load_answerer(spec, retriever, server: str | None = None):
    """A LoRA adapter is merged into the base for evaluation: the same function (up to float
    rounding) without the adapter's extra per-layer work, which costs time on a CPU. With a server,
    the answers are the server's own."""
    from rag.answer import Answerer
    from rag.generators import load_generator

    if server:
        from rag.remote import RemoteAnswerer, ServerClient

        return RemoteAnswerer(ServerClient(server), spec.name)
    if spec.backend == "retrieval":
        return Answerer(spec, retriever)
    generator = load_generator(spec.model_copy(update={"merge_adapter": True}) if spec.adapter else spec)
    return Answerer(spec, retriever, generator=MemoGenerator(generator))


def generate(plan: Plan, progress: bool = True) -> dict[Cell, dict]:
    """Run every unfinished cell, one model loaded at a time; returns each cell's rows by key.
    A model that cannot load here (a 4-bit one without a GPU, say) is dropped with a note."""
    c = plan.config
    caches = {cell: plan.cache(cell) for cell in plan.cells}
    pending = {cell: [r for r in plan.evalsets[cell.dataset].records if question_key(r) not in caches[cell].rows] for cell in plan.cells}
    memo_hits = 0
    with _progress(progress) as bar:
        task = bar.add_task("ablation", total=sum(len(v) for v in pending.values()))
        for model in dict.fromkeys(cell.model for cell in plan.cells):
            cells = [cell for cell in plan.cells if cell.model == model and pending[cell]]
            if not cells:
                continue
            bar.update(task, description=f"loading {model}")
            first = plan.indexes.get(cells[0].dataset)
            try:
                answerer = _load_answerer(plan.specs[model], first.retriever if first else None, c.server)
            except UserError as e:
                plan.drop_model(model, f"model `{model}` skipped: {e}")
                bar.advance(task, sum(len(pending[cell]) for cell in cells))
                continue
            for cell in cells:
                index = plan.indexes.get(cell.dataset)
                answerer.retriever = index.retriever if index else None
                bar.update(task, description=cell.id)
                todo = _longest_first(plan, cell, pending[cell])
                for i in range(0, len(todo), c.batch_size):
                    batch = todo[i : i + c.batch_size]
                    answers = answerer.answer_many(
                        [r.question for r in batch], rag=cell.rag, k=cell.k or 1, mode=cell.mode or None,
                        max_new_tokens=c.max_new_tokens, temperature=c.temperature, seed=c.seed, num_beams=c.num_beams,
                        abstain=False,  # every answer as generated: abstention is decided when scoring (eval.scoring)
                    )
                    caches[cell].add([_answer_row(question_key(r), r.question, a) for r, a in zip(batch, answers)])
                    bar.advance(task, len(batch))
            memo_hits += getattr(answerer.generator, "hits", 0)
            del answerer
            gc.collect()
    if not plan.cells:
        raise UserError("no model could run: " + "; ".join(plan.notes))
    if memo_hits:
        plan.notes.append(f"{memo_hits} answers reused the generation of an identical prompt earlier in the run (greedy decoding)")
    return {cell: caches[cell].rows for cell in plan.cells}


def _longest_first(plan: Plan, cell: Cell, records: list) -> list:
    """Batches of similar prompt length waste less compute on padding; longest first shows the
    slowest batch (and any memory problem) at once."""
    if not cell.rag:
        return sorted(records, key=lambda r: -len(r.question))
    rows = plan.retrieval[(cell.dataset, cell.mode, cell.k)]
    chars = {question_key(r): row["chars"] + len(r.question) for r, row in zip(plan.evalsets[cell.dataset].records, rows)}
    return sorted(records, key=lambda r: -chars[question_key(r)])


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **kw):
        return 0

    def update(self, *a, **kw):
        pass

    def advance(self, *a, **kw):
        pass


def _progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def run_ablation(config: AblationConfig, progress: bool = True, embedder=None) -> tuple[dict, Path]:
    """Prepare, generate, score and write every output; returns (summary, output dir)."""
    from eval.report import write_outputs
    from eval.scoring import summarise

    started = provenance.now()
    t0 = time.perf_counter()
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    out = settings.check_out_dir(Path(config.out or settings.home() / "eval" / "runs" / config.name))  # before the work
    plan = prepare(config, embedder, progress)
    rows = generate(plan, progress)
    summary, predictions = summarise(plan, rows)
    summary["run"].update(started=started, finished=provenance.now(), wall_s=round(time.perf_counter() - t0, 1))
    write_outputs(summary, predictions, out)
    return summary, out
