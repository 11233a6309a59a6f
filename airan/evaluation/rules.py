"""Baseline: the KPI-threshold rules an engineer would write without a model.

A pure function of the same KPI context the model gets, read through
`airan.core.evidence` (each KPI's latest finite sample against the median of
the earlier ones; NaN = not reported). Every cell the question is about (the
asked cells, else all cells of the context) walks a fixed rule order: cell
off (sleep if the radio still draws sleep power, else outage), handover
failures, radio quality, load surge (flash crowd if UEs were already ramping
up before the latest sample, else congestion), else NORMAL. The answer is the most anomalous of those
cells (an earlier rule beats a later one, a larger excess breaks ties); the
affected cells are the context cells whose own rule gives the same cause.
The answer cites the KPIs its rule fired on. Thresholds are tuned by grid
search on the development set only.

The rules run on column arrays, one row per cell, so the same code answers one
request and scores ~27k threshold points on a development set in seconds.
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np

from airan.core.causes import CAUSES
from airan.core.diagnosis import playbook_diagnosis
from airan.core.evidence import Evidence, compute_evidence
from airan.core.query import KpiSample
from airan.evaluation.metrics import Prediction, codes, macro_f1_codes

# the causes these rules can tell, named by the cause table (a renamed or removed row fails here, at import);
# a cause without a rule here (e.g. a new event kind) is one the baseline never predicts
NORMAL, OUTAGE, SLEEP, HO_STORM, INTERFERENCE, CONGESTION, FLASH_CROWD = (
    CAUSES[n].name
    for n in ("NORMAL", "CELL_OUTAGE", "CELL_SLEEP", "HO_FAILURE_STORM", "INTERFERENCE", "CONGESTION", "FLASH_CROWD")
)
RULE_CAUSES: tuple[str, ...] = (NORMAL, OUTAGE, SLEEP, HO_STORM, INTERFERENCE, CONGESTION, FLASH_CROWD)
_CODE = {c: i for i, c in enumerate(RULE_CAUSES)}


@dataclass(frozen=True)
class RuleThresholds:
    off_conn_frac: float = 0.3  # UEs fall below this share of before: the cell went off
    sleep_power_w: float = 10.0  # an off cell still drawing this much is asleep, not down
    ho_fail_ratio: float = 0.2  # MM.HoExeInterFail / MM.HoExeInterReq (sims' anomaly trigger)
    ho_fail_min: float = 5.0
    sinr_drop_db: float = 3.0
    bler_pct: float = 25.0  # sims' anomaly trigger
    surge_ratio: float = 1.6  # RRC.ConnMean now / before
    ramp_ratio: float = 1.3  # UEs already rising before the latest sample: a flash crowd


# bounded grid (27,648 points, vectorised over the development cells: a few seconds)
GRID: dict[str, tuple[float, ...]] = {
    "off_conn_frac": (0.2, 0.35, 0.5),
    "sleep_power_w": (5.0, 10.0, 15.0),
    "ho_fail_ratio": (0.1, 0.15, 0.2, 0.3),
    "ho_fail_min": (1.0, 3.0, 6.0),
    "sinr_drop_db": (2.0, 3.0, 4.0, 6.0),
    "bler_pct": (15.0, 20.0, 30.0, float("inf")),
    "surge_ratio": (1.1, 1.2, 1.4, 1.7),
    "ramp_ratio": (1.1, 1.2, 1.35, float("inf")),
}

# what the rules read off one cell's evidence (NaN: the context does not have it)
FEATURES: tuple[str, ...] = (
    "conn_before", "conn_ratio", "conn_ramp", "prb_avail_now", "power_now", "sinr_change", "bler_now",
    "ho_fail_ratio", "ho_fail_now", "silent",
)  # fmt: skip


def _ratio(change: float | None) -> float:
    return math.nan if change is None else 1.0 + change


def _v(x: float | None) -> float:
    return math.nan if x is None else float(x)


def cell_features(evidence: Evidence, cell: str) -> dict[str, float]:
    m = {mv.kpi: mv for mv in evidence.movements if mv.cell == cell}
    conn = m.get("RRC.ConnMean")
    flags = evidence.flags.get(cell)
    return {
        "conn_before": _v(conn.before) if conn else math.nan,
        "conn_ratio": _ratio(conn.change) if conn else math.nan,
        "conn_ramp": _ratio(conn.drift) if conn else math.nan,  # first sample -> the one before the latest
        "prb_avail_now": _v(m["RRU.PrbAvailDl"].now) if "RRU.PrbAvailDl" in m else math.nan,
        "power_now": _v(m["PEE.AvgPower"].now) if "PEE.AvgPower" in m else math.nan,
        "sinr_change": _v(m["L1M.SS-SINR"].change) if "L1M.SS-SINR" in m else math.nan,  # dB
        "bler_now": _v(m["TB.BlerDl"].now) if "TB.BlerDl" in m else math.nan,
        "ho_fail_ratio": _v(flags.ho_fail_ratio) if flags else math.nan,
        "ho_fail_now": _v(m["MM.HoExeInterFail"].now) if "MM.HoExeInterFail" in m else math.nan,
        "silent": float(bool(flags and flags.silent)),
    }


@dataclass(frozen=True)
class CellTable:
    """Rule features of the cells of many requests: one row per (request, cell)."""

    cells: tuple[str, ...]  # row -> cell id
    item: np.ndarray  # row -> request index
    candidate: np.ndarray  # row is a cell the question is about
    columns: dict[str, np.ndarray]
    n_items: int

    @staticmethod
    def build(contexts: Sequence[tuple[Evidence, Sequence[str]]]) -> CellTable:
        """From (evidence, asked cells) per request: the asked cells present in the evidence are the
        candidates, else every cell of the context."""
        cells, item, candidate, rows = [], [], [], []
        for k, (evidence, asked) in enumerate(contexts):
            named = [c for c in asked if c in evidence.cells]
            for cell in evidence.cells:
                cells.append(cell)
                item.append(k)
                candidate.append(cell in named if named else True)
                rows.append(cell_features(evidence, cell))
        columns = {f: np.array([r[f] for r in rows], dtype=np.float64) for f in FEATURES}
        return CellTable(tuple(cells), np.array(item, dtype=np.int64), np.array(candidate, dtype=bool), columns,
                         len(contexts))  # fmt: skip


def classify(t: CellTable, th: RuleThresholds) -> tuple[np.ndarray, np.ndarray]:
    """(cause code into RULE_CAUSES, anomaly score) per row; a comparison with NaN is False."""
    f = t.columns
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = f["conn_ratio"]
        dropped = (f["conn_before"] >= 1.0) & (ratio < th.off_conn_frac)
        off = (f["silent"] > 0) | (f["prb_avail_now"] <= 0) | dropped
        asleep = f["power_now"] >= th.sleep_power_w
        ho = (f["ho_fail_now"] >= th.ho_fail_min) & (f["ho_fail_ratio"] >= th.ho_fail_ratio)
        sinr = -f["sinr_change"] >= th.sinr_drop_db
        bler = f["bler_now"] >= th.bler_pct
        surge = (f["conn_before"] >= 1.0) & (ratio >= th.surge_ratio)
        ramp = f["conn_ramp"] >= th.ramp_ratio
        cause = np.select(
            [off & asleep, off, ho, sinr | bler, surge & ramp, surge],
            [_CODE[SLEEP], _CODE[OUTAGE], _CODE[HO_STORM], _CODE[INTERFERENCE], _CODE[FLASH_CROWD], _CODE[CONGESTION]],
            _CODE[NORMAL],
        )
        # most anomalous: the rule's rank, then how far past its threshold (squashed into [0, 1))
        excess = np.select(
            [off, ho, sinr | bler, surge],
            [np.where(f["silent"] > 0, 1.0, 1.0 - ratio), f["ho_fail_ratio"],
             np.fmax(-f["sinr_change"] / th.sinr_drop_db, f["bler_now"] / th.bler_pct), ratio / th.surge_ratio],
            0.0,
        )  # fmt: skip
        excess = np.clip(np.nan_to_num(excess, nan=0.0, posinf=1e6), 0.0, 1e6)
        rank = np.select([off, ho, sinr | bler, surge], [4.0, 3.0, 2.0, 1.0], 0.0)
    return cause, rank + excess / (1.0 + excess)


def decide(t: CellTable, score: np.ndarray) -> np.ndarray:
    """The deciding row of each request (-1: a request without cells): its most anomalous candidate."""
    chosen = np.full(t.n_items, -1, dtype=np.int64)
    rows = np.flatnonzero(t.candidate)
    if rows.size:
        order = rows[np.lexsort((-score[rows], t.item[rows]))]  # by request, then score (stable on ties)
        first = np.r_[True, t.item[order][1:] != t.item[order][:-1]]
        chosen[t.item[order][first]] = order[first]
    return chosen


def citations(row: dict[str, float], cause: str, th: RuleThresholds) -> tuple[str, ...]:
    """The KPIs the rule for `cause` fired on (in the deciding cell)."""
    if cause in (OUTAGE, SLEEP):
        out = []
        if row["silent"] or (row["conn_before"] >= 1.0 and row["conn_ratio"] < th.off_conn_frac):
            out.append("RRC.ConnMean")
        if row["prb_avail_now"] <= 0:
            out.append("RRU.PrbAvailDl")
        if not math.isnan(row["power_now"]):
            out.append("PEE.AvgPower")
        return tuple(out)
    if cause == HO_STORM:
        return ("MM.HoExeInterFail",)
    if cause == INTERFERENCE:
        return tuple(k for k, hit in (("L1M.SS-SINR", -row["sinr_change"] >= th.sinr_drop_db),
                                      ("TB.BlerDl", row["bler_now"] >= th.bler_pct)) if hit)  # fmt: skip
    if cause in (CONGESTION, FLASH_CROWD):
        return ("RRC.ConnMean",)
    return ()


def answer(t: CellTable, th: RuleThresholds) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """(cause, affected cells, cited KPIs) per request of the table."""
    cause, score = classify(t, th)
    chosen = decide(t, score)
    out = []
    for k, row in enumerate(chosen):
        if row < 0:
            out.append((NORMAL, (), ()))
            continue
        c = RULE_CAUSES[cause[row]]
        if c == NORMAL:
            out.append((NORMAL, (), ()))
            continue
        same = [t.cells[r] for r in np.flatnonzero((t.item == k) & (cause == cause[row])) if r != row]
        features = {f: float(t.columns[f][row]) for f in FEATURES}
        out.append((c, (t.cells[row], *sorted(same)), citations(features, c, th)))
    return out


def evidence_of(kpis) -> Evidence:
    """The evidence the server computes from a request's KPI rows (KpiRow or KpiSample-like)."""
    return compute_evidence(KpiSample(k.name, k.value, k.unit, k.cell_id, k.time_s) for k in kpis)


