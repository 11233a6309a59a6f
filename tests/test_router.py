"""Router on plain data: no Ray, vLLM or gRPC."""
import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from airan.config import RouterConfig, ScorerSpec
from airan.core.routing import (
    Priority,
    ReplicaState,
    ReplicaView,
    Router,
    RoutingContext,
    RoutingRequest,
    SiteView,
)
from airan.core.routing.scorers import KvCacheScorer, LeastLoadedScorer, SiteLocalityScorer
from airan.core.routing.table import DecisionState, ReplicaTable

SITES = {
    "bs-01": SiteView("bs-01", latency_ms={"xapp": 1.0}),
    "bs-02": SiteView("bs-02", latency_ms={"xapp": 3.0}),
    "bs-03": SiteView("bs-03", latency_ms={"xapp": 20.0}),
}


def replica(rid, site, model="m", **kw):
    return ReplicaView(rid, site, model, **kw)


def ctx(site_ids=(), model="m", sites=SITES, min_headroom=0.0, controller="xapp", allowed=None):
    req = RoutingRequest("r1", model, controller_id=controller, site_ids=tuple(site_ids),
                         allowed_sites=None if allowed is None else frozenset(allowed))  # fmt: skip
    return RoutingContext(req, sites, min_ai_headroom=min_headroom)


def router(**cfg):
    return Router.from_config(RouterConfig(**cfg), rng=random.Random(0))


def test_prefers_requested_site_when_loads_equal():
    reps = [replica("a", "bs-01"), replica("b", "bs-02"), replica("c", "bs-03")]
    decision = router().choose_replicas(ctx(["bs-02"]), reps)
    assert decision.ranked[0].replica_id == "b"
    assert [r.replica_id for r in decision.ranked] == ["b", "a", "c"]  # then by controller latency


def test_least_loaded_wins_over_locality_when_target_is_saturated():
    reps = [replica("a", "bs-01", in_flight=16), replica("b", "bs-02")]
    decision = router().choose_replicas(ctx(["bs-01"]), reps)
    assert decision.ranked[0].replica_id == "b"


def test_equal_candidates_form_one_tier_with_random_tie_break():
    reps = [replica("a", "bs-01"), replica("b", "bs-01")]
    firsts = {
        Router.from_config(RouterConfig(), rng=random.Random(seed)).choose_replicas(ctx(), reps).ranked[0].replica_id
        for seed in range(20)
    }
    assert firsts == {"a", "b"}
    assert len(router().choose_replicas(ctx(), reps).tiers) == 1


@pytest.mark.parametrize(
    "reps, context, reason",
    [
        ([], ctx(), "no replicas are deployed"),
        ([replica("a", "bs-01", state=ReplicaState.STARTING)], ctx(), "no replica is ready"),
        ([replica("a", "bs-01", model="other")], ctx(), "model 'm'"),
        (
            [replica("a", "bs-01")],
            ctx(sites={"bs-01": SiteView("bs-01", drained=True)}),
            "drained",
        ),
        (
            [replica("a", "bs-01")],
            ctx(sites={"bs-01": SiteView("bs-01", ai_headroom=0.05)}, min_headroom=0.15),
            "headroom",
        ),
    ],
)
def test_empty_result_explains_which_filter_rejected(reps, context, reason):
    decision = router().choose_replicas(context, reps)
    assert decision.tiers == []
    assert reason in decision.rejection


def test_surged_site_is_skipped_but_others_serve():
    sites = dict(SITES, **{"bs-01": SiteView("bs-01", ai_headroom=0.05, latency_ms={"xapp": 1.0})})
    reps = [replica("a", "bs-01"), replica("b", "bs-02")]
    decision = router().choose_replicas(ctx(["bs-01"], sites=sites, min_headroom=0.15), reps)
    assert [r.replica_id for r in decision.ranked] == ["b"]


def test_scorers_table():
    reps = [replica("a", "bs-01", waiting=8, kv_cache_usage=0.25), replica("b", "bs-03", in_flight=20)]
    c = ctx(["bs-01"])
    table, every, state = ReplicaTable(reps, SITES), np.ones(2, dtype=bool), DecisionState()
    np.testing.assert_allclose(LeastLoadedScorer(saturation=16).score(c, table, every, state), [0.5, 0.0])
    np.testing.assert_allclose(KvCacheScorer().score(c, table, every, state), [0.75, 1.0])
    loc = SiteLocalityScorer(latency_scale_ms=10).score(c, table, every, state)
    assert loc[0] == 1.0 and 0 < loc[1] < 0.5


