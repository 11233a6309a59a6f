"""Radio headroom forecasts: how much of a site's compute the AI may use over the next control interval.

Pure core over plain data (numpy, dataclasses, an injectable clock). The radio's compute share
comes from `ReportRanLoad`; the AI is never given what the radio may need. As in Concordia
(SIGCOMM 2021), the forecast is a high quantile of the radio's load, not its mean: the radio's worst
minute decides what the AI gets.

Per site, the forecast share for [t, t + horizon] is the largest of
- the last report (the radio never gets less than it has now),
- the recent trend: a least-squares line through the last `window_s` of reports, evaluated at the
  end of the horizon, plus the `quantile` of the reports' residuals around it,
- the time-of-day profile: the last report plus how far the load rose over the same stretch of
  time on each earlier day (from that day's level at now's time of day to its peak over the
  horizon), at the `quantile` across days: the busy hour is seen coming before it arrives, and a
  day that is busier or quieter overall does not shift the rise.

Missing data is treated as the worst case: a site whose reports stopped (older than `stale_after_s`
by the clock) is forecast at the full share, so it drains; a site with too few reports for a trend
gets its last share plus `cold_start_pad`. A site that was never reported keeps
`share_without_reports` (0 by default: a site nobody reports for has no radio on it).
"""
from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np

DAY_S = 86_400.0


