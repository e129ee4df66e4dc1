"""FAISS persistence: `index.faiss` + `chunks.jsonl` + `bm25/` + `manifest.json`, complete or absent.

A build writes into a temporary sibling directory and renames it into place, so an interrupted
build (Ctrl-C, a crash, a full disk) leaves the previous index untouched.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aimlqa.settings import UserError
from index.corpus import Chunk

INDEX_TYPES = ("flat", "hnsw", "ivf", "ivfpq")
FORMAT_VERSION = 1


@dataclass
class BuildConfig:
    embed_model: str = "all-MiniLM-L6-v2"
    chunk_size: int = 200
    chunk_overlap: int = 30
    index_type: str = "flat"
    qa_split: str | None = None

    def check(self) -> None:
        if self.index_type not in INDEX_TYPES:
            raise UserError(f"unknown --index-type {self.index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
        if self.chunk_size < 16:
            raise UserError(f"--chunk-size must be at least 16 tokens, got {self.chunk_size}")
        if self.chunk_overlap < 0:
            raise UserError(f"--chunk-overlap must not be negative, got {self.chunk_overlap}")


def make_faiss_index(vectors: np.ndarray, index_type: str):
    """Exact inner product (= cosine on normalised vectors) by default; HNSW or IVF for large corpora,
    IVF-PQ when the vectors no longer fit in RAM (48 bytes a vector instead of 1,536 for MiniLM's
    384 floats; recall and latency measured in bench/index_scale.py)."""
    import faiss

    n, dim = vectors.shape
    if index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.hnsw.efSearch = 64
    elif index_type in ("ivf", "ivfpq"):
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        if index_type == "ivf":
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        else:  # dim/8 sub-vectors of 8 bits each; fewer bits where there are too few vectors to train 256 codes
            if n < 16 or dim % 8:
                raise UserError(f"--index-type ivfpq needs at least 16 chunks and a dimension divisible by 8 (got {n} chunks of {dim}); use flat")
            index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, dim // 8, min(8, int(math.log2(n))), faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(nlist, 16)
    else:
        index = faiss.IndexFlatIP(dim)
    index.add(vectors)
    return index


CORE_PACKAGES = ("aimlqa", "torch", "transformers", "sentence-transformers", "faiss-cpu", "bm25s", "llama-index-core", "peft")


def versions(more: tuple[str, ...] = ()) -> dict:
    """Python and the installed versions of the packages a result depends on (the core ones, and
    `more` for a result that depends on others, e.g. the evaluator's metric packages)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in (*CORE_PACKAGES, *more):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def check_replaceable(out: Path) -> None:
    """A build replaces `out` whole: refuse unless it is absent, an empty dir or an index already,
    so that `--out` pointing at a file or at a folder of notes never deletes them."""
    out = Path(out)
    if not out.exists() or (out / "manifest.json").is_file() or (out.is_dir() and not any(out.iterdir())):
        return
    what = "a file" if not out.is_dir() else "a folder that is not an index (no manifest.json)"
    raise UserError(f"--out {out} is {what}; a build replaces its --out whole, so pass a new path or an existing index dir")


def write_index(out: Path, chunks: list[Chunk], vectors: np.ndarray, bm25, config: BuildConfig, corpus_hash: str, dim: int) -> dict:
    import faiss

    out = Path(out)
    check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp"
    old = out.parent / f".{out.name}.old"
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    try:
        faiss.write_index(make_faiss_index(vectors, config.index_type), str(tmp / "index.faiss"))
        with (tmp / "chunks.jsonl").open("w", encoding="utf-8") as f:
            for c in chunks:
                f.write(json.dumps(c.to_dict(), ensure_ascii=False) + "\n")
        bm25.save(str(tmp / "bm25"), show_progress=False)
        manifest = {
            "format": FORMAT_VERSION,
            "embed_model": config.embed_model,
            "dim": dim,
            "chunk_size": config.chunk_size,
            "chunk_overlap": config.chunk_overlap,
            "index_type": config.index_type,
            "qa_split": config.qa_split,
            "corpus_hash": corpus_hash,
            "n_chunks": len(chunks),
            "n_sources": len({c.source for c in chunks}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions(),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            old.rename(out)
        raise


def read_manifest(path: Path) -> dict:
    path = Path(path)
    mf = path / "manifest.json"
    if not mf.is_file():
        raise UserError(f"{path}: not an index (no manifest.json); build one with `aimlqa index build SRC... --out {path}`")
    manifest = json.loads(mf.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise UserError(f"{path}: index format {manifest.get('format')} is not {FORMAT_VERSION}; rebuild it with --force")
    return manifest


def manifest_hash(manifest: dict) -> str:
    """Identifies an index's content for result files: corpus, embedding and chunking, not build time."""
    from index.text import sha256_text

    keys = ("embed_model", "dim", "chunk_size", "chunk_overlap", "index_type", "qa_split", "corpus_hash")
    return sha256_text(*(f"{k}={manifest.get(k)}" for k in keys))[:16]
