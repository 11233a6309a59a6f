"""Prometheus metrics of the control plane (on by default: server.metrics_port, 9090; the chart's
ServiceMonitor scrapes it). README "Metrics" lists every series.

Who records what:
- every RPC, by method and status code, and every refusal by reason: the metrics interceptor
  (airan/serving/api/interceptors.py), with `observe_rpc`;
- queries, per priority class, in histograms whose buckets follow that class's budget: the same
  interceptor (arrival at the server to the last byte sent, refused calls included);
- time to first token per class: the NetOps servicer, from the gateway's own timings (`observe_answer`);
- admissions: the gateway, when a replica's queue takes a request (`admitted`);
- replica state, queue depth and KV-cache use, and each site's AI headroom: `GatewaySampler`, which
  reads the gateway on the event loop every `interval_s` and publishes a snapshot the scrape reads;
- replica restarts and stream migrations: whoever restarts or moves them (`replica_restarted`,
  `stream_migrated`).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# Latency buckets per priority class, around that class's deadline budget (the simulator draws
# NEAR_RT budgets from 10 ms to 1 s, the O-RAN near-RT loop; NON_RT from 2 s to 60 s; BEST_EFFORT
# from 30 s to 5 min): fine inside the budget, a few buckets past it so misses are seen, not clipped.
LATENCY_BUCKETS_S: dict[str, tuple[float, ...]] = {
    "near_rt": (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0),
    "non_rt": (0.1, 0.25, 0.5, 1.0, 2.0, 3.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0),
    "best_effort": (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 90.0, 120.0, 180.0, 240.0, 300.0, 450.0, 600.0),
}

QUERIES = Counter(
    "airan_queries_total", "Queries answered or refused", ["method", "priority", "code"]
)
QUERY_LATENCY = {
    priority: Histogram(
        f"airan_query_latency_{priority}_seconds",
        f"{priority.upper()} queries: arrival at the server to the end of the RPC, by method and status code "
        "(refusals included; buckets follow the class's deadline budget)",
        ["method", "code"],
        buckets=buckets,
    )
    for priority, buckets in LATENCY_BUCKETS_S.items()
}
TTFT = Histogram(
    "airan_time_to_first_token_seconds",
    "Arrival to first token of answered queries",
    ["priority"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
RPC_LATENCY = Histogram(
    "airan_rpc_latency_seconds",
    "Time the server spent on an RPC, by method and gRPC status code (its count is the number of RPCs)",
    ["method", "code"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
REJECTIONS = Counter(
    "airan_rejections_total",
    "RPCs refused or failed, by method, priority (queries) and reason (unauthenticated, permission_denied, "
    "rate_limited, or the status code's name in lower case unless the error names a narrower reason)",
    ["method", "priority", "reason"],
)
ADMISSIONS = Counter(
    "airan_admissions_total", "Queries a replica's queue took (started or queued), by priority and site",
    ["priority", "site"],
)
SITE_AI_HEADROOM = Gauge("airan_site_ai_headroom", "Compute share the radio leaves for AI", ["site"])
REPLICA_RESTARTS = Counter(
    "airan_replica_restarts_total", "Replicas restarted or re-placed after a failure, by site and reason",
    ["site", "reason"],
)
STREAM_MIGRATIONS = Counter(
    "airan_stream_migrations_total", "Streams moved to another replica mid-answer, by reason", ["reason"]
)


def observe_rpc(method: str, code: str, seconds: float, priority: str = "", reason: str = "") -> None:
    """One finished RPC; a query (an RPC with a priority) is also counted and timed per class.
    A call that did not end OK is a rejection, under `reason` (default: the code in lower case)."""
    RPC_LATENCY.labels(method, code).observe(seconds)
    short = method.rpartition("/")[2]
    if priority:
        QUERIES.labels(short, priority, code).inc()
        histogram = QUERY_LATENCY.get(priority)
        if histogram is not None:
            histogram.labels(short, code).observe(seconds)
    if code != "OK":
        REJECTIONS.labels(short, priority, reason or code.lower()).inc()


def observe_answer(priority: str, total_ms: float, ttft_ms: float) -> None:
    """An answered query's time to first token (its total is timed by the interceptor)."""
    TTFT.labels(priority).observe(ttft_ms / 1000)


