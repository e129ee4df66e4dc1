"""Which retrieved passage supports which answer sentence, after generation.

A 270M model does not place citation markers reliably, so attribution is post hoc: each answer
sentence is compared with each passage the answer was grounded in, by the embedding model the
index already loaded (all-MiniLM-L6-v2: no second model in memory, one short encode per answer)
and by the share of the sentence's content words the passage holds (what an extractive answer
copies). Their mean is the sentence's support by that passage; a passage at or above the
`cite` threshold is cited, the best excerpt named. The same scores decide abstention:
`relevance` (how close the best passage is to the question) says whether retrieval found course
material at all, `support` (the mean over sentences of their best passage) whether the answer
stands on it. Thresholds are chosen on validation data (`rag/abstention.json`, written by
`bench/citations.py`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from index.text import content_words

THRESHOLDS_FILE = Path(__file__).with_name("abstention.json")  # the shipped choice; $AIMLQA_THRESHOLDS names another

# "e.g." and "Fig." end no sentence; a boundary is only known once a non-space follows it, so the
# spans of a growing text never change before its last sentence (streaming relies on it)
_END = re.compile(r"[.!?]+[\"')\]]*(?=\s+\S)|\n\s*\n")
_LABEL = re.compile(r"^(?:Question|Answer):\s*")  # a Q&A chunk's labels (index.corpus.qa_text)
_ABBREVIATIONS = frozenset("e.g i.e etc vs cf fig eq approx al dr mr mrs ms no ca resp".split())

NO_RELEVANT_PASSAGE = "no_relevant_passage"
UNSUPPORTED = "unsupported"


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence: end after its closing punctuation, whitespace outside."""
    spans, start = [], len(text) - len(text.lstrip())
    for m in _END.finditer(text):
        if m.group().startswith(".") and m.group().rstrip("\"')]") == ".":
            word = text[: m.start()].rsplit(None, 1)[-1].lower() if text[: m.start()].strip() else ""
            if word.strip("(\"'") in _ABBREVIATIONS or len(word) == 1:
                continue
        end = m.start() if m.group().startswith("\n") else m.end()
        if text[start:end].strip():
            spans.append((start, len(text[:end].rstrip())))
        start = m.end() + len(text[m.end() :]) - len(text[m.end() :].lstrip())
    if text[start:].strip():
        spans.append((start, len(text.rstrip())))
    return spans


def _stems(text: str) -> set[str]:
    """Content words with a plural or -ing/-ed ending cut: "trains" and "trained" are one word here."""
    out = set()
    for w in content_words(text):
        for suffix in ("ing", "ed", "es", "s"):
            if w.endswith(suffix) and len(w) - len(suffix) >= 3:
                w = w[: -len(suffix)]
                break
        out.add(w)
    return out


def overlap(sentence: str, passage: str) -> float:
    """The share of the sentence's content words that the passage holds (0 for a sentence without any)."""
    words = _stems(sentence)
    return len(words & _stems(passage)) / len(words) if words else 0.0


def best_excerpt(sentence: str, passage: str) -> str:
    """The passage sentence that shares most content words with the answer sentence."""
    pieces = [passage[a:b] for a, b in sentence_spans(passage)] or [passage]
    pieces = [_LABEL.sub("", p.lstrip("#").strip()) for p in pieces]
    return max(pieces, key=lambda p: (overlap(sentence, p), -len(p)))


@dataclass(frozen=True)
class Thresholds:
    """Chosen on validation data; `None` for a threshold turns that check off."""

    cite: float = 0.5  # a passage at or above this supports the sentence...
    margin: float = 0.1  # ...and is cited when within this of the sentence's best passage
    relevance: float | None = None  # best question-passage cosine below this: retrieval found nothing
    support: float | None = None  # answer support below this: the answer does not stand on the passages
    embed_model: str = "all-MiniLM-L6-v2"  # what the cosines were measured with
    chosen_on: dict = field(default_factory=dict, compare=False)

    @classmethod
    def load(cls, path: Path | None = None) -> "Thresholds":
        """The shipped thresholds, or those of $AIMLQA_THRESHOLDS (a JSON file with the same keys)."""
        named = path or os.environ.get("AIMLQA_THRESHOLDS")
        path = Path(named) if named else THRESHOLDS_FILE
        if not path.is_file():
            if named:
                from aimlqa.settings import UserError

                raise UserError(f"{path}: no such thresholds file (AIMLQA_THRESHOLDS); unset it to use {THRESHOLDS_FILE}")
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            from aimlqa.settings import UserError

            raise UserError(f"{path}: not a thresholds file ({e}); write JSON with cite, margin, relevance, support, embed_model") from None
        return cls(**{k: data[k] for k in ("cite", "margin", "relevance", "support", "embed_model", "chosen_on") if k in data})


@dataclass
class Citation:
    n: int  # the marker: 1-based position of the passage in the answer's sources
    chunk_id: int
    section_id: str
    excerpt: str
    score: float


