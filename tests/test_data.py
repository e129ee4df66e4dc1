"""The shipped course notes and Q&A set: size, coverage, gold ids, support, split and originality."""

from __future__ import annotations

import pytest

from aimlqa import settings
from index.datacheck import SUPPORT_THRESHOLD, check_dataset, course_sections
from index.qa import load_qa, split_of
from tests.conftest import GROUP18


@pytest.fixture(scope="module")
def report():
    return check_dataset(settings.qa_file(), settings.course_dir())


def test_size_and_coverage(report):
    assert report["qa_pairs"] >= 500 and report["topics"] >= 60 and report["words"] >= 30000
    assert set(report["units"]) == {"1", "2", "3", "4"} and min(report["units"].values()) >= 100


def test_gold_ids_exist_no_duplicates_and_answers_supported(report):
    assert report["problems"] == [] and report["ok"]
    assert report["support_min"] >= SUPPORT_THRESHOLD


def test_every_section_id_is_stable_and_unit_scoped():
    ids = course_sections(settings.course_dir())
    assert len(ids) >= 240
    assert all(i.split("/", 1)[0] in {"unit1", "unit2", "unit3", "unit4"} for i in ids)


def test_fixed_split_is_the_projects_splitter():
    recs = load_qa(settings.qa_file())
    assert all(r.split == split_of(r.question) for r in recs)
    assert {r.split for r in recs} == {"train", "validation", "test"}


@pytest.mark.skipif(not GROUP18.is_dir(), reason="group18 data not present")
def test_no_near_copies_of_group18(embedder):
    report = check_dataset(settings.qa_file(), settings.course_dir(), GROUP18 / "dev.jsonl")
    assert report["exact_copies"] == 0
    assert report["max_similarity_to_reference"] < report["near_copy_threshold"]
