"""The staging ring on CUDA: a part is refilled only after the device ran the copies from it, so
values staged launch after launch arrive intact even when the device lags many launches behind
(CUDA only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.staging import Ring

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_values_arrive_intact_while_the_device_lags_behind_the_ring():
    ring = Ring(slot_bytes=1 << 16, slots=2)
    arrived = []
    for step in range(8):
        ring.begin()
        torch.cuda._sleep(2_000_000)  # ~1 ms of device work before this launch's copy
        host = ring.host(np.full(4096, step, dtype=np.int64))
        assert host.is_pinned()
        arrived.append(host.to("cuda", non_blocking=True))
        ring.end()
    torch.cuda.synchronize()
    assert [int(t.min()) for t in arrived] == list(range(8)) == [int(t.max()) for t in arrived]