def test_weights_from_config_change_the_winner():
    reps = [replica("a", "bs-01", in_flight=8), replica("b", "bs-02")]
    local_heavy = router(scorers=[ScorerSpec(type="site_locality", weight=5), ScorerSpec(type="least_loaded")])
    load_heavy = router(scorers=[ScorerSpec(type="site_locality"), ScorerSpec(type="least_loaded", weight=5)])
    assert local_heavy.choose_replicas(ctx(["bs-01"]), reps).ranked[0].replica_id == "a"
    assert load_heavy.choose_replicas(ctx(["bs-01"]), reps).ranked[0].replica_id == "b"


@given(
    st.lists(
        st.tuples(st.sampled_from(list(SITES)), st.integers(0, 40), st.floats(0, 1), st.booleans()),
        min_size=1,
        max_size=12,
    )
)
def test_ranking_is_a_permutation_of_eligible_replicas_with_scores_in_unit_range(rows):
    reps = [
        replica(f"r{i}", site, in_flight=load, kv_cache_usage=kv, state=ReplicaState.READY if ok else ReplicaState.FAILED)
        for i, (site, load, kv, ok) in enumerate(rows)
    ]
    r = router(scorers=[ScorerSpec(type="least_loaded"), ScorerSpec(type="kv_cache"), ScorerSpec(type="site_locality")])
    decision = r.choose_replicas(ctx(["bs-02"]), reps)
    eligible = {x.replica_id for x in reps if x.state is ReplicaState.READY}
    assert {x.replica_id for x in decision.ranked} == eligible
    assert all(0.0 <= s <= 1.0 for s in decision.scores.values())
    ranked_scores = [decision.scores[x.replica_id] for x in decision.ranked]
    assert ranked_scores == sorted(ranked_scores, reverse=True)


def test_lora_requests_go_only_to_replicas_holding_the_adapter():
    reps = [
        replica("a", "bs-01"),
        replica("b", "bs-02", adapters=frozenset({"m-netops-lora"})),
    ]
    decision = router().choose_replicas(ctx(["bs-01"], model="m-netops-lora"), reps)
    assert [r.replica_id for r in decision.ranked] == ["b"]
    base = router().choose_replicas(ctx(["bs-01"], model="m"), reps)
    assert {r.replica_id for r in base.ranked} == {"a", "b"}
    none = router().choose_replicas(ctx(model="other-lora"), reps)
    assert "adapter" in none.rejection


@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 20), st.sampled_from(["m", "other"]),
                       st.sampled_from(list(ReplicaState))), min_size=1, max_size=30),
    st.integers(1, 4),
)
def test_the_top_k_hot_path_ranks_what_ranking_everything_ranks(rows, k):
    """choose(limit=k) (folded table-only filters, ineligible skipped at the top, ties found from the
    runner-up) picks the same scores, in order, as ranking every replica (choose_replicas)."""
    sites = {**SITES, "bs-04": SiteView("bs-04", drained=True)}
    reps = [replica(f"r{i}", f"bs-0{s + 1}", model, state=state, waiting=w)
            for i, (s, w, model, state) in enumerate(rows)]  # fmt: skip
    c = ctx(["bs-02"], sites=sites)
    full = router().choose_replicas(c, reps)
    top = router().choose(c, ReplicaTable(reps, sites), limit=k)
    expect = sorted(full.scores.values(), reverse=True)[:k]
    assert [top.scores[r.replica_id] for r in top.ranked] == pytest.approx(expect)  # best first
    assert (top.rejection is None) == bool(expect)
    assert all(r.state is ReplicaState.READY and r.model == "m" and r.site_id != "bs-04" for r in top.ranked)


# -- a caller's site scope (RoutingRequest.allowed_sites) --------------------------------


def ranked_ids(decision):
    return [r.replica_id for r in decision.ranked]


def test_a_site_scope_confines_the_choice_to_its_sites_against_every_score():
    reps = [replica("a", "bs-01"), replica("b", "bs-02"), replica("c", "bs-03"), replica("d", "bs-03", in_flight=4)]
    table = ReplicaTable(reps, SITES)
    assert ranked_ids(router().choose(ctx(), table, limit=3))[0] == "a"  # unscoped: the nearest site
    assert ranked_ids(router().choose_replicas(ctx(allowed={"bs-03"}), reps)) == ["c", "d"]
    assert ranked_ids(router().choose(ctx(allowed={"bs-03"}), table, limit=3)) == ["c", "d"]
    # a request naming a site outside its scope (the server refuses it before routing) still stays inside
    named = router().choose(ctx(["bs-01"], allowed={"bs-03"}), table, limit=3)
    assert ranked_ids(named) == ["c", "d"]
    assert named.placement_note == "served at bs-03: bs-01 is outside its caller's scope"
    # each scope has its own cached mask: an unscoped decision after a scoped one is as before
    assert ranked_ids(router().choose(ctx(), table, limit=3))[0] == "a"


