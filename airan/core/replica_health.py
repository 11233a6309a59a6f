"""Replica health: which replicas are dead or hung, when a lost one is started again, and where.

Pure core over plain data with an injectable clock. The supervisor
(airan/serving/cluster/supervisor.py) probes every replica with a health call that has a timeout
and reports each outcome here; this module decides.

- A replica is DEAD as soon as a probe says it is gone (Ray reports the actor dead, the engine
  reports itself dead): there is nothing to wait for.
- A replica is HUNG when it has answered no probe for `unresponsive_after_s` and at least one probe
  has missed since (timed out or failed without saying the replica is gone): a probe that timed out
  counts; one slow answer does not condemn a replica that answers the next.
- A lost replica is started again after a backoff that doubles with each loss of the same slot
  while its replacements keep failing (a crash loop), and resets once a replacement has stayed
  healthy for `stable_after_s`. The first loss after a stable run restarts at once.
- Where: its own site while that site's node is alive; else the live, accepting site with the
  most free CPUs that fit it; else nowhere yet (the supervisor tries again later).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum


class Condition(str, Enum):
    HEALTHY = "healthy"
    DEAD = "dead"  # the replica (actor, process or engine) is gone
    HUNG = "hung"  # alive by Ray's account, but it answers no probe


@dataclass(frozen=True)
class HealthParams:
    # no probe answered for this long, and at least one missed: hung (the probe timeout is shorter)
    unresponsive_after_s: float = 3.0
    # restart backoff of one slot: first loss after a stable run at once, then initial, x2, ... max
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    # a replacement healthy this long ends the crash loop: the next loss restarts at once
    stable_after_s: float = 60.0

    def __post_init__(self) -> None:
        if self.unresponsive_after_s <= 0 or self.backoff_initial_s < 0 or self.stable_after_s < 0:
            raise ValueError(f"health params must be positive: {self}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(f"backoff_max_s ({self.backoff_max_s}) is below backoff_initial_s ({self.backoff_initial_s})")


@dataclass(frozen=True)
class Failure:
    """A replica found dead or hung, reported once."""

    replica_id: str
    condition: Condition
    reason: str
    detected_at: float
    # the last probe it answered: it failed at some moment after this
    last_answer_at: float

    @property
    def silent_s(self) -> float:
        """How long it had answered nothing when it was found (an upper bound on detection time)."""
        return self.detected_at - self.last_answer_at


@dataclass
class _Watch:
    last_answer_at: float
    missed: int = 0  # consecutive probes that timed out or failed since the last answer
    last_miss: str = ""
    hang_check: bool = True
    patience: float = 1.0  # its silence limit is unresponsive_after_s times this
    gone: str = ""  # set when a probe said the replica is gone
    reported: bool = False


class HealthTracker:
    """Per replica: when it last answered a probe, how many probes it missed since, whether it is gone."""

    def __init__(self, params: HealthParams = HealthParams(), clock: Callable[[], float] = time.monotonic) -> None:
        self.params = params
        self.clock = clock
        self._watches: dict[str, _Watch] = {}

    def watch(self, replica_id: str) -> None:
        """Start watching a replica that is ready (its start counts as an answer)."""
        self._watches[replica_id] = _Watch(self.clock())

    def forget(self, replica_id: str) -> None:
        self._watches.pop(replica_id, None)

    @property
    def watched(self) -> list[str]:
        return list(self._watches)

    def set_hang_check(self, replica_id: str, on: bool, patience: float = 1.0) -> None:
        """Off: only death counts (a replica capped to a sliver of a CPU answers probes late by design).
        `patience` >= 1 stretches its silence limit: a replica capped to a share s of its CPU answers
        everything, probes included, about 1/s times later, and is slow, not hung."""
        w = self._watches.get(replica_id)
        if w is not None:
            if on and not w.hang_check:
                w.last_answer_at, w.missed = self.clock(), 0  # its silence while exempt is not held against it
            w.hang_check = on
            w.patience = max(1.0, patience)

    def answered(self, replica_id: str) -> None:
        w = self._watches.get(replica_id)
        if w is not None and not w.gone:
            w.last_answer_at, w.missed, w.last_miss = self.clock(), 0, ""

    def missed(self, replica_id: str, reason: str) -> None:
        """A probe timed out, or failed without saying the replica is gone."""
        w = self._watches.get(replica_id)
        if w is not None:
            w.missed += 1
            w.last_miss = reason

    def gone(self, replica_id: str, reason: str) -> None:
        """A probe (or a request) says the replica is gone: dead at the next `check`."""
        w = self._watches.get(replica_id)
        if w is not None and not w.gone:
            w.gone = reason

    def consecutive_misses(self, replica_id: str) -> int:
        w = self._watches.get(replica_id)
        return w.missed if w is not None else 0

    def condition(self, replica_id: str) -> Condition:
        w = self._watches.get(replica_id)
        if w is None:
            return Condition.HEALTHY
        if w.gone:
            return Condition.DEAD
        silent = self.clock() - w.last_answer_at
        if w.hang_check and w.missed and silent >= self.params.unresponsive_after_s * w.patience:
            return Condition.HUNG
        return Condition.HEALTHY

    def check(self) -> list[Failure]:
        """Replicas found dead or hung since the last check (each reported once)."""
        now = self.clock()
        found = []
        for rid, w in self._watches.items():
            if w.reported:
                continue
            cond = self.condition(rid)
            if cond is Condition.HEALTHY:
                continue
            w.reported = True
            if cond is Condition.DEAD:
                reason = w.gone
            else:
                reason = (f"answered no health probe for {now - w.last_answer_at:.1f}s "
                          f"({w.missed} missed; last: {w.last_miss})")  # fmt: skip
            found.append(Failure(rid, cond, reason, now, w.last_answer_at))
        return found


class RestartBackoff:
    """When a lost slot (a replica and the replacements that succeed it) may be started again."""

    def __init__(self, params: HealthParams = HealthParams(), clock: Callable[[], float] = time.monotonic) -> None:
        self.params = params
        self.clock = clock
        self._losses: dict[str, int] = {}  # consecutive losses of the slot while unstable
        self._due: dict[str, float] = {}
        self._ready_at: dict[str, float] = {}  # when the slot's current replica became ready

    def lost(self, slot: str) -> float:
        """The slot's replica was lost (found dead/hung, or a replacement failed to start); returns
        when the next start may begin."""
        now = self.clock()
        ready_at = self._ready_at.pop(slot, None)
        if ready_at is not None and now - ready_at >= self.params.stable_after_s:
            self._losses[slot] = 0  # it ran long enough: not a crash loop
        n = self._losses.get(slot, 0)
        self._losses[slot] = n + 1
        delay = 0.0 if n == 0 else min(self.params.backoff_max_s, self.params.backoff_initial_s * 2 ** (n - 1))
        self._due[slot] = now + delay
        return self._due[slot]

    def due(self, slot: str) -> bool:
        return self.clock() >= self._due.get(slot, float("-inf"))

    def wait_s(self, slot: str) -> float:
        return max(0.0, self._due.get(slot, 0.0) - self.clock())

    def ready(self, slot: str) -> None:
        """The slot's replacement is ready; it counts as stable after `stable_after_s`."""
        self._ready_at[slot] = self.clock()
        self._due.pop(slot, None)

    def losses(self, slot: str) -> int:
        return self._losses.get(slot, 0)


