"""Routing among data-parallel replicas: prefix affinity, then the least loaded; dead replicas never."""

from __future__ import annotations

from toka.server.router import Router

PS = 4


def prompt(prefix: int, n: int = 32, tail: int = 0) -> list[int]:
    return [prefix * 1000 + i for i in range(n)] + [7] * tail


def test_least_loaded_without_affinity():
    r = Router(3, PS)
    assert r.choose(prompt(1), [5.0, 1.0, 3.0], [True] * 3) == 1
    assert r.choose(prompt(2), [0.0, 1.0, 3.0], [True] * 3) == 0


def test_a_shared_prefix_goes_where_it_went_before():
    r = Router(3, PS)
    first = r.choose(prompt(1, tail=5), [0.0, 10.0, 10.0], [True] * 3)
    assert first == 0
    # the same prefix with another ending: affinity wins over a load lower by less than the 32
    # prompt tokens it saves
    assert r.choose(prompt(1, tail=9), [30.0, 0.0, 50.0], [True] * 3) == 0
    # an unrelated prompt goes to the least loaded
    assert r.choose(prompt(2), [30.0, 0.0, 50.0], [True] * 3) == 1


def test_the_longest_shared_prefix_wins():
    r = Router(2, PS)
    far = 10**6
    assert r.choose(prompt(1, 32), [far, 0.0], [True, True]) == 1  # 8 pages to replica 1
    assert r.choose(prompt(1, 8), [0.0, far], [True, True]) == 0  # its first 2 pages to replica 0
    assert r.choose(prompt(1, 32, tail=3), [0.0, 1.0], [True, True]) == 1  # 8 pages beat 2


def test_affinity_yields_to_a_far_more_loaded_replica():
    r = Router(2, PS)
    r.choose(prompt(1), [0.0, 0.0], [True, True])
    assert r.choose(prompt(1), [1000.0, 1000.0], [True, True]) == 0  # balanced: affinity
    assert r.choose(prompt(1), [1600.0, 1000.0], [True, True]) == 1  # past 1.5 x + 32 saved tokens


def test_dead_replicas_are_never_chosen():
    r = Router(3, PS)
    assert r.choose(prompt(1), [0.0, 5.0, 9.0], [False, True, True]) == 1
    assert r.choose(prompt(1), [0.0, 5.0, 1.0], [True, False, True]) in (0, 2)
    r.forget(1)
    assert 1 not in r.owner.values()


def test_memory_is_bounded():
    r = Router(2, PS, memory=10)
    for p in range(20):
        r.choose(prompt(p), [0.0, 0.0], [True, True])
    assert len(r.owner) == 10
