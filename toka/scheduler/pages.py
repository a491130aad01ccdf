"""The KV-cache page allocator with a prefix cache: CPU-side bookkeeping of the ranks' cache pages.

Pages are integers in [0, num_pages); the ranks' caches are indexed by them. Every page is in
exactly one state:
  held     referenced by one or more sequences (`_refs`: page -> count)
  pending  no references, but steps in flight may still read or write it: usable once the last
           step that used it has completed (`_pending`: page -> that step)
  cached   no references, holds a full page of known tokens under its key: a new sequence whose
           prefix has that key reuses it; evicted least recently used first when pages run out
  free     no references, no key

A key names a full page's tokens and everything before them (`page_keys`), so equal keys mean
equal KV. A keyed page is never written again, so sequences may share it (held with count > 1)
and a pending one may be taken back at once: its in-flight steps only read it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict


class OutOfPages(Exception):
    pass


def page_keys(tokens: list[int], page_size: int) -> list[bytes]:
    """Keys of the full pages of `tokens`: a 128-bit hash of each page's tokens and its parent's key,
    so two pages share a key only if all tokens up to their ends are equal (barring a 2**-64 collision)."""
    keys, parent = [], b""
    data = array("q", tokens).tobytes()
    step = 8 * page_size
    for i in range(len(tokens) // page_size):
        parent = hashlib.blake2b(parent + data[i * step : (i + 1) * step], digest_size=16).digest()
        keys.append(parent)
    return keys


class PageAllocator:
    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out low pages first
        self._cached: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._pending: dict[int, int] = {}
        self._refs: dict[int, int] = {}
        self._key_of: dict[int, bytes] = {}
        self._page_of: dict[bytes, int] = {}
        self._done = -1  # the last step known complete

    @property
    def num_free(self) -> int:
        """Pages alloc() can hand out now (cached ones are evicted for them)."""
        return len(self._free) + len(self._cached)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def alloc(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfPages(f"{n} pages asked, {self.num_free} free")
        pages = [self._free.pop() for _ in range(min(n, len(self._free)))]
        while len(pages) < n:  # evict the least recently used cached pages
            page, _ = self._cached.popitem(last=False)
            del self._page_of[self._key_of.pop(page)]
            pages.append(page)
        for p in pages:
            self._refs[p] = 1
        return pages

    def match(self, keys: list[bytes]) -> list[int]:
        """The pages holding the longest prefix of `keys`, each now held once more by the caller."""
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            if page in self._refs:
                self._refs[page] += 1
            else:
                self._cached.pop(page, None)
                self._pending.pop(page, None)  # in-flight steps only read a keyed page
                self._refs[page] = 1
            pages.append(page)
        return pages

    def register(self, page: int, key: bytes) -> bool:
        """`page`, held, is (or will be, by steps already planned) full of the tokens `key` names.
        The first page registered under a key keeps it; a page keeps its first key. Returns whether
        `page` is now the cached page of `key`."""
        if key not in self._page_of and page not in self._key_of:
            self._page_of[key] = page
            self._key_of[page] = key
        return self._page_of.get(key) == page

    def release(self, pages: list[int], after_step: int) -> None:
        """Drops one reference to each of `pages`; the last step that used them is `after_step`."""
        if len(set(pages)) != len(pages):
            raise ValueError("releasing a page twice")
        for p in pages:
            if p not in self._refs:
                raise ValueError(f"releasing page {p}, which is not held")
        for p in pages:
            self._refs[p] -= 1
            if self._refs[p]:
                continue
            del self._refs[p]
            if after_step <= self._done:
                self._reuse(p)
            else:
                self._pending[p] = after_step

    def completed(self, step_id: int) -> None:
        """Step `step_id` and every step before it have finished on the ranks."""
        self._done = max(self._done, step_id)
        if self._pending:
            for p in [p for p, after in self._pending.items() if after <= step_id]:
                del self._pending[p]
                self._reuse(p)

    def _reuse(self, page: int) -> None:
        if page in self._key_of:
            self._cached[page] = None
        else:
            self._free.append(page)

    def check(self) -> None:
        """Invariants: every page in exactly one state; keys and pages map one to one."""
        states = [set(self._free), set(self._cached), set(self._pending), set(self._refs)]
        assert len(self._free) == len(states[0]), "a page is free twice"
        assert sum(map(len, states)) == self.num_pages, "a page is lost or in two states"
        assert set().union(*states) == set(range(self.num_pages)), "a page is lost or duplicated"
        assert all(n > 0 for n in self._refs.values())
        assert {p: k for k, p in self._page_of.items()} == self._key_of, "keys and pages disagree"
        assert not set(self._free) & set(self._key_of), "a free page has a key"
        assert set(self._cached) <= set(self._key_of), "a cached page has no key"
