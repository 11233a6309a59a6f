"""Bounded inputs: every request field has a documented bound, checked before any work.

Plain checks on the bounds table and convert, then the gRPC shell (real server, real gateway
and tokenizer, fake replicas) on 127.0.0.1: oversized and malformed requests, the atomic
RAN-load batch, x-request-id metadata, prompts rendered off the event loop.
"""
from __future__ import annotations

import asyncio
import functools
import re
import threading
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from google.protobuf.descriptor import FieldDescriptor
from grpc_health.v1 import health
from hypothesis import given, settings
from hypothesis import strategies as st

from airan.client import AsyncAiranClient, build_request, kpi
from airan.config import LimitsConfig, ServerConfig
from airan.core import limits as L
from airan.core.prompting import PromptRenderer, citable_kpis, diagnosis_context
from airan.core.query import KpiSample, Query
from airan.errors import AiranError, ErrorKind
from airan.factory.tiny import ensure_tiny_model
from airan.serving.api import convert
from airan.serving.api.interceptors import REQUEST_ID_METADATA
from airan.serving.gateway import Gateway
from airan.serving.server import build_grpc_server
from airan.serving.sites import SiteRegistry
from airan.store.registry import packaged_detector
from airan.v1 import control_pb2, netops_pb2
from fakes import CONFIG, FakePool, FakeReplica

README = Path(__file__).resolve().parent.parent / "README.md"
LIMITS = LimitsConfig()
SERVICES = [netops_pb2.DESCRIPTOR.services_by_name["NetOpsService"],
            control_pb2.DESCRIPTOR.services_by_name["ControlService"]]  # fmt: skip


def _bounded_fields(message, prefix: str) -> list[str]:
    """The field paths of a request message that need a bound: strings, lists, enums, numbers
    with a range, timestamps (recursively; `[]` marks each element of a list)."""
    out = []
    for f in message.fields:
        path = f"{prefix}.{f.name}"
        repeated = f.is_repeated
        if repeated:
            out.append(path)
        element = f"{path}[]" if repeated else path
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if f.message_type.full_name == "google.protobuf.Timestamp":
                out.append(element)
            else:
                out += _bounded_fields(f.message_type, element)
        elif f.type in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_ENUM):
            if not repeated or f.type == FieldDescriptor.TYPE_STRING:
                out.append(element)
    return out


def test_every_string_list_enum_and_timestamp_of_every_request_has_a_bound():
    table = {b.field for b in L.bounds(LIMITS)}
    needed = [p for s in SERVICES for m in s.methods for p in _bounded_fields(m.input_type, m.input_type.name)]
    assert needed and not sorted(set(needed) - table)
    assert not sorted({f for f in table if not f.startswith("metadata")} - set(_all_paths()))  # no stale rows


def _all_paths() -> set[str]:
    def walk(message, prefix):
        for f in message.fields:
            path = f"{prefix}.{f.name}"
            yield path
            if f.is_repeated:
                yield path + "[]"
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                sub = path + "[]" if f.is_repeated else path
                yield from walk(f.message_type, sub)
    return {p for s in SERVICES for m in s.methods for p in walk(m.input_type, m.input_type.name)}


def test_the_readme_bounds_table_is_the_table():
    text = README.read_text()
    section = text[text.index("### Bounds"):]
    section = section[: section.index("\n## ")]
    for bound in L.bounds(LIMITS):
        assert bound.row() in section, bound.row()


def _at_every_bound(char: str = "\U0001F4E1") -> netops_pb2.AskRequest:
    """The largest AskRequest within every bound: 4-byte UTF-8 characters at every length bound."""
    s = lambda n: char * n  # noqa: E731
    r = netops_pb2.AskRequest(
        controller_id=s(L.ID_MAX_CHARS), site_ids=[s(L.SITE_ID_MAX_CHARS)] * L.MAX_SITE_IDS,
        cell_ids=[s(L.CELL_ID_MAX_CHARS)] * L.MAX_CELL_IDS, question=s(LIMITS.max_question_chars),
        kpi_context=[kpi(s(L.KPI_NAME_MAX_CHARS), 1.5, s(L.KPI_UNIT_MAX_CHARS), s(L.CELL_ID_MAX_CHARS), 1.7e9)
                     for _ in range(LIMITS.max_kpi_samples)],
        priority=netops_pb2.NEAR_RT, max_tokens=LIMITS.max_tokens_limit, temperature=1.0,
        request_id="r" * L.ID_MAX_CHARS, model=s(L.MODEL_MAX_CHARS),
        recent_events=[s(L.EVENT_MAX_CHARS)] * L.MAX_RECENT_EVENTS, response_mode=netops_pb2.DIAGNOSIS,
    )  # fmt: skip
    r.deadline.FromSeconds(L.TIMESTAMP_MAX_S)
    return r


