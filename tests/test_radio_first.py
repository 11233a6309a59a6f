"""Radio first on plain data: policies, forecast sites, topology, and the control loop over a fake pool."""
import asyncio
from dataclasses import replace

import pytest

from airan.config import RouterConfig, parse_config
from airan.core.headroom import ForecastParams, HeadroomForecaster
from airan.core.policies import HeadroomFilter, RoundRobinScorer, build_router
from airan.core.routing import Priority, ReplicaView, RoutingContext, RoutingRequest, SiteView
from airan.serving.api import convert
from airan.serving.cluster.headroom import DRAIN_CAP_CPUS, HeadroomController
from airan.serving.sites import SiteRegistry
from airan.v1 import control_pb2


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


def _ctx(sites, priority=Priority.NEAR_RT):
    return RoutingContext(RoutingRequest("r", "m", priority=priority), sites)


def test_headroom_filter_drops_surged_sites_and_full_replicas():
    sites = {"a": SiteView("a"), "b": SiteView("b", surge_reason="radio surge: 0.10 CPUs")}
    views = [
        ReplicaView("a1", "a", "m", in_flight=4, max_concurrency=4),  # full
        ReplicaView("a2", "a", "m", in_flight=2, max_concurrency=4),
        ReplicaView("b1", "b", "m"),  # surged site
        ReplicaView("a3", "a", "m", in_flight=50),  # no limit
    ]
    r = build_router(RouterConfig(policy="radio_first", filters=["ready", "model"]))
    assert isinstance(r.filters[0], HeadroomFilter)
    d = r.choose_replicas(_ctx(sites), views)
    assert {v.replica_id for v in d.ranked} == {"a2", "a3"}
    d = r.choose_replicas(_ctx(sites), [views[0], views[2]])
    assert not d.tiers and d.rejection_kind == "RESOURCE_EXHAUSTED"
    assert "radio surge: 0.10 CPUs" in d.rejection and "a1 (4/4)" in d.rejection
    d = r.choose_replicas(_ctx(sites), [views[2]])
    assert not d.tiers and d.rejection_kind == "UNAVAILABLE"


def test_a_share_of_admitted_concurrency_is_kept_for_near_rt():
    sites = {"a": SiteView("a")}
    r = build_router(RouterConfig(policy="radio_first", filters=["ready", "model"]))
    three_of_four = [ReplicaView("a1", "a", "m", in_flight=3, max_concurrency=4)]
    assert r.choose_replicas(_ctx(sites), three_of_four).ranked  # NEAR_RT takes the reserved slot
    for p in (Priority.NON_RT, Priority.BEST_EFFORT):
        assert not r.choose_replicas(_ctx(sites, p), three_of_four).tiers
    two_of_four = [ReplicaView("a1", "a", "m", in_flight=2, max_concurrency=4)]
    assert r.choose_replicas(_ctx(sites, Priority.BEST_EFFORT), two_of_four).ranked
    alone = [ReplicaView("a1", "a", "m", in_flight=0, max_concurrency=1)]  # one slot: no reserve
    assert r.choose_replicas(_ctx(sites, Priority.BEST_EFFORT), alone).ranked
    taken = [ReplicaView("a1", "a", "m", in_flight=1, max_concurrency=1)]  # ... but NEAR_RT may join it
    assert r.choose_replicas(_ctx(sites), taken).ranked
    assert not r.choose_replicas(_ctx(sites, Priority.BEST_EFFORT), taken).tiers
    none = [ReplicaView("a1", "a", "m", in_flight=0, max_concurrency=0)]  # draining: nothing at all
    assert not r.choose_replicas(_ctx(sites), none).tiers


def test_round_robin_takes_replicas_in_turn():
    r = build_router(RouterConfig(policy="round_robin", filters=["ready", "model"]))
    assert isinstance(r.scorers[0][0], RoundRobinScorer)
    views = [ReplicaView(f"r{i}", "a", "m", in_flight=5 * i) for i in range(3)]
    picks = [r.choose_replicas(_ctx({"a": SiteView("a")}), views).ranked[0].replica_id for _ in range(6)]
    assert picks == ["r0", "r1", "r2", "r0", "r1", "r2"]  # load does not matter to it


