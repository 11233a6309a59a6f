"""Deadline-feasible admission: predict each replica's completion time, admit only where it fits.

Pure core over plain data (no Ray, vLLM or gRPC); time comes in as arguments.

Predicted completion on a replica = controller<->site network time (there and back)
+ wait until a slot frees for this request's class (`ReplicaQueue.start_times`)
+ prefill time of its prompt tokens + decode time of its expected tokens, at
the replica's measured speed (`RateModel`, smoothed from the engine's own
per-request stats). The router's `deadline` filter applies it to every candidate
at once (airan/core/routing/kernel.py, which `predict_s` runs too); the columns it
reads are written when a request is queued, starts or finishes, never while one
is being routed.

A replica runs `slots` requests at once (the engine's batch); the rest wait in
its `ReplicaQueue`: NEAR_RT before NON_RT before BEST_EFFORT, earliest deadline
first within a class, bounded per class and in all, BEST_EFFORT shed first when
a higher class needs the room. A request never starts beside a running one of a
higher class: on a CPU engine its prefill would stall that request's decoding
(a 270-token prefill takes ~400 ms on one core), breaking the deadline it was
admitted on; it starts when they have finished.

With `preempt_best_effort`, a running BEST_EFFORT request holds its slot only
against its own class: a higher-class request that can start preempts as many
of them (latest started first: the least work lost) as it needs for a slot and
for its deadline at the smaller batch, and the gateway ends those with
RESOURCE_EXHAUSTED. So under overload the batch is not full of BEST_EFFORT
decodes that leave a NEAR_RT request no room to meet its deadline; BEST_EFFORT,
which can wait, is what is shed.
"""
from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from airan.core.routing import kernel
from airan.core.routing.table import N_CLASSES, ReplicaTable
from airan.core.routing.types import Priority, RoutingContext

_NO_DEADLINE = math.inf


# -- the latency model ---------------------------------------------------------------
def predict_s(ctx: RoutingContext, table: ReplicaTable) -> np.ndarray:
    """Predicted seconds from now until each replica would have answered this request (a new array):
    max(start - now, 0) + round trip + prompt * prefill + tokens * decode, as the routing kernel
    computes it for the deadline filter (airan/core/routing/kernel.py)."""
    return kernel.columns(ctx, table, np.ones(len(table), dtype=bool))[0]


def idle_predict_s(ctx: RoutingContext, table: ReplicaTable) -> np.ndarray:
    """The same prediction for replicas with nothing else to do (no queue, batch of one)."""
    req = ctx.request
    return (
        table.round_trip_s(req.controller_id)
        + req.prompt_tokens * table.prefill_s_per_token
        + req.expected_tokens * table.idle_decode_s_per_token
    )


@dataclass(frozen=True)
class Breakdown:
    """One replica's prediction in parts, for messages a person reads (milliseconds)."""

    replica_id: str
    site_id: str
    total_ms: float
    queue_ms: float
    network_ms: float
    prefill_ms: float
    decode_ms: float
    tokens: int

    def describe(self) -> str:
        return (f"{self.replica_id} at {self.site_id}: {self.total_ms:.0f} ms predicted "
                f"({self.queue_ms:.0f} queue + {self.network_ms:.0f} network + {self.prefill_ms:.0f} prefill "
                f"+ {self.decode_ms:.0f} decode of {self.tokens} tokens)")  # fmt: skip


def breakdown(ctx: RoutingContext, table: ReplicaTable, i: int, idle: bool = False) -> Breakdown:
    req = ctx.request
    queue = 0.0 if idle else max(0.0, float(table.start_at[req.priority.rank, i]) - ctx.now)
    network = 2.0 * float(table.latency_s(req.controller_id)[i])
    prefill = req.prompt_tokens * float(table.prefill_s_per_token[i])
    per_token = table.idle_decode_s_per_token if idle else table.decode_s_per_token[req.priority.rank]
    decode = req.expected_tokens * float(per_token[i])
    v = table.views[i]
    parts = (queue, network, prefill, decode)
    return Breakdown(v.replica_id, v.site_id, 1000 * sum(parts), *(1000 * p for p in parts), req.expected_tokens)


