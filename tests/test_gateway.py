"""The control-plane core with in-process fake replicas: every query ends in one answer or one error."""
import asyncio
import time

import pytest

from airan.serving.engine.protocol import EngineDeadError
from airan.errors import AiranError, ErrorKind
from airan.serving.gateway import Answer, Delta, Gateway
from airan.core.query import KpiSample, Query
from airan.factory.tiny import ensure_tiny_model
from airan.core.prompting import PromptRenderer
from airan.serving.sites import SiteRegistry
from airan.config import parse_config
from airan.core.routing import Priority
from fakes import CONFIG, FakePool, FakeReplica, call_id


@pytest.fixture(scope="module")
def renderer():
    # the real renderer with the generated tiny model's tokenizer and chat template
    return PromptRenderer(ensure_tiny_model())


@pytest.fixture
def gateway(renderer):
    def make(replicas=None, config=CONFIG):
        replicas = replicas or {"r1": ("bs-01", FakeReplica()), "r2": ("bs-02", FakeReplica())}
        pool = FakePool(replicas)
        sites = SiteRegistry(config.sites, config.radio.min_ai_headroom)
        return Gateway(config, pool, sites, {"m": renderer}), pool

    return make


def q(question="why is the cell slow", **kw):
    return Query(question=question, request_id=kw.pop("request_id", ""), **kw)


async def test_unary_answer_from_requested_site_with_counts_and_timings(gateway):
    gw, _ = gateway()
    ans = await gw.ask(q(site_ids=("bs-02",), controller_id="x", max_tokens=3), request_id=call_id())
    assert (ans.site_id, ans.replica_id, ans.completion_tokens, ans.finish_reason) == ("bs-02", "r2", 3, "length")
    assert ans.text == "ok ok ok " and ans.prompt_tokens == len(ans.prompt.token_ids) > 20
    assert 0 <= ans.queue_ms and ans.ttft_ms <= ans.total_ms
    assert gw.in_flight == {}


async def test_stream_yields_deltas_then_exactly_one_answer(gateway):
    gw, _ = gateway()
    events = [e async for e in gw.stream(q(max_tokens=4), request_id=call_id())]
    assert [type(e) for e in events] == [Delta] * 4 + [Answer]
    assert "".join(e.text for e in events[:-1]) == events[-1].text


@pytest.mark.parametrize(
    "query, kind, words",
    [
        (q("   "), ErrorKind.INVALID_ARGUMENT, "question is empty"),
        (q(site_ids=("bs-99",)), ErrorKind.NOT_FOUND, "bs-99"),
        (q(max_tokens=901), ErrorKind.INVALID_ARGUMENT, "limit of 900"),
        (q("word " * 300, max_tokens=900), ErrorKind.INVALID_ARGUMENT, "-token prompt"),
        (q(mode="diagnosis", max_tokens=10), ErrorKind.INVALID_ARGUMENT, "max_tokens >= 16"),
        (q("word " * 900), ErrorKind.INVALID_ARGUMENT, "characters"),
        (q(deadline=time.monotonic() - 1), ErrorKind.DEADLINE_EXCEEDED, "already passed"),
        (q(temperature=float("nan")), ErrorKind.INVALID_ARGUMENT, "temperature"),
        (q(kpis=(KpiSample("", 1.0),)), ErrorKind.INVALID_ARGUMENT, "no name"),
        (q(model="nope"), ErrorKind.NOT_FOUND, "unknown model"),
    ],
)
async def test_bad_input_maps_to_an_actionable_error(gateway, query, kind, words):
    gw, pool = gateway()
    with pytest.raises(AiranError) as e:
        await gw.ask(query, request_id=call_id())
    assert e.value.kind is kind and words in e.value.message
    assert all(r.calls == 0 for _, r in pool.replicas.values())


async def test_no_replica_when_all_sites_drained_or_surging(gateway):
    gw, _ = gateway()
    gw.sites.set_drained("bs-01", True)
    assert gw.sites.report_ran_load("bs-02", 0.9) is True
    with pytest.raises(AiranError) as e:
        await gw.ask(q(), request_id=call_id())
    assert e.value.kind is ErrorKind.UNAVAILABLE and "headroom" in e.value.message


async def test_drained_site_is_avoided_even_when_requested(gateway):
    gw, _ = gateway()
    gw.sites.set_drained("bs-01", True)
    assert (await gw.ask(q(site_ids=("bs-01",)), request_id=call_id())).site_id == "bs-02"


async def test_dead_replica_before_first_token_fails_over_and_is_marked(gateway):
    dead = FakeReplica(fail_before=EngineDeadError("engine process exited"))
    gw, pool = gateway({"r1": ("bs-01", dead), "r2": ("bs-02", FakeReplica())})
    ans = await gw.ask(q(site_ids=("bs-01",)), request_id=call_id())
    assert ans.replica_id == "r2" and "r1" in pool.failed


def with_admission(config=CONFIG, **admission):
    """CONFIG with router.admission settings changed (e.g. priors that make admission optimistic)."""
    raw = config.model_dump(mode="json", exclude_none=True)
    raw["router"]["admission"].update(admission)
    return parse_config(raw)


# admission believes the replicas are fast, so it admits what the slow fakes then cannot finish in time
OPTIMISTIC = with_admission(prior_decode_tok_s=10_000, prior_prefill_tok_s=100_000)


