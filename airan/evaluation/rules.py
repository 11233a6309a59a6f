"""Baseline (a): the KPI-threshold detector an engineer would write without a model.

A pure function of the same KPI context the model gets. It looks at the cell
in question (the one the request names, else the one with the widest KPI
set), compares its latest interval with the earlier half of the window and
walks a fixed rule order: cell off (sleep if the radio still draws sleep
power, else outage), handover failures, radio quality, load surge (flash
crowd if UEs were already ramping up, else congestion), else NORMAL.
Thresholds are tuned by grid search on the development set only.
"""
from __future__ import annotations

import itertools
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from airan.core.causes import CAUSES
from airan.evaluation.dataset import EvalItem, KpiRow
from airan.evaluation.metrics import Prediction, macro_f1

# the causes these rules can tell, named by the cause table (a renamed or removed row fails here, at import);
# a cause without a rule here (e.g. a new event kind) is one the baseline never predicts
NORMAL, OUTAGE, SLEEP, HO_STORM, INTERFERENCE, CONGESTION, FLASH_CROWD = (
    CAUSES[n].name
    for n in ("NORMAL", "CELL_OUTAGE", "CELL_SLEEP", "HO_FAILURE_STORM", "INTERFERENCE", "CONGESTION", "FLASH_CROWD")
)
RULE_CAUSES: tuple[str, ...] = (NORMAL, OUTAGE, SLEEP, HO_STORM, INTERFERENCE, CONGESTION, FLASH_CROWD)


@dataclass(frozen=True)
class RuleThresholds:
    off_conn_frac: float = 0.3  # UEs fall below this share of before: the cell went off
    sleep_power_w: float = 10.0  # an off cell still drawing this much is asleep, not down
    ho_fail_ratio: float = 0.2  # MM.HoExeInterFail / MM.HoExeInterReq (sims' anomaly trigger)
    ho_fail_min: float = 5.0
    sinr_drop_db: float = 3.0
    bler_pct: float = 25.0  # sims' anomaly trigger
    surge_ratio: float = 1.6  # RRC.ConnMean now / before
    ramp_ratio: float = 1.3  # UEs already rising between the first two intervals: a flash crowd


# bounded grid (about 10k points, pure arithmetic on cached features: a few seconds)
GRID: dict[str, tuple[float, ...]] = {
    "off_conn_frac": (0.2, 0.4),
    "sleep_power_w": (5.0, 10.0, 15.0),
    "ho_fail_ratio": (0.1, 0.2, 0.3),
    "ho_fail_min": (3.0, 5.0, 8.0),
    "sinr_drop_db": (2.0, 3.0, 5.0),
    "bler_pct": (15.0, 20.0, 25.0, 30.0),
    "surge_ratio": (1.3, 1.6, 2.0, 2.5),
    "ramp_ratio": (1.1, 1.2, 1.35, 1.5, float("inf")),
}


@dataclass(frozen=True)
class CellFeatures:
    """What the rules read off one cell's KPI rows (None: not in the context)."""

    cell: str
    conn_first: float | None
    conn_second: float | None
    conn_before: float | None  # mean over the earlier half of the window
    conn_now: float | None  # the latest interval
    prb_avail_now: float | None
    power_now: float | None
    sinr_before: float | None
    sinr_now: float | None
    bler_now: float | None
    ho_req_now: float | None
    ho_fail_now: float | None


def focus_cell(kpis: Sequence[KpiRow], cell_ids: Sequence[str]) -> str:
    """The cell the question is about: the named one, else the one with the most KPI names."""
    names: dict[str, set[str]] = defaultdict(set)
    for k in kpis:
        names[k.cell_id].add(k.name)
    for c in cell_ids:
        if c in names:
            return c
    if not names:
        return cell_ids[0] if cell_ids else ""
    return min(names, key=lambda c: (-len(names[c]), c))


