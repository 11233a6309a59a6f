"""Traffic model: expected connected UEs per cell and interval, before events.

expected UEs = busy-hour UEs of the cell
             x diurnal profile of its area type (hour of day, weekday)
             x slow bursty modulation (lognormal knots every `knot_s`, linearly
               interpolated, with occasional bursts: a Markov-modulated rate)

The Poisson fluctuation of the connected-UE count around this mean is added
in `kpis.py`. All work is array-wide over cells; random numbers come from
generators keyed by (seed, stream, index), so a window of
time gives the same numbers however the run is chunked.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np

from sims.topology import AREA_TYPES, Topology

# (centre hour, width in hours, height) of the daily bumps per area type, and the night floor.
# Chosen so the busy hour is 12-24x the night trough (Milan telecom data, see PLATFORM.md).
_BUMPS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "residential": ((8.0, 1.2, 0.40), (13.0, 2.5, 0.40), (20.5, 2.4, 1.00)),
    "business": ((10.5, 2.0, 0.95), (15.0, 2.0, 0.90), (12.5, 1.0, 0.20)),
    "transport": ((8.0, 1.0, 1.00), (17.8, 1.3, 0.95), (13.0, 3.0, 0.35)),
    "mixed": ((9.0, 2.0, 0.60), (14.0, 3.0, 0.70), (20.0, 2.5, 0.80)),
}
_FLOOR = {"residential": 0.1, "business": 0.115, "transport": 0.11, "mixed": 0.095}
# Saturday/Sunday scale: offices empty, commuting halves, people stay home
_WEEKEND = {"residential": 1.1, "business": 0.35, "transport": 0.55, "mixed": 0.8}
# Offered downlink traffic per connected UE (kbit/s, averaged over idle and active time)
PER_UE_DL_KBPS = np.array([220.0, 180.0, 120.0, 200.0], dtype=np.float32)
UL_TO_DL = np.float32(0.15)
# handover attempts per connected UE per second (transport cells see moving users)
MOBILITY_PER_UE_S = np.array([0.002, 0.003, 0.02, 0.004], dtype=np.float32)

STREAM_KNOTS = 11


def stream_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator for one (seed, stream, index) point of the random grid.

    Keyed by position, so a window of intervals draws the same numbers however
    the run is cut. SFC64: ~4x faster uniforms than Philox, cheap to seed.
    """
    return np.random.Generator(np.random.SFC64(np.random.SeedSequence([int(seed) & (2**63 - 1), stream, index])))


def _raw_profile(hours: np.ndarray, area: str) -> np.ndarray:
    out = np.zeros_like(hours, dtype=np.float64)
    for centre, width, height in _BUMPS[area]:
        d = (hours - centre + 12.0) % 24.0 - 12.0  # circular distance: the day wraps
        out += height * np.exp(-0.5 * (d / width) ** 2)
    return out


_GRID = np.arange(0, 24, 1 / 60)
_PEAK = {a: float((_FLOOR[a] + _raw_profile(_GRID, a)).max()) for a in AREA_TYPES}


def diurnal_profile(hours: np.ndarray, weekday: np.ndarray | None = None) -> np.ndarray:
    """(n_area_types, T) load factor in (0, 1.1]: 1 at a weekday busy hour."""
    hours = np.asarray(hours, dtype=np.float64)
    rows = []
    for area in AREA_TYPES:
        p = (_FLOOR[area] + _raw_profile(hours, area)) / _PEAK[area]
        if weekday is not None:
            p = np.where(np.asarray(weekday) >= 5, p * _WEEKEND[area], p)
        rows.append(p)
    return np.asarray(rows, dtype=np.float32)


@dataclass(frozen=True)
class TrafficParams:
    interval_s: float = 60.0
    knot_s: float = 300.0  # spacing of the slow modulation knots
    slow_sigma: float = 0.2  # lognormal spread of the slow modulation
    burst_prob: float = 0.04  # share of knots that are bursts (bursty arrivals)
    burst_gain: tuple[float, float] = (0.3, 1.0)  # a burst adds this much of the mean, uniform
    load_scale: float = 1.0  # scales every cell's busy-hour UEs

    def __post_init__(self) -> None:
        if not 1.0 <= self.interval_s <= 900.0:
            raise ValueError("interval_s must be within 1 s .. 15 min")
        if self.knot_s <= 0 or self.load_scale <= 0:
            raise ValueError("knot_s and load_scale must be positive")


class TrafficModel:
    def __init__(self, topology: Topology, params: TrafficParams, start: datetime, seed: int) -> None:
        self.topology = topology
        self.params = params
        self.seed = seed
        self._start_hour = start.hour + start.minute / 60 + start.second / 3600 + start.microsecond / 3.6e9
        self._start_weekday = start.weekday()
        self._peak = (topology.cell_peak_ues * np.float32(params.load_scale)).astype(np.float32)
        self._knots: dict[int, np.ndarray] = {}  # small cache: a window needs at most a few knots

    def hours(self, t_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = self._start_hour + np.asarray(t_s, dtype=np.float64) / 3600.0
        return h % 24.0, (self._start_weekday + np.floor(h / 24.0).astype(np.int64)) % 7

    def _knot(self, k: int) -> np.ndarray:
        got = self._knots.get(k)
        if got is None:
            p = self.params
            rng = stream_rng(self.seed, STREAM_KNOTS, k)
            n = self.topology.n_cells
            slow = rng.lognormal(-0.5 * p.slow_sigma**2, p.slow_sigma, n)  # mean 1
            burst = rng.random(n) < p.burst_prob
            gain = rng.uniform(p.burst_gain[0], p.burst_gain[1], n)
            got = (slow * (1.0 + burst * gain)).astype(np.float32)
            if len(self._knots) >= 8:  # bounded cache; windows move forward in time
                self._knots.pop(min(self._knots))
            self._knots[k] = got
        return got

    def slow_modulation(self, t_mid: np.ndarray) -> np.ndarray:
        """(T, C) bursty modulation, linear between knots."""
        kf = np.asarray(t_mid, dtype=np.float64) / self.params.knot_s
        k0 = np.floor(kf).astype(np.int64)
        w = (kf - k0).astype(np.float32)[:, None]
        lo, hi = int(k0.min()), int(k0.max()) + 1
        knots = np.stack([self._knot(k) for k in range(lo, hi + 1)])  # bounded by the window's span
        a = knots[k0 - lo]
        b = knots[k0 - lo + 1]
        return a + (b - a) * w

    def expected_ues(self, t_s: np.ndarray) -> np.ndarray:
        """(T, C) float32 mean connected UEs for intervals starting at `t_s`."""
        t_s = np.asarray(t_s, dtype=np.float64)
        t_mid = t_s + 0.5 * self.params.interval_s
        hours, weekday = self.hours(t_mid)
        profile = diurnal_profile(hours, weekday)  # (A, T)
        out = profile.T[:, self.topology.cell_area]  # (T, C) gather, contiguous
        out *= self._peak
        out *= self.slow_modulation(t_mid)
        return out
