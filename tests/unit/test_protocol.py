"""Wire messages: msgpack round trips through each socket's typed decoder, and SamplingParams.accept."""

import msgspec
import pytest

from toka import protocol as P
from toka.protocol import SamplingParams

PARAMS_FULL = SamplingParams(max_tokens=17, temperature=0.3, top_p=0.8, top_k=40, seed=2**40 + 3, logprobs=5,
                             prompt_logprobs=2, stop_token_ids=[2, 99])

REQUESTS = [
    P.Submit(rid=1, prompt=[5, 6, 7], params=PARAMS_FULL),
    P.Submit(rid=2**50, prompt=[0], params=SamplingParams(max_tokens=0)),
    P.Submit(rid=3, prompt=[4, 4], params=PARAMS_FULL, n=1024),
    P.Abort(rid=12),
    P.Drain(),
]
PLANS = [
    P.StepPlan(step_id=3, rids=[1, 2], slots=[0, 5], q_lens=[4, 1], kv_lens=[4, 9], emit=[True, True], num_prefill=1,
               prefill_tokens=[10, 11, 12, 13], table_slots=[0, 5], table_cols=[0, 2], table_pages=[7, 3],
               admit=[P.SeqParams(slot=0, temperature=0.0, top_p=1.0, top_k=0, seed=9, logprobs=-1, prompt_logprobs=3)],
               prefill_next=[-1]),
    P.StepPlan(step_id=0, rids=[], slots=[], q_lens=[], kv_lens=[], emit=[], num_prefill=0, prefill_tokens=[],
               table_slots=[], table_cols=[], table_pages=[]),
    P.Stop(step_id=44),
]
EVENTS = [
    P.StepResult(step_id=3, rids=[1, 2], tokens=[8, 9], logprobs=[-0.25, -9999.0], top_rows=[1],
                 top=[P.TopLogprobs(ids=[9, 3], logprobs=[-0.5, -1.5])],
                 prompt=[P.PromptLogprobs(rid=1, start=1, logprobs=[-1.0, -2.0, -3.0],
                                          top=[P.TopLogprobs([1], [-0.1])] * 3)]),
    P.StepResult(step_id=4, rids=[], tokens=[], logprobs=[]),
]
STATUS = [P.Stats(running=2, waiting=1, free_pages=10, total_pages=64, tokens_generated=1234,
                  finished={"stop": 3, "length": 4}, preemptions=1, steps=99)]
CONTROL = [P.Ready("rank0", {"num_pages": 100, "vocab": 32000}), P.Ready("server"), P.Fatal("rank1", "CUDA OOM: ünïcødé")]

SOCKETS = [(P.RequestMsg, REQUESTS), (P.PlanMsg, PLANS), (P.EventMsg, EVENTS), (P.StatusMsg, STATUS),
           (P.ControlMsg, CONTROL)]


@pytest.mark.parametrize("union,messages", SOCKETS, ids=["requests", "plans", "events", "status", "control"])
def test_every_message_round_trips_through_its_socket_decoder(union, messages):
    dec = P.decoder(union)
    for msg in messages:
        data = P.encode(msg)
        assert isinstance(data, bytes)
        back = dec.decode(data)
        assert type(back) is type(msg)
        assert back == msg


def test_round_trip_keeps_non_default_and_default_fields():
    back = P.decoder(P.RequestMsg).decode(P.encode(REQUESTS[0]))
    assert back.params.stop_token_ids == [2, 99] and back.params.seed == 2**40 + 3
    assert back.params.temperature == pytest.approx(0.3) and back.params.logprobs == 5
    back = P.decoder(P.RequestMsg).decode(P.encode(REQUESTS[1]))
    assert back.params == SamplingParams(max_tokens=0)
    assert (back.params.temperature, back.params.top_p, back.params.top_k, back.params.logprobs) == (1.0, 1.0, 0, -1)
    assert back.params.stop_token_ids == []


def test_decoded_defaults_are_not_shared_between_messages():
    dec = P.decoder(P.RequestMsg)
    a = dec.decode(P.encode(P.Submit(1, [1], SamplingParams(max_tokens=1))))
    b = dec.decode(P.encode(P.Submit(2, [2], SamplingParams(max_tokens=1))))
    a.params.stop_token_ids.append(5)
    assert b.params.stop_token_ids == []


@pytest.mark.parametrize("union,messages", SOCKETS, ids=["requests", "plans", "events", "status", "control"])
def test_another_sockets_message_fails_to_decode(union, messages):
    dec = P.decoder(union)
    for other_union, others in SOCKETS:
        if other_union is union:
            continue
        for msg in others:
            with pytest.raises(msgspec.ValidationError):
                dec.decode(P.encode(msg))


def test_garbage_fails_to_decode():
    with pytest.raises(msgspec.DecodeError):
        P.decoder(P.PlanMsg).decode(b"\xc1\xc1")
    with pytest.raises(msgspec.ValidationError):  # right tag, wrong field type
        P.decoder(P.RequestMsg).decode(msgspec.msgpack.encode(["abort", "not-an-int"]))
    with pytest.raises(msgspec.ValidationError):  # unknown tag
        P.decoder(P.RequestMsg).decode(msgspec.msgpack.encode(["nope", 1]))


# ---- SamplingParams.accept -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "max_tokens,stops,token,num_generated,expected",
    [
        # prompt-only: whatever is sampled after the prompt is dropped and the sequence ends
        (0, [], 5, 0, (False, "length")),
        (0, [5], 5, 0, (False, "length")),
        # a stop token ends the sequence and is not part of the output
        (10, [2, 5], 5, 0, (False, "stop")),
        (10, [2, 5], 2, 8, (False, "stop")),
        (10, [2, 5], 2, 9, (False, "stop")),  # the last allowed token being a stop token: stop wins
        (1, [2], 2, 0, (False, "stop")),
        # ordinary tokens
        (10, [2, 5], 3, 0, (True, None)),
        (10, [2, 5], 3, 8, (True, None)),
        (10, [], 3, 8, (True, None)),
        # the max_tokens-th token is kept and ends the sequence
        (10, [2, 5], 3, 9, (True, "length")),
        (1, [], 7, 0, (True, "length")),
        (1, [2], 7, 0, (True, "length")),
        # tokens past the limit (steps that ran ahead) are dropped
        (3, [], 7, 3, (False, "length")),
        (3, [], 7, 4, (False, "length")),
    ],
)
def test_accept_table(max_tokens, stops, token, num_generated, expected):
    p = SamplingParams(max_tokens=max_tokens, stop_token_ids=stops)
    assert p.accept(token, num_generated) == expected


@pytest.mark.parametrize("max_tokens", [0, 1, 2, 5])
def test_accept_gives_exactly_max_tokens_without_stops(max_tokens):
    p = SamplingParams(max_tokens=max_tokens)
    out, reason = [], None
    while reason is None:
        keep, reason = p.accept(1, len(out))
        if keep:
            out.append(1)
    assert len(out) == max_tokens and reason == "length"


def test_stop_token_ids_default_is_empty_and_not_shared():
    a, b = SamplingParams(max_tokens=1), SamplingParams(max_tokens=1)
    a.stop_token_ids.append(3)
    assert b.stop_token_ids == []
    assert b.accept(3, 0) == (True, "length")
