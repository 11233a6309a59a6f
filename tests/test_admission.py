"""Deadline-feasible admission, queues and soft site preference on plain data (no Ray, vLLM or gRPC)."""
import random
from dataclasses import replace

import numpy as np
import pytest

from airan.config import RouterConfig
from airan.core.admission import RateModel, ReplicaQueue, Ticket, engine_priority, predict_s
from airan.core.routing import Priority, ReplicaView, Router, RoutingContext, RoutingRequest, SiteView
from airan.core.routing.table import ReplicaTable

NOW = 1000.0  # the injected clock: every decision and queue event is at a time the test gives
SITES = {
    "bs-01": SiteView("bs-01", latency_ms={"xapp": 1.0}),
    "bs-02": SiteView("bs-02", latency_ms={"xapp": 10.0}),
}
BOUNDS = {Priority.NEAR_RT: 2, Priority.NON_RT: 2, Priority.BEST_EFFORT: 3}


def table(queue_s=(0.0, 0.0), decode_ms=(20.0, 20.0), prefill_ms=(0.2, 0.2)):
    """Two replicas, one per site; `queue_s`: how long until a new NEAR_RT request would start."""
    t = ReplicaTable([ReplicaView("r1", "bs-01", "m"), ReplicaView("r2", "bs-02", "m")], SITES)
    for rid, q, d, p in zip(("r1", "r2"), queue_s, decode_ms, prefill_ms):
        t.set_admission(rid, p / 1000, d / 1000, d / 1000, [NOW + q] * 3)
    return t


def ctx(deadline_s=None, site_ids=(), prompt=200, tokens=16, priority=Priority.NEAR_RT):
    req = RoutingRequest("q", "m", "xapp", tuple(site_ids), priority, prompt, tokens,
                         None if deadline_s is None else NOW + deadline_s, tokens)  # fmt: skip
    return RoutingContext(req, SITES, now=NOW)


def router():
    return Router.from_config(RouterConfig(), rng=random.Random(0))


def test_prediction_is_network_plus_queue_plus_prefill_plus_decode():
    # r1: 2 x 1 ms network + 0.3 s queue + 200 x 0.2 ms prefill + 16 x 20 ms decode
    np.testing.assert_allclose(predict_s(ctx(1.0), table(queue_s=(0.3, 0.0))), [0.662, 0.380])


def test_admitted_where_the_prediction_fits_with_the_prediction_reported():
    d = router().choose(ctx(deadline_s=1.0), table(queue_s=(0.3, 2.0)), limit=3)
    assert [r.replica_id for r in d.ranked] == ["r1"]  # r2's queue makes it miss the deadline
    assert d.predicted_s["r1"] == pytest.approx(0.662) and d.budget_s == pytest.approx(1.0)


def test_refused_at_once_with_resource_exhausted_when_only_load_is_in_the_way():
    d = router().choose(ctx(deadline_s=1.0), table(queue_s=(3.0, 5.0)), limit=3)
    assert d.tiers == [] and d.rejection_kind == "RESOURCE_EXHAUSTED"
    assert "1000 ms left" in d.rejection and "r1 at bs-01: 3362 ms predicted" in d.rejection
    assert "idle, r1 would take 362 ms" in d.rejection


def test_refused_with_deadline_exceeded_when_no_replica_could_ever_meet_it():
    d = router().choose(ctx(deadline_s=0.2), table(), limit=3)
    assert d.tiers == [] and d.rejection_kind == "DEADLINE_EXCEEDED"
    assert "even when idle" in d.rejection and "362 ms predicted" in d.rejection and "at least 398 ms" in d.rejection


def test_margin_makes_a_near_miss_a_refusal():
    # 0.362 s predicted, 0.38 s left: fits exactly, but not with the default 10% margin
    assert router().choose(ctx(deadline_s=0.38), table(queue_s=(0.0, 9.0)), limit=3).tiers == []
    exact = Router.from_config(RouterConfig(admission={"margin": 1.0}))
    assert exact.choose(ctx(deadline_s=0.38), table(queue_s=(0.0, 9.0)), limit=3).ranked[0].replica_id == "r1"


def test_a_request_without_a_deadline_is_always_admitted_and_goes_where_it_is_fastest():
    d = router().choose(ctx(None, site_ids=["bs-01"], priority=Priority.BEST_EFFORT), table(queue_s=(30.0, 0.0)))
    assert [r.replica_id for r in d.ranked] == ["r2", "r1"]
    assert d.placement_note.startswith("served at bs-02: it scored higher than bs-01")