# -- measured speed ----------------------------------------------------------------------
class RateModel:
    """One replica's speed, smoothed (EWMA) from finished requests' engine stats.

    Prefill: seconds per prompt token. Decode: seconds per token of one stream,
    which grows with the batch the engine runs: step(b) = alone * (1 + slowdown * (b - 1)).
    `alone` is learnt from each observation (its batch divided out); `slowdown` is configured.
    The priors hold until the first observation, which replaces them.

    Rates are kept at the replica's full speed. Radio first caps a replica's CPU to a share of what
    it is built for, and a CPU-bound engine then runs that much slower: each observation is scaled
    up by the share in force while it ran, each prediction down by the share in force now. Without
    that, a replica measured while its site's headroom was small kept predicting that slowness when
    the headroom came back, was refused everything, and so was never measured again.
    """

    def __init__(self, smoothing: float, prefill_tok_s: float, decode_tok_s: float, batch_slowdown: float) -> None:
        self.smoothing = smoothing
        self.batch_slowdown = batch_slowdown
        self.prefill_s_per_token = 1.0 / prefill_tok_s
        self.decode_alone_s_per_token = 1.0 / decode_tok_s
        self.prefill_samples = 0
        self.decode_samples = 0

    def _smooth(self, old: float, new: float, samples: int) -> float:
        return new if samples == 0 else old + self.smoothing * (new - old)

    def observe(self, prompt_tokens: int, prefill_s: float, completion_tokens: int, decode_s: float,
                batch: float = 1.0, share: float = 1.0) -> None:  # fmt: skip
        """One finished request: its prefill seconds, decode seconds (first to last token), the
        mean batch it decoded in and the share of its full CPU the replica had meanwhile."""
        share = _share(share)
        if prompt_tokens > 0 and prefill_s > 0:
            self.prefill_s_per_token = self._smooth(self.prefill_s_per_token, share * prefill_s / prompt_tokens,
                                                    self.prefill_samples)  # fmt: skip
            self.prefill_samples += 1
        if completion_tokens > 1 and decode_s > 0:
            alone = share * decode_s / (completion_tokens - 1) / self._slowdown(batch)
            self.decode_alone_s_per_token = self._smooth(self.decode_alone_s_per_token, alone, self.decode_samples)
            self.decode_samples += 1

    def _slowdown(self, batch: float) -> float:
        return 1.0 + self.batch_slowdown * max(0.0, batch - 1.0)

    def prefill_s(self, share: float = 1.0) -> float:
        """Seconds per prompt token at `share` of the replica's full CPU."""
        return self.prefill_s_per_token / _share(share)

    def decode_s_per_token(self, batch: float, share: float = 1.0) -> float:
        return self.decode_alone_s_per_token * self._slowdown(batch) / _share(share)

    def service_s(self, prompt_tokens: int, tokens: int, batch: float, share: float = 1.0) -> float:
        return prompt_tokens * self.prefill_s(share) + tokens * self.decode_s_per_token(batch, share)


MIN_SHARE = 0.01  # a replica capped to nothing is predicted at a hundredth of its speed, not infinitely slow


def _share(share: float) -> float:
    return min(1.0, max(MIN_SHARE, share))


# -- per-replica queues ------------------------------------------------------------------
_seq = itertools.count()


@dataclass(eq=False)
class Ticket:
    """One request's place at one replica: waiting for a slot, then running."""

    request_id: str
    priority: Priority
    deadline: float | None  # monotonic seconds
    service_s: float  # predicted engine time once started
    network_s: float = 0.0  # controller<->site, there and back
    prompt_tokens: int = 0  # what the prediction is made of, so it can be redone as rates change
    tokens: int = 0
    seq: int = field(default_factory=lambda: next(_seq))
    started_at: float | None = None
    preempted: bool = False  # stopped while running to make room for a higher class

    @property
    def key(self) -> tuple[int, float, int]:
        """Service order: class, then earliest deadline, then arrival."""
        return (self.priority.rank, _NO_DEADLINE if self.deadline is None else self.deadline, self.seq)

    @property
    def latest_start(self) -> float | None:
        """The last moment it can start and still answer in time (None: no deadline)."""
        return None if self.deadline is None else self.deadline - self.service_s - self.network_s