def test_any_request_within_the_bounds_fits_the_default_max_receive_size():
    largest = _at_every_bound()
    convert.check_ask_request(largest, LIMITS)  # within every bound
    assert largest.ByteSize() <= ServerConfig().max_receive_message_bytes
    ran = control_pb2.ReportRanLoadRequest(loads=[control_pb2.SiteRanLoad(
        site_id="\U0001F4E1" * L.SITE_ID_MAX_CHARS, ran_compute_share=0.5) for _ in range(L.MAX_RAN_LOADS)])  # fmt: skip
    assert ran.ByteSize() <= ServerConfig().max_receive_message_bytes


# -- each bound: at it accepted, past it refused naming the field, the size and the bound -------
def _set(field: str, n: int):
    """A mutation putting `n` characters (or items) into `field` of a valid request."""

    def mutate(r: netops_pb2.AskRequest) -> None:
        if field in ("site_ids", "cell_ids", "recent_events"):
            getattr(r, field).extend(["x"] * n)
        elif field == "kpi_context":
            r.kpi_context.extend([kpi("DRB.UEThpDl", 1.0)] * n)
        elif field.startswith("kpi_context[0]."):
            setattr(r.kpi_context[0], field.split(".")[1], "k" * n)
        elif field.endswith("[0]"):
            getattr(r, field[:-3]).append("s" * n)
        else:
            setattr(r, field, "a" * n)

    return mutate


STRING_BOUNDS = [
    ("controller_id", L.ID_MAX_CHARS), ("question", LIMITS.max_question_chars), ("model", L.MODEL_MAX_CHARS),
    ("request_id", L.ID_MAX_CHARS), ("site_ids[0]", L.SITE_ID_MAX_CHARS), ("cell_ids[0]", L.CELL_ID_MAX_CHARS),
    ("recent_events[0]", L.EVENT_MAX_CHARS), ("kpi_context[0].name", L.KPI_NAME_MAX_CHARS),
    ("kpi_context[0].unit", L.KPI_UNIT_MAX_CHARS), ("kpi_context[0].cell_id", L.CELL_ID_MAX_CHARS),
]  # fmt: skip
LIST_BOUNDS = [("site_ids", L.MAX_SITE_IDS), ("cell_ids", L.MAX_CELL_IDS), ("recent_events", L.MAX_RECENT_EVENTS),
               ("kpi_context", LIMITS.max_kpi_samples)]  # fmt: skip


def _valid() -> netops_pb2.AskRequest:
    return build_request("why?", kpis=[kpi("DRB.UEThpDl", 850.0, "kbit/s", "bs-01/c1")])


@pytest.mark.parametrize("field,bound", STRING_BOUNDS + LIST_BOUNDS, ids=[f for f, _ in STRING_BOUNDS + LIST_BOUNDS])
def test_at_the_bound_is_accepted_and_one_past_is_refused_naming_field_size_and_bound(field, bound):
    extra = 1 if field == "kpi_context" else 0  # the valid request already carries one sample
    at, past = _valid(), _valid()
    _set(field, bound - extra)(at)
    _set(field, bound - extra + 1)(past)
    convert.query_from_proto(at, 0.0, None, LIMITS)
    with pytest.raises(AiranError) as e:
        convert.query_from_proto(past, 0.0, None, LIMITS)
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT
    assert field in e.value.message and str(bound + 1) in e.value.message
    assert str(bound) in e.value.message or field == "request_id"  # the request id's rule names 1-128


def test_a_huge_value_is_refused_without_echoing_it():
    r = build_request("why?", controller_id="c" * 100_000)
    with pytest.raises(AiranError) as e:
        convert.query_from_proto(r, 0.0, None, LIMITS)
    assert "controller_id is 100000 characters" in e.value.message and len(e.value.message) < 300


@pytest.mark.parametrize("field,value", [("priority", 99), ("priority", -1), ("response_mode", 2)])
def test_unknown_enum_values_are_refused(field, value):
    r = _valid()
    setattr(r, field, value)
    with pytest.raises(AiranError) as e:
        convert.query_from_proto(r, 0.0, None, LIMITS)
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT and f"{field} {value} is not a known value" in e.value.message
    assert "NEAR_RT (1)" in e.value.message or "DIAGNOSIS (1)" in e.value.message


