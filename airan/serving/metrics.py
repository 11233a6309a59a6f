"""Prometheus metrics of the control plane (scraped via the chart's ServiceMonitor).

RPC-level figures (every RPC, by method and status code) are recorded by the
metrics interceptor (airan/serving/api/interceptors.py); answer-level figures
(time to first token, per priority) by the NetOps servicer from the gateway's
own timings.
"""
from prometheus_client import Counter, Gauge, Histogram

QUERIES = Counter(
    "airan_queries_total", "Queries answered or refused", ["method", "priority", "code"]
)
LATENCY = Histogram(
    "airan_query_latency_seconds",
    "Arrival to last token",
    ["priority"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
TTFT = Histogram(
    "airan_time_to_first_token_seconds",
    "Arrival to first token",
    ["priority"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
RPC_LATENCY = Histogram(
    "airan_rpc_latency_seconds",
    "Time the server spent on an RPC, by method and gRPC status code (its count is the number of RPCs)",
    ["method", "code"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
SITE_AI_HEADROOM = Gauge("airan_site_ai_headroom", "Compute share the radio leaves for AI", ["site"])


def observe_rpc(method: str, code: str, seconds: float, priority: str = "") -> None:
    """One finished RPC; a query (an RPC with a priority) is also counted per priority."""
    RPC_LATENCY.labels(method, code).observe(seconds)
    if priority:
        QUERIES.labels(method.rpartition("/")[2], priority, code).inc()


def observe_answer(priority: str, total_ms: float, ttft_ms: float) -> None:
    LATENCY.labels(priority).observe(total_ms / 1000)
    TTFT.labels(priority).observe(ttft_ms / 1000)
