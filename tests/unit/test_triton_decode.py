"""The Triton decode kernel's work list, built on the host (the kernel itself: tests/gpu)."""

from __future__ import annotations

import numpy as np
import pytest

from workers.attention.triton_decode import CHUNK_PAGES, WorkList


def parts(host: np.ndarray, bound: int, rows: int) -> dict:
    """The host buffer's arrays by name."""
    at = 2 * bound
    count = int(host[at + rows + 1])
    return dict(item_row=host[:count].tolist(), item_chunk=host[bound : bound + count].tolist(),
                start=host[at : at + rows + 1].tolist(), count=count,
                indptr=host[at + rows + 2 : at + 2 * rows + 3].tolist(), lens=host[at + 2 * rows + 3 :].tolist())


def test_rows_split_into_chunks_of_pages_an_item_each():
    pages = np.array([1, 32, 33, 65])
    lens = np.array([3, 512, 520, 1030])
    bound = WorkList.bound_for(4, int(pages.sum()), chunk=32)
    assert bound == 4 + 131 // 32
    got = parts(WorkList.host(pages, lens, bound, chunk=32), bound, 4)
    assert got["count"] == 1 + 1 + 2 + 3
    assert got["item_row"] == [0, 1, 2, 2, 3, 3, 3]
    assert got["item_chunk"] == [0, 0, 0, 1, 0, 1, 2]
    assert got["start"] == [0, 1, 2, 4, 7]
    assert got["indptr"] == [0, 1, 33, 66, 131]
    assert got["lens"] == lens.tolist()


def test_the_bound_holds_any_split_of_its_pages_and_a_step_past_it_is_refused():
    rng = np.random.default_rng(0)
    for _ in range(100):
        rows = int(rng.integers(1, 50))
        pages = rng.integers(1, 200, rows)
        bound = WorkList.bound_for(rows, int(pages.sum()))
        assert parts(WorkList.host(pages, pages * 16, bound), bound, rows)["count"] <= bound
    none = np.array([], dtype=np.int64)  # a step of no decode rows
    assert parts(WorkList.host(none, none, 4), 4, 0)["count"] == 0
    with pytest.raises(ValueError, match="3 decode work items; the buffer holds 2"):
        WorkList.host(np.array([1, 1, 1]), np.array([1, 1, 1]), bound=2)


def test_a_steps_own_list_launches_an_item_a_program_and_a_graphs_a_row_a_program():
    c = CHUNK_PAGES
    own = WorkList.of(np.array([1, c + 8, 2, 3]), np.array([1, 16 * c + 118, 20, 40]), "cpu")
    assert own.programs == own.bound == 5 and own.split  # the long row takes two items: a merge
    assert not WorkList.of(np.array([1, c, 2]), np.array([1, 16 * c, 20]), "cpu").split  # every row one item
    graph = WorkList(16, WorkList.bound_for(16, 10_000), "cpu")
    assert graph.programs == 16 and graph.split  # the CPU counts as one SM: eight programs at least
    assert WorkList(1, 300, "cpu").programs == 8
    assert WorkList(1, 5, "cpu").programs == 5
