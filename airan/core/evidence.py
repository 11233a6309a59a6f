"""KPI evidence: what moved, per cell and KPI, from a request's KPI context (pure numpy).

A controller sends E2SM-KPM samples of a few cells over a few intervals. This
module turns them into what an engineer reads first: each KPI's change
against the cell's own earlier samples and against its co-site cells, its
trend, physical flags (PRB saturation, BLER above target, handover failure
ratio, a cell that stopped reporting), ranked by salience and written in
human units (`DRB.UEThpDl 16.6 → 7.1 Mbit/s (−57%)`), never in scientific
notation. A missing or non-finite sample is data, not an error.

The same numbers feed the fast detector as a fixed-length feature vector per
cell (`cell_features`), so the detector and the language model see one truth.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from airan.core.query import KpiSample

# KPIs the evidence knows how to read; others are rendered but not featurised
KNOWN_KPIS: tuple[str, ...] = (
    "RRC.ConnMean", "RRC.ConnMax", "DRB.MeanActiveUeDl", "RRU.PrbAvailDl", "RRU.PrbUsedDl", "RRU.PrbTotDl",
    "RRU.PrbAvailUl", "RRU.PrbUsedUl", "RRU.PrbTotUl", "DRB.UEThpDl", "DRB.UEThpUl", "DRB.RlcSduDelayDl",
    "TB.BlerDl", "L1M.SS-SINR", "CARR.WBCQIMean", "MM.HoExeInterReq", "MM.HoExeInterSucc", "MM.HoExeInterFail",
    "PEE.AvgPower",
)  # fmt: skip
# KPIs on an absolute scale: their change is a difference (dB, points), not a ratio
_ABSOLUTE = {"RRU.PrbTotDl": 10.0, "RRU.PrbTotUl": 10.0, "TB.BlerDl": 5.0, "L1M.SS-SINR": 3.0, "CARR.WBCQIMean": 1.5}
_RELATIVE_SCALE = 0.3  # a 30 % move of a count or rate is one unit of salience
MAX_RELATIVE_CHANGE = 10.0
PRB_SATURATED_PCT = 90.0
BLER_TARGET_PCT = 10.0  # the usual initial-BLER target of link adaptation
HO_FAIL_RATIO = 0.1
HO_MIN_ATTEMPTS = 5.0


@dataclass(frozen=True)
class Movement:
    """One KPI of one cell over the window."""

    cell: str
    kpi: str
    unit: str
    before: float | None  # median of the earlier finite samples
    now: float | None  # the latest finite sample
    change: float | None  # now - before (absolute KPIs) or (now - before) / |before| (the rest)
    vs_site: float | None  # the same, now against the median of co-site cells' now
    trend: int  # +1 rising, -1 falling, 0 flat or unknown (over the finite samples)
    missing_since: float | None  # time (or sample index) of the first of the trailing missing samples
    n_samples: int
    step: float | None = None  # the last move: now against the sample before it
    drift: float | None = None  # before the last move: that sample against the first

    @property
    def absolute(self) -> bool:
        return self.kpi in _ABSOLUTE

    @property
    def salience(self) -> float:
        if self.missing_since is not None:
            return 3.0  # a cell or KPI that went silent
        scale = _ABSOLUTE.get(self.kpi, _RELATIVE_SCALE)
        own = abs(self.change) / scale if self.change is not None else 0.0
        if not self.absolute:  # cells differ in size: a count or rate says little against co-site cells
            return own
        site = abs(self.vs_site) / scale if self.vs_site is not None else 0.0
        return own + 0.25 * site


@dataclass(frozen=True)
class CellFlags:
    cell: str
    prb_saturated: bool = False
    bler_high: bool = False
    ho_fail_ratio: float | None = None  # failures / attempts in the latest sample with attempts
    prb_pct: float | None = None  # DL PRB use: RRU.PrbTotDl, or used / available PRBs
    silent: bool = False  # every KPI's latest sample missing: the cell stopped reporting
    silent_since: float | None = None

    @property
    def ho_failing(self) -> bool:
        return self.ho_fail_ratio is not None and self.ho_fail_ratio >= HO_FAIL_RATIO

    def describe(self, now_of: dict[str, float | None], name: str | None = None) -> list[tuple[str, str | None]]:
        """(line, the KPI it is about) per raised flag; `name` shows the cell under another name."""
        cell = name or self.cell
        out: list[tuple[str, str | None]] = []
        if self.silent:
            out.append((f"no report from {cell} since {_when(self.silent_since)}", None))
        if self.prb_saturated:
            out.append((f"{cell} PRBs saturated ({_fmt(self.prb_pct, '%')})", "RRU.PrbTotDl"))
        if self.bler_high:
            bler = _fmt(now_of.get("TB.BlerDl"), "%")
            out.append((f"{cell} BLER {bler} above the {BLER_TARGET_PCT:.0f}% target", "TB.BlerDl"))
        if self.ho_failing:
            out.append((f"{cell} handover failures {100 * self.ho_fail_ratio:.0f}% of attempts", "MM.HoExeInterFail"))
        return out


@dataclass(frozen=True)
class Evidence:
    cells: tuple[str, ...]
    movements: tuple[Movement, ...]  # most salient first
    flags: dict[str, CellFlags] = field(default_factory=dict)
    n_times: int = 0

    def of(self, cell: str, kpi: str) -> Movement | None:
        return next((m for m in self.movements if m.cell == cell and m.kpi == kpi), None)

    def moved(self, cell: str, kpi: str, threshold: float = 1.0) -> bool:
        """Whether a KPI of a cell moved enough to cite (the faithfulness check reads this)."""
        m = self.of(cell, kpi)
        return m is not None and m.salience >= threshold

    def items(
        self, max_lines: int = 8, min_salience: float = 1.0, names: dict[str, str] | None = None
    ) -> list[tuple[str, str, str | None]]:
        """(line, cell, KPI or None) for the evidence block: flags first, then the most salient movements."""
        names = names or {}
        out: list[tuple[str, str, str | None]] = []
        for cell in self.cells:
            flags = self.flags.get(cell)
            if flags is not None:
                now_of = {m.kpi: m.now for m in self.movements if m.cell == cell}
                out += [(line, cell, kpi) for line, kpi in flags.describe(now_of, names.get(cell))]
        for m in self.movements:
            if len(out) >= max_lines:
                break
            if m.salience < min_salience or (m.missing_since is not None and self.flags[m.cell].silent):
                continue
            out.append((render_movement(m, names.get(m.cell)), m.cell, m.kpi))
        return out[:max_lines]

    def lines(self, max_lines: int = 8, min_salience: float = 1.0, names: dict[str, str] | None = None) -> list[str]:
        """The evidence block in human units, or one line saying nothing moved."""
        return [line for line, _, _ in self.items(max_lines, min_salience, names)] or [NOTHING_MOVED]

    def render(self, max_lines: int = 8) -> str:
        return "\n".join(f"- {line}" for line in self.lines(max_lines))


NOTHING_MOVED = "no KPI moved noticeably in the window"


def site_of(cell: str) -> str:
    return cell.split("/", 1)[0]


def _series(kpis: Iterable[KpiSample]) -> tuple[list[float | None], dict[tuple[str, str], np.ndarray], dict]:
    """Sample times (sorted; None-timed samples keep their arrival order) and per (cell, KPI) value rows."""
    kpis = list(kpis)
    timed = sorted({k.time_s for k in kpis if k.time_s is not None})
    untimed = any(k.time_s is None for k in kpis)
    times: list[float | None] = list(timed)
    index = {t: i for i, t in enumerate(timed)}
    rows: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    units: dict[str, str] = {}
    arrival: dict[tuple[str, str], int] = defaultdict(int)
    for k in kpis:
        key = (k.cell_id or "-", k.name)
        if k.time_s is None:  # order of arrival within its (cell, KPI)
            pos = arrival[key]
            arrival[key] += 1
        else:
            pos = index[k.time_s]
        rows[key].append((pos, float(k.value) if k.value is not None else math.nan))
        if k.unit:
            units.setdefault(k.name, k.unit)
    width = max([len(times), *(max(p for p, _ in r) + 1 for r in rows.values())] or [0])
    if untimed and width > len(times):
        times += [None] * (width - len(times))
    arrays = {}
    for key, pairs in rows.items():
        a = np.full(width, np.nan)
        for pos, v in pairs:
            a[pos] = v if math.isfinite(v) else np.nan
        arrays[key] = a
    return times, arrays, units


def _change(kpi: str, before: float | None, now: float | None) -> float | None:
    if before is None or now is None:
        return None
    if kpi in _ABSOLUTE:
        return now - before
    # a ratio from (near) zero is unbounded: -100 % .. +1000 % says all a reader or a tree needs
    return float(np.clip((now - before) / max(abs(before), 1e-6), -1.0, MAX_RELATIVE_CHANGE))


def _movement(cell: str, kpi: str, unit: str, row: np.ndarray, times: Sequence[float | None], site_now) -> Movement:
    finite = np.flatnonzero(np.isfinite(row))
    reported = finite.size
    missing_since = None
    if reported and finite[-1] < row.size - 1 and np.isnan(row[finite[-1] + 1 :]).all():
        first_missing = int(finite[-1] + 1)
        missing_since = times[first_missing] if times[first_missing] is not None else float(first_missing)
    elif reported == 0 and row.size:
        missing_since = times[0] if times and times[0] is not None else 0.0
    now = float(row[finite[-1]]) if reported else None
    before = float(np.median(row[finite[:-1]])) if reported >= 2 else None
    trend = 0
    if reported >= 2:
        slope = np.polyfit(finite.astype(float), row[finite], 1)[0] * (reported - 1)
        scale = _ABSOLUTE.get(kpi) or _RELATIVE_SCALE * max(abs(before or 0.0), 1e-6)
        trend = int(np.sign(slope)) if abs(slope) >= 0.5 * scale else 0
    prev = float(row[finite[-2]]) if reported >= 2 else None
    first = float(row[finite[0]]) if reported >= 3 else None
    return Movement(
        cell, kpi, unit, before, now, _change(kpi, before, now), _change(kpi, site_now, now), trend,
        missing_since, int(reported), _change(kpi, prev, now), _change(kpi, first, prev),
    )  # fmt: skip


def compute_evidence(kpis: Iterable[KpiSample], units: dict[str, str] | None = None) -> Evidence:
    times, arrays, seen_units = _series(kpis)
    units = {**seen_units, **(units or {})}
    cells = tuple(sorted({c for c, _ in arrays}))
    # co-site reference: the median of the other cells' latest finite value, per KPI
    latest: dict[tuple[str, str], float] = {}
    for (cell, kpi), row in arrays.items():
        finite = row[np.isfinite(row)]
        if finite.size:
            latest[(cell, kpi)] = float(finite[-1])
    movements = []
    for (cell, kpi), row in arrays.items():
        peers = [v for (c, k), v in latest.items() if k == kpi and c != cell and site_of(c) == site_of(cell)]
        site_now = float(np.median(peers)) if peers else None
        movements.append(_movement(cell, kpi, units.get(kpi, ""), row, times, site_now))
    movements.sort(key=lambda m: (-m.salience, m.cell, m.kpi))
    flags = {cell: _flags(cell, {k: a for (c, k), a in arrays.items() if c == cell}, times) for cell in cells}
    return Evidence(cells, tuple(movements), flags, len(times))


def _last(row: np.ndarray | None) -> float | None:
    if row is None:
        return None
    finite = row[np.isfinite(row)]
    return float(finite[-1]) if finite.size else None


def _flags(cell: str, rows: dict[str, np.ndarray], times) -> CellFlags:
    # the cell is silent when its latest time slot has no finite value in any KPI it ever reported
    stacked = np.vstack(list(rows.values())) if rows else np.empty((0, 0))
    any_finite = np.isfinite(stacked).any(axis=0) if stacked.size else np.array([], bool)
    silent = bool(any_finite.size) and not any_finite[-1]
    silent_since = None
    if silent:
        reported = np.flatnonzero(any_finite)
        first = int(reported[-1] + 1) if reported.size else 0
        silent_since = times[first] if times[first] is not None else float(first)
    prb = _last(rows.get("RRU.PrbTotDl"))
    if prb is None and rows.get("RRU.PrbUsedDl") is not None and rows.get("RRU.PrbAvailDl") is not None:
        used, avail = _last(rows["RRU.PrbUsedDl"]), _last(rows["RRU.PrbAvailDl"])
        prb = 100.0 * used / avail if used is not None and avail else None
    bler = _last(rows.get("TB.BlerDl"))
    ratio = None
    req, fail = rows.get("MM.HoExeInterReq"), rows.get("MM.HoExeInterFail")
    if req is not None and fail is not None:
        both = np.flatnonzero(np.isfinite(req) & np.isfinite(fail) & (req >= HO_MIN_ATTEMPTS))
        if both.size:
            i = both[-1]
            ratio = float(fail[i] / req[i])
    return CellFlags(
        cell, prb_saturated=prb is not None and prb >= PRB_SATURATED_PCT, prb_pct=prb,
        bler_high=bler is not None and bler > BLER_TARGET_PCT, ho_fail_ratio=ratio, silent=silent,
        silent_since=silent_since,
    )  # fmt: skip


# --- human units -----------------------------------------------------------------------------


def _scaled(value: float, unit: str) -> tuple[float, str]:
    if unit == "kbit/s" and abs(value) >= 1000:
        return value / 1000, "Mbit/s"
    if unit in ("us", "µs") and abs(value) >= 1000:
        return value / 1000, "ms"
    return value, unit


def _number(value: float) -> str:
    a = abs(value)
    if a >= 100:
        return f"{value:.0f}"
    if a >= 10:
        return f"{value:.1f}".rstrip("0").rstrip(".")
    if a >= 1:
        return f"{value:.2f}".rstrip("0").rstrip(".")
    if a == 0:
        return "0"
    return f"{value:.2f}".rstrip("0").rstrip(".") or "0"


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    v, u = _scaled(value, "" if unit == "count" else unit)
    return f"{_number(v)}{'' if u == '%' else ' '}{u}".rstrip()


def _when(t: float | None) -> str:
    if t is None:
        return "the start of the window"
    if t > 1e6:  # unix seconds
        return time.strftime("%H:%M", time.gmtime(t))
    return f"sample {int(t) + 1}"


def render_movement(m: Movement, name: str | None = None) -> str:
    cell = name or m.cell
    if m.missing_since is not None:
        return f"{cell} {m.kpi} not reported since {_when(m.missing_since)}"
    if m.before is None:
        return f"{cell} {m.kpi} {_fmt(m.now, m.unit)}"
    # both ends in the unit of the larger one ("0.9 → 7.1 Mbit/s", not "900 kbit/s → 7.1 Mbit/s")
    base = "" if m.unit == "count" else m.unit  # a counter's unit says nothing
    _, unit = _scaled(max(abs(m.before), abs(m.now)), base)
    factor = 1.0 if unit == base else 1000.0
    before, now = m.before / factor, m.now / factor
    sep = "" if unit in ("%", "") else " "
    if m.absolute:
        delta = f"{'+' if m.change >= 0 else '−'}{_number(abs(m.change))}{' points' if unit == '%' else sep + unit}"
    elif m.before == 0:
        delta = "from 0"
    elif m.change >= MAX_RELATIVE_CHANGE:
        delta = f"over +{MAX_RELATIVE_CHANGE * 100:.0f}%"
    else:
        delta = f"{'+' if m.change >= 0 else '−'}{abs(m.change) * 100:.0f}%"
    return f"{cell} {m.kpi} {_number(before)} → {_number(now)}{sep}{unit} ({delta})"


# --- detector features -----------------------------------------------------------------------

_PER_KPI = ("change", "vs_site", "trend", "missing", "step", "drift")
FEATURE_NAMES: tuple[str, ...] = (
    *(f"{kpi}:{f}" for kpi in KNOWN_KPIS for f in _PER_KPI),
    "prb_now_pct", "bler_now_pct", "sinr_now_db", "ho_fail_ratio", "silent", "n_cells_site", "n_times",
)


def _nan(x: float | None) -> float:
    return np.nan if x is None else x


def cell_features(evidence: Evidence, cell: str) -> np.ndarray:
    """A fixed-length vector for one cell (NaN where the context has no such KPI): the detector's input."""
    by_kpi = {m.kpi: m for m in evidence.movements if m.cell == cell}
    out = np.full(len(FEATURE_NAMES), np.nan, dtype=np.float32)
    i = 0
    for kpi in KNOWN_KPIS:
        m = by_kpi.get(kpi)
        if m is not None:
            out[i : i + len(_PER_KPI)] = (
                _nan(m.change), _nan(m.vs_site), m.trend, float(m.missing_since is not None), _nan(m.step),
                _nan(m.drift),
            )  # fmt: skip
        i += len(_PER_KPI)
    flags = evidence.flags.get(cell, CellFlags(cell))
    now = {k: (m.now if m.now is not None else np.nan) for k, m in by_kpi.items()}
    out[i : i + 7] = (
        now.get("RRU.PrbTotDl", np.nan), now.get("TB.BlerDl", np.nan), now.get("L1M.SS-SINR", np.nan),
        np.nan if flags.ho_fail_ratio is None else flags.ho_fail_ratio, float(flags.silent),
        sum(site_of(c) == site_of(cell) for c in evidence.cells), evidence.n_times,
    )  # fmt: skip
    return out
