"""Replica health core: dead and hung detection, restart backoff, where a lost replica goes."""
from __future__ import annotations

import pytest

from airan.core.replica_health import (
    Condition,
    HealthParams,
    HealthTracker,
    RestartBackoff,
    SiteRoom,
    choose_site,
)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


PARAMS = HealthParams(unresponsive_after_s=3.0, backoff_initial_s=1.0, backoff_max_s=8.0, stable_after_s=60.0)


@pytest.fixture
def clock():
    return Clock()


def tracker(clock, *ids):
    t = HealthTracker(PARAMS, clock)
    for rid in ids:
        t.watch(rid)
    return t


def test_a_replica_that_answers_stays_healthy(clock):
    t = tracker(clock, "r1")
    for _ in range(20):
        clock.advance(0.5)
        t.answered("r1")
    assert t.check() == [] and t.condition("r1") is Condition.HEALTHY


def test_a_gone_replica_is_dead_at_once_and_reported_once(clock):
    t = tracker(clock, "r1", "r2")
    clock.advance(0.4)
    t.gone("r1", "actor died: SIGKILL")
    [failure] = t.check()
    assert failure.replica_id == "r1" and failure.condition is Condition.DEAD
    assert failure.reason == "actor died: SIGKILL" and failure.silent_s == pytest.approx(0.4)
    assert t.check() == []  # reported once
    t.answered("r1")  # a late answer does not bring a dead replica back
    assert t.condition("r1") is Condition.DEAD


def test_timeouts_count_and_silence_past_the_limit_is_a_hang(clock):
    t = tracker(clock, "r1")
    clock.advance(2.0)
    t.missed("r1", "probe timed out after 2.0s")
    assert t.check() == [] and t.consecutive_misses("r1") == 1  # missed, but silent only 2 s
    clock.advance(1.0)
    [failure] = t.check()
    assert failure.condition is Condition.HUNG and failure.silent_s == pytest.approx(3.0)
    assert "1 missed" in failure.reason and "timed out" in failure.reason


def test_silence_without_a_missed_probe_is_not_a_hang(clock):
    # the supervisor itself was late (no probe was sent): that says nothing about the replica
    t = tracker(clock, "r1")
    clock.advance(10.0)
    assert t.check() == []


def test_one_slow_probe_is_forgiven_when_the_next_answers(clock):
    t = tracker(clock, "r1")
    clock.advance(2.0)
    t.missed("r1", "timeout")
    clock.advance(0.5)
    t.answered("r1")
    clock.advance(2.9)
    assert t.check() == [] and t.consecutive_misses("r1") == 0


def test_hang_check_off_leaves_only_death(clock):
    t = tracker(clock, "r1")
    t.set_hang_check("r1", False)
    clock.advance(2.0)
    t.missed("r1", "timeout")
    clock.advance(20.0)
    assert t.check() == []
    t.set_hang_check("r1", True)  # its silence while exempt is not held against it
    assert t.check() == []
    t.gone("r1", "actor died")
    assert [f.condition for f in t.check()] == [Condition.DEAD]


def test_forgotten_and_unknown_replicas_are_ignored(clock):
    t = tracker(clock, "r1")
    t.forget("r1")
    t.missed("r1", "timeout")
    t.gone("r2", "never watched")
    assert t.check() == [] and t.watched == []


def test_backoff_first_loss_at_once_then_doubling_to_the_cap(clock):
    b = RestartBackoff(PARAMS, clock)
    waits = []
    for _ in range(6):
        due = b.lost("slot")
        waits.append(due - clock())
        clock.advance(due - clock())
        assert b.due("slot")
    assert waits == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0]


def test_backoff_resets_after_a_stable_run(clock):
    b = RestartBackoff(PARAMS, clock)
    b.lost("slot")
    b.lost("slot")
    assert b.losses("slot") == 2
    b.ready("slot")
    clock.advance(59.0)
    assert b.lost("slot") - clock() == 2.0  # not stable yet: still the crash loop
    b.ready("slot")
    clock.advance(60.0)
    assert b.lost("slot") == clock() and b.losses("slot") == 1


def test_backoff_is_not_due_before_its_time(clock):
    b = RestartBackoff(PARAMS, clock)
    b.lost("slot")
    b.lost("slot")
    assert not b.due("slot") and b.wait_s("slot") == 1.0
    assert b.due("other")  # never lost: nothing to wait for


def room(site, alive=True, accepting=True, headroom=2.0, claimed=0.0):
    return SiteRoom(site, alive, accepting, headroom, claimed)


def test_a_lost_replica_restarts_on_its_own_site_while_its_node_lives():
    choice = choose_site("bs-01", 1.0, [room("bs-01", claimed=2.0), room("bs-02")])
    assert choice.site_id == "bs-01"


def test_a_replica_whose_node_is_gone_goes_to_the_site_with_most_room():
    choice = choose_site("bs-01", 1.0, [
        room("bs-01", alive=False), room("bs-02", headroom=1.0, claimed=1.0), room("bs-03", headroom=1.0),
        room("bs-04", headroom=4.0, claimed=2.5),
    ])  # fmt: skip
    assert choice.site_id == "bs-04"
    assert "bs-01: node gone" in choice.reason and "bs-02: 0.00 free CPUs, needs 1.00" in choice.reason


def test_ties_break_by_site_id():
    assert choose_site("bs-01", 1.0, [room("bs-01", alive=False), room("bs-03"), room("bs-02")]).site_id == "bs-02"


def test_no_site_with_room_means_no_placement_and_says_why():
    choice = choose_site("bs-01", 1.0, [
        room("bs-01", alive=False), room("bs-02", accepting=False), room("bs-03", alive=False),
        room("bs-04", headroom=1.0, claimed=0.5),
    ])  # fmt: skip
    assert choice.site_id is None
    for words in ("bs-01: node gone", "bs-02: drained or surged", "bs-03: node gone", "bs-04: 0.50 free CPUs"):
        assert words in choice.reason


def test_params_are_checked():
    with pytest.raises(ValueError, match="backoff_max_s"):
        HealthParams(backoff_initial_s=5.0, backoff_max_s=1.0)
    with pytest.raises(ValueError):
        HealthParams(unresponsive_after_s=0)