@pytest.mark.parametrize("filters", [[], ["deadline", "preferred_site"], ["model"]])
def test_a_site_scope_holds_whatever_filters_the_router_is_configured_with(filters):
    reps = [replica("a", "bs-01"), replica("b", "bs-02")]
    decision = router(filters=filters).choose(ctx(allowed={"bs-02"}), ReplicaTable(reps, SITES), limit=3)
    assert ranked_ids(decision) == ["b"]


@pytest.mark.parametrize(
    "reps, allowed, reason",
    [
        ([replica("a", "bs-01"), replica("b", "bs-02", state=ReplicaState.FAILED)], {"bs-02"},
         "no replica is ready (starting, failed or stopped); its caller's scope confines it to sites bs-02"),
        ([replica("a", "bs-01")], {"bs-03", "bs-02"},
         "no replica is deployed at sites bs-02, bs-03, the only ones its caller's scope allows"),
        ([replica("a", "bs-01"), replica("b", "bs-02", model="other")], {"bs-02"},
         "no ready replica serves model 'm' (or holds it as an adapter); its caller's scope confines it to sites bs-02"),
    ],
)  # fmt: skip
def test_nothing_eligible_inside_the_scope_is_refused_naming_the_scope(reps, allowed, reason):
    for decision in (router().choose_replicas(ctx(allowed=allowed), reps),
                     router().choose(ctx(allowed=allowed), ReplicaTable(reps, SITES), limit=3)):  # fmt: skip
        assert decision.tiers == [] and decision.rejection_kind == "UNAVAILABLE"
        assert decision.rejection == reason


def test_the_scope_mask_is_built_once_per_scope():
    table = ReplicaTable([replica("a", "bs-01"), replica("b", "bs-02"), replica("c", "bs-02")], SITES)
    mask = table.at_sites(frozenset({"bs-02", "bs-09"}))  # a site without replicas selects none
    assert mask.tolist() == [False, True, True] and table.at_sites(frozenset({"bs-09", "bs-02"})) is mask


# -- the routing kernel against a plain-Python reading of the filters and scorers ------------------

ORACLE_SITES = {
    "bs-01": SiteView("bs-01", latency_ms={"xapp": 1.0}),
    "bs-02": SiteView("bs-02", latency_ms={"xapp": 3.0}),
    "bs-03": SiteView("bs-03", latency_ms={"other": 20.0}),  # xapp gets its largest latency, locality 0.1
    "bs-04": SiteView("bs-04", drained=True, latency_ms={"xapp": 2.0}),
}


def oracle(reps, req, k, sites=ORACLE_SITES, margin=1.1, saturation=16, scale_ms=10.0):
    """The default config's decision, replica by replica in plain Python, as the filters' and scorers'
    docstrings say it: the best `k` (replica_id, score) best first, [] when none is left."""
    import math

    def latency_ms(site):
        lat = sites[site].latency_ms
        return lat.get(req.controller_id, max(lat.values(), default=0.0))

    rank = req.priority.rank
    cand = {}
    for r, (start_at, prefill, decode) in reps:
        if r.state is not ReplicaState.READY or not r.serves(req.model) or sites[r.site_id].drained:
            continue
        wait = max(start_at[rank] - NOW_S, 0.0)
        cand[r.replica_id] = (r, wait + 2 * latency_ms(r.site_id) / 1000 + req.prompt_tokens * prefill
                              + req.expected_tokens * decode[rank])  # fmt: skip
    if req.deadline is not None:
        cand = {i: c for i, c in cand.items() if c[1] <= (req.deadline - NOW_S) / margin}
        here = {i: c for i, c in cand.items() if req.site_ids and c[0].site_id == req.site_ids[0]}
        cand = here or cand
    if not cand:
        return []
    best = min(p for _, p in cand.values())
    scores = {}
    for i, (r, p) in cand.items():
        if r.site_id in req.site_ids:
            loc = 1.0 if r.site_id == req.site_ids[0] else 0.8
        elif req.controller_id in sites[r.site_id].latency_ms:
            loc = 0.5 * math.exp(-sites[r.site_id].latency_ms[req.controller_id] / scale_ms)
        else:
            loc = 0.1
        load = 1.0 - min(r.queue_depth, saturation) / saturation
        scores[i] = (load + (best + 0.1) / (p + 0.1) + loc) / 3
    return sorted(scores.items(), key=lambda kv: -kv[1])[:k]


