"""Citations and abstention (issue 24): calibrate on validation, measure on test, time attribution.

1. Answers every question of `bench/citations.yaml` with the shipped default (cached by the
   evaluator, so a rerun only scores).
2. Chooses the thresholds on the validation splits only (`eval.calibrate`): `cite` and `margin`
   by citation F1 against gold sections on the Q&A set's validation questions, then `relevance`
   and `support` so that out-of-course validation questions abstain most while in-course ones
   abstain at most 5% of the time. Writes them to rag/abstention.json, which the service reads.
3. Scores the test splits with them (the evaluator's report: bench/results/citations/).
4. Times attribution: the same test questions answered one at a time with and without it,
   interleaved, in this run (their generation replayed from memory, see `timing`).

Goals: citation precision >= 0.8 and recall >= 0.7; out-of-course abstention >= 95%, in-course
<= 10%; served ROUGE-L (abstentions 0) within the interval of the answered ROUGE-L; attribution
<= 30 ms p50. Writes bench/results/citations.json and prints PASS / FALL SHORT for each.

    python bench/citations.py [--timed 32] [--no-calibrate]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from common import Timer, percentiles, verdict, write  # noqa: E402  (sets sys.path)

HERE = Path(__file__).resolve().parent
CITE_GRID = (0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
MARGIN_GRID = (0.0, 0.05, 0.1, 0.2)


def citation_f1(plan, cell, rows, thresholds) -> float:
    from eval.data import question_key
    from eval.scoring import citation_scores_of
    from rag.attribution import Attributor

    es = plan.evalsets[cell.dataset]
    retriever = plan.indexes[cell.dataset].retriever
    plan.attributors[cell.dataset] = Attributor(retriever.embedder, thresholds, retriever)
    from eval.scoring import attribute_cell

    got = [rows[question_key(r)] for r in es.records]
    atts, _ = attribute_cell(plan, cell, got)
    per = [citation_scores_of(a, r, es, g["sources"]) for a, r, g in zip(atts, es.records, got)]
    p = statistics.mean(x["citation_precision"] for x in per if x["citation_precision"] is not None)
    r = statistics.mean(x["citation_recall"] for x in per if x["citation_recall"] is not None)
    return 2 * p * r / (p + r) if p + r else 0.0


def calibrate(plan, rows) -> dict:
    from eval.calibrate import BUDGET, pick_abstention
    from eval.data import question_key
    from eval.scoring import attribute_cell
    from rag.attribution import THRESHOLDS_FILE, Attributor, Thresholds

    cell_of = {c.dataset: c for c in plan.cells}
    val, ooc = cell_of["aiml_qa_validation"], cell_of["ooc_validation"]
    grid = {(c, m): citation_f1(plan, val, rows[val], Thresholds(cite=c, margin=m)) for c in CITE_GRID for m in MARGIN_GRID}
    (cite, margin), f1 = max(grid.items(), key=lambda kv: (round(kv[1], 4), kv[0][0]))
    features = {}
    for cell in (val, ooc):
        retriever = plan.indexes[cell.dataset].retriever
        plan.attributors[cell.dataset] = Attributor(retriever.embedder, Thresholds(cite=cite, margin=margin), retriever)
        got = [rows[cell][question_key(r)] for r in plan.evalsets[cell.dataset].records]
        features[cell.dataset] = [(a.relevance, a.support) for a in attribute_cell(plan, cell, got)[0]]
    relevance, support = pick_abstention(features["aiml_qa_validation"], features["ooc_validation"])
    chosen = {
        "cite": cite, "margin": margin, "relevance": relevance.threshold, "support": support.threshold,
        "embed_model": plan.config.corpus.embed_model,
        "chosen_on": {
            "command": "python bench/citations.py", "model": val.model, "setting": val.setting,
            "in_course": f"data/qa/aiml_qa.jsonl validation ({len(features['aiml_qa_validation'])} questions)",
            "out_of_course": f"data/ooc/out_of_course.jsonl validation ({len(features['ooc_validation'])} questions)",
            "citation_f1": round(f1, 4), "in_course_budget": BUDGET,
            "abstained": {"in_course": round(relevance.in_rate + support.in_rate * (1 - relevance.in_rate), 4),
                          "out_of_course_by_relevance": round(relevance.out_rate, 4), "out_of_course_then_by_support": round(support.out_rate, 4)},
            "grid": {f"cite={c} margin={m}": round(v, 4) for (c, m), v in grid.items()},
        },
    }
    THRESHOLDS_FILE.write_text(json.dumps(chosen, indent=2) + "\n")
    print(f"wrote {THRESHOLDS_FILE}: cite {cite} margin {margin} relevance {relevance.threshold} support {support.threshold}")
    plan.attributors.clear()
    return chosen


def precision_by_retrieval(plan, rows) -> dict:
    """Citation precision on the test answers split by whether retrieval found a gold section at
    all: attribution can only cite what was retrieved, so this separates its errors from retrieval's."""
    from eval.data import question_key
    from eval.scoring import attribute_cell, citation_scores_of

    cell = next(c for c in plan.cells if c.dataset == "aiml_qa")
    es = plan.evalsets["aiml_qa"]
    got = [rows[cell][question_key(r)] for r in es.records]
    out = {True: [], False: []}
    for a, r, g in zip(attribute_cell(plan, cell, got)[0], es.records, got):
        p = citation_scores_of(a, r, es, g["sources"])["citation_precision"]
        if p is not None:
            found = any(set(es.gold_of.get(s["section_id"], [s["section_id"]])) & set(r.gold) for s in g["sources"])
            out[found].append(p)
    return {("gold_retrieved" if k else "gold_not_retrieved"): {"n": len(v), "citation_precision": round(statistics.mean(v), 4) if v else None}
            for k, v in out.items()}


