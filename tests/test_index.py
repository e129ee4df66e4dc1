"""Chunking, build → load → search with the packaged embedding model, manifest checks, atomic writes, CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from aimlqa.settings import UserError
from index.corpus import load_corpus
from index.retriever import Retriever, build_index
from index.store import BuildConfig


def test_chunks_keep_sections_and_spans(course_dir, embedder):
    chunks, h = load_corpus([course_dir], 64, 8, embedder.tokenize)
    ids = {c.section_id for c in chunks}
    assert "unit1/gradient-descent#the-update-rule" in ids and "unit3/convolution#output-size" in ids
    for c in chunks:
        src = (course_dir / c.source).read_text()
        assert src[c.start : c.end] == c.text
    assert all(len(embedder.tokenize(c.text)) <= 64 for c in chunks)
    assert load_corpus([course_dir], 64, 8, embedder.tokenize)[1] == h


def test_long_section_is_split_with_overlap(tmp_path, embedder):
    (tmp_path / "long.md").write_text("# Long\n\n## Body\n\n" + " ".join(f"Sentence number {i} is here." for i in range(200)))
    chunks, _ = load_corpus([tmp_path], 40, 10, embedder.tokenize)
    body = [c for c in chunks if c.section == "Body"]
    assert len(body) > 5 and all(c.section_id == "long#body" for c in body)
    assert all(a.end > b.start for a, b in zip(body, body[1:]))  # overlapping spans


def test_txt_pdf_and_qa_sources(tmp_path, embedder, qa_file):
    from pypdf import PdfWriter

    (tmp_path / "a.txt").write_text("Plain text notes about k-means clustering.")
    w = PdfWriter()
    w.add_blank_page(100, 100)
    with open(tmp_path / "blank.pdf", "wb") as f:
        w.write(f)
    chunks, _ = load_corpus([tmp_path, qa_file], 64, 8, embedder.tokenize)
    kinds = {(c.kind, c.source) for c in chunks}
    assert ("prose", "a.txt") in kinds and ("qa", "qa.jsonl") in kinds
    qa = [c for c in chunks if c.kind == "qa"]
    assert len(qa) == 3 and qa[0].text.startswith("Question: ") and "\nAnswer: " in qa[0].text


def test_bad_sources(tmp_path, embedder):
    with pytest.raises(UserError, match="no such file"):
        load_corpus([tmp_path / "missing"], 64, 8, embedder.tokenize)
    (tmp_path / "x.docx").write_text("x")
    with pytest.raises(UserError, match="unsupported file type"):
        load_corpus([tmp_path / "x.docx"], 64, 8, embedder.tokenize)
    with pytest.raises(UserError, match="must be smaller"):
        load_corpus([tmp_path], 32, 32, embedder.tokenize)


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_round_trip_search(retriever, mode):
    hits = retriever.search("How is the output size of a convolution computed with padding and stride?", k=3, mode=mode)
    assert hits[0].section_id in ("unit3/convolution#output-size", "qa#t-3")
    assert len(hits) <= 3 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    batch = retriever.search_many(["dropout ensemble", "learning rate too large"], k=2, mode=mode)
    assert "dropout" in batch[0][0].section_id and "gradient" in batch[1][0].text.lower() + batch[1][0].section_id


def test_search_leaves_torch_threads_alone(retriever):
    import torch

    before = torch.get_num_threads()
    retriever.search("dropout", 2)
    assert torch.get_num_threads() == before


def test_search_validates(retriever):
    with pytest.raises(UserError, match="unknown retrieval mode"):
        retriever.search("x", 3, "fuzzy")
    with pytest.raises(UserError, match="at least 1"):
        retriever.search("x", 0)
    assert len(retriever.search("dropout", k=1000)) == len(retriever.chunks)


def test_manifest_and_mismatch(built_index):
    m = json.loads((built_index / "manifest.json").read_text())
    assert m["embed_model"] == "all-MiniLM-L6-v2" and m["dim"] == 384 and m["chunk_size"] == 64
    assert m["n_chunks"] > 6 and len(m["corpus_hash"]) == 16 and "faiss-cpu" in m["versions"]
    with pytest.raises(UserError, match="built with embedding model 'all-MiniLM-L6-v2'"):
        Retriever.load(built_index, embed_model="BAAI/bge-small-en")


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_approximate_index_types(tmp_path, course_dir, embedder, index_type):
    out = tmp_path / "idx"
    build_index([course_dir], out, BuildConfig(chunk_size=32, chunk_overlap=4, index_type=index_type), progress=False, embedder=embedder)
    r = Retriever.load(out, embedder=embedder)
    assert r.manifest["index_type"] == index_type
    assert r.search("dropout probability", 1)[0].section_id.startswith("unit2/dropout")


def test_unchanged_corpus_is_skipped_and_change_rebuilds(tmp_path, course_dir, embedder):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(course_dir, src)
    cfg = BuildConfig(chunk_size=64, chunk_overlap=8)
    out = tmp_path / "idx"
    assert build_index([src], out, cfg, progress=False, embedder=embedder)[1] is True
    assert build_index([src], out, cfg, progress=False, embedder=embedder)[1] is False
    (src / "unit1" / "new.md").write_text("# New\n\n## Momentum\n\nMomentum accumulates past gradients.")
    m, built = build_index([src], out, cfg, progress=False, embedder=embedder)
    assert built and Retriever.load(out, embedder=embedder).search("momentum past gradients", 1)[0].source == "unit1/new.md"


def test_interrupted_build_keeps_old_index(tmp_path, course_dir, embedder, monkeypatch):
    import index.store as store

    out = tmp_path / "idx"
    build_index([course_dir], out, BuildConfig(chunk_size=64, chunk_overlap=8), progress=False, embedder=embedder)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def boom(*a, **k):
        raise KeyboardInterrupt  # a Ctrl-C in the middle of writing the new index

    monkeypatch.setattr(store.json, "dumps", boom)
    with pytest.raises(KeyboardInterrupt):
        build_index([course_dir], out, BuildConfig(chunk_size=32, chunk_overlap=8), force=True, progress=False, embedder=embedder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary dirs left behind
    assert Retriever.load(out, embedder=embedder).manifest["chunk_size"] == 64


def test_build_never_replaces_a_file_or_a_folder_that_is_not_an_index(tmp_path, course_dir, embedder):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.md").write_text("# Mine\n\nNot an index.")
    taken = tmp_path / "taken.txt"
    taken.write_text("keep me")
    for out, what in ((notes, "a folder that is not an index"), (taken, "a file")):
        with pytest.raises(UserError, match=f"--out {re.escape(str(out))} is {what}.*; .*pass a new path or an existing index dir"):
            build_index([course_dir], out, BuildConfig(chunk_size=64, chunk_overlap=8), progress=False, embedder=embedder)
    assert (notes / "mine.md").read_text() == "# Mine\n\nNot an index." and taken.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "taken.txt"]
    inside = notes / "idx"  # built inside its own sources: a rebuild does not read the index as notes
    build_index([notes], inside, BuildConfig(chunk_size=64, chunk_overlap=8), progress=False, embedder=embedder)
    (notes / "more.md").write_text("# More\n\nMomentum accumulates past gradients.")
    m, built = build_index([notes], inside, BuildConfig(chunk_size=64, chunk_overlap=8), progress=False, embedder=embedder)
    assert built and m["n_sources"] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert build_index([course_dir], empty, BuildConfig(chunk_size=64, chunk_overlap=8), progress=False, embedder=embedder)[1]


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "aimlqa", *map(str, args)], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def test_cli_end_to_end(tmp_path, course_dir):
    out = tmp_path / "idx"
    r = run_cli("index", "build", course_dir, "--out", out, "--chunk-size", "64", "--chunk-overlap", "8")
    assert r.returncode == 0, r.stderr
    assert "built" in r.stdout and (out / "index.faiss").is_file()
    assert "unchanged" in run_cli("index", "build", course_dir, "--out", out, "--chunk-size", "64", "--chunk-overlap", "8").stdout
    info = json.loads(run_cli("index", "info", out).stdout)
    assert info["n_sources"] == 3
    hits = json.loads(run_cli("index", "search", out, "what does dropout do", "-k", "2", "--mode", "hybrid", "--json").stdout)
    assert len(hits) == 2 and hits[0]["section_id"].startswith("unit2/dropout")
    bad = run_cli("index", "search", tmp_path / "nothing", "q")
    assert bad.returncode == 2 and "not an index" in bad.stderr and "Traceback" not in bad.stderr


def test_counting_a_long_document_does_not_warn_of_indexing_errors(embedder, capfd, caplog):
    """Documents are counted whole before they are split; transformers' warning that a text longer
    than the encoder's maximum "will result in indexing errors" is false here and alarmed users."""
    text = "Gradient descent moves the weights against the gradient. " * 80
    assert len(embedder.tokenize(text)) > 256
    out = capfd.readouterr()
    assert "indexing errors" not in out.err + out.out + caplog.text
