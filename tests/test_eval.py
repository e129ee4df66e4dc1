"""The evaluator: metrics on hand-checked strings, the shipped ROUGE module against rouge_score,
bootstrap intervals, and the ablation runner on tiny models (files, resume, leakage guard, CLI)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from aimlqa.settings import UserError
from eval.bootstrap import mean_ci, paired_test
from eval.metrics import answer_hits, answer_overlap, degenerate, gold_ranking, grounding, rouge_per_example, rouge_scores

GD, DO, CV = "unit1/gradient-descent", "unit2/dropout", "unit3/convolution"

# Ten held-out questions on the tiny notes of conftest.NOTES (gold = their section ids), and four
# training pairs the evaluation index may hold.
TEN = [
    ("What does the learning rate scale in gradient descent?", "Each step moves the weights by the learning rate times the gradient.", [f"{GD}#the-update-rule"]),
    ("What happens when the learning rate is too large?", "A learning rate that is too large makes the loss diverge.", [f"{GD}#the-update-rule"]),
    ("How does stochastic gradient descent estimate the gradient?", "Stochastic gradient descent estimates the gradient from one example.", [f"{GD}#stochastic-and-mini-batch-variants"]),
    ("Why can small batches help training?", "The noise of small batches can help escape sharp minima.", [f"{GD}#stochastic-and-mini-batch-variants"]),
    ("What does dropout do to activations during training?", "Dropout sets each activation to zero with probability p and scales the rest by 1/(1-p).", [f"{DO}#how-dropout-works"]),
    ("Is dropout applied at test time?", "No, at test time every unit is kept.", [f"{DO}#how-dropout-works"]),
    ("Why does dropout reduce overfitting?", "Dropout trains an ensemble of thinned networks that share weights.", [f"{DO}#why-dropout-regularises"]),
    ("What does each convolution kernel produce?", "Each kernel slides over the image and produces one feature map.", [f"{CV}#kernels-and-feature-maps"]),
    ("Why does a convolution have fewer parameters than a dense layer?", "Its weights are shared across positions.", [f"{CV}#kernels-and-feature-maps"]),
    ("What is the output size of a convolution?", "floor((n + 2p - k) / s) + 1 for input n, kernel k, padding p and stride s.", [f"{CV}#output-size"]),
]
TRAIN = [
    ("What does gradient descent minimise?", "Gradient descent minimises a loss by stepping against its gradient."),
    ("What is mini-batch gradient descent?", "It estimates the gradient from a small batch of examples."),
    ("When is every unit kept in dropout?", "At test time."),
    ("What do convolution weights share?", "They are shared across positions of the image."),
]


@pytest.fixture(scope="module")
def ten_qa(tmp_path_factory) -> Path:
    rows = [{"id": f"q{i}", "question": q, "answer": a, "gold": g, "split": "test"} for i, (q, a, g) in enumerate(TEN)]
    rows += [{"id": f"t{i}", "question": q, "answer": a, "split": "train"} for i, (q, a) in enumerate(TRAIN)]
    path = tmp_path_factory.mktemp("ten") / "ten.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- metrics ---------------------------------------------------------------------------------


def test_rouge_hand_checked():
    per = rouge_per_example(["the cat on the mat", "a b c\nd e f", "Dropout regularises networks", ""],
                            ["the cat sat on the mat", "d e f\na b c", "dropouts regularising the network", "anything"])
    assert per["rouge1"][0] == pytest.approx(10 / 11) and per["rouge2"][0] == pytest.approx(2 / 3) and per["rougeL"][0] == pytest.approx(10 / 11)
    # rougeLsum splits sentences on newlines: the swapped lines match fully, plain LCS only half
    assert per["rougeL"][1] == pytest.approx(0.5) and per["rougeLsum"][1] == pytest.approx(1.0) and per["rouge2"][1] == pytest.approx(0.8)
    # stemming: dropout(s), regularis(es|ing), network(s) match
    assert per["rouge1"][2] == pytest.approx(6 / 7)
    assert all(per[t][3] == 0.0 for t in per)
    assert rouge_scores(["the cat on the mat", ""], ["the cat sat on the mat", "x"])["rouge1"] == pytest.approx(5 / 11)


def test_evaluate_module_equals_rouge_score():
    from rouge_score import rouge_scorer

    preds = ["Gradient descent steps against the gradient.", "Dropout zeroes units at random.\nIt regularises.", "",
             "The output size is floor((n+2p-k)/s)+1", "running runs ran", "Transformers scale by sqrt(d_k) because dot products grow."]
    refs = ["It moves the weights against the gradient, scaled by the learning rate.", "It regularises.\nDropout sets activations to zero.", "x y",
            "floor((n + 2p - k) / s) + 1", "the runner is running", "Dot products grow with d_k, so scores are scaled by its square root."]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    ours = rouge_per_example(preds, refs)
    for i, (p, r) in enumerate(zip(preds, refs)):
        ref = scorer.score(r, p)
        for t in ours:
            assert ours[t][i] == ref[t].fmeasure, (t, i)
    with pytest.raises(ValueError):
        rouge_per_example(["a"], [])


def test_retrieval_metrics_hand_checked():
    # "a" twice counts once; k=3 sees a, b, a: one of two gold sections
    m = gold_ranking(["a", "b", "a", "c"], ["a", "c"], k=3)
    assert m["recall"] == 0.5 and m["mrr"] == 1.0 and m["ndcg"] == pytest.approx(1 / (1 + 1 / math.log2(3)))
    m = gold_ranking(["a", "b", "a", "c"], ["a", "c"], k=4)
    assert m["recall"] == 1.0 and m["ndcg"] == pytest.approx((1 + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))
    assert gold_ranking(["x", "a"], ["a"], k=2)["mrr"] == 0.5 and gold_ranking(["x", "y"], ["a"], k=2) == {"recall": 0.0, "mrr": 0.0, "ndcg": 0.0}
    # answer hits: content words of the reference (learning, rate, controls, step, size) found in a passage
    ref = "The learning rate controls the step size."
    assert answer_overlap("A learning rate sets step size.", ref) == pytest.approx(4 / 5)
    assert answer_overlap("Dropout zeroes activations.", ref) == 0.0
    hits = answer_hits(["Dropout zeroes activations.", "The learning rate sets the step size."], ref, k=2, threshold=0.5)
    assert hits == {"hit": 1.0, "hit_mrr": 0.5}
    assert answer_hits(["Dropout zeroes activations.", "The learning rate sets the step size."], ref, k=1)["hit"] == 0.0
    assert answer_hits(["Dropout."], ref, k=1, own=[True])["own"] == 1.0


def test_grounding_and_degenerate_answers():
    passages = ["Dropout sets activations to zero during training."]
    assert grounding("Dropout zeroes activations during training.", passages) == pytest.approx(3 / 4)  # "zeroes" is not in it
    assert grounding("Dropout sets activations to zero.", passages) == 1.0
    assert grounding("the of and", passages) is None and grounding("Dropout.", []) is None
    assert degenerate("") == "empty" and degenerate(" ... ") == "empty"
    assert degenerate("Yes it") == "too-short"
    assert degenerate("the model the model the model the model the model") == "repetitive"
    assert degenerate("What is dropout?", "what is dropout") == "echo"
    assert degenerate("Dropout zeroes random activations while training.", "What is dropout?") is None


def test_bootstrap_intervals_and_paired_test():
    import numpy as np

    x = np.random.default_rng(1).uniform(0, 1, 200)
    ci = mean_ci(x, 1000, seed=0)
    assert ci.lo < ci.mean < ci.hi and ci.n == 200 and ci.mean == pytest.approx(x.mean())
    assert 0.05 < ci.hi - ci.lo < 0.12  # ~ 2 * 1.96 * 0.29 / sqrt(200) = 0.08
    assert mean_ci(x, 1000, seed=0) == ci and mean_ci(x[:20], 1000, seed=0).hi - mean_ci(x[:20], 1000, seed=0).lo > ci.hi - ci.lo
    assert mean_ci([0.5, 0.5, None]).to_dict() == {"mean": 0.5, "lo": 0.5, "hi": 0.5, "n": 2}
    assert mean_ci([None]).mean is None
    better = paired_test(x + 0.05, x, 1000)
    assert better.delta == pytest.approx(0.05) and better.p < 0.01 and better.lo == pytest.approx(0.05)
    noise = np.random.default_rng(2).normal(0, 0.1, 200)
    null = paired_test(x + noise, x + noise[::-1], 1000)
    assert null.lo < 0 < null.hi and null.p > 0.05
    assert paired_test(x, x).p == 1.0
    with pytest.raises(ValueError):
        paired_test([1, 2], [1])


# --- the ablation on tiny models ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_adapter(tiny_models, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny llama, saved where `aimlqa finetune` would put one (with a manifest)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tuned")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out / "adapter")
    (out / "manifest.json").write_text(json.dumps({"name": "tiny-tuned", "recipe": {}, "base": str(tiny_models["llama"]), "method": "lora", "steps": 3,
                                                  "split_hashes": {"train": "abc"}}))
    return out / "adapter"


def register_tiny(tiny_models, adapter):
    from rag.registry import register

    fields = dict(family="llama", base=str(tiny_models["llama"]), context_window=256, max_new_tokens=8)
    register("tiny-base", **fields)
    register("tiny-tuned", adapter=str(adapter), **fields)
    register("broken", family="llama", base="/nonexistent/model-dir")  # registered, but cannot load here


def write_config(path: Path, qa: Path, course: Path, **over) -> Path:
    config = {
        "name": "tiny",
        "models": ["retrieval-only", "tiny-base", "tiny-tuned", "not-registered", "broken"],
        "rag": [False, True],
        "top_k": [1, 2],
        "modes": ["dense", "hybrid"],
        "datasets": [{"name": "ten", "path": str(qa), "split": "test", "compare_seed": True},
                     {"name": "gone", "path": "missing.jsonl", "optional": True}],
        "corpus": {"sources": [str(course)], "chunk_size": 64, "chunk_overlap": 8},
        "headline": {"k": 2, "mode": "hybrid"},
        "max_new_tokens": 6,
        "batch_size": 4,
        "bootstrap": 200,
        "out": "out",
    } | over
    path.write_text(yaml.safe_dump(config))
    return path


def test_ablation_writes_every_file(aimlqa_home, tmp_path, tiny_models, tiny_adapter, ten_qa, course_dir, embedder):
    from eval.ablation import run_ablation
    from eval.config import load_config

    register_tiny(tiny_models, tiny_adapter)
    cfg = load_config(write_config(tmp_path / "abl.yaml", ten_qa, course_dir))
    summary, out = run_ablation(cfg, progress=False, embedder=embedder)
    assert out == tmp_path / "out"  # relative to the config file
    assert sorted(p.name for p in out.iterdir()) == ["predictions.jsonl", "report.md", "rouge_l.png", "summary.csv", "summary.json"]

    cells = {c["id"]: c for c in summary["cells"]}
    # plain once per generating model, grounded per k and mode; the floor only grounded
    assert sorted(cells) == sorted(
        [f"ten/{m}/plain" for m in ("tiny-base", "tiny-tuned")]
        + [f"ten/{m}/rag-{mode}-k{k}" for m in ("retrieval-only", "tiny-base", "tiny-tuned") for mode in ("dense", "hybrid") for k in (1, 2)]
    )
    assert all(c["n"] == 10 for c in cells.values())
    floor = cells["ten/retrieval-only/rag-dense-k2"]
    assert floor["grounding"]["mean"] == 1.0 and floor["floor"]  # it answers with a retrieved passage
    assert floor["retrieval"]["recall"]["mean"] > 0.5 and "hit" in floor["retrieval"] and "own" not in floor["retrieval"]
    assert cells["ten/tiny-tuned/plain"]["fine_tuned"] and not cells["ten/tiny-base/plain"]["fine_tuned"]
    assert cells["ten/tiny-base/plain"]["retrieval"] == {} and cells["ten/tiny-base/plain"]["grounding"]["mean"] is None
    kinds = {(p["kind"], p["a"], p["b"]) for p in summary["paired"] if p["metric"] == "rougeL"}
    assert ("rag", "ten/tiny-base/rag-hybrid-k2", "ten/tiny-base/plain") in kinds
    assert ("finetune", "ten/tiny-tuned/plain", "ten/tiny-base/plain") in kinds
    assert ("floor", "ten/tiny-tuned/rag-dense-k1", "ten/retrieval-only/rag-dense-k1") in kinds
    assert any("not-registered" in n for n in summary["notes"]) and any("gone" in n for n in summary["notes"])
    assert any("`broken` skipped: cannot load" in n for n in summary["notes"]) and "broken" not in summary["models"]

    # provenance: model and adapter, index, data hashes, versions, seed
    tuned = summary["models"]["tiny-tuned"]
    assert tuned["adapter_sha256"] and tuned["finetune"]["steps"] == 3
    assert summary["indexes"]["ten"]["qa_split"] == "train" and summary["indexes"]["ten"]["manifest_hash"]
    assert summary["datasets"]["ten"]["split_hash"] and summary["run"]["versions"]["evaluate"] and summary["run"]["seed"] == 0

    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 14 * 10 and len({(p["cell"], p["id"]) for p in preds}) == 140
    assert {p["run"] for p in preds} == {summary["run"]["id"]}
    p = next(p for p in preds if p["cell"] == "ten/tiny-base/rag-dense-k2")
    assert len(p["sources"]) == 2 and set(p["scores"]) >= {"rouge1", "rougeL", "grounding", "words", "degenerate"} and "recall" in p["retrieval"]

    import csv

    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert len(rows) == 14 and {"rougeL", "rougeL_lo", "rougeL_hi", "recall", "vs_plain_rougeL_p", "index_hash", "split_hash", "run"} <= set(rows[0])
    assert float(next(r for r in rows if r["id"] == "ten/retrieval-only/rag-dense-k2")["grounding"]) == 1.0

    report = (out / "report.md").read_text()
    assert "| LLM | Setting | ROUGE-1 | ROUGE-2 | ROUGE-L [95% CI] | ROUGE-Lsum |" in report
    assert "reported, not reproduced" in report and "teacher-forced" in report and "0.384" in report
    assert "What retrieval adds" in report and "What fine-tuning adds" in report and "not-registered" in report
    assert "LEAKY" not in report and summary["run"]["id"] in report and "decoding: greedy, up to 6 new tokens" in report
    png = (out / "rouge_l.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and summary["run"]["id"].encode() in png


def test_resume_generates_only_what_is_missing(aimlqa_home, tmp_path, tiny_models, tiny_adapter, ten_qa, course_dir, embedder, monkeypatch):
    from eval import ablation
    from eval.config import load_config
    from rag.answer import Answerer

    register_tiny(tiny_models, tiny_adapter)
    asked: list[str] = []
    real = Answerer.answer_many

    def counting(self, questions, *a, **kw):
        if len(asked) >= 16:  # "Ctrl-C" in the middle of the second cell
            raise KeyboardInterrupt
        asked.extend(questions)
        return real(self, questions, *a, **kw)

    monkeypatch.setattr(Answerer, "answer_many", counting)
    cfg = load_config(write_config(tmp_path / "abl.yaml", ten_qa, course_dir, models=["tiny-base"], top_k=[1], modes=["dense"]))
    with pytest.raises(KeyboardInterrupt):
        ablation.run_ablation(cfg, progress=False, embedder=embedder)
    out = tmp_path / "out"
    assert not out.exists()  # nothing half-written: outputs are written at the end, by rename
    cache = aimlqa_home / "eval" / "cache" / "ten" / "tiny-base"
    assert not list(cache.glob(".*tmp"))
    cached = {p.name.split("-")[0]: len(p.read_text().splitlines()) for p in cache.glob("*.jsonl")}
    assert cached == {"plain": 10, "rag": 8}  # batches of 4: 4+4+2 and 4+4, each saved as it finished

    asked.clear()
    monkeypatch.setattr(Answerer, "answer_many", lambda self, q, *a, **kw: (asked.extend(q), real(self, q, *a, **kw))[1])
    summary, _ = ablation.run_ablation(cfg, progress=False, embedder=embedder)
    assert len(asked) == 2  # only the questions the stopped run had not answered
    assert all(c["n"] == 10 for c in summary["cells"])

    asked.clear()
    again, _ = ablation.run_ablation(cfg, progress=False, embedder=embedder)
    assert asked == [] and [c["rougeL"] for c in again["cells"]] == [c["rougeL"] for c in summary["cells"]]

    # a smaller --limit is a subset of what is cached: nothing to generate
    fewer, _ = ablation.run_ablation(cfg.model_copy(update={"limit": 5}), progress=False, embedder=embedder)
    assert asked == [] and all(c["n"] == 5 for c in fewer["cells"])

    # a changed model (another adapter under the same name) is a new cell, not a cache hit
    from rag.registry import register

    register("tiny-base", family="llama", base=str(tiny_models["llama"]), context_window=256, max_new_tokens=8, adapter=str(tiny_adapter))
    ablation.run_ablation(cfg, progress=False, embedder=embedder)
    assert len(asked) == 20

    # beam search is another decoding: new cells, and the report says which
    asked.clear()
    _, out = ablation.run_ablation(cfg.model_copy(update={"num_beams": 2}), progress=False, embedder=embedder)
    assert len(asked) == 20 and "decoding: beam search, 2 beams" in (out / "report.md").read_text()

    # a model's own default decoding does not change a cell: the evaluation passes its own
    asked.clear()
    register("tiny-base", family="llama", base=str(tiny_models["llama"]), context_window=256, max_new_tokens=8, adapter=str(tiny_adapter), num_beams=3)
    ablation.run_ablation(cfg, progress=False, embedder=embedder)
    assert asked == []


def test_leakage_guard(aimlqa_home, tmp_path, ten_qa, course_dir, embedder):
    from eval.ablation import run_ablation
    from eval.config import load_config
    from eval.data import find_leaks
    from index.corpus import Chunk
    from index.qa import QARecord

    # indexing every split puts the evaluated pairs in the index: refused
    cfg = load_config(write_config(tmp_path / "leak.yaml", ten_qa, course_dir, models=["retrieval-only"], top_k=[1], modes=["dense"],
                                   corpus={"sources": [str(course_dir)], "dataset_split": "all", "chunk_size": 64, "chunk_overlap": 8}))
    with pytest.raises(UserError, match=r"leakage: 10 of the 10 evaluated questions.*index_evaluated"):
        run_ablation(cfg, progress=False, embedder=embedder)

    # asked for explicitly: it runs, measures own@k, and the report flags it
    cfg = load_config(write_config(tmp_path / "leak.yaml", ten_qa, course_dir, models=["retrieval-only"], top_k=[1], modes=["dense"],
                                   corpus={"sources": [str(course_dir)], "index_evaluated": True, "chunk_size": 64, "chunk_overlap": 8}))
    summary, out = run_ablation(cfg, progress=False, embedder=embedder)
    assert summary["indexes"]["ten"]["leaky"] and summary["indexes"]["ten"]["leaked"] == 10
    assert summary["cells"][0]["retrieval"]["own"]["mean"] > 0.5
    assert "**LEAKY" in (out / "report.md").read_text()

    # the default (training split) index holds none of them
    ok = load_config(write_config(tmp_path / "ok.yaml", ten_qa, course_dir, models=["retrieval-only"], top_k=[1], modes=["dense"]))
    summary, _ = run_ablation(ok, progress=False, embedder=embedder)
    assert not summary["indexes"]["ten"]["leaky"] and summary["indexes"]["ten"]["n_chunks"] > 4

    # a fine-tune whose training split held evaluated questions is found from its manifest's data and fractions
    from eval.data import load_evalset, trained_on

    es = load_evalset(cfg.datasets[0], None)
    assert trained_on({"data": [str(ten_qa)], "split_fractions": [0.8, 0.1, 0.1]}, es) == 0  # the file's own split keeps them out
    relabelled = tmp_path / "all_train.jsonl"
    relabelled.write_text(ten_qa.read_text().replace('"split": "test"', '"split": "train"'))
    assert trained_on({"data": [str(relabelled)]}, es) == 10 and trained_on({"data": ["/nowhere.jsonl"]}, es) == 0

    # the check itself: same question or same answer (normalised) in a Q&A chunk; prose does not count
    rec = QARecord("What is dropout?", "Dropout zeroes activations.")
    qa = lambda q, a: Chunk(0, f"Question: {q}\nAnswer: {a}", "x.jsonl", q, "x#0", 0, 0, "qa")
    assert find_leaks([qa("what is DROPOUT", "Something else.")], [rec]) == ["What is dropout?"]
    assert find_leaks([qa("Define dropout.", "dropout zeroes activations")], [rec]) == ["What is dropout?"]
    assert find_leaks([qa("Define dropout.", "It zeroes units.")], [rec]) == []
    assert find_leaks([Chunk(0, "Dropout zeroes activations.", "n.md", "Dropout", "n#d", 0, 0, "prose")], [rec]) == []


def test_config_errors_name_the_problem(tmp_path, ten_qa):
    from eval.config import load_config

    path = tmp_path / "c.yaml"
    for bad, match in [
        ({"models": ["a", "a"]}, "models: .*duplicates"),
        ({"modes": ["dense", "fuzzy"]}, "modes.1"),
        ({"top_k": [0]}, "top_k"),
        ({"datasets": []}, "datasets"),
        ({"colour": "blue"}, "colour: unknown field; known: .*top_k"),
        ({"datasets": [{"name": "d", "path": str(ten_qa), "splt": "test"}]}, r"datasets\.0\.splt: unknown field; known: .*\bsplit\b"),
    ]:
        path.write_text(yaml.safe_dump({"models": ["gemma-270m"], "datasets": [{"name": "d", "path": str(ten_qa)}]} | bad))
        with pytest.raises(UserError, match=match):
            load_config(path)
    with pytest.raises(UserError, match="no such config"):
        load_config(tmp_path / "nope.yaml")


def test_cli_score_one_cell(aimlqa_home, tmp_path, tiny_models, tiny_adapter, ten_qa, monkeypatch):
    from typer.testing import CliRunner

    from aimlqa import cli

    register_tiny(tiny_models, tiny_adapter)
    cli._mount()
    result = CliRunner().invoke(cli.app, ["eval", "score", "--qa", str(ten_qa), "--model", "tiny-base", "--no-rag", "--limit", "3",
                                          "--out", str(tmp_path / "s"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "ten/tiny-base/plain" in result.output and "n=3" in result.output
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert [c["id"] for c in summary["cells"]] == ["ten/tiny-base/plain"] and summary["datasets"]["ten"]["n"] == 3
    bad = CliRunner().invoke(cli.app, ["eval", "score", "--qa", str(ten_qa), "--model", "tiny-base", "--mode", "fuzzy", "--no-progress"], env={"COLUMNS": "200"})
    assert bad.exit_code == 2 and "Invalid value for '--mode': unknown retrieval mode 'fuzzy'; choose one of dense, bm25, hybrid" in bad.output
    # an --out that cannot hold the results is refused before any answer is generated
    import eval.ablation as ablation

    (tmp_path / "taken").write_text("x")
    monkeypatch.setattr(ablation, "prepare", lambda *a, **k: pytest.fail("generated before checking --out"))
    taken = CliRunner().invoke(cli.app, ["eval", "score", "--qa", str(ten_qa), "--model", "tiny-base", "--no-rag", "--out", str(tmp_path / "taken"), "--no-progress"])
    assert isinstance(taken.exception, UserError) and "taken is a file; pass a directory path" in str(taken.exception)
