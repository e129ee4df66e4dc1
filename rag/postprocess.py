"""Cleaning a generated answer: template boundary, verbatim loops, and the last complete sentence."""

from __future__ import annotations

import re

_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]?(?=\s|$)")
_SENTENCES = re.compile(r"[^.!?]+[.!?]+[\"')\]]?|[^.!?]+$")


def remove_loops(text: str) -> str:
    """Drop a sentence that repeats an earlier one verbatim, and a phrase repeated back to back."""
    seen, kept = set(), []
    for sent in _SENTENCES.findall(text):
        key = " ".join(sent.lower().split())
        if key and key in seen:
            continue
        seen.add(key)
        kept.append(sent)
    text = "".join(kept)
    # "the model the model the model" → "the model": a run of 3+ words repeated back to back
    return re.sub(r"\b((?:\S+\s+){2,12}?)(?:\1)+", r"\1", text + " ").strip()


def last_complete_sentence(text: str) -> str:
    """Cut a trailing fragment (a generation stopped by the token limit) when a full sentence precedes it."""
    ends = [m.end() for m in _SENT_END.finditer(text)]
    return text[: ends[-1]] if ends else text


def clean_answer(text: str, truncated: bool) -> str:
    text = text.strip()
    text = remove_loops(text)
    if truncated:
        text = last_complete_sentence(text)
    return text.strip()
