"""Router on plain data: no Ray, vLLM or gRPC."""
import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from airan.config import RouterConfig, ScorerSpec
from airan.core.routing import (
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
