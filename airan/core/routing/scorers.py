"""Scorers rate each remaining replica in [0, 1]; the router sums them by weight.

Scores are numpy arrays aligned with the replica list. The gateway's router
runs them, as `router.scorers` in the config names them; the simulator does
not: `airan sim replay` sends its traffic to a running control plane, whose
router scores the replicas.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from airan.core.routing.types import ReplicaView, RoutingContext


class Scorer(Protocol):
    name: str

    def score(self, ctx: RoutingContext, replicas: Sequence[ReplicaView]) -> np.ndarray: ...


class LeastLoadedScorer:
    """1 for an idle replica, falling linearly to 0 at `saturation` queued requests."""

    name = "least_loaded"

    def __init__(self, saturation: int = 16) -> None:
        self.saturation = saturation

    def score(self, ctx, replicas):
        depth = np.array([r.queue_depth for r in replicas], dtype=float)
        return 1.0 - np.minimum(depth, self.saturation) / self.saturation


class KvCacheScorer:
    """Prefer replicas with free KV cache (less preemption risk)."""

    name = "kv_cache"

    def score(self, ctx, replicas):
        return 1.0 - np.clip([r.kv_cache_usage for r in replicas], 0.0, 1.0)


class SiteLocalityScorer:
    """Prefer the site the question is about, then sites close to the controller.

    The first requested site scores 1, other requested sites 0.8; any other site
    decays with the controller's latency to it (0.5 at 0 ms), 0.1 if unknown.
    """

    name = "site_locality"

    def __init__(self, latency_scale_ms: float = 10.0) -> None:
        self.latency_scale_ms = latency_scale_ms

    def score(self, ctx, replicas):
        request = ctx.request
        out = np.empty(len(replicas))
        for i, r in enumerate(replicas):
            if request.site_ids and r.site_id == request.site_ids[0]:
                out[i] = 1.0
            elif r.site_id in request.site_ids:
                out[i] = 0.8
            else:
                site = ctx.sites.get(r.site_id)
                latency = site.latency_ms.get(request.controller_id) if site else None
                out[i] = 0.1 if latency is None else 0.5 * math.exp(-latency / self.latency_scale_ms)
        return out


SCORERS: dict[str, type] = {s.name: s for s in (LeastLoadedScorer, KvCacheScorer, SiteLocalityScorer)}