async def test_deadline_during_generation_aborts_the_replica_request(gateway):
    slow = FakeReplica(words=("w",) * 50, delay=0.05)
    gw, _ = gateway({"r1": ("bs-01", slow)}, config=OPTIMISTIC)
    with pytest.raises(AiranError) as e:
        await gw.ask(q(max_tokens=50, deadline=time.monotonic() + 0.12), request_id=call_id())
    assert e.value.kind is ErrorKind.DEADLINE_EXCEEDED
    assert len(slow.aborted) == 1 and gw.in_flight == {}


async def test_client_cancel_aborts_and_releases_in_flight(gateway):
    slow = FakeReplica(words=("w",) * 50, delay=0.05)
    gw, _ = gateway({"r1": ("bs-01", slow)})
    task = asyncio.create_task(gw.ask(q(max_tokens=50), request_id=call_id()))
    await asyncio.sleep(0.12)
    assert gw.in_flight["r1"] == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert slow.aborted and gw.in_flight == {}


async def test_idempotent_retry_returns_the_same_answer_without_recomputing(gateway):
    replica = FakeReplica(delay=0.01)
    gw, _ = gateway({"r1": ("bs-01", replica)})
    first, concurrent = await asyncio.gather(gw.ask(q(request_id="abc")), gw.ask(q(request_id="abc")))
    again = await gw.ask(q(request_id="abc"))
    assert first == concurrent == again and replica.calls == 1
    streamed = [e async for e in gw.stream(q(request_id="abc"))]
    assert streamed == [first]


async def test_load_is_spread_across_replicas(gateway):
    gw, pool = gateway(
        {"r1": ("bs-01", FakeReplica(delay=0.02)), "r2": ("bs-01", FakeReplica(delay=0.02))}
    )
    answers = await asyncio.gather(*(gw.ask(q(), request_id=call_id()) for _ in range(8)))
    served = {a.replica_id for a in answers}
    assert served == {"r1", "r2"}


T = 1_700_000_000.0
# bs-01/c1 saturates while its co-site cell stays put: evidence the prompt must carry, NaN included
DIAG_KPIS = tuple(
    KpiSample(name, v, unit, cell, T + 60 * i)
    for i in range(3)
    for name, unit, cell, v in (
        ("RRU.PrbTotDl", "%", "bs-01/c1", (60.0, 62.0, 99.0)[i]),
        ("DRB.UEThpDl", "kbit/s", "bs-01/c1", (16000.0, 15800.0, 6000.0)[i]),
        ("RRU.PrbTotDl", "%", "bs-01/c2", (40.0, 41.0, 40.0)[i]),
        ("DRB.UEThpDl", "kbit/s", "bs-01/c2", (15000.0, float("nan"), float("nan"))[i]),
    )
)


async def test_diagnosis_is_a_compact_answer_under_a_grammar_of_context_cells(gateway):
    replica = FakeReplica(answers=["CONGESTION A; RRU.PrbTotDl"])
    gw, _ = gateway({"r1": ("bs-01", replica)})
    ans = await gw.ask(q(mode="diagnosis", kpis=DIAG_KPIS), request_id=call_id())
    d = ans.diagnosis
    assert d.cause == "CONGESTION" and d.affected_cell_ids == ("bs-01/c1",) and ans.attempts == 1
    # severity and the action with its parameter come from the cause's playbook, aimed at the cell
    assert d.severity == "MEDIUM" and d.actions[0].type == "OFFLOAD_TRAFFIC" and d.actions[0].value == 20
    assert d.actions[0].target_cell_id == "bs-01/c1"
    assert d.cited_kpis == ("RRU.PrbTotDl",) and "bs-01/c1 RRU.PrbTotDl 61 → 99% (+38 points)" in d.rationale
    assert d.evidence and any("bs-01/c1 PRBs saturated" in line for line in d.evidence)
    grammar = replica.params[0].grammar
    assert grammar.aliases == ("A", "B") and "RRU.PrbTotDl" in grammar.kpis
    assert replica.params[0].max_tokens == 64 and ans.prompt.version == "netops-v3"


async def test_a_near_rt_diagnosis_is_brief(gateway):
    from airan.core.routing import Priority

    replica = FakeReplica(answers=["CONGESTION A"])
    gw, _ = gateway({"r1": ("bs-01", replica)})
    ans = await gw.ask(q(mode="diagnosis", kpis=DIAG_KPIS, priority=Priority.NEAR_RT), request_id=call_id())
    assert ans.diagnosis.cause == "CONGESTION" and replica.params[0].grammar.kpis == ()
    assert replica.params[0].max_tokens == 16


def expected_tokens_of_each_decision(gw) -> list[int]:
    """The tokens admission expected in each routing decision the gateway makes from now on."""
    expected = []
    choose = gw.router.choose

    def spy(ctx, table, limit=None):
        expected.append(ctx.request.expected_tokens)
        return choose(ctx, table, limit)

    gw.router.choose = spy
    return expected


async def test_admission_expects_a_diagnosis_at_the_length_the_models_answers_run(gateway):
    replica = FakeReplica(answers=["CONGESTION A"] * 12)  # one token each, against a bound of 16
    gw, _ = gateway({"r1": ("bs-01", replica)})
    expected = expected_tokens_of_each_decision(gw)
    for _ in range(10):
        await gw.ask(q(mode="diagnosis", kpis=DIAG_KPIS, priority=Priority.NEAR_RT), request_id=call_id())
    await gw.ask(q(priority=Priority.NEAR_RT, max_tokens=16), request_id=call_id())  # free text: its bound
    assert expected[:8] == [16] * 8  # the bound until 8 answers have been seen
    assert expected[8:] == [1, 1, 16] and all(p.max_tokens == 16 for p in replica.params)  # the engine's cap stays


