"""Report: statistics per class and site are exact on known outcomes; tables and PNGs are produced."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from sims.replay import Outcome, Results, outcomes_table
from sims.report import attainment_over_time, per_class, per_site, reasons, render_tables, write_plots
from sims.trace import read_trace

EXAMPLE = Path(__file__).resolve().parents[1] / "sims" / "examples" / "city-3sites"


def outcome(i, priority, result, latency=np.nan, budget=500.0, site="bs-01", served_site="", reason="", t=0.0):
    return Outcome(
        query_id=f"q-{i:06d}", t_s=t, kind="event_explain", priority=priority, controller_id="xapp-ts",
        site_id=site, cell_id=f"{site}/c1", budget_ms=budget, ran_share=0.5, outcome=result,
        reason=reason or {"served": "answered", "shed": "overloaded", "error": "internal"}[result],
        latency_ms=latency, met_deadline=result == "served" and latency <= budget,
        served_site_id=served_site or (site if result == "served" else ""),
    )


@pytest.fixture
def known():
    rows = [outcome(i, "NEAR_RT", "served", latency=float(10 * (i + 1)), t=float(i)) for i in range(100)]  # 10..1000 ms
    rows += [outcome(100 + i, "NEAR_RT", "shed", t=float(i)) for i in range(20)]
    rows += [outcome(200 + i, "NON_RT", "served", latency=3000.0, budget=2000.0, site="bs-02", served_site="bs-01")
             for i in range(5)]
    rows += [outcome(300, "NON_RT", "error", site="bs-02", reason="client_timeout")]
    return outcomes_table(rows)


def test_per_class_counts_attainment_percentiles_and_shed_rate(known):
    rows = {r.key: r for r in per_class(known)}
    near = rows["NEAR_RT"]
    assert (near.count, near.served, near.shed, near.errors) == (120, 100, 20, 0)
    assert near.met == 50  # 10..500 ms within a 500 ms budget
    assert near.attainment == pytest.approx(50 / 120)  # shed queries count as misses
    assert near.shed_rate == pytest.approx(20 / 120)
    lat = np.arange(1, 101) * 10.0
    assert (near.p50_ms, near.p95_ms, near.p99_ms) == pytest.approx(tuple(np.percentile(lat, [50, 95, 99])))
    non = rows["NON_RT"]
    assert (non.count, non.served, non.met, non.errors) == (6, 5, 0, 1) and non.attainment == 0
    assert rows["all"].count == 126 and "BEST_EFFORT" not in rows


def test_per_site_counts_where_queries_wanted_to_go_and_where_they_were_served(known):
    rows = {r.key: r for r in per_site(known)}
    assert rows["bs-01"].count == 120 and rows["bs-01"].served_here == 105
    assert rows["bs-02"].count == 6 and rows["bs-02"].served_here == 0
    assert rows["bs-01"].mean_ran_share == pytest.approx(0.5)


def test_reasons_say_why_queries_missed(known):
    assert reasons(known)[:2] == [("NEAR_RT", "served", "answered", 100), ("NEAR_RT", "shed", "overloaded", 20)]
    assert ("NON_RT", "error", "client_timeout", 1) in reasons(known)


def test_attainment_over_time_bins(known):
    edges, series = attainment_over_time(known, bins=4)
    assert len(edges) == 5 and set(series) == {"NEAR_RT", "NON_RT"}
    assert series["NEAR_RT"][0] > series["NEAR_RT"][-1]  # early queries were fast, late ones slow or shed


def test_tables_and_pngs(known, tmp_path):
    res = Results(tmp_path, {"trace": str(EXAMPLE), "target": "x", "n_queries": 126, "options": {"speed": 60}},
                  known, None)
    buf = io.StringIO()
    render_tables(res, Console(file=buf, width=140))
    text = buf.getvalue()
    for words in ("Per class", "NEAR_RT", "41.7%", "16.7%", "Per site", "bs-02", "client_timeout"):
        assert words in text
    files = write_plots(res, read_trace(EXAMPLE), tmp_path / "plots")
    assert sorted(f.name for f in files) == ["attainment.png", "cell_load.png", "latency_cdf.png"]
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 10_000
