"""The request router: filters, then weighted scorers, then a ranked pick.

One seam, as in Ray Serve: `choose` (over a `ReplicaTable` kept current by its
owner) or `choose_replicas` (over a list of views, building the table) returns
ranked tiers so the caller can fall back to the next tier if a replica fails
before answering. Filters and scorers work on columns, so a decision over
thousands of replicas is a few vector operations (benchmarks/bench_admission_decision.py).
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from airan.config import RouterConfig
from airan.core import admission
from airan.core.routing.filters import FILTERS, DeadlineFilter, Filter
from airan.core.routing.scorers import SCORERS, LeastLoadedScorer, Scorer
from airan.core.routing.table import DecisionState, ReplicaTable
from airan.core.routing.types import ReplicaView, RoutingContext


@dataclass(frozen=True)
class RoutingDecision:
    tiers: list[list[ReplicaView]]
    # when no replica is left: the reason from the filter that emptied the set, and its status
    rejection: str | None = None
    rejection_kind: str = "UNAVAILABLE"  # an airan.errors.ErrorKind name
    scores: dict[str, float] = field(default_factory=dict)
    # admission: predicted seconds to the answer on the ranked replicas, seconds left at the decision
    predicted_s: dict[str, float] = field(default_factory=dict)
    budget_s: float | None = None
    # why the best replica is not on the site the request named: computed on request (`placement_note`),
    # since it is an explanation for the response, not part of the decision
    explain_placement: Callable[[], str] | None = field(default=None, repr=False, compare=False)

    @property
    def ranked(self) -> list[ReplicaView]:
        return [r for tier in self.tiers for r in tier]

    @property
    def placement_note(self) -> str:
        """Why a request that names a site is served elsewhere ("" when it is served there); read it
        right after the decision, while the table still holds the state it was made on."""
        return self.explain_placement() if self.explain_placement is not None else ""


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
        self._weight_sum = sum(w for _, w in self.scorers) or 1.0
        self._ones: dict[int, np.ndarray] = {}  # all-eligible masks by table size (read only)

    @classmethod
    def from_config(cls, config: RouterConfig, rng: random.Random | None = None) -> Router:
        filters = []
        for name in config.filters:
            filters.append(DeadlineFilter(config.admission.margin) if name == "deadline" else FILTERS[name]())
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
        """Every eligible replica ranked, from a list of views (builds the table: O(n) Python)."""
        if not candidates:
            return RoutingDecision([], rejection="no replicas are deployed")
        return self.choose(ctx, ReplicaTable(candidates, ctx.sites), limit=None)

    def choose(self, ctx: RoutingContext, table: ReplicaTable, limit: int | None = None) -> RoutingDecision:
        """Filters, scorers and the pick over `table`; `limit`: rank only that many (the hot path)."""
        if not len(table):
            return RoutingDecision([], rejection="no replicas are deployed")
        state = DecisionState()
        eligible = self._ones.get(len(table))
        if eligible is None:
            eligible = self._ones[len(table)] = np.ones(len(table), dtype=bool)
            eligible.flags.writeable = False  # shared by every decision: filters return new masks
        masks = []
        for f in self.filters:
            eligible = f.mask(ctx, table, eligible, state)
            masks.append(eligible)
        if not eligible.any():  # the first filter that left nothing says why
            f = next(f for f, m in zip(self.filters, masks) if not m.any())
            reason = f.explain(ctx, table, state)
            return RoutingDecision([], rejection=reason, rejection_kind=state.rejection_kind,
                                   budget_s=state.budget_s)  # fmt: skip
        total = None
        for scorer, weight in self.scorers:
            score = scorer.score(ctx, table, eligible, state)
            if total is None:
                total = score * weight
            else:
                total += score if weight == 1.0 else score * weight
        if total is None:
            total = np.zeros(len(table))
        masked = np.where(eligible, total, -np.inf)
        picked = self._rank_all(masked) if limit is None else self._rank_top(masked, limit)
        flat = [i for tier in picked for i in tier]
        predicted = state.predicted_s
        return RoutingDecision(
            [[table.views[i] for i in tier] for tier in picked],
            scores={table.ids[i]: float(total[i]) / self._weight_sum for i in flat},
            predicted_s={} if predicted is None else {table.ids[i]: float(predicted[i]) for i in flat},
            budget_s=state.budget_s,
            explain_placement=lambda: self._placement_note(ctx, table, state, flat[0]),
        )

    def _rank_all(self, masked: np.ndarray) -> list[list[int]]:
        """Tiers of equal score, best first; random order inside a tier breaks ties."""
        order = [int(i) for i in np.argsort(-masked, kind="stable") if masked[i] > -np.inf]
        tiers: list[list[int]] = []
        tier_score = None
        for i in order:
            if tier_score is None or tier_score - masked[i] > self.tie_tolerance:
                tiers.append([])
                tier_score = masked[i]
            tiers[-1].append(i)
        for tier in tiers:
            self.rng.shuffle(tier)
        return tiers

    def _rank_top(self, masked: np.ndarray, limit: int) -> list[list[int]]:
        """The best `limit` replicas as tiers, without sorting the rest (`masked` is used up)."""
        tiers: list[list[int]] = []
        left = limit
        while left > 0:
            best = int(masked.argmax())
            score = masked[best]
            if score == -np.inf:
                break
            # ties are looked for in the first tier only: below it, equal scores keep index order
            near = masked >= score - self.tie_tolerance if not tiers else None
            if near is None or np.count_nonzero(near) == 1:  # the usual case: no index list
                tier = [best]
                masked[best] = -np.inf
            else:
                ties = np.flatnonzero(near)
                if len(ties) > left:  # a random few of a large tie, without shuffling all of it
                    tier = [int(ties[j]) for j in self.rng.sample(range(len(ties)), left)]
                else:
                    tier = [int(i) for i in ties]
                    self.rng.shuffle(tier)
                masked[ties] = -np.inf
            tiers.append(tier)
            left -= len(tier)
        return tiers

    @staticmethod
    def _placement_note(ctx: RoutingContext, table: ReplicaTable, state: DecisionState, best: int) -> str:
        """Why a request that names a site is served elsewhere ("" when it is served there)."""
        req = ctx.request
        if not req.site_ids or table.views[best].site_id == req.site_ids[0]:
            return ""
        asked = req.site_ids[0]
        here = table.site_of == table.site_index(asked)
        chosen = f"served at {table.views[best].site_id}"
        usable = here & table.ready & table.serves(req.model)
        if not usable.any():
            return f"{chosen}: {asked} has no ready replica of {req.model}"
        if not (usable & table.site_accepts(ctx.min_ai_headroom)).any():
            return f"{chosen}: {asked} is drained or its radio leaves too little AI headroom"
        predicted = state.predicted_s if state.predicted_s is not None else admission.predict_s(ctx, table)
        local = int(np.flatnonzero(usable)[np.argmin(predicted[usable])])
        there = admission.breakdown(ctx, table, local).total_ms
        elsewhere = admission.breakdown(ctx, table, best).total_ms
        if state.preferred_site_fits is False:
            return (f"{chosen}: {asked} cannot answer within the {1000 * state.budget_s:.0f} ms left "
                    f"(predicted {there:.0f} ms there, {elsewhere:.0f} ms at {table.views[best].site_id}, "
                    "network included)")  # fmt: skip
        return (f"{chosen}: it scored higher than {asked} (predicted {elsewhere:.0f} ms against {there:.0f} ms "
                "there, network included)")  # fmt: skip
