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

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, new_ids: list[int], final: bool = False) -> str:
        self.ids.extend(new_ids)
        if self.read == len(self.ids):
            return ""
        # an empty window (a sequence's first text, all of a non-streamed one) needs no decode
        before = self._decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        after = self._decode(self.ids[self.prefix :])
        if after.endswith("\ufffd") and not final:
            return ""
        delta = after.removeprefix(before)
        self.read = len(self.ids)
        self.prefix = max(0, self.read - self.WINDOW)
        return delta


class StopMatcher:
    """Finds the earliest stop string in the output and holds back text that may still become one.
    The text ends just before the stop string, or with it when `include` is set (then nothing needs
    holding back: text that may begin a stop is released either way)."""

    def __init__(self, stops: list[str], include: bool = False):
        self.stops = stops
        self.include = include
        self.hold = 0 if include else max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.matched: str | None = None  # the stop string that ended the text

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, delta: str, final: bool = False, search: bool = True) -> str:
        """Adds text; returns what can be released now (all of it once final or stopped). A stop
        counts only if it ends in a delta fed with `search` (vLLM's min_tokens defers stop strings)."""
        if self.stopped:
            return ""
        old = len(self.text)
        self.text += delta
        if search and delta:
            # the stop that ends first wins, whatever the split of the text into deltas
            hits = [(i + len(s), i, s) for s in self.stops if (i := self.text.find(s, max(0, old - len(s) + 1))) >= 0]
            if hits:
                end, start, self.matched = min(hits)
                self.text = self.text[: end if self.include else start]
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out
