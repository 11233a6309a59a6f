"""Prometheus metrics of the control plane (scraped via the chart's ServiceMonitor)."""
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
SITE_AI_HEADROOM = Gauge("airan_site_ai_headroom", "Compute share the radio leaves for AI", ["site"])