@dataclass
class Sentence:
    start: int  # span in the answer text (without markers)
    end: int
    text: str
    support: float  # the best passage's score
    citations: list[Citation]  # best first
    supported: bool = False  # some passage supports it (else it is marked "[unsupported]"): set from citations

    def __post_init__(self):
        self.supported = bool(self.citations)


@dataclass
class Attribution:
    sentences: list[Sentence]
    relevance: float  # best cosine of the question with a passage (0 without passages)
    support: float  # mean over sentences of their best passage's score (0 without sentences)
    abstain: str | None = None  # None, NO_RELEVANT_PASSAGE or UNSUPPORTED

    @property
    def unsupported_share(self) -> float | None:
        return sum(not s.supported for s in self.sentences) / len(self.sentences) if self.sentences else None

    def to_dict(self) -> dict:
        return asdict(self)


class Attributor:
    """Attribution and the abstention decision, with the embedder of the index the passages came from.

    `retriever` (optional) gives the passages' stored vectors by chunk id; without it, or for a
    passage it does not hold, the passage text is encoded (slower, for answers from elsewhere)."""

    def __init__(self, embedder, thresholds: Thresholds | None = None, retriever=None):
        self.embedder = embedder
        self.thresholds = thresholds or Thresholds.load()
        self.retriever = retriever

    @property
    def calibrated(self) -> bool:
        """Cosine thresholds hold for the embedding model they were measured with, and no other."""
        return self.thresholds.embed_model == getattr(self.embedder, "name", None)

    def _passage_vectors(self, passages: list) -> np.ndarray:
        vectors = self.retriever.vectors(passages) if self.retriever is not None else [None] * len(passages)
        missing = [i for i, v in enumerate(vectors) if v is None]
        if missing:
            encoded = self.embedder.encode([passages[i].text for i in missing])
            for i, v in zip(missing, encoded):
                vectors[i] = v
        return np.stack(vectors) if vectors else np.zeros((0, 1), dtype=np.float32)

    def thresholds_used(self) -> dict:
        """What decided citations and abstention, for reports."""
        t = self.thresholds
        applied = self.calibrated
        return {"cite": t.cite, "margin": t.margin, "relevance": t.relevance if applied else None, "support": t.support if applied else None,
                "embed_model": t.embed_model, "calibrated": applied}

    @property
    def checks_relevance(self) -> bool:
        return self.calibrated and self.thresholds.relevance is not None

    def relevance(self, questions: list[str], passages: list[list]) -> list[float]:
        """The best cosine of each question with its passages (the question's vector is the one
        retrieval just computed: `Embedder.encode_queries` keeps recent ones)."""
        if not questions:
            return []
        q = self.embedder.encode_queries(questions)
        return [float((self._passage_vectors(p) @ v).max()) if p else 0.0 for v, p in zip(q, passages)]

    def attribute(self, questions: list[str], answers: list[str], passages: list[list]) -> list[Attribution]:
        """One encode call for every sentence of the batch."""
        spans = [sentence_spans(a) for a in answers]
        texts = [a[s:e] for a, sp in zip(answers, spans) for s, e in sp]
        s_vecs = iter(self.embedder.encode(texts) if texts else [])
        out = []
        q_vecs = self.embedder.encode_queries(questions) if questions else []
        for q, answer, sp, ps in zip(q_vecs, answers, spans, passages):
            pv = self._passage_vectors(ps) if ps else None  # once per answer: relevance and every sentence use them
            relevance = float((pv @ q).max()) if ps else 0.0
            sentences = []
            for s, e in sp:
                v, text = next(s_vecs), answer[s:e]
                if not ps:
                    sentences.append(Sentence(s, e, text, 0.0, []))
                    continue
                scores = [(float(c) + overlap(text, p.text)) / 2 for c, p in zip(pv @ v, ps)]
                floor = max(self.thresholds.cite, max(scores) - self.thresholds.margin)
                cited = [Citation(n + 1, p.chunk_id, p.section_id, best_excerpt(text, p.text), round(sc, 4))
                         for n, (sc, p) in enumerate(zip(scores, ps)) if sc >= floor]
                cited.sort(key=lambda c: -c.score)
                sentences.append(Sentence(s, e, text, round(max(scores), 4), cited))
            support = sum(x.support for x in sentences) / len(sentences) if sentences else 0.0
            out.append(Attribution(sentences, round(relevance, 4), round(support, 4), self.decide(relevance, support, bool(sentences))))
        return out

    def decide(self, relevance: float, support: float | None, answered: bool = True) -> str | None:
        """Why to abstain, or None: thresholds measured with another embedder are not applied."""
        t = self.thresholds
        if not self.calibrated:
            return None
        if t.relevance is not None and relevance < t.relevance:
            return NO_RELEVANT_PASSAGE
        if support is not None and t.support is not None and (not answered or support < t.support):
            return UNSUPPORTED
        return None
