"""Scorers rate each replica in [0, 1]; the router sums them by weight.

Scores are numpy arrays aligned with the table's replicas (only the eligible
ones' values are read). The gateway's router runs them, as `router.scorers` in
the config names them; the simulator does not: `airan sim replay` sends its
traffic to a running control plane, whose router scores the replicas.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from airan.core import admission
from airan.core.routing.table import DecisionState, ReplicaTable
from airan.core.routing.types import RoutingContext


class Scorer(Protocol):
    name: str

    def score(self, ctx: RoutingContext, table: ReplicaTable, eligible: np.ndarray, state: DecisionState) -> np.ndarray: ...


class LeastLoadedScorer:
    """1 for an idle replica, falling linearly to 0 at `saturation` queued requests."""

    name = "least_loaded"

    def __init__(self, saturation: int = 16) -> None:
        self.saturation = saturation

    def score(self, ctx, table, eligible, state):
        return table.load_score(self.saturation)

    def score_rows(self, ctx, table, rows, state):
        """The scores of `rows` only, as floats (the router's path for a handful of replicas)."""
        return table.load_score(self.saturation)[rows].tolist()


class KvCacheScorer:
    """Prefer replicas with free KV cache (less preemption risk)."""

    name = "kv_cache"

    def score(self, ctx, table, eligible, state):
        return 1.0 - np.clip(table.kv_cache_usage, 0.0, 1.0)


class SiteLocalityScorer:
    """Prefer the site the question is about, then sites close to the controller.

    The first requested site scores 1, other requested sites 0.8; any other site
    decays with the controller's latency to it (0.5 at 0 ms), 0.1 if unknown.
    """

    name = "site_locality"

    def __init__(self, latency_scale_ms: float = 10.0) -> None:
        self.latency_scale_ms = latency_scale_ms

    def score(self, ctx, table, eligible, state):
        request = ctx.request
        out = table.locality_base(request.controller_id, self.latency_scale_ms)
        if not request.site_ids:
            return out
        out = out.copy()
        for site_id in request.site_ids[:0:-1]:  # later names first, so the first one wins a repeat
            out[table.rows_of_site(site_id)] = 0.8
        out[table.rows_of_site(request.site_ids[0])] = 1.0
        return out

    def score_rows(self, ctx, table, rows, state):
        request = ctx.request
        out = table.locality_base(request.controller_id, self.latency_scale_ms)[rows].tolist()
        if request.site_ids:
            named = {table.site_index(s): 0.8 for s in request.site_ids[1:]}
            named[table.site_index(request.site_ids[0])] = 1.0
            for k, pos in enumerate(table.site_of[rows].tolist()):
                out[k] = named.get(pos, out[k])
        return out


class PredictedLatencyScorer:
    """Prefer the replica predicted to answer first (airan/core/admission.py's model):
    the fastest eligible one scores 1, one predicted to take twice as long 0.5. A tenth of a
    second is added to every prediction, so a few milliseconds of network between otherwise
    equal replicas do not outweigh the site the request names."""

    name = "predicted_latency"
    FLOOR_S = 0.1

    def score(self, ctx, table, eligible, state):
        predicted, best = state.predicted_s, state.best_predicted_s
        if predicted is None:  # no deadline filter ran (a request without a deadline, or not configured)
            predicted = admission.predict_into(ctx, table, table.scratch_predicted, eligible)
            best = float(predicted.min())
        elif best is None:
            best = float(np.where(eligible, predicted, np.inf).min())
        out = np.add(predicted, self.FLOOR_S, out=table.scratch_score)
        return np.divide(best + self.FLOOR_S, out, out=out)  # 0 where a replica was ruled out (inf)

    def score_rows(self, ctx, table, rows, state):
        if state.predicted_s is None or state.best_predicted_s is None:
            return self.score(ctx, table, table.mask_of(rows), state)[rows].tolist()
        top = state.best_predicted_s + self.FLOOR_S
        return [top / (p + self.FLOOR_S) for p in state.predicted_s[rows].tolist()]


SCORERS: dict[str, type] = {
    s.name: s for s in (LeastLoadedScorer, KvCacheScorer, SiteLocalityScorer, PredictedLatencyScorer)
}
