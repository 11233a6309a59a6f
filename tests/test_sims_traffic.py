"""Traffic model and simulator: diurnal shape, burstiness, determinism, chunking independence."""
from __future__ import annotations

import numpy as np
import pytest

from sims.events import random_events
from sims.simulate import SimConfig, Simulator, run
from sims.timefmt import fmt_duration, parse_duration, parse_start
from sims.topology import AREA_TYPES, generate_topology
from sims.traffic import TrafficModel, TrafficParams, diurnal_profile


def test_diurnal_profiles_peak_at_the_right_hours_with_a_deep_night_trough():
    hours = np.arange(0, 24, 1 / 6)
    p = diurnal_profile(hours)
    peak_hour = dict(zip(AREA_TYPES, hours[p.argmax(axis=1)]))
    assert 19 <= peak_hour["residential"] <= 22
    assert 9 <= peak_hour["business"] <= 16
    assert peak_hour["transport"] in (8.0,) or 17 <= peak_hour["transport"] <= 19
    trough_hour = hours[p.argmin(axis=1)]
    assert ((trough_hour >= 0) & (trough_hour <= 6)).all()
    assert np.allclose(p.max(axis=1), 1.0, atol=0.01)
    weekend = diurnal_profile(np.full(1, 11.0), np.full(1, 6))
    weekday = diurnal_profile(np.full(1, 11.0), np.full(1, 2))
    assert weekend[AREA_TYPES.index("business"), 0] < 0.5 * weekday[AREA_TYPES.index("business"), 0]


def test_cells_swing_12_to_24x_over_a_day_with_a_strong_daily_period():
    """PLATFORM.md: Milan 10-minute bins swing ~12-24x (daily median), lag-1-day autocorrelation ~0.73-0.85."""
    topo = generate_topology(n_cells=2_000, seed=1)
    tm = TrafficModel(topo, TrafficParams(interval_s=600), parse_start("2025-06-03T00:00:00"), seed=1)
    e = tm.expected_ues(np.arange(288) * 600.0)  # two weekdays
    swing = e[:144].max(0) / e[:144].min(0)
    assert 12 <= np.median(swing) <= 24
    a, b = e[:144] - e[:144].mean(0), e[144:] - e[144:].mean(0)
    ac = (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))
    assert 0.7 <= np.median(ac) <= 0.9


def test_arrivals_are_bursty_not_just_a_smooth_profile():
    topo = generate_topology(n_cells=500, seed=2)
    tm = TrafficModel(topo, TrafficParams(interval_s=60), parse_start("2025-06-03T12:00:00"), seed=2)
    ratio = tm.expected_ues(np.arange(240) * 60.0) / diurnal_profile(*tm.hours(np.arange(240) * 60.0 + 30)).T[
        :, topo.cell_area] / topo.cell_peak_ues
    assert ratio.max() > 1.3 and ratio.min() < 0.8  # bursts above and lulls below the profile


def sim(seed=3, n_sites=8, duration=1800.0, interval=30.0, events=6):
    topo = generate_topology(n_sites, seed=seed)
    ev = random_events(topo, duration, events, seed)
    cfg = SimConfig(duration_s=duration, interval_s=interval, seed=seed, start=parse_start("2025-06-02T18:00:00"))
    return Simulator(topo, ev, cfg)


def windows_equal(a, b) -> bool:
    return all(np.array_equal(a.kpis[k], b.kpis[k], equal_nan=True) for k in a.kpis) and np.array_equal(
        a.ran_share, b.ran_share)


def test_same_seed_same_kpis_and_queries_other_seed_differs():
    a, b, c = sim(seed=3), sim(seed=3), sim(seed=4)
    assert windows_equal(a.window(0, 60), b.window(0, 60))
    assert not np.array_equal(a.window(0, 60).kpis["RRC.ConnMean"], c.window(0, 60).kpis["RRC.ConnMean"])
    assert run(a).queries == run(b).queries


@pytest.mark.parametrize("step", [1, 7, 60])
def test_results_do_not_depend_on_how_the_run_is_cut_into_windows(step):
    s = sim()
    whole = s.window(0, 60)
    parts = [s.window(i, min(i + step, 60)) for i in range(0, 60, step)]
    for k in whole.kpis:
        assert np.array_equal(whole.kpis[k], np.concatenate([p.kpis[k] for p in parts]), equal_nan=True), k
    assert run(sim(), window_intervals=step).queries == run(sim(), window_intervals=60).queries


def test_interval_bounds_and_duration_parsing():
    with pytest.raises(ValueError):
        TrafficParams(interval_s=0.5)
    with pytest.raises(ValueError):
        TrafficParams(interval_s=901)
    assert parse_duration("1h30m") == 5400 and parse_duration("15m") == 900 and parse_duration("90") == 90
    assert parse_duration("1d") == 86400 and fmt_duration(86400) == "1d" and fmt_duration(90) == "90s"
    with pytest.raises(ValueError):
        parse_duration("soon")