def test_a_capped_replica_is_predicted_to_start_up_to_the_rest_of_a_cap_period_later(renderer):
    from dataclasses import replace

    from airan.serving.gateway import CAP_PERIOD_S

    class CappedPool(FakePool):
        def views(self):
            return [replace(v, cpu_share=0.2 if v.replica_id == "r1" else 1.0) for v in super().views()]

    pool = CappedPool({"r1": ("bs-01", FakeReplica()), "r2": ("bs-02", FakeReplica())})
    gw = Gateway(CONFIG, pool, SiteRegistry(CONFIG.sites, CONFIG.radio.min_ai_headroom), {"m": renderer})
    before = gw.clock()
    table = gw._routing_table()
    capped, free = table.start_at[:, table.index["r1"]], table.start_at[:, table.index["r2"]]
    # idle both: the uncapped one can start now, the one capped at 0.2 CPU within 0.8 of a period
    assert list(capped - free) == pytest.approx([0.8 * CAP_PERIOD_S] * len(free), abs=0.005)
    assert (free >= before).all() and (free - before < 0.005).all()


async def test_invalid_diagnosis_is_retried_once_with_sampling(gateway):
    replica = FakeReplica(answers=["CONGESTION Z", "CONGESTION A"])
    gw, _ = gateway({"r1": ("bs-01", replica)})
    ans = await gw.ask(q(mode="diagnosis", kpis=DIAG_KPIS), request_id=call_id())
    assert ans.attempts == 2 and replica.calls == 2 and replica.params[1].temperature >= 0.7


async def test_invalid_diagnosis_twice_is_an_error_never_a_success(gateway):
    replica = FakeReplica(answers=["ALIENS A", "NORMAL A"])
    gw, _ = gateway({"r1": ("bs-01", replica)})
    with pytest.raises(AiranError) as e:
        await gw.ask(q(mode="diagnosis", kpis=DIAG_KPIS), request_id=call_id())
    assert e.value.kind is ErrorKind.INTERNAL and "2 attempt(s)" in e.value.message and "no known cause" in e.value.message


async def test_diagnosis_stream_sends_only_the_checked_answer(gateway):
    gw, _ = gateway({"r1": ("bs-01", FakeReplica(answers=["CONGESTION A"]))})
    events = [e async for e in gw.stream(q(mode="diagnosis", kpis=DIAG_KPIS), request_id=call_id())]
    assert len(events) == 1 and events[0].diagnosis.cause == "CONGESTION"


async def test_free_text_passages_are_dropped_to_fit_and_reported(gateway):
    gw, _ = gateway()
    kpis = tuple(KpiSample("DRB.UEThpDl", 100.0 + i, "kbit/s", "bs-01/c1", 1000.0 + i) for i in range(60))
    question = "What does DRB.UEThpDl measure and why does throughput fall in congestion?"
    roomy = await gw.ask(q(question, kpis=kpis, max_tokens=8), request_id=call_id())
    assert roomy.prompt.version == "qa-v1" and roomy.prompt.context_rows == 5  # the evidence + 4 retrieved
    assert [c.passage_id for c in roomy.prompt.passages[:2]] == ["evidence", "kpi:DRB.UEThpDl"]
    tight = await gw.ask(q(question, kpis=kpis, max_tokens=780), request_id=call_id())
    assert tight.prompt.context_rows == 5
    assert roomy.prompt.context_rows_dropped < tight.prompt.context_rows_dropped < 5
    assert tight.prompt_tokens <= 1024 - 780


async def test_free_text_answer_cites_only_passages_shown_for_it(gateway):
    text = "It counts PRBs [kpi:RRU.PrbUsedDl], see [kpi:RRU.PrbUsedDl] and [kpi:Made.UpKpi] [cause:CONGESTION]"
    gw, _ = gateway({"r1": ("bs-01", FakeReplica(answers=[text]))})
    ans = await gw.ask(q("What does RRU.PrbUsedDl measure?", max_tokens=64), request_id=call_id())
    shown = [c.passage_id for c in ans.prompt.passages]
    assert shown[0] == "kpi:RRU.PrbUsedDl" and "cause:CONGESTION" not in shown
    assert [c.passage_id for c in ans.citations] == ["kpi:RRU.PrbUsedDl"]
    assert ans.citations_dropped == 2 and ans.citations[0].title and ans.citations[0].score > 0


async def test_free_text_names_neither_the_base_nor_the_prompt_holds_are_flagged_not_rewritten(gateway):
    text = "RRU.PrbUsedDl counts used PRBs; compare RRU.PrbMadeUp, MyCustom.Kpi and HoMagicOffset [kpi:Made.UpKpi]"
    gw, _ = gateway({"r1": ("bs-01", FakeReplica(answers=[text]))})
    ans = await gw.ask(q("What does RRU.PrbUsedDl measure, next to MyCustom.Kpi?", max_tokens=64), request_id=call_id())
    assert ans.text.strip() == text  # the caller reads what the model said, and which names nothing backs
    assert ans.unverified_names == ("RRU.PrbMadeUp", "HoMagicOffset")  # a cited id or a name asked about is not one
    from airan.serving.api.convert import answer_to_response

    assert list(answer_to_response(ans).unverified_names) == ["RRU.PrbMadeUp", "HoMagicOffset"]


