"""Pipeline parallelism's traffic inside one replica, by torch.distributed point-to-point (NCCL on
CUDA, gloo on the CPU). Stage s's rank of tensor-parallel index r sends each step's output to stage
s + 1's rank r; the last stage's rank r sends the step's sampled tokens back to the first stage's
rank r, which keeps every slot's last token because it embeds the next decode input.

Every stage runs the same plans in the same order, so both ends of a message know its shape from
the plan and only tensors travel. Each direction of each link is a process group of its own: NCCL
runs one group's operations in order, and a stage's output waiting for its receiver must not hold
up the tokens coming back the other way.

Ranks of a replica are numbered stage * tp + tp_rank (their GPUs in the same order).
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from workers.layers.parallel import PipelineStage


def tp_group(stage: PipelineStage, tp: int):
    """The process group of this stage's tensor-parallel ranks (None: the default group, when the
    stage is the whole replica). Every rank creates every stage's group, in stage order."""
    if stage.count == 1 or tp == 1:
        return None
    groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(stage.count)]
    return groups[stage.index]


class Pipe:
    """This rank's links to its neighbouring stages: `next` and `prev` carry stage outputs,
    `to_first` (last stage) and `from_last` (first stage) the sampled tokens; each is (peer rank,
    process group), None where the stage has no such neighbour. Sends never block: the tensors stay
    referenced here until their operation completes. A receive completes before the caller's next
    use of its tensor (on CUDA, through the current stream)."""

    def __init__(self, stage: PipelineStage, next=None, prev=None, to_first=None, from_last=None):
        self.stage = stage
        self.next, self.prev, self.to_first, self.from_last = next, prev, to_first, from_last
        self.sends: deque = deque()  # (work, tensor) of sends not known to be complete
        self.expected: deque[tuple[int, torch.Tensor]] = deque()  # first stage: (step, emitting slots)

    @classmethod
    def connect(cls, stage: PipelineStage, tp_rank: int, tp: int) -> "Pipe":
        count, s, r = stage.count, stage.index, tp_rank
        # every rank creates every link's group, in one order (torch.distributed's rule)
        forward = [[dist.new_group([i * tp + q, (i + 1) * tp + q]) for q in range(tp)] for i in range(count - 1)]
        back = [dist.new_group([(count - 1) * tp + q, q]) for q in range(tp)]
        return cls(stage,
                   next=((s + 1) * tp + r, forward[s][r]) if not stage.last else None,
                   prev=((s - 1) * tp + r, forward[s - 1][r]) if not stage.first else None,
                   to_first=(r, back[r]) if stage.last else None,
                   from_last=((count - 1) * tp + r, back[r]) if stage.first else None)

    def _send(self, tensor: torch.Tensor, link) -> None:
        while self.sends and self.sends[0][0].is_completed():
            self.sends.popleft()
        self.sends.append((dist.isend(tensor, link[0], group=link[1]), tensor))

    def _recv(self, tensor: torch.Tensor, link) -> None:
        dist.irecv(tensor, link[0], group=link[1]).wait()

    # ---- stage outputs -------------------------------------------------------------------------
    def send_hidden(self, hidden: torch.Tensor) -> None:
        self._send(hidden.contiguous(), self.next)

    def recv_hidden(self, out: torch.Tensor) -> None:
        """Fills `out` [tokens, hidden] (contiguous) with the previous stage's output of this step."""
        self._recv(out, self.prev)

    # ---- sampled tokens, last stage -> first -----------------------------------------------------
    def send_tokens(self, tokens: torch.Tensor) -> None:
        """Last stage: the tokens of a step's emitting rows (int64, in row order)."""
        self._send(tokens, self.to_first)

    def expect_tokens(self, step: int, slots: torch.Tensor) -> None:
        """First stage: step `step`'s emitting rows have these slots (a device tensor); their tokens
        arrive later, in step order."""
        self.expected.append((step, slots))

    def take_tokens(self, until: int, last_token: torch.Tensor) -> None:
        """First stage: writes the tokens of every expected step up to `until` into `last_token`
        [slots], waiting for those not here yet."""
        while self.expected and self.expected[0][0] <= until:
            _, slots = self.expected.popleft()
            tokens = torch.empty(len(slots), dtype=torch.int64, device=last_token.device)
            self._recv(tokens, self.from_last)
            last_token[slots] = tokens

    def close(self, last_token: torch.Tensor) -> None:
        """At the last step: takes the tokens still on their way and waits for every send, so that no
        stage is left with an operation its peer never matches."""
        self.take_tokens(float("inf"), last_token)
        while self.sends:
            self.sends.popleft()[0].wait()
