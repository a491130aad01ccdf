"""Incremental detokenization and stop strings, per output sequence."""

from __future__ import annotations


class Detokenizer:
    """Turns a growing list of token ids into text deltas.

    Decoding tokens one at a time breaks multi-byte characters and the spaces that some tokenizers
    attach to the next token, so each delta is the difference between decoding a short window that
    ends with the new tokens and the same window without them; a delta that ends in an incomplete
    character (U+FFFD) waits for the next token.
    """

    WINDOW = 6  # tokens of context kept before the unread ones

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, new_ids: list[int], final: bool = False) -> str:
        self.ids.extend(new_ids)
        if self.read == len(self.ids):
            return ""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if after.endswith("\ufffd") and not final:
            return ""
        delta = after[len(before) :] if after.startswith(before) else after
        self.read = len(self.ids)
        self.prefix = max(0, self.read - self.WINDOW)
        return delta


class StopMatcher:
    """Finds the earliest stop string in the output and holds back text that may still become one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, delta: str, final: bool = False) -> str:
        """Adds text; returns what can be released now (all of it once final or stopped)."""
        if self.stopped:
            return ""
        start = max(0, len(self.text) - self.hold)
        self.text += delta
        if self.stops and not self.stopped:
            # the stop that ends first wins, whatever the split of the text into deltas
            hits = [(i + len(s), i) for s in self.stops if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.text = self.text[: min(hits)[1]]
                self.stopped = True
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out
