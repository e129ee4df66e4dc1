"""The Answerer: retrieve → prompt → generate → clean, for one registered model."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from aimlqa.settings import DEFAULT_MODE, UserError, check_mode
from index.corpus import qa_answer
from index.retriever import Passage
from rag.generators.base import default_config
from rag.postprocess import clean_answer
from rag.prompts import build_prompt, template_for


@dataclass
class Answer:
    text: str
    sources: list[Passage]  # the retrieved passages that grounded it: one record from index to REST
    model: str
    rag: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: dict = field(default_factory=dict)  # retrieve_ms, generate_ms
    prompt: str = ""

    def to_dict(self, with_prompt: bool = False) -> dict:
        d = asdict(self)
        if not with_prompt:
            d.pop("prompt")
        return d


class Answerer:
    """Answers questions with one model, grounded in a retriever when one is given and rag is on.

    `adapter`: which of the generator's LoRA adapters this model is (None: the base), when several
    registered models share one base in memory (`rag.pool`)."""

    def __init__(self, spec, retriever=None, generator=None, mode: str = DEFAULT_MODE, adapter: str | None = None):
        self.spec = spec
        self.retriever = retriever
        self.mode = check_mode(mode)
        self.retrieval_only = spec.backend == "retrieval"
        if self.retrieval_only and retriever is None:
            raise UserError("the retrieval-only model needs an index (--index)")
        if not self.retrieval_only and generator is None:
            from rag.generators import load_generator

            generator = load_generator(spec)
            adapter = getattr(generator, "default_adapter", None)
        self.generator = generator
        self.adapter = adapter
        self.template = None if self.retrieval_only else template_for(spec.family)

    def answer(self, question: str, rag: bool = True, k: int = 3, **gen) -> Answer:
        return self.answer_many([question], rag, k, **gen)[0]

    def answer_many(self, questions: list[str], rag: bool = True, k: int = 3, mode: str | None = None, **gen) -> list[Answer]:
        """Batched: one retrieval call and one generate call for all questions."""
        return answer_batch([(self, q) for q in questions], rag, k, mode, **gen)

    def retrieve(self, questions: list[str], rag: bool, k: int, mode: str | None) -> tuple[bool, list[list]]:
        use_rag = (rag or self.retrieval_only) and self.retriever is not None and k > 0
        return use_rag, (self.retriever.search_many(questions, k, mode or self.mode) if use_rag else [[] for _ in questions])

    def _retrieval_answer(self, hits, retrieve_ms: float) -> Answer:
        text = ""
        if hits:
            top = hits[0].text
            answer = qa_answer(top)
            text = answer if answer is not None else " ".join(top.split())
        return Answer(
            text=text,
            sources=list(hits),
            model=self.spec.name,
            rag=True,
            timings={"retrieve_ms": round(retrieve_ms, 2), "generate_ms": 0.0},
        )


def answer_batch(items: list[tuple[Answerer, str]], rag: bool = True, k: int = 3, mode: str | None = None,
                 sinks: list | None = None, **gen) -> list[Answer]:
    """Questions for one or several Answerers that share a generator (a base and its adapters), in
    one retrieval call per Answerer and one generate call for all: each row uses its own adapter.
    `sinks`: per question, None or a callable fed the raw generated text as it grows (streaming)."""
    if any(not q or not q.strip() for _, q in items):
        raise UserError("a question is empty; ask something")
    if not items:
        return []
    groups: dict[int, list[int]] = {}
    for i, (a, _) in enumerate(items):
        groups.setdefault(id(a), []).append(i)
    hits: list[list] = [[] for _ in items]
    used: list[bool] = [False] * len(items)
    t0 = time.perf_counter()
    for rows in groups.values():
        answerer = items[rows[0]][0]
        use_rag, found = answerer.retrieve([items[i][1] for i in rows], rag, k, mode)
        for i, h in zip(rows, found):
            hits[i], used[i] = h, use_rag
    retrieve_ms = (time.perf_counter() - t0) * 1000 / max(sum(used), 1)  # per question that retrieved
    first = items[0][0]
    if first.retrieval_only:
        return [a._retrieval_answer(h, retrieve_ms) for (a, _), h in zip(items, hits)]
    if any(a.generator is not first.generator for a, _ in items):
        raise ValueError("a batch mixes Answerers with different generators")

    config = default_config(first.spec, first.template.stop, **gen)
    budget = first.generator.context_window - config.max_new_tokens
    prompts, kept = [], []
    for (a, q), h in zip(items, hits):
        prompt, n = build_prompt(a.template, q, [p.text for p in h], first.generator.count_tokens, budget)
        prompts.append(prompt)
        kept.append(h[:n])
    routed = {"adapters": [a.adapter for a, _ in items]} if hasattr(first.generator, "load_adapter") else {}
    if sinks and any(sinks) and getattr(first.generator, "streams", False):
        routed["sinks"] = sinks
    t1 = time.perf_counter()
    gens = first.generator.generate(prompts, config, **routed)
    generate_ms = (time.perf_counter() - t1) * 1000 / len(items)
    return [
        Answer(
            text=clean_answer(g.text, truncated=g.finish_reason == "length"),
            sources=list(h),
            model=a.spec.name,
            rag=use,
            prompt_tokens=g.prompt_tokens,
            completion_tokens=g.completion_tokens,
            timings={"retrieve_ms": round(retrieve_ms, 2) if use else 0.0, "generate_ms": round(generate_ms, 2)},
            prompt=prompt,
        )
        for (a, _), g, h, prompt, use in zip(items, gens, kept, prompts, used)
    ]