@pytest.mark.parametrize("where", ["deadline", "kpi"])
@pytest.mark.parametrize("seconds,nanos", [(L.TIMESTAMP_MAX_S + 1, 0), (L.TIMESTAMP_MIN_S - 1, 0), (0, -1),
                                           (0, 1_000_000_000)])  # fmt: skip
def test_timestamps_outside_the_valid_range_are_refused(where, seconds, nanos):
    r = _valid()
    stamp = r.deadline if where == "deadline" else r.kpi_context[0].time
    stamp.seconds, stamp.nanos = seconds, nanos
    with pytest.raises(AiranError) as e:
        convert.query_from_proto(r, 0.0, None, LIMITS)
    assert "not a valid Timestamp" in e.value.message


@pytest.mark.parametrize("field", ["controller_id", "cell_ids[0]", "kpi_context[0].cell_id"])
def test_identifiers_with_control_characters_are_refused(field):
    r = _valid()
    if field == "controller_id":
        r.controller_id = "xapp\n01"
    elif field == "cell_ids[0]":
        r.cell_ids.append("bs-01/c1\x00")
    else:
        r.kpi_context[0].cell_id = "\x1b[31mbs-01"
    with pytest.raises(AiranError) as e:
        convert.query_from_proto(r, 0.0, None, LIMITS)
    assert "control characters" in e.value.message and field in e.value.message


def test_the_question_bound_follows_the_config():
    r = build_request("q" * 50)
    with pytest.raises(AiranError, match="question is 50 characters.*the bound is 40"):
        convert.query_from_proto(r, 0.0, None, LimitsConfig(max_question_chars=40))


def test_a_ran_load_batch_past_its_bound_or_with_a_bad_share_is_refused_whole():
    big = control_pb2.ReportRanLoadRequest(loads=[control_pb2.SiteRanLoad(site_id="bs-01")] * (L.MAX_RAN_LOADS + 1))
    with pytest.raises(AiranError, match=f"loads has {L.MAX_RAN_LOADS + 1} items; the bound is {L.MAX_RAN_LOADS}"):
        convert.ran_loads_from_proto(big)
    for share in (float("nan"), -0.1, 1.5, float("inf")):
        bad = control_pb2.ReportRanLoadRequest(loads=[control_pb2.SiteRanLoad(site_id="bs-01", ran_compute_share=0.5),
                                                      control_pb2.SiteRanLoad(site_id="bs-02", ran_compute_share=share)])  # fmt: skip
        with pytest.raises(AiranError, match=r"loads\[1\].ran_compute_share .*\[0, 1\]"):
            convert.ran_loads_from_proto(bad)
    empty_site = control_pb2.ReportRanLoadRequest(loads=[control_pb2.SiteRanLoad(site_id="", ran_compute_share=0.5)])
    with pytest.raises(AiranError, match=r"loads\[0\].site_id is empty"):
        convert.ran_loads_from_proto(empty_site)


# -- the gRPC shell --------------------------------------------------------------------
class CountingRenderer:
    """The real tokenizer, recording every render and the thread it ran on."""

    def __init__(self, renderer: PromptRenderer) -> None:
        self.renderer, self.threads = renderer, []

    def render(self, query, budget_tokens, diagnosis=None):
        self.threads.append(threading.get_ident())
        return self.renderer.render(query, budget_tokens, diagnosis)


@pytest.fixture(scope="module")
def tiny_renderer():
    return PromptRenderer(ensure_tiny_model())


@pytest_asyncio.fixture
async def shell(tiny_renderer):
    """(client, gateway, renderer, replica, port): the production server assembly over fake replicas."""
    replica = FakeReplica()
    renderer = CountingRenderer(tiny_renderer)
    pool = FakePool({"r1": ("bs-01", replica), "r2": ("bs-02", FakeReplica())})
    gateway = Gateway(CONFIG, pool, SiteRegistry(CONFIG.sites, CONFIG.radio.min_ai_headroom), {"m": renderer})
    server = build_grpc_server(gateway, {}, health.aio.HealthServicer())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AsyncAiranClient(f"127.0.0.1:{port}") as client:
            yield client, gateway, renderer, replica, port
    finally:
        await server.stop(0)


def _trailing_id(metadata) -> str:
    ids = [v for k, v in (metadata or ()) if k == REQUEST_ID_METADATA]
    assert len(ids) == 1, metadata
    return ids[0]


async def _refusal(coro) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await coro
    return e.value


async def test_100000_cell_ids_are_refused_before_any_tokenisation(shell):
    client, gateway, renderer, replica, _ = shell
    e = await _refusal(client.netops.Ask(build_request("why?", cell_ids=[f"c{i}" for i in range(100_000)]), timeout=30))
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith(f"cell_ids has 100000 items; the bound is {L.MAX_CELL_IDS}")
    assert renderer.threads == [] and replica.calls == 0