def test_least_loaded_is_the_configured_router():
    r = build_router(RouterConfig(policy="least_loaded"))
    assert [f.name for f in r.filters] == RouterConfig().filters


CONFIG = parse_config({
    "sites": [{"id": "a", "cpus": 2}, {"id": "b", "cpus": 1}],
    "models": [{"name": "m", "source": "tiny-random"}, {"name": "m-light", "source": "tiny-random"}],
    "replicas": [{"site": "a", "model": "m", "count": 2}, {"site": "b", "model": "m"}],
    "router": {"policy": "radio_first"},
    "engine": {"max_num_seqs": 8},
    "radio": {"min_ai_headroom": 0.2, "headroom_margin": 0.0, "swap_hold_s": 10, "swap_hysteresis": 0.2},
    "catalog": {
        name: {"parent": parent, "method": "x", "weight_mb": 1, "memory_mb": 100, "tok_s_1": tok_s, "tok_s_16": 100,
               "ttft_ms": 0.0, "macro_f1": 0.5, "validity": 1, "perplexity": 5, "quality_rank": rank,
               "measured_on": "test, 2 CPUs", "measured_at": "now"}
        # the reference near-RT answer is 11 tokens in 1 s: m needs 2*11/27.5 = 0.8 CPU, m-light 2*11/44 = 0.5
        for name, parent, tok_s, rank in (("m", None, 27.5, 1), ("m-light", "m", 44.0, 2))
    },
})


def _registry(clock):
    f = HeadroomForecaster(["a", "b"], ForecastParams(stale_after_s=1e9, window_s=20), clock)
    return SiteRegistry(CONFIG.sites, CONFIG.radio.min_ai_headroom, f, CONFIG.radio.headroom_margin)


class FakePool:
    def __init__(self):
        self._views = {}
        for spec in CONFIG.replicas:
            for i in range(spec.count):
                rid = f"{spec.site}-{i}"
                self._views[rid] = ReplicaView(rid, spec.site, spec.model)
        self.model_paths = {"m": "/models/m"}
        self.limits, self.shares, self.swapped = {}, {}, []

    def views(self):
        return list(self._views.values())

    def details(self):
        return []

    async def set_limits(self, rid, max_concurrency, cpu_cap, cpu_share=1.0):
        if rid not in self._views:  # swapped out meanwhile (the real pool ignores it too)
            return
        self.limits[rid] = (max_concurrency, round(cpu_cap, 3))
        self.shares[rid] = round(cpu_share, 3)
        self._views[rid] = replace(self._views[rid], max_concurrency=max_concurrency, cpu_cap=cpu_cap,
                                   cpu_share=cpu_share)  # fmt: skip

    async def swap(self, rid, variant, path, busy=None, initial_cap=None):
        old = self._views.pop(rid)
        new = f"{rid}-{variant}"
        self._views[new] = replace(old, replica_id=new, variant="" if variant == old.model else variant)
        self.swapped.append((rid, variant, path))
        return new


def _report(sites, clock, share_a, share_b, n=6):
    for _ in range(n):
        clock.t += 1
        sites.report_ran_load("a", share_a, at=clock.t)
        sites.report_ran_load("b", share_b, at=clock.t)


async def _settle(ctl):
    await ctl.step()
    await asyncio.gather(*ctl._swaps.values())


async def test_caps_and_concurrency_follow_the_forecast_headroom():
    clock = Clock()
    sites = _registry(clock)
    pool = FakePool()
    ctl = HeadroomController(CONFIG, sites, pool, {"m-light": "/models/m-light"}, clock)
    _report(sites, clock, 0.25, 0.0)
    await _settle(ctl)
    # site a: 2 cpus x (1 - 0.25) = 1.5 CPUs over two replicas built for 1 CPU each: 0.75 each, 6 of 8
    assert pool.limits["a-0"] == (6, 0.75) and pool.limits["a-1"] == (6, 0.75)
    assert pool.limits["b-0"] == (8, 1.0)
    assert pool.shares == {"a-0": 0.75, "a-1": 0.75, "b-0": 1.0}  # admission scales their rates by it
    assert not pool.swapped and not sites.get("a").surged