def rule_diagnose(evidence: Evidence, asked_cells: Sequence[str], th: RuleThresholds):
    """(cause, affected cells, cited KPIs) for one request."""
    return answer(CellTable.build([(evidence, asked_cells)]), th)[0]


def predict(items, th: RuleThresholds, evidences: Sequence[Evidence] | None = None) -> list[Prediction]:
    """Rule answers for EvalItems; latency is the compute time (evidence included unless given)."""
    out = []
    for k, item in enumerate(items):
        t0 = time.perf_counter()
        evidence = evidences[k] if evidences is not None else evidence_of(item.kpis)
        cause, cells, cited = rule_diagnose(evidence, item.cell_ids, th)
        first = playbook_diagnosis(cause, cells, 1.0).actions[0]  # severity and action as the server's
        out.append(Prediction(
            item.item_id, cause, cells, latency_ms=1000 * (time.perf_counter() - t0), cited_kpis=cited,
            action=first.type, action_value=first.value,
        ))  # fmt: skip
    return out


def tune(dev, grid: dict[str, tuple[float, ...]] = GRID) -> tuple[RuleThresholds, float]:
    """The grid point with the best dev macro-F1 (first in grid order on ties), and that score."""
    if not dev:
        raise ValueError("tuning needs a non-empty development set")
    unknown = set(grid) - {f.name for f in fields(RuleThresholds)}
    if unknown:
        raise ValueError(f"unknown threshold(s): {', '.join(sorted(unknown))}")
    t = CellTable.build([(evidence_of(i.kpis), i.cell_ids) for i in dev])
    gold = codes([i.label for i in dev])
    as_predicted = codes(RULE_CAUSES)  # rule code -> code in the scoring vocabulary
    names = list(grid)
    best, best_score = RuleThresholds(), -1.0
    for values in itertools.product(*(grid[n] for n in names)):  # bounded by the grid's size
        th = replace(RuleThresholds(), **dict(zip(names, values)))
        cause, score = classify(t, th)
        chosen = decide(t, score)
        pred = np.where(chosen >= 0, as_predicted[cause[np.maximum(chosen, 0)]], as_predicted[_CODE[NORMAL]])
        f1 = float(macro_f1_codes(gold, pred))
        if f1 > best_score:
            best, best_score = th, f1
    return best, best_score
