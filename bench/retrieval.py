"""Retrieval benchmark: build throughput vs plain encode, query latency at 1k/20k chunks, load time,
and retrieval quality (group18 own-answer recall; course notes gold-section recall), dense/bm25/hybrid.

    python bench/retrieval.py [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from common import Timer, percentiles, verdict, write  # noqa: E402  (sets sys.path)

from aimlqa import settings
from index.corpus import load_corpus
from index.embed import Embedder
from index.qa import load_qa, select_split
from aimlqa.settings import MODES
from index.retriever import Retriever, build_bm25, build_index
from index.store import BuildConfig, write_index

GROUP18 = settings.group18_dir()  # developers' data, not shipped


def ranking_metrics(ranks: list[int | None], ks=(1, 5)) -> dict:
    """recall@k and MRR from the 1-based rank of the first relevant hit (None = not retrieved)."""
    out = {f"recall@{k}": round(sum(r is not None and r <= k for r in ranks) / len(ranks), 4) for k in ks}
    out["mrr"] = round(sum(1 / r for r in ranks if r) / len(ranks), 4)
    out["n"] = len(ranks)
    return out


def first_rank(hits, relevant) -> int | None:
    return next((n for n, h in enumerate(hits, 1) if relevant(h)), None)


def build_throughput(emb: Embedder, tmp: Path) -> dict:
    sources = [settings.course_dir(), settings.qa_file()]
    chunks, _ = load_corpus(sources, 200, 30, emb.tokenize)
    texts = [c.embed_text for c in chunks]
    emb.encode(texts[:64])  # warm-up
    with Timer() as base:
        emb.model.encode(texts, batch_size=64, normalize_embeddings=True)
    with Timer() as ours:
        build_index(sources, tmp / "build", BuildConfig(), force=True, progress=False, embedder=emb)
    return {
        "chunks": len(texts),
        "baseline_encode_chunks_per_s": round(len(texts) / base.s, 1),
        "build_chunks_per_s": round(len(texts) / ours.s, 1),
        "ratio_build_to_encode": round(base.s / ours.s, 3),
        "target_ratio": 0.9,
    }


def latency(emb: Embedder, tmp: Path, sizes=(1000, 20000), queries=200) -> dict:
    """Query latency (embedding + search) on indexes of real chunks, tiled with jitter to the size."""
    chunks, _ = load_corpus([settings.course_dir(), settings.qa_file()], 200, 30, emb.tokenize)
    base_vecs = emb.encode([c.embed_text for c in chunks])
    qs = [r.question for r in load_qa(settings.qa_file())][:queries]
    rng = np.random.default_rng(0)
    out = {}
    for n in sizes:
        idx = rng.integers(0, len(chunks), n)
        vecs = base_vecs[idx] + rng.normal(0, 0.01, (n, base_vecs.shape[1])).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        tiled = [chunks[i] for i in idx]
        for j, c in enumerate(tiled):
            tiled[j] = type(c)(**{**c.to_dict(), "id": j})
        path = tmp / f"lat{n}"
        write_index(path, tiled, vecs, build_bm25([c.embed_text for c in tiled]), BuildConfig(), f"bench{n}", vecs.shape[1])
        with Timer() as load:
            r = Retriever.load(path, embedder=emb)
        row = {"load_s": round(load.s, 3)}
        for mode in MODES:
            r.search(qs[0], 5, mode)
            samples = []
            for q in qs:
                t = time.perf_counter()
                r.search(q, 5, mode)
                samples.append((time.perf_counter() - t) * 1000)
            row[mode] = percentiles(samples)
        out[str(n)] = row
    out["target_dense_p50_ms_at_20k"] = 15
    return out


def group18_quality(emb: Embedder, tmp: Path) -> dict:
    """Index every answer of dev.jsonl; query with each validation question; rank of its own answer."""
    records = load_qa(GROUP18 / "dev.jsonl")
    # passages are answers alone (no question), so a hit means the answer was found by meaning
    chunks_src = tmp / "answers_txt"
    chunks_src.mkdir()
    for n, r in enumerate(records):
        (chunks_src / f"a{n:04d}.txt").write_text(r.answer)
    build_index([chunks_src], tmp / "g18", BuildConfig(chunk_size=512, chunk_overlap=0), progress=False, embedder=emb)
    r = Retriever.load(tmp / "g18", embedder=emb)
    val = select_split(records, "validation")
    own = {rec.question: f"a{records.index(rec):04d}" for rec in val}
    out = {}
    for mode in MODES:
        hits = r.search_many([v.question for v in val], 20, mode)
        out[mode] = ranking_metrics([first_rank(h, lambda p, q=v.question: p.section_id == own[q]) for v, h in zip(val, hits)])
    return out


def notes_quality(emb: Embedder, tmp: Path) -> dict:
    """The project's test questions against an index of the notes alone: rank of a gold section."""
    build_index([settings.course_dir()], tmp / "notes", BuildConfig(), progress=False, embedder=emb)
    r = Retriever.load(tmp / "notes", embedder=emb)
    test = select_split(load_qa(settings.qa_file()), "test")
    out = {}
    for mode in MODES:
        hits = r.search_many([t.question for t in test], 20, mode)
        out[mode] = ranking_metrics([first_rank(h, lambda p, g=set(t.gold): p.section_id in g) for t, h in zip(test, hits)])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1k chunks only, 50 queries")
    args = ap.parse_args()
    emb = Embedder()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result = {"build": build_throughput(emb, tmp)}
        result["latency"] = latency(emb, tmp, (1000,) if args.quick else (1000, 20000), 50 if args.quick else 200)
        if GROUP18.is_dir():
            result["group18_own_answer"] = group18_quality(emb, tmp)
        result["notes_gold_section"] = notes_quality(emb, tmp)
    write("retrieval", result)
    b = result["build"]
    print(f"build {b['build_chunks_per_s']} chunks/s vs encode {b['baseline_encode_chunks_per_s']} (ratio {b['ratio_build_to_encode']})")
    print(verdict("index build speed / encoding alone", b["ratio_build_to_encode"], b["target_ratio"]))
    big = result["latency"].get("20000")
    if isinstance(big, dict):
        print(verdict("dense search p50 ms at 20k chunks", big["dense"]["p50_ms"], result["latency"]["target_dense_p50_ms_at_20k"], higher_is_better=False))
    for n, row in result["latency"].items():
        if isinstance(row, dict):
            print(f"{n} chunks: load {row['load_s']}s; " + "; ".join(f"{m} p50 {row[m]['p50_ms']} p99 {row[m]['p99_ms']} ms" for m in MODES))
    for key in ("group18_own_answer", "notes_gold_section"):
        for mode, m in result.get(key, {}).items():
            print(f"{key} {mode}: R@1 {m['recall@1']} R@5 {m['recall@5']} MRR {m['mrr']} (n={m['n']})")


if __name__ == "__main__":
    main()
