"""Generators: one batched interface over transformers and vLLM."""

from rag.generators.base import Generation, GenerationConfig, Generator, load_generator

__all__ = ["Generation", "GenerationConfig", "Generator", "load_generator"]
