"""One choice's text as its tokens arrive: incremental detokenization and stop sequences.

    text = ChoiceText(tokenizer, stops=["\\n\\n"])
    delta = text.add(new_ids)      the text that is safe to send now ("" if none yet)
    ChoiceText(tokenizer, stream=False)      no stops and nobody reading along: decoded once, at finish()
    text.stopped                   a stop sequence appeared: the text ends before it (the request is cancelled)
    rest = text.finish()           whatever was held back, at the end

The whole text is always `tokenizer.decode(all ids)` (the batch CLI's output for the same tokens), cut before the
first stop sequence. While streaming, text is held back when it could still change: a trailing replacement character
(an incomplete byte sequence of byte-fallback pieces) and, with stop sequences, the last (longest stop - 1)
characters, which could be the start of one. A choice that is neither streamed nor has stop sequences is decoded only
once, when it ends: decoding every prefix of it would cost the server's front end O(length) per token for nothing.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class ChoiceText:
    def __init__(self, tokenizer, stops: list[str] | None = None, stream: bool = True):
        self.tokenizer = tokenizer
        self.stops = list(stops or [])
        self.deferred = not (stream or self.stops)
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def add(self, ids: list[int]) -> str:
        if self.stopped or not ids:
            return ""
        self.ids += ids
        if self.deferred:
            return ""
        self.text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=None)
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._take(len(self.text))
        safe = len(self.text) - self.holdback
        while safe > self.sent and self.text[safe - 1] == REPLACEMENT:
            safe -= 1
        return self._take(safe)

    def finish(self) -> str:
        if self.deferred:
            self.text = self.tokenizer.decode(self.ids)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : end], end
        return delta
