"""From cached predictions to scores: per question, per cell (means with 95% intervals) and paired
comparisons on the same questions: grounded vs plain, fine-tuned vs base, generator vs floor."""

from __future__ import annotations

import os
from collections import Counter

from eval import provenance
from eval.bootstrap import mean_ci, paired_test
from eval.data import question_key
from eval.metrics import ROUGE_TYPES, citation_scores, degenerate, grounding, rouge_per_example, word_count

RETRIEVAL_KEYS = ("recall", "mrr", "ndcg", "hit", "hit_mrr", "own")
CITATION_KEYS = ("abstained", "relevance", "support", "unsupported", "citation_precision", "citation_recall", "citation_precision_topic",
                 "rougeL_served")
PAIRED_METRICS = ("rouge1", "rougeL")
FLOOR = "retrieval"


def attribute_cell(plan, cell, got: list[dict]) -> list:
    """The served attribution of each cached answer, as `rag.answer` makes it: which source supports
    which sentence, and whether the service abstains (with the thresholds in rag/abstention.json)."""
    from index.retriever import Passage
    from rag.attribution import Attributor

    retriever = plan.indexes[cell.dataset].retriever
    attributor = plan.attributors.setdefault(cell.dataset, Attributor(retriever.embedder, retriever=retriever))
    passages = [[Passage(s["text"], s["source"], "", s["section_id"], s["score"], s.get("chunk_id", -1)) for s in g["sources"]] for g in got]
    return attributor.attribute([g["question"] for g in got], [g["prediction"] for g in got], passages), attributor


def citation_scores_of(att, record, es, sources: list[dict]) -> dict:
    """Per question: abstained, support, unsupported share and, against gold sections, citation precision/recall."""
    out = {"abstained": float(att.abstain is not None), "relevance": att.relevance, "support": att.support,
           "unsupported": att.unsupported_share, "citation_precision": None, "citation_recall": None, "citation_precision_topic": None}
    if record.gold and att.abstain is None:
        cited = {sec for sent in att.sentences for c in sent.citations for sec in es.gold_of.get(c.section_id, [c.section_id])}
        out["citation_precision"], out["citation_recall"] = citation_scores(cited, record.gold)
        # the same at the level of the note (unitN/topic): a citation of the right note's neighbouring section
        topic = lambda ids: {i.split("#", 1)[0] for i in ids}
        out["citation_precision_topic"] = citation_scores(topic(cited), topic(record.gold))[0]
    return out


def score_cell(plan, cell, rows: dict) -> tuple[dict, list[dict]]:
    """The cell's summary row and its per-question scores, in the dataset's order."""
    c = plan.config
    es = plan.evalsets[cell.dataset]
    got = [rows[question_key(r)] for r in es.records]
    preds = [g["prediction"] for g in got]
    rouge = rouge_per_example(preds, [r.answer for r in es.records])
    retrieval = plan.retrieval.get((cell.dataset, cell.mode, cell.k)) if cell.rag else None
    attributions, attributor = attribute_cell(plan, cell, got) if cell.rag else ([None] * len(got), None)
    per = []
    for i, (r, g, att) in enumerate(zip(es.records, got, attributions)):
        scores = {t: rouge[t][i] for t in ROUGE_TYPES}
        scores["grounding"] = grounding(g["prediction"], [s["text"] for s in g["sources"]]) if cell.rag else None
        scores["words"] = word_count(g["prediction"])
        scores["degenerate"] = degenerate(g["prediction"], r.question)
        if att is not None:
            scores |= citation_scores_of(att, r, es, g["sources"])
            scores["rougeL_served"] = 0.0 if att.abstain else scores["rougeL"]  # an abstention has no answer to score
        per.append(scores)
    ci = lambda values: mean_ci(values, c.bootstrap, c.seed).to_dict()
    reasons = Counter(p["degenerate"] for p in per if p["degenerate"])
    info = plan.infos[cell.model]
    row = {
        "id": cell.id,
        "dataset": cell.dataset,
        "split": es.config.split,
        "model": cell.model,
        "fine_tuned": info["fine_tuned"],
        "floor": info["backend"] == FLOOR,
        "rag": cell.rag,
        "k": cell.k or None,
        "mode": cell.mode or None,
        "setting": cell.setting,
        "n": len(per),
        **{t: ci([p[t] for p in per]) for t in ROUGE_TYPES},
        "grounding": ci([p["grounding"] for p in per]),
        "expect": es.config.expect,
        **({k: ci([p.get(k) for p in per]) for k in CITATION_KEYS} if cell.rag else {}),
        "thresholds": attributor.thresholds_used() if attributor else None,
        "words": ci([p["words"] for p in per]),
        "completion_tokens": sum(g["completion_tokens"] for g in got) / max(len(got), 1),
        "empty": reasons.get("empty", 0),
        "degenerate": sum(reasons.values()),
        "degenerate_reasons": dict(reasons),
        "retrieval": {m: ci([q[m] for q in retrieval if m in q]) for m in RETRIEVAL_KEYS if any(m in q for q in retrieval)} if retrieval else {},
        "seconds": round(sum(g["retrieve_ms"] + g["generate_ms"] for g in got) / 1000, 2),
        "fingerprint": plan.fingerprint(cell),
        "index_hash": plan.indexes[cell.dataset].manifest_hash if cell.rag else None,
    }
    return row, per


