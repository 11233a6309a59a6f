"""The request router: filters, then weighted scorers, then a ranked pick.

One seam, as in Ray Serve: `choose` (over a `ReplicaTable` kept current by its
owner) or `choose_replicas` (over a list of views, building the table) returns
ranked tiers so the caller can fall back to the next tier if a replica fails
before answering. Filters and scorers work on columns; with the built-in ones in
the default order a decision is one compiled pass over them (kernel.py, the
fast path), otherwise it runs them one by one (the general path), so a decision
over thousands of replicas takes microseconds (benchmarks/bench_admission_decision.py).
A request's `allowed_sites` (its caller's scope) confines every decision: it is folded into
the table's cached mask of static filters, so it costs nothing per decision and no config
can leave it out.
"""
from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from airan.config import RouterConfig
from airan.core import admission
from airan.core.routing import kernel
from airan.core.routing.filters import FILTERS, DeadlineFilter, Filter, PreferredSiteFilter
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
        self._static = self._static_spec(self._static_filters)
        # the leading table-only and mask-only filters are masks ANDed together, so the one pass may
        # fold all the table-only ones into the cached mask and apply the mask-only ones after it; the
        # general path keeps the configured order, since the first filter that empties the set names
        # the refusal's reason
        n_lead = 0
        while n_lead < len(self.filters) and (hasattr(self.filters[n_lead], "static_key")
                                              or getattr(self.filters[n_lead], "mask_only", False)):  # fmt: skip
            n_lead += 1
        lead = self.filters[:n_lead]
        self._fast_static = self._static_spec([f for f in lead if hasattr(f, "static_key")])
        self._pre_kernel_filters = [f for f in lead if not hasattr(f, "static_key")]
        self._fast = self._fast_path(self.filters[n_lead:])
        if self._fast is not None:
            kernel.warm_up()

    def _fast_path(self, after_masks: Sequence[Filter]) -> tuple[kernel.Terms, float | None, bool] | None:
        """(the scorers as the routing kernel's terms, the deadline filter's margin or None, whether the
        preferred_site filter runs) when the whole decision after the folded table-only filters is
        one kernel pass: the filters are table-only and mask-only ones (`mask_only`, e.g. radio
        first's headroom) in any order, then `deadline` then `preferred_site` (either may be left
        out), and every scorer is one the kernel computes, each at most once. Otherwise None, and each
        decision takes the general path: filter by filter, scorer by scorer, each a column. Two paths
        because the seam lets a config (or `airan.core.policies`) put its own filters and scorers in
        any order, which one fixed pass cannot run; the covered filters and scorers run the same
        kernel on the general path, so their arithmetic is written once."""
        kinds = [type(f) for f in after_masks]
        if kinds not in ([], [DeadlineFilter], [PreferredSiteFilter], [DeadlineFilter, PreferredSiteFilter]):
            return None
        terms: dict = {}
        for scorer, weight in self.scorers:
            # the built-in ones the kernel computes; a scorer without `terms` runs on the general path
            terms_of = getattr(scorer, "terms", None) if type(scorer) in SCORERS.values() else None
            part = None if terms_of is None else terms_of(weight)
            if part is None or terms.keys() & part.keys():
                return None
            terms.update(part)
        deadline = next((f.margin for f in after_masks if isinstance(f, DeadlineFilter)), None)
        return kernel.Terms(**terms), deadline, PreferredSiteFilter in kinds

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
        if self._fast is not None:
            decision = self._choose_fast(ctx, table, limit)
            if decision is not None:
                return decision
        return self._choose_general(ctx, table, limit)

    def _choose_fast(self, ctx: RoutingContext, table: ReplicaTable, limit: int | None) -> RoutingDecision | None:
        """The decision in one kernel pass; None when nothing is left (the general path then finds
        which filter emptied the set, to say why: a refusal is not the hot path)."""
        terms, margin, preferred = self._fast
        deadline = ctx.request.deadline if margin is not None else None
        budget = None if deadline is None else deadline - ctx.now
        eligible = self._static_mask(ctx, table, fast=True)
        if self._pre_kernel_filters:
            state = DecisionState()
            for f in self._pre_kernel_filters:
                eligible = f.mask(ctx, table, eligible, state)
        k = 0 if limit is None else limit + 1  # the runner-up too: a tie at the top is found from it
        if k > len(table.scratch[3]):
            table.scratch = (*table.scratch[:3], np.empty(k, dtype=np.int64), np.empty(k))
        n_fit, m, _, _ = kernel.run(ctx, table, eligible, terms, math.inf if budget is None else budget / margin,
                                    preferred, k)  # fmt: skip
        if n_fit == 0:
            return None
        predicted, _, total, top_i, top_v = table.scratch
        if k and (m == 1 or top_v[1] < top_v[0] - self.tie_tolerance):  # the usual case: no tie at the top
            m = min(m, limit)
            rows = top_i[:m].tolist()
            ids, w = table.ids, self._weight_sum
            return RoutingDecision(
                [[table.views[i]] for i in rows],
                scores={ids[i]: v / w for i, v in zip(rows, top_v[:m].tolist())},
                predicted_s={} if budget is None else {ids[i]: predicted.item(i) for i in rows},
                budget_s=budget,
                explain_placement=lambda: self._placement_note(ctx, table, rows[0]),
            )
        scores: dict[int, float] = {}  # rank every score, or break a tie at the top at random
        picked = self._rank(total, limit, scores)
        return self._decision(ctx, table, None if budget is None else predicted, budget, picked, scores)

    def _choose_general(self, ctx: RoutingContext, table: ReplicaTable, limit: int | None) -> RoutingDecision:
        """Filter by filter, then scorer by scorer, each a column over the table."""
        state = DecisionState()
        eligible = self._static_mask(ctx, table)
        masks = [eligible]
        for f in self._dynamic_filters:
            eligible = f.mask(ctx, table, eligible, state)
            masks.append(eligible)
        if not eligible.any():
            return self._rejection(ctx, table, state, masks)  # the first filter that left nothing says why
        total = np.zeros(len(table))
        for scorer, weight in self.scorers:
            total += weight * np.where(eligible, scorer.score(ctx, table, eligible, state), 0.0)
        total[~eligible] = -np.inf
        scores: dict[int, float] = {}
        picked = self._rank(total, limit, scores)
        return self._decision(ctx, table, state.predicted_s, state.budget_s, picked, scores)

    def _decision(self, ctx: RoutingContext, table: ReplicaTable, predicted: np.ndarray | None, budget: float | None,
                  picked: list[list[int]], scores: dict[int, float]) -> RoutingDecision:  # fmt: skip
        flat = [i for tier in picked for i in tier]
        ids = table.ids
        return RoutingDecision(
            [[table.views[i] for i in tier] for tier in picked],
            scores={ids[i]: s / self._weight_sum for i, s in scores.items()},
            predicted_s={} if predicted is None else {ids[i]: float(predicted[i]) for i in flat},
            budget_s=budget,
            explain_placement=lambda: self._placement_note(ctx, table, flat[0]),
        )

    def _static_mask(self, ctx: RoutingContext, table: ReplicaTable, fast: bool = False) -> np.ndarray:
        """The folded mask of the caller's site scope and the leading table-only filters (`fast`: all
        of those the one pass folds; cached by the table). The scope is folded in here, not configured
        as a filter, so no `router.filters` setting can drop it."""
        filters, names, fold = self._fast_static if fast else self._static
        key = [names, ctx.request.allowed_sites]
        for f in filters:
            key.append(f.static_key(ctx))
        return table.static_mask(tuple(key), fold, ctx)

    def _fold_static(self, filters: Sequence[Filter], ctx: RoutingContext, table: ReplicaTable) -> np.ndarray:
        mask = self._scope_mask(ctx, table)
        for f in filters:
            mask = f.mask(ctx, table, mask, None)
        return mask

    def _static_spec(self, filters: Sequence[Filter]) -> tuple:
        """(the filters, their names: the cache key's first part, the fold that builds the mask)."""
        return list(filters), tuple(f.name for f in filters), functools.partial(self._fold_static, list(filters))

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

    def _rank(self, total: np.ndarray, limit: int | None, scores: dict[int, float]) -> list[list[int]]:
        """Tiers best first from every score (-inf: not eligible); fills `scores`. `limit` None: every
        eligible replica, tiers of equal score (within the tolerance) shuffled. Otherwise the best
        `limit`: ties are looked for in the first tier only (a random few of a large one), below it
        equal scores keep index order."""
        if limit is not None:  # the best few without sorting every replica (thousands of them)
            top = float(total.max()) if len(total) else -np.inf
            if top == -np.inf:
                return []
            ties = np.flatnonzero(total >= top - self.tie_tolerance).tolist()  # index order
            if len(ties) >= limit:  # a random few of a large tie, without shuffling all of it
                tier = [ties[j] for j in self.rng.sample(range(len(ties)), limit)]
            else:
                tier = ties
                self.rng.shuffle(tier)
            rest = self._best(total, ties, limit - len(tier))
            scores.update((i, float(total[i])) for i in tier + rest)
            return [tier] + [[i] for i in rest]
        order = [int(i) for i in np.argsort(-total, kind="stable") if total[i] > -np.inf]
        scores.update((i, float(total[i])) for i in order)
        tiers: list[list[int]] = []
        tier_score = None
        for i in order:
            if tier_score is None or tier_score - total[i] > self.tie_tolerance:
                tiers.append([])
                tier_score = total[i]
            tiers[-1].append(i)
        for tier in tiers:
            self.rng.shuffle(tier)
        return tiers

    @staticmethod
    def _best(total: np.ndarray, excluded: list[int], n: int) -> list[int]:
        """The `n` best eligible scores outside `excluded`, best first, equal scores in index order
        (what a stable sort of every score gives)."""
        if n <= 0:
            return []
        others = total.copy()
        others[excluded] = -np.inf
        n = min(n, int(np.count_nonzero(others > -np.inf)))
        if n == 0:
            return []
        kth = float(np.partition(others, len(others) - n)[len(others) - n])  # the n-th largest
        above = np.flatnonzero(others > kth).tolist()
        at = np.flatnonzero(others == kth)[: n - len(above)].tolist()
        return sorted(above + at, key=lambda i: (-others[i], i))

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
