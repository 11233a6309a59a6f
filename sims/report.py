"""SLO report of a replay: tables (pure statistics) and PNG plots (matplotlib, no display)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from sims.events import EVENT_KINDS
from sims.queries import PRIORITIES
from sims.replay import Results
from sims.trace import Trace

# one colour per event kind in table order (matplotlib's tab10 shades, cycled if there are more kinds)
_KIND_PALETTE = ("#d62728", "#9467bd", "#ff7f0e", "#8c564b", "#7f7f7f", "#e377c2", "#bcbd22", "#17becf", "#1f77b4",
                 "#2ca02c")  # fmt: skip
EVENT_COLOURS = {k: _KIND_PALETTE[i % len(_KIND_PALETTE)] for i, k in enumerate(EVENT_KINDS)}
CLASS_COLOURS = {"NEAR_RT": "#1f77b4", "NON_RT": "#2ca02c", "BEST_EFFORT": "#ff7f0e"}


@dataclass(frozen=True)
class Row:
    """One line of a summary table."""

    key: str
    count: int
    served: int
    met: int
    shed: int
    errors: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ran_share: float = float("nan")
    served_here: int = 0
    by_detector: int = 0  # served by the fast detector (detector_fallback), not a model replica

    @property
    def attainment(self) -> float:
        """Share of all queries answered within their deadline (shed and errors count as misses)."""
        return self.met / self.count if self.count else float("nan")

    @property
    def shed_rate(self) -> float:
        return self.shed / self.count if self.count else float("nan")

    @property
    def error_rate(self) -> float:
        return self.errors / self.count if self.count else float("nan")


def _columns(outcomes: pa.Table) -> dict[str, np.ndarray]:
    return {name: outcomes[name].to_numpy(zero_copy_only=False) for name in outcomes.column_names}


def _row(key: str, c: dict[str, np.ndarray], mask: np.ndarray, site: str | None = None) -> Row:
    served = mask & (c["outcome"] == "served")
    lat = c["latency_ms"][served].astype(np.float64)
    p50, p95, p99 = np.percentile(lat, [50, 95, 99]) if lat.size else (np.nan,) * 3
    share = c["ran_share"][mask].astype(np.float64)
    share = share[np.isfinite(share)]
    return Row(
        key=key,
        count=int(mask.sum()),
        served=int(served.sum()),
        met=int((served & c["met_deadline"].astype(bool)).sum()),
        shed=int((mask & (c["outcome"] == "shed")).sum()),
        errors=int((mask & (c["outcome"] == "error")).sum()),
        p50_ms=float(p50), p95_ms=float(p95), p99_ms=float(p99),
        mean_ran_share=float(share.mean()) if share.size else float("nan"),
        served_here=int((c["served_site_id"] == site).sum()) if site is not None else 0,
        by_detector=int((served & (c["answered_by"] == "detector")).sum()),
    )


def per_class(outcomes: pa.Table) -> list[Row]:
    c = _columns(outcomes)
    rows = [_row(p, c, c["priority"] == p) for p in PRIORITIES if (c["priority"] == p).any()]
    return rows + [_row("all", c, np.ones(len(c["priority"]), dtype=bool))]


def per_site(outcomes: pa.Table) -> list[Row]:
    c = _columns(outcomes)
    sites = sorted(set(c["site_id"].tolist()) | (set(c["served_site_id"].tolist()) - {""}))
    return [_row(s or "(none)", c, c["site_id"] == s, site=s) for s in sites]


def per_kind(outcomes: pa.Table) -> list[Row]:
    c = _columns(outcomes)
    return [_row(k, c, c["kind"] == k) for k in sorted(set(c["kind"].tolist()))]


def reasons(outcomes: pa.Table) -> list[tuple[str, str, str, int]]:
    """(priority, outcome, reason, count), most frequent first: why queries missed."""
    c = _columns(outcomes)
    keys, counts = np.unique(
        np.stack([c["priority"], c["outcome"], c["reason"]], axis=1).astype(str), axis=0, return_counts=True
    ) if len(c["priority"]) else (np.empty((0, 3), str), np.empty(0, int))
    out = [(str(a), str(b), str(r), int(n)) for (a, b, r), n in zip(keys, counts)]
    return sorted(out, key=lambda x: (-x[3], x[0], x[1], x[2]))


def attainment_over_time(outcomes: pa.Table, bins: int = 30) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Bin edges over trace time and, per class, the attainment in each bin (NaN where empty)."""
    c = _columns(outcomes)
    t = c["t_s"].astype(np.float64)
    if t.size == 0:
        return np.array([0.0, 1.0]), {}
    edges = np.linspace(t.min(), t.max() + 1e-9, max(2, min(bins, t.size)) + 1)
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(edges) - 2)
    met = (c["outcome"] == "served") & c["met_deadline"].astype(bool)
    out = {}
    for p in PRIORITIES:
        m = c["priority"] == p
        if not m.any():
            continue
        n = np.bincount(idx[m], minlength=len(edges) - 1)
        k = np.bincount(idx[m], weights=met[m], minlength=len(edges) - 1)
        out[p] = np.where(n > 0, k / np.maximum(n, 1), np.nan)
    return edges, out


