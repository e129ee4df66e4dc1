"""The service on Ray Serve against one process (issue 25), one run, the same questions, loopback:

- retrieval-only answers/s at 16 and 64 closed-loop clients: `aimlqa serve` (one process, the
  baseline), `aimlqa serve --ray` with 1 replica of 1 CPU, with 2 replicas of 1 CPU each, and with
  1 replica of 2 CPUs (the single process's cores, for the overhead ratio);
- a replica killed under load (2 replicas, 16 clients, the client retrying once after a 503 or a
  dropped connection): failed requests and p99 latency.

Goals: 2 replicas >= 1.6x of 1 replica; Serve on the same cores >= 0.7 of one process; 0 failed
requests after the one retry. The load generator shares this 2-core machine with the servers.
Writes bench/results/scale.json.

    python bench/scale.py [--requests 400]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import verdict, write  # noqa: E402  (sets sys.path)

from serve_load import bench_index, closed_loop, questions, server

LEVELS = (16, 64)
BODY = {"model": "retrieval-only", "top_k": 3}
SETUPS = {  # name -> extra `aimlqa serve` options
    "one_process": (),
    "serve_1x1cpu": ("--ray", "--replicas", "1", "--cpus-per-replica", "1"),
    "serve_2x1cpu": ("--ray", "--replicas", "2", "--cpus-per-replica", "1"),
    "serve_1x2cpu": ("--ray", "--replicas", "1", "--cpus-per-replica", "2"),
}


def levels(url: str, qs: list[str], requests: int) -> dict:
    asyncio.run(closed_loop(url, BODY, qs, 4, 20))  # warm-up
    out = {}
    for clients in LEVELS:
        r = asyncio.run(closed_loop(url, BODY, qs, clients, requests))
        out[str(clients)] = r
        print(f"  {clients:3} clients: {r['answers_per_s']:7.1f} answers/s  p50 {r.get('p50_ms', 0):7.1f}  p99 {r.get('p99_ms', 0):7.1f} ms  errors {r['errors'] or 0}", flush=True)
    return out


def kill_a_replica() -> str:
    """Join the server's Ray cluster and kill one replica of the model group (Serve starts another)."""
    import ray

    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    try:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_REPLICA::aimlqa#models-0#")]
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        return names[0]
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400, help="requests per level")
    args = ap.parse_args()
    qs, index = questions(), bench_index()
    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True)  # no cluster left from before
    result = {"command": "python bench/scale.py", "model": "retrieval-only", "cores": os.cpu_count(), "requests_per_level": args.requests,
              "note": "loopback; the load generator, Ray's own processes (GCS, raylet, controller, proxy) and the replicas share the cores"}
    with tempfile.TemporaryDirectory() as logs:
        for name, extra in SETUPS.items():
            print(f"{name}:", flush=True)
            t0 = time.perf_counter()
            with server("retrieval-only", index, 8, Path(logs), extra, name) as url:
                result[name] = {"options": " ".join(extra) or "(one process)", "ready_s": round(time.perf_counter() - t0, 1), "levels": levels(url, qs, args.requests)}
                if name == "serve_2x1cpu":
                    print("  a replica killed under load (16 clients, one retry):", flush=True)
                    killed = []
                    killed_run = asyncio.run(closed_loop(url, BODY, qs, 16, args.requests, retries=1, midway=lambda: killed.append(kill_a_replica())))
                    result["replica_killed"] = killed_run | {"failed_after_retry": args.requests - killed_run["ok"], "killed": killed}
                    print(f"  {result['replica_killed']}", flush=True)
    rate = {name: {c: result[name]["levels"][str(c)]["answers_per_s"] for c in LEVELS} for name in SETUPS}
    result["ratios"] = {f"{c}_clients": {
        "serve_2_replicas_over_1": round(rate["serve_2x1cpu"][c] / rate["serve_1x1cpu"][c], 3),
        "serve_1_replica_same_cores_over_one_process": round(rate["serve_1x2cpu"][c] / rate["one_process"][c], 3),
        "serve_1_replica_1cpu_over_one_process": round(rate["serve_1x1cpu"][c] / rate["one_process"][c], 3),
        "serve_2_replicas_over_one_process": round(rate["serve_2x1cpu"][c] / rate["one_process"][c], 3)} for c in LEVELS}
    lines = []
    for c in LEVELS:
        r = result["ratios"][f"{c}_clients"]
        lines.append(verdict(f"{c} clients: Serve 2 replicas over 1 replica (1 CPU each)", r["serve_2_replicas_over_1"], 1.6))
        lines.append(verdict(f"{c} clients: Serve 1 replica (2 CPUs) over one process", r["serve_1_replica_same_cores_over_one_process"], 0.7))
    lines.append(verdict("replica killed under load: requests failed after one retry", result["replica_killed"]["failed_after_retry"], 0, higher_is_better=False))
    result["targets"] = {"two_over_one": 1.6, "serve_over_one_process": 0.7, "failed_after_retry": 0}
    result["verdicts"] = lines
    write("scale", result)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
