"""The request router: filters, then weighted scorers, then a ranked pick.

One seam, `choose_replicas`, as in Ray Serve: it returns ranked tiers so the
caller can fall back to the next tier if a replica fails before answering.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from airan.config import RouterConfig
from airan.core.routing.filters import FILTERS, Filter
from airan.core.routing.scorers import SCORERS, LeastLoadedScorer, Scorer
from airan.core.routing.types import ReplicaView, RoutingContext


@dataclass(frozen=True)
class RoutingDecision:
    tiers: list[list[ReplicaView]]
    # when no replica is left: the reason from the filter that emptied the set
    rejection: str | None = None
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def ranked(self) -> list[ReplicaView]:
        return [r for tier in self.tiers for r in tier]


class Router:
    def __init__(
        self,
        filters: Sequence[Filter],
        scorers: Sequence[tuple[Scorer, float]],
        rng: random.Random | None = None,
        tie_tolerance: float = 1e-9,
    ) -> None:
        self.filters = list(filters)
        self.scorers = list(scorers)
        self.rng = rng or random.Random()
        self.tie_tolerance = tie_tolerance

    @classmethod
    def from_config(cls, config: RouterConfig, rng: random.Random | None = None) -> Router:
        filters = [FILTERS[name]() for name in config.filters]
        scorers = []
        for spec in config.scorers:
            scorer_cls = SCORERS[spec.type]
            scorer = (
                scorer_cls(saturation=config.saturation_in_flight)
                if scorer_cls is LeastLoadedScorer
                else scorer_cls()
            )
            scorers.append((scorer, spec.weight))
        return cls(filters, scorers, rng)

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
        return RoutingDecision(
            self._rank(remaining, total),
            scores={r.replica_id: float(s) for r, s in zip(remaining, total)},
        )

    def _rank(self, replicas: list[ReplicaView], scores: np.ndarray) -> list[list[ReplicaView]]:
        """Tiers of equal score, best first; random order inside a tier breaks ties."""
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
