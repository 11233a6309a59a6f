"""The real stack: Ray with 2 site nodes, 2 vLLM CPU replicas, gRPC on 127.0.0.1."""
from __future__ import annotations

import asyncio

import grpc
import pytest
import pytest_asyncio
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from airan.client import AsyncAiranClient, build_request, kpi
from airan.stack import LocalStack
from airan.v1 import control_pb2

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tiny_config):
    async with LocalStack(tiny_config) as plane:
        yield plane


@pytest_asyncio.fixture(loop_scope="module")
async def client(stack):
    async with AsyncAiranClient(stack.address) as c:
        yield c


async def _in_flight(client) -> int:
    return sum(r.load.in_flight for r in (await client.replicas()).replicas)


async def test_replicas_run_on_different_site_nodes(client):
    replicas = (await client.replicas()).replicas
    assert {r.site_id for r in replicas} == {"bs-01", "bs-02"}
    assert all(r.state == control_pb2.REPLICA_READY for r in replicas)
    assert len({r.ray_node_id for r in replicas}) == 2
    topo = await client.topology()
    assert {s.site_id: s.ray_node_id for s in topo.sites} == {r.site_id: r.ray_node_id for r in replicas}


@pytest.mark.parametrize("site", ["bs-01", "bs-02"])
async def test_unary_answer_is_served_at_the_requested_site(client, site):
    request = build_request(
        "Why is downlink throughput low?",
        site_ids=[site],
        kpis=[kpi("DRB.UEThpDl", 850.0, "kbit/s", f"{site}/c1"), kpi("RRU.PrbUsedDl", 270, "PRB", f"{site}/c1")],
        controller_id="xapp-test",
        priority="near_rt",
        max_tokens=12,
    )
    r = await client.ask(request, timeout_s=60)
    assert r.site_id == site and r.replica_id.startswith(site)
    assert r.text and 0 < r.completion_tokens <= 12 and r.prompt_tokens > 20
    assert 0 < r.timings.ttft_ms <= r.timings.total_ms


async def test_stream_deltas_add_up_to_a_final_chunk(client):
    chunks = [c async for c in client.ask_stream(build_request("List congestion KPIs.", site_ids=["bs-02"], max_tokens=10))]
    final = chunks[-1]
    assert final.final and sum(c.final for c in chunks) == 1
    assert final.site_id == "bs-02" and final.completion_tokens == 10 == len(chunks) - 1
    assert "".join(c.text_delta for c in chunks)


