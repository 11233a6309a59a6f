"""Events on cells: each with a start, a duration and a severity in (0, 1].

`effects()` turns the events that overlap a window of intervals into dense
(T, C) modifiers for the KPI core, scattering all events of a kind at once
(ufunc.at), weighted by how much of each interval the event covers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from airan.core.causes import EVENT_CAUSES, EVENT_KINDS
from sims.timefmt import parse_duration
from sims.topology import Topology

# the vocabulary (kinds, their order = the int8 codes, typical durations) is airan/core/causes.py's table;
# the physics of each kind is here, in `effects()`:
#   cell_outage: cell off air, UEs move to co-site cells (70 %) or drop
#   interference: external interference, SINR falls, BLER rises, capacity falls
#   congestion: sustained demand surge beyond plan (e.g. an event venue)
#   ho_failure_storm: mis-tuned mobility, many ping-pong attempts, many failures
#   cell_sleep: energy saving, capacity cell off, its UEs move to the coverage cell
#   flash_crowd: short sharp surge, fast rise, plateau, slower decay
KIND_INDEX = {k: i for i, k in enumerate(EVENT_KINDS)}
OUTAGE, INTERFERENCE, CONGESTION, HO_STORM, SLEEP, FLASH = (
    KIND_INDEX[k] for k in ("cell_outage", "interference", "congestion", "ho_failure_storm", "cell_sleep", "flash_crowd")
)
# typical duration range (s) per kind, before fitting into the trace
_DURATION_S = {i: c.duration_s for i, c in enumerate(EVENT_CAUSES)}
OUTAGE_ABSORBED = 0.7  # share of an outage cell's UEs that co-site cells pick up


@dataclass(frozen=True, eq=False)
class EventTable:
    event_ids: np.ndarray  # (E,) str
    kind: np.ndarray  # (E,) int8 index into EVENT_KINDS
    cell: np.ndarray  # (E,) int32 cell index
    start_s: np.ndarray  # (E,) float64
    duration_s: np.ndarray  # (E,) float64
    severity: np.ndarray  # (E,) float32

    def __len__(self) -> int:
        return int(self.kind.shape[0])

    @property
    def end_s(self) -> np.ndarray:
        return self.start_s + self.duration_s

    @staticmethod
    def empty() -> EventTable:
        return EventTable(
            np.array([], dtype=str), np.array([], np.int8), np.array([], np.int32),
            np.array([], np.float64), np.array([], np.float64), np.array([], np.float32),
        )

    @staticmethod
    def build(kind, cell, start_s, duration_s, severity) -> EventTable:
        """Sorted by start (then kind, cell) with ids ev-0001.. in that order."""
        kind = np.asarray(kind, np.int8)
        cell = np.asarray(cell, np.int32)
        start_s = np.asarray(start_s, np.float64)
        duration_s = np.asarray(duration_s, np.float64)
        severity = np.asarray(severity, np.float32)
        if len(kind) and (duration_s.min() <= 0 or severity.min() <= 0 or severity.max() > 1):
            raise ValueError("events need duration > 0 and severity in (0, 1]")
        order = np.lexsort((cell, kind, start_s))
        ids = np.array([f"ev-{i + 1:04d}" for i in range(len(kind))], dtype=str)
        return EventTable(ids, kind[order], cell[order], start_s[order], duration_s[order], severity[order])

    def concat(self, other: EventTable) -> EventTable:
        return EventTable.build(
            np.concatenate([self.kind, other.kind]),
            np.concatenate([self.cell, other.cell]),
            np.concatenate([self.start_s, other.start_s]),
            np.concatenate([self.duration_s, other.duration_s]),
            np.concatenate([self.severity, other.severity]),
        )

    def equals(self, other: EventTable) -> bool:
        return all(np.array_equal(getattr(self, f), getattr(other, f)) for f in self.__dataclass_fields__)


def _capacity_cells(topology: Topology) -> np.ndarray:
    """Cells that can sleep: not the first (coverage) cell of their site."""
    first = np.zeros(topology.n_cells, dtype=bool)
    first[topology.site_start] = True
    return np.flatnonzero(~first)


def cells_for_kind(topology: Topology, kind: int) -> np.ndarray:
    """The cells an event of `kind` can hit: a coverage cell never sleeps; any cell for other kinds."""
    return _capacity_cells(topology) if kind == SLEEP else np.arange(topology.n_cells)


def random_events(
    topology: Topology,
    duration_s: float,
    n_events: int,
    seed: int,
    *,
    kinds: tuple[str, ...] = EVENT_KINDS,
    min_duration_s: float = 1.0,
) -> EventTable:
    """`n_events` events spread over the trace, kinds in turn (so a short trace shows each kind)."""
    if n_events <= 0 or not kinds:
        return EventTable.empty()
    rng = np.random.default_rng([seed, 21])
    k = np.array([KIND_INDEX[kinds[i % len(kinds)]] for i in range(n_events)], dtype=np.int8)
    sleepers = cells_for_kind(topology, SLEEP)
    if sleepers.size == 0:  # single-cell sites only: nothing can sleep, use congestion instead
        k = np.where(k == SLEEP, CONGESTION, k).astype(np.int8)
    # distinct cells while there are enough, so one random event does not hide another
    order = rng.permutation(topology.n_cells)
    sleep_order = rng.permutation(sleepers)
    used = np.zeros(topology.n_cells, dtype=bool)
    cell = np.empty(n_events, dtype=np.int32)
    for i in range(n_events):  # bounded by n_events; each pick scans a permutation once at most
        pool = sleep_order if k[i] == SLEEP else order
        free = pool[~used[pool]]
        cell[i] = free[0] if free.size else pool[i % pool.size]
        used[cell[i]] = True
    lo = np.array([_DURATION_S[int(i)][0] for i in k])
    hi = np.array([_DURATION_S[int(i)][1] for i in k])
    dur = np.exp(rng.uniform(np.log(lo), np.log(hi)))
    # fit into short traces: at most 30 % of the trace, at least min_duration_s
    dur = np.maximum(np.minimum(dur, 0.3 * duration_s), min_duration_s)
    # stratified starts: one random start per n-th of the trace, so events spread out, in random kind order
    slot = rng.permutation(n_events)
    start = (slot + rng.uniform(0.05, 0.95, n_events)) / n_events * np.maximum(duration_s - dur, 0.0)
    severity = rng.uniform(0.4, 1.0, n_events)
    return EventTable.build(k, cell, np.round(start, 3), np.round(dur, 3), severity)


def flash_crowds(topology: Topology, duration_s: float, per_cell_day: float, seed: int) -> EventTable:
    """Flash crowds as a Poisson process over cells and time."""
    rng = np.random.default_rng([seed, 22])
    n = int(rng.poisson(per_cell_day * topology.n_cells * duration_s / 86400.0))
    if n == 0:
        return EventTable.empty()
    lo, hi = _DURATION_S[FLASH]
    dur = np.minimum(np.exp(rng.uniform(np.log(lo), np.log(hi), n)), max(duration_s, 1.0))
    start = rng.uniform(0, 1, n) * np.maximum(duration_s - dur, 0.0)
    return EventTable.build(
        np.full(n, FLASH), rng.integers(0, topology.n_cells, n), np.round(start, 3), np.round(dur, 3),
        rng.uniform(0.3, 1.0, n),
    )


def parse_event_spec(spec: str, topology: Topology) -> tuple[int, int, float, float, float]:
    """'cell_outage:bs-02/c1@2m+5m:0.8' -> (kind, cell, start_s, duration_s, severity)."""
    try:
        kind, rest = spec.split(":", 1)
        where, _, sev = rest.partition(":")
        cell_id, when = where.split("@", 1)
        start, duration = when.split("+", 1)
    except ValueError:
        raise ValueError(f"event {spec!r}: expected KIND:CELL@START+DURATION[:SEVERITY]") from None
    if kind not in KIND_INDEX:
        raise ValueError(f"event {spec!r}: kind must be one of {', '.join(EVENT_KINDS)}")
    hits = np.flatnonzero(topology.cell_ids == cell_id)
    if hits.size != 1:
        raise ValueError(f"event {spec!r}: no cell {cell_id!r} (cells look like {topology.cell_ids[0]})")
    severity = float(sev) if sev else 1.0
    return KIND_INDEX[kind], int(hits[0]), parse_duration(start), parse_duration(duration), severity


def events_from_specs(specs: list[str], topology: Topology) -> EventTable:
    if not specs:
        return EventTable.empty()
    rows = [parse_event_spec(s, topology) for s in specs]
    return EventTable.build(*map(list, zip(*rows)))


@dataclass
class Effects:
    """Dense modifiers for a window; None means 'no effect' so the hot path can skip work."""

    demand_mult: np.ndarray | None = None  # (T, C) x expected UEs
    sinr_delta_db: np.ndarray | None = None  # (T, C) added to SINR
    outage: np.ndarray | None = None  # (T, C) share of the interval the cell was down
    sleep: np.ndarray | None = None  # (T, C) share of the interval the cell slept
    ho_storm: np.ndarray | None = None  # (T, C) storm severity


FLASH_RISE = 0.15  # share of a flash crowd spent ramping up


def _flash_shape(u: np.ndarray) -> np.ndarray:
    """Fast rise (15 % of the event), plateau, slower decay (last 30 %)."""
    return np.clip(np.minimum(np.minimum(u / FLASH_RISE, (1.0 - u) / 0.3), 1.0), 0.0, 1.0)


def visible_at(events: EventTable, interval_s: float) -> np.ndarray:
    """(E,) index of the first interval whose KPI report shows each event clearly.

    Step-like events: the interval holding the event's first half-interval.
    Flash crowds: the interval where the ramp-up ends.
    """
    lead = np.minimum(0.5 * interval_s, 0.5 * events.duration_s)
    lead = np.where(events.kind == FLASH, np.maximum(lead, FLASH_RISE * events.duration_s), lead)
    return np.floor((events.start_s + lead) / interval_s).astype(np.int64)


def effects(events: EventTable, t_s: np.ndarray, interval_s: float, n_cells: int) -> Effects:
    """Modifiers for intervals starting at `t_s` (all of length `interval_s`)."""
    out = Effects()
    if len(events) == 0:
        return out
    t0 = np.asarray(t_s, dtype=np.float64)
    t1 = t0 + interval_s
    live = np.flatnonzero((events.start_s < t1[-1]) & (events.end_s > t0[0]))
    if live.size == 0:
        return out
    T = t0.shape[0]
    ev_start = events.start_s[live]
    ev_end = events.end_s[live]
    # (T, E): share of each interval the event covers
    cover = np.clip(np.minimum(t1[:, None], ev_end) - np.maximum(t0[:, None], ev_start), 0.0, None) / interval_s
    cover = cover.astype(np.float32)
    kind = events.kind[live]
    cell = events.cell[live]
    sev = events.severity[live]

    def scatter(mask: np.ndarray, values: np.ndarray, ufunc: np.ufunc, init: float) -> np.ndarray:
        arr = np.full((T, n_cells), init, dtype=np.float32)
        ufunc.at(arr, (slice(None), cell[mask]), values.astype(np.float32))
        return arr

    def has(k: int) -> np.ndarray | None:
        m = kind == k
        return m if m.any() else None

    demand = None
    if (m := has(CONGESTION)) is not None:
        demand = scatter(m, 1.0 + 5.0 * sev[m] * cover[:, m], np.multiply, 1.0)
    if (m := has(FLASH)) is not None:
        u = ((0.5 * (t0 + t1))[:, None] - ev_start[m]) / (ev_end[m] - ev_start[m])
        gain = 1.0 + 8.0 * sev[m] * _flash_shape(u) * cover[:, m]
        flash = scatter(m, gain, np.multiply, 1.0)
        demand = flash if demand is None else demand * flash
    out.demand_mult = demand
    if (m := has(INTERFERENCE)) is not None:
        out.sinr_delta_db = scatter(m, -(3.0 + 12.0 * sev[m]) * cover[:, m], np.add, 0.0)
    if (m := has(OUTAGE)) is not None:
        out.outage = np.minimum(scatter(m, cover[:, m], np.maximum, 0.0), 1.0)
    if (m := has(SLEEP)) is not None:
        out.sleep = np.minimum(scatter(m, cover[:, m], np.maximum, 0.0), 1.0)
    if (m := has(HO_STORM)) is not None:
        out.ho_storm = scatter(m, sev[m] * cover[:, m], np.maximum, 0.0)
    return out