async def test_a_request_id_being_streamed_is_not_computed_twice(gateway):
    replica = FakeReplica(delay=0.02)
    gw, _ = gateway({"r1": ("bs-01", replica)})
    stream = gw.stream(q(request_id="s1"))
    first = await anext(stream)  # the stream now holds the id
    waiter = asyncio.create_task(gw.ask(q(request_id="s1")))
    with pytest.raises(AiranError) as e:
        await anext(gw.stream(q(request_id="s1")))
    assert e.value.kind is ErrorKind.ALREADY_EXISTS
    rest = [ev async for ev in stream]
    assert isinstance(first, Delta) and await waiter == rest[-1] and replica.calls == 1


async def test_a_one_off_call_is_answered_under_its_call_id_and_leaves_no_idempotency_record(gateway):
    replica = FakeReplica()
    gw, _ = gateway({"r1": ("bs-01", replica)})
    a = await gw.ask(q(), request_id="call-a")
    b = [e async for e in gw.stream(q(), request_id="call-b")][-1]
    assert (a.request_id, b.request_id) == ("call-a", "call-b") and replica.calls == 2
    assert not any(gw.remembers(k) for k in ("", "call-a", "call-b"))
    assert (await gw.ask(q(), request_id="call-a")) is not a and replica.calls == 3  # computed again


async def test_a_client_key_is_the_call_id_and_is_remembered(gateway):
    gw, _ = gateway()
    ans = await gw.ask(q(request_id="key-1"), request_id="key-1")
    assert ans.request_id == "key-1" and gw.remembers("key-1")
    assert await gw.ask(q(request_id="key-1")) == ans


async def test_a_call_without_any_id_or_with_two_different_ids_is_a_callers_bug(gateway):
    gw, pool = gateway()
    with pytest.raises(ValueError, match="needs an id"):
        await gw.ask(q())
    with pytest.raises(ValueError, match="differs"):
        await gw.ask(q(request_id="key"), request_id="other")
    assert all(r.calls == 0 for _, r in pool.replicas.values())


def test_replica_node_ids_come_from_the_pool_protocol(gateway):
    gw, _ = gateway()
    assert gw.replica_node_ids() == {"r1": "node-bs-01", "r2": "node-bs-02"}


async def test_an_answer_cut_by_max_tokens_loses_only_its_unfinished_citation(gateway):
    replica = FakeReplica(answers=["CONGESTION A; RRU.PrbTotDl, DRB.UEThp"])  # "length": the fake's last chunk
    gw, _ = gateway({"r1": ("bs-01", replica)})
    ans = await gw.ask(q(mode="diagnosis", kpis=DIAG_KPIS), request_id=call_id())
    assert ans.finish_reason == "length" and ans.diagnosis.cited_kpis == ("RRU.PrbTotDl",)


def test_the_answer_grammar_allows_distinct_cells_and_citations_in_order_only():
    import re

    from airan.core.causes import CAUSES
    from airan.core.diagnosis import AnswerGrammar

    g = AnswerGrammar(tuple(CAUSES), ("A", "B", "C"), ("RRU.PrbTotDl", "TB.BlerDl", "L1M.SS-SINR", "DRB.UEThpDl"))
    ok = re.compile(g.regex()).fullmatch
    assert ok("CONGESTION A,C; RRU.PrbTotDl, L1M.SS-SINR") and ok("NORMAL") and ok("INTERFERENCE B")
    for bad in ("CONGESTION A,A", "CONGESTION B,A", "CONGESTION A; TB.BlerDl, TB.BlerDl", "NORMAL A",
                "CONGESTION A; RRU.PrbTotDl, TB.BlerDl, L1M.SS-SINR, DRB.UEThpDl"):  # fmt: skip
        assert not ok(bad), bad
    assert 'cells ::= "A" | "B" | "C" | "A,B" | "A,C" | "B,C" | "A,B,C"' in g.gbnf()
    many = AnswerGrammar(tuple(CAUSES), tuple("ABCDEFGHJK"))  # past 8 cells: any letters, bounded count
    assert re.compile(many.regex()).fullmatch("CONGESTION K,A")


# -- admission, priority queues, site preference, the detector's answer in time ------------------------
def one_slot(**admission):
    """One request per replica engine at a time (the rest wait in the gateway's queue)."""
    return with_admission(OPTIMISTIC, slots=1, **admission)


async def started(replica, n, timeout=2.0):
    """Wait (bounded) until the fake replica has received `n` requests."""
    async with asyncio.timeout(timeout):
        while replica.calls < n:
            await asyncio.sleep(0.005)


async def test_a_deadline_no_replica_can_meet_because_of_load_is_refused_at_once(gateway):
    slow = FakeReplica(words=("w",) * 40, delay=0.05)
    gw, _ = gateway({"r1": ("bs-01", slow)}, config=one_slot())
    hog = asyncio.create_task(gw.ask(q(max_tokens=40, priority=Priority.NON_RT), request_id=call_id()))
    await started(slow, 1)
    gw._rates_of("r1").observe(100, 0.01, 40, 39 * 0.05)  # as if it had learnt the replica: 50 ms a token
    gw._queue_changed("r1")
    t0 = time.monotonic()
    with pytest.raises(AiranError) as e:
        await gw.ask(q(max_tokens=8, priority=Priority.NEAR_RT, deadline=time.monotonic() + 1.0), request_id=call_id())
    assert time.monotonic() - t0 < 0.5  # at once: well before the 1 s budget, not after it
    assert e.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    assert "refused at admission" in e.value.message and "ms predicted" in e.value.message and "ms left" in e.value.message
    assert slow.calls == 1  # the refused request never reached the engine
    hog.cancel()
    await asyncio.gather(hog, return_exceptions=True)


