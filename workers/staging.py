"""Pinned host memory for the host-to-device copies a step's launch makes (its metadata, page lists,
work lists, planner inputs), allocated once per process.

torch's caching host allocator takes ~40-65 us a `pin_memory()` on an H200 host (tools/bench_step.py
--profile: 31 calls in 0.002 s over 10 decode steps, 81 in 0.003 s over 10 mixed ones), and a
Hydragen step makes ~17 such copies: ~1 ms of a host that paces those steps. Here the memory is a
ring of SLOTS parts. The runner brackets each launch with `begin()` and `end()`: a launch takes the
next part and fills it front to back, and a part is refilled only once the device has run the
copies of the launch that used it before (an event recorded at that launch's end; with the rank one
step ahead of the device, long done). Outside a launch, or past a part's end, values are pinned
one by one as before. Only host-to-device copies come from here: a device-to-host destination is
read on the host later, after other launches may have taken its part.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch

from toka.arith import cdiv

SLOT_BYTES = 4 << 20  # a launch's copies: ~0.6 MB for 8,192 tokens' metadata, ~0.2 MB a work list
SLOTS = 4
ALIGN = 64  # bytes: every part starts where any element type's view may


class Ring:
    def __init__(self, slot_bytes: int = SLOT_BYTES, slots: int = SLOTS, pin: bool | None = None,
                 event: Callable[[], object] | None = None):
        # pin: page-locked memory; event: makes a recorded event of the device's progress. By default
        # both where CUDA is, decided at the first launch (not at import: a process that forks ranks
        # must not have touched CUDA)
        self.pin, self.event = pin, event
        self.slot_bytes = slot_bytes
        self.buf: torch.Tensor | None = None  # allocated at the first launch
        self.events: list[object | None] = [None] * slots
        self.slot = -1
        self.used: int | None = None  # bytes taken of the launch's part; None outside a launch

    @staticmethod
    def _cuda_event():
        e = torch.cuda.Event()
        e.record()
        return e

    def begin(self) -> None:
        if self.pin is None:
            self.pin = torch.cuda.is_available()
            self.event = self.event or (self._cuda_event if self.pin else None)
        if self.event is None:  # nothing to stage for: values stay where they are
            return
        if self.buf is None:
            self.buf = torch.empty(len(self.events), self.slot_bytes, dtype=torch.uint8, pin_memory=self.pin)
        self.slot = (self.slot + 1) % len(self.events)
        previous = self.events[self.slot]
        if previous is not None:
            previous.synchronize()
        self.used = 0

    def end(self) -> None:
        if self.used is not None:
            self.events[self.slot] = self.event()
        self.used = None

    def host(self, values: np.ndarray) -> torch.Tensor:
        """`values` (numpy, any shape) as a host tensor of their type, pinned where the ring pins."""
        a = np.ascontiguousarray(values)
        n = a.nbytes
        if self.used is None or self.used + n > self.slot_bytes:
            t = torch.from_numpy(a if a.flags.writeable else a.copy())
            return t if self.pin is False else t.pin_memory()  # only CUDA paths stage: unset means CUDA
        start = self.used
        self.used = cdiv(start + n, ALIGN) * ALIGN
        t = self.buf[self.slot, start : start + n].view(_torch_dtype(a.dtype)).view(a.shape)
        np.copyto(t.numpy(), a)
        return t


RING = Ring()  # the process's: a rank drives one device


@functools.cache
def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


@functools.cache
def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host values (list or numpy) as a tensor of `dtype` on `device`: on CUDA one asynchronous copy
    from pinned memory."""
    a = np.asarray(values, dtype=_numpy_dtype(dtype))
    if device.type != "cuda":
        return torch.from_numpy(a)
    return RING.host(a).to(device, non_blocking=True)
