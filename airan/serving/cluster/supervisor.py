"""Finds dead and hung replicas and brings them back (airan/core/replica_health.py decides).

Every `reliability.health_interval_s` each live replica gets a health call (its engine's own health
check and its load) bounded by `health_timeout_s`; answers, timeouts and errors all go to the
`HealthTracker`. A replica found dead or hung is marked FAILED at once, so routing skips it, and
after its slot's backoff it is started again: on its own site while that site's node lives, else on
the live site with room for it (`choose_site`). A replacement that is not up within
`start_timeout_s`, or whose site's node dies while it starts, is stopped and tried again. Replicas
that something else marked FAILED (the gateway, when a stream lost its replica; a start that
failed) are brought back the same way. The caller hears whether any replica can answer
(`on_serving`), which the gRPC health service reports as the NetOps service's status.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from airan.config import AiranConfig
from airan.core.replica_health import (
    Condition,
    HealthParams,
    HealthTracker,
    RestartBackoff,
    SiteRoom,
    choose_site,
)
from airan.core.routing import ReplicaState, ReplicaView
from airan.serving import metrics
from airan.serving.engine.protocol import EngineDeadError, ReplicaUnavailableError
from airan.serving.sites import SiteRegistry

log = logging.getLogger(__name__)
# a replica capped below this many CPUs (the radio took its site) answers health calls late by
# design: only its death counts, not its silence
HANG_CHECK_MIN_CPUS = 0.1
# above it, a capped replica's silence limit grows as its CPU share shrinks, at most this many times
MIN_HANG_CHECK_SHARE = 0.1
# how often a replacement that is starting checks that its site's node is still there
_NODE_CHECK_S = 1.0
_LIVE = (ReplicaState.READY, ReplicaState.DRAINING)


class SupervisedPool(Protocol):
    def views(self) -> list[ReplicaView]: ...

    def mark_failed(self, replica_id: str, reason: str) -> None: ...

    async def probe(self, replica_id: str, timeout_s: float) -> None:
        """One health call; raises ReplicaUnavailableError/EngineDeadError when the replica is gone,
        TimeoutError when it does not answer in time, another error when the call failed otherwise."""
        ...

    def claimed_cpus(self, replica_id: str) -> float:
        """CPUs the replica holds at its site (what a replacement needs there)."""
        ...

    async def relaunch(self, replica_id: str, site_id: str, start_timeout_s: float) -> str:
        """Start a replacement for the failed replica on `site_id`; once it is ready the failed one
        is dropped. Returns the new id; raises (the replacement stopped) if it is not ready in time."""
        ...


@dataclass
class _Recovery:
    slot: str
    site_id: str
    condition: Condition
    reason: str
    found_at: float
    last_answer_at: float  # it failed after this
    attempts: int = 0
    waiting: str = ""  # why no site can take it now ("" = not waiting for a site)
    task: asyncio.Task | None = field(default=None, repr=False)


class ReplicaSupervisor:
    def __init__(
        self,
        config: AiranConfig,
        pool: SupervisedPool,
        sites: SiteRegistry,
        live_sites: Callable[[], set[str]],
        on_serving: Callable[[bool], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        r = config.reliability
        self.config = config
        self.pool = pool
        self.sites = sites
        self.live_sites = live_sites  # blocking (asks Ray): called off the event loop
        self.on_serving = on_serving
        self.clock = clock
        self.interval_s = r.health_interval_s
        self.timeout_s = r.health_timeout_s
        self.start_timeout_s = r.start_timeout_s
        params = HealthParams(r.unresponsive_after_s, r.restart_backoff_s, r.restart_backoff_max_s, r.stable_after_s)
        self.tracker = HealthTracker(params, clock)
        self.backoff = RestartBackoff(params, clock)
        self._slot_of: dict[str, str] = {}  # replica id -> the slot it fills (its first id)
        self._probes: dict[str, asyncio.Task] = {}
        self._recovering: dict[str, _Recovery] = {}  # failed replica id -> its recovery
        # done: what was lost and how it was found, where it came back and how long each step took
        self.recoveries: list[dict] = []
        self.serving: bool | None = None
        self._task: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="airan-replica-supervisor")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._probes.values(), *(r.task for r in self._recovering.values())) if t]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.step()
            except Exception:  # one bad step must not end supervision
                log.exception("replica supervisor step failed")
            await asyncio.sleep(self.interval_s)

    # -- one step ----------------------------------------------------------------------
    async def step(self) -> None:
        """Probe what is live, mark what is found dead or hung, bring back what failed, report serving."""
        views = {v.replica_id: v for v in self.pool.views()}
        for rid in self.tracker.watched:  # swapped out or stopped: nothing to watch
            if rid not in views or views[rid].state not in _LIVE:
                self.tracker.forget(rid)
        for rid, v in views.items():
            if v.state not in _LIVE:
                continue
            if rid not in self.tracker.watched:
                self.tracker.watch(rid)
                self._slot_of.setdefault(rid, rid)
            self.tracker.set_hang_check(rid, v.cpu_cap is None or v.cpu_cap >= HANG_CHECK_MIN_CPUS,
                                        1.0 / max(v.cpu_share, MIN_HANG_CHECK_SHARE))  # fmt: skip
            probe = self._probes.get(rid)
            if probe is None or probe.done():
                self._probes[rid] = asyncio.create_task(self._probe(rid), name=f"airan-probe-{rid}")

        for failure in self.tracker.check():
            self.pool.mark_failed(failure.replica_id, f"found {failure.condition.value}: {failure.reason}")
            self._recovery(failure.replica_id, views[failure.replica_id].site_id, failure.condition, failure.reason,
                           failure.last_answer_at)  # fmt: skip
        views = {v.replica_id: v for v in self.pool.views()}
        for rid, v in views.items():  # marked FAILED by someone else (the gateway, a failed start)
            if v.state is ReplicaState.FAILED and rid not in self._recovering:
                self._recovery(rid, v.site_id, Condition.DEAD, "marked failed", self.clock())
        for rid, rec in list(self._recovering.items()):
            if rid not in views:  # gone from the pool some other way
                self._recovering.pop(rid)
            elif rec.task is None and self.backoff.due(rec.slot):
                rec.task = asyncio.create_task(self._relaunch(rid, rec), name=f"airan-relaunch-{rid}")

        serving = any(v.state is ReplicaState.READY for v in views.values())
        if serving != self.serving:
            self.serving = serving
            if not serving:
                log.warning("no replica can answer: NetOps health NOT_SERVING")
            if self.on_serving is not None:
                await self.on_serving(serving)

    async def _probe(self, replica_id: str) -> None:
        try:
            await self.pool.probe(replica_id, self.timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            self.tracker.missed(replica_id, f"health call timed out after {self.timeout_s:.1f}s")
        except (ReplicaUnavailableError, EngineDeadError) as e:
            self.tracker.gone(replica_id, str(e))
        except KeyError:
            pass  # removed from the pool meanwhile
        except Exception as e:
            self.tracker.missed(replica_id, f"health call failed: {type(e).__name__}: {e}")
        else:
            self.tracker.answered(replica_id)

    # -- recovery ----------------------------------------------------------------------
    def _recovery(self, replica_id: str, site_id: str, condition: Condition, reason: str,
                  last_answer_at: float) -> None:  # fmt: skip
        slot = self._slot_of.setdefault(replica_id, replica_id)
        self.tracker.forget(replica_id)
        due = self.backoff.lost(slot)
        self._recovering[replica_id] = _Recovery(slot, site_id, condition, reason, self.clock(), last_answer_at)
        log.warning("replica %s at %s %s (%s): restart in %.1fs", replica_id, site_id, condition.value, reason,
                    max(0.0, due - self.clock()))  # fmt: skip

    def _rooms(self, live: set[str]) -> list[SiteRoom]:
        claimed: dict[str, float] = {}
        for v in self.pool.views():
            if v.state in (ReplicaState.STARTING, *_LIVE):
                claimed[v.site_id] = claimed.get(v.site_id, 0.0) + self.pool.claimed_cpus(v.replica_id)
        rooms = []
        for state in self.sites.states():
            sid = state.config.id
            headroom = state.headroom_cpus if state.headroom_cpus is not None else state.config.cpus * state.ai_headroom
            rooms.append(SiteRoom(sid, sid in live, not (state.drained or self.sites.surged(sid)), headroom,
                                  claimed.get(sid, 0.0)))  # fmt: skip
        return rooms

    async def _relaunch(self, replica_id: str, rec: _Recovery) -> None:
        rec.attempts += 1
        try:
            live = await asyncio.to_thread(self.live_sites)
            choice = choose_site(rec.site_id, self.pool.claimed_cpus(replica_id), self._rooms(live))
            if choice.site_id is None:
                if choice.reason != rec.waiting:
                    log.warning("replica %s cannot be placed yet: %s", replica_id, choice.reason)
                rec.waiting = choice.reason
                return  # tried again at the next step (no backoff: nothing failed)
            rec.waiting = ""
            started_at = self.clock()
            log.info("starting a replacement for %s at %s (%s)", replica_id, choice.site_id, choice.reason)
            new_id = await self._start_watching_node(replica_id, choice.site_id)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.backoff.lost(rec.slot)  # a replacement that fails to start counts as another loss
            log.warning("replacement for %s failed (attempt %d): %s; next in %.1fs", replica_id, rec.attempts, e,
                        self.backoff.wait_s(rec.slot))  # fmt: skip
            return
        finally:
            rec.task = None
        ready_at = self.clock()
        self._recovering.pop(replica_id, None)
        self._slot_of[new_id] = rec.slot
        self.backoff.ready(rec.slot)
        self.tracker.watch(new_id)
        moved = choice.site_id != rec.site_id
        metrics.replica_restarted(choice.site_id, rec.condition.value + ("_moved" if moved else ""))
        record = dict(
            at=time.time(), slot=rec.slot, old=replica_id, new=new_id, old_site=rec.site_id, site=choice.site_id,
            condition=rec.condition.value, reason=rec.reason, attempts=rec.attempts,
            detect_s=round(rec.found_at - rec.last_answer_at, 2), start_s=round(ready_at - started_at, 2),
            recover_s=round(ready_at - rec.found_at, 2),
        )  # fmt: skip
        self.recoveries.append(record)
        log.info("replica %s back as %s at %s, %.1fs after it was found %s", replica_id, new_id, choice.site_id,
                 record["recover_s"], rec.condition.value)  # fmt: skip

    async def _start_watching_node(self, replica_id: str, site_id: str) -> str:
        """`pool.relaunch`, stopped early if the site's node dies while the replacement starts (Ray
        would keep it pending for a node that is not coming back)."""
        start = asyncio.create_task(self.pool.relaunch(replica_id, site_id, self.start_timeout_s))
        try:
            while True:
                done, _ = await asyncio.wait({start}, timeout=_NODE_CHECK_S)
                if done:
                    return start.result()
                if site_id not in await asyncio.to_thread(self.live_sites):
                    raise RuntimeError(f"site {site_id}'s node died while the replacement started")
        finally:
            if not start.done():
                start.cancel()
                await asyncio.gather(start, return_exceptions=True)
