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


def test_a_capped_replica_gets_patience_in_proportion_to_its_cpu_share(clock):
    t = tracker(clock, "r1", "r2")
    t.set_hang_check("r1", True, patience=1 / 0.25)  # capped to a quarter of its CPU: 4x the silence limit
    for _ in range(2):
        t.missed("r1", "timeout"), t.missed("r2", "timeout")
    clock.advance(11.9)
    assert [f.replica_id for f in t.check()] == ["r2"]  # the uncapped one is hung after 3 s
    clock.advance(0.2)
    assert [(f.replica_id, f.condition) for f in t.check()] == [("r1", Condition.HUNG)]


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


# ---------------------------------------------------------------- the supervisor over a fake pool
import asyncio  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

from prometheus_client import REGISTRY  # noqa: E402

from airan.config import parse_config  # noqa: E402
from airan.core.routing import ReplicaState, ReplicaView  # noqa: E402
from airan.serving.cluster.supervisor import ReplicaSupervisor  # noqa: E402
from airan.serving.engine.protocol import ReplicaUnavailableError  # noqa: E402
from airan.serving.sites import SiteRegistry  # noqa: E402

FAST = {"health_interval_s": 0.05, "health_timeout_s": 0.1, "unresponsive_after_s": 0.3, "restart_backoff_s": 0.2,
        "restart_backoff_max_s": 0.4, "start_timeout_s": 2.0}  # fmt: skip


def three_sites(**reliability):
    return parse_config({
        "sites": [{"id": f"bs-0{i}", "cpus": 1} for i in (1, 2, 3)],
        "models": [{"name": "m", "source": "tiny-random"}],
        "replicas": [{"site": "bs-01", "model": "m"}, {"site": "bs-02", "model": "m"}],
        "reliability": {**FAST, **reliability},
    })  # fmt: skip


class SupervisedFakePool:
    """Replicas whose health call answers, hangs or says the replica is gone; relaunches that take
    `start_s` and may fail."""

    def __init__(self, sites=("bs-01", "bs-02")) -> None:
        self._views = {f"{s}-m-0": ReplicaView(f"{s}-m-0", s, "m") for s in sites}
        self.behaviour: dict[str, str] = {}  # replica id -> "hang" | "gone" (default: answers)
        self.probes: dict[str, int] = {}
        self.start_s = 0.05
        self.fail_starts = 0
        self.relaunches: list[tuple[str, str]] = []
        self.cancelled: list[str] = []

    def views(self):
        return list(self._views.values())

    def mark_failed(self, rid, reason):
        self._views[rid] = replace(self._views[rid], state=ReplicaState.FAILED)

    async def probe(self, rid, timeout_s):
        self.probes[rid] = self.probes.get(rid, 0) + 1
        how = self.behaviour.get(rid)
        if how == "gone":
            raise ReplicaUnavailableError(f"replica actor is gone: {rid} SIGKILL")
        if how == "hang":
            await asyncio.wait_for(asyncio.sleep(3600), timeout_s)

    def claimed_cpus(self, rid):
        return 1.0

    async def relaunch(self, rid, site_id, start_timeout_s):
        self.relaunches.append((rid, site_id))
        new_id = f"{site_id}-m-r{len(self.relaunches)}"
        self._views[new_id] = ReplicaView(new_id, site_id, "m", ReplicaState.STARTING)
        try:
            await asyncio.sleep(self.start_s)
        except asyncio.CancelledError:
            self.cancelled.append(new_id)
            self._views.pop(new_id)
            raise
        if self.fail_starts:
            self.fail_starts -= 1
            self._views.pop(new_id)
            raise RuntimeError("engine did not start: out of memory")
        self._views[new_id] = replace(self._views[new_id], state=ReplicaState.READY)
        self._views.pop(rid)
        return new_id


class Harness:
    def __init__(self, config, pool, live=None):
        self.pool, self.live = pool, set(live or ("bs-01", "bs-02", "bs-03"))
        self.serving: list[bool] = []

        async def on_serving(up):
            self.serving.append(up)

        self.sup = ReplicaSupervisor(config, pool, SiteRegistry(config.sites, 0.0), lambda: set(self.live), on_serving)

    async def run_until(self, cond, limit_s=5.0):
        t0 = time.monotonic()
        while not cond():  # bounded by limit_s
            assert time.monotonic() - t0 < limit_s, "condition not met in time"
            await self.sup.step()
            await asyncio.sleep(self.sup.interval_s)
        return time.monotonic() - t0


def restarts(site, reason):
    return REGISTRY.get_sample_value("airan_replica_restarts_total", {"site": site, "reason": reason}) or 0.0


def ready(pool):
    return sorted(v.replica_id for v in pool.views() if v.state is ReplicaState.READY)


