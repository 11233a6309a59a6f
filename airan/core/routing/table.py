"""The replicas the router ranks, as columns (numpy arrays aligned by replica index).

Filters and scorers read columns, so one decision over thousands of replicas is
a few vector operations. The table is kept current OUT of the decision: the
owner rebuilds it when the replica set or the sites change and writes single
cells when one replica's load or admission figures change (`set_load`,
`set_admission`). Per-model masks, per-controller latency columns and the
folded masks of filters that read only the table (`static_mask`) are computed
once and cached until the replicas' readiness or the sites change.

A decision writes its temporaries into the table's scratch columns instead of
allocating new arrays: what a decision returns is copied out of them, and
anything read later (`RoutingDecision.placement_note`) is computed again.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from airan.core.routing.types import Priority, ReplicaState, ReplicaView, SiteView

N_CLASSES = 3  # Priority.rank values


class ReplicaTable:
    def __init__(self, views: Sequence[ReplicaView], sites: Mapping[str, SiteView]) -> None:
        self.views = list(views)
        self.ids = [v.replica_id for v in self.views]
        self.index = {rid: i for i, rid in enumerate(self.ids)}
        n = len(self.views)
        self.site_ids = sorted({v.site_id for v in self.views} | set(sites))
        self._site_pos = {s: i for i, s in enumerate(self.site_ids)}
        self.site_of = np.array([self._site_pos[v.site_id] for v in self.views], dtype=np.int64)
        # each site's replicas: site_rows[site_start[pos]:site_start[pos + 1]] (the kernel reads these)
        self.site_rows = np.argsort(self.site_of, kind="stable")
        self.site_start = np.searchsorted(self.site_of[self.site_rows], np.arange(len(self.site_ids) + 1))
        self.ready = np.array([v.state is ReplicaState.READY for v in self.views], dtype=bool)
        self.queue_depth = np.array([v.queue_depth for v in self.views], dtype=float)
        self.kv_cache_usage = np.array([v.kv_cache_usage for v in self.views], dtype=float)
        self.kv_free = 1.0 - np.clip(self.kv_cache_usage, 0.0, 1.0)  # kv_cache's score
        # admission columns (airan/core/admission.py); zeros predict only the network time.
        # rates[class, 0] is prefill seconds per prompt token, rates[class, 1] decode seconds per token
        # at the batch the replica would run with one more request of that class (a higher class may
        # preempt BEST_EFFORT): (prompt, tokens) @ rates[class] is the service time
        self.rates = np.zeros((N_CLASSES, 2, n))
        self.prefill_s_per_token = self.rates[0, 0]  # views into `rates` (prefill is the same for every class)
        self.decode_s_per_token = self.rates[:, 1]  # [class, replica]
        self.idle_decode_s_per_token = np.zeros(n)  # alone on the replica
        self.start_at = np.zeros((N_CLASSES, n))  # monotonic time a new request of each class would start
        # per class: (start_at, prefill, decode) views the routing kernel reads, made once
        self.class_columns = {p: (self.start_at[p.rank], self.rates[p.rank, 0], self.rates[p.rank, 1])
                              for p in Priority}  # fmt: skip
        self._serves: dict[str, np.ndarray] = {}
        self._at_sites: dict[frozenset[str], np.ndarray] = {}
        self._load_scores: dict[int, np.ndarray] = {}
        self.zeros = np.zeros(n)
        # what one decision at a time writes into (the router is not reentrant): the routing kernel's
        # (predicted, fits, scores, top indices, top scores)
        self.scratch = (np.empty(n), np.empty(n, dtype=bool), np.empty(n), np.empty(8, dtype=np.int64), np.empty(8))
        self.set_sites(sites)

    def __len__(self) -> int:
        return len(self.views)

    # -- sites -------------------------------------------------------------------
    def set_sites(self, sites: Mapping[str, SiteView]) -> None:
        """Site state changed (drain, radio load): recompute the per-replica site columns."""
        self.sites = dict(sites)
        known = [self.sites.get(s) for s in self.site_ids]
        drained = np.array([s is None or s.drained for s in known], dtype=bool)
        headroom = np.array([0.0 if s is None else s.ai_headroom for s in known], dtype=float)
        self.site_drained = drained[self.site_of]
        self.site_headroom = headroom[self.site_of]
        self._accepts: dict[float, np.ndarray] = {}
        self._latency: dict[str, np.ndarray] = {}
        self._round_trip: dict[str, np.ndarray] = {}
        self._locality: dict[tuple[str, float], np.ndarray] = {}
        self._static: dict[tuple, np.ndarray] = {}  # folded static filters

    def static_mask(self, key: tuple, build, ctx) -> np.ndarray:
        """The mask of filters that read only the table's readiness, models and sites:
        `build(ctx, table)` once per key, then cached until those change (a copy: the routing kernel
        takes writable arrays, so one compiled version serves every mask; nothing writes it)."""
        mask = self._static.get(key)
        if mask is None:
            mask = self._static[key] = np.array(build(ctx, self), dtype=bool)
        return mask

    def site_index(self, site_id: str) -> int:
        return self._site_pos.get(site_id, -1)

    def at_sites(self, site_ids: frozenset[str]) -> np.ndarray:
        """The replicas at these sites (a caller's scope); cached for the table's life, since a
        replica's site never changes."""
        mask = self._at_sites.get(site_ids)
        if mask is None:
            positions = [self._site_pos[s] for s in site_ids if s in self._site_pos]
            mask = np.isin(self.site_of, positions)
            mask.flags.writeable = False
            self._at_sites[site_ids] = mask
        return mask

    def site_accepts(self, min_ai_headroom: float) -> np.ndarray:
        mask = self._accepts.get(min_ai_headroom)
        if mask is None:
            mask = self._accepts[min_ai_headroom] = ~self.site_drained & (self.site_headroom >= min_ai_headroom)
        return mask

    def latency_s(self, controller_id: str) -> np.ndarray:
        """One-way controller-to-site seconds per replica; a controller a site does not list gets
        that site's largest listed latency (0 where it lists none)."""
        col = self._latency.get(controller_id)
        if col is None:
            per_site = np.zeros(len(self.site_ids))
            for i, s in enumerate(self.site_ids):
                lat = self.sites[s].latency_ms if s in self.sites else {}
                ms = lat.get(controller_id, max(lat.values(), default=0.0))
                per_site[i] = ms / 1000.0
            col = self._latency[controller_id] = per_site[self.site_of]
        return col

    def round_trip_s(self, controller_id: str) -> np.ndarray:
        """Controller-to-site and back, per replica (cached)."""
        col = self._round_trip.get(controller_id)
        if col is None:
            col = self._round_trip[controller_id] = 2.0 * self.latency_s(controller_id)
        return col

    def load_score(self, saturation: int) -> np.ndarray:
        """1 for an idle replica, falling linearly to 0 at `saturation` queued requests; kept
        current by `set_load`, so scoring reads it without computing."""
        col = self._load_scores.get(saturation)
        if col is None:
            col = self._load_scores[saturation] = 1.0 - np.minimum(self.queue_depth, saturation) / saturation
        return col

    def locality_base(self, controller_id: str, scale_ms: float) -> np.ndarray:
        """Locality score of a site the request does not name: 0.5 at 0 ms decaying with the
        controller's latency to it, 0.1 where the site lists no latency for this controller."""
        key = (controller_id, scale_ms)
        col = self._locality.get(key)
        if col is None:
            per_site = np.full(len(self.site_ids), 0.1)
            for i, s in enumerate(self.site_ids):
                ms = self.sites[s].latency_ms.get(controller_id) if s in self.sites else None
                if ms is not None:
                    per_site[i] = 0.5 * np.exp(-ms / scale_ms)
            col = self._locality[key] = per_site[self.site_of]
        return col

    # -- replicas ------------------------------------------------------------------
    def serves(self, model: str) -> np.ndarray:
        mask = self._serves.get(model)
        if mask is None:
            mask = self._serves[model] = np.array([v.serves(model) for v in self.views], dtype=bool)
        return mask

    def set_load(self, replica_id: str, queue_depth: float) -> None:
        i = self.index.get(replica_id)
        if i is not None:
            self.queue_depth[i] = queue_depth
            for saturation, col in self._load_scores.items():
                col[i] = 1.0 - min(queue_depth, saturation) / saturation

    def set_ready(self, replica_id: str, ready: bool) -> None:
        i = self.index.get(replica_id)
        if i is not None and self.ready[i] != ready:
            self.ready[i] = ready
            self._static = {}

    def set_admission(
        self,
        replica_id: str,
        prefill_s_per_token: float,
        decode_s_per_token: float | Sequence[float],
        idle_decode_s_per_token: float,
        start_at: Sequence[float],
    ) -> None:
        """One replica's admission figures; `decode_s_per_token` and `start_at` per class (one
        decode figure: the same for every class)."""
        i = self.index.get(replica_id)
        if i is not None:
            self.rates[:, 0, i] = prefill_s_per_token
            self.rates[:, 1, i] = decode_s_per_token
            self.idle_decode_s_per_token[i] = idle_decode_s_per_token
            self.start_at[:, i] = start_at


class DecisionState:
    """What one routing decision has worked out so far; filters and scorers share it."""

    __slots__ = ("predicted_s", "before_deadline", "budget_s", "rejection_kind", "preferred_site_fits")

    def __init__(self) -> None:
        # seconds per replica (the deadline filter fills it; inf where a replica was already excluded)
        self.predicted_s: np.ndarray | None = None
        self.before_deadline: np.ndarray | None = None  # the candidates the deadline filter judged
        self.budget_s: float | None = None  # seconds left until the deadline at the decision
        self.rejection_kind: str = "UNAVAILABLE"  # an airan.errors.ErrorKind name
        self.preferred_site_fits: bool | None = None  # None: no deadline or no named site
