"""Every message that crosses a socket: msgspec structs of ids and lists, never tensors or pickles.

Sockets and the union each carries (one typed decoder per socket, see `decoder`):
  requests  server  --PUSH-->  scheduler          Submit | Abort | Drain
  plans     scheduler --PUB--> every rank         StepPlan | Stop
  events    rank 0  --PUB-->   scheduler, server  StepResult
  status    scheduler --PUSH-> server             Stats
  control   every child --PUSH-> launcher         Ready | Fatal
  link      node r --DEALER--> node 0 (ROUTER)    Join | Heartbeat | Ready | Fatal (its ranks')
            node 0 --ROUTER--> node r             Welcome | Refuse | Heartbeat | StopReplica | Shutdown

With --nnodes, the sockets of a rank on another node than its scheduler are tcp (see toka/cluster.py).
"""

from __future__ import annotations

import msgspec
from msgspec import Struct


class SamplingParams(Struct, array_like=True, omit_defaults=True):
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    seed: int = 0
    logprobs: int = -1  # -1: none; k >= 0: the chosen token's logprob and k alternatives
    prompt_logprobs: int = -1  # same, for every prompt token after the first
    stop_token_ids: list[int] = []  # EOS ids and the request's own; empty with ignore_eos
    # vLLM's meanings; the defaults change nothing, and a batch whose rows all keep them pays nothing
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # over prompt and output tokens: positive logits / p, negative * p
    frequency_penalty: float = 0.0  # OpenAI's, over output tokens: logit -= f * count
    presence_penalty: float = 0.0  # OpenAI's, over output tokens: logit -= p if the token occurred
    min_tokens: int = 0  # stop_token_ids cannot be sampled before this many output tokens
    logit_bias: dict[int, float] = {}  # token id -> added to its logit, in [-100, 100]

    @property
    def penalized(self) -> bool:
        """Whether sampling needs the sequence's token counts."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def accept(self, token: int, num_generated: int) -> tuple[bool, str | None]:
        """Decides, for the token sampled after `num_generated` earlier ones, whether it belongs to the
        output and whether the sequence ends. Scheduler and server both call this, so they agree on
        every sequence's end without telling each other."""
        if num_generated >= self.max_tokens:  # max_tokens == 0: a prompt-only (echo) request
            return False, "length"
        if token in self.stop_token_ids and num_generated >= self.min_tokens:  # the rank masks them before
            return False, "stop"
        if num_generated + 1 >= self.max_tokens:
            return True, "length"
        return True, None

    def for_choice(self, i: int) -> "SamplingParams":
        """Choice i of a request's n: seed + i, so that the choices differ (and stay reproducible)."""
        return self if i == 0 else msgspec.structs.replace(self, seed=self.seed + i)


# ---- requests socket ----------------------------------------------------------------------------
class Submit(Struct, tag="submit", array_like=True):
    """The n choices of one prompt: sequences rid .. rid + n - 1, choice i sampled with
    params.for_choice(i). One message, one prompt in memory, however large n is."""

    rid: int
    prompt: list[int]
    params: SamplingParams
    n: int = 1


class Abort(Struct, tag="abort", array_like=True):
    rid: int


class Drain(Struct, tag="drain", array_like=True):
    """Finish what is running, then stop the ranks and exit."""


# ---- plans socket -------------------------------------------------------------------------------
class SeqParams(Struct, array_like=True, omit_defaults=True, kw_only=True):
    """Sampling settings a rank keeps per slot, sent once when a sequence takes the slot (again
    after a preemption). The token lists travel only for the requests that need them."""

    slot: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    logprobs: int = -1
    prompt_logprobs: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = {}
    min_tokens: int = 0
    stop_token_ids: list[int] = []  # masked until min_tokens output tokens (sent only with min_tokens)
    prompt_len: int = 0  # output tokens are those at positions >= prompt_len
    # with a penalty: the sequence's known tokens (prompt, then what it generated before a preemption)
    history: list[int] = []


