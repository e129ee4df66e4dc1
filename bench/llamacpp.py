"""llama.cpp vs transformers on this CPU (issue 23), one run, the same prompts and the same adapter:
`gemma-270m-aiml` (transformers, bf16 weights de-quantised from the packaged GGUF) against the
default `gemma-270m-aiml-cpp` (llama.cpp, the packaged GGUF re-quantised to Q8_0, the adapter exported
to a GGUF LoRA), and for decoding the same on the packaged Q4_K_M file as it is.

- batch-1 decoding, tokens/s, and time to first token of a grounded prompt (k=3, ~450-600 tokens);
  the decode rate against the memory bound of the bytes each back end reads per token (the weights
  it holds), at this machine's copy bandwidth measured in the same run; llama.cpp both on Q8_0
  (the default) and on the packaged Q4_K_M;
- 8 concurrent clients through the server (`/v1/answer`, grounded, 48 tokens): answers/s;
- peak resident memory of a process that loads the model and answers once;
- quality: ROUGE-L on the Q&A set's test split, grounded k=3, both back ends, paired.

Goals: decode >= 3x today's 20.2 tokens/s and >= 0.7 of the memory bound; 8 clients >= 2x;
ROUGE-L within the 95% interval of the transformers back end. Writes bench/results/llamacpp.json.

    python bench/llamacpp.py [--prompts 4] [--answers 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import verdict, write  # noqa: E402  (sets sys.path)

HERE = Path(__file__).resolve().parent
MODELS = {"transformers": "gemma-270m-aiml", "llamacpp": "gemma-270m-aiml-cpp"}
TODAY_TOKENS_PER_S = 20.2  # bench/results/generation.json, batch 1, before this back end


def timed_generation(gen, prompt: str, tokens: int) -> dict:
    """Time to the first token and the decode rate after it, from the streaming sink's calls."""
    from rag.generators.base import GenerationConfig

    stamps = []
    t0 = time.perf_counter()
    g = gen.generate([prompt], GenerationConfig(max_new_tokens=tokens), sinks=[lambda _text: stamps.append(time.perf_counter())])[0]
    steps = len(stamps)
    rate = (steps - 1) / (stamps[-1] - stamps[0]) if steps > 2 else None
    return {"ttft_s": stamps[0] - t0 if stamps else None, "decode_tokens_per_s": rate, "steps": steps, "prompt_tokens": g.prompt_tokens}


def held_bytes(backend: str, gen) -> int:
    """What the back end reads per decoded token: every weight it holds, once."""
    if backend.startswith("llamacpp"):
        from rag.gguf_lora import model_file

        return model_file(gen.spec).stat().st_size  # the GGUF file (its header is a few kB)
    from generation import weight_bytes_per_token

    return weight_bytes_per_token(gen.model)


def packaged_spec():
    """The default llama.cpp model on the packaged Q4_K_M file as it is (the default re-quantises it
    to Q8_0 once, which holds the same weights: no full-precision file ships offline)."""
    from rag.registry import get_spec

    spec = get_spec(MODELS["llamacpp"])
    return spec.model_copy(update={"name": f"{spec.name}-q4_k_m", "quantize": None})