@dataclass(frozen=True)
class Offer:
    started: bool  # runs now
    queued: bool  # waits for a slot
    shed: tuple[Ticket, ...] = ()  # lower-class waiting tickets dropped to make room
    refusal: str = ""  # why it was neither started nor queued
    preempted: tuple[Ticket, ...] = ()  # running BEST_EFFORT tickets stopped to make room

    @property
    def accepted(self) -> bool:
        return self.started or self.queued


_PREEMPTIBLE_RANK = Priority.BEST_EFFORT.rank


class ReplicaQueue:
    """The requests at one replica: up to `slots` running, the rest waiting in service order."""

    def __init__(self, replica_id: str, slots: int, bounds: Mapping[Priority, int], max_waiting: int,
                 preempt_best_effort: bool = False) -> None:  # fmt: skip
        self.replica_id = replica_id
        self.slots = slots
        self.bounds = dict(bounds)
        self.max_waiting = max_waiting
        self.preempt_best_effort = preempt_best_effort
        self.running: list[Ticket] = []
        self.waiting: list[Ticket] = []  # sorted by key
        self._keys: list[tuple[int, float, int]] = []
        self.waiting_per_class = [0] * N_CLASSES

    def __len__(self) -> int:
        return len(self.running) + len(self.waiting)

    def _preempts(self, rank: int) -> bool:
        return self.preempt_best_effort and rank < _PREEMPTIBLE_RANK

    def _holding(self, rank: int) -> list[Ticket]:
        """The running tickets that keep a request of class `rank` from a slot."""
        if not self._preempts(rank):
            return self.running
        return [t for t in self.running if t.priority.rank != _PREEMPTIBLE_RANK]

    def holding_counts(self) -> list[int]:
        """For each class: how many running requests a new one of it would run beside."""
        return [len(self._holding(rank)) for rank in range(N_CLASSES)]

    def _may_start(self, ticket: Ticket, preempting: bool = False) -> bool:
        rank = ticket.priority.rank
        holding = self._holding(rank) if preempting else self.running
        return len(holding) < self.slots and all(t.priority.rank >= rank for t in self.running)

    def _victims(self, ticket: Ticket, fits: Callable[[int], bool] | None) -> list[Ticket]:
        """The fewest running BEST_EFFORT tickets, latest started first, whose leaving frees a slot
        for `ticket` and lets it meet its deadline in the smaller batch (`fits(batch)`); if no
        number of them would, only those the slot needs."""
        if not self._preempts(ticket.priority.rank):
            return []
        candidates = sorted((t for t in self.running if t.priority.rank == _PREEMPTIBLE_RANK),
                            key=lambda t: (t.started_at or 0.0, t.seq), reverse=True)  # fmt: skip
        for_slot = max(0, len(self.running) + 1 - self.slots)
        for k in range(for_slot, len(candidates) + 1):
            if fits is None or fits(len(self.running) - k + 1):
                return candidates[:k]
        return candidates[:for_slot]

    def offer(self, ticket: Ticket, now: float, fits: Callable[[int], bool] | None = None) -> Offer:
        """Start, queue or refuse `ticket`. `fits(batch)`: whether it would meet its deadline running
        in a batch of that size (where it may preempt BEST_EFFORT; None: any batch will do)."""
        if (not self.waiting or ticket.key < self._keys[0]) and self._may_start(ticket, preempting=True):
            victims = self._victims(ticket, fits)  # nothing ahead of it
            for victim in victims:
                self.running.remove(victim)
                victim.preempted = True
            self._start(ticket, now)
            return Offer(started=True, queued=False, preempted=tuple(victims))
        rank = ticket.priority.rank
        bound = self.bounds[ticket.priority]
        if self.waiting_per_class[rank] >= bound:
            return Offer(False, False, refusal=f"{self.waiting_per_class[rank]} {ticket.priority.name} requests "
                                               f"already wait at {self.replica_id} (the bound)")  # fmt: skip
        shed: list[Ticket] = []
        if len(self.waiting) >= self.max_waiting:
            lowest = self.waiting[-1]  # last in service order: the lowest class, latest deadline
            if lowest.priority.rank <= rank:
                return Offer(False, False, refusal=f"{len(self.waiting)} requests already wait at "
                                                   f"{self.replica_id} (the bound), none of a lower class")  # fmt: skip
            self.withdraw(lowest)
            shed.append(lowest)
        self._insert(ticket)
        return Offer(started=False, queued=True, shed=tuple(shed))

    def finish(self, ticket: Ticket, now: float) -> list[Ticket]:
        """A running ticket ended: start as many waiting ones as slots allow, in service order."""
        if ticket in self.running:
            self.running.remove(ticket)
        started = []
        while self.waiting and self._may_start(self.waiting[0]):
            nxt = self.waiting[0]
            self.withdraw(nxt)
            self._start(nxt, now)
            started.append(nxt)
        return started

    def withdraw(self, ticket: Ticket) -> bool:
        """Remove a waiting ticket (its deadline can no longer be met, it was shed or cancelled)."""
        i = bisect.bisect_left(self._keys, ticket.key)
        if i < len(self.waiting) and self.waiting[i] is ticket:
            del self.waiting[i], self._keys[i]
            self.waiting_per_class[ticket.priority.rank] -= 1
            return True
        return False

    def _insert(self, ticket: Ticket) -> None:
        i = bisect.bisect_right(self._keys, ticket.key)
        self.waiting.insert(i, ticket)
        self._keys.insert(i, ticket.key)
        self.waiting_per_class[ticket.priority.rank] += 1

    def _start(self, ticket: Ticket, now: float) -> None:
        ticket.started_at = now
        self.running.append(ticket)

    def reprice(self, rates: RateModel, share: float = 1.0) -> None:
        """Predict every ticket's engine time again at the replica's current measured speed and CPU
        share (a running ticket as if all of it ran at the new speed; `start_times` still keeps it
        at least a token from its end)."""
        batch = max(1, min(len(self.running), self.slots))
        for t in (*self.running, *self.waiting):
            t.service_s = rates.service_s(t.prompt_tokens, t.tokens, batch, share)

    def ahead_of(self, ticket: Ticket) -> int:
        return bisect.bisect_left(self._keys, ticket.key)

    def start_times(self, now: float, min_remaining_s: float = 0.0) -> list[float]:
        """For each class: when a new request of that class would start here (monotonic seconds).

        List scheduling over the slots: running requests free theirs at their predicted end (at
        least `min_remaining_s` from now, since one past its prediction is still running), then the
        waiting ones ahead of the class take the earliest free slot in service order. Waiting
        requests of the same class count as ahead (a new one's deadline is usually the latest).
        A class also waits for every running and waiting request of a higher class to finish.
        Running BEST_EFFORT requests a class may preempt hold no slot against it.
        """
        out = self._schedule(self.running, now, min_remaining_s)
        holding = self._holding(0)  # what a higher class cannot preempt
        if len(holding) < len(self.running):
            higher = self._schedule(holding, now, min_remaining_s)
            out = [higher[r] if self._preempts(r) else out[r] for r in range(N_CLASSES)]
        return out

    def _schedule(self, running: list[Ticket], now: float, min_remaining_s: float) -> list[float]:
        ends = [max(t.started_at + t.service_s, now + min_remaining_s) for t in running]
        free = ends + [now] * max(0, self.slots - len(ends))
        heapq.heapify(free)
        # when the last running request of a higher class than each class ends
        higher_done = [max((e for e, t in zip(ends, running) if t.priority.rank < rank), default=now)
                       for rank in range(N_CLASSES)]  # fmt: skip
        out = []
        waiting = iter(self.waiting)
        pending = next(waiting, None)
        for rank in range(N_CLASSES):
            while pending is not None and pending.priority.rank <= rank:
                start = max(heapq.heappop(free), now, higher_done[pending.priority.rank])
                heapq.heappush(free, start + pending.service_s)
                for lower in range(pending.priority.rank + 1, N_CLASSES):
                    higher_done[lower] = max(higher_done[lower], start + pending.service_s)
                pending = next(waiting, None)
            out.append(max(free[0], now, higher_done[rank]))
        return out


def engine_priority(priority: Priority, deadline: float | None) -> int:
    """vLLM's priority (smaller runs first, ties by arrival): the class, then the deadline in ms,
    so the engine's own waiting queue is ordered like the gateway's (earliest deadline first)."""
    deadline_ms = 10**12 - 1 if deadline is None else min(10**12 - 1, max(0, int(deadline * 1000)))
    return priority.rank * 10**12 + deadline_ms
