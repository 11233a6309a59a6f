"""The gRPC shell over a real gateway with fake replicas: interceptors, error mapping, request ids, conversion.

gRPC runs on 127.0.0.1 (port 0) in-process; no Ray, no vLLM.
"""
from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client import REGISTRY

from airan.client import AsyncAiranClient, build_request
from airan.config import SiteConfig
from airan.core.prompting import PromptRenderer
from airan.core.routing import ReplicaState, ReplicaView
from airan.errors import AiranError, ErrorKind
from airan.factory.tiny import ensure_tiny_model
from airan.serving.api import convert
from airan.serving.api.interceptors import (
    REQUEST_ID_METADATA,
    STATUS_OF_KIND,
    ErrorInterceptor,
    MetricsInterceptor,
    RequestIdInterceptor,
    server_interceptors,
)
from airan.serving.api.malformed import MalformedRequestInterceptor
from airan.serving.gateway import Delta, Gateway
from airan.serving.server import build_grpc_server
from airan.serving.sites import SiteRegistry, SiteState
from airan.v1 import control_pb2
from fakes import CONFIG, FakePool, FakeReplica

SERVICERS = Path(__file__).resolve().parent.parent / "airan" / "serving" / "api" / "servicers.py"


class FaultyGateway(Gateway):
    """The real gateway, with an exception to raise before answering (or after the first delta)."""

    fault: BaseException | None = None
    after_first_delta = False

    async def stream(self, query, arrival=None, *, request_id=""):
        if self.fault is not None and not self.after_first_delta:
            raise self.fault
        async for event in super().stream(query, arrival, request_id=request_id):
            yield event
            if self.fault is not None and isinstance(event, Delta):
                raise self.fault


@pytest.fixture(scope="module")
def renderer():
    return PromptRenderer(ensure_tiny_model())


@pytest_asyncio.fixture
async def shell(renderer):
    """(client, gateway, replica): the production server assembly over a fake pool."""
    replica = FakeReplica()
    pool = FakePool({"r1": ("bs-01", replica), "r2": ("bs-02", FakeReplica())})
    gateway = FaultyGateway(CONFIG, pool, SiteRegistry(CONFIG.sites, CONFIG.radio.min_ai_headroom), {"m": renderer})
    server = build_grpc_server(gateway, {"bs-01": "node-a"}, health.aio.HealthServicer())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AsyncAiranClient(f"127.0.0.1:{port}") as client:
            yield client, gateway, replica
    finally:
        await server.stop(0)


def _request_id(metadata) -> str:
    ids = [v for k, v in (metadata or ()) if k == REQUEST_ID_METADATA]
    assert len(ids) == 1, metadata
    return ids[0]


async def _ask(client, request):
    """(response, trailing x-request-id) of a unary Ask."""
    call = client.netops.Ask(request, timeout=30)
    response = await call
    return response, _request_id(await call.trailing_metadata())


async def _stream(client, request):
    call = client.netops.AskStream(request, timeout=30)
    chunks = [c async for c in call]
    return chunks, _request_id(await call.trailing_metadata())


async def _error(coro) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await coro
    return e.value


# -- error mapping ------------------------------------------------------------------
def test_every_error_kind_has_exactly_its_status():
    assert set(STATUS_OF_KIND) == set(ErrorKind)
    assert all(code.name == kind.value for kind, code in STATUS_OF_KIND.items())


def test_the_chain_is_one_list_with_request_ids_outermost_and_error_mapping_innermost():
    assert [type(i) for i in server_interceptors()] == [RequestIdInterceptor, MetricsInterceptor, ErrorInterceptor,
                                                        MalformedRequestInterceptor]


@pytest.mark.parametrize("kind", list(ErrorKind))
async def test_each_error_kind_reaches_the_caller_as_its_status_on_unary_and_stream(shell, kind):
    client, gateway, _ = shell
    gateway.fault = AiranError(kind, f"{kind.value}: do this instead")
    for call in (client.netops.Ask, client.netops.AskStream):
        rpc = call(build_request("why?"), timeout=30)
        e = await _error(rpc if call is client.netops.Ask else _drain(rpc))
        assert e.code() is STATUS_OF_KIND[kind] and e.details() == f"{kind.value}: do this instead"
        assert _request_id(e.trailing_metadata())


async def _drain(call):
    return [c async for c in call]