def admitted(priority: str, site_id: str) -> None:
    ADMISSIONS.labels(priority, site_id).inc()


def replica_restarted(site_id: str, reason: str) -> None:
    """A failed replica was restarted or re-placed (`site_id`: where it runs now)."""
    REPLICA_RESTARTS.labels(site_id, reason).inc()


def stream_migrated(reason: str) -> None:
    """A stream continued on another replica after its replica failed mid-answer."""
    STREAM_MIGRATIONS.labels(reason).inc()


# -- state read from the gateway ------------------------------------------------------
@dataclass(frozen=True)
class ReplicaSample:
    replica_id: str
    site_id: str
    state: str  # ReplicaState name, e.g. "READY"
    queue_depth: int  # requests running or waiting for it
    kv_cache_usage: float  # 0..1, as the engine reports it (0 where it reports none)


REPLICA_STATES = ("STARTING", "READY", "DRAINING", "FAILED", "STOPPED")


class _ReplicaCollector(Collector):
    """Publishes the last snapshot; replicas that are gone leave no stale series."""

    def __init__(self) -> None:
        self.snapshot: tuple[ReplicaSample, ...] = ()

    def collect(self):
        snapshot = self.snapshot  # one reference read: the event loop swaps in a new tuple
        state = GaugeMetricFamily("airan_replica_state", "1 for the state each replica is in, 0 for the others",
                                  labels=["replica", "site", "state"])  # fmt: skip
        depth = GaugeMetricFamily("airan_replica_queue_depth", "Requests running on or waiting for each replica",
                                  labels=["replica", "site"])  # fmt: skip
        kv = GaugeMetricFamily("airan_replica_kv_cache_usage_ratio", "Share of each replica's KV cache in use",
                               labels=["replica", "site"])  # fmt: skip
        for r in snapshot:
            for name in REPLICA_STATES:
                state.add_metric([r.replica_id, r.site_id, name], 1.0 if r.state == name else 0.0)
            depth.add_metric([r.replica_id, r.site_id], r.queue_depth)
            kv.add_metric([r.replica_id, r.site_id], r.kv_cache_usage)
        yield from (state, depth, kv)

    def describe(self):
        return []  # dynamic: nothing to check at registration


REPLICAS = _ReplicaCollector()
REGISTRY.register(REPLICAS)


class GatewaySampler:
    """Reads replica and site state on the event loop (where the gateway changes it) and publishes it."""

    def __init__(self, replicas: Callable[[], Iterable], sites: Callable[[], Iterable], interval_s: float = 1.0):
        self.replicas = replicas  # () -> ReplicaView-like (replica_id, site_id, state, queue_depth, kv_cache_usage)
        self.sites = sites  # () -> SiteState-like (config.id, ai_headroom)
        self.interval_s = interval_s
        self._task: asyncio.Task | None = None

    def sample(self) -> None:
        REPLICAS.snapshot = tuple(
            ReplicaSample(v.replica_id, v.site_id, getattr(v.state, "name", str(v.state)), v.queue_depth,
                          float(v.kv_cache_usage))  # fmt: skip
            for v in self.replicas()
        )
        for s in self.sites():
            SITE_AI_HEADROOM.labels(s.config.id).set(s.ai_headroom)

    async def _run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:  # a metric must never take the server down
                log.exception("metrics sample failed")
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="airan-metrics-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        REPLICAS.snapshot = ()  # a stopped control plane has no replicas to report


class MetricsEndpoint:
    """The /metrics HTTP endpoint (prometheus-client's WSGI server on a daemon thread)."""

    def __init__(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(port, addr=host)
        except OSError as e:
            raise RuntimeError(f"cannot serve metrics on {host}:{port} ({e}): set server.metrics_port to a free "
                               "port, or 0 to turn the endpoint off") from e  # fmt: skip
        self.port = self._server.server_port

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
