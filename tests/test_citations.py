"""Citations and abstention: sentence attribution, the thresholds and where they come from, the
streamed markers, and each surface (REST, OpenAI chat, CLI, the evaluator)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from rag.attribution import NO_RELEVANT_PASSAGE, UNSUPPORTED, Attributor, Thresholds, sentence_spans
from rag.citing import UNSUPPORTED_MARK, CitedStream, render
from rag.registry import ModelSpec
from tests.test_eval import ten_qa  # noqa: F401  (a fixture)
from tests.tiny import tiny_spec

ROOT = Path(__file__).resolve().parents[1]
DROPOUT = "During training dropout sets each activation to zero with probability p and scales the rest by 1/(1-p)."
FOOTBALL = "France won the 2018 FIFA World Cup final against Croatia in Moscow."
IN_COURSE, OUT_OF_COURSE = "How does dropout reduce overfitting?", "Who won the 2018 FIFA World Cup final?"
SHIPPED = Thresholds.load(ROOT / "rag" / "abstention.json")


def test_sentence_spans_keep_abbreviations_and_numbers_whole_and_never_move_back():
    text = "Dropout, e.g. in MLPs, uses p = 0.5 by default. It trains thinned nets! Why? Fig. 3 shows it.\n\nA new paragraph"
    spans = sentence_spans(text)
    assert [text[s:e] for s, e in spans] == ["Dropout, e.g. in MLPs, uses p = 0.5 by default.", "It trains thinned nets!", "Why?",
                                             "Fig. 3 shows it.", "A new paragraph"]
    # a growing text: every sentence but the last is settled (streaming puts markers on that)
    for cut in range(1, len(text)):
        assert sentence_spans(text[:cut])[:-1] == spans[: len(sentence_spans(text[:cut])) - 1]
    assert sentence_spans("   ") == [] and sentence_spans("  No end") == [(2, 8)]


def test_a_copied_sentence_cites_its_passage_and_an_unrelated_one_is_unsupported(retriever, embedder):
    passages = retriever.search(IN_COURSE, 5)
    dropout = next(n for n, p in enumerate(passages, 1) if "probability p" in p.text)
    (att,) = Attributor(embedder, SHIPPED, retriever).attribute([IN_COURSE], [f"{DROPOUT} {FOOTBALL}"], [passages])
    first, second = att.sentences
    assert [c.n for c in first.citations][0] == dropout and first.supported
    assert first.citations[0].section_id == "unit2/dropout#how-dropout-works" and "probability p" in first.citations[0].excerpt
    assert first.citations[0].chunk_id == passages[dropout - 1].chunk_id
    assert not second.supported and second.support < SHIPPED.cite <= first.support
    assert att.unsupported_share == 0.5 and att.support == pytest.approx((first.support + second.support) / 2, abs=1e-3)
    assert render(f"{DROPOUT} {FOOTBALL}", att.sentences) == f"{DROPOUT}[{dropout}] {FOOTBALL}{UNSUPPORTED_MARK}"
    # the stored vectors are the passages' own: attribution from text alone (no index) agrees
    (alone,) = Attributor(embedder, SHIPPED).attribute([IN_COURSE], [f"{DROPOUT} {FOOTBALL}"], [passages])
    assert [s.support for s in alone.sentences] == pytest.approx([s.support for s in att.sentences], abs=0.05)


def test_the_shipped_thresholds_were_chosen_on_validation_data_and_separate_here(retriever, embedder):
    data = json.loads((ROOT / "rag" / "abstention.json").read_text())
    assert data["embed_model"] == embedder.name and "validation" in data["chosen_on"]["in_course"] and "validation" in data["chosen_on"]["out_of_course"]
    assert 0 < SHIPPED.relevance < 1 and 0 < SHIPPED.support < 1 and 0 < SHIPPED.cite < 1
    attributor = Attributor(embedder, SHIPPED, retriever)
    near, far = attributor.relevance([IN_COURSE, OUT_OF_COURSE], [retriever.search(IN_COURSE, 3), retriever.search(OUT_OF_COURSE, 3)])
    assert attributor.decide(near, 0.9) is None and attributor.decide(far, 0.9) == NO_RELEVANT_PASSAGE
    assert attributor.decide(near, SHIPPED.support - 0.01) == UNSUPPORTED
    # measured with another embedding model, the cosines mean something else: not applied
    assert Attributor(embedder, replace(SHIPPED, embed_model="other-model")).decide(far, 0.0) is None


def test_thresholds_file_errors_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("AIMLQA_THRESHOLDS", str(tmp_path / "missing.json"))
    from aimlqa.settings import UserError

    with pytest.raises(UserError, match="no such thresholds file.*unset it"):
        Thresholds.load()
    (tmp_path / "bad.json").write_text("{not json")
    monkeypatch.setenv("AIMLQA_THRESHOLDS", str(tmp_path / "bad.json"))
    with pytest.raises(UserError, match="not a thresholds file"):
        Thresholds.load()


class Counting:
    """The tiny generator, counting the prompts it is asked to answer."""

    def __init__(self, inner):
        self.inner, self.prompts = inner, 0
        self.context_window = inner.context_window

    def count_tokens(self, text):
        return self.inner.count_tokens(text)

    def generate(self, prompts, config, **kw):
        self.prompts += len(prompts)
        return self.inner.generate(prompts, config)


@pytest.fixture()
def tiny(tiny_models, retriever):
    from rag.answer import Answerer
    from rag.generators import load_generator

    spec = tiny_spec("gpt2", tiny_models["gpt2"])
    answerer = Answerer(spec, retriever, generator=Counting(load_generator(spec)))
    answerer.attributor.thresholds = SHIPPED
    return answerer


def test_a_question_far_from_the_notes_is_not_sent_to_the_model(tiny):
    far, near = tiny.answer_many([OUT_OF_COURSE, IN_COURSE], max_new_tokens=4)
    assert far.abstained == NO_RELEVANT_PASSAGE and far.text.startswith("Not in the course notes") and far.completion_tokens == 0
    assert len(far.sources) == 3 and far.attribution.relevance < SHIPPED.relevance and far.cited_text == far.text
    assert tiny.generator.prompts == 1  # only the in-course question was generated
    # the random model's words are not in the notes: its answer abstains too, and keeps what it said
    assert near.abstained == UNSUPPORTED and near.raw_text is not None and near.text != near.raw_text
    raw = tiny.answer(OUT_OF_COURSE, max_new_tokens=4, abstain=False)
    assert raw.abstained is None and raw.attribution.relevance == pytest.approx(far.attribution.relevance, abs=1e-4)
    assert tiny.generator.prompts == 2 and raw.cited_text.endswith(UNSUPPORTED_MARK) or raw.text == ""


def test_pick_threshold_takes_the_middle_of_the_gap_within_the_budget():
    from eval.calibrate import pick_abstention, pick_threshold

    chosen = pick_threshold([0.5, 0.6, 0.7, 0.8], [0.1, 0.2, 0.3])
    assert chosen.threshold == 0.4 and chosen.in_rate == 0 and chosen.out_rate == 1
    # overlap: one in-course value below the out-of-course ones; a 25% budget may give it up
    assert pick_threshold([0.15, 0.6, 0.7, 0.8], [0.1, 0.2, 0.3], budget=0.0).threshold == pytest.approx(0.125)
    assert pick_threshold([0.15, 0.6, 0.7, 0.8], [0.1, 0.2, 0.3], budget=0.25).threshold == pytest.approx(0.45)
    assert pick_threshold([0.1, 0.2], [0.5, 0.6]).threshold is None  # no threshold does better than none
    relevance, support = pick_abstention([(0.6, 0.8), (0.7, 0.9), (0.8, 0.7)], [(0.1, 0.9), (0.65, 0.2), (0.2, 0.1)])
    assert relevance.threshold == pytest.approx(0.4) and relevance.out_rate == pytest.approx(2 / 3)
    assert support.threshold == pytest.approx(0.45) and support.out_rate == 1.0  # of those relevance let through
    with pytest.raises(ValueError):
        pick_threshold([], [0.1])


def test_citation_precision_and_recall_against_gold():
    from eval.metrics import citation_scores

    assert citation_scores(["a#x", "b#y"], ["a#x"]) == (0.5, 1.0)
    assert citation_scores(["a#x"], ["a#x", "c#z"]) == (1.0, 0.5)
    assert citation_scores([], ["a#x"]) == (None, 0.0)
    with pytest.raises(ValueError):
        citation_scores(["a#x"], [])


def test_streamed_markers_follow_each_sentence_as_the_next_begins(retriever, embedder):
    from rag.answer import Answer
    from rag.postprocess import StreamCleaner

    passages = retriever.search(IN_COURSE, 5)
    attributor = Attributor(embedder, SHIPPED, retriever)
    raw = f"{DROPOUT} {FOOTBALL} Dropout is only used while training."
    stream = CitedStream(StreamCleaner(), attributor, IN_COURSE)
    pieces, first_mark = [], None
    for n in range(1, len(raw) + 1):
        piece = stream.feed(raw[:n], passages)
        pieces.append(piece)
        if "[" in piece and first_mark is None:
            first_mark = n
    (att,) = attributor.attribute([IN_COURSE], [raw], [passages])
    pieces.append(stream.finish(Answer(raw, passages, "m", True, attribution=att)))
    # the first sentence streams token by token, later ones once complete (StreamCleaner): the first
    # marker goes out with the second sentence, before the answer ends
    assert first_mark == len(DROPOUT) + 1 + len(FOOTBALL) and "".join(pieces) == render(raw, att.sentences)
    assert "".join(pieces[:first_mark]).startswith(DROPOUT + "[")
    # an answer that turned out unsupported: what was shown stays, the notice follows
    stream = CitedStream(StreamCleaner(), attributor, IN_COURSE)
    shown = "".join(stream.feed(FOOTBALL[:n], passages) for n in range(1, len(FOOTBALL) + 1))
    (bad,) = attributor.attribute([IN_COURSE], [FOOTBALL], [passages])
    end = stream.finish(Answer("Not in the course notes: ...", passages, "m", True, attribution=bad, abstained=UNSUPPORTED, raw_text=FOOTBALL))
    assert shown + end == f"{FOOTBALL}{UNSUPPORTED_MARK}\n\nNot in the course notes: ..."


# --- the surfaces ---------------------------------------------------------------------------


@pytest.fixture()
def served(tiny_models, retriever):
    from rag.answer import Answerer
    from server import ServerConfig, create_app
    from server.local import live

    floor = Answerer(ModelSpec(name="retrieval-only", family="none", backend="retrieval"), retriever)
    tiny = Answerer(tiny_spec("gpt2", tiny_models["gpt2"]), retriever)
    for a in (floor, tiny):
        a.attributor.thresholds = SHIPPED
    with live(create_app({"retrieval-only": floor, "tiny": tiny}, config=ServerConfig(api_keys=frozenset()))) as url:
        yield url


def test_rest_answers_cite_their_sources_and_abstain_out_of_course(served):
    body = httpx.post(f"{served}/v1/answer", json={"question": IN_COURSE, "model": "retrieval-only"}, timeout=60).json()
    assert body["abstained"] is None and body["sentences"] and body["support"] >= SHIPPED.support
    answer = body["answer"]
    for s in body["sentences"]:
        assert answer[s["start"] : s["end"]] == s["text"] and s["supported"] == bool(s["citations"])
        for c in s["citations"]:
            source = body["sources"][c["n"] - 1]
            assert c["section_id"] == source["section_id"] and c["chunk_id"] == source["chunk_id"]
            assert " ".join(c["excerpt"].split()) in " ".join(source["text"].split())
    assert re.sub(r"\[\d+\]|\[unsupported\]", "", body["cited_answer"]) == answer and "[1]" in body["cited_answer"]
    # the citation's link: the whole section, checked against the passage
    sid = body["sentences"][0]["citations"][0]["section_id"]
    section = httpx.get(f"{served}/v1/sections/{sid.replace('#', '%23')}", timeout=10).json()
    assert section["section_id"] == sid and " ".join(body["sources"][0]["text"].split())[:60] in " ".join(section["text"].split())
    missing = httpx.get(f"{served}/v1/sections/unit9/nothing%23here", timeout=10)
    assert missing.status_code == 404 and "no section 'unit9/nothing#here'" in missing.json()["error"]["message"]

    far = httpx.post(f"{served}/v1/answer", json={"question": OUT_OF_COURSE, "model": "tiny", "max_new_tokens": 4}, timeout=60).json()
    assert far["abstained"] == NO_RELEVANT_PASSAGE and far["answer"].startswith("Not in the course notes") and far["sentences"] == []
    assert len(far["sources"]) == 3 and far["usage"]["completion_tokens"] == 0 and far["relevance"] < SHIPPED.relevance
    anyway = httpx.post(f"{served}/v1/answer", json={"question": OUT_OF_COURSE, "model": "retrieval-only", "abstain": False}, timeout=60).json()
    assert anyway["abstained"] is None and anyway["answer"] == anyway["sources"][0]["text"].split("Answer: ")[-1].strip() or anyway["answer"]


def test_chat_content_carries_markers_streamed_or_not(served):
    from openai import OpenAI

    oai = OpenAI(base_url=f"{served}/v1", api_key="unused", max_retries=0)
    ask = dict(model="retrieval-only", messages=[{"role": "user", "content": IN_COURSE}])
    full = oai.chat.completions.create(**ask)
    rest = httpx.post(f"{served}/v1/answer", json={"question": IN_COURSE, "model": "retrieval-only"}, timeout=60).json()
    assert full.choices[0].message.content == rest["cited_answer"] and "[1]" in rest["cited_answer"]
    assert full.model_extra["citations"] == rest["sentences"] and full.model_extra["abstained"] is None
    chunks = list(oai.chat.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == rest["cited_answer"]
    finish = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finish.model_extra["citations"] == rest["sentences"] and len(finish.model_extra["sources"]) == 3
    # generated and streamed, out of course: the notice instead of an answer, and abstained says why
    far = list(oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": OUT_OF_COURSE}], stream=True, max_tokens=4))
    assert "".join(c.choices[0].delta.content or "" for c in far if c.choices).startswith("Not in the course notes")
    assert next(c for c in far if c.choices and c.choices[0].finish_reason).model_extra["abstained"] == NO_RELEVANT_PASSAGE


def test_ask_prints_markers_excerpts_and_the_notice(aimlqa_home, built_index, monkeypatch):
    from typer.testing import CliRunner

    from aimlqa import cli

    monkeypatch.setenv("AIMLQA_THRESHOLDS", str(ROOT / "rag" / "abstention.json"))
    cli._mount()
    cited = CliRunner().invoke(cli.app, ["ask", IN_COURSE, "--model", "retrieval-only", "--index", str(built_index)])
    assert cited.exit_code == 0, cited.output
    answer, sources = cited.stdout.split("\nSources:\n")
    assert re.search(r"\.\[1\]$", answer.strip()) and re.search(r"\[1\] \S+#\S+ \(score [\d.]+\)\n +\"\w", sources)
    assert "support " in cited.stderr and "relevance to the question" in cited.stderr
    far = CliRunner().invoke(cli.app, ["ask", OUT_OF_COURSE, "--model", "retrieval-only", "--index", str(built_index)])
    assert far.exit_code == 0 and far.stdout.startswith("Not in the course notes") and "Closest passages (not an answer):" in far.stdout
    raw = CliRunner().invoke(cli.app, ["ask", OUT_OF_COURSE, "--model", "retrieval-only", "--index", str(built_index), "--no-abstain", "--json"])
    assert json.loads(raw.stdout)["abstained"] is None and json.loads(raw.stdout)["attribution"]["relevance"] < SHIPPED.relevance


def test_the_out_of_course_set_is_shipped_and_split():
    from index.qa import load_qa

    rows = [json.loads(line) for line in (ROOT / "data" / "ooc" / "out_of_course.jsonl").read_text().splitlines()]
    questions = {r["question"].lower() for r in rows}
    assert len(rows) >= 100 and len(questions) == len(rows) and {r["split"] for r in rows} == {"validation", "test"}
    assert sum(r["split"] == "test" for r in rows) >= 100 and sum(r["near_miss"] for r in rows) >= 30
    in_course = {r.question.lower() for r in load_qa(ROOT / "data" / "qa" / "aiml_qa.jsonl")}
    assert not questions & in_course and len(load_qa(ROOT / "data" / "ooc" / "out_of_course.jsonl")) == len(rows)


def test_eval_reports_citations_and_out_of_course_abstention(aimlqa_home, tmp_path, ten_qa, course_dir, embedder, monkeypatch):
    from eval.ablation import run_ablation
    from eval.config import make_config

    monkeypatch.setenv("AIMLQA_THRESHOLDS", str(ROOT / "rag" / "abstention.json"))
    ooc = tmp_path / "ooc.jsonl"
    ooc.write_text("".join(json.dumps({"id": f"o{i}", "question": q, "answer": "Not in the course notes.", "split": "test"}) + "\n"
                           for i, q in enumerate([OUT_OF_COURSE, "How do I make a sourdough starter?", "What is the capital of Australia?"])))
    config = make_config(
        name="cite", models=["retrieval-only"], rag=[True], top_k=[2], modes=["hybrid"], headline={"k": 2, "mode": "hybrid"},
        datasets=[{"name": "ten", "path": ten_qa, "split": "test"}, {"name": "ooc", "path": ooc, "split": "test", "expect": "abstain", "index_with": "ten"}],
        corpus={"sources": [course_dir], "chunk_size": 64, "chunk_overlap": 8}, bootstrap=100, out=tmp_path / "out")
    summary, out = run_ablation(config, progress=False, embedder=embedder)
    cells = {c["dataset"]: c for c in summary["cells"]}
    assert cells["ooc"]["abstained"]["mean"] == 1.0 and cells["ooc"]["expect"] == "abstain"
    ten = cells["ten"]
    assert ten["abstained"]["mean"] < 0.5 and 0 < ten["citation_precision"]["mean"] <= 1 and 0 < ten["citation_recall"]["mean"] <= 1
    assert ten["rougeL_served"]["mean"] <= ten["rougeL"]["mean"] and ten["thresholds"]["relevance"] == SHIPPED.relevance
    assert summary["indexes"]["ooc"]["manifest_hash"] == summary["indexes"]["ten"]["manifest_hash"]  # index_with: the same index
    report = (out / "report.md").read_text()
    assert "### Citations and abstention" in report and "Questions the course notes do not answer" in report
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {"abstained", "citation_precision", "citation_recall", "unsupported", "rougeL_served"} <= set(preds[0]["scores"])