async def test_a_deadline_no_replica_could_ever_meet_is_deadline_exceeded_at_once(gateway):
    gw, pool = gateway()  # the default priors: 25 tokens/s, so 100 tokens take 4 s
    with pytest.raises(AiranError) as e:
        await gw.ask(q(max_tokens=100, deadline=time.monotonic() + 0.5), request_id=call_id())
    assert e.value.kind is ErrorKind.DEADLINE_EXCEEDED and "even when idle" in e.value.message
    assert "allow at least" in e.value.message and all(r.calls == 0 for _, r in pool.replicas.values())


async def test_queued_requests_reach_the_engine_by_class_then_earliest_deadline(gateway):
    replica = FakeReplica(words=("w",) * 3, delay=0.03)
    gw, _ = gateway({"r1": ("bs-01", replica)}, config=one_slot())
    now = time.monotonic()
    first = asyncio.create_task(gw.ask(q(max_tokens=3, priority=Priority.NON_RT, deadline=now + 60),
                                       request_id="running"))  # fmt: skip
    await started(replica, 1)
    order = [("be-2", Priority.BEST_EFFORT, None), ("non-rt", Priority.NON_RT, now + 30),
             ("near-late", Priority.NEAR_RT, now + 20), ("near-early", Priority.NEAR_RT, now + 10)]  # fmt: skip
    rest = [asyncio.create_task(gw.ask(q(max_tokens=3, priority=p, deadline=d), request_id=rid)) for rid, p, d in order]
    answers = await asyncio.gather(first, *rest)
    assert replica.request_ids == ["running", "near-early", "near-late", "non-rt", "be-2"]
    assert [a.request_id for a in answers] == ["running", "be-2", "non-rt", "near-late", "near-early"]
    assert all(isinstance(a, Answer) for a in answers) and gw.in_flight == {}
    assert gw.replica_views()[0].in_flight == 0


async def test_priority_reaches_the_engine_class_first_then_deadline(gateway):
    replica = FakeReplica()
    gw, _ = gateway({"r1": ("bs-01", replica)})
    now = time.monotonic()
    await gw.ask(q(max_tokens=2, priority=Priority.NEAR_RT, deadline=now + 5), request_id=call_id())
    await gw.ask(q(max_tokens=2, priority=Priority.BEST_EFFORT), request_id=call_id())
    near, best_effort = (p.priority for p in replica.params)
    assert near < best_effort and near // 10**12 == 0 and best_effort // 10**12 == 2


async def test_a_near_rt_request_preempts_a_running_best_effort_stream_which_ends_resource_exhausted(gateway):
    replica = FakeReplica(words=("w",) * 40, delay=0.02)
    gw, _ = gateway({"r1": ("bs-01", replica)}, config=one_slot())
    got: list[str] = []

    async def best_effort():
        async for event in gw.stream(q(max_tokens=40), request_id="be"):
            got.append(event)

    be = asyncio.create_task(best_effort())
    async with asyncio.timeout(2.0):
        while len(got) < 3:  # some text has left
            await asyncio.sleep(0.005)
    near = await gw.ask(q(max_tokens=3, priority=Priority.NEAR_RT, deadline=time.monotonic() + 1.0), request_id="near")
    with pytest.raises(AiranError) as e:
        await be
    assert e.value.kind is ErrorKind.RESOURCE_EXHAUSTED and e.value.reason == "preempted"
    assert "preempted at r1 to make room for a NEAR_RT request" in e.value.message
    assert near.completion_tokens == 3 and replica.request_ids == ["be", "near"]
    assert replica.aborted == ["be"] and len(got) < 40  # stopped in the engine, not run to its end
    assert gw.in_flight == {} and not gw._queues["r1"].running and not gw._preemptions
    # with preempt_best_effort off the NEAR_RT request waits for the running one instead
    gw2, _ = gateway({"r1": ("bs-01", FakeReplica(words=("w",) * 5, delay=0.02))},
                     config=one_slot(preempt_best_effort=False))  # fmt: skip
    first = asyncio.create_task(gw2.ask(q(max_tokens=5), request_id="be"))
    await asyncio.sleep(0.03)
    await gw2.ask(q(max_tokens=3, priority=Priority.NEAR_RT, deadline=time.monotonic() + 5.0), request_id="near")
    assert (await first).completion_tokens == 5


async def test_bounded_queues_shed_best_effort_first_and_every_request_ends_once(gateway):
    replica = FakeReplica(words=("w",) * 3, delay=0.1)
    config = one_slot(max_waiting=2, queue_bounds={"near_rt": 2, "non_rt": 2, "best_effort": 2})
    gw, _ = gateway({"r1": ("bs-01", replica)}, config=config)
    hog = asyncio.create_task(gw.ask(q(max_tokens=3, priority=Priority.NON_RT), request_id="hog"))
    await started(replica, 1)
    waiting = [asyncio.create_task(gw.ask(q(max_tokens=3), request_id=f"be-{i}")) for i in range(2)]
    async with asyncio.timeout(2.0):  # both queued behind the hog (prompts render on a thread: not at once)
        while len(gw._queues["r1"].waiting) < 2:
            await asyncio.sleep(0.002)
    first_be = gw._queues["r1"].waiting[0].request_id  # the one queued first keeps its place
    with pytest.raises(AiranError) as full:  # a third BEST_EFFORT: its class bound is full
        await gw.ask(q(max_tokens=3), request_id="be-extra")
    assert full.value.kind is ErrorKind.RESOURCE_EXHAUSTED and "2 BEST_EFFORT requests already wait" in full.value.message
    near = asyncio.create_task(gw.ask(q(max_tokens=3, priority=Priority.NEAR_RT, deadline=time.monotonic() + 5),
                                      request_id="near"))  # fmt: skip
    results = await asyncio.gather(hog, *waiting, near, return_exceptions=True)
    kinds = {r.request_id if isinstance(r, Answer) else "error": r for r in results}
    shed = [r for r in results if isinstance(r, AiranError)]
    assert len(shed) == 1 and shed[0].kind is ErrorKind.RESOURCE_EXHAUSTED and "shed" in shed[0].message
    assert {"hog", "near", first_be} <= set(kinds) and replica.request_ids == ["hog", "near", first_be]
    assert gw.in_flight == {} and not gw._queues["r1"].waiting


