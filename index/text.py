"""Small text helpers shared by loaders, splitters and metrics."""

from __future__ import annotations

import hashlib
import re
import unicodedata

_WS = re.compile(r"\s+")
_NON_WORD = re.compile(r"[^a-z0-9]+")

STOPWORDS = frozenset(
    """a an the and or but if then else of to in on at by for with from into onto as is are was were be been
    being it its this that these those there their they them he she we you your our i me my his her not no
    so such than too very can could will would shall should may might must do does did done has have had
    having what which who whom whose when where why how all any both each few more most other some own same
    only just also about above below between through during before after again further once here out over
    under up down off while because until against per via using used use one two""".split()
)


def normalise_question(text: str) -> str:
    """The key for de-duplication and splitting: case, accents, punctuation and spacing ignored."""
    text = unicodedata.normalize("NFKC", text).lower()
    return _WS.sub(" ", _NON_WORD.sub(" ", text)).strip()


def slugify(heading: str) -> str:
    return _NON_WORD.sub("-", heading.lower()).strip("-")


def content_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[a-z][a-z0-9]+", text.lower()) if len(w) >= 3 and w not in STOPWORDS]


def sha256_text(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()