async def test_an_error_after_the_first_delta_ends_the_stream_with_that_status(shell):
    client, gateway, _ = shell
    gateway.fault, gateway.after_first_delta = AiranError(ErrorKind.UNAVAILABLE, "replica failed mid-answer"), True
    call = client.netops.AskStream(build_request("why?", max_tokens=4), timeout=30)
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as e:
        async for chunk in call:
            got.append(chunk)
    assert len(got) == 1 and not got[0].final and e.value.code() is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("streaming", [False, True])
async def test_an_unexpected_exception_is_internal_with_the_request_id_and_the_server_keeps_serving(
    shell, streaming, caplog
):
    client, gateway, _ = shell
    gateway.fault = ZeroDivisionError("a bug")
    request = build_request("why?", max_tokens=2)
    e = await _error(_stream(client, request) if streaming else _ask(client, request))
    rid = _request_id(e.trailing_metadata())
    assert e.code() is grpc.StatusCode.INTERNAL and rid in e.details() and "ZeroDivisionError" in e.details()
    assert any(rid in r.getMessage() and r.exc_info for r in caplog.records)  # logged under the id
    gateway.fault = None
    response, _ = await _ask(client, request)
    assert response.completion_tokens == 2


async def test_control_service_errors_use_the_same_mapping(shell):
    client, _, _ = shell
    e = await _error(client.replicas("bs-99"))
    assert e.code() is grpc.StatusCode.NOT_FOUND and "bs-01, bs-02" in e.details()
    e = await _error(client.drain_site("bs-99"))
    assert e.code() is grpc.StatusCode.NOT_FOUND and _request_id(e.trailing_metadata())
    e = await _error(client.report_ran_load({"bs-01": 1.5}))
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT and "[0, 1]" in e.details()


async def test_a_bad_request_never_reaches_a_replica(shell):
    client, _, replica = shell
    e = await _error(_ask(client, build_request("   ")))
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT and "question is empty" in e.details()
    assert replica.calls == 0


# -- request ids and idempotency ---------------------------------------------------------
async def test_anonymous_calls_get_distinct_echoed_ids_and_leave_no_idempotency_record(shell):
    client, gateway, replica = shell
    request = build_request("why?", site_ids=["bs-01"], max_tokens=2)
    (r1, id1), (r2, id2) = await _ask(client, request), await _ask(client, request)
    chunks, id3 = await _stream(client, request)
    assert len({id1, id2, id3}) == 3 and (r1.request_id, r2.request_id) == (id1, id2)
    assert {c.request_id for c in chunks} == {id3}
    assert replica.calls == 3 and not gateway._cache.completed and not gateway._cache.in_flight
    assert not any(gateway.remembers(i) for i in (id1, id2, id3))


async def test_a_client_request_id_is_honoured_and_repeated_calls_are_idempotent(shell):
    client, gateway, replica = shell
    request = build_request("why?", site_ids=["bs-01"], max_tokens=3, request_id="ctl-42")
    first, rid = await _ask(client, request)
    again, rid_again = await _ask(client, request)
    chunks, rid_stream = await _stream(client, request)
    assert rid == rid_again == rid_stream == first.request_id == "ctl-42" and again == first
    assert len(chunks) == 1 and chunks[0].final and chunks[0].text_delta == first.text  # the cached answer, whole
    assert replica.calls == 1 and gateway.remembers("ctl-42")


async def test_concurrent_calls_with_one_client_id_compute_once(shell):
    client, _, replica = shell
    replica.delay = 0.02
    request = build_request("why?", site_ids=["bs-01"], max_tokens=3, request_id="ctl-43")
    a, b = await asyncio.gather(_ask(client, request), _ask(client, request))
    assert a == b and replica.calls == 1


async def test_a_malformed_client_id_is_refused_and_the_call_still_gets_an_id(shell):
    client, gateway, _ = shell
    e = await _error(_ask(client, build_request("why?", request_id="has spaces\n")))
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT and "request_id" in e.details()
    assert _request_id(e.trailing_metadata()) != "has spaces\n"
    assert not gateway._cache.completed


async def test_control_calls_and_health_carry_a_request_id_too(shell):
    client, _, _ = shell
    call = client.control.GetTopology(control_pb2.GetTopologyRequest())
    await call
    assert _request_id(await call.trailing_metadata())
    stub = health_pb2_grpc.HealthStub(client.channel)
    # Watch streams through context.write, not a generator: the chain wraps both kinds
    watch = stub.Watch(health_pb2.HealthCheckRequest(service="nope"))
    first = await watch.read()
    watch.cancel()
    assert first.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

    def discover():  # reflection is a bidirectional stream: the chain wraps it too
        with grpc.insecure_channel(client.target) as channel:
            return set(ProtoReflectionDescriptorDatabase(channel).get_services())

    assert {"airan.v1.NetOpsService", "airan.v1.ControlService"} <= await asyncio.to_thread(discover)


