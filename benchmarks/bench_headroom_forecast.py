"""How well the radio-first forecast grants headroom: safety against the idle compute it gives up.

Plain data, no engines: a simulated week of a three-site city (radio compute sized as in
bench_radio_first_replay.py, so busy hours and flash crowds push the share to 0.9), its RAN load
fed report by report into `airan.core.headroom.HeadroomForecaster` (the trace's clock injected).
At each report the AI is granted cpus x (1 - forecast - margin) for the next interval; the next
interval's actual share decides whether the grant was safe (at most the real headroom) and how
much of the real idle compute it granted. Side by side in the same run: the last report as the
forecast (what the control plane did before: a threshold on the last ReportRanLoad), the trend
alone (profile off), and the full forecast (trend + time-of-day profile). The first days warm up
the profile and are not scored.

    .venv/bin/python benchmarks/bench_headroom_forecast.py --out benchmarks/results/headroom_forecast.json
    # the trade-off: each forecast over quantiles and margins, same data (~1 min)
    .venv/bin/python benchmarks/bench_headroom_forecast.py --sweep --out benchmarks/results/headroom_forecast_sweep.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from airan.core.headroom import DAY_S, ForecastParams, HeadroomForecaster  # noqa: E402


class TraceClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def simulated_shares(days: int, seed: int, interval_s: float, core_scale: float) -> tuple[np.ndarray, np.ndarray]:
    from sims.events import flash_crowds, random_events
    from sims.queries import QueryParams
    from sims.simulate import SimConfig, Simulator
    from sims.timefmt import parse_start
    from sims.topology import generate_topology
    from sims.trace import read_trace, record_trace
    from sims.traffic import TrafficParams

    topo = generate_topology(3, seed=11)
    topo = dataclasses.replace(topo, site_cores=(topo.site_cores * core_scale).astype(np.float32))
    duration = days * DAY_S
    ev = random_events(topo, duration, 60 * days, seed, min_duration_s=2 * interval_s)
    ev = ev.concat(flash_crowds(topo, duration, 1.0, seed))
    cfg = SimConfig(duration_s=duration, interval_s=interval_s, seed=seed, start=parse_start("2025-06-02T00:00:00Z"),
                    traffic=TrafficParams(interval_s=interval_s),
                    queries=QueryParams(summary_every_s=0, ops_per_hour=0))  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        record_trace(Simulator(topo, ev, cfg), Path(d) / "t")
        trace = read_trace(Path(d) / "t")
        return np.unique(trace.ran_load["t_s"].to_numpy()), trace.ran_share_array().astype(np.float64)


def score(method: str, times: np.ndarray, shares: np.ndarray, args) -> dict:
    n_sites = shares.shape[1]
    clock = TraceClock()
    params = ForecastParams(quantile=args.quantile, horizon_s=args.interval_s, window_s=args.window_s,
                            stale_after_s=1e12, use_profile=method == "trend + time-of-day profile")  # fmt: skip
    f = HeadroomForecaster([str(s) for s in range(n_sites)], params, clock)
    granted, actual, cost = [], [], []
    for k in range(len(times) - 1):  # bounded by the trace
        clock.t = times[k]
        for s in range(n_sites):
            f.observe(str(s), float(shares[k, s]), at=times[k])
        if times[k] < args.warmup_days * DAY_S:
            continue
        t0 = time.perf_counter()
        fc = shares[k] if method == "last report" else np.array([f.forecast(str(s)).share for s in range(n_sites)])
        cost.append((time.perf_counter() - t0) / n_sites)
        granted.append(np.clip(1.0 - fc - args.margin, 0.0, None) * args.cpus)
        actual.append((1.0 - shares[k + 1]) * args.cpus)  # the next interval's real headroom
    g, a = np.array(granted), np.array(actual)
    unsafe = g > a + 1e-9
    return {
        "method": method,
        "site_intervals": int(g.size),
        "unsafe_share": float(unsafe.mean()),  # grants above what the radio left
        "idle_granted_share": float(np.minimum(g, a).sum() / a.sum()),  # of the real idle compute
        "mean_overshoot_cpus_when_unsafe": float((g - a)[unsafe].mean()) if unsafe.any() else 0.0,
        "forecast_us_p50": float(np.percentile(cost, 50) * 1e6) if method != "last report" else 0.0,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--days", type=int, default=7)
    p.add_argument("--warmup-days", type=int, default=2)
    p.add_argument("--interval-s", type=float, default=300.0)
    p.add_argument("--window-s", type=float, default=3600.0)
    p.add_argument("--quantile", type=float, default=0.99)
    p.add_argument("--margin", type=float, default=0.05)
    p.add_argument("--cpus", type=float, default=1.0)
    p.add_argument("--core-scale", type=float, default=0.65)
    p.add_argument("--seed", type=int, default=21)
    p.add_argument("--out", default="benchmarks/results/headroom_forecast.json")
    p.add_argument("--sweep", action="store_true", help="each forecast over --quantiles x --margins")
    p.add_argument("--quantiles", type=float, nargs="+", default=[0.9, 0.99])
    p.add_argument("--margins", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.3])
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    times, shares = simulated_shares(args.days, args.seed, args.interval_s, args.core_scale)
    if args.sweep:
        return sweep(times, shares, args, t0)
    rows = [score(m, times, shares, args) for m in ("last report", "trend only", "trend + time-of-day profile")]
    print(f"{args.days} days, 3 sites, {args.interval_s:g} s reports, q={args.quantile}, margin {args.margin}, "
          f"scored after {args.warmup_days} warm-up days ({time.perf_counter() - t0:.1f} s)")
    print("| forecast | site-intervals | grants above the real headroom | real idle compute granted "
          "| mean overshoot when above (share of cpus) | forecast us p50 |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['site_intervals']} | {100 * r['unsafe_share']:.2f}% | "
              f"{100 * r['idle_granted_share']:.1f}% | {r['mean_overshoot_cpus_when_unsafe'] / args.cpus:.3f} | "
              f"{r['forecast_us_p50']:.0f} |")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


def sweep(times: np.ndarray, shares: np.ndarray, args, t0: float) -> int:
    """Unsafe grants against idle compute granted, per forecast, quantile and margin (one table)."""
    rises = np.diff(shares, axis=0)
    print(f"{args.days} days, 3 sites, {args.interval_s:g} s reports; the share rose by more than 0.1 / 0.2 "
          f"from one interval to the next in {100 * (rises > 0.1).mean():.1f}% / {100 * (rises > 0.2).mean():.1f}% "
          "of site-intervals")  # fmt: skip
    print("| forecast | quantile | margin | grants above the real headroom | real idle compute granted |")
    print("|---|---|---|---|---|")
    rows = []
    for method in ("last report", "trend only", "trend + time-of-day profile"):
        for q in ([args.quantiles[-1]] if method == "last report" else args.quantiles):
            for m in args.margins:
                r = score(method, times, shares, argparse.Namespace(**{**vars(args), "quantile": q, "margin": m}))
                rows.append({**r, "quantile": q, "margin": m})
                print(f"| {method} | {q if method != 'last report' else '-'} | {m} | {100 * r['unsafe_share']:.2f}% | "
                      f"{100 * r['idle_granted_share']:.1f}% |")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "share_rises_over_0.1": float((rises > 0.1).mean()),
                               "share_rises_over_0.2": float((rises > 0.2).mean()), "rows": rows}, indent=2) + "\n")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
