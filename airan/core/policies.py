"""Named router policies (`router.policy`): the same router seam, three ways to use a site's compute.

- `least_loaded` (the default): `router.filters` and `router.scorers` as configured; the radio is a
  threshold on its last report (`site_active`), nothing caps the AI's real CPU use.
- `round_robin`: the configured filters, then the eligible replicas in turn.
- `radio_first`: the forecast headroom first (`headroom` filter: a surged site, or a replica holding
  as many requests as its share of the headroom admits, takes no more), then the configured filters
  and scorers (deadline-feasible admission where `router.filters` names `deadline`); the control
  loop (airan/serving/cluster/headroom.py) caps each replica's CPU to that share and swaps variants.
"""
from __future__ import annotations

import weakref

import numpy as np

from airan.config import RouterConfig
from airan.core.routing.router import Router
from airan.core.routing.table import DecisionState, ReplicaTable
from airan.core.routing.types import Priority, RoutingContext


class HeadroomFilter:
    """Radio first: replicas on surged sites and replicas at their admitted concurrency drop out.

    A share of each replica's admitted concurrency (`near_rt_reserve`, at least one slot where it
    admits two or more) is kept for NEAR_RT requests: the rest fill up first, so a near-RT question
    still finds a slot on a replica busy with summaries and operator questions. A replica whose
    headroom admits a single request takes a NEAR_RT one beside it (its cap still bounds the CPU,
    and the deadline filter judges whether the shared batch can answer in time): otherwise one
    long BEST_EFFORT answer would shut near-RT questions out of it for seconds.
    """

    name = "headroom"
    mask_only = True  # it narrows the set and leaves nothing for later stages: it may run before the kernel

    def __init__(self, near_rt_reserve: float = 0.25) -> None:
        self.near_rt_reserve = near_rt_reserve
        # per table: (its sites mapping, open column, NEAR_RT limit, other classes' limit); the owner
        # rebuilds the table when views change and replaces its sites when a site changes
        self._columns: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _cols(self, table: ReplicaTable, sites) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cached = self._columns.get(table)
        if cached is not None and cached[0] is sites:
            return cached[1:]
        open_ = np.array([v.site_id in sites and not sites[v.site_id].surge_reason for v in table.views], dtype=bool)
        limit = np.array([np.inf if v.max_concurrency is None else v.max_concurrency for v in table.views])
        finite = np.where(np.isfinite(limit), limit, 0.0)
        reserve = np.where(finite >= 2, np.maximum(1.0, np.floor(finite * self.near_rt_reserve)), 0.0)
        others = limit - reserve  # inf stays inf
        near_rt = np.where(finite == 1, 2.0, limit)
        self._columns[table] = (sites, open_, near_rt, others)
        return open_, near_rt, others

    def mask(self, ctx: RoutingContext, table: ReplicaTable, eligible: np.ndarray, state: DecisionState) -> np.ndarray:
        open_, near_rt_limit, others_limit = self._cols(table, ctx.sites)
        limit = near_rt_limit if ctx.request.priority is Priority.NEAR_RT else others_limit
        return eligible & open_ & (table.queue_depth < limit)

    def explain(self, ctx: RoutingContext, table: ReplicaTable, state: DecisionState) -> str:
        reasons = sorted({f"{s}: {v.surge_reason}" for s, v in ctx.sites.items() if v.surge_reason})
        full = [f"{v.replica_id} ({v.queue_depth}/{v.max_concurrency})" for v in table.views
                if not ctx.sites.get(v.site_id, None) or not ctx.sites[v.site_id].surge_reason]  # fmt: skip
        parts = []
        if reasons:
            parts.append("surged sites: " + "; ".join(reasons))
        if full:
            parts.append("every other replica holds as many requests as its site's forecast AI headroom admits "
                         "(in flight/admitted): " + ", ".join(full))  # fmt: skip
        state.rejection_kind = "RESOURCE_EXHAUSTED" if full else "UNAVAILABLE"
        return "radio first: " + "; ".join(parts) + "; retry later"


class RoundRobinScorer:
    """The eligible replicas in turn: the next one after the last pick scores highest."""

    name = "round_robin"

    def __init__(self) -> None:
        self._turn = 0

    def score(self, ctx: RoutingContext, table: ReplicaTable, eligible: np.ndarray, state: DecisionState) -> np.ndarray:
        n = len(table)
        pos = (np.arange(n) - self._turn) % n
        self._turn = (self._turn + 1) % max(1, n)
        return 1.0 - pos / max(1, n)


def build_router(config: RouterConfig) -> Router:
    base = Router.from_config(config)
    if config.policy == "round_robin":
        return Router(base.filters, [(RoundRobinScorer(), 1.0)], base.rng)
    if config.policy == "radio_first":
        return Router([HeadroomFilter(), *base.filters], base.scorers, base.rng)
    return base