def decoding(retriever, questions: list[str], bandwidth: float, tokens: int = 64, rounds: int = 3) -> dict:
    """Per back end, on grounded prompts (k=3) and on generation.json's short prompt: all the models
    loaded at once and measured in turn, prompt by prompt, so that drift in this shared machine's
    speed falls on each alike (measured one model after another, whichever came later ran faster)."""
    from generation import PROMPT

    from rag.pool import load_answerers
    from rag.prompts import build_prompt
    from rag.registry import get_spec

    specs = {backend: get_spec(name) for backend, name in MODELS.items()} | {"llamacpp_q4_k_m": packaged_spec()}
    gens, prompts = {}, {}
    for backend, spec in specs.items():
        (answerer,) = load_answerers([spec], retriever).values()
        gens[backend] = gen = answerer.generator
        prompts[backend] = [build_prompt(answerer.template, q, [p.text for p in retriever.search(q, 3)], gen.count_tokens,
                                         gen.context_window - tokens)[0] for q in questions]
        timed_generation(gen, prompts[backend][0], 4)  # warm-up
    grounded = {b: [] for b in gens}
    short = {b: [] for b in gens}
    for i in range(len(questions)):
        for b, gen in gens.items():
            grounded[b].append(timed_generation(gen, prompts[b][i], tokens))
    for _ in range(rounds):
        for b, gen in gens.items():
            short[b].append(timed_generation(gen, PROMPT, tokens)["decode_tokens_per_s"])
    out = {}
    for b, gen in gens.items():
        runs = grounded[b]
        rate = statistics.median(r["decode_tokens_per_s"] for r in runs if r["decode_tokens_per_s"])
        fast = statistics.median(short[b])
        read = held_bytes(b, gen)
        out[b] = {"model": specs[b].name, "decode_tokens_per_s": round(rate, 2), "short_prompt_decode_tokens_per_s": round(fast, 2),
                  "short_prompt_runs": [round(x, 2) for x in short[b]], "ttft_s": round(statistics.median(r["ttft_s"] for r in runs), 3),
                  "prompt_tokens": [r["prompt_tokens"] for r in runs], "bytes_per_token": read, "memory_bound_tokens_per_s": round(bandwidth / read, 1),
                  "ratio_to_bound": round(fast * read / bandwidth, 3),  # generation.json's prompt, as its 0.40 was
                  "grounded_ratio_to_bound": round(rate * read / bandwidth, 3)}
        print(b, out[b], flush=True)
    out["batched_8"] = batched(gens, prompts, tokens)
    return out


def batched(gens: dict, prompts: dict, tokens: int) -> dict:
    """8 grounded prompts in one greedy generate call (what the server's batcher hands a back end),
    each back end in turn, twice: completion tokens per second of wall time."""
    from rag.generators.base import GenerationConfig

    rates = {b: [] for b in gens}
    for _ in range(2):
        for b, gen in gens.items():
            batch = (prompts[b] * 8)[:8]
            t0 = time.perf_counter()
            done = gen.generate(batch, GenerationConfig(max_new_tokens=tokens))
            rates[b].append(sum(g.completion_tokens for g in done) / (time.perf_counter() - t0))
    out = {b: round(max(r), 2) for b, r in rates.items()}
    print("batched 8, tokens/s:", out, flush=True)
    return out


def concurrent(retriever, questions: list[str], answers: int, clients: int = 8) -> dict:
    import httpx

    from rag.pool import load_answerers
    from rag.registry import get_spec
    from server import ServerConfig, create_app
    from server.local import live

    out = {}
    for backend, name in MODELS.items():
        app = create_app(load_answerers([get_spec(name)], retriever), config=ServerConfig(api_keys=frozenset(), request_timeout_s=900))
        with live(app) as url, httpx.Client(base_url=url, timeout=900) as http:
            ask = lambda q: http.post("/v1/answer", json={"question": q, "max_new_tokens": 48}).raise_for_status().json()
            ask(questions[0])  # warm-up
            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                replies = list(pool.map(ask, questions[:answers]))
            wall = time.perf_counter() - t0
        out[backend] = {"model": name, "clients": clients, "answers": len(replies), "wall_s": round(wall, 2), "answers_per_s": round(len(replies) / wall, 3),
                        "completion_tokens": sum(r["usage"]["completion_tokens"] for r in replies)}
        print(backend, out[backend], flush=True)
    return out


PEAK = """
import sys
from index.retriever import Retriever
from rag.pool import load_answerers
from rag.registry import get_spec
(a,) = load_answerers([get_spec(sys.argv[1])], Retriever.load(sys.argv[2])).values()
a.answer("How does dropout reduce overfitting?", max_new_tokens=16)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))  # kB; ru_maxrss would carry the parent's peak
"""