async def test_a_queued_request_that_can_no_longer_start_in_time_is_dropped_before_its_deadline(gateway):
    slow = FakeReplica(words=("w",) * 40, delay=0.05)
    gw, _ = gateway({"r1": ("bs-01", slow)}, config=one_slot())
    hog = asyncio.create_task(gw.ask(q(max_tokens=40, priority=Priority.NON_RT), request_id="hog"))
    await started(slow, 1)
    t0 = time.monotonic()
    with pytest.raises(AiranError) as e:  # admitted (admission thinks the hog ends soon), then it waits
        await gw.ask(q(max_tokens=4, priority=Priority.NEAR_RT, deadline=t0 + 0.3), request_id="late")
    waited = time.monotonic() - t0
    assert e.value.kind is ErrorKind.DEADLINE_EXCEEDED and "dropped before its deadline" in e.value.message
    assert waited < 0.3 and slow.request_ids == ["hog"]  # never sent to the engine
    assert not gw._queues["r1"].waiting
    hog.cancel()
    await asyncio.gather(hog, return_exceptions=True)


async def bs01_busy_for_2s(gateway):
    """bs-01's one slot taken by a NON_RT answer its measured speed says takes 2 s; bs-02 idle."""
    busy = FakeReplica(words=("w",) * 40, delay=0.05)
    gw, pool = gateway({"r1": ("bs-01", busy), "r2": ("bs-02", FakeReplica())}, config=one_slot())
    hog = asyncio.create_task(gw.ask(q(max_tokens=40, site_ids=("bs-01",), priority=Priority.NON_RT), request_id="hog"))
    await started(busy, 1)
    gw._rates_of("r1").observe(100, 0.01, 40, 39 * 0.05)
    gw._queue_changed("r1")
    return gw, pool, hog


async def test_a_named_site_that_cannot_meet_the_deadline_sends_the_request_elsewhere(gateway):
    gw, _, hog = await bs01_busy_for_2s(gateway)
    ans = await gw.ask(q(max_tokens=4, site_ids=("bs-01",), controller_id="x", priority=Priority.NEAR_RT,
                         deadline=time.monotonic() + 1.0), request_id=call_id())  # fmt: skip
    assert (ans.site_id, ans.requested_site_id) == ("bs-02", "bs-01")
    assert ans.routing_note.startswith("served at bs-02: bs-01 cannot answer within the")
    assert 0 < ans.predicted_ms < ans.allowed_ms <= 1000
    # where the named site can meet the deadline, the request stays there
    here = await gw.ask(q(max_tokens=4, site_ids=("bs-02",), priority=Priority.NEAR_RT,
                          deadline=time.monotonic() + 1.0), request_id=call_id())  # fmt: skip
    assert here.site_id == "bs-02" and here.routing_note == ""
    hog.cancel()
    await asyncio.gather(hog, return_exceptions=True)


# -- a caller's site scope (Query.allowed_sites, set by the server from its identity) ----------------
BS_01_ONLY = frozenset({"bs-01"})


async def test_a_scoped_query_naming_no_site_is_answered_only_at_its_sites(gateway):
    gw, pool = gateway()  # controller x: bs-01 at 1 ms, bs-02 at 5 ms
    assert (await gw.ask(q(controller_id="x"), request_id=call_id())).site_id == "bs-01"  # unscoped: nearest
    for _ in range(4):
        ans = await gw.ask(q(controller_id="x", allowed_sites=frozenset({"bs-02"})), request_id=call_id())
        assert (ans.site_id, ans.replica_id) == ("bs-02", "r2")
    assert pool.replicas["r1"][1].calls == 1


async def test_a_scoped_query_whose_named_site_cannot_meet_the_deadline_is_not_sent_outside_its_scope(gateway):
    gw, pool, hog = await bs01_busy_for_2s(gateway)
    with pytest.raises(AiranError) as e:  # unscoped, it goes to bs-02 (the test above this section)
        await gw.ask(q(max_tokens=4, site_ids=("bs-01",), controller_id="x", priority=Priority.NEAR_RT,
                       deadline=time.monotonic() + 1.0, allowed_sites=BS_01_ONLY), request_id=call_id())  # fmt: skip
    assert e.value.kind is ErrorKind.RESOURCE_EXHAUSTED and "refused at admission" in e.value.message
    assert "its caller's scope confines it to sites bs-01" in e.value.message
    assert pool.replicas["r2"][1].calls == 0 and pool.replicas["r1"][1].calls == 1
    hog.cancel()
    await asyncio.gather(hog, return_exceptions=True)


