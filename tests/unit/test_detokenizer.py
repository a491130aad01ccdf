"""Incremental detokenization with a byte-level BPE tokenizer built offline, and stop strings."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from toka.server.detokenizer import Detokenizer, StopMatcher
from toka.server.token_bytes import bytes_to_unicode


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE: ids 0..255 are the bytes, plus a few merges, some of them inside multi-byte
    characters so that a character's bytes are split over tokens in several ways."""
    B = bytes_to_unicode()
    vocab = {B[b]: b for b in range(256)}
    merges = []

    def merge(a: str, b: str) -> None:
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))

    sp = B[32]
    merge("h", "e"), merge("l", "l"), merge("he", "ll"), merge("hell", "o"), merge(sp, "w"), merge("o", "r")
    merge(sp + "w", "or"), merge(sp, "t"), merge("t", "h"), merge(sp + "t", "h")
    for ch in "中文好😀é":
        e = ch.encode()
        merge(B[e[0]], B[e[1]])  # first two bytes merged, the rest single bytes
    t = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|end|>", bos_token="<|begin|>")


TOK = build_tokenizer()

TEXTS = [
    "hello world",
    "hello world 中文 😀!",
    "中中中文文好好😀😀😀 éé the 🎉🎉 ünïcødé ∑∫ 𝔘𝔫𝔦",
    "the quick brown fox 🦊 jumps over the lazy dog 🐶 — «ÉTÉ» 你好，世界。",
    "😀",
    " ",
    "",
]


def stream(det: Detokenizer, ids: list[int], sizes) -> list[str]:
    """Feeds ids in chunks of the given sizes (cycled), the last with final=True; returns the deltas."""
    out, i, k = [], 0, 0
    while i < len(ids):
        n = sizes[k % len(sizes)]
        k += 1
        chunk = ids[i : i + n]
        i += n
        out.append(det.add(chunk, final=i >= len(ids)))
    if not ids:
        out.append(det.add([], final=True))
    return out


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("sizes", [[1], [2], [3, 1], [7], [1, 4, 2, 9]])
def test_deltas_concatenate_to_the_full_decode(text, sizes):
    ids = TOK(text).input_ids
    assert TOK.decode(ids) == text
    deltas = stream(Detokenizer(TOK), ids, sizes)
    assert "".join(deltas) == text
    # nothing released is ever taken back: no replacement characters, every prefix is a prefix
    acc = ""
    for d in deltas:
        assert "\ufffd" not in d
        acc += d
        assert text.startswith(acc)


def test_characters_split_over_byte_tokens_come_out_whole():
    ids = TOK("a😀b").input_ids
    assert len(ids) >= 4  # "a", the emoji in 3 tokens (2 merged bytes + 2 single), "b"
    det = Detokenizer(TOK)
    deltas = [det.add([i]) for i in ids]
    assert deltas[0] == "a"
    emoji_tokens = len(ids) - 2
    assert deltas[1:emoji_tokens] == [""] * (emoji_tokens - 1), "an incomplete character waits"
    assert deltas[emoji_tokens] == "😀"
    assert deltas[-1] == "b"


def test_window_start_inside_a_multibyte_character():
    # many 3- and 4-byte characters of single-byte tokens: the 6-token window starts mid-character
    text = "∑∫∂" * 5 + "𝔘𝔫𝔦" * 3 + " ok"
    ids = TOK(text).input_ids
    assert len(ids) > 3 * Detokenizer.WINDOW
    for sizes in ([1], [5], [2, 3]):
        assert "".join(stream(Detokenizer(TOK), ids, sizes)) == text


def test_final_flushes_an_incomplete_character():
    ids = TOK("ok ").input_ids + list("😀".encode()[:2])  # the emoji's first two bytes only
    det = Detokenizer(TOK)
    first = det.add(ids[:-1])
    held = det.add(ids[-1:])
    assert held == ""
    rest = det.add([], final=True)
    assert first + held + rest == TOK.decode(ids)
    assert rest.endswith("\ufffd")


