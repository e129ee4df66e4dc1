"""Registered models that share one base in memory: one generator per base, an Answerer per name.

A fine-tuned entry whose adapter is unmerged is its base plus a few MB of LoRA weights; loading the
base once and each adapter beside it is what lets a server hold many adapters and batch requests
for all of them together (`rag.answer.answer_batch`)."""

from __future__ import annotations

from rag.answer import Answerer

SHARED_FIELDS = ("family", "base", "backend", "load_in_4bit", "dtype", "context_window", "prefill_chunk")


def base_key(spec) -> tuple | None:
    """Entries with equal keys can share a generator; None: this one cannot share (no generator, or
    an adapter merged into its weights)."""
    if spec.backend == "retrieval" or spec.merge_adapter:
        return None
    if spec.backend == "llamacpp" and spec.adapter:  # llama.cpp applies an adapter when it loads the model
        return None
    return tuple(getattr(spec, f) for f in SHARED_FIELDS)


def base_spec(spec):
    """The entry's base model alone, for the generator its adapters are loaded into."""
    return spec.model_copy(update={"name": f"{spec.name}:base", "adapter": None})


def load_answerers(specs: list, retriever=None, mode: str | None = None) -> dict[str, Answerer]:
    """{name: Answerer}, loading each distinct base once and each adapter into its base's generator."""
    from rag.generators import load_generator

    kw = {"mode": mode} if mode else {}
    generators: dict[tuple, object] = {}
    out = {}
    for spec in specs:
        key = base_key(spec)
        if key is None:
            out[spec.name] = Answerer(spec, retriever, **kw)
            continue
        if key not in generators:
            generators[key] = load_generator(base_spec(spec))
        generator = generators[key]
        if spec.adapter:
            generator.load_adapter(spec.name, spec.adapter)
        out[spec.name] = Answerer(spec, retriever, generator=generator, adapter=spec.adapter and spec.name, **kw)
    return out
