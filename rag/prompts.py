"""One prompt template per model family, used by both training and serving.

A fine-tuned model must see at serving time exactly the text it learned from, so the
fine-tuning data is built by `build_example` from the same templates `build_prompt` uses.
Context is fitted to the token budget by dropping the lowest-ranked passages; the question
is never cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from aimlqa.settings import UserError


@dataclass(frozen=True)
class PromptTemplate:
    plain: str  # with {question}
    grounded: str  # with {question} and {context}
    passage: str = "[{n}] {text}"  # one retrieved passage, with {n} (1-based) and {text}
    joiner: str = "\n"
    stop: tuple[str, ...] = ("\nQuestion:",)  # where a generated answer ends
    target_prefix: str = " "  # what separates the prompt from the answer in training targets


_QA_STOP = ("\nQuestion:", "\n\n\n", "\nQ:")

# A family's template is data: which one a model uses is set in the registry.
TEMPLATES: dict[str, PromptTemplate] = {
    "gemma3": PromptTemplate(
        plain="Question: {question}\nAnswer:",
        grounded="Use the course notes to answer.\n\nCourse notes:\n{context}\n\nQuestion: {question}\nAnswer:",
        stop=_QA_STOP,
    ),
    "gpt2": PromptTemplate(
        plain="Question: {question}\nAnswer:",
        grounded="Course notes:\n{context}\n\nQuestion: {question}\nAnswer:",
        stop=_QA_STOP,
    ),
    # BART is sequence-to-sequence: the prompt is the encoder input, the answer the decoder target.
    "bart": PromptTemplate(
        plain="question: {question}",
        grounded="question: {question} context: {context}",
        passage="{text}",
        joiner=" ",
        stop=(),
        target_prefix="",
    ),
    # The seed's Unsloth notebooks used the Alpaca layout for Mistral and Llama.
    "mistral": PromptTemplate(
        plain="### Instruction:\nAnswer the course question.\n\n### Input:\n{question}\n\n### Response:\n",
        grounded="### Instruction:\nAnswer the course question using the notes.\n\n### Notes:\n{context}\n\n### Input:\n{question}\n\n### Response:\n",
        stop=("\n### ", "\n\n\n"),
        target_prefix="",
    ),
}
TEMPLATES["llama"] = TEMPLATES["mistral"]


def template_for(family: str) -> PromptTemplate:
    try:
        return TEMPLATES[family]
    except KeyError:
        raise UserError(f"no prompt template for family {family!r}; known: {', '.join(sorted(TEMPLATES))}") from None


def _clean(text: str) -> str:
    return " ".join(text.split())


def render(template: PromptTemplate, question: str, passages: Sequence[str] = ()) -> str:
    question = question.strip()
    if not passages:
        return template.plain.format(question=question)
    context = template.joiner.join(template.passage.format(n=n, text=_clean(p)) for n, p in enumerate(passages, 1))
    return template.grounded.format(question=question, context=context)


def build_prompt(
    template: PromptTemplate,
    question: str,
    passages: Sequence[str] = (),
    count_tokens: Callable[[str], int] | None = None,
    budget: int | None = None,
) -> tuple[str, int]:
    """The prompt and how many passages it kept: the lowest-ranked are dropped until it fits."""
    passages = list(passages)
    prompt = render(template, question, passages)
    if count_tokens is None or budget is None:
        return prompt, len(passages)
    while passages and count_tokens(prompt) > budget:
        passages.pop()
        prompt = render(template, question, passages)
    if count_tokens(prompt) > budget:
        raise UserError(f"the question alone is {count_tokens(prompt)} tokens, over this model's prompt budget of {budget}; shorten it")
    return prompt, len(passages)


def build_example(template: PromptTemplate, question: str, answer: str, passages: Sequence[str] = (), **budget) -> tuple[str, str]:
    """(prompt, target) for training; the target is what the model must generate after the prompt."""
    prompt, _ = build_prompt(template, question, passages, **budget)
    return prompt, template.target_prefix + answer.strip()
