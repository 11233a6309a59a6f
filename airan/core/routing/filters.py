"""Filters drop replicas that cannot take the request; they may empty the set.

Each returns a boolean mask over the table's replicas (the router ANDs them in
order); `explain` says why the set became empty, for the error the caller sees,
and `rejection_kind` which status that error carries.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from airan.core import admission
from airan.core.routing import kernel
from airan.core.routing.table import DecisionState, ReplicaTable
from airan.core.routing.types import RoutingContext


class Filter(Protocol):
    name: str

    def mask(self, ctx: RoutingContext, table: ReplicaTable, eligible: np.ndarray, state: DecisionState) -> np.ndarray:
        """The replicas (among `eligible`) that may take the request."""
        ...

    def explain(self, ctx: RoutingContext, table: ReplicaTable, state: DecisionState) -> str: ...


class ReadyFilter:
    name = "ready"

    def static_key(self, ctx):  # reads only the table: the router folds it into a cached mask
        return ()

    def mask(self, ctx, table, eligible, state):
        return eligible & table.ready

    def explain(self, ctx, table, state):
        return "no replica is ready (starting, failed or stopped)"


class ModelFilter:
    name = "model"

    def static_key(self, ctx):
        return ctx.request.model

    def mask(self, ctx, table, eligible, state):
        return eligible & table.serves(ctx.request.model)

    def explain(self, ctx, table, state):
        return f"no ready replica serves model '{ctx.request.model}' (or holds it as an adapter)"


class SiteActiveFilter:
    """The radio comes first: drained sites and sites in a radio surge take no AI work."""

    name = "site_active"

    def static_key(self, ctx):
        return ctx.min_ai_headroom

    def mask(self, ctx, table, eligible, state):
        return eligible & table.site_accepts(ctx.min_ai_headroom)

    def explain(self, ctx, table, state):
        return (
            "every site with a matching replica is drained or has less AI headroom than "
            f"{ctx.min_ai_headroom:.0%} because of radio load"
        )


class DeadlineFilter:
    """Admission: keep the replicas predicted to answer before the request's deadline.

    A request without a deadline passes. When none fits, the request is refused at once:
    RESOURCE_EXHAUSTED when some candidate could meet it if it were idle (load is the
    problem), DEADLINE_EXCEEDED when none could even then.
    """

    name = "deadline"

    def __init__(self, margin: float = 1.0) -> None:
        self.margin = margin  # predictions are multiplied by this before they are compared

    def mask(self, ctx, table, eligible, state):
        deadline = ctx.request.deadline
        if deadline is None:
            return eligible
        state.budget_s = deadline - ctx.now
        state.before_deadline = eligible
        # the router's general path; its fast path runs the same kernel with this limit (router.py)
        state.predicted_s, fits, _, _ = kernel.columns(ctx, table, eligible, limit=state.budget_s / self.margin)
        return fits

    def explain(self, ctx, table, state):
        allowed_ms = 1000 * state.budget_s
        candidates = np.flatnonzero(state.before_deadline)
        predicted = admission.predict_s(ctx, table)  # afresh: the decision's own is in scratch columns
        idle = admission.idle_predict_s(ctx, table)[candidates]
        fastest_idle = admission.breakdown(ctx, table, int(candidates[np.argmin(idle)]), idle=True)
        if idle.min() * self.margin <= state.budget_s:
            state.rejection_kind = "RESOURCE_EXHAUSTED"
            best = int(candidates[np.argmin(predicted[candidates])])
            return (f"no replica can answer within the {allowed_ms:.0f} ms left: the fastest now is "
                    f"{admission.breakdown(ctx, table, best).describe()}; idle, {fastest_idle.replica_id} would "
                    f"take {fastest_idle.total_ms:.0f} ms: retry later, allow more time, or ask with "
                    "detector_fallback for the detector's diagnosis")  # fmt: skip
        state.rejection_kind = "DEADLINE_EXCEEDED"
        return (f"no replica could answer within the {allowed_ms:.0f} ms left even when idle: the fastest idle "
                f"prediction is {fastest_idle.describe()}; allow at least "
                f"{fastest_idle.total_ms * self.margin:.0f} ms, ask for fewer tokens, or ask with "
                "detector_fallback for the detector's diagnosis")  # fmt: skip


class PreferredSiteFilter:
    """Site preference is soft: a request with a deadline that names a site stays on that site
    (its first) while a replica there can meet the deadline, and goes elsewhere only when none can.
    Never empties the set. Requests without a deadline are left to the scorers."""

    name = "preferred_site"

    def mask(self, ctx, table, eligible, state):
        req = ctx.request
        if req.deadline is None or not req.site_ids:
            return eligible
        # the router's general path; its fast path runs the same kernel with `preferred` (router.py)
        _, fits, _, narrowed = kernel.columns(ctx, table, eligible, preferred=True)
        state.preferred_site_fits = narrowed
        return fits if narrowed else eligible

    def explain(self, ctx, table, state):  # never empties the set
        return ""


FILTERS: dict[str, type] = {
    f.name: f for f in (ReadyFilter, ModelFilter, SiteActiveFilter, DeadlineFilter, PreferredSiteFilter)
}
