"""Cell KPIs per interval, named as O-RAN E2SM-KPM / 3GPP TS 28.552 counters.

The radio model, array-wide over (intervals, cells), float32:

- connected UEs: an M/M/inf occupancy around the expected count, so the
  interval mean is Poisson-like with variance shrinking for long intervals;
- SINR = cell geometry - interference rise from the site's load - events;
  spectral efficiency from a derated Shannon bound, BLER rises at low SINR;
- capacity = PRBs x PRB bandwidth x efficiency x (1 - BLER) x TDD duty;
- load rho = offered / capacity; PRB use = min(rho + control overhead, 1)
  x available PRBs, so it saturates at 100 %;
- per-UE throughput from processor sharing: capacity x (1 - rho), floored at
  an equal share among backlogged UEs once saturated, so it falls as load
  or interference rise; RLC delay grows like 1 / (1 - rho);
- handovers scale with connected UEs x mobility of the area, storms add
  ping-pong attempts and failures;
- power: idle + load-dependent part (EARTH model shape), sleep power when asleep.

Quality KPIs (throughput, delay, BLER, SINR, CQI) are NaN for an interval in
which the cell was off the whole time: no UE reported them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sims.events import OUTAGE_ABSORBED, Effects
from sims.topology import SiteSum, Topology
from sims.traffic import MOBILITY_PER_UE_S, PER_UE_DL_KBPS, UL_TO_DL


@dataclass(frozen=True)
class Kpi:
    name: str
    unit: str
    description: str


KPIS: tuple[Kpi, ...] = (
    Kpi("RRC.ConnMean", "UEs", "mean RRC-connected UEs"),
    Kpi("RRC.ConnMax", "UEs", "max RRC-connected UEs"),
    Kpi("DRB.MeanActiveUeDl", "UEs", "mean UEs with DL data buffered"),
    Kpi("RRU.PrbAvailDl", "PRBs", "DL PRBs available (0 while the cell is off)"),
    Kpi("RRU.PrbUsedDl", "PRBs", "mean DL PRBs used"),
    Kpi("RRU.PrbTotDl", "%", "DL PRB utilisation"),
    Kpi("RRU.PrbAvailUl", "PRBs", "UL PRBs available"),
    Kpi("RRU.PrbUsedUl", "PRBs", "mean UL PRBs used"),
    Kpi("RRU.PrbTotUl", "%", "UL PRB utilisation"),
    Kpi("DRB.UEThpDl", "kbit/s", "mean DL UE throughput while active"),
    Kpi("DRB.UEThpUl", "kbit/s", "mean UL UE throughput while active"),
    Kpi("DRB.RlcSduDelayDl", "us", "mean DL RLC SDU delay (us, as OAI reports it)"),
    Kpi("TB.BlerDl", "%", "DL BLER = TB.ErrTotalNbrDl / TB.TotNbrDl"),
    Kpi("L1M.SS-SINR", "dB", "mean SS-SINR reported by UEs"),
    Kpi("CARR.WBCQIMean", "CQI", "mean wideband CQI (mean of CARR.WBCQIDist)"),
    Kpi("MM.HoExeInterReq", "count", "outgoing handover executions attempted"),
    Kpi("MM.HoExeInterSucc", "count", "outgoing handover executions succeeded"),
    Kpi("MM.HoExeInterFail", "count", "outgoing handover executions failed"),
    Kpi("PEE.AvgPower", "W", "mean radio unit power"),
)
KPI_NAMES: tuple[str, ...] = tuple(k.name for k in KPIS)
KPI_UNITS: dict[str, str] = {k.name: k.unit for k in KPIS}


@dataclass(frozen=True)
class RadioParams:
    dl_duty: float = 0.7  # TDD share of slots for DL
    ul_duty: float = 0.25
    impl_loss: float = 0.75  # fraction of the Shannon bound a real link reaches
    se_cap: float = 5.5  # bit/s/Hz, 256QAM with coding and overheads
    ul_se_factor: float = 0.6  # UL is power-limited
    iot_gain: float = 2.5  # interference rise at full neighbourhood load: 10 log10(1 + gain) dB
    ctrl_overhead: float = 0.02  # PRB share for control/broadcast while UEs are connected
    backlog_active_share: float = 0.5  # share of connected UEs with data queued once saturated
    base_delay_us: float = 1500.0
    max_delay_us: float = 5e6
    p0_w: float = 130.0
    pdyn_w: float = 220.0
    psleep_w: float = 20.0
    ho_fail_base: float = 0.01
    holding_s: float = 90.0  # RRC-connected time per UE session


_DB_TO_LN = np.float32(np.log(10.0) / 10.0)  # 10^(x/10) = exp(x * ln10/10); exp is ~4x faster than power


def _avg_var_factor(dt: float, holding_s: float) -> float:
    """Variance of an M/M/inf occupancy averaged over dt, relative to its mean."""
    x = dt / holding_s
    return float(2.0 / x * (1.0 - (1.0 - np.exp(-x)) / x)) if x > 1e-6 else 1.0


@dataclass(frozen=True, eq=False)
class CellStatic:
    """Per-cell constants the hot path broadcasts against, as (1, C) float32 rows."""

    prb: np.ndarray
    prb_khz: np.ndarray
    base_sinr_db: np.ndarray
    dl_kbps_per_ue: np.ndarray
    ul_kbps_per_ue: np.ndarray
    mobility: np.ndarray
    cell_site: np.ndarray  # (C,)
    cells_per_site: np.ndarray  # (S,) float32
    site_sum: SiteSum

    @staticmethod
    def of(topology: Topology) -> CellStatic:
        row = lambda a: np.asarray(a, dtype=np.float32)[None, :]  # noqa: E731
        dl = PER_UE_DL_KBPS[topology.cell_area]
        return CellStatic(
            prb=row(topology.cell_prb),
            prb_khz=row(topology.cell_prb_khz),
            base_sinr_db=row(topology.cell_base_sinr_db),
            dl_kbps_per_ue=row(dl),
            ul_kbps_per_ue=row(dl * UL_TO_DL),
            mobility=row(MOBILITY_PER_UE_S[topology.cell_area]),
            cell_site=topology.cell_site,
            cells_per_site=topology.cells_per_site.astype(np.float32),
            site_sum=topology.site_sum,
        )


def site_mean(x: np.ndarray, st: CellStatic) -> np.ndarray:
    """(T, C) -> (T, C): each cell gets the mean over its site's cells."""
    return (st.site_sum(x) / st.cells_per_site)[:, st.cell_site]