async def test_a_dead_replica_is_found_at_once_and_restarted_on_its_site():
    pool = SupervisedFakePool()
    h = Harness(three_sites(), pool)
    await h.run_until(lambda: len(pool.probes) == 2)
    before = restarts("bs-01", "dead")
    pool.behaviour["bs-01-m-0"] = "gone"
    await h.run_until(lambda: "bs-01-m-0" not in ready(pool))
    assert h.sup.tracker.watched == ["bs-02-m-0"] or "bs-01-m-0" not in h.sup.tracker.watched
    await h.run_until(lambda: ready(pool) == ["bs-01-m-r1", "bs-02-m-0"])
    [rec] = h.sup.recoveries
    assert (rec["old"], rec["new"], rec["site"], rec["condition"]) == ("bs-01-m-0", "bs-01-m-r1", "bs-01", "dead")
    assert "SIGKILL" in rec["reason"] and restarts("bs-01", "dead") == before + 1
    assert h.serving == [True]  # bs-02 answered throughout
    await h.sup.stop()


async def test_a_hung_replica_is_found_after_its_silence_and_replaced():
    pool = SupervisedFakePool()
    h = Harness(three_sites(), pool)
    await h.run_until(lambda: len(pool.probes) == 2)
    pool.behaviour["bs-02-m-0"] = "hang"
    found = await h.run_until(lambda: bool(h.sup._recovering) or bool(h.sup.recoveries))
    assert found >= 0.3  # not before its silence limit (the harness bounds how late)
    await h.run_until(lambda: bool(h.sup.recoveries))
    assert h.sup.recoveries[0]["condition"] == "hung" and "timed out" in h.sup.recoveries[0]["reason"]
    await h.sup.stop()


async def test_a_replica_whose_node_is_gone_comes_back_on_the_site_with_room():
    pool = SupervisedFakePool()
    h = Harness(three_sites(), pool)
    await h.run_until(lambda: len(pool.probes) == 2)
    h.live.discard("bs-01")
    pool.behaviour["bs-01-m-0"] = "gone"
    await h.run_until(lambda: bool(h.sup.recoveries))
    rec = h.sup.recoveries[0]
    assert rec["site"] == "bs-03" and rec["new"].startswith("bs-03")  # bs-02's one CPU is taken
    assert ready(pool) == ["bs-02-m-0", "bs-03-m-r1"]
    await h.sup.stop()


async def test_with_no_site_to_go_to_it_waits_and_says_why():
    pool = SupervisedFakePool()
    h = Harness(three_sites(), pool, live={"bs-02"})
    pool.behaviour["bs-01-m-0"] = "gone"
    await h.run_until(lambda: any(r.waiting for r in h.sup._recovering.values()))
    [rec] = h.sup._recovering.values()
    assert "bs-01: node gone" in rec.waiting and "bs-02: 0.00 free CPUs" in rec.waiting and pool.relaunches == []
    h.live.add("bs-03")  # a site comes up
    await h.run_until(lambda: bool(h.sup.recoveries))
    assert h.sup.recoveries[0]["site"] == "bs-03"
    await h.sup.stop()


async def test_not_serving_while_no_replica_is_ready_and_serving_again_after():
    pool = SupervisedFakePool()
    pool.start_s = 0.3
    h = Harness(three_sites(), pool)
    await h.run_until(lambda: h.serving == [True])
    pool.behaviour.update({"bs-01-m-0": "gone", "bs-02-m-0": "gone"})
    await h.run_until(lambda: h.serving == [True, False])
    await h.run_until(lambda: h.serving == [True, False, True])
    assert len(h.sup.recoveries) >= 1
    await h.sup.stop()


async def test_a_replacement_that_fails_to_start_is_retried_after_a_backoff():
    pool = SupervisedFakePool()
    pool.fail_starts = 2
    h = Harness(three_sites(), pool)
    pool.behaviour["bs-01-m-0"] = "gone"
    took = await h.run_until(lambda: bool(h.sup.recoveries))
    assert h.sup.recoveries[0]["attempts"] == 3 and len(pool.relaunches) == 3
    assert took >= 0.2 + 0.4  # first at once, then 0.2 s, then 0.4 s (the cap)
    await h.sup.stop()


async def test_a_replacement_whose_node_dies_while_it_starts_goes_elsewhere():
    pool = SupervisedFakePool()
    pool.start_s = 3.0
    h = Harness(three_sites(), pool)
    pool.behaviour["bs-01-m-0"] = "gone"
    await h.run_until(lambda: len(pool.relaunches) == 1)
    pool.start_s = 0.05
    h.live.discard("bs-01")  # the node goes while its replacement starts there
    await h.run_until(lambda: bool(h.sup.recoveries))
    assert pool.cancelled == ["bs-01-m-r1"] and h.sup.recoveries[0]["site"] == "bs-03"
    await h.sup.stop()


async def test_a_replica_capped_to_a_sliver_is_not_called_hung():
    pool = SupervisedFakePool()
    pool._views["bs-01-m-0"] = replace(pool._views["bs-01-m-0"], cpu_cap=0.02)
    h = Harness(three_sites(), pool)
    pool.behaviour["bs-01-m-0"] = "hang"
    await h.run_until(lambda: pool.probes.get("bs-01-m-0", 0) >= 8)
    assert h.sup.recoveries == [] and not h.sup._recovering
    pool.behaviour["bs-01-m-0"] = "gone"  # its death still counts
    await h.run_until(lambda: bool(h.sup.recoveries))
    await h.sup.stop()
