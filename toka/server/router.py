"""Which data-parallel replica serves a request: a pure function of the request's first page keys,
the replicas' loads and which of them live, plus a bounded memory of where prefixes went.

Prefix affinity first: a prompt whose leading pages went to a replica recently (so that replica's
prefix cache probably holds them) goes there again, unless that replica is far more loaded than
the least loaded one; otherwise the least loaded. A request's n choices share one prompt, so they
always travel together (the caller routes the request, not its choices).
"""

from __future__ import annotations

from collections import OrderedDict

from toka.scheduler.pages import page_keys

# The leading pages hashed for affinity: enough for system prompts and few-shot prefixes, bounded
# so that routing a long prompt costs microseconds.
AFFINITY_PAGES = 64
# Affinity yields to balance when the replica it picks carries more than this many times the least
# loaded replica's tokens plus the prompt tokens its cache would save: a short shared prefix (a
# system prompt) does not pile every request onto one replica.
IMBALANCE = 1.5


class Router:
    def __init__(self, replicas: int, page_size: int, memory: int = 1 << 16):
        self.replicas, self.page_size, self.memory = replicas, page_size, memory
        self.owner: OrderedDict[bytes, int] = OrderedDict()  # page key -> the replica it last went to

    def choose(self, prompt: list[int], loads: list[float], live: list[bool]) -> int:
        """The replica for `prompt` among the live ones (at least one); loads: tokens each carries."""
        candidates = [r for r in range(self.replicas) if live[r]]
        least = min(candidates, key=lambda r: loads[r])
        keys = page_keys(prompt[: AFFINITY_PAGES * self.page_size], self.page_size)
        pick = least
        for depth in range(len(keys) - 1, -1, -1):  # the longest shared prefix first
            owner = self.owner.get(keys[depth])
            if owner is not None and live[owner]:
                if loads[owner] <= IMBALANCE * loads[least] + (depth + 1) * self.page_size:
                    pick = owner
                break
        for key in keys:
            self.owner[key] = pick
            self.owner.move_to_end(key)
        while len(self.owner) > self.memory:
            self.owner.popitem(last=False)
        return pick

    def forget(self, replica: int) -> None:
        """A replica died: nothing routes to it by affinity again."""
        for key in [k for k, r in self.owner.items() if r == replica]:
            del self.owner[key]
