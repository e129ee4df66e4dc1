"""Course material → chunks: markdown by `##` section, text, PDF by page, and one chunk per Q&A pair.

Each chunk keeps its source file, section heading, a stable section id (`unitN/topic#section-slug`
for the course notes) and its character span in the source, so an answer can cite exactly where
it came from.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

from aimlqa.settings import UserError
from index.qa import load_qa, read_text, select_split
from index.text import sha256_text, slugify

PROSE_SUFFIXES = {".md", ".markdown", ".txt", ".pdf"}
QA_SUFFIXES = {".csv", ".jsonl"}
QA_QUESTION, QA_ANSWER = "Question: ", "\nAnswer: "


def qa_text(question: str, answer: str) -> str:
    """A Q&A pair as one chunk's text: what retrieval matches and what a prompt quotes."""
    return f"{QA_QUESTION}{question}{QA_ANSWER}{answer}"


def qa_answer(text: str) -> str | None:
    """The answer of a Q&A chunk's text (`qa_text`), or None for any other text."""
    if not text.startswith(QA_QUESTION.rstrip()) or QA_ANSWER.rstrip() not in text:
        return None
    return text.split(QA_ANSWER.rstrip(), 1)[1].strip()


@dataclass
class Section:
    """A span of one source file under one heading, before chunking."""

    source: str
    title: str
    heading: str
    section_id: str
    text: str
    start: int


@dataclass
class Chunk:
    id: int
    text: str
    source: str
    section: str
    section_id: str
    start: int
    end: int
    kind: str = "prose"  # prose | qa
    title: str = ""

    @property
    def embed_text(self) -> str:
        """What is embedded and BM25-indexed: the heading path gives a short chunk its topic."""
        if self.kind != "prose":
            return self.text
        head = self.title if self.section in ("", self.title) else f"{self.title} - {self.section}"
        return f"{head}\n{self.text}"

    def to_dict(self) -> dict:
        return asdict(self)


_FENCE = re.compile(r"^(```|~~~)")


def markdown_sections(text: str, source: str, doc_id: str) -> list[Section]:
    """Split on `## ` headings outside code fences; the text before the first is the intro."""
    title = doc_id.rsplit("/", 1)[-1]
    starts: list[tuple[int, str]] = []
    pos, in_fence = 0, False
    for line in text.splitlines(keepends=True):
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and line.startswith("# ") and not starts and title == doc_id.rsplit("/", 1)[-1]:
            title = line[2:].strip()
        elif not in_fence and line.startswith("## "):
            starts.append((pos, line[3:].strip()))
        pos += len(line)
    bounds = [(0, "")] + starts + [(len(text), None)]
    out = []
    for (a, heading), (b, _) in zip(bounds, bounds[1:]):
        body = text[a:b]
        if not body.strip():
            continue
        sid = f"{doc_id}#{slugify(heading)}" if heading else doc_id
        out.append(Section(source, title, heading or title, sid, body, a))
    return out


def pdf_sections(path: Path, source: str, doc_id: str) -> list[Section]:
    from pypdf import PdfReader

    try:
        reader = PdfReader(str(path))
        pages = [p.extract_text() or "" for p in reader.pages]
    except Exception as e:  # pypdf raises many types for damaged files
        raise UserError(f"{path}: cannot read this PDF ({e}); re-export it or remove it from the sources") from None
    out, pos = [], 0
    for n, page in enumerate(pages, 1):
        if page.strip():
            out.append(Section(source, path.stem, f"page {n}", f"{doc_id}#page-{n}", page, pos))
        pos += len(page) + 1
    return out


def iter_files(sources: Iterable[str | Path]) -> Iterable[tuple[Path, Path]]:
    """(file, root) for every usable file under the given files and directories, in a stable order."""
    for src in sources:
        src = Path(src)
        if src.is_dir():
            files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in PROSE_SUFFIXES | QA_SUFFIXES)
            if not files:
                raise UserError(f"{src}: no .md, .txt, .pdf, .csv or .jsonl files in this directory")
            # an index built inside its own sources (`index build notes --out notes/idx`) is not material
            indexes = {m.parent for m in src.rglob("manifest.json") if (m.parent / "index.faiss").is_file()}
            for p in files:
                if not any(part.startswith(".") for part in p.relative_to(src).parts) and indexes.isdisjoint(p.parents):
                    yield p, src
        elif src.is_file():
            if src.suffix.lower() not in PROSE_SUFFIXES | QA_SUFFIXES:
                raise UserError(f"{src}: unsupported file type; use .md, .txt, .pdf, .csv or .jsonl")
            yield src, src.parent
        else:
            raise UserError(f"{src}: no such file or directory")


def make_splitter(chunk_size: int, chunk_overlap: int, tokenize: Callable[[str], list]):
    from llama_index.core.node_parser import SentenceSplitter

    if chunk_overlap >= chunk_size:
        raise UserError(f"--chunk-overlap ({chunk_overlap}) must be smaller than --chunk-size ({chunk_size})")
    return SentenceSplitter(chunk_size=chunk_size, chunk_overlap=chunk_overlap, tokenizer=tokenize, include_metadata=False)


def chunk_sections(sections: list[Section], splitter) -> list[tuple[Section, str, int, int]]:
    """Token-sized pieces of each section with their character spans in the source file."""
    from llama_index.core import Document

    out = []
    for sec in sections:
        for node in splitter.get_nodes_from_documents([Document(text=sec.text)]):
            s = node.start_char_idx if node.start_char_idx is not None else sec.text.find(node.text)
            s = max(s, 0)
            out.append((sec, node.text, sec.start + s, sec.start + s + len(node.text)))
    return out


def load_corpus(
    sources: Iterable[str | Path],
    chunk_size: int = 200,
    chunk_overlap: int = 30,
    tokenize: Callable[[str], list] = str.split,
    qa_split: str | None = None,
) -> tuple[list[Chunk], str]:
    """All chunks of all sources, and a hash of the corpus content for change detection."""
    splitter = make_splitter(chunk_size, chunk_overlap, tokenize)
    chunks: list[Chunk] = []
    digests = []
    for path, root in iter_files(sources):
        rel = path.relative_to(root).as_posix()
        doc_id = rel.rsplit(".", 1)[0]
        suffix = path.suffix.lower()
        if suffix in QA_SUFFIXES:
            records = select_split(load_qa(path), qa_split)
            digests.append(sha256_text(rel, qa_split or "all", *(r.question + r.answer for r in records)))
            for n, r in enumerate(records):
                text = qa_text(r.question, r.answer)
                chunks.append(Chunk(len(chunks), text, rel, r.question, f"{doc_id}#{r.id or n}", 0, 0, "qa", r.unit))
            continue
        if suffix == ".pdf":
            sections = pdf_sections(path, rel, doc_id)
            digests.append(sha256_text(rel, *(s.text for s in sections)))
        else:
            text = read_text(path)
            digests.append(sha256_text(rel, text))
            sections = (
                markdown_sections(text, rel, doc_id)
                if suffix in (".md", ".markdown")
                else [Section(rel, path.stem, path.stem, doc_id, text, 0)]
            )
        for sec, text, a, b in chunk_sections(sections, splitter):
            chunks.append(Chunk(len(chunks), text, rel, sec.heading, sec.section_id, a, b, "prose", sec.title))
    if not chunks:
        raise UserError("the sources hold no text to index")
    return chunks, sha256_text(*digests)[:16]