def test_named_site_that_can_meet_the_deadline_keeps_the_request_even_if_another_is_faster():
    d = router().choose(ctx(1.0, site_ids=["bs-01"]), table(queue_s=(0.5, 0.0)), limit=3)
    assert [r.replica_id for r in d.ranked] == ["r1"] and d.placement_note == ""


def test_named_site_that_cannot_meet_the_deadline_sends_it_elsewhere_and_says_why():
    d = router().choose(ctx(1.0, site_ids=["bs-01"]), table(queue_s=(0.9, 0.0)), limit=3)
    assert [r.replica_id for r in d.ranked] == ["r2"]
    # r2's extra network time (2 x 10 ms) is in its prediction
    assert d.predicted_s["r2"] == pytest.approx(0.380)
    assert d.placement_note == ("served at bs-02: bs-01 cannot answer within the 1000 ms left "
                                "(predicted 1262 ms there, 380 ms at bs-02, network included)")  # fmt: skip


def test_named_site_that_cannot_meet_the_deadline_sends_it_nowhere_outside_the_callers_scope():
    scoped = RoutingContext(replace(ctx(1.0, site_ids=["bs-01"]).request, allowed_sites=frozenset({"bs-01"})),
                            SITES, now=NOW)  # fmt: skip
    d = router().choose(scoped, table(queue_s=(0.9, 0.0)), limit=3)
    assert d.tiers == [] and d.rejection_kind == "RESOURCE_EXHAUSTED"  # bs-02 would fit, but is out of scope
    assert "r1 at bs-01: 1262 ms predicted" in d.rejection and "r2" not in d.rejection
    assert d.rejection.endswith("; its caller's scope confines it to sites bs-01")
    # the prediction inside the scope is the one an unscoped request gets there
    admitted = router().choose(scoped, table(queue_s=(0.3, 0.0)), limit=3)
    assert [r.replica_id for r in admitted.ranked] == ["r1"]
    assert admitted.predicted_s["r1"] == pytest.approx(0.662)


def test_named_site_drained_sends_it_elsewhere_and_says_why():
    sites = dict(SITES, **{"bs-01": SiteView("bs-01", drained=True, latency_ms={"xapp": 1.0})})
    t = table()
    t.set_sites(sites)
    d = router().choose(RoutingContext(ctx(1.0, ["bs-01"]).request, sites, now=NOW), t, limit=3)
    assert [r.replica_id for r in d.ranked] == ["r2"] and "bs-01 is drained" in d.placement_note


def test_top_k_pick_over_a_large_table_returns_the_best_without_ranking_the_rest():
    views = [ReplicaView(f"r{i}", f"s{i % 50}", "m") for i in range(400)]
    sites = {f"s{i}": SiteView(f"s{i}", latency_ms={"xapp": 1.0}) for i in range(50)}
    t = ReplicaTable(views, sites)
    for i in range(400):
        t.set_admission(f"r{i}", 0.0002, 0.02, 0.02, [NOW + (0.0 if i == 123 else 0.5)] * 3)
    req = RoutingRequest("q", "m", "xapp", (), Priority.NEAR_RT, 200, 16, NOW + 1.0, 16)
    d = router().choose(RoutingContext(req, sites, now=NOW), t, limit=3)
    assert d.ranked[0].replica_id == "r123" and len(d.ranked) == 3


# -- measured rates ------------------------------------------------------------------------
def test_rates_start_at_the_prior_take_the_first_measurement_then_smooth():
    m = RateModel(smoothing=0.25, prefill_tok_s=1000, decode_tok_s=10, batch_slowdown=0.0)
    assert m.prefill_s_per_token == pytest.approx(0.001) and m.decode_s_per_token(1) == pytest.approx(0.1)
    m.observe(prompt_tokens=200, prefill_s=0.1, completion_tokens=11, decode_s=0.5)  # 0.5 ms, 50 ms
    assert m.prefill_s_per_token == pytest.approx(0.0005) and m.decode_s_per_token(1) == pytest.approx(0.05)
    m.observe(prompt_tokens=200, prefill_s=0.3, completion_tokens=11, decode_s=1.5)  # 1.5 ms, 150 ms
    assert m.prefill_s_per_token == pytest.approx(0.0005 + 0.25 * 0.001)
    assert m.decode_s_per_token(1) == pytest.approx(0.05 + 0.25 * 0.1)
    m.observe(prompt_tokens=0, prefill_s=0.0, completion_tokens=1, decode_s=0.0)  # nothing to learn from
    assert m.decode_s_per_token(1) == pytest.approx(0.075)


