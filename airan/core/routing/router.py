"""The request router: filters, then weighted scorers, then a ranked pick.

One seam, as in Ray Serve: `choose` (over a `ReplicaTable` kept current by its
owner) or `choose_replicas` (over a list of views, building the table) returns
ranked tiers so the caller can fall back to the next tier if a replica fails
before answering. Filters and scorers work on columns, so a decision over
thousands of replicas is a few vector operations (benchmarks/bench_admission_decision.py).
A request's `allowed_sites` (its caller's scope) confines every decision: it is folded into
the table's cached mask of static filters, so it costs nothing per decision and no config
can leave it out.
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
        # the leading filters that read only the table (readiness, model, sites) are folded into one
        # mask the table caches per request model, headroom threshold and caller's site scope
        n_static = 0
        while n_static < len(self.filters) and hasattr(self.filters[n_static], "static_key"):
            n_static += 1
        self._static_filters = self.filters[:n_static]
        self._dynamic_filters = self.filters[n_static:]
        self._static_names = tuple(f.name for f in self._static_filters)

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
        eligible = self._static_mask(ctx, table)
        masks = [eligible]
        for f in self._dynamic_filters:
            eligible = f.mask(ctx, table, eligible, state)
            masks.append(eligible)
        if not eligible[eligible.argmax()]:  # none left (argmax finds the first True; ndarray.any is 8x slower)
            return self._rejection(ctx, table, state, masks)  # the first filter that left nothing says why
        if state.rows is not None:  # a filter narrowed the choice to a few rows: score only those
            return self._choose_among(ctx, table, state, state.rows, limit)
        total = table.scratch_total
        first = None  # the first score, kept until the second so the two make one addition
        for scorer, weight in self.scorers:
            score = scorer.score(ctx, table, eligible, state)
            if weight != 1.0:
                score = np.multiply(score, weight, out=table.scratch_tmp)
            if first is None:
                first = score
                if score is table.scratch_tmp:  # the next weighted score reuses that column
                    np.copyto(total, score)
                    first = total
            elif first is not total:
                np.add(first, score, out=total)
                first = total
            else:
                total += score
        if first is None:
            total.fill(0.0)
        elif first is not total:
            np.copyto(total, first)
        scores: dict[int, float] = {}
        if limit is None:
            np.putmask(total, np.invert(eligible, out=table.scratch_excluded), -np.inf)
            picked = self._rank_all(total, scores)
        else:
            picked = self._rank_top(total, eligible, limit, scores)
        return self._decision(ctx, table, state, picked, scores)

    def _decision(self, ctx: RoutingContext, table: ReplicaTable, state: DecisionState,
                  picked: list[list[int]], scores: dict[int, float]) -> RoutingDecision:  # fmt: skip
        flat = [i for tier in picked for i in tier]
        predicted = state.predicted_s
        ids = table.ids
        return RoutingDecision(
            [[table.views[i] for i in tier] for tier in picked],
            scores={ids[i]: s / self._weight_sum for i, s in scores.items()},
            predicted_s={} if predicted is None else {ids[i]: float(predicted[i]) for i in flat},
            budget_s=state.budget_s,
            explain_placement=lambda: self._placement_note(ctx, table, flat[0]),
        )

    def _choose_among(self, ctx: RoutingContext, table: ReplicaTable, state: DecisionState, rows: np.ndarray,
                      limit: int | None) -> RoutingDecision:  # fmt: skip
        """Score and rank only `rows` (the eligible ones, e.g. the named site's replicas that fit), in
        plain Python: for a handful of replicas a numpy call costs more than the arithmetic."""
        idx = rows.tolist()
        totals = [0.0] * len(idx)
        for scorer, weight in self.scorers:
            rows_score = getattr(scorer, "score_rows", None)
            values = rows_score(ctx, table, rows, state) if rows_score is not None \
                else scorer.score(ctx, table, table.mask_of(rows), state)[rows].tolist()  # fmt: skip
            totals = [t + weight * v for t, v in zip(totals, values)]
        order = sorted(range(len(idx)), key=totals.__getitem__, reverse=True)
        tiers: list[list[int]] = []
        tier_score = None
        for k in order:  # tiers of equal score, best first, shuffled inside
            if tier_score is None or tier_score - totals[k] > self.tie_tolerance:
                tiers.append([])
                tier_score = totals[k]
            tiers[-1].append(k)
        picked, left = [], len(idx) if limit is None else limit
        for tier in tiers:
            if left <= 0:
                break
            self.rng.shuffle(tier)
            picked.append([idx[k] for k in tier[:left]])
            left -= len(picked[-1])
        score_of = dict(zip(idx, totals))
        return self._decision(ctx, table, state, picked, {i: score_of[i] for tier in picked for i in tier})

    def _static_mask(self, ctx: RoutingContext, table: ReplicaTable) -> np.ndarray:
        """The folded mask of the caller's site scope and the leading table-only filters (cached by
        the table). The scope is folded in here, not configured as a filter, so no `router.filters`
        setting can drop it."""
        key = [self._static_names, ctx.request.allowed_sites]
        for f in self._static_filters:
            key.append(f.static_key(ctx))
        return table.static_mask(tuple(key), self._fold_static, ctx)[0]

    def _fold_static(self, ctx: RoutingContext, table: ReplicaTable) -> np.ndarray:
        mask = self._scope_mask(ctx, table)
        for f in self._static_filters:
            mask = f.mask(ctx, table, mask, None)
        return mask

    @staticmethod
    def _scope_mask(ctx: RoutingContext, table: ReplicaTable) -> np.ndarray:
        """The replicas at the sites the caller's scope allows (every replica when it allows every site)."""
        allowed = ctx.request.allowed_sites
        return np.ones(len(table), dtype=bool) if allowed is None else table.at_sites(allowed)

    def _rejection(self, ctx: RoutingContext, table: ReplicaTable, state: DecisionState,
                   masks: list[np.ndarray]) -> RoutingDecision:  # fmt: skip
        """No replica is left: the first filter that emptied the set explains why (off the hot path:
        the folded table-only filters are run one by one again to find which)."""
        allowed = ctx.request.allowed_sites
        scope = "" if allowed is None else f"sites {', '.join(sorted(allowed))}"
        if not masks[0].any():
            mask = self._scope_mask(ctx, table)
            if not mask.any():
                reason = f"no replica is deployed at {scope}, the only ones its caller's scope allows"
                return RoutingDecision([], rejection=reason, rejection_kind="UNAVAILABLE")
            for f in self._static_filters:
                mask = f.mask(ctx, table, mask, state)
                if not mask.any():
                    break
        else:
            f = next(f for f, m in zip(self._dynamic_filters, masks[1:]) if not m.any())
        reason = f.explain(ctx, table, state)
        if scope:
            reason += f"; its caller's scope confines it to {scope}"
        return RoutingDecision([], rejection=reason, rejection_kind=state.rejection_kind, budget_s=state.budget_s)

    def _rank_all(self, masked: np.ndarray, scores: dict[int, float]) -> list[list[int]]:
        """Tiers of equal score, best first; random order inside a tier breaks ties. Fills `scores`."""
        order = [int(i) for i in np.argsort(-masked, kind="stable") if masked[i] > -np.inf]
        scores.update((i, float(masked[i])) for i in order)
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

    # ineligible replicas met at the top of the scores before they are masked all at once
    MAX_SKIPS = 8

    def _rank_top(self, masked: np.ndarray, eligible: np.ndarray, limit: int,
                  scores: dict[int, float]) -> list[list[int]]:  # fmt: skip
        """The best `limit` eligible replicas as tiers, without sorting the rest (`masked` is used up).
        Ineligible ones are skipped as they come up (usually none or a few), not masked first: masking
        every score costs more than the picks. Ties are looked for in the first tier only (below it,
        equal scores keep index order), and only when the runner-up is within the tolerance, which
        the next pick finds anyway. Fills `scores` for the ranked ones."""
        picks = self._top_eligible(masked, eligible, limit + 1)
        if not picks:
            return []
        best, score = picks[0]
        if len(picks) == 1 or picks[1][1] < score - self.tie_tolerance:  # the usual case: no tie
            scores.update(picks[:limit])
            return [[i] for i, _ in picks[:limit]]
        for i, v in picks:  # a tie at the top: put the picks back and take the whole tier
            masked[i] = v
        ties = np.flatnonzero((masked >= score - self.tie_tolerance) & eligible)
        if len(ties) >= limit:  # a random few of a large tie, without shuffling all of it
            tier = [int(ties[j]) for j in self.rng.sample(range(len(ties)), limit)]
        else:
            tier = [int(i) for i in ties]
            self.rng.shuffle(tier)
        scores.update((i, float(masked[i])) for i in tier)
        masked[ties] = -np.inf
        tiers = [tier]
        rest = self._top_eligible(masked, eligible, limit - len(tier))
        scores.update(rest)
        return tiers + [[i] for i, _ in rest]

    def _top_eligible(self, masked: np.ndarray, eligible: np.ndarray, n: int) -> list[tuple[int, float]]:
        """Up to `n` (index, score) of the best eligible scores, best first, each set to -inf."""
        out: list[tuple[int, float]] = []
        skips = 0
        while len(out) < n:
            i = int(masked.argmax())
            v = float(masked[i])
            if v == -np.inf:
                break
            masked[i] = -np.inf
            if eligible[i]:
                out.append((i, v))
                continue
            skips += 1
            if skips == self.MAX_SKIPS:  # many ineligible at the top: mask them all at once
                np.putmask(masked, ~eligible, -np.inf)
        return out

    def _placement_note(self, ctx: RoutingContext, table: ReplicaTable, best: int) -> str:
        """Why a request that names a site is served elsewhere ("" when it is served there); the
        filters run again (the decision's own figures were in scratch columns)."""
        req = ctx.request
        if not req.site_ids or table.views[best].site_id == req.site_ids[0]:
            return ""
        asked = req.site_ids[0]
        chosen = f"served at {table.views[best].site_id}"
        if req.allowed_sites is not None and asked not in req.allowed_sites:
            return f"{chosen}: {asked} is outside its caller's scope"
        state = DecisionState()
        eligible = self._static_mask(ctx, table)
        for f in self._dynamic_filters:
            eligible = f.mask(ctx, table, eligible, state)
        here = table.site_of == table.site_index(asked)
        usable = here & table.ready & table.serves(req.model)
        if not usable.any():
            return f"{chosen}: {asked} has no ready replica of {req.model}"
        if not (usable & table.site_accepts(ctx.min_ai_headroom)).any():
            return f"{chosen}: {asked} is drained or its radio leaves too little AI headroom"
        predicted = admission.predict_s(ctx, table)
        local = int(np.flatnonzero(usable)[np.argmin(predicted[usable])])
        there = admission.breakdown(ctx, table, local).total_ms
        elsewhere = admission.breakdown(ctx, table, best).total_ms
        if state.preferred_site_fits is False:
            return (f"{chosen}: {asked} cannot answer within the {1000 * state.budget_s:.0f} ms left "
                    f"(predicted {there:.0f} ms there, {elsewhere:.0f} ms at {table.views[best].site_id}, "
                    "network included)")  # fmt: skip
        return (f"{chosen}: it scored higher than {asked} (predicted {elsewhere:.0f} ms against {there:.0f} ms "
                "there, network included)")  # fmt: skip
