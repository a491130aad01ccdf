"""PageAllocator: pages handed out once, released pages come back only after their last step completed."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toka.scheduler.pages import OutOfPages, PageAllocator


def test_alloc_hands_out_distinct_low_pages_first():
    a = PageAllocator(8)
    first = a.alloc(3)
    assert first == [0, 1, 2]
    second = a.alloc(2)
    assert second == [3, 4]
    assert a.num_free == 3 and a.num_pending == 0
    assert a.alloc(0) == []
    a.check()


def test_out_of_pages_leaves_state_untouched():
    a = PageAllocator(4)
    held = a.alloc(3)
    with pytest.raises(OutOfPages):
        a.alloc(2)
    assert a.num_free == 1
    a.check()
    assert a.alloc(1) == [3]
    with pytest.raises(OutOfPages):
        a.alloc(1)
    a.release(held, after_step=0)
    with pytest.raises(OutOfPages):  # released but still pending: not allocatable yet
        a.alloc(1)
    a.completed(0)
    assert sorted(a.alloc(3)) == held


def test_released_pages_return_only_after_their_step_completes():
    a = PageAllocator(6)
    p1 = a.alloc(2)
    p2 = a.alloc(2)
    a.release(p1, after_step=5)
    a.release(p2, after_step=3)
    assert a.num_free == 2 and a.num_pending == 4
    a.check()
    a.completed(2)
    assert a.num_free == 2 and a.num_pending == 4
    a.completed(3)
    assert a.num_free == 4 and a.num_pending == 2
    a.check()
    a.completed(4)
    assert a.num_free == 4
    a.completed(10)  # every step up to 10 is done: step 5's pages too
    assert a.num_free == 6 and a.num_pending == 0
    a.check()
    assert sorted(a.alloc(6)) == list(range(6))


def test_release_after_an_already_completed_step():
    """Its last step is long done: the pages may come back at once or at the next completed() call,
    but never later, and never before they are released."""
    a = PageAllocator(3)
    p = a.alloc(3)
    a.completed(7)
    assert a.num_free == 0
    a.release(p, after_step=2)
    assert a.num_pending + a.num_free == 3
    a.check()
    a.completed(8)
    assert a.num_free == 3 and a.num_pending == 0
    a.check()


def test_double_release_is_an_error():
    a = PageAllocator(4)
    p = a.alloc(2)
    a.release(p, after_step=0)
    with pytest.raises(ValueError):
        a.release(p, after_step=1)
    a.completed(0)
    with pytest.raises(ValueError):  # free now, still not allocated
        a.release(p[:1], after_step=2)
    with pytest.raises(ValueError):  # never allocated
        a.release([3], after_step=0)
    a.check()
    assert a.num_free == 4


def test_double_release_within_one_call_is_an_error():
    """A page listed twice in one release would enter the free list twice and later be handed to two
    sequences at once."""
    a = PageAllocator(4)
    p = a.alloc(2)
    with pytest.raises(ValueError):
        a.release([p[0], p[0]], after_step=0)
    a.completed(0)
    a.check()
    got = a.alloc(a.num_free)
    assert len(got) == len(set(got))


def test_release_of_nothing_is_a_no_op():
    a = PageAllocator(2)
    a.release([], after_step=0)
    assert a.num_pending == 0 and a.num_free == 2
    a.check()


def test_partial_release_keeps_the_rest_allocated():
    a = PageAllocator(5)
    p = a.alloc(4)
    a.release(p[1:3], after_step=0)
    a.completed(0)
    assert a.num_free == 3
    with pytest.raises(ValueError):
        a.release(p[1:2], after_step=1)
    a.release([p[0], p[3]], after_step=1)
    a.completed(1)
    assert a.num_free == 5
    a.check()


def test_check_detects_corruption():
    a = PageAllocator(4)
    a.alloc(2)
    a._free.append(0)  # a page both free and used
    with pytest.raises(AssertionError):
        a.check()


class _Model:
    """What the allocator should do, written the obvious way."""

    def __init__(self, n):
        self.free = set(range(n))
        self.used = set()
        self.pending: dict[int, int] = {}  # page -> step

    def completed(self, step):
        for p, s in list(self.pending.items()):
            if s <= step:
                del self.pending[p]
                self.free.add(p)


def _run_ops(num_pages: int, ops: list[tuple], seed: int) -> None:
    rng = random.Random(seed)
    a, m = PageAllocator(num_pages), _Model(num_pages)
    owners: list[list[int]] = []
    step = 0
    done = -1
    for op, arg in ops:
        if op == "alloc":
            n = arg % (num_pages + 2)
            if n > len(m.free):
                with pytest.raises(OutOfPages):
                    a.alloc(n)
            else:
                pages = a.alloc(n)
                assert len(pages) == n == len(set(pages))
                assert set(pages) <= m.free, "handed out a page that is not free"
                m.free -= set(pages)
                m.used |= set(pages)
                if pages:
                    owners.append(pages)
        elif op == "release" and owners:
            pages = owners.pop(arg % len(owners))
            if pages and rng.random() < 0.3:  # release only part of them, keep the rest
                k = rng.randrange(len(pages))
                pages, rest = pages[:k], pages[k:]
                owners.append(rest)  # k < len(pages): never empty
            after = done + rng.randrange(1, 4)  # a step still in flight
            a.release(pages, after_step=after)
            for p in pages:
                m.used.discard(p)
                m.pending[p] = after
        elif op == "double_release" and owners:
            i = arg % len(owners)
            pages = owners[i]
            a.release(pages[:1], after_step=done + 1)
            m.used.discard(pages[0])
            m.pending[pages[0]] = done + 1
            if len(pages) > 1:
                owners[i] = pages[1:]
            else:
                owners.pop(i)
            with pytest.raises(ValueError):
                a.release(pages[:1], after_step=done + 2)
        elif op == "complete":
            done += 1 + arg % 2
            a.completed(done)
            m.completed(done)
        step += 1
        a.check()
        assert a.num_free == len(m.free)
        assert a.num_pending == len(m.pending)
    # release everything, finish every step: nothing is lost
    for pages in owners:
        a.release(pages, after_step=done + 3)
    a.completed(done + 3)
    a.check()
    assert a.num_free == num_pages and a.num_pending == 0


_op = st.tuples(st.sampled_from(["alloc", "alloc", "release", "release", "double_release", "complete"]),
                st.integers(0, 50))


@settings(max_examples=150, deadline=None)
@given(num_pages=st.integers(1, 12), ops=st.lists(_op, max_size=60), seed=st.integers(0, 2**16))
def test_random_operation_sequences_keep_invariants(num_pages, ops, seed):
    _run_ops(num_pages, ops, seed)


@pytest.mark.parametrize("seed", range(5))
def test_long_seeded_random_sequences(seed):
    rng = random.Random(seed)
    kinds = ["alloc", "alloc", "release", "release", "double_release", "complete"]
    ops = [(rng.choice(kinds), rng.randrange(50)) for _ in range(2000)]
    _run_ops(rng.randint(4, 40), ops, seed)


def test_prefix_cache_keys_name_the_whole_prefix():
    from toka.scheduler.pages import page_keys

    a = page_keys([1, 2, 3, 4, 5, 6, 7], 2)
    assert len(a) == 3 and len(set(a)) == 3
    assert page_keys([1, 2, 3, 4], 2) == a[:2]
    assert page_keys([9, 2, 3, 4], 2)[1] != a[1], "same page tokens after a different prefix"


def test_matched_pages_are_shared_and_cached_pages_evicted_last_used_first():
    a = PageAllocator(4)
    p = a.alloc(2)
    a.register(p[0], b"k0")
    a.register(p[1], b"k1")
    assert a.match([b"k0", b"k1", b"k2"]) == p  # held twice now
    a.release(p, after_step=-1)
    a.release(p, after_step=-1)
    assert a.num_free == 4 and a.num_cached == 2
    assert a.match([b"k1"]) == [p[1]]  # a lookup by a key alone: the caller passes whole prefixes
    a.release([p[1]], after_step=-1)  # p[1] is now the most recently used
    got = a.alloc(3)  # 2 never-keyed pages, then the least recently used cached one
    assert p[0] in got and p[1] not in got
    assert a.match([b"k0"]) == [] and a.match([b"k1"]) == [p[1]]
    a.check()


def test_pending_keyed_page_is_taken_back_by_a_match_but_not_handed_out():
    a = PageAllocator(2)
    (p,) = a.alloc(1)
    a.register(p, b"k")
    a.release([p], after_step=5)  # steps up to 5 may still read it
    assert a.num_pending == 1 and a.num_free == 1
    assert a.alloc(1) != [p]
    assert a.match([b"k"]) == [p] and a.num_pending == 0
    a.check()


@pytest.mark.parametrize("seed", range(20))
def test_random_sharing_and_eviction_keep_the_invariants(seed):
    rng = random.Random(seed)
    a = PageAllocator(rng.randint(1, 12))
    held: list[list[int]] = []  # one entry per "sequence": the pages it holds
    step = 0
    for _ in range(300):
        op = rng.random()
        if op < 0.3 and a.num_free:
            pages = a.alloc(rng.randint(1, a.num_free))
            for page in pages:
                if rng.random() < 0.7:
                    a.register(page, bytes([rng.randrange(6)]))
            held.append(pages)
        elif op < 0.5:
            keys = [bytes([k]) for k in rng.sample(range(6), rng.randint(1, 3))]  # prefixes: distinct keys
            got = a.match(keys)
            if got:
                held.append(got)
        elif op < 0.8 and held:
            a.release(held.pop(rng.randrange(len(held))), after_step=step + rng.randint(-1, 2))
        else:
            step += 1
            a.completed(step - rng.randint(0, 2))
        a.check()
        refs = {}
        for pages in held:
            for page in pages:
                refs[page] = refs.get(page, 0) + 1
        assert refs == a._refs