@pytest.mark.parametrize(
    "request_kwargs, code, words",
    [
        (dict(question=" "), grpc.StatusCode.INVALID_ARGUMENT, "question is empty"),
        (dict(question="why?", site_ids=["bs-99"]), grpc.StatusCode.NOT_FOUND, "bs-99"),
        (dict(question="why?", max_tokens=5000), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be between 0 and 256"),
        (dict(question="why is it slow? " * 180), grpc.StatusCode.INVALID_ARGUMENT, "-token prompt"),
        (dict(question="why?", deadline_s=-1.0), grpc.StatusCode.DEADLINE_EXCEEDED, "already passed"),
    ],
)
async def test_bad_requests_get_the_right_status(client, request_kwargs, code, words):
    for call in (client.ask, lambda r: _drain_stream(client, r)):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(build_request(**request_kwargs))
        assert e.value.code() == code and words in e.value.details()


async def _drain_stream(client, request):
    return [c async for c in client.ask_stream(request)]


async def test_no_replica_available_when_every_site_is_drained(client):
    for site in ("bs-01", "bs-02"):
        await client.drain_site(site)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.ask(build_request("status?"))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "drained" in e.value.details()
    finally:
        for site in ("bs-01", "bs-02"):
            await client.drain_site(site, resume=True)
    assert (await client.ask(build_request("status?", max_tokens=2))).completion_tokens == 2


async def test_radio_surge_moves_queries_off_the_site(client):
    result = await client.report_ran_load({"bs-01": 0.95, "bs-02": 0.3})
    assert list(result.surged_site_ids) == ["bs-01"]
    try:
        r = await client.ask(build_request("status?", site_ids=["bs-01"], max_tokens=2))
        assert r.site_id == "bs-02"
    finally:
        await client.report_ran_load({"bs-01": 0.0, "bs-02": 0.0})
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.report_ran_load({"bs-01": 1.5})
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_deadline_during_generation_and_client_cancel_release_the_replica(client):
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await client.ask(build_request("talk", max_tokens=250, deadline_s=0.05), timeout_s=30)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    call = client.netops.AskStream(build_request("talk", max_tokens=250))
    await call.read()  # first token arrived: the request is on a replica
    call.cancel()
    for _ in range(100):  # bounded wait for the abort to propagate
        if await _in_flight(client) == 0:
            break
        await asyncio.sleep(0.05)
    assert await _in_flight(client) == 0
    # and the replicas still answer
    assert (await client.ask(build_request("ok?", max_tokens=3))).completion_tokens == 3


async def test_idempotent_request_id_returns_the_first_answer(client):
    request = build_request("Summarise bs-01.", site_ids=["bs-01"], max_tokens=6, request_id="idem-1", temperature=1.0)
    first = await client.ask(request)
    again = await client.ask(request)
    assert again == first


async def test_health_is_serving_and_reflection_lists_the_services(stack):
    async with grpc.aio.insecure_channel(stack.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "airan.v1.NetOpsService", "airan.v1.ControlService"):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING

    # the reflection client is synchronous (as grpcurl's discovery is)
    def discover():
        with grpc.insecure_channel(stack.address) as channel:
            db = ProtoReflectionDescriptorDatabase(channel)
            services = set(db.get_services())
            pool = DescriptorPool(db)
            ask = pool.FindServiceByName("airan.v1.NetOpsService").FindMethodByName("AskStream")
            return services, ask.output_type.full_name

    services, ask_output = await asyncio.to_thread(discover)
    assert {"airan.v1.NetOpsService", "airan.v1.ControlService", "grpc.health.v1.Health"} <= services
    assert ask_output == "airan.v1.AskChunk"


async def test_adapter_queries_are_served_only_where_the_adapter_is_loaded(client):
    replicas = {r.site_id: r for r in (await client.replicas()).replicas}
    r = await client.ask(build_request("Summarise bs-01.", site_ids=["bs-01"], model="tiny-lora", max_tokens=4))
    assert r.site_id == "bs-02" and r.model == "tiny-lora" and r.completion_tokens == 4
    base = await client.ask(build_request("Summarise bs-01.", site_ids=["bs-01"], max_tokens=4))
    assert base.site_id == "bs-01" and base.model == "tiny-llama"
    await client.drain_site("bs-02")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.ask(build_request("Summarise.", model="tiny-lora", max_tokens=4))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await client.drain_site("bs-02", resume=True)
    assert set(replicas) == {"bs-01", "bs-02"}


async def test_a_share_of_the_fuzz_suites_asks_on_the_real_engines(stack, client, caplog):
    """120 of tests/test_fuzz_api.py's Ask/AskStream requests (generated and mutated; the same each run)
    on the real vLLM replicas. The fuzz's 10,000 run over fake engines; here whatever passes validation
    (any temperature, max_tokens, priority, deadline, a grammar built from the caller's KPI names and
    cells) meets vLLM: documented statuses only, no replica failed, nothing left in flight."""
    import logging

    from test_fuzz_api import ALLOWED, check_outcomes, draw_asks, raw_calls, send_all

    items = await asyncio.to_thread(draw_asks, 120)

    def allowed(item, outcome) -> bool:  # the tiny random model may break a diagnosis twice (documented)
        return outcome.code in ALLOWED[item.method] or (
            outcome.code == grpc.StatusCode.INTERNAL and "gave no valid diagnosis" in outcome.details)

    async with grpc.aio.insecure_channel(stack.address) as channel:
        calls = raw_calls(channel)
        for i in range(0, len(items), 10):
            check_outcomes(items[i:i + 10], await send_all(calls, items[i:i + 10]), allowed)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("airan")]
    assert all(r.state == control_pb2.REPLICA_READY for r in (await client.replicas()).replicas)
    assert (await client.ask(build_request("Summarise bs-01.", max_tokens=4))).completion_tokens == 4
    assert await _in_flight(client) == 0
