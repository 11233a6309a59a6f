"""Metrics are on by default and say what happened: /metrics scraped over HTTP after real gRPC calls
(127.0.0.1, in-process server over fake replicas and the real gateway)."""
from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health
from prometheus_client.parser import text_string_to_metric_families

from airan.client import AsyncAiranClient, build_request
from airan.config import AiranConfig, ServerConfig
from airan.core.prompting import PromptRenderer
from airan.factory.tiny import ensure_tiny_model
from airan.serving import metrics
from airan.serving.gateway import Gateway
from airan.serving.server import build_grpc_server
from airan.serving.sites import SiteRegistry
from fakes import CONFIG, FakePool, FakeReplica


def test_metrics_are_on_by_default():
    assert ServerConfig().metrics_port == 9090
    assert AiranConfig.model_fields["server"].default.metrics_port == 9090


def test_class_buckets_cover_their_budgets_and_past_them():
    """NEAR_RT budgets run 10 ms .. 1 s, NON_RT 2 .. 60 s, BEST_EFFORT 30 s .. 5 min."""
    for priority, (low, high) in {"near_rt": (0.01, 1.0), "non_rt": (2.0, 60.0), "best_effort": (30.0, 300.0)}.items():
        buckets = metrics.LATENCY_BUCKETS_S[priority]
        assert list(buckets) == sorted(buckets)
        assert buckets[0] <= low and low in buckets and high in buckets, priority
        assert buckets[-1] >= 2 * high, f"{priority}: a miss past the budget must land in a bucket"
        inside = [b for b in buckets if low <= b <= high]
        assert len(inside) >= 6, f"{priority}: too coarse inside the budget"


@pytest_asyncio.fixture
async def served():
    replica = FakeReplica(delay=0.01)
    pool = FakePool({"r1": ("bs-01", replica), "r2": ("bs-02", FakeReplica())})
    pool.failed["r2"] = "test: a failed replica shows up as FAILED"
    gateway = Gateway(CONFIG, pool, SiteRegistry(CONFIG.sites, CONFIG.radio.min_ai_headroom),
                      {"m": PromptRenderer(ensure_tiny_model())})  # fmt: skip
    server = build_grpc_server(gateway, {}, health.aio.HealthServicer())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    endpoint = metrics.MetricsEndpoint("127.0.0.1", 0)  # a free port: the same server as server.metrics_port
    sampler = metrics.GatewaySampler(gateway.replica_views, gateway.sites.states, interval_s=0.05)
    sampler.start()
    try:
        yield f"127.0.0.1:{port}", endpoint.port, sampler
    finally:
        await sampler.stop()
        endpoint.stop()
        await server.stop(0)


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_scrape_after_real_calls(served):
    target, port, sampler = served
    before = scrape(port)
    async with AsyncAiranClient(target) as c:
        await c.ask(build_request("Why is bs-01/c1 slow?", priority="near_rt", deadline_s=5.0, max_tokens=4))
        await c.ask(build_request("Summarise the day", priority="best_effort", max_tokens=4))
        with pytest.raises(grpc.aio.AioRpcError):
            await c.ask(build_request("x", priority="non_rt", site_ids=["bs-99"]))  # unknown site
        await c.report_ran_load({"bs-01": 0.6})
    await asyncio.sleep(0.2)  # a few sampler rounds
    after = scrape(port)
    delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731

    # per-class latency, by method and code, in the class's own buckets
    assert delta("airan_query_latency_near_rt_seconds_count", method="Ask", code="OK") == 1
    assert delta("airan_query_latency_near_rt_seconds_bucket", method="Ask", code="OK", le="5.0") == 1
    assert delta("airan_query_latency_best_effort_seconds_count", method="Ask", code="OK") == 1
    assert ("airan_query_latency_best_effort_seconds_bucket",
            frozenset({"method": "Ask", "code": "OK", "le": "600.0"}.items())) in after  # fmt: skip
    # refusals by reason; answers' admissions by class and site
    assert delta("airan_rejections_total", method="Ask", priority="non_rt", reason="not_found") \
        + delta("airan_rejections_total", method="Ask", priority="non_rt", reason="invalid_argument") == 1
    assert delta("airan_admissions_total", priority="near_rt", site="bs-01") \
        + delta("airan_admissions_total", priority="near_rt", site="bs-02") == 1
    assert delta("airan_time_to_first_token_seconds_count", priority="near_rt") == 1
    # state read from the gateway: replica state, queue depth, KV use; the site's headroom
    assert value(after, "airan_replica_state", replica="r1", site="bs-01", state="READY") == 1
    assert value(after, "airan_replica_state", replica="r2", site="bs-02", state="FAILED") == 1
    assert value(after, "airan_replica_state", replica="r2", site="bs-02", state="READY") == 0
    assert value(after, "airan_replica_queue_depth", replica="r1", site="bs-01") == 0
    assert ("airan_replica_kv_cache_usage_ratio", frozenset({"replica": "r1", "site": "bs-01"}.items())) in after
    assert value(after, "airan_site_ai_headroom", site="bs-01") == pytest.approx(0.4)
    assert value(after, "airan_site_ai_headroom", site="bs-02") == pytest.approx(1.0)


def test_restart_and_migration_counters_are_exposed():
    before_r = metrics.REPLICA_RESTARTS.labels("bs-01", "dead")._value.get()
    metrics.replica_restarted("bs-01", "dead")
    metrics.stream_migrated("replica_lost")
    assert metrics.REPLICA_RESTARTS.labels("bs-01", "dead")._value.get() == before_r + 1
    assert metrics.STREAM_MIGRATIONS.labels("replica_lost")._value.get() >= 1


def test_a_taken_metrics_port_is_an_error_naming_the_setting():
    first = metrics.MetricsEndpoint("127.0.0.1", 0)
    try:
        with pytest.raises(RuntimeError, match="server.metrics_port"):
            metrics.MetricsEndpoint("127.0.0.1", first.port)
    finally:
        first.stop()