def test_special_tokens_are_skipped():
    ids = TOK("hello").input_ids + [TOK.eos_token_id]
    det = Detokenizer(TOK)
    out = det.add(ids[:-1]) + det.add(ids[-1:], final=True)
    assert out == "hello"
    assert det.add([], final=True) == ""


def test_no_new_tokens_gives_no_text():
    det = Detokenizer(TOK)
    assert det.add([]) == ""
    assert det.add(TOK("the").input_ids) == "the"
    assert det.add([]) == ""


_ALPHABET = "ab \n,é中文😀🎉∑𝔘"


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=_ALPHABET, max_size=40), seed=st.integers(0, 10**6))
def test_random_texts_and_splits(text, seed):
    ids = TOK(text).input_ids
    rng = random.Random(seed)
    sizes = [rng.randint(1, 5) for _ in range(8)]
    assert "".join(stream(Detokenizer(TOK), ids, sizes)) == TOK.decode(ids) == text


# ---- StopMatcher -----------------------------------------------------------------------------------
def feed_all(m: StopMatcher, deltas: list[str]) -> list[str]:
    """Feeds deltas until the matcher stops (as the server does), then a final empty delta."""
    out = []
    for d in deltas:
        out.append(m.feed(d))
        if m.stopped:
            return out
    out.append(m.feed("", final=True))
    return out


def test_no_stop_strings_release_everything_at_once():
    m = StopMatcher([])
    assert m.feed("abc") == "abc"
    assert m.feed("def") == "def"
    assert m.feed("", final=True) == ""
    assert not m.stopped


def test_stop_string_spanning_deltas():
    m = StopMatcher(["STOP"])
    out = [m.feed("abc ST"), m.feed("O"), m.feed("P tail")]
    assert m.stopped
    assert "".join(out) == "abc "
    assert all("S" not in o for o in out)


def test_text_that_might_become_a_stop_is_held_back_then_released():
    m = StopMatcher(["END"])
    a = m.feed("hello EN")
    assert a == "hello " and not m.stopped  # "EN" may still become "END"
    b = m.feed("X more")
    assert (a + b).startswith("hello ENX")
    c = m.feed("", final=True)
    assert a + b + c == "hello ENX more"
    assert not m.stopped


def test_held_back_text_is_released_at_final():
    m = StopMatcher(["</answer>"])
    released = m.feed("the answer is 42 </ans")
    assert released == "the answer is "  # the last len("</answer>") - 1 = 8 characters are held
    assert released + m.feed("", final=True) == "the answer is 42 </ans"


def test_earliest_of_several_stops_wins():
    m = StopMatcher(["zzz", "b", "cd"])
    assert "".join(feed_all(m, ["a cd b zzz"])) == "a "
    m = StopMatcher(["zzz", "b", "cd"])
    assert "".join(feed_all(m, ["xx zz", "z yy b", " cd"])) == "xx "


def test_nothing_after_the_stop_is_released():
    m = StopMatcher(["\n\n"])
    out = m.feed("line one\n")
    out += m.feed("\nline two")
    assert m.stopped and out == "line one"
    # feeding on after the stop must release nothing more
    assert m.feed("more text") == ""
    assert m.feed("", final=True) == ""


def test_stop_at_the_very_start():
    m = StopMatcher(["Hi"])
    assert m.feed("Hi there") == ""
    assert m.stopped