def paired(plan, cells: dict, per: dict) -> list[dict]:
    """Every comparison the ablation exists for, each on the questions both cells answered."""
    c = plan.config
    by_key = {(x.dataset, x.model, x.rag, x.k, x.mode): x for x in cells}
    floors = [m for m, i in plan.infos.items() if i["backend"] == FLOOR]
    out = []

    def compare(kind, a, b):
        for metric in PAIRED_METRICS:
            t = paired_test([p[metric] for p in per[a]], [p[metric] for p in per[b]], c.bootstrap, c.seed).to_dict()
            out.append({"kind": kind, "dataset": a.dataset, "a": a.id, "b": b.id, "setting": a.setting, "metric": metric, **t})

    for cell in cells:
        if plan.infos[cell.model]["backend"] == FLOOR:
            continue
        if cell.rag and (plain := by_key.get((cell.dataset, cell.model, False, 0, ""))):
            compare("rag", cell, plain)
        base = provenance.base_of(cell.model, plan.infos)
        if base and (b := by_key.get((cell.dataset, base, cell.rag, cell.k, cell.mode))):
            compare("finetune", cell, b)
        for floor in floors:
            if cell.rag and (f := by_key.get((cell.dataset, floor, True, cell.k, cell.mode))):
                compare("floor", cell, f)
    return out


def retrieval_table(plan) -> list[dict]:
    """Retrieval quality per dataset, mode and k: it does not depend on the model."""
    c = plan.config
    rows = []
    for (ds, mode, k), qs in sorted(plan.retrieval.items()):
        metrics = {m: mean_ci([q[m] for q in qs if m in q], c.bootstrap, c.seed).to_dict() for m in RETRIEVAL_KEYS if any(m in q for q in qs)}
        rows.append({"dataset": ds, "mode": mode, "k": k, "n": len(qs), **metrics})
    return rows


def summarise(plan, rows: dict) -> tuple[dict, list[dict]]:
    """The summary (everything report.md, summary.csv/.json and the chart show) and the per-question lines."""
    c = plan.config
    cells, per, predictions = {}, {}, []
    for cell in plan.cells:
        cells[cell], per[cell] = score_cell(plan, cell, rows[cell])
    comparisons = paired(plan, list(cells), per)
    for cmp in comparisons:  # the ROUGE-L deltas also go on the cell's own row, for the CSV
        if cmp["metric"] == "rougeL" and cmp["kind"] in ("rag", "finetune"):
            row = next(r for r in cells.values() if r["id"] == cmp["a"])
            row[f"vs_{'plain' if cmp['kind'] == 'rag' else 'base'}"] = {k: cmp[k] for k in ("b", "delta", "lo", "hi", "p")}
    datasets = {
        name: {"path": str(es.config.path), "split": es.config.split, "n": len(es.records), "split_size": es.split_size,
               "file_hash": es.file_hash, "split_hash": es.split_hash, "has_gold": es.has_gold}
        for name, es in plan.evalsets.items()
    }
    indexes = {
        name: {"path": str(ix.path), "manifest_hash": ix.manifest_hash, "leaky": ix.leaky, "leaked": len(ix.leaked),
               **{k: ix.manifest.get(k) for k in ("embed_model", "chunk_size", "chunk_overlap", "qa_split", "corpus_hash", "n_chunks", "n_sources")}}
        for name, ix in plan.indexes.items()
    }
    versions = provenance.versions()
    config = c.model_dump(mode="json")
    run_id = provenance.fingerprint(config, datasets, {k: v["manifest_hash"] for k, v in indexes.items()}, plan.infos, versions)
    for cell in plan.cells:
        rec = cells[cell]
        retrieval = plan.retrieval[(cell.dataset, cell.mode, cell.k)] if cell.rag else None
        for i, (r, scores) in enumerate(zip(plan.evalsets[cell.dataset].records, per[cell])):
            got = rows[cell][question_key(r)]
            predictions.append({
                "run": run_id, "cell": cell.id, "fingerprint": rec["fingerprint"], "dataset": cell.dataset, "split": rec["split"],
                "model": cell.model, "rag": cell.rag, "k": rec["k"], "mode": rec["mode"],
                "id": question_key(r), "question": r.question, "reference": r.answer, "prediction": got["prediction"],
                "sources": [s["section_id"] for s in got["sources"]],
                "scores": scores,
                "retrieval": {k: v for k, v in retrieval[i].items() if k not in ("chars", "sections")} if retrieval else None,
                "prompt_tokens": got["prompt_tokens"], "completion_tokens": got["completion_tokens"],
            })
    summary = {
        "run": {"id": run_id, "name": c.name, "limit": c.limit, "seed": c.seed, "bootstrap": c.bootstrap, "cpus": os.cpu_count(),
                "config": config, "versions": versions},
        "models": {name: info | ({"trained_on_evaluated": plan.trained_on[name]} if name in plan.trained_on else {}) for name, info in plan.infos.items()},
        "datasets": datasets,
        "indexes": indexes,
        "cells": list(cells.values()),
        "retrieval": retrieval_table(plan),
        "paired": comparisons,
        "notes": plan.notes,
    }
    return summary, predictions