def peak_memory(index: Path) -> dict:
    out = {}
    for backend, name in MODELS.items():
        run = subprocess.run([sys.executable, "-c", PEAK, name, str(index)], capture_output=True, text=True, cwd=HERE.parent, check=True)
        out[backend] = {"model": name, "peak_rss_mb": round(int(run.stdout.split()[-1]) / 1024, 1)}
    return out


def quality() -> dict:
    """Grounded ROUGE-L on the test split through the evaluator (cached), paired question by question."""
    from eval.ablation import run_ablation
    from eval.bootstrap import paired_test
    from eval.config import load_config

    summary, out = run_ablation(load_config(HERE / "llamacpp.yaml"), progress=False)
    cells = {c["model"]: c for c in summary["cells"]}
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    per = {m: [p["scores"]["rougeL"] for p in preds if p["model"] == m] for m in MODELS.values()}
    t = paired_test(per[MODELS["llamacpp"]], per[MODELS["transformers"]], 1000, 0).to_dict()
    hf, cpp = cells[MODELS["transformers"]]["rougeL"], cells[MODELS["llamacpp"]]["rougeL"]
    return {"transformers": hf, "llamacpp": cpp, "paired_llamacpp_minus_transformers": t,
            "within_interval": hf["lo"] <= cpp["mean"] <= hf["hi"], "report": "bench/results/llamacpp/report.md"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--answers", type=int, default=16)
    args = ap.parse_args()

    from generation import copy_bandwidth
    from index.retriever import Retriever
    from serve_load import bench_index, questions

    index = bench_index()
    retriever = Retriever.load(index)
    qs = questions(200)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    decode = decoding(retriever, qs[: args.prompts], bandwidth)
    clients = concurrent(retriever, qs[10 : 10 + args.answers], args.answers)
    memory = peak_memory(index)
    quality_ = quality()
    hf, cpp = decode["transformers"], decode["llamacpp"]
    speedup = cpp["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
    served = clients["llamacpp"]["answers_per_s"] / clients["transformers"]["answers_per_s"]
    lines = [
        verdict("llama.cpp batch-1 decode (generation.json's prompt) over today's 20.2 tokens/s",
                round(cpp["short_prompt_decode_tokens_per_s"] / TODAY_TOKENS_PER_S, 2), 3.0),
        verdict("llama.cpp batch-1 decode over transformers, grounded prompts, same run", round(speedup, 2), 3.0),
        verdict("llama.cpp decode over its memory bound", cpp["ratio_to_bound"], 0.7),
        verdict("llama.cpp on the packaged Q4_K_M, batch-1 decode (generation.json's prompt) over today's 20.2 tokens/s",
                round(decode["llamacpp_q4_k_m"]["short_prompt_decode_tokens_per_s"] / TODAY_TOKENS_PER_S, 2), 3.0),
        verdict("llama.cpp on the packaged Q4_K_M, decode over its memory bound", decode["llamacpp_q4_k_m"]["ratio_to_bound"], 0.7),
        verdict("8 clients, answers/s, llama.cpp over transformers", round(served, 2), 2.0),
        verdict("llama.cpp ROUGE-L inside the transformers interval (1 = yes)", float(quality_["within_interval"]), 1.0),
    ]
    write("llamacpp", {
        "command": "python bench/llamacpp.py", "copy_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "decode": decode, "decode_speedup_same_run": round(speedup, 3), "batched_8_tokens_per_s": decode.pop("batched_8"), "concurrent": clients, "served_ratio": round(served, 3),
        "peak_memory": memory, "quality": quality_, "today_tokens_per_s": TODAY_TOKENS_PER_S,
        "targets": {"decode_over_today": 3.0, "ratio_to_bound": 0.7, "served_ratio": 2.0}, "verdicts": lines,
    })
    print("\n".join(lines))


if __name__ == "__main__":
    main()