def test_rates_divide_out_the_batch_a_request_decoded_in():
    m = RateModel(smoothing=1.0, prefill_tok_s=1000, decode_tok_s=10, batch_slowdown=0.5)
    m.observe(200, 0.1, completion_tokens=11, decode_s=2.0, batch=3.0)  # 200 ms/token in a batch of 3
    assert m.decode_s_per_token(1) == pytest.approx(0.1) and m.decode_s_per_token(3) == pytest.approx(0.2)
    assert m.service_s(prompt_tokens=100, tokens=10, batch=1) == pytest.approx(100 * 0.0005 + 10 * 0.1)


def test_rates_are_learnt_at_full_speed_and_predicted_at_the_cpu_share_in_force():
    """Radio first caps a replica's CPU: what it measured at a quarter of its CPU must not be what it
    is predicted at once the headroom comes back (and the other way round)."""
    m = RateModel(smoothing=1.0, prefill_tok_s=1000, decode_tok_s=10, batch_slowdown=0.0)
    m.observe(200, 0.4, completion_tokens=11, decode_s=2.0, share=0.25)  # 2 ms and 200 ms per token at 1/4
    assert m.prefill_s(1.0) == pytest.approx(0.0005) and m.decode_s_per_token(1, 1.0) == pytest.approx(0.05)
    assert m.service_s(prompt_tokens=100, tokens=10, batch=1, share=0.5) == pytest.approx(100 * 0.001 + 10 * 0.1)
    assert m.decode_s_per_token(1, share=0.0) == pytest.approx(0.05 / 0.01)  # capped to nothing: slow, finite
    q = ReplicaQueue("r1", slots=1, bounds={p: 4 for p in Priority}, max_waiting=4)
    t = Ticket("a", Priority.NEAR_RT, NOW + 5, service_s=9.0, prompt_tokens=100, tokens=10)
    q.offer(t, NOW)
    q.reprice(m, share=0.5)
    assert t.service_s == pytest.approx(1.1)


# -- per-replica queues -----------------------------------------------------------------
def ticket(name, priority=Priority.BEST_EFFORT, deadline=None, service_s=1.0):
    return Ticket(name, priority, deadline, service_s)


def test_queue_serves_classes_in_order_and_earliest_deadline_first_within_a_class():
    q = ReplicaQueue("r1", slots=1, bounds={p: 10 for p in Priority}, max_waiting=10)
    running = ticket("running")
    assert q.offer(running, NOW).started
    for t in (ticket("be1"), ticket("nrt-late", Priority.NON_RT, NOW + 9), ticket("be2"),
              ticket("near-late", Priority.NEAR_RT, NOW + 5), ticket("nrt-early", Priority.NON_RT, NOW + 3),
              ticket("near-early", Priority.NEAR_RT, NOW + 2)):  # fmt: skip
        assert q.offer(t, NOW).queued
    order, current = [], running
    while q.waiting:
        (current,) = q.finish(current, NOW)
        order.append(current.request_id)
    assert order == ["near-early", "near-late", "nrt-early", "nrt-late", "be1", "be2"]


def test_queue_bounds_per_class_and_best_effort_is_shed_first_under_pressure():
    q = ReplicaQueue("r1", slots=1, bounds=BOUNDS, max_waiting=4)
    q.offer(ticket("running"), NOW)
    be = [ticket(f"be{i}") for i in range(3)]
    assert all(q.offer(t, NOW).queued for t in be)
    full = q.offer(ticket("be3"), NOW)
    assert not full.accepted and "3 BEST_EFFORT requests already wait at r1" in full.refusal
    assert q.offer(ticket("n1", Priority.NON_RT, NOW + 5), NOW).queued  # 4 waiting: the total bound
    near = q.offer(ticket("near", Priority.NEAR_RT, NOW + 1), NOW)
    assert near.queued and [t.request_id for t in near.shed] == ["be2"]  # the last best-effort one
    assert [t.request_id for t in q.waiting] == ["near", "n1", "be0", "be1"]
    # a class with nothing below it to shed is refused at the total bound
    q2 = ReplicaQueue("r2", slots=1, bounds=BOUNDS, max_waiting=1)
    q2.offer(ticket("running"), NOW)
    q2.offer(ticket("near1", Priority.NEAR_RT, NOW + 1), NOW)
    refused = q2.offer(ticket("near2", Priority.NEAR_RT, NOW + 2), NOW)
    assert not refused.accepted and "none of a lower class" in refused.refusal