async def test_a_scoped_query_fails_over_only_inside_its_scope(gateway):
    dead = FakeReplica(fail_before=EngineDeadError("engine process exited"))
    gw, pool = gateway({"r1": ("bs-01", dead), "r2": ("bs-02", FakeReplica())})
    with pytest.raises(AiranError) as e:
        await gw.ask(q(site_ids=("bs-01",), allowed_sites=BS_01_ONLY), request_id=call_id())
    assert e.value.kind is ErrorKind.UNAVAILABLE and "every chosen replica failed" in e.value.message
    assert "r1" in pool.failed and pool.replicas["r2"][1].calls == 0
    with pytest.raises(AiranError) as e:  # with its one replica failed, nothing in its scope is left
        await gw.ask(q(allowed_sites=BS_01_ONLY), request_id=call_id())
    assert e.value.kind is ErrorKind.UNAVAILABLE and "scope confines it to sites bs-01" in e.value.message
    assert pool.replicas["r2"][1].calls == 0


async def test_measured_rates_replace_the_priors_after_answers(gateway):
    replica = FakeReplica(words=("w",) * 6, delay=0.02)
    gw, _ = gateway({"r1": ("bs-01", replica)}, config=OPTIMISTIC)
    await gw.ask(q(max_tokens=6), request_id=call_id())
    rates = gw._rates["r1"]
    assert rates.decode_samples == 1 and 0.015 < rates.decode_s_per_token(1) < 0.1  # ~20 ms per token, not 0.1 ms
    assert gw._table.decode_s_per_token[:, 0] == pytest.approx(rates.decode_s_per_token(1))


@pytest.fixture(scope="module")
def detector():
    from airan.store.registry import packaged_detector

    d = packaged_detector()
    if d is None:
        pytest.skip("the packaged detector is not built here (airan model build-detector)")
    return d


async def test_a_near_rt_diagnosis_may_opt_in_to_the_detectors_answer_in_time(gateway, renderer, detector):
    replica = FakeReplica(answers=["CONGESTION A"])
    pool = FakePool({"r1": ("bs-01", replica)})
    gw = Gateway(CONFIG, pool, SiteRegistry(CONFIG.sites, 0.2), {"m": renderer}, detector=detector)
    impossible = dict(mode="diagnosis", kpis=DIAG_KPIS, priority=Priority.NEAR_RT, site_ids=("bs-01",),
                      max_tokens=16)  # 16 tokens at the 25 tokens/s prior: 640 ms  # fmt: skip
    t0 = time.monotonic()
    ans = await gw.ask(q(**impossible, deadline=t0 + 0.2, detector_fallback=True), request_id=call_id())
    assert time.monotonic() - t0 < 0.2 and replica.calls == 0  # in time, without the model
    assert ans.answered_by == "detector" and ans.diagnosis.cause == "CONGESTION"
    assert ans.diagnosis.affected_cell_ids == ("bs-01/c1",) and ans.diagnosis.actions[0].type == "OFFLOAD_TRAFFIC"
    assert ans.routing_note.startswith("answered by the fast detector (DEADLINE_EXCEEDED: refused at admission")
    assert ans.requested_site_id == "bs-01" and ans.replica_id == "" and ans.completion_tokens == 0
    with pytest.raises(AiranError) as e:  # without the opt-in: the refusal itself
        await gw.ask(q(**impossible, deadline=time.monotonic() + 0.2), request_id=call_id())
    assert e.value.kind is ErrorKind.DEADLINE_EXCEEDED
    answered = await gw.ask(q(**impossible, deadline=time.monotonic() + 5, detector_fallback=True),
                            request_id=call_id())  # fmt: skip
    assert answered.answered_by == "model" and replica.calls == 1  # in time: the model answers
    with pytest.raises(AiranError) as bad:
        await gw.ask(q(detector_fallback=True), request_id=call_id())
    assert bad.value.kind is ErrorKind.INVALID_ARGUMENT and "response_mode DIAGNOSIS" in bad.value.message


async def test_before_the_model_is_learnt_a_near_rt_diagnosis_is_expected_as_long_as_the_detectors_answer(
        renderer, detector):  # fmt: skip
    replica = FakeReplica(answers=["CONGESTION A"] * 2)
    gw = Gateway(CONFIG, FakePool({"r1": ("bs-01", replica)}), SiteRegistry(CONFIG.sites, 0.2), {"m": renderer},
                 detector=detector)  # fmt: skip
    expected = expected_tokens_of_each_decision(gw)
    await gw.ask(q(mode="diagnosis", kpis=DIAG_KPIS, priority=Priority.NEAR_RT), request_id=call_id())
    await gw.ask(q(mode="diagnosis", kpis=DIAG_KPIS, priority=Priority.NON_RT), request_id=call_id())
    # the detector says "CONGESTION A" (cause, cell letter): its tokens and two more, not the bound of 16;
    # a NON_RT diagnosis may cite KPIs too, so it is expected at its bound
    assert expected == [renderer.count_tokens("CONGESTION A") + 2, 64]


