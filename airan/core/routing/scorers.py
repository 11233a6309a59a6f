"""Scorers rate each replica in [0, 1]; the router sums them by weight.

Scores are numpy arrays aligned with the table's replicas (only the eligible
ones' values are read). The gateway's router runs them, as `router.scorers` in
the config names them; the simulator does not: `airan sim replay` sends its
traffic to a running control plane, whose router scores the replicas.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from airan.core.routing import kernel
from airan.core.routing.table import DecisionState, ReplicaTable
from airan.core.routing.types import RoutingContext


class Scorer(Protocol):
    name: str

    def score(self, ctx: RoutingContext, table: ReplicaTable, eligible: np.ndarray, state: DecisionState) -> np.ndarray: ...


# The scorers below compute in the routing kernel (airan/core/routing/kernel.py): the router's fast
# path runs them all at once in it (`terms` says which term and column is each one's), and `score`
# runs one of them alone, for the router's general path. Their scores are -inf where a replica is
# not eligible.


class LeastLoadedScorer:
    """1 for an idle replica, falling linearly to 0 at `saturation` queued requests."""

    name = "least_loaded"

    def __init__(self, saturation: int = 16) -> None:
        self.saturation = saturation

    def terms(self, weight: float) -> dict:
        return dict(load=weight, saturation=self.saturation)

    def score(self, ctx, table, eligible, state):
        return kernel.columns(ctx, table, eligible, kernel.Terms(**self.terms(1.0)))[2]


class KvCacheScorer:
    """Prefer replicas with free KV cache (less preemption risk)."""

    name = "kv_cache"

    def terms(self, weight: float) -> dict:
        return dict(kv=weight)

    def score(self, ctx, table, eligible, state):
        return kernel.columns(ctx, table, eligible, kernel.Terms(**self.terms(1.0)))[2]


class SiteLocalityScorer:
    """Prefer the site the question is about, then sites close to the controller.

    The first requested site scores 1, other requested sites 0.8; any other site
    decays with the controller's latency to it (0.5 at 0 ms), 0.1 if unknown.
    """

    name = "site_locality"

    def __init__(self, latency_scale_ms: float = 10.0) -> None:
        self.latency_scale_ms = latency_scale_ms

    def terms(self, weight: float) -> dict:
        return dict(locality=weight, scale_ms=self.latency_scale_ms)

    def score(self, ctx, table, eligible, state):
        return kernel.columns(ctx, table, eligible, kernel.Terms(**self.terms(1.0)))[2]


class PredictedLatencyScorer:
    """Prefer the replica predicted to answer first (airan/core/admission.py's model):
    the fastest eligible one scores 1, one predicted to take twice as long 0.5. A tenth of a
    second (`kernel.LATENCY_FLOOR_S`) is added to every prediction, so a few milliseconds of network
    between otherwise equal replicas do not outweigh the site the request names."""

    name = "predicted_latency"

    def terms(self, weight: float) -> dict:
        return dict(latency=weight)

    def score(self, ctx, table, eligible, state):
        return kernel.columns(ctx, table, eligible, kernel.Terms(**self.terms(1.0)))[2]


SCORERS: dict[str, type] = {
    s.name: s for s in (LeastLoadedScorer, KvCacheScorer, SiteLocalityScorer, PredictedLatencyScorer)
}