# -- rendering -------------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return "-" if not np.isfinite(x) else f"{100 * x:.1f}%"


def _ms(x: float) -> str:
    return "-" if not np.isfinite(x) else (f"{x:,.0f}" if x >= 100 else f"{x:.1f}")


def render_tables(results: Results, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    out = results.outcomes
    m = results.meta
    console.print(
        f"[bold]Replay of[/] {m.get('trace')} against {m.get('target')} at speed {m.get('options', {}).get('speed')}"
        f" — {m.get('n_queries')} queries, {m.get('wall_s')} s"
        + (" [red](interrupted)[/]" if m.get("interrupted") else "")
    )
    for title, rows, first, site_cols in (
        ("Per class", per_class(out), "class", False),
        ("Per site (the query's preferred site)", per_site(out), "site", True),
        ("Per query kind", per_kind(out), "kind", False),
    ):
        t = Table(title=title, title_justify="left")
        for col in (first, "count", "attainment", "by detector", "p50 ms", "p95 ms", "p99 ms", "shed", "error"):
            t.add_column(col, justify="left" if col == first else "right", no_wrap=True)
        if site_cols:
            t.add_column("served here", justify="right", no_wrap=True)
            t.add_column("RAN share", justify="right", no_wrap=True)
        for r in rows:
            cells = [r.key, str(r.count), _pct(r.attainment), str(r.by_detector), _ms(r.p50_ms), _ms(r.p95_ms), _ms(r.p99_ms),
                     _pct(r.shed_rate), _pct(r.error_rate)]
            if site_cols:
                cells += [str(r.served_here), _pct(r.mean_ran_share)]
            t.add_row(*cells)
        console.print(t)
    t = Table(title="Outcomes by reason", title_justify="left")
    for col in ("class", "outcome", "reason", "count"):
        t.add_column(col, justify="right" if col == "count" else "left")
    for p, o, r, n in reasons(out):
        t.add_row(p, o, r, str(n))
    console.print(t)


def _pick_cells(trace: Trace, n: int) -> list[str]:
    """Cells with events first (they are what the queries are about), then the most asked-about."""
    picked: list[str] = []
    for c in trace.topology.cell_ids[trace.events.cell]:
        if str(c) not in picked:
            picked.append(str(c))
    asked: dict[str, int] = {}
    for q in trace.queries:
        for c in q.cell_ids[:1]:
            asked[c] = asked.get(c, 0) + 1
    for c, _ in sorted(asked.items(), key=lambda kv: (-kv[1], kv[0])):
        if c not in picked:
            picked.append(c)
    for c in trace.topology.cell_ids:
        if len(picked) >= n:
            break
        if str(c) not in picked:
            picked.append(str(c))
    return picked[:n]


def plot_cell_load(trace: Trace, path: Path, max_cells: int = 6, min_ai_headroom: float = 0.15) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = _pick_cells(trace, max_cells)
    table = trace.kpi_table(["RRU.PrbTotDl"], cell_ids=cells)
    t = table["t_s"].to_numpy()
    cell_col = np.asarray(table["cell_id"].cast(pa.string()).to_pylist())
    prb = table["RRU.PrbTotDl"].to_numpy()
    scale, unit = (3600.0, "h") if trace.duration_s > 4 * 3600 else (60.0, "min")
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(12, 6.5), sharex=True, height_ratios=[3, 2])
    for c in cells:
        m = cell_col == c
        ax.plot(t[m] / scale, prb[m], lw=1.2, label=c)
    ev = trace.events
    seen = set()
    cell_rank = {c: i for i, c in enumerate(cells)}
    for e in range(len(ev)):  # bounded by the number of events
        cid = str(trace.topology.cell_ids[ev.cell[e]])
        if cid not in cell_rank:
            continue
        kind = EVENT_KINDS[ev.kind[e]]
        ax.axvspan(ev.start_s[e] / scale, ev.end_s[e] / scale, color=EVENT_COLOURS[kind], alpha=0.15,
                   label=None if kind in seen else f"event: {kind}")
        ax.text(ev.start_s[e] / scale, 102 + 5 * (e % 3), f"{kind} {cid}", fontsize=7, color=EVENT_COLOURS[kind])
        seen.add(kind)
    ax.set_ylim(0, 120)
    ax.set_ylabel("RRU.PrbTotDl (%)")
    ax.set_title(f"Cell load with events ({trace.topology.n_cells} cells, interval {trace.interval_s:g} s)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    shares = trace.ran_share_array()
    lt = np.unique(trace.ran_load["t_s"].to_numpy())
    sites = list(dict.fromkeys(str(trace.topology.site_ids[trace.topology.cell_site[
        int(np.flatnonzero(trace.topology.cell_ids == c)[0])]]) for c in cells))
    for s in sites:
        i = int(np.flatnonzero(trace.topology.site_ids == s)[0])
        ax2.plot(lt / scale, shares[:, i], lw=1.2, label=s)
    ax2.axhline(1 - min_ai_headroom, color="k", ls="--", lw=0.8, label=f"AI headroom floor ({min_ai_headroom:g})")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("RAN compute share")
    ax2.set_xlabel(f"trace time ({unit})")
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency_cdf(outcomes: pa.Table, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = _columns(outcomes)
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in per_class(outcomes):
        if r.key == "all":
            continue
        m = (c["priority"] == r.key) & (c["outcome"] == "served")
        lat = np.sort(c["latency_ms"][m].astype(np.float64))
        if lat.size:
            # y counts every query of the class, so the curve tops out at the served share
            y = np.arange(1, lat.size + 1) / r.count
            ax.step(lat, y, where="post", color=CLASS_COLOURS[r.key],
                    label=f"{r.key}: {r.served}/{r.count} served, {_pct(r.attainment)} in deadline")
        budgets = c["budget_ms"][c["priority"] == r.key].astype(np.float64)
        ax.axvline(np.median(budgets), color=CLASS_COLOURS[r.key], ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("latency seen by the controller (ms, log); dotted: median deadline budget")
    ax.set_ylabel("share of the class's queries answered")
    ax.set_title("Latency CDF per priority class")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_attainment(outcomes: pa.Table, path: Path, bins: int = 30) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges, series = attainment_over_time(outcomes, bins)
    mids = 0.5 * (edges[:-1] + edges[1:])
    scale, unit = (3600.0, "h") if edges[-1] - edges[0] > 4 * 3600 else (60.0, "min")
    c = _columns(outcomes)
    t = c["t_s"].astype(np.float64)
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(edges) - 2)
    shed = np.bincount(idx, weights=c["outcome"] == "shed", minlength=len(mids))
    n = np.bincount(idx, minlength=len(mids))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for p, y in series.items():
        ax.plot(mids / scale, y, marker="o", ms=3, color=CLASS_COLOURS[p], label=f"{p} attainment")
    ax.bar(mids / scale, np.where(n > 0, shed / np.maximum(n, 1), 0), width=(edges[1] - edges[0]) / scale * 0.9,
           color="#d62728", alpha=0.25, label="shed share (all classes)")
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel(f"trace time ({unit})")
    ax.set_ylabel("share of queries")
    ax.set_title("Deadline attainment over time")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(results: Results, trace: Trace | None, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [
        plot_latency_cdf(results.outcomes, out_dir / "latency_cdf.png"),
        plot_attainment(results.outcomes, out_dir / "attainment.png"),
    ]
    if trace is not None:
        files.insert(0, plot_cell_load(trace, out_dir / "cell_load.png"))
    return files


# -- policies side by side (benchmarks/bench_radio_first_replay.py) -------------------------------

@dataclass(frozen=True)
class UsageSamples:
    """The AI's measured CPU use per site over a replay, against the headroom the radio left.

    Row k covers one sampling interval: `use` is the CPU seconds the site's replica process trees
    used in it over its wall length (cores); `radio_headroom` is the site's cpus x (1 - the trace's
    RAN share at that trace time); `forecast_headroom` what the radio-first forecast granted (nan
    under other policies); `surged` whether the site was surged; `demand` whether any query was in
    flight or waiting anywhere during the interval.
    """

    site_ids: tuple[str, ...]
    t_s: np.ndarray  # (K,) trace seconds at the interval's middle
    use: np.ndarray  # (K, S) cores
    radio_headroom: np.ndarray  # (K, S) cores
    forecast_headroom: np.ndarray  # (K, S) cores, nan when not forecast
    surged: np.ndarray  # (K, S) bool
    demand: np.ndarray  # (K,) bool

    def violations(self, tolerance_cpus: float) -> np.ndarray:
        """(K, S) True where the AI used more than the radio left (beyond the measuring tolerance)."""
        return self.use > self.radio_headroom + tolerance_cpus

    def idle_used_share(self) -> float:
        """Share of the compute the radio left idle that the AI used, over intervals with demand."""
        if not self.demand.any():
            return float("nan")
        left = np.clip(self.radio_headroom[self.demand], 0.0, None).sum()
        used = np.minimum(self.use[self.demand], np.clip(self.radio_headroom[self.demand], 0.0, None)).sum()
        return float(used / left) if left > 0 else float("nan")


def demand_mask(sample_edges_s: np.ndarray, sent_s: np.ndarray, done_s: np.ndarray) -> np.ndarray:
    """(K,) whether any query was outstanding in each interval [edges[k], edges[k+1]) (replay seconds)."""
    a, b = sample_edges_s[:-1, None], sample_edges_s[1:, None]
    ok = np.isfinite(sent_s) & np.isfinite(done_s)
    return ((sent_s[None, ok] < b) & (done_s[None, ok] > a)).any(axis=1)


# the gateway's words for a request it had queued and then let go (airan/serving/gateway.py)
AFTER_ADMISSION_MARKERS = ("dropped before its deadline", "shed from")


@dataclass(frozen=True)
class PolicyRow:
    policy: str
    near_rt_sent: int
    near_rt_met: int  # answered within the deadline, by a model replica or the detector
    near_rt_met_model: int  # ... by a model replica
    near_rt_by_detector: int  # refused at admission, answered at once by the fast detector
    near_rt_admitted: int  # given to a model replica (a queued one dropped later counts as admitted)
    early_rejects: int  # NEAR_RT refused at admission (then answered by the detector, or an error)
    reject_ms_p50: float
    reject_ms_p99: float
    non_rt_sent: int
    non_rt_served: int
    non_rt_met: int
    best_effort_sent: int
    best_effort_served: int
    best_effort_met: int
    tokens: int  # completion tokens served, all classes
    wall_s: float
    violation_intervals: int  # site-intervals where the AI used more than the radio left
    intervals: int  # site-intervals sampled
    idle_used_share: float
    mean_ai_cpus: float  # summed over sites

    @property
    def goodput(self) -> float:
        """NEAR_RT answered within deadline / all NEAR_RT sent."""
        return self.near_rt_met / self.near_rt_sent if self.near_rt_sent else float("nan")

    @property
    def model_goodput(self) -> float:
        """NEAR_RT answered by a model replica within deadline / all NEAR_RT sent."""
        return self.near_rt_met_model / self.near_rt_sent if self.near_rt_sent else float("nan")

    @property
    def attainment_admitted(self) -> float:
        """Of the NEAR_RT queries given to a model replica, the share answered within deadline."""
        return self.near_rt_met_model / self.near_rt_admitted if self.near_rt_admitted else float("nan")

    @property
    def early_reject_share(self) -> float:
        return self.early_rejects / self.near_rt_sent if self.near_rt_sent else float("nan")


def policy_row(policy: str, outcomes: pa.Table, usage: UsageSamples, wall_s: float, tolerance_cpus: float) -> PolicyRow:
    c = _columns(outcomes)
    prio, outcome = c["priority"], c["outcome"]
    met = (outcome == "served") & c["met_deadline"].astype(bool)
    near = prio == "NEAR_RT"
    detector = (outcome == "served") & (c["answered_by"] == "detector")
    # refused before dispatch (then answered by the detector, or not); a request the gateway queued and
    # then dropped (it could no longer start in time) or shed (a higher class needed its place) was
    # admitted and missed, not refused early
    refused = (outcome == "shed") & ~np.array([any(m in str(d) for m in AFTER_ADMISSION_MARKERS) for d in c["detail"]],
                                           dtype=bool).reshape(outcome.shape)  # fmt: skip
    refused |= detector
    reject_ms = c["latency_ms"][near & refused].astype(np.float64)
    reject_ms = reject_ms[np.isfinite(reject_ms)]
    p50, p99 = (np.percentile(reject_ms, [50, 99]) if reject_ms.size else (np.nan, np.nan))
    served = outcome == "served"
    viol = usage.violations(tolerance_cpus)
    return PolicyRow(
        policy=policy,
        near_rt_sent=int(near.sum()), near_rt_met=int((near & met).sum()),
        near_rt_met_model=int((near & met & ~detector).sum()), near_rt_by_detector=int((near & detector).sum()),
        near_rt_admitted=int((near & ~refused).sum()), early_rejects=int((near & refused).sum()),
        reject_ms_p50=float(p50), reject_ms_p99=float(p99),
        non_rt_sent=int((prio == "NON_RT").sum()), non_rt_served=int(((prio == "NON_RT") & served).sum()),
        non_rt_met=int(((prio == "NON_RT") & met).sum()),
        best_effort_sent=int((prio == "BEST_EFFORT").sum()),
        best_effort_served=int(((prio == "BEST_EFFORT") & served).sum()),
        best_effort_met=int(((prio == "BEST_EFFORT") & met).sum()),
        tokens=int(c["completion_tokens"][served].sum()), wall_s=wall_s,
        violation_intervals=int(viol.sum()), intervals=int(viol.size),
        idle_used_share=usage.idle_used_share(),
        mean_ai_cpus=float(usage.use.sum(axis=1).mean()) if usage.use.size else float("nan"),
    )


POLICY_COLOURS = {"round_robin": "#7f7f7f", "least_loaded": "#ff7f0e", "radio_first": "#1f77b4"}


def plot_headroom_vs_use(
    usage: dict[str, UsageSamples], events: list[dict], path: Path, hours: bool = True,
) -> Path:
    """Per site: the headroom the radio left, the forecast headroom (radio first), each policy's
    measured AI use; radio first's surges shaded, its swaps as vertical lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(usage.values()))
    n = len(first.site_ids)
    fig, axes = plt.subplots(n, 1, figsize=(11, 2.6 * n), sharex=True, squeeze=False)
    scale = 3600.0 if hours else 1.0
    for s, site in enumerate(first.site_ids):
        ax = axes[s, 0]
        ax.fill_between(first.t_s / scale, first.radio_headroom[:, s], color="#2ca02c", alpha=0.15, step="mid",
                        label="headroom the radio left")  # fmt: skip
        for policy, u in usage.items():
            ax.plot(u.t_s / scale, u.use[:, s], color=POLICY_COLOURS.get(policy), lw=0.9, label=f"AI use: {policy}")
            if np.isfinite(u.forecast_headroom[:, s]).any():
                ax.plot(u.t_s / scale, u.forecast_headroom[:, s], color="#2ca02c", lw=1.0, ls="--",
                        label="forecast headroom (radio first)")  # fmt: skip
            if u.surged[:, s].any():
                ax.fill_between(u.t_s / scale, 0, 1, where=u.surged[:, s], transform=ax.get_xaxis_transform(),
                                color="#d62728", alpha=0.12, step="mid", label="surged (radio first)")  # fmt: skip
        for e in events:
            if e.get("site_id") == site and e.get("kind") == "swap":
                ax.axvline(e["t_s"] / scale, color="#9467bd", lw=1.0, ls=":")
        ax.set_ylabel(f"{site}\nCPUs")
        ax.set_ylim(bottom=0)
        if s == 0:
            ax.legend(loc="upper right", fontsize=7, ncol=2)
    axes[-1, 0].set_xlabel("trace time (h)" if hours else "trace time (s)")
    fig.suptitle("AI CPU use against the radio's headroom, per site (swaps: dotted)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_attainment_by_policy(outcomes: dict[str, pa.Table], path: Path, bins: int = 24) -> Path:
    """NEAR_RT attainment (met / sent) over trace time, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3.6))
    t_max = max(float(np.max(t["t_s"].to_numpy())) for t in outcomes.values() if t.num_rows) or 1.0
    edges = np.linspace(0, t_max * (1 + 1e-9), bins + 1)
    for policy, table in outcomes.items():
        c = _columns(table)
        near = c["priority"] == "NEAR_RT"
        met = near & (c["outcome"] == "served") & c["met_deadline"].astype(bool)
        idx = np.clip(np.searchsorted(edges, c["t_s"], side="right") - 1, 0, bins - 1)
        sent_n = np.bincount(idx[near], minlength=bins)
        met_n = np.bincount(idx[met], minlength=bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            att = np.where(sent_n > 0, met_n / np.maximum(sent_n, 1), np.nan)
        ax.plot((edges[:-1] + edges[1:]) / 2 / 3600, att, marker="o", ms=3, color=POLICY_COLOURS.get(policy),
                label=policy)  # fmt: skip
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("trace time (h)")
    ax.set_ylabel("NEAR_RT met / sent")
    ax.legend()
    ax.set_title("NEAR_RT deadline attainment over the day, per policy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
