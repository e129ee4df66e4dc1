"""Many adapters on one base, served live: what mixing costs, and how soon a new adapter answers.

One server process (uvicorn on loopback, the default ServerConfig that `make run` uses) serves the
real Gemma 3 270M as `gemma-270m` and the shipped `gemma-270m-aiml` adapter on the same weights.
A second adapter (`second`: the shipped one with its LoRA B matrices halved, so a distinct adapter
of the same size and cost) is loaded through `POST /v1/load_lora_adapter`.

1. Mixed-adapter throughput: 16 concurrent grounded requests spread round-robin over the base and
   the two adapters, against the same 16 questions all on one adapter (the same-run baseline);
   goal >= 0.8 of it in tokens/s. The base alone is measured too (what an unmerged adapter costs).
   Rounds alternate and each figure is the median of the rounds.
2. Load to first answer: `load_lora_adapter`, then the new adapter's first grounded answer cut to one
   token (its time to first token: retrieval and prefill), goal <= 2 s from the load call; then a
   full answer on it against the same answer on an adapter already loaded (the same-run baseline:
   a new adapter must not answer slower than an old one).

Writes bench/results/adapters.json and prints PASS / FALL SHORT against each target.

    python bench/adapters.py [--rounds 3] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import write  # noqa: E402  (sets sys.path)

import httpx

TARGET_MIXED_RATIO = 0.8
TARGET_LOAD_TO_ANSWER_S = 2.0


def second_adapter(shipped: Path, root: Path) -> Path:
    """The shipped adapter with lora_B halved: another adapter, same shapes and cost."""
    from safetensors.torch import load_file, save_file

    run = root / "second"
    shutil.copytree(shipped.parent, run)
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = {k: (v * 0.5 if "lora_B" in k else v).contiguous() for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    return run


def burst(http: httpx.Client, models: list[str], questions: list[str], tokens: int) -> dict:
    """All requests at once; tokens/s over the wall time of the burst."""
    def one(pair):
        m, q = pair
        r = http.post("/v1/answer", json={"question": q, "model": m, "max_new_tokens": tokens})
        r.raise_for_status()
        return r.json()

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(questions)) as pool:
        replies = list(pool.map(one, zip(models, questions)))
    wall = time.perf_counter() - t0
    assert [r["model"] for r in replies] == models
    n_tokens = sum(r["usage"]["completion_tokens"] for r in replies)
    return {"wall_s": round(wall, 3), "completion_tokens": n_tokens, "tokens_per_s": round(n_tokens / wall, 2),
            "answers_per_s": round(len(replies) / wall, 3)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--clients", type=int, default=16)
    args = ap.parse_args()

    from index.retriever import Retriever
    from rag.pool import load_answerers
    from rag.registry import get_spec
    from serve_load import bench_index, questions
    from server import ServerConfig, create_app
    from server.local import live

    root = Path(tempfile.mkdtemp(prefix="aimlqa-adapters-"))
    shipped = get_spec("gemma-270m-aiml")
    second_adapter(Path(shipped.adapter), root)
    retriever = Retriever.load(bench_index())
    t0 = time.perf_counter()
    answerers = load_answerers([shipped, get_spec("gemma-270m")], retriever)
    load_s = time.perf_counter() - t0
    config = ServerConfig(adapters_root=root, api_keys=frozenset(), request_timeout_s=900)
    qs = questions(200)[: args.clients]
    result = {"config": {"clients": args.clients, "max_new_tokens": args.tokens, "rounds": args.rounds, "rag": True, "k": 3,
                         "max_batch_size": config.max_batch_size, "max_wait_ms": config.max_wait_ms},
              "startup_load_s": round(load_s, 2)}
    with live(create_app(answerers, config=config)) as url, httpx.Client(base_url=url, timeout=900) as http:
        http.post("/v1/answer", json={"question": qs[0], "max_new_tokens": 4}).raise_for_status()  # warm-up

        # 2. load to first answer, against an answer on an adapter already loaded
        loads = []
        for i in range(args.rounds):
            name = f"second-{i}"
            t0 = time.perf_counter()
            r = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": "second"})
            r.raise_for_status()
            t1 = time.perf_counter()
            http.post("/v1/answer", json={"question": qs[i], "model": name, "max_new_tokens": 1}).raise_for_status()
            t2 = time.perf_counter()
            q = qs[(i + 5) % len(qs)]
            http.post("/v1/answer", json={"question": q, "model": name, "max_new_tokens": args.tokens}).raise_for_status()
            t3 = time.perf_counter()
            http.post("/v1/answer", json={"question": q, "model": "gemma-270m-aiml", "max_new_tokens": args.tokens}).raise_for_status()
            t4 = time.perf_counter()
            http.post("/v1/answer", json={"question": qs[i], "model": "gemma-270m-aiml", "max_new_tokens": 1}).raise_for_status()
            t5 = time.perf_counter()
            loads.append({"load_s": t1 - t0, "load_to_first_token_s": t2 - t0, "first_token_on_loaded_s": t5 - t4,
                          "full_answer_on_new_s": t3 - t2, "full_answer_on_loaded_s": t4 - t3})
            if i:
                http.post("/v1/unload_lora_adapter", json={"lora_name": name}).raise_for_status()
        med = {k: round(statistics.median(x[k] for x in loads), 3) for k in loads[0]}
        result["load"] = {"median": med, "rounds": [{k: round(v, 3) for k, v in x.items()} for x in loads],
                          "target_s": TARGET_LOAD_TO_ANSWER_S, "pass": med["load_to_first_token_s"] <= TARGET_LOAD_TO_ANSWER_S,
                          "new_over_loaded_answer_time": round(med["full_answer_on_new_s"] / med["full_answer_on_loaded_s"], 3),
                          "what_loading_adds_s": round(med["load_to_first_token_s"] - med["first_token_on_loaded_s"], 3)}

        # 1. mixed vs one adapter vs the base, the same questions, alternating rounds
        mix = ["gemma-270m", "gemma-270m-aiml", "second-0"]
        layouts = {"one_adapter": ["gemma-270m-aiml"] * len(qs), "mixed": [mix[i % 3] for i in range(len(qs))], "base_only": ["gemma-270m"] * len(qs)}
        runs = {k: [] for k in layouts}
        for _ in range(args.rounds):
            for name, models in layouts.items():
                runs[name].append(burst(http, models, qs, args.tokens))
        summary = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
        ratio = summary["mixed"]["tokens_per_s"] / summary["one_adapter"]["tokens_per_s"]
        result["throughput"] = {"median": summary, "rounds": runs, "mixed_over_one_adapter": round(ratio, 3),
                                "one_adapter_over_base": round(summary["one_adapter"]["tokens_per_s"] / summary["base_only"]["tokens_per_s"], 3),
                                "target_ratio": TARGET_MIXED_RATIO, "pass": ratio >= TARGET_MIXED_RATIO}
    shutil.rmtree(root, ignore_errors=True)
    write("adapters", result)
    t, ld = result["throughput"], result["load"]
    print(f"mixed {t['median']['mixed']['tokens_per_s']} tok/s vs one adapter {t['median']['one_adapter']['tokens_per_s']} tok/s "
          f"(base alone {t['median']['base_only']['tokens_per_s']}): {t['mixed_over_one_adapter']:.2f}x, target >= {TARGET_MIXED_RATIO}: "
          f"{'PASS' if t['pass'] else 'FALL SHORT'}")
    print(f"load_lora_adapter to its first answer token {ld['median']['load_to_first_token_s']:.2f} s (the load call {ld['median']['load_s']:.2f} s; "
          f"the same first token on an adapter already loaded {ld['median']['first_token_on_loaded_s']:.2f} s), "
          f"target <= {TARGET_LOAD_TO_ANSWER_S} s: {'PASS' if ld['pass'] else 'FALL SHORT'}")
    print(json.dumps({"mixed_over_one_adapter": t["mixed_over_one_adapter"], "load": ld["median"]}))


if __name__ == "__main__":
    main()
