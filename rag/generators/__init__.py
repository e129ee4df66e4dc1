"""Generators: one batched interface over transformers, llama.cpp and vLLM, and the factory that picks one.

The factory lives here rather than in `base`, so that the interface imports none of its back ends."""

from aimlqa.settings import UserError
from rag.generators.base import Generation, GenerationConfig, Generator

__all__ = ["Generation", "GenerationConfig", "Generator", "load_generator"]


def load_generator(spec, **overrides) -> "Generator":
    """The generator a registry entry names; GPU-only back ends are imported only when asked for."""
    backend = overrides.pop("backend", None) or spec.backend
    if backend == "transformers":
        from rag.generators.hf import TransformersGenerator

        return TransformersGenerator(spec, **overrides)
    if backend == "llamacpp":
        from rag.generators.llamacpp import LlamaCppGenerator

        return LlamaCppGenerator(spec, **overrides)
    if backend == "vllm":
        from rag.generators.vllm import VLLMGenerator

        return VLLMGenerator(spec, **overrides)
    raise UserError(f"model {spec.name!r} has backend {backend!r}, which does not generate text")
