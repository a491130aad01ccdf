"""The staging ring (workers/staging.py) with host memory standing in for pinned memory and a fake
device clock: values come back as they went in, each launch takes the next part, a part is refilled
only after the device passed the launch that used it before, and values outside a launch or past a
part's end are staged one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.staging import ALIGN, Ring


class Clock:
    """Events that say when the device passed them: synchronize() counts the waits."""

    def __init__(self):
        self.waits = 0

    def event(self):
        clock = self

        class Event:
            def synchronize(self):
                clock.waits += 1

        return Event()


def ring(slots=3, slot_bytes=1024):
    clock = Clock()
    return Ring(slot_bytes=slot_bytes, slots=slots, pin=False, event=clock.event), clock


@pytest.mark.parametrize("values", [np.arange(7, dtype=np.int64), np.arange(5, dtype=np.int32).reshape(1, 5),
                                    np.array([True, False, True]), np.linspace(0, 1, 9, dtype=np.float32)],
                         ids=["int64", "int32-2d", "bool", "float32"])
def test_values_come_back_as_they_went_in(values):
    r, _ = ring()
    r.begin()
    r.host(np.zeros(3, dtype=np.int8))  # the next value starts on an aligned byte
    t = r.host(values)
    assert t.dtype == torch.from_numpy(values).dtype and t.shape == values.shape
    np.testing.assert_array_equal(t.numpy(), values)
    assert t.untyped_storage().data_ptr() == r.buf.untyped_storage().data_ptr()  # in the ring, not a copy
    assert (t.data_ptr() - r.buf.data_ptr()) % ALIGN == 0
    r.end()


def test_each_launch_takes_the_next_part_and_waits_for_the_one_that_used_it_before():
    r, clock = ring(slots=3)
    parts = []
    for step in range(5):
        r.begin()
        t = r.host(np.full(4, step, dtype=np.int64))
        parts.append((t.data_ptr() - r.buf.data_ptr()) // r.slot_bytes)
        r.end()
    assert parts == [0, 1, 2, 0, 1]
    assert clock.waits == 2  # steps 3 and 4 refilled parts whose earlier launches had recorded events
    # what a launch staged stays until its part comes round again
    r.begin()
    a = r.host(np.arange(4, dtype=np.int64))
    b = r.host(np.arange(4, 8, dtype=np.int64))
    r.end()
    np.testing.assert_array_equal(a.numpy(), [0, 1, 2, 3])
    np.testing.assert_array_equal(b.numpy(), [4, 5, 6, 7])


def test_outside_a_launch_and_past_a_parts_end_values_are_staged_alone():
    r, _ = ring(slot_bytes=128)
    outside = r.host(np.arange(3, dtype=np.int64))
    r.begin()
    inside = r.host(np.arange(8, dtype=np.int64))  # 64 bytes: fits
    past = r.host(np.arange(16, dtype=np.int64))  # 128 more: past the part's end
    r.end()
    for t in (outside, past):
        assert t.untyped_storage().data_ptr() != r.buf.untyped_storage().data_ptr()
    assert inside.untyped_storage().data_ptr() == r.buf.untyped_storage().data_ptr()
    np.testing.assert_array_equal(past.numpy(), np.arange(16))


def test_without_a_device_nothing_is_staged():
    r = Ring(pin=False)  # no events: a CPU process
    r.begin()
    t = r.host(np.arange(3))
    r.end()
    assert r.buf is None and t.tolist() == [0, 1, 2]
