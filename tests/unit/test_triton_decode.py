"""The Triton decode kernel's work list, built on the host (the kernel itself: tests/gpu)."""

from __future__ import annotations

import numpy as np
import pytest

from workers.attention.triton_decode import WorkList


def test_rows_split_into_chunks_of_pages_an_item_each():
    pages = np.array([1, 32, 33, 65])
    lens = np.array([3, 512, 520, 1030])
    bound = WorkList.bound_for(4, int(pages.sum()), chunk=32)
    host = WorkList.host(pages, lens, bound, chunk=32)
    assert bound == 4 + 131 // 32
    rows = 4
    item_row, item_chunk = host[:bound], host[bound : 2 * bound]
    start = host[2 * bound : 2 * bound + rows + 1]
    count = host[2 * bound + rows + 1]
    indptr = host[2 * bound + rows + 2 : 2 * bound + 2 * rows + 3]
    assert count == 1 + 1 + 2 + 3
    assert item_row[:count].tolist() == [0, 1, 2, 2, 3, 3, 3]
    assert item_chunk[:count].tolist() == [0, 0, 0, 1, 0, 1, 2]
    assert start.tolist() == [0, 1, 2, 4, 7]
    assert indptr.tolist() == [0, 1, 33, 66, 131]
    assert host[2 * bound + 2 * rows + 3 :].tolist() == lens.tolist()


def test_the_bound_holds_any_split_of_its_pages_and_a_step_past_it_is_refused():
    rng = np.random.default_rng(0)
    for _ in range(100):
        rows = int(rng.integers(1, 50))
        pages = rng.integers(1, 200, rows)
        bound = WorkList.bound_for(rows, int(pages.sum()))
        host = WorkList.host(pages, pages * 16, bound)
        assert host[2 * bound + rows + 1] <= bound
    with pytest.raises(ValueError, match="3 decode work items; the buffer holds 2"):
        WorkList.host(np.array([1, 1, 1]), np.array([1, 1, 1]), bound=2)


def test_a_steps_own_list_launches_an_item_a_program_and_a_graphs_a_row_a_program():
    assert WorkList(4, 9, "cpu", own=True).programs == 9
    assert not WorkList(4, 4, "cpu", own=True).split  # every row one item: no merge
    graph = WorkList(16, WorkList.bound_for(16, 10_000), "cpu")
    assert graph.programs == 16 and graph.split  # the CPU counts as one SM: eight programs at least
    assert WorkList(1, 300, "cpu").programs == 8
    assert WorkList(1, 5, "cpu").programs == 5
