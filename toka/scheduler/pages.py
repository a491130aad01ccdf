"""The KV-cache page allocator: CPU-side bookkeeping of which pages of the ranks' caches are free.

Pages are integers in [0, num_pages); the ranks' caches are indexed by them. Pages a finished or
preempted sequence held may still be written by steps in flight, so they are released with the id
of the last step that uses them and return to the free pool only once that step's result arrived.
"""

from __future__ import annotations


class OutOfPages(Exception):
    pass


class PageAllocator:
    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out low pages first
        self._used: set[int] = set()
        self._pending: list[tuple[int, list[int]]] = []  # (last step using them, pages)
        self._done = -1  # the last step known complete

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_pending(self) -> int:
        return sum(len(p) for _, p in self._pending)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"{n} pages asked, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        self._used.update(pages)
        return pages

    def release(self, pages: list[int], after_step: int) -> None:
        """Frees `pages` once step `after_step` has completed (see `completed`)."""
        if not pages:
            return
        if len(set(pages)) != len(pages):
            raise ValueError("releasing a page twice")
        missing = [p for p in pages if p not in self._used]
        if missing:
            raise ValueError(f"releasing pages that are not allocated: {missing[:8]}")
        self._used.difference_update(pages)
        if after_step <= self._done:  # no step in flight uses them
            self._free.extend(pages)
        else:
            self._pending.append((after_step, list(pages)))

    def completed(self, step_id: int) -> None:
        """Step `step_id` and every step before it have finished on the ranks."""
        self._done = max(self._done, step_id)
        if not self._pending:
            return
        keep = []
        for after, pages in self._pending:
            if after <= step_id:
                self._free.extend(pages)
            else:
                keep.append((after, pages))
        self._pending = keep

    def check(self) -> None:
        """Invariants: every page is in exactly one of free, used, pending."""
        pending = [p for _, ps in self._pending for p in ps]
        everything = self._free + list(self._used) + pending
        assert len(everything) == self.num_pages, (len(everything), self.num_pages)
        assert set(everything) == set(range(self.num_pages)), "a page is lost or duplicated"
