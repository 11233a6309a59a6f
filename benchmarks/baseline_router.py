"""The router as it was before admission (commit eaad6be), kept verbatim for one purpose: the
baseline side of benchmarks/bench_admission_decision.py. Filters keep lists of views, scorers
rate them, every eligible replica is ranked. It works on today's `ReplicaView`, `SiteView` and
`RoutingContext` (their old fields are unchanged). Do not use it anywhere else.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from airan.core.routing.types import ReplicaState, ReplicaView, RoutingContext


def _site_accepts(ctx: RoutingContext, site_id: str) -> bool:
    site = ctx.sites.get(site_id)
    return site is not None and not site.drained and site.ai_headroom >= ctx.min_ai_headroom


class ReadyFilter:
    name = "ready"

    def filter(self, ctx, replicas):
        return [r for r in replicas if r.state is ReplicaState.READY]

    def explain(self, ctx):
        return "no replica is ready (starting, failed or stopped)"


class ModelFilter:
    name = "model"

    def filter(self, ctx, replicas):
        return [r for r in replicas if r.serves(ctx.request.model)]

    def explain(self, ctx):
        return f"no ready replica serves model '{ctx.request.model}' (or holds it as an adapter)"


class SiteActiveFilter:
    name = "site_active"

    def filter(self, ctx, replicas):
        return [r for r in replicas if _site_accepts(ctx, r.site_id)]

    def explain(self, ctx):
        return ("every site with a matching replica is drained or has less AI headroom than "
                f"{ctx.min_ai_headroom:.0%} because of radio load")  # fmt: skip


class LeastLoadedScorer:
    name = "least_loaded"

    def __init__(self, saturation: int = 16) -> None:
        self.saturation = saturation

    def score(self, ctx, replicas):
        depth = np.array([r.queue_depth for r in replicas], dtype=float)
        return 1.0 - np.minimum(depth, self.saturation) / self.saturation


class SiteLocalityScorer:
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


@dataclass(frozen=True)
class RoutingDecision:
    tiers: list[list[ReplicaView]]
    rejection: str | None = None
    scores: dict[str, float] = field(default_factory=dict)


class BaselineRouter:
    """Default filters (ready, site_active, model) and scorers (least_loaded, site_locality), weight 1 each."""

    def __init__(self, rng: random.Random | None = None, tie_tolerance: float = 1e-9) -> None:
        self.filters = [ReadyFilter(), SiteActiveFilter(), ModelFilter()]
        self.scorers = [(LeastLoadedScorer(16), 1.0), (SiteLocalityScorer(), 1.0)]
        self.rng = rng or random.Random()
        self.tie_tolerance = tie_tolerance

    def choose_replicas(self, ctx: RoutingContext, candidates: Sequence[ReplicaView]) -> RoutingDecision:
        remaining = list(candidates)
        if not remaining:
            return RoutingDecision([], rejection="no replicas are deployed")
        for f in self.filters:
            remaining = f.filter(ctx, remaining)
            if not remaining:
                return RoutingDecision([], rejection=f.explain(ctx))
        total = np.zeros(len(remaining))
        weight_sum = sum(w for _, w in self.scorers) or 1.0
        for scorer, weight in self.scorers:
            total += weight * np.asarray(scorer.score(ctx, remaining), dtype=float)
        total /= weight_sum
        return RoutingDecision(self._rank(remaining, total),
                               scores={r.replica_id: float(s) for r, s in zip(remaining, total)})  # fmt: skip

    def _rank(self, replicas: list[ReplicaView], scores: np.ndarray) -> list[list[ReplicaView]]:
        order = sorted(range(len(replicas)), key=lambda i: -scores[i])
        tiers: list[list[ReplicaView]] = []
        tier_score = None
        for i in order:
            if tier_score is None or tier_score - scores[i] > self.tie_tolerance:
                tiers.append([])
                tier_score = scores[i]
            tiers[-1].append(replicas[i])
        for tier in tiers:
            self.rng.shuffle(tier)
        return tiers
