"""TokenBytes: a token's exact bytes from its vocabulary form, for byte-level BPE and SentencePiece
vocabularies, where decoding a token alone gives U+FFFD for part of a UTF-8 character."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from toka.server.token_bytes import TokenBytes
from tools.make_model import build_tokenizer

TEXT = "héllo wörld € 中"


def sentencepiece_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style vocabulary: ▁ marks a space, 256 <0xNN> byte-fallback tokens, a few pieces."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", "h", "l", "o", "w", "r", "d", "▁h", "ll", "llo", "▁w", "▁€"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "h"), ("l", "l"), ("ll", "o"), ("▁", "w")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_byte_level_tokens_are_their_bytes():
    tokenizer = build_tokenizer(600)
    token_bytes = TokenBytes(tokenizer)
    assert token_bytes.scheme == "byte-level"
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    pieces = [token_bytes(t) for t in ids]
    assert bytes(b for p in pieces for b in p) == TEXT.encode()
    assert [0xC3] in pieces and tokenizer.decode([0xC3]) == "\ufffd"  # "é" split in two tokens
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert token_bytes(eos) == list(b"<|im_end|>")  # an added token is its text
    assert token_bytes(0xC3) is not token_bytes(0xC3) and 0xC3 in token_bytes.cache  # cached, handed out as copies


def test_sentencepiece_tokens_are_their_bytes():
    tokenizer = sentencepiece_tokenizer()
    token_bytes = TokenBytes(tokenizer)
    assert token_bytes.scheme == "sentencepiece"
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    assert "<0xC3>" in tokenizer.convert_ids_to_tokens(ids)  # "é" by byte fallback
    assert bytes(b for t in ids for b in token_bytes(t)) == b" " + TEXT.encode()  # the ▁ prepended to the text
    assert token_bytes(tokenizer.convert_tokens_to_ids("▁€")) == list(" €".encode())
    assert token_bytes(tokenizer.convert_tokens_to_ids("<0xE4>")) == [0xE4]
    assert token_bytes(tokenizer.convert_tokens_to_ids("</s>")) == list(b"</s>")