async def test_a_surge_swaps_to_the_lighter_variant_then_drains_then_recovers():
    clock = Clock()
    sites = _registry(clock)
    pool = FakePool()
    ctl = HeadroomController(CONFIG, sites, pool, {"m-light": "/models/m-light"}, clock)
    _report(sites, clock, 0.0, 0.3)  # b: 0.7 CPU < the 0.8 m needs, >= 0.5 m-light needs
    await _settle(ctl)
    assert pool.swapped == [("b-0", "m-light", "/models/m-light")]
    assert [e.kind for e in ctl.events] == ["swap"]
    _report(sites, clock, 0.0, 0.7)  # 0.3 CPU: nothing fits
    await _settle(ctl)
    assert sites.get("b").surged and "radio surge" in sites.get("b").surge_reason
    assert pool.limits["b-0-m-light"] == (0, DRAIN_CAP_CPUS)
    topo = convert.site_to_proto(sites.get("b"))
    assert topo.state == control_pb2.SITE_SURGED and "m-light" in topo.state_reason
    assert topo.headroom_cpus < 0.5  # the forecast (a rising trend) leaves at most what the last report does
    # the surge passes: nothing changes before the hold time
    for _ in range(40):
        clock.t += 1
        sites.report_ran_load("a", 0.0, at=clock.t)
        sites.report_ran_load("b", 0.0, at=clock.t)
    await _settle(ctl)  # the hold starts
    assert sites.get("b").surged
    clock.t += 11
    sites.report_ran_load("b", 0.0, at=clock.t)
    await _settle(ctl)
    # resumed on the best variant that fits with room to spare: the configured one again
    assert not sites.get("b").surged and [e.kind for e in ctl.events][-2:] == ["resume", "swap"]
    assert pool.swapped[-1] == ("b-0-m-light", "m", "/models/m")
    assert [v.variant for v in pool.views() if v.site_id == "b"] == [""]


def test_a_site_without_a_forecast_keeps_the_last_report_semantics():
    sites = SiteRegistry(CONFIG.sites, 0.2)
    assert sites.report_ran_load("a", 0.9) is True
    assert sites.get("a").headroom_cpus is None and sites.views()["a"].ai_headroom == pytest.approx(0.1)
    assert convert.site_to_proto(sites.get("a")).state == control_pb2.SITE_ACTIVE


def test_report_times_feed_the_forecast():
    clock = Clock()
    sites = _registry(clock)
    for t, share in ((1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)):
        sites.report_ran_load("a", share, at=t)
    s = sites.get("a")
    assert s.forecast.basis == "trend" and s.forecast.share > 0.4
    assert s.headroom_cpus == pytest.approx(2 * (1 - s.forecast.share))


def test_cap_groups_are_scoped_by_stack(tmp_path, monkeypatch):
    """Two stacks on one host share the cgroup hierarchy: the same replica name must not collide."""
    import os

    from airan.serving.cluster import cpucap

    monkeypatch.setattr(cpucap, "_mounts", lambda: [(str(tmp_path), "cgroup", "rw,cpu,cpuacct")])
    a, b = cpucap.CpuCap("bs-01-m-0", [0], scope="node-a"), cpucap.CpuCap("bs-01-m-0", [0], scope="node-b")
    assert a.join(os.getpid()).mechanism == "cgroup1" and b.join(os.getpid()).mechanism == "cgroup1"
    assert a.dir == tmp_path / "airan" / "node-a" / f"bs-01-m-0-{os.getpid()}" and a.dir != b.dir
    a.set(0.3)
    assert int((a.dir / "cpu.cfs_quota_us").read_text()) == round(0.3 * cpucap.PERIOD_US)
    assert (b.dir / "cpu.cfs_quota_us").read_text() == "-1"