def test_withdrawn_tickets_leave_the_queue_and_free_their_class_bound():
    q = ReplicaQueue("r1", slots=1, bounds=BOUNDS, max_waiting=10)
    q.offer(ticket("running"), NOW)
    a, b = ticket("a", Priority.NEAR_RT, NOW + 1), ticket("b", Priority.NEAR_RT, NOW + 1)
    q.offer(a, NOW), q.offer(b, NOW)
    assert not q.offer(ticket("c", Priority.NEAR_RT, NOW + 1), NOW).accepted
    assert q.withdraw(a) and not q.withdraw(a)
    assert q.offer(ticket("c", Priority.NEAR_RT, NOW + 1), NOW).queued and q.ahead_of(b) == 0


def test_start_times_schedule_the_waiting_ones_ahead_of_each_class_onto_the_slots():
    q = ReplicaQueue("r1", slots=2, bounds={p: 10 for p in Priority}, max_waiting=10)
    assert q.start_times(NOW) == [NOW] * 3  # a free slot: start now
    q.offer(ticket("run1", service_s=4.0), NOW)
    q.offer(ticket("run2", service_s=1.0), NOW)
    assert q.start_times(NOW) == [NOW + 1.0] * 3  # both slots busy: the first frees at +1
    q.offer(ticket("near", Priority.NEAR_RT, NOW + 9, service_s=0.5), NOW)
    q.offer(ticket("be", service_s=2.0), NOW)
    # NEAR_RT waits for the one NEAR_RT ahead (+1 .. +1.5); NON_RT too; BEST_EFFORT also behind 'be'
    assert q.start_times(NOW) == [NOW + 1.5, NOW + 1.5, NOW + 3.5]
    # a running request past its predicted end is still running: it frees its slot no sooner than
    # min_remaining_s from now
    assert q.start_times(NOW + 2.0, min_remaining_s=0.1)[0] == pytest.approx(NOW + 2.1 + 0.5)


def test_latest_start_leaves_room_for_the_service_and_the_network():
    t = Ticket("a", Priority.NEAR_RT, NOW + 1.0, service_s=0.4, network_s=0.01)
    assert t.latest_start == pytest.approx(NOW + 0.59) and ticket("b").latest_start is None


def test_engine_priority_orders_by_class_then_deadline():
    keys = [engine_priority(Priority.BEST_EFFORT, None), engine_priority(Priority.NEAR_RT, NOW + 2),
            engine_priority(Priority.NON_RT, NOW + 1), engine_priority(Priority.NEAR_RT, NOW + 1)]  # fmt: skip
    assert sorted(keys) == [keys[3], keys[1], keys[2], keys[0]]


def test_reprice_redoes_every_tickets_prediction_at_the_current_rates():
    rates = RateModel(smoothing=1.0, prefill_tok_s=1000, decode_tok_s=1000, batch_slowdown=0.0)
    q = ReplicaQueue("r1", slots=1, bounds={p: 10 for p in Priority}, max_waiting=10)
    running = Ticket("a", Priority.BEST_EFFORT, None, rates.service_s(100, 40, 1), prompt_tokens=100, tokens=40)
    q.offer(running, NOW)
    assert q.start_times(NOW)[0] == pytest.approx(NOW + 0.14)
    rates.observe(100, 0.1, 41, 40 * 0.05)  # the replica is 50x slower at decoding than assumed
    q.reprice(rates)
    assert running.service_s == pytest.approx(0.1 + 40 * 0.05) and q.start_times(NOW)[0] == pytest.approx(NOW + 2.1)


def test_a_lower_class_never_starts_beside_a_running_higher_class():
    q = ReplicaQueue("r1", slots=4, bounds={p: 10 for p in Priority}, max_waiting=10)
    near = Ticket("near", Priority.NEAR_RT, NOW + 1, service_s=0.8)
    assert q.offer(near, NOW).started
    be = ticket("be", service_s=2.0)
    assert q.offer(be, NOW).queued  # three slots free, but its prefill would stall the NEAR_RT decode
    assert q.start_times(NOW) == [NOW, NOW + 0.8, NOW + 0.8]  # only another NEAR_RT may join it
    assert q.offer(Ticket("near2", Priority.NEAR_RT, NOW + 1, service_s=0.8), NOW).started
    assert q.finish(near, NOW + 0.5) == []  # near2 still runs
    assert [t.request_id for t in q.finish(q.running[0], NOW + 0.8)] == ["be"]
    # the other way round: a higher class joins running lower ones while a slot is free
    assert q.offer(Ticket("near3", Priority.NEAR_RT, NOW + 2, service_s=0.8), NOW + 0.9).started


