"""Network-ops questions a RAN controller would ask, triggered by what the KPIs show.

Sources (all open loop: arrival times never depend on answers):
- event explanations: an injected event becomes visible in the KPI report of
  the interval it mostly covers; the controller asks why, with the affected
  KPIs before and after (and the co-site cells) as context;
- anomaly explanations: vectorised thresholds on every cell each interval
  (PRB saturation, BLER, handover failures), worst cells first, with a
  per-cell cooldown so a long overload is asked about once;
- parameter-change proposals: follow some explanations, and nightly
  energy-saving proposals for lightly loaded multi-cell sites;
- periodic KPI summaries per site;
- operator questions as a Poisson process.

Every query maps onto airan.v1.AskRequest (see `replay.ask_request`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np

from airan.core.causes import EVENT_CAUSES
from sims.events import EVENT_KINDS, EventTable, visible_at
from sims.kpis import KPI_UNITS
from sims.topology import Topology
from sims.traffic import stream_rng

PRIORITIES: tuple[str, ...] = ("NEAR_RT", "NON_RT", "BEST_EFFORT")
QUERY_KINDS: tuple[str, ...] = ("event_explain", "anomaly_explain", "param_proposal", "kpi_summary", "ops_question")
CONTROLLER_KIND = {"NEAR_RT": "near_rt_ric", "NON_RT": "non_rt_ric", "BEST_EFFORT": "operator"}
# deadline budget ranges (ms), drawn log-uniformly; NEAR_RT stays inside the O-RAN near-RT loop (10 ms .. 1 s)
BUDGET_MS = {"NEAR_RT": (10.0, 1000.0), "NON_RT": (2_000.0, 60_000.0), "BEST_EFFORT": (30_000.0, 300_000.0)}
MAX_TOKENS = {"NEAR_RT": 24, "NON_RT": 96, "BEST_EFFORT": 192}
# what a near-RT xApp acts on is a typed diagnosis (cause, cells), not prose: its "why" questions ask
# in DIAGNOSIS mode with the server's token default (0), and opt in to the fast detector's answer when
# no replica can answer in time (an answer inside the loop beats none)
DIAGNOSIS_KINDS = ("event_explain", "anomaly_explain")

STREAM_EVENT_Q = 31
STREAM_ANOMALY_Q = 32
STREAM_SUMMARY_Q = 33
STREAM_OPS_Q = 34

# per event kind (int8 code), from the cause table: the KPIs the question shows, the controller
# class that asks, and the follow-up proposal (priority, what to propose; None: no follow-up)
_EVENT_KPIS = {i: c.kpis for i, c in enumerate(EVENT_CAUSES)}
_NEIGHBOUR_KPIS = ("RRU.PrbTotDl", "RRC.ConnMean")
_EVENT_PRIORITY = {i: c.asked_by for i, c in enumerate(EVENT_CAUSES)}
_PROPOSAL = {i: c.proposal for i, c in enumerate(EVENT_CAUSES)}
_ANOMALY_KPIS = ("RRU.PrbTotDl", "RRC.ConnMean", "DRB.UEThpDl", "DRB.RlcSduDelayDl", "TB.BlerDl",
                 "L1M.SS-SINR", "MM.HoExeInterReq", "MM.HoExeInterFail")
_MAYBE_NAN = ("DRB.UEThpDl", "DRB.RlcSduDelayDl")  # quality KPIs: NaN while a cell is off air
_SUMMARY_KPIS = ("RRC.ConnMean", "RRU.PrbTotDl", "DRB.UEThpDl", "DRB.RlcSduDelayDl", "MM.HoExeInterFail",
                 "PEE.AvgPower")


@dataclass(frozen=True)
class QueryParams:
    summary_every_s: float = 300.0  # 0 = no periodic summaries
    ops_per_hour: float = 12.0  # operator questions, whole network
    proposal_prob: float = 0.6  # share of event explanations followed by a proposal
    detect_delay_s: tuple[float, float] = (0.05, 2.0)  # controller reaction after a KPI report
    prb_overload_pct: float = 95.0
    bler_pct: float = 25.0
    ho_fail_ratio: float = 0.2
    ho_fail_min: float = 5.0
    cooldown_s: float = 900.0  # per cell, between triggered questions
    max_anomalies_per_min: float = 10.0  # network-wide: the xApp asks about the worst cells first
    energy_saving_prb_pct: float = 10.0  # site load under which the energy rApp proposes sleep
    max_queries: int = 1_000_000

    def __post_init__(self) -> None:
        if self.summary_every_s < 0 or self.ops_per_hour < 0 or not 0 <= self.proposal_prob <= 1:
            raise ValueError("summary_every_s, ops_per_hour >= 0 and proposal_prob in [0, 1]")


@dataclass
class Query:
    t_s: float
    kind: str
    trigger: str  # event kind, anomaly name, "periodic" or "poisson"
    priority: str
    controller_id: str
    site_ids: list[str]
    cell_ids: list[str]
    question: str
    budget_ms: float
    max_tokens: int
    kpi_context: list[dict] = field(default_factory=list)  # name, value, unit, cell_id, t_s
    event_id: str = ""
    query_id: str = ""
    mode: str = "free_text"  # AskRequest.response_mode: "free_text" or "diagnosis"
    detector_fallback: bool = False  # AskRequest.detector_fallback (diagnosis only)


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


class QueryGenerator:
    """Fed the simulator's windows in time order; `finish()` returns the queries sorted, with ids."""

    def __init__(
        self,
        topology: Topology,
        events: EventTable,
        params: QueryParams,
        *,
        seed: int,
        interval_s: float,
        duration_s: float,
        start: datetime,
    ) -> None:
        self.topo = topology
        self.events = events
        self.p = params
        self.seed = seed
        self.dt = float(interval_s)
        self.duration_s = float(duration_s)
        self.start = start
        self.queries: list[Query] = []
        self.truncated = 0
        self._cooldown_until = np.full(topology.n_cells, -np.inf)
        self._last_prb: np.ndarray | None = None  # previous window's last PRB row
        self._baseline: dict[int, dict[str, float]] = {}
        self._next_summary = params.summary_every_s if params.summary_every_s > 0 else np.inf
        # per-cell (per-site for RAN share) sums since the last summary, added a run of rows at a time
        self._acc = {k: np.zeros(topology.n_cells, dtype=np.float64) for k in _SUMMARY_KPIS}
        self._acc_ran = np.zeros(topology.n_sites, dtype=np.float64)
        self._acc_n = 0
        self._acc_from = 0  # first row of the current window not yet added
        self._ev_detect = visible_at(events, self.dt)
        self._ev_before = np.floor(events.start_s / self.dt).astype(np.int64) - 1
        self._ctrl = {prio: self._controller_for(prio) for prio in PRIORITIES}
        self._anomaly_cap = max(1, int(round(params.max_anomalies_per_min * self.dt / 60.0)))
        first = np.zeros(topology.n_cells, dtype=bool)
        first[topology.site_start] = True
        self._is_coverage_cell = first

    def _controller_for(self, priority: str) -> str:
        want = CONTROLLER_KIND[priority]
        for c in self.topo.controllers:
            if c.kind == want:
                return c.id
        return self.topo.controllers[0].id

    def _clock(self, t_s: float) -> str:
        return (self.start + timedelta(seconds=float(t_s))).strftime("%H:%M:%S")

    def _add(self, q: Query) -> None:
        if q.priority == "NEAR_RT" and q.kind in DIAGNOSIS_KINDS:
            q.mode, q.detector_fallback, q.max_tokens = "diagnosis", True, 0
        if q.t_s >= self.duration_s:
            return  # asked after the trace ends: outside the recorded period
        if len(self.queries) >= self.p.max_queries:
            self.truncated += 1
            return
        self.queries.append(q)

    def _budget(self, rng: np.random.Generator, priority: str, lo_hi: tuple[float, float] | None = None) -> float:
        lo, hi = lo_hi or BUDGET_MS[priority]
        return float(np.round(np.exp(rng.uniform(np.log(lo), np.log(hi))), 1))

    # -- windows ---------------------------------------------------------------------------------

    def observe(self, i0: int, t_s: np.ndarray, kpis: dict[str, np.ndarray], ran_share: np.ndarray) -> None:
        """Consume one window of intervals [i0, i0 + T) (must follow the previous window)."""
        T = t_s.shape[0]
        # remember each event's cell just before it starts: its 'before' values for the question
        bef = np.flatnonzero((self._ev_before >= i0) & (self._ev_before < i0 + T))
        for e in bef:  # bounded by the number of events
            r, c = int(self._ev_before[e]) - i0, int(self.events.cell[e])
            self._baseline[int(e)] = {name: float(kpis[name][r, c]) for name in _EVENT_KPIS[int(self.events.kind[e])]}
        det = self._ev_detect
        ev_here = np.flatnonzero((det >= i0) & (det < i0 + T))
        by_interval: dict[int, list[int]] = {}
        for e in ev_here:  # bounded by the number of events
            by_interval.setdefault(int(det[e]) - i0, []).append(int(e))
        self._acc_from = 0
        flags = self._anomaly_flags(kpis)
        for r in range(T):  # bounded by the window length
            i = i0 + r
            for e in by_interval.get(r, ()):
                self._event_queries(e, i, r, kpis)
            self._anomalies(i, r, kpis, flags)
            if (i + 1) * self.dt >= self._next_summary:
                self._accumulate(kpis, ran_share, r + 1)
                self._summaries((i + 1) * self.dt)
                self._next_summary = (np.floor((i + 1) * self.dt / self.p.summary_every_s) + 1) * self.p.summary_every_s
            self._ops_questions(i, r, kpis)
        self._accumulate(kpis, ran_share, T)
        self._last_prb = kpis["RRU.PrbTotDl"][-1].copy()

    def _sample(self, name: str, value: float, cell: int, interval: int) -> dict:
        return {
            "name": name, "value": float(value), "unit": KPI_UNITS[name],
            "cell_id": str(self.topo.cell_ids[cell]), "t_s": float(interval * self.dt),
        }

    def _event_queries(self, e: int, i: int, r: int, kpis: dict[str, np.ndarray]) -> None:
        ev = self.events
        kind = int(ev.kind[e])
        cell = int(ev.cell[e])
        site = int(self.topo.cell_site[cell])
        rng = stream_rng(self.seed, STREAM_EVENT_Q, e)
        baseline = self._baseline.pop(e, {})  # empty for an event starting in the first interval
        context, changes = [], []
        for name in _EVENT_KPIS[kind]:
            now = float(kpis[name][r, cell])
            before = baseline.get(name)
            if before is not None and np.isfinite(before):
                context.append(self._sample(name, before, cell, int(self._ev_before[e])))
            if np.isfinite(now):
                context.append(self._sample(name, now, cell, i))
            was = f"{_fmt(before)} -> " if before is not None else ""
            changes.append(f"{name} {was}{_fmt(now)} {KPI_UNITS[name]}")
        neighbours = [c for c in np.flatnonzero(self.topo.cell_site == site) if c != cell][:2]
        nb_text = []
        for c in neighbours:
            for name in _NEIGHBOUR_KPIS:
                v = float(kpis[name][r, c])
                if np.isfinite(v):
                    context.append(self._sample(name, v, int(c), i))
            nb_text.append(f"{self.topo.cell_ids[c]} at {_fmt(kpis['RRU.PrbTotDl'][r, c])} % PRB")
        priority = _EVENT_PRIORITY[kind]
        cell_id = str(self.topo.cell_ids[cell])
        site_id = str(self.topo.site_ids[site])
        question = (
            f"At {self._clock((i + 1) * self.dt)} cell {cell_id} changed: " + "; ".join(changes) + "."
            + (f" Co-site cells: {', '.join(nb_text)}." if nb_text else "")
            + (" What is the most likely cause, and the one action to take now?" if priority == "NEAR_RT"
               else " Explain the likely cause and its impact on neighbouring cells.")
        )
        t = (i + 1) * self.dt + rng.uniform(*self.p.detect_delay_s)
        lo_hi = (200.0, 1000.0) if priority == "NEAR_RT" else None
        self._add(Query(
            t_s=round(t, 3), kind="event_explain", trigger=EVENT_KINDS[kind], priority=priority,
            controller_id=self._ctrl[priority], site_ids=[site_id], cell_ids=[cell_id], question=question,
            budget_ms=self._budget(rng, priority, lo_hi), max_tokens=MAX_TOKENS[priority],
            kpi_context=context, event_id=str(ev.event_ids[e]),
        ))
        self._cooldown_until[cell] = t + self.p.cooldown_s
        if rng.random() < self.p.proposal_prob and _PROPOSAL[kind] is not None:
            prio, what = _PROPOSAL[kind]
            cells = [cell_id, *(str(self.topo.cell_ids[c]) for c in neighbours)]
            self._add(Query(
                t_s=round(t + rng.uniform(1.0, 10.0), 3), kind="param_proposal", trigger=EVENT_KINDS[kind],
                priority=prio, controller_id=self._ctrl[prio], site_ids=[site_id], cell_ids=cells,
                question=(f"Given the KPIs of {cell_id} since {self._clock(ev.start_s[e])}, propose {what}. "
                          "Answer as JSON with one entry per cell."),
                budget_ms=self._budget(rng, prio, (100.0, 1000.0) if prio == "NEAR_RT" else None),
                max_tokens=MAX_TOKENS[prio], kpi_context=list(context), event_id=str(ev.event_ids[e]),
            ))

    def _anomaly_flags(self, kpis: dict[str, np.ndarray]) -> np.ndarray:
        """(T, C) cells over any threshold, for the whole window; NaN (cell off) compares False."""
        p = self.p
        fail = kpis["MM.HoExeInterFail"]
        flags = kpis["RRU.PrbTotDl"] >= p.prb_overload_pct
        flags |= kpis["TB.BlerDl"] >= p.bler_pct
        flags |= (fail >= p.ho_fail_min) & (fail >= p.ho_fail_ratio * kpis["MM.HoExeInterReq"])
        return flags

    def _scores(self, kpis: dict[str, np.ndarray], r: int, cells: np.ndarray) -> np.ndarray:
        """(3, n) exceedance of each threshold (0 = under it) for a few cells."""
        p = self.p
        prb = kpis["RRU.PrbTotDl"][r, cells].astype(np.float64)
        bler = kpis["TB.BlerDl"][r, cells].astype(np.float64)
        req = kpis["MM.HoExeInterReq"][r, cells].astype(np.float64)
        fail = kpis["MM.HoExeInterFail"][r, cells].astype(np.float64)
        ratio = np.divide(fail, req, out=np.zeros_like(fail), where=req > 0)
        with np.errstate(invalid="ignore"):
            scores = np.stack([
                np.where(prb >= p.prb_overload_pct, prb / p.prb_overload_pct, 0.0),
                np.where(bler >= p.bler_pct, bler / p.bler_pct, 0.0),
                np.where((fail >= p.ho_fail_min) & (ratio >= p.ho_fail_ratio), ratio / p.ho_fail_ratio, 0.0),
            ])
        return np.nan_to_num(scores)

    def _anomalies(self, i: int, r: int, kpis: dict[str, np.ndarray], flags: np.ndarray) -> None:
        p = self.p
        t_report = (i + 1) * self.dt
        hits = np.flatnonzero(flags[r])
        hits = hits[self._cooldown_until[hits] <= t_report]
        if hits.size == 0:
            return
        scores = self._scores(kpis, r, hits)
        best, worst_kind = scores.max(axis=0), scores.argmax(axis=0)
        cap = self._anomaly_cap
        if hits.size > cap:  # worst cells first, the rest wait for the next report
            top = np.argpartition(-best, cap - 1)[:cap]
            hits, best, worst_kind = hits[top], best[top], worst_kind[top]
        order = np.lexsort((hits, -best))
        hits, worst_kind = hits[order], worst_kind[order]
        rng = stream_rng(self.seed, STREAM_ANOMALY_Q, i)
        names = ("prb_overload", "high_bler", "ho_failures")
        symptom = ("its DL PRBs are saturated", "its DL BLER is high", "many handovers fail")
        for c, a in zip(hits.tolist(), worst_kind.tolist()):  # bounded by the per-interval cap
            context = []
            for name in _ANOMALY_KPIS:
                v = float(kpis[name][r, c])
                if np.isfinite(v):
                    context.append(self._sample(name, v, c, i))
            prev = kpis["RRU.PrbTotDl"][r - 1] if r > 0 else self._last_prb
            if prev is not None and np.isfinite(prev[c]):
                context.append(self._sample("RRU.PrbTotDl", prev[c], c, i - 1))
            cell_id = str(self.topo.cell_ids[c])
            text = ", ".join(f"{s['name']} {_fmt(s['value'])} {s['unit']}" for s in context[:6])
            t = t_report + rng.uniform(*p.detect_delay_s)
            self._add(Query(
                t_s=round(t, 3), kind="anomaly_explain", trigger=names[a], priority="NEAR_RT",
                controller_id=self._ctrl["NEAR_RT"], site_ids=[str(self.topo.site_ids[self.topo.cell_site[c]])],
                cell_ids=[cell_id],
                question=(f"Cell {cell_id} at {self._clock(t_report)}: {symptom[a]} ({text}). "
                          "Is this traffic, radio conditions or a fault?"),
                budget_ms=self._budget(rng, "NEAR_RT", (50.0, 1000.0)), max_tokens=MAX_TOKENS["NEAR_RT"],
                kpi_context=context,
            ))
            self._cooldown_until[c] = t + p.cooldown_s

    def _accumulate(self, kpis: dict[str, np.ndarray], ran_share: np.ndarray, upto: int) -> None:
        a, b = self._acc_from, upto
        if b <= a:
            return
        for name in _SUMMARY_KPIS:
            rows = kpis[name][a:b]
            if name in _MAYBE_NAN:  # fmax(NaN, 0) = 0: an off cell adds 0, in one pass without a mask
                rows = np.fmax(rows, 0.0)
            # float64: float32 values add up exactly, so sums do not depend on where windows are cut
            self._acc[name] += rows.sum(axis=0, dtype=np.float64)
        self._acc_ran += ran_share[a:b].sum(axis=0, dtype=np.float64)
        self._acc_n += b - a
        self._acc_from = b

    def _summaries(self, t_end: float) -> None:
        n = max(self._acc_n, 1)
        site_sum = {k: np.bincount(self.topo.cell_site, weights=v, minlength=self.topo.n_sites)
                    for k, v in self._acc.items()}
        for k in ("RRU.PrbTotDl", "DRB.UEThpDl", "DRB.RlcSduDelayDl"):  # rates: mean over the site's cells
            site_sum[k] = site_sum[k] / self.topo.cells_per_site
        rng = stream_rng(self.seed, STREAM_SUMMARY_Q, int(round(t_end / self.dt)))
        mins = self._acc_n * self.dt / 60.0
        ho_name = "MM.HoExeInterFail"
        for s in range(self.topo.n_sites):  # bounded by the number of sites
            site_id = str(self.topo.site_ids[s])
            means = {k: site_sum[k][s] / n for k in _SUMMARY_KPIS}
            means[ho_name] = site_sum[ho_name][s]  # a count: total over the period
            interval = int(round(t_end / self.dt)) - 1
            context = [
                {"name": k, "value": float(v), "unit": KPI_UNITS[k], "cell_id": "", "t_s": float(interval * self.dt)}
                for k, v in means.items()
            ]
            ran = self._acc_ran[s] / n
            text = "; ".join(f"{c['name']} {_fmt(c['value'])} {c['unit']}" for c in context)
            t = t_end + rng.uniform(0.0, min(5.0, self.p.summary_every_s / 10))
            self._add(Query(
                t_s=round(t, 3), kind="kpi_summary", trigger="periodic", priority="NON_RT",
                controller_id=self._ctrl["NON_RT"], site_ids=[site_id], cell_ids=[],
                question=(f"Summarise site {site_id} over the last {mins:.0f} min ({text}; radio compute "
                          f"{100 * ran:.0f} %) in two sentences, and flag anything to watch."),
                budget_ms=self._budget(rng, "NON_RT", (5_000.0, 60_000.0)), max_tokens=MAX_TOKENS["NON_RT"],
                kpi_context=context,
            ))
            cells = np.flatnonzero(self.topo.cell_site == s)
            if means["RRU.PrbTotDl"] < self.p.energy_saving_prb_pct and cells.size > 1 and rng.random() < 0.5:
                sleepers = [str(self.topo.cell_ids[c]) for c in cells if not self._is_coverage_cell[c]]
                self._add(Query(
                    t_s=round(t + rng.uniform(0.5, 5.0), 3), kind="param_proposal", trigger="low_load",
                    priority="NON_RT", controller_id=self._ctrl["NON_RT"], site_ids=[site_id], cell_ids=sleepers,
                    question=(f"Site {site_id} runs at {_fmt(means['RRU.PrbTotDl'])} % PRB load. Propose which of "
                              f"{', '.join(sleepers)} to put to sleep and the wake-up threshold, as JSON."),
                    budget_ms=self._budget(rng, "NON_RT"), max_tokens=MAX_TOKENS["NON_RT"], kpi_context=context,
                ))
        for v in self._acc.values():
            v[:] = 0.0
        self._acc_ran[:] = 0.0
        self._acc_n = 0

    def _ops_questions(self, i: int, r: int, kpis: dict[str, np.ndarray]) -> None:
        if self.p.ops_per_hour <= 0:
            return
        rng = stream_rng(self.seed, STREAM_OPS_Q, i)
        n = int(rng.poisson(self.p.ops_per_hour * self.dt / 3600.0))
        for _ in range(min(n, 100)):  # bounded: a Poisson draw far beyond the rate is not an operator
            c = int(rng.integers(0, self.topo.n_cells))
            cell_id = str(self.topo.cell_ids[c])
            context = [
                self._sample(name, float(kpis[name][r, c]), c, i)
                for name in ("RRC.ConnMean", "RRU.PrbTotDl", "DRB.UEThpDl", "TB.BlerDl", "PEE.AvgPower")
                if np.isfinite(kpis[name][r, c])
            ]
            self._add(Query(
                t_s=round((i + 1 + rng.random()) * self.dt, 3), kind="ops_question", trigger="poisson",
                priority="BEST_EFFORT", controller_id=self._ctrl["BEST_EFFORT"],
                site_ids=[str(self.topo.site_ids[self.topo.cell_site[c]])], cell_ids=[cell_id],
                question=(f"How is cell {cell_id} doing right now, and is anything unusual in these KPIs? "
                          + "; ".join(f"{s['name']} {_fmt(s['value'])} {s['unit']}" for s in context)),
                budget_ms=self._budget(rng, "BEST_EFFORT"), max_tokens=MAX_TOKENS["BEST_EFFORT"],
                kpi_context=context,
            ))

    def finish(self) -> list[Query]:
        order = {k: n for n, k in enumerate(QUERY_KINDS)}
        self.queries.sort(key=lambda q: (q.t_s, order[q.kind], q.cell_ids[:1], q.site_ids))
        for n, q in enumerate(self.queries):
            q.query_id = f"q-{n + 1:06d}"
        return self.queries
