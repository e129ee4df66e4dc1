"""The Answerer: retrieve → prompt → generate → clean, for one registered model."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from aimlqa.settings import DEFAULT_MODE, UserError, check_mode
from rag.generators.base import default_config
from rag.postprocess import clean_answer
from rag.prompts import build_prompt, template_for


@dataclass
class Source:
    text: str
    source: str
    section: str
    section_id: str
    score: float


@dataclass
class Answer:
    text: str
    sources: list[Source]
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
    """Answers questions with one model, grounded in a retriever when one is given and rag is on."""

    def __init__(self, spec, retriever=None, generator=None, mode: str = DEFAULT_MODE):
        self.spec = spec
        self.retriever = retriever
        self.mode = check_mode(mode)
        self.retrieval_only = spec.backend == "retrieval"
        if self.retrieval_only and retriever is None:
            raise UserError("the retrieval-only model needs an index (--index)")
        if not self.retrieval_only and generator is None:
            from rag.generators import load_generator

            generator = load_generator(spec)
        self.generator = generator
        self.template = None if self.retrieval_only else template_for(spec.family)

    @classmethod
    def from_name(cls, name: str, retriever=None, **kw) -> "Answerer":
        from rag.registry import get_spec

        return cls(get_spec(name), retriever, **kw)

    def answer(self, question: str, rag: bool = True, k: int = 3, **gen) -> Answer:
        return self.answer_many([question], rag, k, **gen)[0]

    def answer_many(self, questions: list[str], rag: bool = True, k: int = 3, mode: str | None = None, **gen) -> list[Answer]:
        """Batched: one retrieval call and one generate call for all questions."""
        if any(not q or not q.strip() for q in questions):
            raise UserError("a question is empty; ask something")
        use_rag = (rag or self.retrieval_only) and self.retriever is not None and k > 0
        t0 = time.perf_counter()
        hits = self.retriever.search_many(questions, k, mode or self.mode) if use_rag else [[] for _ in questions]
        retrieve_ms = (time.perf_counter() - t0) * 1000
        if self.retrieval_only:
            return [self._retrieval_answer(h, retrieve_ms / len(questions)) for h in hits]

        config = default_config(self.spec, self.template.stop, **gen)
        budget = self.generator.context_window - config.max_new_tokens
        prompts, kept = [], []
        for q, h in zip(questions, hits):
            prompt, n = build_prompt(self.template, q, [p.text for p in h], self.generator.count_tokens, budget)
            prompts.append(prompt)
            kept.append(h[:n])
        t1 = time.perf_counter()
        gens = self.generator.generate(prompts, config)
        generate_ms = (time.perf_counter() - t1) * 1000
        per = len(questions)
        return [
            Answer(
                text=clean_answer(g.text, truncated=g.finish_reason == "length"),
                sources=[Source(p.text, p.source, p.section, p.section_id, p.score) for p in h],
                model=self.spec.name,
                rag=use_rag,
                prompt_tokens=g.prompt_tokens,
                completion_tokens=g.completion_tokens,
                timings={"retrieve_ms": round(retrieve_ms / per, 2), "generate_ms": round(generate_ms / per, 2)},
                prompt=prompt,
            )
            for g, h, prompt in zip(gens, kept, prompts)
        ]

    def _retrieval_answer(self, hits, retrieve_ms: float) -> Answer:
        text = ""
        if hits:
            top = hits[0].text
            text = top.split("\nAnswer:", 1)[1].strip() if top.startswith("Question:") and "\nAnswer:" in top else " ".join(top.split())
        return Answer(
            text=text,
            sources=[Source(p.text, p.source, p.section, p.section_id, p.score) for p in hits],
            model=self.spec.name,
            rag=True,
            timings={"retrieve_ms": round(retrieve_ms, 2), "generate_ms": 0.0},
        )
