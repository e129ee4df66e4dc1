"""Load test of the REST service on loopback: closed-loop clients, a fixed number of requests per level.

1. `retrieval-only` at 1, 4, 16 and 64 clients: the server's own overhead (HTTP, validation,
   batching, retrieval), no generation.
2. The embedded model (gemma-270m, max_new_tokens 32), grounded (retrieval on, the default) and
   plain (off), at 1 and 8 clients (full run: 1, 4, 8, 16): throughput at 8 clients as a ratio
   to 1 (target >= 4x with dynamic batching). Decoding batches well (it reads the weights once
   per step for the whole batch); prefill of a grounded ~400-token prompt is compute-bound on a
   CPU and does not, so the grounded ratio is the lower one.

Each part starts its own server with `aimlqa serve` in a subprocess on a free loopback port, over
an index built from data/course (kept under $AIMLQA_HOME/indexes/bench-course and rebuilt only
when the notes change). Levels below the queue bound must see zero 5xx. Writes
bench/results/serve_load.json and prints a summary.

    python bench/serve_load.py [--quick] [--requests N] [--embedded-requests N] [--no-embedded]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from common import percentiles, verdict, write  # noqa: E402  (sets sys.path)

import httpx

from aimlqa import settings
from server.local import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[1]
QUEUE_SIZE = 256  # above the largest level, so every level is "below the queue bound"
MAX_WAIT_MS = 10.0  # the server's default
# Throughput, not the time limit, is measured: on a busy 2-core CPU a batch of 8 grounded answers
# can take minutes, and the server's default 120 s limit would turn the wait into 504s.
REQUEST_TIMEOUT_S = 900
FALLBACK_QUESTIONS = ["What is gradient descent?", "How does dropout reduce overfitting?", "What is a convolution kernel?",
                      "What is the difference between bagging and boosting?", "What does a support vector machine maximise?"]


def questions(n: int = 200) -> list[str]:
    """The project's own course questions, so retrieval and prompt lengths vary as in real use."""
    path = settings.qa_file()
    if not path.is_file():
        return FALLBACK_QUESTIONS
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["question"] for r in rows[:n]] or FALLBACK_QUESTIONS


def bench_index() -> Path:
    from index.retriever import build_index

    out = settings.home() / "indexes" / "bench-course"
    manifest, built = build_index([settings.course_dir()], out, progress=False)
    print(f"index {out}: {manifest['n_chunks']} chunks ({'built' if built else 'unchanged'})", flush=True)
    return out


