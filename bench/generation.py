"""Generation benchmark for the embedded model on CPU.

1. Decode tokens/s at batch 1 against a bound measured in the same run: the bytes of weights read
   per token over the machine's measured copy bandwidth.
2. Throughput at batch 1/4/8/16 as a ratio to batch 1 (target >= 4x at 8).
3. Quality, a first reading: plain vs grounded ROUGE on 100 group18 validation questions, the index
   built from the train split only.

    python bench/generation.py [--quick] [--questions 100]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import Timer, verdict, write  # noqa: E402  (sets sys.path)

from aimlqa import settings  # noqa: E402

from index.qa import load_qa, select_split
from index.retriever import Retriever, build_index
from rag.answer import Answerer
from rag.registry import get_spec

GROUP18 = settings.group18_dir()  # developers' data, not shipped
PROMPT = "Question: What is the difference between bagging and boosting?\nAnswer:"


def copy_bandwidth(mb: int = 512, repeats: int = 5) -> float:
    """Bytes/s of a large memory copy (read + write), the best of several runs."""
    a = np.ones(mb * 2**20 // 4, dtype=np.float32)
    b = np.empty_like(a)
    best = min(_time(lambda: np.copyto(b, a)) for _ in range(repeats))
    return 2 * a.nbytes / best


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def weight_bytes_per_token(model) -> int:
    """Every weight matrix is read once per decoded token; a tied embedding counts once (as the output layer)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


@torch.inference_mode()
def decode_rate(model, tok, batch: int, new_tokens: int) -> float:
    """Generated tokens/s for `batch` sequences of exactly `new_tokens` tokens (prefill excluded)."""
    enc = tok([PROMPT] * batch, return_tensors="pt", padding=True)
    kw = dict(do_sample=False, pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
    t_prefill = _time(lambda: model.generate(**enc, max_new_tokens=1, min_new_tokens=1, **kw))
    t_total = _time(lambda: model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw))
    return batch * (new_tokens - 1) / max(t_total - t_prefill, 1e-9)


def quality(answerer: Answerer, n: int, tmp: Path) -> dict:
    from eval.metrics import rouge_scores

    records = load_qa(GROUP18 / "dev.jsonl")
    train, val = select_split(records, "train"), select_split(records, "validation")[:n]
    qa = tmp / "train.jsonl"
    qa.write_text("".join(json.dumps({"question": r.question, "answer": r.answer}) + "\n" for r in train))
    build_index([qa], tmp / "train_index", progress=False)
    answerer.retriever = Retriever.load(tmp / "train_index")
    out = {"questions": len(val), "index": "group18 train split only"}
    for rag in (False, True):
        preds = []
        with Timer() as t:
            for i in range(0, len(val), 8):
                preds += [a.text for a in answerer.answer_many([r.question for r in val[i : i + 8]], rag=rag, k=3, max_new_tokens=64)]
        scores = rouge_scores(preds, [r.answer for r in val])
        out["grounded" if rag else "plain"] = {k: round(v, 4) for k, v in scores.items()} | {"seconds": round(t.s, 1)}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--questions", type=int, default=100)
    args = ap.parse_args()
    answerer = Answerer(get_spec("gemma-270m"))
    model, tok = answerer.generator.model, answerer.generator.tokenizer
    bw = copy_bandwidth()
    wbytes = weight_bytes_per_token(model)
    bound = bw / wbytes
    new_tokens = 16 if args.quick else 48
    batches = (1, 8) if args.quick else (1, 4, 8, 16)
    decode_rate(model, tok, 1, 4)  # warm-up
    rates = {b: decode_rate(model, tok, b, new_tokens) for b in batches}
    result = {
        "model": "gemma-270m",
        "dtype": str(model.dtype),
        "weight_bytes_per_token": wbytes,
        "copy_bandwidth_gb_s": round(bw / 1e9, 2),
        "bound_tokens_per_s_batch1": round(bound, 2),
        "decode_tokens_per_s_batch1": round(rates[1], 2),
        "ratio_to_bound": round(rates[1] / bound, 3),
        "throughput_tokens_per_s": {str(b): round(r, 2) for b, r in rates.items()},
        "throughput_ratio_to_batch1": {str(b): round(r / rates[1], 2) for b, r in rates.items()},
        "target_ratio_at_8": 4.0,
        "new_tokens": new_tokens,
    }
    if GROUP18.is_dir() and not args.quick:
        with tempfile.TemporaryDirectory() as d:
            result["quality"] = quality(answerer, args.questions, Path(d))
    write("generation", result)
    print(json.dumps({k: v for k, v in result.items() if k != "quality"}, indent=2))
    if "quality" in result:
        print(json.dumps(result["quality"], indent=2))
    print(verdict("throughput at batch 8 / batch 1", result["throughput_ratio_to_batch1"]["8"], result["target_ratio_at_8"]))


if __name__ == "__main__":
    main()