@dataclass(frozen=True)
class ForecastParams:
    quantile: float = 0.99  # the radio's load is forecast at this quantile
    horizon_s: float = 10.0  # the control interval the forecast covers (radio-clock seconds)
    window_s: float = 600.0  # recent reports the trend is fitted on
    min_trend_samples: int = 4  # fewer reports: cold start
    cold_start_pad: float = 0.10  # share added to the last report during a cold start
    profile_bin_s: float = 900.0  # time-of-day bins of the profile
    profile_days: int = 7  # earlier days the profile reads (older bins are dropped)
    profile_samples_per_bin: int = 256  # reports a bin keeps
    stale_after_s: float = 60.0  # clock seconds without a report: assume the radio needs everything
    share_without_reports: float = 0.0
    max_history: int = 4096  # recent reports kept per site
    use_profile: bool = True  # False: trend and last report only (an ablation)

    def __post_init__(self) -> None:
        if not 0.5 <= self.quantile < 1.0:
            raise ValueError(f"quantile must be in [0.5, 1), got {self.quantile}")
        for name in ("horizon_s", "window_s", "profile_bin_s", "stale_after_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if not 0.0 <= self.share_without_reports <= 1.0:
            raise ValueError("share_without_reports must be within [0, 1]")


@dataclass(frozen=True)
class Forecast:
    """The radio's forecast share of a site over the next interval, and why it is that number."""

    site_id: str
    share: float  # forecast radio share at `quantile`, in [0, 1]
    last_share: float  # the last report (nan: none yet)
    basis: str  # "trend", "profile", "last", "cold_start", "stale", "no_reports"
    samples: int  # reports in the trend window

    def headroom_cpus(self, cpus: float, margin: float) -> float:
        """CPUs the AI may use: capacity - forecast radio share - margin (a share of capacity)."""
        return max(0.0, cpus * (1.0 - self.share - margin))


class _SiteHistory:
    def __init__(self, p: ForecastParams) -> None:
        self.times: deque[float] = deque(maxlen=p.max_history)  # radio-clock seconds (report time)
        self.shares: deque[float] = deque(maxlen=p.max_history)
        self.received_at = -math.inf  # registry clock
        # absolute bin number (radio-clock time // profile_bin_s) -> the shares reported in it
        self.profile: OrderedDict[int, deque[float]] = OrderedDict()


class HeadroomForecaster:
    """Keeps each site's report history and forecasts its radio share at a high quantile."""

    def __init__(
        self, site_ids: Iterable[str], params: ForecastParams = ForecastParams(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.params = params
        self.clock = clock
        self._sites = {s: _SiteHistory(params) for s in site_ids}
        self._keep_bins = int(math.ceil((params.profile_days + 1) * DAY_S / params.profile_bin_s))

    def observe(self, site_id: str, share: float, at: float | None = None, received_at: float | None = None) -> None:
        """One report of the radio's share; `at` is when the radio measured it (default: the clock).

        Reports may come out of order (several pushes in flight): each is kept at its own time.
        `received_at` (default: the clock) is when it arrived; a report replayed after a restart keeps
        its own, so a radio that went quiet meanwhile is still stale.
        """
        if not (math.isfinite(share) and 0.0 <= share <= 1.0):
            raise ValueError(f"share must be within [0, 1], got {share}")
        h = self._sites[site_id]
        now = self.clock()
        at = now if at is None else float(at)
        if h.times and at < h.times[-1]:  # out of order: insert, keeping the deque sorted by time
            ts, ss = list(h.times), list(h.shares)
            i = int(np.searchsorted(ts, at, side="right"))
            ts.insert(i, at)
            ss.insert(i, share)
            h.times = deque(ts, maxlen=self.params.max_history)
            h.shares = deque(ss, maxlen=self.params.max_history)
        else:
            h.times.append(at)
            h.shares.append(share)
        h.received_at = max(h.received_at, now if received_at is None else float(received_at))
        b = int(at // self.params.profile_bin_s)
        if b not in h.profile:
            h.profile[b] = deque(maxlen=self.params.profile_samples_per_bin)
            h.profile.move_to_end(b)
            while len(h.profile) > self._keep_bins:  # bounded: the oldest bins fall out
                h.profile.popitem(last=False)
        h.profile[b].append(share)

    def forecast(self, site_id: str) -> Forecast:
        p = self.params
        h = self._sites[site_id]
        if not h.times:
            return Forecast(site_id, p.share_without_reports, math.nan, "no_reports", 0)
        last_t, last = h.times[-1], h.shares[-1]
        if self.clock() - h.received_at > p.stale_after_s:
            return Forecast(site_id, 1.0, last, "stale", 0)
        times = np.fromiter(h.times, dtype=np.float64)
        shares = np.fromiter(h.shares, dtype=np.float64)
        recent = times >= last_t - p.window_s
        t, y = times[recent], shares[recent]
        if t.size < p.min_trend_samples:
            return Forecast(site_id, min(1.0, last + p.cold_start_pad), last, "cold_start", int(t.size))

        candidates = {"last": last, "trend": _trend_upper(t, y, last_t + p.horizon_s, p.quantile)}
        rise = self._profile_rise(h, last_t, p) if p.use_profile else None
        if rise is not None:
            candidates["profile"] = last + rise
        basis = max(candidates, key=candidates.get)
        share = float(np.clip(candidates[basis], 0.0, 1.0))
        return Forecast(site_id, share, last, basis, int(t.size))

    def _profile_rise(self, h: _SiteHistory, now_t: float, p: ForecastParams) -> float | None:
        """How far the load rose from now's time of day to its peak over the horizon, on each
        earlier day, at the quantile across days; None while no earlier day has both."""
        rises = []
        for k in range(1, p.profile_days + 1):
            ref = now_t - k * DAY_S
            first, last = int(ref // p.profile_bin_s), int((ref + p.horizon_s) // p.profile_bin_s)
            here = h.profile.get(first)
            ahead = [v for b in range(first, last + 1) for v in h.profile.get(b, ())]
            if here and ahead:
                rises.append(max(ahead) - float(np.mean(here)))
        if not rises:
            return None
        return max(0.0, float(np.quantile(rises, p.quantile)))

    def forecasts(self) -> dict[str, Forecast]:
        return {s: self.forecast(s) for s in self._sites}


def _trend_upper(t: np.ndarray, y: np.ndarray, at: float, q: float) -> float:
    """A least-squares line through (t, y) at `at`, plus the q-quantile of the residuals."""
    tc = t - t.mean()
    denom = float(tc @ tc)
    slope = float(tc @ (y - y.mean())) / denom if denom > 0 else 0.0
    intercept = float(y.mean())
    residuals = y - (intercept + slope * tc)
    return intercept + slope * (at - t.mean()) + max(0.0, float(np.quantile(residuals, q)))


def headroom_by_site(
    forecasts: Mapping[str, Forecast], cpus: Mapping[str, float], margin: float
) -> dict[str, float]:
    """CPUs each site's AI may use over the next interval."""
    return {s: f.headroom_cpus(cpus[s], margin) for s, f in forecasts.items()}


@dataclass(frozen=True)
class ReplicaShare:
    """What one replica is allowed: its CPU cap and its admitted concurrency."""

    replica_id: str
    cpus: float  # cap on its real CPU use
    max_concurrency: int  # requests it may hold at once (0: none)


def split_headroom(
    headroom_cpus: float, replica_ids: list[str], full_cpus: float, max_num_seqs: int,
) -> list[ReplicaShare]:
    """A site's headroom split evenly among its replicas; concurrency scales with the CPU each gets.

    `full_cpus` is what one replica is built for (its threads); at that much CPU it admits
    `max_num_seqs`, at half of it half as many (rounded down, so a throttled replica is not
    handed more work than it can turn around).
    """
    if not replica_ids:
        return []
    each = headroom_cpus / len(replica_ids)
    concurrency = int(math.floor(max_num_seqs * min(1.0, each / full_cpus) + 1e-9)) if full_cpus > 0 else 0
    return [ReplicaShare(r, each, concurrency) for r in replica_ids]
