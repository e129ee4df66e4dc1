"""Cleaning a generated answer: template boundary, verbatim loops, and the last complete sentence."""

from __future__ import annotations

import re

_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]?(?=\s|$)")
_SENTENCES = re.compile(r"[^.!?]+[.!?]+[\"')\]]?|[^.!?]+$")
_LEADING_MARK = re.compile(r"^\[\d+\][ \t]*")
_NEXT_PASSAGE = re.compile(r"\n\s*\[\d+\]")


def _ngrams(words: list[str], n: int = 4) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def remove_loops(text: str, overlap: float = 0.6) -> str:
    """Drop a sentence that mostly repeats earlier ones (>= 60% of its word 4-grams already said,
    which catches "X is a Y. It is a Y." loops), and a phrase repeated back to back."""
    seen: set[tuple[str, ...]] = set()
    kept = []
    for sent in _SENTENCES.findall(text):
        words = re.findall(r"\w+", sent.lower())
        grams = _ngrams(words) or {tuple(words)}
        if words and len(grams & seen) >= overlap * len(grams):
            continue
        seen |= grams
        kept.append(sent)
    text = "".join(kept)
    # "the model the model the model" → "the model": a run of 3+ words repeated back to back
    return re.sub(r"\b((?:\S+\s+){2,12}?)(?:\1)+", r"\1", text + " ").strip()


def last_complete_sentence(text: str) -> str:
    """Cut a trailing fragment (a generation stopped by the token limit) when a full sentence precedes it."""
    ends = [m.end() for m in _SENT_END.finditer(text)]
    return text[: ends[-1]] if ends else text


def cut_at_next_passage(text: str) -> tuple[str, bool]:
    """Grounded prompts number their passages "[n] ..."; a line that starts "[n]" after the answer is
    the model writing more notes ("...(0 to 1).\n[4] Question: What is..."), as a third of the base
    model's k=3 answers did. Not a stop sequence: the same model often opens with "\n[1] <answer>",
    which a stop would cut to nothing; here that leading marker is dropped instead. Returns the text
    and whether it was cut there (as `cut_at_stop` does)."""
    text = _LEADING_MARK.sub("", text.lstrip())
    found = _NEXT_PASSAGE.search(text)
    return (text[: found.start()], True) if found else (text, False)


def clean_answer(text: str, truncated: bool) -> str:
    text, cut = cut_at_next_passage(text)
    truncated = truncated and not cut  # cut before the limit: the answer itself is whole
    text = text.strip()
    text = remove_loops(text)
    if truncated:
        text = last_complete_sentence(text)
    return text.strip()


class StreamCleaner:
    """What of an answer being generated can be shown already, so that the streamed pieces join to
    what `clean_answer` makes of the whole. The first sentence goes out token by token (no earlier
    sentence can make it a loop); each later one once it is complete and is not a loop. Text from a
    line break on waits until it is clear that no stop sequence or passage marker begins there."""

    def __init__(self, stop: tuple[str, ...] = ()):
        self.stop = stop
        self.sent = ""

    def _visible(self, raw: str) -> str:
        from rag.generators.base import cut_at_stop

        text, _ = cut_at_stop(raw, self.stop)
        lead = text.lstrip()
        if lead.startswith("[") and "]" not in lead[:6]:
            return ""  # perhaps a leading passage marker, "[1] ": wait for its end
        text, _ = cut_at_next_passage(text)
        if "\n" in text:
            text = text[: text.rindex("\n")]  # a stop or a "[n]" marker may begin at the break
        ends = [m.end() for m in _SENT_END.finditer(text)]
        if not ends:
            return text.strip()  # the first sentence, as it grows
        return remove_loops(text[: ends[-1]]).strip()  # complete sentences; the one being written waits

    def feed(self, raw: str) -> str:
        """The new piece to show, given the whole raw text generated so far ("" when nothing new)."""
        visible = self._visible(raw)
        if not visible.startswith(self.sent) or len(visible) <= len(self.sent):
            return ""
        piece, self.sent = visible[len(self.sent) :], visible
        return piece

    def finish(self, final: str) -> str:
        """The rest of the final (cleaned) answer; "" if the shown text is already all of it (or, in
        a rare case where cleaning the whole changed what was shown, nothing more)."""
        piece = final[len(self.sent) :] if final.startswith(self.sent) else ""
        self.sent += piece
        return piece
