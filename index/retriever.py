"""Dense (FAISS), lexical (BM25) and hybrid (reciprocal rank fusion) search over one index dir."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from aimlqa.settings import DEFAULT_MODE, UserError, check_mode
from index.corpus import Chunk
from index.embed import Embedder
from index.store import manifest_hash, read_manifest

RRF_K = 60


@dataclass
class Passage:
    text: str
    source: str
    section: str
    section_id: str
    score: float
    chunk_id: int

    def to_dict(self) -> dict:
        return asdict(self)


def bm25_tokenize(texts: list[str], return_ids: bool = True):
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=return_ids, show_progress=False)


def build_bm25(texts: list[str]):
    import bm25s

    bm25 = bm25s.BM25()
    bm25.index(bm25_tokenize(texts), show_progress=False)
    return bm25


class Retriever:
    def __init__(self, chunks: list[Chunk], faiss_index, bm25, embedder: Embedder, manifest: dict, path: Path | None = None):
        self.chunks = chunks
        self.faiss_index = faiss_index
        self.bm25 = bm25
        self.embedder = embedder
        self.manifest = manifest
        self.path = path

    @classmethod
    def load(cls, path: str | Path, embed_model: str | None = None, embedder: Embedder | None = None) -> "Retriever":
        """Open an index; refuse one built with a different embedding model than asked for."""
        import bm25s
        import faiss

        path = Path(path)
        manifest = read_manifest(path)
        wanted = embed_model or (embedder.name if embedder else None)
        if wanted and wanted != manifest["embed_model"]:
            raise UserError(
                f"{path}: built with embedding model {manifest['embed_model']!r}, not {wanted!r}; "
                f"query it with {manifest['embed_model']!r} or rebuild it with --embed-model {wanted} --force"
            )
        embedder = embedder or Embedder(manifest["embed_model"])
        index = faiss.read_index(str(path / "index.faiss"))
        with (path / "chunks.jsonl").open(encoding="utf-8") as f:
            chunks = [Chunk(**json.loads(line)) for line in f]
        if index.ntotal != len(chunks):
            raise UserError(f"{path}: index holds {index.ntotal} vectors but {len(chunks)} chunks; rebuild it with --force")
        bm25 = bm25s.BM25.load(str(path / "bm25"))
        return cls(chunks, index, bm25, embedder, manifest, path)

    @property
    def manifest_hash(self) -> str:
        return manifest_hash(self.manifest)

    def search(self, query: str, k: int = 5, mode: str = DEFAULT_MODE) -> list[Passage]:
        return self.search_many([query], k, mode)[0]

    def search_many(self, queries: list[str], k: int = 5, mode: str = DEFAULT_MODE) -> list[list[Passage]]:
        check_mode(mode)
        if k < 1:
            raise UserError(f"k must be at least 1, got {k}")
        if not queries:
            return []
        k = min(k, len(self.chunks))
        if mode == "dense":
            ranked = self._dense(queries, k)
        elif mode == "bm25":
            ranked = self._bm25(queries, k)
        else:
            depth = min(len(self.chunks), max(4 * k, 20))
            ranked = [self._fuse(d, b, k) for d, b in zip(self._dense(queries, depth), self._bm25(queries, depth))]
        return [[self._passage(i, s) for i, s in hits] for hits in ranked]

    def _dense(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        import faiss

        vectors = self.embedder.encode_queries(queries)
        # A few queries gain nothing from OpenMP threads, and their spin-waits beside torch's own
        # threads cost hundreds of milliseconds on a busy machine: search them on one thread, then
        # restore the count (the OpenMP runtime is shared with torch, which would stay on one thread).
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1 if len(queries) < 16 else threads)
        try:
            scores, ids = self.faiss_index.search(vectors, k)
        finally:
            faiss.omp_set_num_threads(threads)
        return [[(int(i), float(s)) for i, s in zip(row_i, row_s) if i >= 0] for row_i, row_s in zip(ids, scores)]

    def _bm25(self, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
        tokens = bm25_tokenize(queries, return_ids=False)
        ids, scores = self.bm25.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [[(int(i), float(s)) for i, s in zip(row_i, row_s) if s > 0] for row_i, row_s in zip(ids, scores)]

    @staticmethod
    def _fuse(dense: list[tuple[int, float]], lexical: list[tuple[int, float]], k: int) -> list[tuple[int, float]]:
        fused: dict[int, float] = {}
        for ranking in (dense, lexical):
            for rank, (i, _) in enumerate(ranking):
                fused[i] = fused.get(i, 0.0) + 1.0 / (RRF_K + rank + 1)
        return sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]

    def section(self, section_id: str) -> list[Chunk]:
        """The chunks of one section in source order: what a citation links to."""
        return sorted((c for c in self.chunks if c.section_id == section_id), key=lambda c: c.start)

    def vectors(self, passages: list) -> list:
        """The stored (normalised) vector of each passage this index holds, else None: attribution
        compares answer sentences with them without encoding the passages again."""
        if getattr(self, "_by_text", None) is None:
            self._by_text = {c.text: c.id for c in self.chunks}
        out = []
        for p in passages:
            i = p.chunk_id if 0 <= getattr(p, "chunk_id", -1) < len(self.chunks) and self.chunks[p.chunk_id].text == p.text else self._by_text.get(p.text)
            out.append(None if i is None else self._reconstruct(i))
        return out

    def _reconstruct(self, i: int):
        try:
            return self.faiss_index.reconstruct(int(i))
        except RuntimeError:  # an IVF index keeps no id -> list map until asked to
            import faiss

            faiss.extract_index_ivf(self.faiss_index).make_direct_map()
            return self.faiss_index.reconstruct(int(i))

    def _passage(self, i: int, score: float) -> Passage:
        c = self.chunks[i]
        return Passage(c.text, c.source, c.section, c.section_id, round(score, 6), c.id)


def build_index(sources, out: str | Path, config=None, force: bool = False, progress: bool = True, embedder: Embedder | None = None) -> tuple[dict, bool]:
    """Build (or skip, when the corpus and settings are unchanged) an index; returns (manifest, built)."""
    from index.corpus import load_corpus
    from index.store import BuildConfig, check_replaceable, write_index

    config = config or BuildConfig()
    config.check()
    out = Path(out)
    check_replaceable(out)  # before minutes of embedding
    embedder = embedder or Embedder(config.embed_model)
    chunks, corpus_hash = load_corpus(sources, config.chunk_size, config.chunk_overlap, embedder.tokenize, config.qa_split)
    if not force and (out / "manifest.json").is_file():
        try:
            old = read_manifest(out)
        except UserError:
            old = {}
        same = all(old.get(k) == v for k, v in vars(config).items()) and old.get("corpus_hash") == corpus_hash
        if same:
            return old, False
    texts = [c.embed_text for c in chunks]
    vectors = embedder.encode(texts, progress=progress)
    manifest = write_index(out, chunks, vectors, build_bm25(texts), config, corpus_hash, embedder.dim)
    return manifest, True
