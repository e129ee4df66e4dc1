"""The Answerer: retrieve → prompt → generate → clean, for one registered model."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from aimlqa.settings import DEFAULT_MODE, UserError, check_mode
from index.corpus import qa_answer
from index.retriever import Passage
from rag.attribution import NO_RELEVANT_PASSAGE, Attribution, Attributor
from rag.generators.base import default_config
from rag.postprocess import clean_answer
from rag.prompts import build_prompt, template_for


NOTICES = {
    NO_RELEVANT_PASSAGE: "Not in the course notes: no passage found is close to this question. The closest ones are listed as sources.",
    "unsupported": "Not in the course notes: the passages found do not support an answer to this question. The closest ones are listed as sources.",
}


@dataclass
class Answer:
    text: str  # the answer, or the notice saying why there is none (see `abstained`)
    sources: list[Passage]  # the retrieved passages that grounded it: one record from index to REST
    model: str
    rag: bool
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: dict = field(default_factory=dict)  # retrieve_ms, generate_ms, attribute_ms
    prompt: str = ""
    attribution: Attribution | None = None  # which source supports which sentence of `text`; None ungrounded
    abstained: str | None = None  # why the service gave no answer (rag.attribution: no_relevant_passage, unsupported)
    raw_text: str | None = None  # when abstained after generating: what the model said, unchecked

    @property
    def cited_text(self) -> str:
        """The text with "[n]" markers after each sentence (n: the source's position, from 1)."""
        from rag.citing import render

        return render(self.text, self.attribution.sentences) if self.attribution and not self.abstained else self.text

    def to_dict(self, with_prompt: bool = False) -> dict:
        d = asdict(self)
        if self.attribution is not None:
            d["attribution"] = self.attribution.to_dict()
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

    @property
    def retriever(self):
        return self._retriever

    @retriever.setter
    def retriever(self, retriever) -> None:  # the ablation swaps indexes between cells: attribution follows
        self._retriever = retriever
        self.attributor = Attributor(retriever.embedder, retriever=retriever) if retriever is not None else None

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


def attribute(answers: list[Answer], questions: list[str], attributor: Attributor | None, abstain: bool) -> None:
    """Attribute each grounded answer's sentences to its sources; with `abstain`, replace an answer
    that retrieval or its sources do not support by the notice (the model's text kept in raw_text)."""
    rows = [i for i, a in enumerate(answers) if a.rag and a.sources and not a.abstained]
    if attributor is None or not rows:
        return
    t0 = time.perf_counter()
    found = attributor.attribute([questions[i] for i in rows], [answers[i].text for i in rows], [answers[i].sources for i in rows])
    ms = (time.perf_counter() - t0) * 1000 / len(rows)
    for i, att in zip(rows, found):
        a = answers[i]
        a.attribution, a.timings["attribute_ms"] = att, round(ms, 2)
        if abstain and att.abstain:
            a.abstained, a.raw_text, a.text = att.abstain, a.text, NOTICES[att.abstain]


def answer_batch(items: list[tuple[Answerer, str]], rag: bool = True, k: int = 3, mode: str | None = None,
                 sinks: list | None = None, abstain: bool = True, **gen) -> list[Answer]:
    """Questions for one or several Answerers that share a generator (a base and its adapters), in
    one retrieval call per Answerer and one generate call for all: each row uses its own adapter.
    `sinks`: per question, None or a callable fed the raw generated text as it grows and the
    passages it is grounded in (streaming: `rag.citing.CitedStream`).
    `abstain`: a question no retrieved passage is close to is not sent to the model, and an answer
    its passages do not support is replaced by the notice; False returns every answer as generated
    (still attributed, unsupported sentences marked)."""
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
    questions = [q for _, q in items]
    if first.retrieval_only:
        answers = [a._retrieval_answer(h, retrieve_ms) for (a, _), h in zip(items, hits)]
        attribute(answers, questions, first.attributor, abstain)
        return answers
    if any(a.generator is not first.generator for a, _ in items):
        raise ValueError("a batch mixes Answerers with different generators")
    answers: dict[int, Answer] = _far_from_notes(items, hits, used, retrieve_ms) if abstain else {}  # said so without generating
    todo = [i for i in range(len(items)) if i not in answers]
    if todo:
        answers.update(zip(todo, _generate([items[i] for i in todo], [hits[i] for i in todo], [used[i] for i in todo],
                                           [sinks[i] for i in todo] if sinks else None, retrieve_ms, gen)))
    out = [answers[i] for i in range(len(items))]
    attribute(out, questions, first.attributor, abstain)
    return out


def _generate(items, hits, used, sinks, retrieve_ms: float, gen: dict) -> list[Answer]:
    """One generate call for all rows (each through its own adapter), the answers cleaned."""
    first = items[0][0]
    config = default_config(first.spec, first.template.stop, **gen)
    budget = first.generator.context_window - config.max_new_tokens
    prompts, kept = [], []
    for (a, q), h in zip(items, hits):
        prompt, n = build_prompt(a.template, q, [p.text for p in h], first.generator.count_tokens, budget)
        prompts.append(prompt)
        kept.append(h[:n])
    routed = {"adapters": [a.adapter for a, _ in items]} if hasattr(first.generator, "load_adapter") else {}
    if sinks and any(sinks) and getattr(first.generator, "streams", False):  # each told its passages, for citing as it goes
        routed["sinks"] = [s and (lambda raw, s=s, h=h: s(raw, h)) for s, h in zip(sinks, kept)]
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


def _far_from_notes(items, hits, used, retrieve_ms: float) -> dict[int, Answer]:
    """The rows whose best passage is below the relevance threshold, answered with the notice."""
    attributor = items[0][0].attributor
    rows = [i for i, u in enumerate(used) if u and hits[i]]
    if attributor is None or not attributor.checks_relevance or not rows:
        return {}
    out = {}
    for i, rel in zip(rows, attributor.relevance([items[i][1] for i in rows], [hits[i] for i in rows])):
        if attributor.decide(rel, None) == NO_RELEVANT_PASSAGE:
            a = items[i][0]
            out[i] = Answer(NOTICES[NO_RELEVANT_PASSAGE], list(hits[i]), a.spec.name, True,
                            timings={"retrieve_ms": round(retrieve_ms, 2), "generate_ms": 0.0},
                            attribution=Attribution([], round(rel, 4), 0.0, NO_RELEVANT_PASSAGE), abstained=NO_RELEVANT_PASSAGE)
    return out
