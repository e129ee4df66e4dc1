"""Training examples built by `rag.prompts` (the serving code), optionally with retrieved context.

Retrieval-aware training (`context: rag`, after RAFT, Zhang et al. 2024): each example carries
top-k passages from an index built over the training split only; for a share of examples the
course sections holding the answer (the oracle) are removed, so the model learns both to use
context and to answer when it is missing. The example's own Q&A pair, which that index holds, is
left out of its context (`drop_own_pair`): an unseen question's pair is never in the index, so
training with it teaches copying an answer that evaluation never offers. Validation and test
answers are never indexed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from index.qa import QARecord, records_hash
from rag.prompts import PromptTemplate, build_example


def build_train_index(train: list[QARecord], out: Path, extra_sources=(), embedder=None, progress: bool = True):
    """An index over the training split's Q&A pairs (plus course notes, which hold no Q&A answers)."""
    from index.retriever import Retriever, build_index

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    qa = out / "train_qa.jsonl"
    qa.write_text("".join(json.dumps({"question": r.question, "answer": r.answer, "unit": r.unit}) + "\n" for r in train))
    build_index([qa, *extra_sources], out / "index", progress=progress, embedder=embedder)
    return Retriever.load(out / "index", embedder=embedder)


def contexts_for(records: list[QARecord], retriever, k: int, drop_oracle: float, seed: int, mode: str = "dense",
                 drop_own_pair: bool = True) -> list[list[str]]:
    """k passages per record: never its own Q&A pair (unless `drop_own_pair` is off); for a
    `drop_oracle` share of records no passage that holds the answer."""
    rng = random.Random(seed)
    hits = retriever.search_many([r.question for r in records], k + 3, mode)
    out = []
    for r, h in zip(records, hits):
        own = [r.owns(retriever.chunks[p.chunk_id]) for p in h]
        if rng.random() < drop_oracle:  # the oracle: its own pair and its gold sections
            h = [p for p, o in zip(h, own) if not (o or p.section_id in r.gold)]
        elif drop_own_pair:
            h = [p for p, o in zip(h, own) if not o]
        out.append([p.text for p in h[:k]])
    return out


def examples(records: list[QARecord], template: PromptTemplate, tokenizer, max_length: int, contexts=None) -> list[tuple[str, str]]:
    """(prompt, target) pairs whose prompts fit `max_length` together with their answers."""
    count = lambda s: len(tokenizer(s, add_special_tokens=True)["input_ids"])
    out = []
    for i, r in enumerate(records):
        target_len = len(tokenizer(" " + r.answer, add_special_tokens=False)["input_ids"]) + 1
        budget = max(max_length - target_len, 16)
        out.append(build_example(template, r.question, r.answer, contexts[i] if contexts else (), count_tokens=count, budget=budget))
    return out


def tokenize(pairs: list[tuple[str, str]], tokenizer, max_length: int, seq2seq: bool) -> list[dict]:
    """Token ids with labels on the answer tokens only (-100 elsewhere); no padding (done per batch)."""
    rows = []
    for prompt, target in pairs:
        if seq2seq:
            ids = tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"]
            labels = tokenizer(text_target=target.strip(), truncation=True, max_length=max_length)["input_ids"]
        else:
            p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            t = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = (p + t)[:max_length]
            labels = ([-100] * len(p) + t)[:max_length]
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return rows


def data_hashes(splits: dict[str, list[QARecord]]) -> dict[str, str]:
    return {name: records_hash(recs) for name, recs in splits.items()}
