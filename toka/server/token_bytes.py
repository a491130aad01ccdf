"""The exact bytes of a vocabulary token, for chat logprobs' `bytes`.

Decoding one token is wrong for this: a byte-level BPE token holding part of a UTF-8 character
decodes to U+FFFD. The bytes come from the token's vocabulary form instead, read the way the
tokenizer's own decoder reads it: byte-level BPE (GPT-2's byte-to-unicode alphabet: Llama 3, Qwen,
SmolLM2) or SentencePiece (▁ for a space, `<0xNN>` byte-fallback tokens: Llama 2, Mistral).
"""

from __future__ import annotations

import json
import re

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet the ByteLevel pre-tokenizer emits:
    printable Latin-1 bytes stand for themselves, the other 68 map to U+0100 onwards in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table = {b: chr(b) for b in printable}
    for i, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + i)
    return table


_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}


def _decoder_kinds(tokenizer) -> set[str]:
    """The component types of a fast tokenizer's decoder (a Sequence lists its parts)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return set()
    kinds, todo = set(), [json.loads(backend.to_str()).get("decoder")]
    while todo:
        d = todo.pop()
        if isinstance(d, dict):
            kinds.add(d.get("type"))
            todo.extend(d.get("decoders") or [])
    return kinds


class TokenBytes:
    """Token id -> its bytes, computed on first use and cached (the vocabulary does not change)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        kinds = _decoder_kinds(tokenizer)
        if "ByteLevel" in kinds:
            self.scheme = "byte-level"
        elif kinds & {"Metaspace", "ByteFallback"} or hasattr(tokenizer, "sp_model"):
            self.scheme = "sentencepiece"
        else:  # a tokenizer of neither kind: what decoding the token alone gives
            self.scheme = "text"
        # added tokens (<|im_end|>, ...) are stored as their text, never in the byte alphabet
        self.added = set(getattr(tokenizer, "added_tokens_decoder", {}))
        self.cache: dict[int, bytes] = {}

    def __call__(self, token: int) -> list[int]:
        b = self.cache.get(token)
        if b is None:
            b = self.cache[token] = self._bytes(token)
        return list(b)

    def _bytes(self, token: int) -> bytes:
        if self.scheme == "text":
            return self.tokenizer.decode([token]).encode()
        form = self.tokenizer.convert_ids_to_tokens(token)
        if token in self.added:
            return form.encode()
        if self.scheme == "byte-level":
            return bytes(_BYTE_OF_CHAR[c] for c in form) if all(c in _BYTE_OF_CHAR for c in form) else form.encode()
        byte = _BYTE_FALLBACK.fullmatch(form)
        return bytes([int(byte[1], 16)]) if byte else form.replace("▁", " ").encode()