# -- BEST_EFFORT yields to higher classes (preempt_best_effort) ----------------------------------
def preempting_queue(slots):
    return ReplicaQueue("r1", slots=slots, bounds={p: 10 for p in Priority}, max_waiting=10, preempt_best_effort=True)


def test_a_higher_class_preempts_running_best_effort_for_a_slot_latest_started_first():
    q = preempting_queue(slots=2)
    early, late = ticket("be-early"), ticket("be-late")
    q.offer(early, NOW), q.offer(late, NOW + 0.5)
    near = q.offer(Ticket("near", Priority.NEAR_RT, NOW + 5, service_s=0.5), NOW + 1)
    assert near.started and [t.request_id for t in near.preempted] == ["be-late"]  # the least work lost
    assert late.preempted and not early.preempted and [t.request_id for t in q.running] == ["be-early", "near"]
    # a BEST_EFFORT request never preempts its own class; NON_RT does
    q2 = preempting_queue(slots=1)
    q2.offer(ticket("be"), NOW)
    assert q2.offer(ticket("be-new"), NOW).queued
    assert [t.request_id for t in q2.offer(Ticket("nrt", Priority.NON_RT, NOW + 9, 1.0), NOW).preempted] == ["be"]


def test_only_as_many_best_effort_are_preempted_as_the_deadline_needs():
    q = preempting_queue(slots=8)
    be = [ticket(f"be{i}") for i in range(5)]
    for i, t in enumerate(be):
        q.offer(t, NOW + i)
    # a free slot, but the NEAR_RT request meets its deadline only in a batch of 3 or fewer
    offer = q.offer(Ticket("near", Priority.NEAR_RT, NOW + 9, 1.0), NOW + 9, fits=lambda batch: batch <= 3)
    assert offer.started and [t.request_id for t in offer.preempted] == ["be4", "be3", "be2"]
    assert len(q.running) == 3
    # when no number of preemptions would do, none is made beyond what the slot needs
    q2 = preempting_queue(slots=2)
    q2.offer(ticket("a"), NOW), q2.offer(ticket("b"), NOW)
    offer = q2.offer(Ticket("near", Priority.NEAR_RT, NOW + 1, 1.0), NOW, fits=lambda batch: False)
    assert [t.request_id for t in offer.preempted] == ["b"]


def test_without_preemption_best_effort_keeps_its_slot():
    q = ReplicaQueue("r1", slots=1, bounds={p: 10 for p in Priority}, max_waiting=10)
    q.offer(ticket("be"), NOW)
    near = q.offer(Ticket("near", Priority.NEAR_RT, NOW + 5, 1.0), NOW, fits=lambda batch: batch <= 1)
    assert near.queued and near.preempted == ()


def test_running_best_effort_holds_no_slot_against_a_class_that_may_preempt_it():
    q = preempting_queue(slots=2)
    q.offer(ticket("be1", service_s=4.0), NOW), q.offer(ticket("be2", service_s=3.0), NOW)
    # NEAR_RT and NON_RT would start now (preempting); BEST_EFFORT waits for a slot to free at +3
    assert q.start_times(NOW) == [NOW, NOW, NOW + 3.0]
    assert q.holding_counts() == [0, 0, 2]
    q.offer(Ticket("nrt", Priority.NON_RT, NOW + 9, service_s=2.0), NOW)  # preempts be2
    assert q.holding_counts() == [1, 1, 2] and q.start_times(NOW) == [NOW, NOW, NOW + 2.0]


def test_the_router_predicts_each_class_at_the_batch_it_would_join():
    t = table()
    t.set_admission("r1", 0.0002, [0.02, 0.02, 0.05], 0.02, [NOW] * 3)  # BEST_EFFORT joins a full batch
    near, be = predict_s(ctx(1.0), t)[0], predict_s(ctx(1.0, priority=Priority.BEST_EFFORT), t)[0]
    assert near == pytest.approx(0.002 + 0.04 + 16 * 0.02) and be == pytest.approx(0.002 + 0.04 + 16 * 0.05)