async def test_a_200_kb_request_id_is_neither_stored_nor_echoed(shell):
    client, gateway, renderer, _, _ = shell
    huge = "k" * 200_000
    e = await _refusal(client.netops.Ask(build_request("why?", request_id=huge), timeout=30))
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT and "got 200000 characters" in e.details()
    assert len(e.details()) < 400 and re.fullmatch(r"[0-9a-f]{32}", _trailing_id(e.trailing_metadata()))
    assert not gateway.remembers(huge) and renderer.threads == []


async def test_priority_99_is_refused_not_served(shell):
    client, _, _, replica, _ = shell
    request = build_request("why?")
    request.priority = 99
    e = await _refusal(client.netops.Ask(request, timeout=30))
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT and "priority 99 is not a known value" in e.details()
    assert replica.calls == 0


async def test_a_request_over_the_max_receive_size_is_refused_before_parsing(shell):
    client, _, renderer, _, _ = shell
    e = await _refusal(client.netops.Ask(build_request("q" * (CONFIG.server.max_receive_message_bytes + 1)), timeout=30))
    assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and renderer.threads == []


@pytest.mark.parametrize("method", ["/airan.v1.NetOpsService/Ask", "/airan.v1.NetOpsService/AskStream",
                                    "/airan.v1.ControlService/ReportRanLoad"])  # fmt: skip
async def test_bytes_that_are_not_a_message_are_invalid_argument_with_an_id(shell, method):
    _, _, renderer, _, port = shell
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_stream(method) if method.endswith("AskStream") else channel.unary_unary(method)
        bad_utf8 = (b"\x22\x03\xff\xfe\xfd",) if "NetOps" in method else ()  # AskRequest.question
        for garbage in (b"\x0a\x80", b"\x0a\x05ab", b"\xff" * 11, b"\x07", *bad_utf8):
            rpc = call(garbage, timeout=30)
            e = await _refusal(_drain(rpc) if method.endswith("AskStream") else rpc)
            assert e.code() is grpc.StatusCode.INVALID_ARGUMENT, (garbage, e.details())
            assert "is not a valid message of its type" in e.details() and method.lstrip("/") in e.details()
            assert _trailing_id(e.trailing_metadata())
    assert renderer.threads == []


async def _drain(call):
    return [c async for c in call]


async def test_a_ran_load_batch_with_an_unknown_site_or_bad_share_applies_nothing(shell):
    client, gateway, _, _, _ = shell
    before = {s.config.id: s.ran_compute_share for s in gateway.sites.states()}
    e = await _refusal(client.report_ran_load({"bs-01": 0.5, "bs-99": 0.3}))
    assert e.code() is grpc.StatusCode.NOT_FOUND and "bs-99" in e.details()
    e = await _refusal(client.report_ran_load({"bs-01": 0.5, "bs-02": 1.5}))
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT and "loads[1].ran_compute_share (site 'bs-02')" in e.details()
    assert {s.config.id: s.ran_compute_share for s in gateway.sites.states()} == before
    accepted = await client.report_ran_load({"bs-01": 0.5, "bs-02": 0.25})
    assert accepted.accepted == 2 and gateway.sites.get("bs-01").ran_compute_share == 0.5


@pytest.mark.parametrize("request_", [control_pb2.DrainSiteRequest(site_id=""),
                                      control_pb2.DrainSiteRequest(site_id="s" * 64),
                                      control_pb2.ListReplicasRequest(site_id="s" * 64)], ids=["empty", "long", "list"])  # fmt: skip
async def test_control_site_ids_are_bounded(shell, request_):
    client = shell[0]
    rpc = client.control.DrainSite if isinstance(request_, control_pb2.DrainSiteRequest) else client.control.ListReplicas
    e = await _refusal(rpc(request_, timeout=30))
    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT and "site_id" in e.details()


# -- x-request-id metadata ------------------------------------------------------------------
async def test_the_callers_x_request_id_names_a_call_without_a_key_and_is_echoed(shell):
    client, gateway, _, replica, _ = shell
    meta = ((REQUEST_ID_METADATA, "trace-7f3a"),)
    call = client.netops.Ask(build_request("why?", max_tokens=2), metadata=meta, timeout=30)
    response = await call
    assert response.request_id == "trace-7f3a" == _trailing_id(await call.trailing_metadata())
    assert replica.request_ids[-1] == "trace-7f3a" and not gateway.remembers("trace-7f3a")  # no idempotency key
    stream = client.netops.AskStream(build_request("why?", max_tokens=2), metadata=meta, timeout=30)
    assert {c.request_id for c in [c async for c in stream]} == {"trace-7f3a"}
    e = await _refusal(client.control.DrainSite(control_pb2.DrainSiteRequest(site_id="bs-99"), metadata=meta, timeout=30))
    assert _trailing_id(e.trailing_metadata()) == "trace-7f3a"


