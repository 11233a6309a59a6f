"""The KPI evidence core on plain data: changes, co-site comparison, flags, missing data, units."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airan.core.evidence import FEATURE_NAMES, cell_features, compute_evidence, render_movement
from airan.core.query import KpiSample

T0 = 1_700_000_040  # a whole minute, 22:14 UTC
NAN = float("nan")


def samples(cell: str, **series: list[float]) -> list[KpiSample]:
    units = {"DRB.UEThpDl": "kbit/s", "RRU.PrbTotDl": "%", "RRC.ConnMean": "UEs", "TB.BlerDl": "%",
             "L1M.SS-SINR": "dB", "DRB.RlcSduDelayDl": "us", "MM.HoExeInterReq": "count",
             "MM.HoExeInterFail": "count", "PEE.AvgPower": "W"}  # fmt: skip
    out = []
    for kpi, values in series.items():
        name = kpi.replace("_", ".").replace("SS.SINR", "SS-SINR")
        out += [KpiSample(name, v, units.get(name, ""), cell, T0 + 60 * i) for i, v in enumerate(values)]
    return out


def test_a_throughput_drop_reads_in_human_units_with_its_change():
    ev = compute_evidence(samples("bs-01/c1", DRB_UEThpDl=[16600, 16600, 7100]))
    m = ev.of("bs-01/c1", "DRB.UEThpDl")
    assert m.before == 16600 and m.now == 7100 and m.change == pytest.approx(-0.572, abs=1e-3)
    assert render_movement(m) == "bs-01/c1 DRB.UEThpDl 16.6 → 7.1 Mbit/s (−57%)"
    assert m.trend == -1


def test_no_scientific_notation_anywhere():
    ev = compute_evidence(
        samples("bs-01/c1", DRB_UEThpDl=[38000, 380000, 3.8e6], DRB_RlcSduDelayDl=[800, 1500, 120000],
                PEE_AvgPower=[0.0004, 0.0002, 0.0001])  # fmt: skip
    )
    text = ev.render(max_lines=20)
    assert not re.search(r"\de[+-]?\d", text), text
    assert "ms" in text and "Mbit/s" in text


def test_absolute_kpis_change_in_points_and_db():
    ev = compute_evidence(samples("bs-01/c1", L1M_SS_SINR=[14.0, 14.0, 5.5], TB_BlerDl=[8.0, 8.0, 31.0]))
    assert ev.of("bs-01/c1", "L1M.SS-SINR").change == pytest.approx(-8.5)
    lines = ev.lines(max_lines=10)
    assert "bs-01/c1 L1M.SS-SINR 14 → 5.5 dB (−8.5 dB)" in lines
    assert "bs-01/c1 TB.BlerDl 8 → 31% (+23 points)" in lines
    assert any("BLER 31% above the 10% target" in line for line in lines)


def test_saturation_and_handover_failure_flags():
    ev = compute_evidence(
        samples("bs-02/c1", RRU_PrbTotDl=[70, 99, 99], MM_HoExeInterReq=[20, 40, 60], MM_HoExeInterFail=[1, 10, 30])
    )
    flags = ev.flags["bs-02/c1"]
    assert flags.prb_saturated and flags.ho_failing and flags.ho_fail_ratio == pytest.approx(0.5)
    text = ev.render()
    assert "bs-02/c1 PRBs saturated (99%)" in text and "handover failures 50% of attempts" in text


def test_too_few_handover_attempts_are_no_ratio():
    ev = compute_evidence(samples("bs-02/c1", MM_HoExeInterReq=[2, 3], MM_HoExeInterFail=[2, 3]))
    assert ev.flags["bs-02/c1"].ho_fail_ratio is None


def test_a_cell_that_stopped_reporting_is_evidence_not_an_error():
    kpis = samples("bs-01/c1", DRB_UEThpDl=[12000, 12000, 12100], RRC_ConnMean=[30, 31, 30]) + samples(
        "bs-01/c2", DRB_UEThpDl=[15000, NAN, NAN], RRC_ConnMean=[40, NAN, NAN]
    )
    ev = compute_evidence(kpis)
    flags = ev.flags["bs-01/c2"]
    assert flags.silent and flags.silent_since == T0 + 60
    assert ev.lines()[0] == "no report from bs-01/c2 since 22:15"
    assert not ev.flags["bs-01/c1"].silent
    # absent samples (never sent) read the same as NaN ones
    absent = [k for k in kpis if not (k.cell_id == "bs-01/c2" and k.time_s > T0)]
    assert compute_evidence(absent).flags["bs-01/c2"].silent


def test_one_kpi_missing_at_the_end_is_named():
    ev = compute_evidence(samples("bs-01/c1", DRB_UEThpDl=[12000, 11000, NAN], RRC_ConnMean=[30, 2, 1]))
    m = ev.of("bs-01/c1", "DRB.UEThpDl")
    assert m.missing_since == T0 + 120 and m.now == 11000
    assert "bs-01/c1 DRB.UEThpDl not reported since 22:16" in ev.lines()


def test_co_site_comparison_and_single_cell_sites():
    kpis = samples("bs-01/c1", RRU_PrbTotDl=[95, 96]) + samples("bs-01/c2", RRU_PrbTotDl=[40, 41]) + samples(
        "bs-01/c3", RRU_PrbTotDl=[45, 44]
    ) + samples("bs-02/c1", RRU_PrbTotDl=[10, 12])
    ev = compute_evidence(kpis)
    assert ev.of("bs-01/c1", "RRU.PrbTotDl").vs_site == pytest.approx(96 - 42.5)
    assert ev.of("bs-02/c1", "RRU.PrbTotDl").vs_site is None  # alone on its site: no co-site reference
    f = cell_features(ev, "bs-02/c1")
    assert f[FEATURE_NAMES.index("n_cells_site")] == 1


def test_samples_without_times_keep_their_order():
    kpis = [KpiSample("RRC.ConnMean", v, "UEs", "bs-01/c1") for v in (10, 10, 30)]
    m = compute_evidence(kpis).of("bs-01/c1", "RRC.ConnMean")
    assert (m.before, m.now, m.trend) == (10, 30, 1)


def test_an_empty_or_flat_context_says_so():
    assert compute_evidence([]).lines() == ["no KPI moved noticeably in the window"]
    flat = compute_evidence(samples("bs-01/c1", RRC_ConnMean=[30, 30, 30]))
    assert flat.lines() == ["no KPI moved noticeably in the window"]


def test_features_have_a_fixed_length_and_nan_for_absent_kpis():
    ev = compute_evidence(samples("bs-01/c1", RRC_ConnMean=[30, 60]))
    f = cell_features(ev, "bs-01/c1")
    assert f.shape == (len(FEATURE_NAMES),) and f.dtype == np.float32
    assert f[FEATURE_NAMES.index("RRC.ConnMean:change")] == pytest.approx(1.0)
    assert math.isnan(f[FEATURE_NAMES.index("TB.BlerDl:change")])


finite_or_nan = st.one_of(st.floats(-1e7, 1e7, allow_nan=False), st.just(NAN), st.just(math.inf))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["bs-01/c1", "bs-01/c2", "bs-02/c1"]),
                          st.sampled_from(["DRB.UEThpDl", "RRU.PrbTotDl", "L1M.SS-SINR", "MM.HoExeInterFail"]),
                          st.integers(0, 5), finite_or_nan), max_size=60))  # fmt: skip
def test_any_context_gives_evidence_and_finite_sized_features(rows):
    kpis = [KpiSample(kpi, v, "", cell, T0 + 60 * t) for cell, kpi, t, v in rows]
    ev = compute_evidence(kpis)
    lines = ev.lines()
    assert 1 <= len(lines) <= 8 and all("nan" not in line.lower() and "inf" not in line for line in lines)
    for cell in ev.cells:
        assert cell_features(ev, cell).shape == (len(FEATURE_NAMES),)


def test_a_counter_from_zero_reads_as_such_not_as_a_billion_percent():
    ev = compute_evidence(samples("bs-01/c1", MM_HoExeInterFail=[0, 0, 12], RRC_ConnMean=[2, 2, 90]))
    assert "bs-01/c1 MM.HoExeInterFail 0 → 12 (from 0)" in ev.lines()
    assert ev.of("bs-01/c1", "RRC.ConnMean").change == 10.0  # capped at +1000 %
    assert "bs-01/c1 RRC.ConnMean 2 → 90 UEs (over +1000%)" in ev.lines()


def test_saturation_from_used_and_available_prbs_shows_its_value():
    kpis = [KpiSample("RRU.PrbUsedDl", 270.0, "PRBs", "bs-01/c1", T0), KpiSample("RRU.PrbAvailDl", 273.0, "PRBs", "bs-01/c1", T0)]
    assert compute_evidence(kpis).lines()[0] == "bs-01/c1 PRBs saturated (98.9%)"
