"""The index beyond the course's size (issue 25): FAISS flat against IVF and IVF-PQ on a corpus of
N vectors, recall of the exact top-k, query latency and memory, one run.

The corpus is the course index's own MiniLM vectors, plus synthetic neighbours (each a real chunk's
vector with Gaussian noise, renormalised) up to N, so the clusters look like real text; the queries
are the Q&A set's questions, encoded by the same model. Ground truth is the flat index's top-k.
The flat index is the baseline every ratio is taken against. Two recalls: of the exact top-k
vectors, and of the real chunks those stand for (see `measure`).

    python bench/index_scale.py [--n 200000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from common import verdict, write  # noqa: E402  (sets sys.path)

K = (3, 10)


def corpus(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from index.retriever import Retriever
    from serve_load import bench_index, questions

    retriever = Retriever.load(bench_index())
    real = retriever.faiss_index.reconstruct_n(0, retriever.faiss_index.ntotal).astype(np.float32)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(real), n - len(real))
    fake = real[picks] + rng.normal(0, 0.6 / np.sqrt(real.shape[1]), (len(picks), real.shape[1])).astype(np.float32)
    vectors = np.vstack([real, fake])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = retriever.embedder.encode_queries(questions(200))
    source = np.concatenate([np.arange(len(real)), picks])  # the real chunk each vector stands for
    return vectors.astype(np.float32), np.asarray(queries, dtype=np.float32), source


def measure(index, queries: np.ndarray, truth: np.ndarray, source: np.ndarray) -> dict:
    """recall@k: of the exact top-k vectors; source_recall@k: of the real chunks they stand for (a
    synthetic neighbour is a near-copy of one, so among ~N/1,044 copies of the best chunk the exact
    order is noise, while which chunk's text a student is shown is what matters)."""
    import faiss

    faiss.omp_set_num_threads(1)  # one query at a time, as a request is served
    latencies, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, ids = index.search(q[None, :], max(K))
        latencies.append((time.perf_counter() - t0) * 1000)
        found.append(ids[0])
    found = np.array(found)
    recall = {f"recall@{k}": round(float(np.mean([len(set(f[:k]) & set(t[:k])) / k for f, t in zip(found, truth)])), 4) for k in K}
    recall |= {f"source_recall@{k}": round(float(np.mean([len(set(source[f[:k]]) & set(source[t[:k]])) / len(set(source[t[:k]]))
                                                          for f, t in zip(found, truth)])), 4) for k in K}
    return {**recall, "p50_ms": round(statistics.median(latencies), 3), "p95_ms": round(float(np.percentile(latencies, 95)), 3),
            "bytes": int(faiss.serialize_index(index).nbytes)}


def main() -> None:
    import faiss

    from index.store import make_faiss_index

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    args = ap.parse_args()
    vectors, queries, source = corpus(args.n)
    out = {"command": f"python bench/index_scale.py --n {args.n}", "n": len(vectors), "dim": int(vectors.shape[1]), "queries": len(queries)}
    built = {}
    for kind in ("flat", "ivf", "ivfpq"):
        faiss.omp_set_num_threads(os.cpu_count())  # building uses every core
        t0 = time.perf_counter()
        built[kind] = make_faiss_index(vectors, kind)
        out[kind] = {"build_s": round(time.perf_counter() - t0, 2)}
        print(f"{kind}: built in {out[kind]['build_s']} s", flush=True)
    _, truth = built["flat"].search(queries, max(K))
    for kind, index in built.items():
        out[kind] |= measure(index, queries, truth, source)
        if kind != "flat":
            out[kind] |= {"latency_ratio_to_flat": round(out[kind]["p50_ms"] / out["flat"]["p50_ms"], 3),
                          "memory_ratio_to_flat": round(out[kind]["bytes"] / out["flat"]["bytes"], 4)}
        print(kind, out[kind], flush=True)
    out["verdicts"] = [
        verdict("IVF-PQ source recall@10 (the chunks of the exact top 10)", out["ivfpq"]["source_recall@10"], 0.8),
        verdict("IVF-PQ memory over flat", out["ivfpq"]["memory_ratio_to_flat"], 0.1, higher_is_better=False),
    ]
    write("index_scale", out)
    print("\n".join(out["verdicts"]))


if __name__ == "__main__":
    main()
