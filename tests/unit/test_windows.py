"""Bounded generation tables and sliding-window counters (sipguard.policy.windows)."""

from __future__ import annotations

from sipguard.policy.windows import Count, Generations, Pair


def test_key_lives_between_one_and_two_horizons() -> None:
    """A key written once is still there one horizon later and gone after two."""
    g: Generations[int] = Generations(10.0, 1000)
    g.put("a", 1, 0.0)
    assert g.get("b", 9.9) is None and g.peek("a") == 1
    g.put("x", 0, 10.0)  # rotation: a moves to the previous generation
    assert g.peek("a") == 1
    g.put("x", 0, 20.0)  # second rotation: a is dropped
    assert g.peek("a") is None


def test_reading_a_key_keeps_it_alive() -> None:
    """A key read in every generation never expires."""
    g: Generations[int] = Generations(10.0, 1000)
    g.put("a", 1, 0.0)
    for t in range(5, 100, 5):
        assert g.get("a", float(t)) == 1


def test_cap_bounds_the_table_and_counts_drops() -> None:
    """Beyond max_keys the older generation is forgotten and counted."""
    g: Generations[int] = Generations(1e9, 100)
    for i in range(1000):
        g.put(str(i), i, 0.0)
    assert len(g) <= 100
    assert g.dropped >= 800
    assert g.peek("999") == 999


def test_need_only_grows_the_horizon() -> None:
    """need() raises the horizon and never lowers it; it replaces the cap."""
    g: Generations[int] = Generations(5.0, 10)
    g.need(60.0, 50)
    g.need(1.0)
    assert (g.horizon, g.max_keys) == (60.0, 50)


def test_count_is_exact_within_a_window_and_slides() -> None:
    """A counter of 10 events in one window reads 10 there, half of them halfway through the
    next window, none after two."""
    c = Count()
    for i in range(10):
        c.add(100.0 + i, 60.0)
    assert c.value(110.0, 60.0) == 10
    assert abs(c.value(150.0, 60.0) - 5.0) < 1e-9
    assert c.value(240.0, 60.0) == 0


def test_pair_holds_two_counts_over_one_window() -> None:
    """A Pair keeps numerator and denominator over the same sliding window."""
    p = Pair()
    p.add(0.0, 10.0, 1, 1)
    p.add(1.0, 10.0, 0, 1)
    assert p.values(5.0, 10.0) == (1.0, 2.0)
    assert p.values(15.0, 10.0) == (0.5, 1.0)
    assert p.values(30.0, 10.0) == (0.0, 0.0)
