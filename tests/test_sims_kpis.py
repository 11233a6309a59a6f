"""KPI invariants (property tests), saturation, monotonicity and event effects."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from sims.events import EVENT_KINDS, KIND_INDEX, EventTable
from sims.kpis import KPI_NAMES, KPI_UNITS, KPIS, CellStatic, RadioParams, radio_kpis
from sims.ranload import ran_compute_share
from sims.simulate import SimConfig, Simulator
from sims.timefmt import parse_start
from sims.topology import generate_topology

TOPO = generate_topology(4, seed=3)  # 4 sites, mixed 1-3 cells
C = TOPO.n_cells
ST = CellStatic.of(TOPO)
P = RadioParams()
QUALITY = ("DRB.UEThpDl", "DRB.UEThpUl", "DRB.RlcSduDelayDl", "TB.BlerDl", "L1M.SS-SINR", "CARR.WBCQIMean")
COUNTS = ("MM.HoExeInterReq", "MM.HoExeInterSucc", "MM.HoExeInterFail", "RRC.ConnMax")


def arr(lo: float, hi: float, T: int):
    return hnp.arrays(np.float32, (T, C), elements=st.floats(lo, hi, width=32))


@st.composite
def radio_inputs(draw):
    T = draw(st.integers(1, 3))
    inputs = {
        "m": draw(arr(0, 3000, T)),
        "z_ue": draw(arr(-3, 3, T)),
        "z_sinr": draw(arr(-2.5, 2.5, T)),
        "z_ho": draw(arr(-2.5, 2.5, T)),
        "dt": draw(st.sampled_from([1.0, 10.0, 60.0, 900.0])),
    }
    if draw(st.booleans()):
        inputs["avail"] = draw(arr(0, 1, T))
        inputs["sleep"] = np.minimum(draw(arr(0, 1, T)), 1 - inputs["avail"])
        inputs["m"] = inputs["m"] * inputs["avail"]
    if draw(st.booleans()):
        inputs["sinr_delta_db"] = draw(arr(-20, 0, T))
    if draw(st.booleans()):
        inputs["ho_storm"] = draw(arr(0, 1, T))
    return inputs


def run_kpis(i: dict) -> dict[str, np.ndarray]:
    i = dict(i)
    m, dt = i.pop("m"), i.pop("dt")
    return radio_kpis(m, ST, dt, **i)


def test_every_kpi_has_a_3gpp_style_name_and_unit():
    assert len(KPI_NAMES) == len(set(KPI_NAMES)) >= 12
    for k in KPIS:
        assert k.unit and k.description and "." in k.name
    for required in ("RRC.ConnMean", "DRB.MeanActiveUeDl", "RRU.PrbUsedDl", "RRU.PrbUsedUl", "RRU.PrbAvailDl",
                     "DRB.UEThpDl", "DRB.UEThpUl", "DRB.RlcSduDelayDl", "TB.BlerDl", "L1M.SS-SINR",
                     "CARR.WBCQIMean", "MM.HoExeInterReq", "MM.HoExeInterSucc"):
        assert required in KPI_UNITS


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(radio_inputs())
def test_kpi_ranges_hold_for_any_load_noise_and_events(inputs):
    k = run_kpis(inputs)
    avail = inputs.get("avail")
    off = np.zeros_like(inputs["m"], dtype=bool) if avail is None else avail <= 0
    assert set(k) == set(KPI_NAMES)
    for name, v in k.items():
        assert v.dtype == np.float32 and v.shape == inputs["m"].shape, name
        if name in QUALITY:
            assert np.array_equal(np.isnan(v), off), f"{name}: NaN exactly where the cell was off"
        else:
            assert np.isfinite(v).all(), name
    on = ~off
    eps = 1e-3
    assert (k["RRC.ConnMean"] >= 0).all()
    assert (k["RRC.ConnMax"] >= k["RRC.ConnMean"] - eps).all()
    assert (k["DRB.MeanActiveUeDl"] >= 0).all() and (k["DRB.MeanActiveUeDl"] <= k["RRC.ConnMean"] + eps).all()
    for d in ("Dl", "Ul"):
        used, avail_prb, tot = k[f"RRU.PrbUsed{d}"], k[f"RRU.PrbAvail{d}"], k[f"RRU.PrbTot{d}"]
        assert (used >= 0).all() and (used <= avail_prb * (1 + 1e-5) + eps).all()
        assert (tot >= 0).all() and (tot <= 100 + 1e-3).all()
        assert (avail_prb <= ST.prb + eps).all()
    assert (k["TB.BlerDl"][on] >= 0).all() and (k["TB.BlerDl"][on] <= 100).all()
    assert (k["CARR.WBCQIMean"][on] >= 1).all() and (k["CARR.WBCQIMean"][on] <= 15).all()
    assert (k["DRB.UEThpDl"][on] >= 0).all() and (k["DRB.UEThpUl"][on] >= 0).all()
    assert (k["DRB.RlcSduDelayDl"][on] >= 0).all() and (k["DRB.RlcSduDelayDl"][on] <= P.max_delay_us).all()
    for name in COUNTS:
        assert (k[name] >= 0).all() and np.array_equal(k[name], np.round(k[name])), name
    assert (k["MM.HoExeInterSucc"] <= k["MM.HoExeInterReq"]).all()
    assert np.array_equal(k["MM.HoExeInterFail"], k["MM.HoExeInterReq"] - k["MM.HoExeInterSucc"])
    assert (k["PEE.AvgPower"] >= 0).all() and (k["PEE.AvgPower"] <= P.p0_w + P.pdyn_w + P.psleep_w + eps).all()
    share = ran_compute_share(TOPO, k, avail, inputs.get("sleep"))
    assert share.shape == (inputs["m"].shape[0], TOPO.n_sites) and (share >= 0).all() and (share <= 1).all()


def zeros(T=1):
    z = np.zeros((T, C), np.float32)
    return {"z_ue": z, "z_sinr": z, "z_ho": z}


def test_prb_use_saturates_at_100_percent_under_any_overload():
    k = radio_kpis(np.full((1, C), 1e5, np.float32), ST, 60.0, **zeros())
    assert np.allclose(k["RRU.PrbTotDl"], 100.0) and np.allclose(k["RRU.PrbUsedDl"], k["RRU.PrbAvailDl"])
    assert (k["DRB.RlcSduDelayDl"] > 100_000).all()  # a saturated queue: delay in the 100 ms range or worse


@settings(max_examples=60, deadline=None)
@given(st.floats(1, 500), st.floats(1.05, 20), st.floats(-15, 0))
def test_throughput_falls_as_load_or_interference_rise(ues, factor, delta):
    lo = radio_kpis(np.full((1, C), ues, np.float32), ST, 60.0, **zeros())
    hi = radio_kpis(np.full((1, C), ues * factor, np.float32), ST, 60.0, **zeros())
    assert (hi["DRB.UEThpDl"] <= lo["DRB.UEThpDl"] * (1 + 1e-5)).all()
    assert (hi["RRU.PrbTotDl"] >= lo["RRU.PrbTotDl"] - 1e-3).all()
    assert (hi["DRB.RlcSduDelayDl"] >= lo["DRB.RlcSduDelayDl"] * (1 - 1e-5)).all()
    noisy = radio_kpis(np.full((1, C), ues, np.float32), ST, 60.0, **zeros(),
                       sinr_delta_db=np.full((1, C), delta, np.float32))
    assert (noisy["L1M.SS-SINR"] <= lo["L1M.SS-SINR"] + 1e-4).all()
    assert (noisy["TB.BlerDl"] >= lo["TB.BlerDl"] - 1e-4).all()
    assert (noisy["DRB.UEThpDl"] <= lo["DRB.UEThpDl"] * (1 + 1e-5)).all()


# -- events move the right KPIs: same seed with and without the event, so the noise is identical ----

DT = 10.0
EV_TOPO = generate_topology(6, seed=11, cells_per_site=(3, 3))
CFG = SimConfig(duration_s=600, interval_s=DT, seed=5, start=parse_start("2025-06-02T12:00:00"))


def with_and_without(kind: str, cell: int, severity: float):
    ev = EventTable.build([KIND_INDEX[kind]], [cell], [100.0], [300.0], [severity])
    a = Simulator(EV_TOPO, ev, CFG).window(0, 60)
    b = Simulator(EV_TOPO, EventTable.empty(), CFG).window(0, 60)
    return a, b, slice(11, 40)  # intervals fully inside the event


def co_site(cell: int) -> np.ndarray:
    site = EV_TOPO.cell_site[cell]
    return np.array([c for c in np.flatnonzero(EV_TOPO.cell_site == site) if c != cell])


@settings(max_examples=12, deadline=None)
@given(st.integers(0, EV_TOPO.n_cells - 1), st.floats(0.3, 1.0))
def test_outage_takes_the_cell_off_air_and_moves_ues_to_co_site_cells(cell, sev):
    a, b, r = with_and_without("cell_outage", cell, sev)
    k, k0 = a.kpis, b.kpis
    assert (k["RRC.ConnMean"][r, cell] == 0).all() and (k["RRU.PrbAvailDl"][r, cell] == 0).all()
    assert (k["PEE.AvgPower"][r, cell] == 0).all() and np.isnan(k["DRB.UEThpDl"][r, cell]).all()
    nb = co_site(cell)
    moved = k["RRC.ConnMean"][r][:, nb].sum() - k0["RRC.ConnMean"][r][:, nb].sum()
    assert moved > 0.5 * k0["RRC.ConnMean"][r, cell].sum()
    assert (k["RRU.PrbTotDl"][r][:, nb] >= k0["RRU.PrbTotDl"][r][:, nb] - 1e-3).all()
    before = slice(0, 9)
    assert np.array_equal(k["RRC.ConnMean"][before], k0["RRC.ConnMean"][before])  # nothing moves before it


@settings(max_examples=12, deadline=None)
@given(st.integers(0, EV_TOPO.n_cells - 1), st.floats(0.3, 1.0))
def test_interference_lowers_sinr_and_cqi_raises_bler_and_cuts_throughput(cell, sev):
    a, b, r = with_and_without("interference", cell, sev)
    k, k0 = a.kpis, b.kpis
    assert (k["L1M.SS-SINR"][r, cell] <= k0["L1M.SS-SINR"][r, cell] - 3 * 0.99).all()
    assert (k["CARR.WBCQIMean"][r, cell] <= k0["CARR.WBCQIMean"][r, cell]).all()
    assert (k["TB.BlerDl"][r, cell] >= k0["TB.BlerDl"][r, cell]).all()
    assert (k["DRB.UEThpDl"][r, cell] < k0["DRB.UEThpDl"][r, cell]).all()
    assert (k["RRU.PrbTotDl"][r, cell] >= k0["RRU.PrbTotDl"][r, cell] - 1e-3).all()


@pytest.mark.parametrize("kind", ["congestion", "flash_crowd"])
@settings(max_examples=8, deadline=None)
@given(cell=st.integers(0, EV_TOPO.n_cells - 1), sev=st.floats(0.3, 1.0))
def test_surges_raise_users_load_delay_and_ran_share(kind, cell, sev):
    a, b, _ = with_and_without(kind, cell, sev)
    r = slice(17, 35)  # past a flash crowd's ramp-up, before its decay
    k, k0 = a.kpis, b.kpis
    assert (k["RRC.ConnMean"][r, cell].mean() > 1.2 * k0["RRC.ConnMean"][r, cell].mean())
    assert (k["RRU.PrbTotDl"][r, cell] >= k0["RRU.PrbTotDl"][r, cell] - 1e-3).all()
    assert k["DRB.UEThpDl"][r, cell].mean() < k0["DRB.UEThpDl"][r, cell].mean()
    assert k["DRB.RlcSduDelayDl"][r, cell].mean() > k0["DRB.RlcSduDelayDl"][r, cell].mean()
    site = EV_TOPO.cell_site[cell]
    assert (a.ran_share[r, site] >= b.ran_share[r, site] - 1e-6).all()
    assert a.ran_share[r, site].mean() > b.ran_share[r, site].mean()


@settings(max_examples=12, deadline=None)
@given(st.integers(0, EV_TOPO.n_cells - 1), st.floats(0.5, 1.0))
def test_handover_storm_multiplies_attempts_and_failures(cell, sev):
    a, b, r = with_and_without("ho_failure_storm", cell, sev)
    k, k0 = a.kpis, b.kpis
    assert k["MM.HoExeInterReq"][r, cell].sum() > 2 * k0["MM.HoExeInterReq"][r, cell].sum()
    ratio = k["MM.HoExeInterFail"][r, cell].sum() / max(k["MM.HoExeInterReq"][r, cell].sum(), 1)
    ratio0 = k0["MM.HoExeInterFail"][r, cell].sum() / max(k0["MM.HoExeInterReq"][r, cell].sum(), 1)
    assert ratio > ratio0 + 0.2


def test_sleep_drops_power_to_sleep_level_and_hands_every_ue_to_the_co_site_cells():
    cell = 1  # a capacity cell of a 3-cell site
    a, b, r = with_and_without("cell_sleep", cell, 1.0)
    k, k0 = a.kpis, b.kpis
    assert np.allclose(k["PEE.AvgPower"][r, cell], P.psleep_w)
    assert (k["RRC.ConnMean"][r, cell] == 0).all()
    nb = co_site(cell)
    # expected UEs (before the Poisson noise) are conserved within the site
    exp_a = Simulator(EV_TOPO, EventTable.build([KIND_INDEX["cell_sleep"]], [cell], [100.0], [300.0], [1.0]), CFG)
    exp_b = Simulator(EV_TOPO, EventTable.empty(), CFG)
    from sims.events import effects
    from sims.kpis import ues_after_events

    t = np.arange(60) * DT
    ma, _, _ = ues_after_events(exp_a.traffic.expected_ues(t), effects(exp_a.events, t, DT, EV_TOPO.n_cells), exp_a.static)
    mb = exp_b.traffic.expected_ues(t)
    site_cells = np.r_[nb, cell]
    assert np.allclose(ma[r][:, site_cells].sum(1), mb[r][:, site_cells].sum(1), rtol=1e-4)
    assert (k["RRU.PrbTotDl"][r][:, nb].mean() > k0["RRU.PrbTotDl"][r][:, nb].mean())


def test_event_kinds_are_all_covered_by_these_tests():
    assert set(EVENT_KINDS) == {"cell_outage", "interference", "congestion", "ho_failure_storm", "cell_sleep",
                                "flash_crowd"}