NOW_S = 100.0


@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 20), st.sampled_from(["m", "m", "other"]),
                       st.sampled_from([ReplicaState.READY] * 3 + [ReplicaState.FAILED]),
                       st.lists(st.floats(-1, 2), min_size=3, max_size=3), st.floats(1e-4, 2e-3),
                       st.floats(0.01, 0.08)), min_size=1, max_size=30),
    st.sampled_from(list(Priority)), st.one_of(st.none(), st.floats(0.2, 5.0)),
    st.lists(st.sampled_from(["bs-01", "bs-02", "bs-03", "bs-04", "bs-09"]), max_size=3), st.integers(1, 4),
)  # fmt: skip
def test_the_kernel_decides_what_the_filters_and_scorers_say(rows, priority, budget, named, k):
    """The one-pass decision (fast path) and the filter-by-filter one (general path) pick the scores
    a plain-Python reading of the default filters and scorers picks, best first."""
    reps = []
    for i, (s, w, model, state, queue_s, prefill, decode) in enumerate(rows):
        view = replica(f"r{i}", f"bs-0{s + 1}", model, state=state, waiting=w)
        starts = sorted(NOW_S + q for q in queue_s)  # a lower class never starts sooner; < NOW_S: a slot is free
        reps.append((view, (starts, prefill, [decode * (1 + 0.1 * c) for c in range(3)])))
    table = ReplicaTable([v for v, _ in reps], ORACLE_SITES)
    for v, (starts, prefill, decode) in reps:
        table.set_admission(v.replica_id, prefill, decode, decode[0], starts)
    req = RoutingRequest("q", "m", "xapp", tuple(named), priority, 265, 16,
                         None if budget is None else NOW_S + budget, 16)  # fmt: skip
    c = RoutingContext(req, ORACLE_SITES, now=NOW_S)
    expect = oracle(reps, req, k)
    general = router()
    general._fast = None  # as a config the one pass does not cover would run
    for r in (router(), general):
        d = r.choose(c, table, limit=k)
        assert [d.scores[x.replica_id] for x in d.ranked] == pytest.approx([s for _, s in expect])
        assert (d.rejection is None) == bool(expect)
        if expect and expect[0][1] - expect[1 if len(expect) > 1 else 0][1] > 1e-6:  # no tie at the top
            assert d.ranked[0].replica_id == expect[0][0]


def test_no_decision_compiles_the_kernel():
    """The router's construction compiles it (or loads it from the disk cache); the decisions of any
    path, config or request then use that compiled version."""
    from airan.core.routing import kernel

    r = router()
    compiled = list(kernel.decide.signatures)
    assert len(compiled) == 1
    reps = [replica("a", "bs-01"), replica("b", "bs-02", waiting=3), replica("c", "bs-03")]
    table = ReplicaTable(reps, SITES)
    deadline = RoutingContext(RoutingRequest("q", "m", "xapp", ("bs-02",), Priority.NEAR_RT, 10, 4, 5.0, 4), SITES)
    for decide in (lambda c: r.choose(c, table, limit=2), lambda c: r.choose_replicas(c, reps),
                   lambda c: router(filters=["deadline", "ready"]).choose(c, table, limit=2),
                   lambda c: Router([], [(KvCacheScorer(), 1)]).choose(c, table, limit=2)):  # fmt: skip
        for c in (ctx(["bs-02"]), ctx(allowed={"bs-01"}), deadline):
            decide(c)
    assert kernel.decide.signatures == compiled


def test_a_registered_scorer_without_kernel_terms_runs_on_the_general_path(monkeypatch):
    """The extension recipe: a scorer class in SCORERS with only `score` (no `terms` for the kernel)."""
    from airan.core.routing import scorers as scorer_module

    class PreferB:
        name = "prefer_b"

        def score(self, ctx, table, eligible, state):
            return np.array([1.0 if v.replica_id == "b" else 0.0 for v in table.views])

    monkeypatch.setitem(scorer_module.SCORERS, "prefer_b", PreferB)
    r = Router(router().filters, [(PreferB(), 1.0)], rng=random.Random(0))
    assert r._fast is None
    reps = [replica("a", "bs-01"), replica("b", "bs-02"), replica("c", "bs-03")]
    assert r.choose(ctx(), ReplicaTable(reps, SITES), limit=2).ranked[0].replica_id == "b"
