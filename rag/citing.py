"""Citation markers in the answer text: "[1][3]" after a sentence for the sources that support it,
"[unsupported]" after one that no source supports; whole answers and streamed ones alike."""

from __future__ import annotations

from rag.attribution import NO_RELEVANT_PASSAGE, Sentence, sentence_spans

UNSUPPORTED_MARK = "[unsupported]"


def marker(sentence: Sentence) -> str:
    return "".join(f"[{c.n}]" for c in sorted(sentence.citations, key=lambda c: c.n)) or UNSUPPORTED_MARK


def render(text: str, sentences: list[Sentence]) -> str:
    """The answer with each sentence's marker right after its closing punctuation."""
    out, pos = [], 0
    for s in sentences:
        out += [text[pos : s.end], marker(s)]
        pos = s.end
    return "".join(out + [text[pos:]])


class CitedStream:
    """Markers for an answer being streamed, so the pieces join to the whole answer's cited text.

    A sentence's end is only certain once the next one begins, so its marker goes out then (the
    last one's when the answer is complete), attributed on its own as the whole answer would be;
    trailing spaces wait, since the marker goes before them. `cleaner` (rag.postprocess.StreamCleaner)
    says what of the raw text can be shown. Without an attributor the text passes through."""

    def __init__(self, cleaner, attributor=None, question: str = ""):
        self.cleaner, self.attributor, self.question = cleaner, attributor, question
        self.text = ""  # the answer's text shown so far, without markers
        self.sent = 0  # how much of `text` has gone out
        self.marked = 0  # sentences whose marker has gone out
        self.passages: list = []

    def feed(self, raw: str, passages: list | None = None) -> str:
        """The next piece to send, given the raw generated text so far ("" when nothing new)."""
        if passages is not None:
            self.passages = passages
        self.text += self.cleaner.feed(raw)
        return self._emit(sentence_spans(self.text)[:-1], final=None)

    def finish(self, answer) -> str:
        """The rest, once the answer is complete: its last markers, and the notice if it abstained."""
        if answer.abstained == NO_RELEVANT_PASSAGE and not self.text:
            return answer.text  # nothing was generated
        generated = answer.raw_text if answer.abstained else answer.text
        self.text += self.cleaner.finish(generated)
        final = answer.attribution.sentences if answer.attribution else []
        rest = self._emit(sentence_spans(self.text), final)
        return rest + (f"\n\n{answer.text}" if answer.abstained else "")

    def _emit(self, spans: list[tuple[int, int]], final: list[Sentence] | None) -> str:
        out = []
        for j, (s, e) in enumerate(spans[self.marked :], start=self.marked):
            out.append(self.text[self.sent : e])
            self.sent, self.marked = e, j + 1
            out.append(self._marker(j, s, e, final))
        end = len(self.text) if final is not None else len(self.text.rstrip())
        if end > self.sent:
            out.append(self.text[self.sent : end])
            self.sent = end
        return "".join(out)

    def _marker(self, j: int, s: int, e: int, final: list[Sentence] | None) -> str:
        if final is not None:  # the whole answer's attribution, when it has this sentence
            if j < len(final) and (final[j].start, final[j].end) == (s, e):
                return marker(final[j])
            return "" if not final else self._attribute(s, e)
        return self._attribute(s, e)

    def _attribute(self, s: int, e: int) -> str:
        if self.attributor is None or not self.passages:
            return ""
        (att,) = self.attributor.attribute([self.question], [self.text[s:e]], [self.passages])
        return marker(att.sentences[0]) if att.sentences else ""