async def test_a_report_that_moves_the_headroom_caps_at_once_not_at_the_next_tick():
    """The control loop ticks every radio.control_interval_s; a report that raises the radio's share
    must not leave the AI on the old headroom until then. Limits that did not change are not re-sent."""
    clock = Clock()
    sites = _registry(clock)
    pool = FakePool()
    slow = CONFIG.model_copy(update={"radio": CONFIG.radio.model_copy(update={"control_interval_s": 60.0})})
    ctl = HeadroomController(slow, sites, pool, {}, clock)
    _report(sites, clock, 0.0, 0.0)
    sent = []
    set_limits = pool.set_limits

    async def counting(rid, *args):
        sent.append(rid)
        await set_limits(rid, *args)

    pool.set_limits = counting
    ctl.start()
    try:
        await asyncio.sleep(0.2)  # the first tick
        assert pool.limits["b-0"] == (8, 1.0)
        n = len(sent)
        await asyncio.sleep(0.2)
        assert len(sent) == n  # nothing moved: nothing re-sent
        _report(sites, clock, 0.0, 0.5, n=1)  # b's radio takes half its CPU
        await asyncio.sleep(0.2)  # far less than the 60 s tick
        cap = pool.limits["b-0"][1]
        assert cap <= 0.5 + 1e-9 and pool.shares["b-0"] == pytest.approx(cap)
        assert [r for r in sent[n:]] == ["b-0"]  # only the site whose headroom moved
    finally:
        await ctl.stop()


@pytest.mark.parametrize("seed", range(40))
def test_the_radio_first_router_decides_in_one_pass_what_filter_by_filter_decides(seed):
    """Its headroom filter runs before the table-only ones, yet the decision is one kernel pass (the
    masks are ANDed); it must pick what the configured order, filter by filter, picks."""
    import random

    from airan.core.routing.table import ReplicaTable

    rng = random.Random(seed)
    sites = {s: SiteView(s, drained=rng.random() < 0.15, latency_ms={"xapp": rng.uniform(0.5, 20)},
                         surge_reason="radio surge" if rng.random() < 0.25 else "") for s in ("a", "b", "c", "d")}
    views = [ReplicaView(f"r{i}", rng.choice(list(sites)), rng.choice(["m", "m", "other"]),
                         in_flight=rng.randint(0, 6), max_concurrency=rng.choice([None, 1, 2, 4, 8]))
             for i in range(rng.randint(1, 12))]  # fmt: skip
    table = ReplicaTable(views, sites)
    now = 100.0
    for v in views:
        start = now + rng.uniform(-0.5, 1.0)
        table.set_admission(v.replica_id, rng.uniform(1e-4, 2e-3), [rng.uniform(0.01, 0.05)] * 3, 0.01,
                            [start, start + 0.2, start + 0.4])  # fmt: skip
    budget = rng.choice([None, 0.3, 1.0, 5.0])
    req = RoutingRequest("q", "m", "xapp", tuple(rng.sample(list(sites), rng.randint(0, 2))),
                         rng.choice(list(Priority)), 200, 16, None if budget is None else now + budget, 16)  # fmt: skip
    c = RoutingContext(req, sites, now=now)
    one_pass = build_router(RouterConfig(policy="radio_first"))
    general = build_router(RouterConfig(policy="radio_first"))
    general._fast = None
    assert one_pass._fast is not None  # the default filters and scorers after the headroom filter
    a, b = one_pass.choose(c, table, limit=3), general.choose(c, table, limit=3)
    assert (a.rejection is None) == (b.rejection is None)
    assert [a.scores[v.replica_id] for v in a.ranked] == pytest.approx([b.scores[v.replica_id] for v in b.ranked])
    if a.rejection is not None:
        assert a.rejection == b.rejection  # the refusal's reason comes from the configured order
