"""Headroom forecasts on plain data with an injected clock."""
import math

import numpy as np
import pytest

from airan.core.headroom import DAY_S, ForecastParams, HeadroomForecaster, split_headroom


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _feed(f: HeadroomForecaster, clock: Clock, site: str, times, shares) -> None:
    for t, s in zip(times, shares):
        clock.t = t
        f.observe(site, float(s), at=t)


def test_a_rising_load_is_forecast_above_the_last_report():
    clock = Clock()
    f = HeadroomForecaster(["a"], ForecastParams(horizon_s=60, window_s=600, quantile=0.99), clock)
    times = np.arange(0, 600, 10.0)
    _feed(f, clock, "a", times, 0.2 + 0.0005 * times)  # +0.03 per minute
    fc = f.forecast("a")
    assert fc.basis == "trend"
    last = 0.2 + 0.0005 * times[-1]
    assert fc.share == pytest.approx(last + 0.0005 * 60, abs=1e-6)  # the line at t_last + horizon
    assert fc.share > fc.last_share


def test_noise_is_covered_at_the_quantile():
    clock = Clock()
    rng = np.random.default_rng(0)
    p = ForecastParams(horizon_s=10, window_s=3000, quantile=0.99)
    f = HeadroomForecaster(["a"], p, clock)
    times = np.arange(0, 3000, 10.0)
    _feed(f, clock, "a", times, np.clip(0.5 + rng.normal(0, 0.05, times.size), 0, 1))
    fc = f.forecast("a")
    fresh = 0.5 + rng.normal(0, 0.05, 10_000)
    # a 99% forecast of a stationary load: about 1% of future samples above it, never a third
    assert 0.0 <= np.mean(fresh > fc.share) < 0.03
    assert fc.share < 0.7  # and not absurdly conservative


def test_the_busy_hour_is_seen_coming_from_earlier_days():
    clock = Clock()
    p = ForecastParams(horizon_s=3600, window_s=1800, profile_bin_s=900, quantile=0.95)
    f = HeadroomForecaster(["a"], p, clock)

    def load(t):  # flat 0.3, busy hour 10:00-11:00 at 0.8
        return 0.8 if 10 * 3600 <= (t % DAY_S) < 11 * 3600 else 0.3

    times = np.arange(0, 2 * DAY_S + 9.5 * 3600, 60.0)  # two days, then day three up to 09:30
    _feed(f, clock, "a", times, [load(t) for t in times])
    fc = f.forecast("a")
    assert fc.last_share == pytest.approx(0.3)
    assert fc.basis == "profile" and fc.share == pytest.approx(0.8, abs=0.01)
    # without earlier days the flat recent load says nothing of the busy hour
    fresh_clock = Clock()
    fresh = HeadroomForecaster(["a"], p, fresh_clock)
    recent = times[-60:]
    _feed(fresh, fresh_clock, "a", recent, [load(t) for t in recent])
    assert fresh.forecast("a").share == pytest.approx(0.3, abs=0.01)


def test_missing_reports_mean_the_radio_may_need_everything():
    clock = Clock()
    f = HeadroomForecaster(["a", "b"], ForecastParams(stale_after_s=30), clock)
    _feed(f, clock, "a", np.arange(0, 100, 10.0), [0.2] * 10)
    assert f.forecast("a").share < 0.5
    clock.t = 90 + 31  # no report for 31 s
    fc = f.forecast("a")
    assert fc.basis == "stale" and fc.share == 1.0 and fc.headroom_cpus(4, 0.05) == 0.0
    # a site nobody ever reported for keeps the configured default
    assert f.forecast("b").basis == "no_reports" and f.forecast("b").share == 0.0


def test_cold_start_pads_the_first_reports():
    clock = Clock()
    f = HeadroomForecaster(["a"], ForecastParams(min_trend_samples=4, cold_start_pad=0.1), clock)
    _feed(f, clock, "a", [0.0, 1.0], [0.4, 0.45])
    fc = f.forecast("a")
    assert fc.basis == "cold_start" and fc.share == pytest.approx(0.55)


def test_out_of_order_reports_are_kept_in_time_order():
    clock = Clock(100)
    f = HeadroomForecaster(["a"], ForecastParams(horizon_s=10), clock)
    for t in (0, 20, 10, 30, 40):
        f.observe("a", 0.01 * t, at=t)
    assert f.forecast("a").last_share == pytest.approx(0.4)
    assert f.forecast("a").share == pytest.approx(0.5, abs=1e-6)


def test_bad_reports_are_refused():
    f = HeadroomForecaster(["a"])
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError):
            f.observe("a", bad)
    with pytest.raises(ValueError):
        ForecastParams(quantile=1.0)


def test_headroom_is_capacity_minus_forecast_minus_margin():
    clock = Clock()
    f = HeadroomForecaster(["a"], ForecastParams(), clock)
    _feed(f, clock, "a", np.arange(0, 60, 10.0), [0.5] * 6)
    assert f.forecast("a").headroom_cpus(cpus=4, margin=0.1) == pytest.approx(4 * 0.4)


def test_concurrency_follows_the_cpu_each_replica_gets():
    shares = split_headroom(1.0, ["r1", "r2"], full_cpus=1.0, max_num_seqs=8)
    assert [(s.cpus, s.max_concurrency) for s in shares] == [(0.5, 4), (0.5, 4)]
    assert split_headroom(3.0, ["r1"], full_cpus=1.0, max_num_seqs=8)[0].max_concurrency == 8  # capped at full
    assert split_headroom(0.05, ["r1"], full_cpus=1.0, max_num_seqs=8)[0].max_concurrency == 0
    assert split_headroom(1.0, [], 1.0, 8) == []