class StepPlan(Struct, tag="plan", array_like=True):
    """One forward pass. Rows [0, num_prefill) are prefill chunks whose tokens are given; the other
    rows decode one token each, reading their input token from the rank's `slot -> last token` table.

    Per row: rid, slot, q_len (tokens computed now), kv_len (cached tokens after this step, so the
    row's positions are kv_len - q_len .. kv_len - 1) and emit (sample a token after the last one).
    Pages: each rank keeps a page table, slot -> its sequence's pages in order; before the step,
    entry table_cols[i] of slot table_slots[i] becomes page table_pages[i]. A row reads the first
    ceil(kv_len / page_size) entries of its slot's table. Only new pages travel, so a plan's size
    grows with its rows, not with their contexts.
    """

    step_id: int
    rids: list[int]
    slots: list[int]
    q_lens: list[int]
    kv_lens: list[int]
    emit: list[bool]
    num_prefill: int
    prefill_tokens: list[int]
    table_slots: list[int]
    table_cols: list[int]
    table_pages: list[int]
    admit: list[SeqParams] = []
    # per prefill row that wants prompt logprobs: the token following its chunk (-1: none)
    prefill_next: list[int] = []
    # Hydragen: the first decode rows form groups of group_rows[g] consecutive rows whose first
    # group_pages[g] pages are the same (cached, read-only) pages
    group_rows: list[int] = []
    group_pages: list[int] = []
    # requests admitted for the first time whose prompt starts with cached_tokens[i] cached tokens;
    # rank 0 passes them on in its StepResult, for the server's usage
    cached_rids: list[int] = []
    cached_tokens: list[int] = []
    # under pipeline parallelism: the latest step whose sampled tokens the decode rows read, which the
    # first stage must have received from the last before it embeds them (-1: none)
    input_step: int = -1
    # before the step, every layer's page copy_dst[i] becomes a copy of page copy_src[i]: a sequence
    # whose whole prompt is cached pages takes the last one as its own copy (it recomputes only its
    # last token there, for the logits), not recomputing the page's tokens
    copy_src: list[int] = []
    copy_dst: list[int] = []


class Stop(Struct, tag="stop", array_like=True):
    step_id: int


# ---- events socket ------------------------------------------------------------------------------
class TopLogprobs(Struct, array_like=True):
    ids: list[int]
    logprobs: list[float]


class PromptLogprobs(Struct, array_like=True):
    """Logprobs of prompt tokens start .. start + len(logprobs) - 1 of request rid."""

    rid: int
    start: int
    logprobs: list[float]
    top: list[TopLogprobs]
    ranks: list[int] = []  # each prompt token's rank in its distribution (1: the most likely)


class StepResult(Struct, tag="result", array_like=True):
    """The tokens a step sampled, one entry per emitting row, in row order. `top` holds entries only
    for rows whose request asked for alternatives (`top_rows` gives their index into rids)."""

    step_id: int
    rids: list[int]
    tokens: list[int]
    logprobs: list[float]
    top_rows: list[int] = []
    top: list[TopLogprobs] = []
    prompt: list[PromptLogprobs] = []
    cached_rids: list[int] = []  # the plan's, passed on
    cached_tokens: list[int] = []


# ---- status and control -------------------------------------------------------------------------
class Stats(Struct, tag="stats", array_like=True):
    running: int
    waiting: int
    free_pages: int
    total_pages: int
    tokens_generated: int
    finished: dict[str, int]
    preemptions: int
    steps: int
    cached_pages: int = 0  # pages held by no sequence but kept for their prefix
    prefix_hit_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    grouped_rows: int = 0  # decode rows that ran in Hydragen groups


class Ready(Struct, tag="ready", array_like=True):
    name: str
    info: dict[str, int] = {}
    # a rank on another node than its scheduler: the tcp endpoints it bound ("plans", "events")
    endpoints: dict[str, str] = {}


class Fatal(Struct, tag="fatal", array_like=True):
    name: str
    message: str


# ---- link between nodes ------------------------------------------------------------------------
class Join(Struct, tag="join", array_like=True):
    """A node's first message: its rank, address and the flags that must agree on every node."""

    node: int
    address: str
    flags: dict[str, str]


class Welcome(Struct, tag="welcome", array_like=True):
    """Node 0 counts the node in: it starts its ranks."""


class Refuse(Struct, tag="refuse", array_like=True):
    reason: str


class Heartbeat(Struct, tag="heartbeat", array_like=True):
    """Sent both ways every fabric heartbeat interval; a side silent for longer than the timeout is gone."""

    node: int


class StopReplica(Struct, tag="stop_replica", array_like=True):
    """Replica `replica` is out of service: its processes on the receiving node stop."""

    replica: int


class Shutdown(Struct, tag="shutdown", array_like=True):
    """The engine ends: the receiving node stops its processes and exits with `code`."""

    code: int


RequestMsg = Submit | Abort | Drain
PlanMsg = StepPlan | Stop
EventMsg = StepResult
StatusMsg = Stats
ControlMsg = Ready | Fatal
NodeMsg = Join | Heartbeat | Ready | Fatal
LeaderMsg = Welcome | Refuse | Heartbeat | StopReplica | Shutdown

_encoder = msgspec.msgpack.Encoder()


def encode(msg: Struct) -> bytes:
    return _encoder.encode(msg)


def decoder(kind) -> msgspec.msgpack.Decoder:
    """The typed decoder for one socket's union: anything else on it fails to decode."""
    return msgspec.msgpack.Decoder(kind)