def ues_after_events(
    expected: np.ndarray, fx: Effects, st: CellStatic
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Apply demand surges and move UEs off cells that are down or asleep.

    Returns (expected UEs, availability 0..1 or None = all up, sleep share or None). A cell off
    for part of an interval keeps its UEs for the rest; the UEs of the off
    part go to the other cells of its site in proportion to their
    availability (all of them for sleep, `OUTAGE_ABSORBED` for outages); a
    site with no other cell up loses them.
    """
    m = expected if fx.demand_mult is None else expected * fx.demand_mult
    if fx.outage is None and fx.sleep is None:
        return m, None, None
    outage = fx.outage if fx.outage is not None else np.zeros_like(m)
    sleep = fx.sleep if fx.sleep is not None else np.zeros_like(m)
    off = np.maximum(outage, sleep)
    avail = 1.0 - off
    absorbed = np.where(sleep >= outage, 1.0, OUTAGE_ABSORBED).astype(np.float32)
    moved = m * off * absorbed
    site_avail = st.site_sum(avail)[:, st.cell_site]
    other_avail = site_avail - avail
    # w_j = moved_j / (availability of the site's other cells); cell c gets avail_c * sum_{j != c} w_j
    w = np.divide(moved, other_avail, out=np.zeros_like(moved), where=other_avail > 1e-6)
    site_w = st.site_sum(w)[:, st.cell_site]
    received = avail * (site_w - w)
    return (m * avail + received).astype(np.float32), avail.astype(np.float32), fx.sleep


def radio_kpis(
    m: np.ndarray,
    st: CellStatic,
    dt: float,
    *,
    z_ue: np.ndarray,
    z_sinr: np.ndarray,
    z_ho: np.ndarray,
    avail: np.ndarray | None = None,
    sleep: np.ndarray | None = None,
    sinr_delta_db: np.ndarray | None = None,
    ho_storm: np.ndarray | None = None,
    p: RadioParams = RadioParams(),
) -> dict[str, np.ndarray]:
    """KPIs for (T, C) expected UEs `m`; z_* are unit-variance noise of the same shape."""
    f32 = np.float32
    g = _avg_var_factor(dt, p.holding_s)
    on = None if avail is None else avail > 0
    ues = m + np.sqrt(m) * z_ue * f32(np.sqrt(g))
    np.maximum(ues, 0.0, out=ues)
    if avail is not None:
        ues *= avail  # a cell down all interval has no UEs, whatever the noise
    a_dl = ues * st.dl_kbps_per_ue  # offered kbit/s
    a_ul = ues * st.ul_kbps_per_ue
    prb_avail = st.prb if avail is None else st.prb * avail
    bw_khz = prb_avail * st.prb_khz  # kHz of spectrum in use

    # SINR: interference rise from the site's unsaturated load (neighbour cells interfere)
    sinr0 = st.base_sinr_db if sinr_delta_db is None else st.base_sinr_db + sinr_delta_db
    se0 = np.minimum(f32(p.impl_loss) * np.log2(1.0 + np.exp(sinr0 * _DB_TO_LN)), f32(p.se_cap))
    rho0 = np.minimum(np.divide(a_dl, bw_khz * se0 * f32(p.dl_duty) + f32(1e-3)), 1.0)
    iot_db = f32(10.0) * np.log10(1.0 + f32(p.iot_gain) * site_mean(rho0, st))
    sinr = sinr0 - iot_db + f32(0.5) * z_sinr
    se = np.minimum(f32(p.impl_loss) * np.log2(1.0 + np.exp(sinr * _DB_TO_LN)), f32(p.se_cap))
    bler = f32(0.08) + f32(0.42) / (1.0 + np.exp((sinr - f32(2.0)) * f32(1.0 / 1.5)))
    good = 1.0 - bler
    cap_dl = bw_khz * se * good * f32(p.dl_duty) + f32(1e-3)  # kbit/s; epsilon keeps rho finite when off
    cap_ul = bw_khz * se * good * f32(p.ul_duty * p.ul_se_factor) + f32(1e-3)
    rho_dl = a_dl / cap_dl
    rho_ul = a_ul / cap_ul
    has_ues = (ues > 0.05).astype(np.float32)
    util_dl = np.minimum(rho_dl + f32(p.ctrl_overhead) * has_ues, 1.0)
    util_ul = np.minimum(rho_ul + f32(p.ctrl_overhead) * has_ues, 1.0)

    # processor sharing: flows in the cell rho/(1-rho); backlogged share of UEs once saturated
    rc = np.minimum(rho_dl, f32(0.98))
    backlog = ues * f32(p.backlog_active_share)
    active = np.minimum(rc / (1.0 - rc), ues)
    floor_share = 1.0 / np.maximum(backlog, 1.0)
    thp_dl = cap_dl * np.maximum(1.0 - rho_dl, floor_share) * has_ues
    thp_ul = cap_ul * np.maximum(1.0 - rho_ul, floor_share) * has_ues
    delay = f32(p.base_delay_us) * (1.0 + bler) / (1.0 - np.minimum(rho_dl, f32(0.99)))
    delay *= 1.0 + f32(10.0) * np.maximum(rho_dl - 1.0, 0.0)  # backlog grows once saturated
    np.minimum(delay, f32(p.max_delay_us), out=delay)
    delay *= has_ues

    # handovers: Poisson attempts (normal approximation), storms add ping-pong and failures
    lam = ues * st.mobility * f32(dt)
    p_fail = f32(p.ho_fail_base) + f32(0.25) / (1.0 + np.exp(sinr + f32(2.0)))
    if ho_storm is not None:
        lam = lam * (1.0 + f32(4.0) * ho_storm)
        p_fail = np.minimum(p_fail + f32(0.6) * ho_storm, f32(0.95))
    ho_req = np.rint(np.maximum(lam + np.sqrt(lam) * z_ho, 0.0))
    ho_succ = np.rint(ho_req * (1.0 - p_fail))

    power_on = f32(p.p0_w) + f32(p.pdyn_w) * util_dl
    if avail is not None:
        power_on *= avail
        if sleep is not None:
            power_on += f32(p.psleep_w) * sleep
    cqi = np.clip(f32(1.0) + (sinr + f32(6.0)) * f32(14.0 / 26.0), 1.0, 15.0)
    if on is not None and not on.all():  # no UE reports while the cell was off the whole interval
        gate = np.where(on, f32(1.0), f32(np.nan))  # x * gate: NaN where off; one masked pass, not six
        sinr = sinr * gate
        cqi = cqi * gate
        bler = bler * gate
        thp_dl = thp_dl * gate
        thp_ul = thp_ul * gate
        delay = delay * gate
    prb_full = np.broadcast_to(prb_avail, ues.shape)
    return {
        "RRC.ConnMean": ues,
        "RRC.ConnMax": np.ceil(ues + f32(2.5 * np.sqrt(max(1.0 - g, 0.0)) + 0.5) * np.sqrt(ues)),
        "DRB.MeanActiveUeDl": active,
        "RRU.PrbAvailDl": prb_full,
        "RRU.PrbUsedDl": util_dl * prb_avail,
        "RRU.PrbTotDl": util_dl * f32(100.0),
        "RRU.PrbAvailUl": prb_full,
        "RRU.PrbUsedUl": util_ul * prb_avail,
        "RRU.PrbTotUl": util_ul * f32(100.0),
        "DRB.UEThpDl": thp_dl,
        "DRB.UEThpUl": thp_ul,
        "DRB.RlcSduDelayDl": delay,
        "TB.BlerDl": bler * f32(100.0),
        "L1M.SS-SINR": sinr,
        "CARR.WBCQIMean": cqi,
        "MM.HoExeInterReq": ho_req,
        "MM.HoExeInterSucc": ho_succ,
        "MM.HoExeInterFail": ho_req - ho_succ,
        "PEE.AvgPower": power_on,
    }