def timing(plan, questions: list[str]) -> dict:
    """Attribution's cost per answer with the real default model: each question is generated once
    (batched), then answered one at a time with and without attribution, interleaved, the
    generation replayed from memory (greedy decoding is a function of the prompt), so that the
    difference is what attribution adds and not the noise of seconds of decoding."""
    from eval.ablation import _load_answerer
    from rag.registry import get_spec

    answerer = _load_answerer(get_spec("gemma-270m-aiml"), plan.indexes["aiml_qa"].retriever)
    answerer.answer_many(questions, abstain=False)  # generates, and remembers, every answer
    with_ms, without_ms = [], []
    for i, q in enumerate(questions * 3):
        for on in (True, False) if i % 2 == 0 else (False, True):
            attributor = answerer.attributor
            if not on:
                answerer.attributor = None
            with Timer() as t:
                answerer.answer(q)
            answerer.attributor = attributor
            (with_ms if on else without_ms).append(t.s * 1000)
    added = [w - o for w, o in zip(with_ms, without_ms)]
    return {"questions": len(questions), "rounds": 3, "answer_with": percentiles(with_ms), "answer_without": percentiles(without_ms),
            "added": percentiles(added), "ratio_p50": round(statistics.median(with_ms) / statistics.median(without_ms), 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timed", type=int, default=32, help="questions answered with and without attribution")
    ap.add_argument("--no-calibrate", action="store_true", help="keep rag/abstention.json as it is")
    args = ap.parse_args()

    from eval.ablation import generate, prepare
    from eval.config import load_config
    from eval.report import write_outputs
    from eval.scoring import summarise

    config = load_config(HERE / "citations.yaml")
    started = time.time()
    plan = prepare(config, progress=False)
    rows = generate(plan, progress=False)
    thresholds = None if args.no_calibrate else calibrate(plan, rows)
    summary, predictions = summarise(plan, rows)
    summary["run"] |= {"wall_s": round(time.time() - started, 1), "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))}
    write_outputs(summary, predictions, config.out)
    cell = {c["dataset"]: c for c in summary["cells"]}
    test, ooc, val = cell["aiml_qa"], cell["out_of_course"], cell["aiml_qa_validation"]
    split = precision_by_retrieval(plan, rows)
    timed = timing(plan, [r.question for r in plan.evalsets["aiml_qa"].records[: args.timed]])
    m = lambda c, k: c[k]["mean"]
    lines = [
        verdict("citation precision (aiml_qa test)", round(m(test, "citation_precision"), 3), 0.8),
        verdict("citation recall (aiml_qa test)", round(m(test, "citation_recall"), 3), 0.7),
        verdict("out-of-course abstention (test)", round(m(ooc, "abstained"), 3), 0.95),
        verdict("in-course abstention (aiml_qa test)", round(m(test, "abstained"), 3), 0.10, higher_is_better=False),
        verdict("served ROUGE-L minus the answered interval's low end", round(m(test, "rougeL_served") - test["rougeL"]["lo"], 3), 0.0),
        verdict("attribution added per answer, p50 ms", timed["added"]["p50_ms"], 30, higher_is_better=False),
    ]
    keys = ("abstained", "citation_precision", "citation_recall", "citation_precision_topic", "unsupported", "support", "rougeL", "rougeL_served")
    write("citations", {
        "command": "python bench/citations.py",
        "thresholds": thresholds or json.loads((HERE.parent / "rag" / "abstention.json").read_text()),
        "cells": {name: {"n": c["n"], "split": c["split"], **{k: c[k] for k in keys if c.get(k)}} for name, c in cell.items()},
        "validation": {"in_course_abstained": m(val, "abstained"), "out_of_course_abstained": m(cell["ooc_validation"], "abstained")},
        "citation_precision_by_retrieval": split,
        "timing": timed,
        "targets": {"citation_precision": 0.8, "citation_recall": 0.7, "ooc_abstained": 0.95, "in_course_abstained_max": 0.10, "attribution_p50_ms": 30},
        "verdicts": lines,
        "report": "bench/results/citations/report.md",
    })
    print("\n".join(lines))
    print(f"citation precision when retrieval found a gold section: {split['gold_retrieved']}; when it did not: {split['gold_not_retrieved']}")


if __name__ == "__main__":
    main()
