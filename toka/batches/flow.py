"""How much of the engine batches take: every slot, and a few sequences waiting beyond them.

The scheduler admits in arrival order, so a live request waits behind every sequence that waits
ahead of it. Batch lines therefore never fill the waiting queue: they keep each replica's max_seqs
slots busy plus `headroom` sequences waiting, enough that a slot that frees finds a line ready
(the runner tops up as each line ends), and no more, so that a live request queues behind at most
that many batch sequences.
"""

from __future__ import annotations

MIN_HEADROOM = 8


def headroom(max_seqs: int) -> int:
    """Batch sequences allowed to wait on one replica."""
    return max(MIN_HEADROOM, max_seqs // 16)


def window(max_seqs: int, replicas: int) -> int:
    """Batch sequences in the engine at most: every slot of every replica, and each one's headroom."""
    return (max_seqs + headroom(max_seqs)) * replicas