def features(kpis: Sequence[KpiRow], cell: str) -> CellFeatures:
    times = sorted({k.time_s for k in kpis if k.cell_id == cell})
    by: dict[str, dict[float, float]] = defaultdict(dict)
    for k in kpis:
        if k.cell_id == cell:
            by[k.name][k.time_s] = k.value
    early = times[: max(1, len(times) // 2)]
    latest = times[-1] if times else None

    def at(name: str, t: float | None) -> float | None:
        return by[name].get(t) if t is not None else None

    def mean_before(name: str) -> float | None:
        vals = [by[name][t] for t in early if t in by[name]]
        return sum(vals) / len(vals) if vals else None

    return CellFeatures(
        cell=cell,
        conn_first=at("RRC.ConnMean", times[0] if times else None),
        conn_second=at("RRC.ConnMean", times[1] if len(times) > 1 else None),
        conn_before=mean_before("RRC.ConnMean"),
        conn_now=at("RRC.ConnMean", latest),
        prb_avail_now=at("RRU.PrbAvailDl", latest),
        power_now=at("PEE.AvgPower", latest),
        sinr_before=mean_before("L1M.SS-SINR"),
        sinr_now=at("L1M.SS-SINR", latest),
        bler_now=at("TB.BlerDl", latest),
        ho_req_now=at("MM.HoExeInterReq", latest),
        ho_fail_now=at("MM.HoExeInterFail", latest),
    )


def classify(f: CellFeatures, th: RuleThresholds) -> str:
    went_off = (f.prb_avail_now is not None and f.prb_avail_now <= 0) or (
        f.conn_before is not None and f.conn_now is not None and f.conn_before >= 1.0
        and f.conn_now < th.off_conn_frac * f.conn_before
    )
    if went_off:
        return SLEEP if f.power_now is not None and f.power_now >= th.sleep_power_w else OUTAGE
    ho_fail = f.ho_fail_now or 0.0
    if ho_fail >= th.ho_fail_min and ho_fail / max(f.ho_req_now or 0.0, 1.0) >= th.ho_fail_ratio:
        return HO_STORM
    if f.sinr_now is not None and f.sinr_before is not None and f.sinr_before - f.sinr_now >= th.sinr_drop_db:
        return INTERFERENCE
    if f.bler_now is not None and f.bler_now >= th.bler_pct:
        return INTERFERENCE
    if f.conn_now is not None and f.conn_before and f.conn_now / f.conn_before >= th.surge_ratio:
        ramping = f.conn_first and f.conn_second is not None and f.conn_second / f.conn_first >= th.ramp_ratio
        return FLASH_CROWD if ramping else CONGESTION
    return NORMAL


def rule_diagnose(kpis: Sequence[KpiRow], cell_ids: Sequence[str], th: RuleThresholds) -> tuple[str, tuple[str, ...]]:
    """(cause, affected cells) from the KPI context alone."""
    cell = focus_cell(kpis, cell_ids)
    cause = classify(features(kpis, cell), th)
    return cause, (() if cause == NORMAL or not cell else (cell,))


def predict(items: Sequence[EvalItem], th: RuleThresholds) -> list[Prediction]:
    out = []
    for item in items:
        t0 = time.perf_counter()
        cause, cells = rule_diagnose(item.kpis, item.cell_ids, th)
        out.append(Prediction(item.item_id, cause, cells, latency_ms=1000 * (time.perf_counter() - t0)))
    return out


def tune(dev: Sequence[EvalItem], grid: dict[str, tuple[float, ...]] = GRID) -> tuple[RuleThresholds, float]:
    """The grid point with the best dev macro-F1 (first in grid order on ties), and that score."""
    if not dev:
        raise ValueError("tuning needs a non-empty development set")
    unknown = set(grid) - {f.name for f in fields(RuleThresholds)}
    if unknown:
        raise ValueError(f"unknown threshold(s): {', '.join(sorted(unknown))}")
    feats = [features(i.kpis, focus_cell(i.kpis, i.cell_ids)) for i in dev]
    gold = [i.label for i in dev]
    names = list(grid)
    best, best_score = RuleThresholds(), -1.0
    for values in itertools.product(*(grid[n] for n in names)):  # bounded by the grid's size
        th = replace(RuleThresholds(), **dict(zip(names, values)))
        score = macro_f1(gold, [classify(f, th) for f in feats])
        if score > best_score:
            best, best_score = th, score
    return best, best_score