def test_stop_result_does_not_depend_on_delta_boundaries():
    """How tokens are grouped into deltas depends on timing (a slow client gets several tokens per
    delta), so the released text must not. With stops ["abcd", "c"], "abcd" arriving whole is cut at
    "abcd" (the earliest start) but "abc" then "d" is cut at "c" (found first)."""
    whole = "".join(feed_all(StopMatcher(["abcd", "c"]), ["xabcd"]))
    split = "".join(feed_all(StopMatcher(["abcd", "c"]), ["xabc", "d"]))
    assert whole == split


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="abcd", max_size=30),
    stops=st.lists(st.text(alphabet="abcd", min_size=3, max_size=3), min_size=1, max_size=3),
    seed=st.integers(0, 10**6),
)
def test_random_stops_and_splits_match_a_whole_text_search(text, stops, seed):
    """Stops of equal length (so the earliest-starting is also the earliest-ending): the released text
    is everything before the first stop, or all of it, however the text is split."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    want = text[: min(hits)] if hits else text
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
    deltas = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    m = StopMatcher(stops)
    acc = ""
    for d in deltas:
        acc += m.feed(d)
        assert want.startswith(acc), "released text past a stop or out of order"
        if m.stopped:
            break
    if not m.stopped:
        acc += m.feed("", final=True)
    assert acc == want
    assert m.stopped == bool(hits)


# ---- vLLM's output options -------------------------------------------------------------------------
def test_special_tokens_are_kept_when_not_skipped():
    ids = TOK("hello").input_ids + [TOK.eos_token_id] + TOK(" world").input_ids
    for sizes in ([1], [2], [7]):
        assert "".join(stream(Detokenizer(TOK, skip_special_tokens=False), ids, sizes)) == "hello<|end|> world"
        assert "".join(stream(Detokenizer(TOK), ids, sizes)) == "hello world"


def test_the_stop_string_that_ended_the_text_is_named():
    m = StopMatcher(["zzz", "b", "cd"])
    assert "".join(feed_all(m, ["a c", "d b"])) == "a "
    assert m.stopped and m.matched == "cd"
    m = StopMatcher(["x"])
    feed_all(m, ["abc"])
    assert not m.stopped and m.matched is None


@pytest.mark.parametrize("deltas", [["abc ST", "O", "P tail"], ["abc STOP tail"], ["a", "b", "c", " ", "S", "TOP"]])
def test_included_stop_string_ends_the_text(deltas):
    m = StopMatcher(["STOP"], include=True)
    out = feed_all(m, deltas)
    assert "".join(out) == "abc STOP" and m.matched == "STOP"
    assert m.feed("more", final=True) == ""


def test_included_stop_holds_nothing_back():
    m = StopMatcher(["</answer>"], include=True)
    assert m.feed("the answer is 42 </ans") == "the answer is 42 </ans"
    assert m.feed("wer> and more") == "wer>"
    assert m.stopped


def test_included_stop_earliest_end_wins_whatever_the_split():
    for deltas in (["xabcd"], ["xabc", "d"], ["x", "a", "b", "c", "d"]):
        m = StopMatcher(["abcd", "c"], include=True)
        assert "".join(feed_all(m, deltas)) == "xabc" and m.matched == "c"


def test_text_fed_without_search_never_stops():
    """min_tokens: a stop string counts only where it ends in text searched for it."""
    m = StopMatcher(["ab", "x"])
    out = m.feed("xx ab", search=False)
    assert not m.stopped
    out += m.feed("a") + m.feed("b!")  # a stop ending in searched text is found, even if it began earlier
    assert m.stopped and m.matched == "ab" and out == "xx ab"
    m = StopMatcher(["ab"])
    out = m.feed("a", search=False) + m.feed("b", search=True)
    assert m.stopped and out == ""


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="abcd", max_size=30), stops=st.lists(st.text(alphabet="abcd", min_size=1, max_size=4),
       min_size=1, max_size=3), seed=st.integers(0, 10**6))
def test_random_included_stops_and_splits(text, stops, seed):
    """With include: the text up to the end of the earliest-ending stop, however it is split."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    want = text[: min(ends)] if ends else text
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
    m = StopMatcher(stops, include=True)
    got = "".join(feed_all(m, [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]))
    assert got == want and m.stopped == bool(ends)
    assert m.matched is None or want.endswith(m.matched)