# -- metrics ----------------------------------------------------------------------
def _rpcs(method: str, code: str) -> float:
    return REGISTRY.get_sample_value("airan_rpc_latency_seconds_count", {"method": method, "code": code}) or 0.0


def _queries(method: str, priority: str, code: str) -> float:
    labels = {"method": method, "priority": priority, "code": code}
    return REGISTRY.get_sample_value("airan_queries_total", labels) or 0.0


async def test_metrics_count_every_rpc_by_method_and_status(shell):
    client, _, _ = shell
    ask = "airan.v1.NetOpsService/Ask"
    before = (_rpcs(ask, "OK"), _rpcs(ask, "NOT_FOUND"), _queries("Ask", "near_rt", "NOT_FOUND"))
    await _ask(client, build_request("why?", max_tokens=2))
    await _error(_ask(client, build_request("why?", site_ids=["bs-99"], priority="near_rt")))
    await client.topology()
    after = (_rpcs(ask, "OK"), _rpcs(ask, "NOT_FOUND"), _queries("Ask", "near_rt", "NOT_FOUND"))
    assert [b - a for a, b in zip(before, after)] == [1, 1, 1]
    assert _rpcs("airan.v1.ControlService/GetTopology", "OK") >= 1


# -- ControlService through the wire --------------------------------------------------
async def test_topology_and_replicas_carry_node_ids_from_the_public_accessors(shell):
    client, _, _ = shell
    replicas = {r.replica_id: r for r in (await client.replicas()).replicas}
    assert {k: r.ray_node_id for k, r in replicas.items()} == {"r1": "node-bs-01", "r2": "node-bs-02"}
    assert replicas["r1"].max_model_len == 1024 and replicas["r1"].state == control_pb2.REPLICA_READY
    assert [r.replica_id for r in (await client.replicas("bs-02")).replicas] == ["r2"]
    sites = {s.site_id: s for s in (await client.topology()).sites}
    assert sites["bs-01"].ray_node_id == "node-a" and list(sites["bs-01"].replica_ids) == ["r1"]
    assert dict(sites["bs-02"].latency_ms) == {"x": 5}
    drained = await client.drain_site("bs-02")
    assert drained.site.state == control_pb2.SITE_DRAINED and drained.in_flight == 0
    result = await client.report_ran_load({"bs-01": 0.9})
    assert list(result.surged_site_ids) == ["bs-01"] and result.accepted == 1


# -- conversion ----------------------------------------------------------------------
def test_site_round_trips_through_its_proto():
    state = SiteState(
        SiteConfig(id="bs-07", cpus=4, gpus=1, memory_gb=16, x_km=1.5, y_km=-2, latency_ms={"xapp": 2.5}),
        drained=True,
        ran_compute_share=0.75,
    )
    proto = convert.site_to_proto(state, "node-7", ["r7", "r8"])
    assert proto.ai_headroom == 0.25 and proto.state == control_pb2.SITE_DRAINED
    assert convert.site_from_proto(proto) == (state, "node-7", ("r7", "r8"))
    assert convert.site_to_proto(*convert.site_from_proto(proto)) == proto


@pytest.mark.parametrize("state", list(ReplicaState))
def test_replica_round_trips_through_its_proto(state):
    view = ReplicaView("r7", "bs-07", "m", state, in_flight=3, running=2, waiting=1, kv_cache_usage=0.5)
    proto = convert.replica_to_proto(view, "node-7", 2048)
    assert convert.replica_from_proto(proto) == (view, "node-7", 2048)
    assert convert.replica_to_proto(*convert.replica_from_proto(proto)) == proto


def test_servicers_build_no_proto_message_themselves():
    """Every `*_pb2.Message(...)` lives in convert.py; servicers import only the *_pb2_grpc stubs."""
    tree = ast.parse(SERVICERS.read_text())
    built = [
        ast.unparse(node.func)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id.endswith("_pb2")
    ]
    imported = [
        a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names if a.name.endswith("_pb2")
    ]
    assert not built and not imported, (built, imported)
    assert "getattr(" not in SERVICERS.read_text()  # no reaching into private records
