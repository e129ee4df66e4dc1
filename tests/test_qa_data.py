"""Q&A loaders for every layout, malformed files, de-duplication and the deterministic split."""

from __future__ import annotations

import pytest

from aimlqa.settings import UserError
from index.qa import dedupe, load_qa, split_of, split_records
from tests.conftest import GROUP18


def write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return p


@pytest.mark.parametrize(
    "name,text,unit",
    [
        ("a.csv", ",Q,A,Unit\r\n0,What is AI?,Machines that think.,2\r\n", "2"),
        ("b.csv", ",Q,A,unit\r\n0,What is AI?,Machines that think.,3.0\r\n1,Empty unit?,Yes.,\r\n", "3"),
        ("c.csv", "Question,Answer\r\nWhat is AI?,Machines that think.\r\n", ""),
        ("d.csv", 'Questions,Answers\r\nWhat is AI?,"Machines\r\nthat think."\r\n', ""),
        ("e.jsonl", '{"question": "What is AI?", "answer": "Machines that think.", "unit": "4"}\n\n', "4"),
    ],
)
def test_every_layout_loads(tmp_path, name, text, unit):
    recs = load_qa(write(tmp_path, name, text))
    assert recs[0].question == "What is AI?"
    assert " ".join(recs[0].answer.split()) == "Machines that think."
    assert recs[0].unit == unit
    assert recs[0].source == name


def test_float_units_and_empty_cells(tmp_path):
    recs = load_qa(write(tmp_path, "s.csv", ",Q,A,unit\n0,Q one?,A one.,3.0\n1,Q two?,A two.,\n2,,orphan answer,1\n"))
    assert [(r.question, r.unit) for r in recs] == [("Q one?", "3"), ("Q two?", "")]


def test_bom_and_cp1252_bytes(tmp_path):
    bom = load_qa(write(tmp_path, "bom.csv", b"\xef\xbb\xbfQuestion,Answer\nWhat?,That.\n"))
    assert bom[0].question == "What?"
    bad = load_qa(write(tmp_path, "cp.csv", b"Question,Answer\nWhat is \x93AI\x94?,It\x92s machines.\n"))
    assert bad[0].question == "What is \u201cAI\u201d?" and bad[0].answer == "It\u2019s machines."


@pytest.mark.parametrize(
    "name,data,needle",
    [
        ("empty.csv", "", "empty"),
        ("cols.csv", "foo,bar\n1,2\n", "no question/answer columns"),
        ("noq.jsonl", '{"text": "x"}\n', "no question/answer columns"),
        ("broken.jsonl", '{"question": "a", \n', "not valid JSON"),
        ("rows.csv", "Question,Answer\n", "no rows"),
    ],
)
def test_malformed_files_name_the_file(tmp_path, name, data, needle):
    with pytest.raises(UserError) as e:
        load_qa(write(tmp_path, name, data))
    assert name in str(e.value) and needle in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such Q&A file"):
        load_qa(tmp_path / "nope.csv")


@pytest.mark.skipif(not GROUP18.is_dir(), reason="group18 data not present")
@pytest.mark.parametrize(
    "name,rows",
    [("dev.jsonl", 880), ("Group18_AIML_QA.dev.csv", 315), ("AIML_QnA_Unit4.dev.csv", 110), ("unit3_QA.dev.csv", 71)],
)
def test_group18_files(name, rows):
    recs = load_qa(GROUP18 / name)
    assert len(recs) == rows
    assert all(r.question and r.answer for r in recs)


@pytest.mark.skipif(not GROUP18.is_dir(), reason="group18 data not present")
def test_group18_sampled_units_are_integers():
    recs = load_qa(GROUP18 / "sampled_qa_data.dev.csv")
    assert len(recs) >= 570
    assert {r.unit for r in recs} <= {"", "1", "2", "3", "4"}
    assert any("\n" in r.answer for r in load_qa(GROUP18 / "unit3_QA.dev.csv"))


def test_dedupe_on_normalised_question():
    from index.qa import QARecord

    recs = [QARecord("What is  AI?", "a"), QARecord("what is ai", "b"), QARecord("What is ML?", "c")]
    assert [r.answer for r in dedupe(recs)] == ["a", "c"]


def test_split_is_deterministic_and_disjoint():
    from index.qa import QARecord

    recs = [QARecord(f"Question number {i}?", f"Answer {i}.") for i in range(2000)]
    recs += [QARecord(f"QUESTION number {i} ", "dup") for i in range(0, 2000, 7)]
    a, b = split_records(recs), split_records(list(reversed(recs)))
    assert {k: sorted(r.key for r in v) for k, v in a.items()} == {k: sorted(r.key for r in v) for k, v in b.items()}
    keys = [set(r.key for r in v) for v in a.values()]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert sum(map(len, keys)) == 2000
    assert 0.75 < len(a["train"]) / 2000 < 0.85 and 0.07 < len(a["test"]) / 2000 < 0.13
    assert split_of("What is AI?") == split_of("  what is AI ")


def test_split_fractions_validated():
    with pytest.raises(UserError, match="summing to 1"):
        split_of("q", (0.5, 0.5, 0.5))


def test_fixed_split_field_wins(tmp_path):
    recs = load_qa(write(tmp_path, "f.jsonl", '{"question": "q1", "answer": "a", "split": "test"}\n'))
    assert split_records(recs)["test"][0].question == "q1"
