"""The radio-first control loop: forecast headroom -> caps, admitted concurrency, variants, surges.

A thin shell over the pure cores (airan/core/headroom.py, airan/core/placement.py). Every
`radio.control_interval_s` it re-forecasts each site (a site whose reports stopped goes stale), and
within `REACT_S` of a report that moves a site's forecast headroom it steps that site at once (the
registry re-forecasts on each report): a cap that waited for the next tick would let the AI run on
the old headroom while the radio's load rose. A step asks the planner whether the site's variant
still fits, and then
- caps each replica's real CPU use to its share of the forecast headroom (the actor's CpuCap) and
  sets its admitted concurrency in the view routing reads (`ReplicaView.max_concurrency`),
- swaps a site's replicas to another variant, make before break (RayReplicaPool.swap),
- surges a site that no variant fits (SITE_SURGED, with the planner's reason) and resumes it.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from airan.config import AiranConfig
from airan.core.headroom import split_headroom
from airan.core.placement import NeedParams, PlanParams, VariantPlanner, family
from airan.core.routing.types import ReplicaState, ReplicaView
from airan.serving.sites import SiteRegistry

log = logging.getLogger(__name__)
# a surged site's replicas keep this much CPU so the answers already running there can finish
DRAIN_CAP_CPUS = 0.02
# how often the headroom each report leaves is looked at (a comparison per site; a step only where it moved)
REACT_S = 0.02


@dataclass
class ControlEvent:
    at: float  # wall clock
    site_id: str
    kind: str  # "drain", "resume", "swap", "swap_failed"
    detail: str
    headroom_cpus: float


@dataclass
class HeadroomController:
    config: AiranConfig
    sites: SiteRegistry
    pool: object  # RayReplicaPool (views, details, set_limits, swap)
    variant_paths: Mapping[str, Path] = field(default_factory=dict)  # servable variants -> their directories
    clock: Callable[[], float] = time.monotonic
    # requests a replica still holds outside the pool (the gateway's queue and dispatches): a swap
    # stops the old replica only when this and its open streams are 0
    busy: Callable[[str], int] | None = None
    events: list[ControlEvent] = field(default_factory=list)

    def __post_init__(self) -> None:
        r = self.config.radio
        need = NeedParams(unlisted_share=r.min_ai_headroom)
        self.planner = VariantPlanner(self.config.catalog, PlanParams(r.swap_hysteresis, r.swap_hold_s, need), self.clock)
        self._swaps: dict[str, asyncio.Task] = {}
        self._task: asyncio.Task | None = None
        self._react_task: asyncio.Task | None = None
        self._applied: dict[str, tuple] = {}  # replica -> the limits last sent to the pool
        self._seen_headroom: dict[str, tuple] = {}  # site -> (headroom, surged) last stepped on
        self.configured = {}
        for spec in self.config.replicas:
            if spec.count:
                self.configured.setdefault(spec.site, spec.model)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="airan-headroom")
        self._react_task = asyncio.create_task(self._react(), name="airan-headroom-react")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, self._react_task, *self._swaps.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            try:
                await self.step()
            except Exception:  # a failed step must not end radio-first control; the next one retries
                log.exception("headroom control step failed")
            await asyncio.sleep(self.config.radio.control_interval_s)

    async def _react(self) -> None:
        """Step a site as soon as a report has moved its forecast headroom (bounded: one comparison
        per site every REACT_S)."""
        while True:
            for site in self.config.sites:
                configured = self.configured.get(site.id)
                if configured is None:
                    continue
                state = self.sites.get(site.id)
                if self._seen_headroom.get(site.id) != (state.headroom_cpus, state.surged):
                    try:
                        await self._step_site(site.id, site.cpus, configured)
                    except Exception:
                        log.exception("headroom reaction at %s failed", site.id)
            await asyncio.sleep(REACT_S)

    # -- one step ----------------------------------------------------------------------------
    async def step(self) -> None:
        self.sites.refresh_forecasts()
        for site in self.config.sites:
            configured = self.configured.get(site.id)
            if configured is None:
                continue
            await self._step_site(site.id, site.cpus, configured)

    async def _step_site(self, site_id: str, cpus: float, configured: str) -> None:
        state = self.sites.get(site_id)
        self._seen_headroom[site_id] = (state.headroom_cpus, state.surged)
        headroom = state.headroom_cpus if state.headroom_cpus is not None else cpus
        ready = [v for v in self.pool.views() if v.site_id == site_id and v.state is ReplicaState.READY]
        swapping = site_id in self._swaps and not self._swaps[site_id].done()
        if ready and not swapping:
            current = None if state.surged else (ready[0].variant or ready[0].model)
            available = self.variant_paths if self.config.radio.swap_variants else {}
            plan = self.planner.plan(site_id, configured, current, headroom, cpus, set(available))
            if plan.action == "drain":
                self.sites.set_surge(site_id, plan.reason)
                self._event(site_id, "drain", plan.reason, headroom)
            elif plan.action == "resume":
                self.sites.set_surge(site_id, "")
                self._event(site_id, "resume", plan.reason, headroom)
            served = ready[0].variant or ready[0].model
            if plan.model is not None and plan.model != served and plan.action in ("swap_down", "swap_up", "resume"):
                self._swaps[site_id] = asyncio.create_task(self._swap_site(site_id, ready, plan.model, plan.reason))
        await self._apply_limits(site_id, cpus, headroom, state.surged)

    async def _apply_limits(self, site_id: str, cpus: float, headroom: float, surged: bool) -> None:
        # a replica starting beside the one it replaces shares the headroom too (make before break)
        live = [v for v in self.pool.views() if v.site_id == site_id
                and v.state in (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.DRAINING)]  # fmt: skip
        if not live:
            return
        full = self._full_cpus(live, cpus)
        if surged:
            limits = {v.replica_id: (0, DRAIN_CAP_CPUS) for v in live}
        else:
            shares = split_headroom(headroom, [v.replica_id for v in live], full, self.config.engine.max_num_seqs)
            limits = {s.replica_id: (s.max_concurrency, max(DRAIN_CAP_CPUS, s.cpus)) for s in shares}
        await asyncio.gather(*(self._set_limits(rid, conc, cap, full) for rid, (conc, cap) in limits.items()))

    async def _set_limits(self, replica_id: str, max_concurrency: int, cap: float, full_cpus: float) -> None:
        """Send a replica's limits, only when they changed (a cap write is an actor call)."""
        share = min(1.0, cap / full_cpus) if full_cpus > 0 else 1.0
        limits = (max_concurrency, round(cap, 4), round(share, 4))
        if self._applied.get(replica_id) == limits:
            return
        self._applied[replica_id] = limits
        await self.pool.set_limits(replica_id, max_concurrency, cap, share)

    def _full_cpus(self, live: list[ReplicaView], site_cpus: float) -> float:
        """CPUs one replica is built to use: its bound cores, at most its even share of the site."""
        bound = {r.view.replica_id: len(r.cpus) for r in self.pool.details() if r.cpus}
        each = site_cpus / len(live)
        return min([each] + [bound[v.replica_id] for v in live if v.replica_id in bound])

    async def _swap_site(self, site_id: str, ready: list[ReplicaView], model: str, reason: str) -> None:
        path = self.variant_paths.get(model) or self.pool.model_paths.get(model)
        if path is None:
            self._event(site_id, "swap_failed", f"{model}: no prepared model directory", math.nan)
            return
        for v in ready:  # one replica at a time: the site never has none ready
            # the new replica starts with its share of the headroom beside the site's others
            headroom = self.sites.get(site_id).headroom_cpus
            live = sum(1 for x in self.pool.views() if x.site_id == site_id and x.state is not ReplicaState.STOPPED)
            start_cap = None if headroom is None else max(DRAIN_CAP_CPUS, headroom / (live + 1))
            try:
                new_id = await self.pool.swap(v.replica_id, model, path, busy=self.busy, initial_cap=start_cap)
                self._event(site_id, "swap", f"{v.replica_id} -> {new_id} ({model}): {reason}",
                            self.sites.get(site_id).headroom_cpus or math.nan)
            except Exception as e:
                log.warning("swap at %s to %s failed: %s", site_id, model, e)
                self._event(site_id, "swap_failed", f"{model}: {e}", math.nan)
                return

    def _event(self, site_id: str, kind: str, detail: str, headroom: float) -> None:
        log.info("radio first at %s: %s (%s)", site_id, kind, detail)
        self.events.append(ControlEvent(time.time(), site_id, kind, detail, headroom))


def servable_variants(config: AiranConfig, materialize: Callable) -> dict[str, Path]:
    """Catalog variants of the configured models that are prepared here (name -> directory)."""
    wanted = {m for r in config.replicas for m in family(config.catalog, r.model)}
    names = {m.name for m in config.models}
    out = {}
    for name in sorted(wanted & names):
        try:
            out[name] = materialize(config.model(name))
        except Exception as e:  # not built here: the planner does not offer it
            log.info("variant %s not servable here: %s", name, e)
    return out