async def test_a_burst_of_mixed_classes_ends_each_request_in_exactly_one_answer_or_error(gateway):
    replicas = {"r1": ("bs-01", FakeReplica(words=("w",) * 4, delay=0.01)),
                "r2": ("bs-02", FakeReplica(words=("w",) * 4, delay=0.01))}  # fmt: skip
    gw, _ = gateway(replicas, config=one_slot(max_waiting=6, queue_bounds={"near_rt": 4, "non_rt": 4,
                                                                           "best_effort": 4}))  # fmt: skip
    now = time.monotonic()
    calls = [q(max_tokens=4, site_ids=("bs-01",), priority=Priority.NEAR_RT, deadline=now + 0.5) for _ in range(10)]
    calls += [q(max_tokens=4, site_ids=("bs-01",)) for _ in range(20)]
    outcomes = []

    async def one(query):
        events = []
        try:
            async for e in gw.stream(query, request_id=call_id()):
                events.append(e)
        except AiranError as e:
            events.append(e)
        outcomes.append(events)

    await asyncio.gather(*(one(c) for c in calls))
    finals = [[e for e in events if isinstance(e, (Answer, AiranError))] for events in outcomes]
    assert len(finals) == 30 and all(len(f) == 1 for f in finals)
    answered = [f[0] for f in finals if isinstance(f[0], Answer)]
    assert answered and {a.site_id for a in answered} == {"bs-01", "bs-02"}  # the named site is not the only one
    assert gw.in_flight == {} and all(not qu.waiting and not qu.running for qu in gw._queues.values())


def test_detector_fallback_and_placement_cross_the_proto_both_ways():
    from airan.client import build_request
    from airan.serving.api import convert
    from airan.v1 import netops_pb2

    def fallback(**kw):
        return convert.query_from_proto(build_request("why", diagnosis=True, **kw), 0.0, None).detector_fallback

    assert (fallback(), fallback(detector_fallback=True), fallback(detector_fallback=False)) == (None, True, False)
    answer = Answer("id", "CONGESTION A", 10, 0, "", "", "m", "stop", 0.0, 1.0, 1.0, answered_by="detector",
                    requested_site_id="bs-01", routing_note="answered by the fast detector (...)",
                    predicted_ms=0.0, allowed_ms=200.0)  # fmt: skip
    for message in (convert.answer_to_response(answer), convert.answer_to_final_chunk(answer)):
        p = message.placement
        assert p.answered_by == netops_pb2.ANSWER_SOURCE_DETECTOR and p.requested_site_id == "bs-01"
        assert p.note.startswith("answered by the fast detector") and p.allowed_ms == 200.0


@pytest.mark.slow
async def test_a_request_whose_deadline_passes_in_the_vllm_engines_queue_is_aborted_there(renderer):
    """Real vLLM on the tiny model, one sequence at a time: a long request holds the engine, a NEAR_RT
    one waits in vLLM's own queue, its deadline passes, the caller hears DEADLINE_EXCEEDED then, and
    the engine's scheduler drops it from its waiting queue while the long one still runs."""
    from airan.serving.engine.protocol import GenerationParams
    from airan.serving.engine.vllm_engine import VllmEngine, VllmSettings

    engine = VllmEngine(VllmSettings(model_path=ensure_tiny_model(), max_model_len=1024, dtype="float32",
                                     kv_cache_gb=0.25, max_num_seqs=1))  # fmt: skip
    await engine.start()
    hog = None
    try:
        # the gateway sends both to the engine (4 slots), whose one sequence slot makes the second wait
        gw = Gateway(with_admission(OPTIMISTIC, slots=4), FakePool({"r1": ("bs-01", engine)}),
                     SiteRegistry(CONFIG.sites, 0.2), {"m": renderer})  # fmt: skip
        prompt = renderer.render(q(), 512).token_ids

        async def run_hog():
            async for _ in engine.generate(prompt, GenerationParams(max_tokens=900, ignore_eos=True), "hog"):
                pass

        hog = asyncio.create_task(run_hog())
        async with asyncio.timeout(60):
            while engine.load().running < 1:
                await asyncio.sleep(0.01)
        waiting_seen = []

        async def watch():
            while True:
                waiting_seen.append(engine.load().waiting)
                await asyncio.sleep(0.005)

        watcher = asyncio.create_task(watch())
        t0 = time.monotonic()
        with pytest.raises(AiranError) as e:
            await gw.ask(q(max_tokens=8, priority=Priority.NEAR_RT, deadline=t0 + 0.5), request_id="late")
        answered_after = time.monotonic() - t0
        assert e.value.kind is ErrorKind.DEADLINE_EXCEEDED and "0 tokens so far" in e.value.message
        assert 0.45 < answered_after < 3.0  # at the deadline, not after the long request (900 tokens)
        async with asyncio.timeout(10):  # the engine saw the abort: its waiting queue empties
            while engine.load().waiting:
                await asyncio.sleep(0.01)
        watcher.cancel()
        assert max(waiting_seen) == 1 and not hog.done() and engine.load().running == 1
        assert "late" not in engine._llm.output_processor.request_states
    finally:
        if hog is not None:
            hog.cancel()
            await asyncio.gather(hog, return_exceptions=True)
        await engine.shutdown()


async def test_a_replica_that_has_not_answered_yet_is_predicted_at_its_models_measured_speed(gateway):
    # on the priors alone an unmeasured replica can look slower than a measured busy one, be passed
    # over and never be measured; until its first answer it borrows what its model's replicas measured
    gw, _ = gateway({"r1": ("bs-01", FakeReplica(words=("w",) * 6, delay=0.02)), "r2": ("bs-02", FakeReplica())})
    await gw.ask(q(max_tokens=6, site_ids=("bs-01",)), request_id=call_id())
    measured = gw._rates["r1"].decode_s_per_token(1)
    assert 0.015 < measured < 0.1 and gw._rates_of("r2").decode_samples == 0
    r2 = gw._table.index["r2"]
    assert gw._table.idle_decode_s_per_token[r2] == pytest.approx(measured)  # not the 40 ms prior