async def test_the_request_id_field_wins_over_the_metadata_and_a_malformed_header_is_replaced(shell):
    client, _, _, _, _ = shell
    call = client.netops.Ask(build_request("why?", max_tokens=2, request_id="ctl-1"),
                             metadata=((REQUEST_ID_METADATA, "trace-1"),), timeout=30)  # fmt: skip
    assert (await call).request_id == "ctl-1" == _trailing_id(await call.trailing_metadata())
    for bad in ("has space", "x" * (L.ID_MAX_CHARS + 1)):
        call = client.netops.Ask(build_request("why?", max_tokens=2), metadata=((REQUEST_ID_METADATA, bad),), timeout=30)
        response = await call
        assert re.fullmatch(r"[0-9a-f]{32}", response.request_id) and response.request_id != bad


async def test_two_calls_in_flight_under_one_x_request_id_one_is_refused(shell):
    client, gateway, _, replica, _ = shell
    replica.delay = 0.05
    meta = ((REQUEST_ID_METADATA, "dup-1"),)
    results = await asyncio.gather(
        *[client.netops.Ask(build_request("why?", site_ids=["bs-01"], max_tokens=3), metadata=meta, timeout=30)
          for _ in range(2)], return_exceptions=True)  # fmt: skip
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(refused) == 1 and refused[0].code() is grpc.StatusCode.ALREADY_EXISTS
    assert "dup-1" in refused[0].details() and not gateway._one_off_in_flight
    again = await client.netops.Ask(build_request("why?", max_tokens=2), metadata=meta, timeout=30)
    assert again.request_id == "dup-1"  # free again once the first ended


# -- tokenisation off the event loop ----------------------------------------------------------
async def test_prompts_are_rendered_off_the_event_loop(shell):
    client, _, renderer, _, _ = shell
    await client.netops.Ask(build_request("why?", max_tokens=2), timeout=30)
    assert renderer.threads and threading.get_ident() not in renderer.threads


@pytest.mark.parametrize("field,value", [("max_tokens", LIMITS.max_tokens_limit + 1), ("temperature", -0.5),
                                         ("temperature", float("nan")), ("temperature", LIMITS.max_temperature + 1)])  # fmt: skip
def test_numbers_past_their_range_are_refused_before_the_gateway(field, value):
    at = _valid()
    at.max_tokens, at.temperature = LIMITS.max_tokens_limit, LIMITS.max_temperature
    convert.query_from_proto(at, 0.0, None, LIMITS)
    past = _valid()
    setattr(past, field, value)
    with pytest.raises(AiranError, match=f"{field} must be between 0"):
        convert.query_from_proto(past, 0.0, None, LIMITS)


# -- what the engines get from in-bounds input ------------------------------------------------------
@settings(max_examples=40, deadline=None, database=None, derandomize=True)
@given(names=st.lists(st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1,
                              max_size=L.KPI_NAME_MAX_CHARS), min_size=1, max_size=8),
       cells=st.integers(1, 12))  # fmt: skip
def test_the_diagnosis_grammar_of_any_in_bounds_kpi_names_compiles_in_the_engines_grammar_backend(names, cells):
    """KPI names and cells come from the caller and end up in the regex vLLM's xgrammar compiles for the
    request: any names within the bounds must compile (a failure there fails the request on the replica)."""
    xgrammar = pytest.importorskip("xgrammar")
    cell_ids = tuple(f"bs-01/c{i}" for i in range(cells))
    kpis = tuple(KpiSample(n, v, "", c, None) for n in names for v in (1.0, 1000.0) for c in cell_ids)
    ctx = diagnosis_context(Query("why", "r", kpis=kpis, cell_ids=cell_ids, mode="diagnosis"), _DETECTOR)
    _grammar_compiler(xgrammar).compile_regex(ctx.grammar(citable_kpis(ctx)).regex())


_DETECTOR = packaged_detector()


@functools.cache
def _grammar_compiler(xgrammar):
    from transformers import AutoTokenizer

    return xgrammar.GrammarCompiler(xgrammar.TokenizerInfo.from_huggingface(AutoTokenizer.from_pretrained(str(ensure_tiny_model()))))