@dataclass(frozen=True)
class SiteRoom:
    """What one site offers a replica that must be placed again."""

    site_id: str
    node_alive: bool  # its (Ray) node is up
    accepting: bool  # not drained by an operator, not surged by the radio
    headroom_cpus: float  # CPUs the radio leaves the AI there
    claimed_cpus: float  # CPUs its live replicas hold

    @property
    def free_cpus(self) -> float:
        return self.headroom_cpus - self.claimed_cpus


@dataclass(frozen=True)
class SiteChoice:
    site_id: str | None  # None: no site can take it now
    reason: str


def choose_site(home: str, need_cpus: float, sites: Iterable[SiteRoom]) -> SiteChoice:
    """Where a lost replica starts again: its own site while that site's node is alive (the replica
    belongs there, and the router decides what it is sent); else the live, accepting site with the
    most free CPUs, if it has `need_cpus` free (ties: the site id, so the choice is stable)."""
    rooms = list(sites)
    by_id = {s.site_id: s for s in rooms}
    own = by_id.get(home)
    if own is not None and own.node_alive:
        return SiteChoice(home, f"its site {home} is up")
    refused = [f"{home}: node gone" if own is not None else f"{home}: unknown site"]
    fits = []
    for s in rooms:
        if s.site_id == home:
            continue
        if not s.node_alive:
            refused.append(f"{s.site_id}: node gone")
        elif not s.accepting:
            refused.append(f"{s.site_id}: drained or surged")
        elif s.free_cpus + 1e-9 < need_cpus:
            refused.append(f"{s.site_id}: {max(0.0, s.free_cpus):.2f} free CPUs, needs {need_cpus:.2f}")
        else:
            fits.append(s)
    if not fits:
        return SiteChoice(None, "no site can take it: " + "; ".join(refused))
    best = min(fits, key=lambda s: (-s.free_cpus, s.site_id))
    return SiteChoice(best.site_id, f"{'; '.join(refused)}; {best.site_id} has {best.free_cpus:.2f} free CPUs")