@contextmanager
def server(model: str, index: Path, max_batch_size: int, log_dir: Path, extra: tuple[str, ...] = (), name: str | None = None):
    """`aimlqa serve` (with `extra` options) in a subprocess on loopback; yields its URL once /readyz says ready."""
    port = free_port()
    logfile = log_dir / f"{name or model}.log"
    log = logfile.open("w")
    cmd = [sys.executable, "-m", "aimlqa", "serve", "--model", model, "--index", str(index), "--host", "127.0.0.1", "--port", str(port),
           "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(MAX_WAIT_MS), "--queue-size", str(QUEUE_SIZE),
           "--request-timeout", str(REQUEST_TIMEOUT_S), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"AIMLQA_API_KEYS": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        try:  # the first start of gemma-270m converts the GGUF (about a minute)
            wait_ready(url, proc, 600, 0.5)
        except RuntimeError as e:
            raise SystemExit(f"{e}:\n{logfile.read_text()[-2000:]}") from None
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def batch_stats(url: str, model: str) -> tuple[float, float]:
    """(sum, count) of the server's batch-size histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name in ("aimlqa_batch_size_sum", "aimlqa_batch_size_count") and s.labels.get("model") == model:
                values[s.name] = s.value
    return values.get("aimlqa_batch_size_sum", 0.0), values.get("aimlqa_batch_size_count", 0.0)


async def closed_loop(url: str, body: dict, qs: list[str], clients: int, requests: int, retries: int = 0, midway=None) -> dict:
    """`clients` workers, each sending its next request as soon as the last one is answered.
    `retries`: a request is sent again, up to that many times, after a 503 (waiting its
    Retry-After) or a dropped connection; `midway()` runs once, in a thread, when a third of the
    requests have been answered."""
    latencies, statuses, tickets, retried, answered = [], Counter(), iter(range(requests)), [0], [0]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def send(question: str) -> int | str:
            for attempt in range(retries + 1):
                last = attempt == retries
                try:
                    r = await client.post("/v1/answer", json=body | {"question": question})
                except httpx.TransportError as e:
                    if last:
                        return type(e).__name__
                    retried[0] += 1
                    continue
                except httpx.HTTPError as e:
                    return type(e).__name__
                if r.status_code == 503 and not last:
                    retried[0] += 1
                    await asyncio.sleep(float(r.headers.get("retry-after", 1)))
                    continue
                return r.status_code

        async def worker():
            for i in tickets:
                t0 = time.perf_counter()
                status = await send(qs[i % len(qs)])
                statuses[status] += 1
                if status == 200:
                    latencies.append((time.perf_counter() - t0) * 1000)
                answered[0] += 1
                if midway is not None and answered[0] == requests // 3:
                    await asyncio.to_thread(midway)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    errors = {str(k): v for k, v in statuses.items() if k != 200}
    return {
        "clients": clients,
        "requests": requests,
        "ok": statuses[200],
        "errors": errors,
        "server_errors_5xx": sum(v for k, v in statuses.items() if isinstance(k, int) and k >= 500),
        "retried": retried[0],
        "seconds": round(wall, 3),
        "answers_per_s": round(statuses[200] / wall, 4),
        **(percentiles(latencies) if latencies else {}),
    }


def run_levels(url: str, model: str, body: dict, levels: list[int], requests: int, qs: list[str]) -> list[dict]:
    out = []
    asyncio.run(closed_loop(url, body, qs, 2, 2))  # warm-up: first-call costs, connections
    for clients in levels:
        before = batch_stats(url, model)
        result = asyncio.run(closed_loop(url, body, qs, clients, requests))
        after = batch_stats(url, model)
        batches = after[1] - before[1]
        result["mean_batch_size"] = round((after[0] - before[0]) / batches, 2) if batches else None
        out.append(result)
        print(f"  {model:15} {clients:3} clients: {result['answers_per_s']:8.2f} answers/s  p50 {result.get('p50_ms', 0):8.1f}  "
              f"p95 {result.get('p95_ms', 0):8.1f}  p99 {result.get('p99_ms', 0):8.1f} ms  batch {result['mean_batch_size']}  errors {result['errors'] or 0}",
              flush=True)
    return out


def overhead(url: str, index: Path, qs: list[str], pairs: int = 40) -> dict:
    """What the server adds to one retrieval-only answer: the same answer in this process and over
    HTTP, alternating, so both see the same machine load (a shared machine's load swings widely)."""
    from index.retriever import Retriever
    from rag.answer import Answerer
    from rag.registry import get_spec

    answerer = Answerer(get_spec("retrieval-only"), Retriever.load(index))
    direct, served = [], []
    with httpx.Client(base_url=url, timeout=600) as client:
        for i in range(pairs + 2):
            q = qs[i % len(qs)]
            t0 = time.perf_counter()
            answerer.answer(q, k=3)
            t1 = time.perf_counter()
            client.post("/v1/answer", json={"question": q, "model": "retrieval-only", "top_k": 3}).raise_for_status()
            t2 = time.perf_counter()
            if i >= 2:  # the first pairs warm both up
                direct.append((t1 - t0) * 1000)
                served.append((t2 - t1) * 1000)
    diffs = sorted(s - d for s, d in zip(served, direct))
    return {"pairs": pairs, "in_process": percentiles(direct), "over_http": percentiles(served),
            "overhead_p50_ms": round(diffs[len(diffs) // 2], 2), "includes_max_wait_ms": MAX_WAIT_MS}


def versions() -> dict:
    from index.store import versions as package_versions

    return package_versions(("fastapi", "starlette", "uvicorn", "httpx", "pydantic"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer requests; embedded model at 1 and 8 clients only")
    ap.add_argument("--requests", type=int, default=None, help="requests per level for retrieval-only (default 400, quick 200)")
    ap.add_argument("--embedded-requests", type=int, default=None, help="requests per level for the embedded model (default 32, quick 16)")
    ap.add_argument("--no-embedded", action="store_true", help="only the retrieval-only part")
    ap.add_argument("--embedded-variants", default="grounded,plain", help="grounded (retrieval on, ~400-token prompts) and/or plain (off)")
    ap.add_argument("--max-batch-size", type=int, default=8)
    args = ap.parse_args()
    requests = args.requests or (200 if args.quick else 400)
    embedded_requests = args.embedded_requests or (16 if args.quick else 32)
    qs = questions()
    index = bench_index()
    load_before = os.getloadavg()
    result = {"queue_size": QUEUE_SIZE, "max_batch_size": args.max_batch_size, "max_wait_ms": MAX_WAIT_MS, "request_timeout_s": REQUEST_TIMEOUT_S, "server_versions": versions(), "questions": len(qs),
              "note": "loopback; the load generator shares the machine's cores with the server"}
    with tempfile.TemporaryDirectory() as logs:
        print("retrieval-only (the server's own overhead):", flush=True)
        with server("retrieval-only", index, args.max_batch_size, Path(logs)) as url:
            levels = run_levels(url, "retrieval-only", {"model": "retrieval-only", "top_k": 3}, [1, 4, 16, 64], requests, qs)
            added = overhead(url, index, qs)
        print(f"  server overhead per answer (HTTP vs in process, alternating): p50 {added['overhead_p50_ms']} ms", flush=True)
        result["retrieval_only"] = {"requests_per_level": requests, "levels": levels, "server_overhead": added}
        if not args.no_embedded:
            result["embedded"] = {"model": "gemma-270m", "max_new_tokens": 32, "requests_per_level": embedded_requests, "target_ratio_8_to_1": 4.0}
            with server("gemma-270m", index, args.max_batch_size, Path(logs)) as url:
                for variant in args.embedded_variants.split(","):
                    print(f"gemma-270m, {variant} (max_new_tokens 32):", flush=True)
                    body = {"model": "gemma-270m", "rag": variant == "grounded", "top_k": 3, "max_new_tokens": 32}
                    levels = run_levels(url, "gemma-270m", body, [1, 8] if args.quick else [1, 4, 8, 16], embedded_requests, qs)
                    by = {lv["clients"]: lv["ok"] / lv["seconds"] for lv in levels}
                    result["embedded"][variant] = {"levels": levels, "throughput_ratio_8_to_1": round(by[8] / by[1], 2) if by.get(1) else None}
    all_levels = result["retrieval_only"]["levels"] + [lv for v in result.get("embedded", {}).values() if isinstance(v, dict) for lv in v["levels"]]
    result["zero_5xx_below_queue_bound"] = all(lv["server_errors_5xx"] == 0 for lv in all_levels if lv["clients"] <= QUEUE_SIZE)
    result["load_average_1m"] = {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)}
    write("serve_load", result)
    for variant, v in result.get("embedded", {}).items():
        if isinstance(v, dict):
            print(verdict(f"gemma-270m {variant}: throughput at 8 clients / 1 client", v["throughput_ratio_8_to_1"], result["embedded"]["target_ratio_8_to_1"]))
    print(f"zero 5xx below the queue bound: {result['zero_5xx_below_queue_bound']}")


if __name__ == "__main__":
    main()
