"""Radio first, judged by replay: one simulated day at three sites, three router policies side by side.

One run generates a two-day trace of a three-site city (the first day is history: its RAN load is
pushed with its own times before the replay, so the forecast has a time-of-day profile; the second
day is replayed), sizes each site's compute tighter than the simulator's default so the busy hours
and flash crowds push the radio's share to 0.9, and then, for each policy in turn, starts a fresh
local stack (Ray site nodes, one vLLM CPU replica per site), pushes the history, replays the day
open loop at `--speed`, and samples every replica's process-tree CPU time (psutil) every
`--sample-s`. A RAN-load row is pushed when the trace format says it becomes visible, at the end of
its interval (the radio reports what it needed over the interval just past), so no policy sees the
radio's load of an interval before it has happened; the forecast has to cover the next one. The
trace's NEAR_RT event and anomaly questions ask for a typed diagnosis and opt in to the detector's
answer when no replica can answer in time (trace format v2); its NEAR_RT parameter proposals stay
free text. Per policy it reports NEAR_RT goodput (answered in time / sent, by a model replica and by
the detector apart), attainment among those given to a model replica, early rejects and their time,
NON_RT and BEST_EFFORT answers, and reservation violations: sampled site-intervals where the AI's
measured CPU use exceeded the compute the trace's RAN share left (cpus x (1 - share)), beyond a
measuring tolerance.

The three sites are slices of this machine: `--site-cpus` each (0.66 of the 2 cores by default),
each replica bound to one core. The replicas serve the tiny model (tiny-random): on two cores
SmolLM2 answers no NEAR_RT question within its budget under any policy (README: 0 of 9 at
speed 60), so the comparison is of scheduling, with the tiny model's per-token cost.

    flock /tmp/airan-heavy.lock .venv/bin/python benchmarks/bench_radio_first_replay.py \
        --out benchmarks/results/radio_first_replay
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POLICIES = ("round_robin", "least_loaded", "radio_first")
DAY_S = 86_400.0


# -- the trace -------------------------------------------------------------------------------------

def make_trace(path: Path, start: str, hours: float, seed: int, core_scale: float, events: int,
               flash_per_cell_day: float, ops_per_hour: float, interval_s: float) -> Path:  # fmt: skip
    from sims.events import flash_crowds, random_events
    from sims.queries import QueryParams
    from sims.simulate import SimConfig, Simulator
    from sims.timefmt import parse_start
    from sims.topology import generate_topology
    from sims.trace import record_trace
    from sims.traffic import TrafficParams

    # the same city both days (topology seed fixed); the days differ in events and noise
    topo = generate_topology(3, seed=11)
    topo = dataclasses.replace(topo, site_cores=(topo.site_cores * core_scale).astype(np.float32))
    duration = hours * 3600.0
    n_events = max(1, round(events * hours / 24))
    ev = random_events(topo, duration, n_events, seed, min_duration_s=2 * interval_s)
    ev = ev.concat(flash_crowds(topo, duration, flash_per_cell_day, seed))
    cfg = SimConfig(duration_s=duration, interval_s=interval_s, seed=seed, start=parse_start(start),
                    traffic=TrafficParams(interval_s=interval_s),
                    queries=QueryParams(summary_every_s=900.0, ops_per_hour=ops_per_hour))  # fmt: skip
    record_trace(Simulator(topo, ev, cfg), path, command=f"bench_radio_first_replay make_trace seed={seed}")
    return path


# -- the stack per policy --------------------------------------------------------------------------

def stack_config(policy: str, trace, site_cpus: float, args) -> object:
    from airan.config import parse_config

    sites = []
    for s in trace.topology.site_configs():
        sites.append({**s, "cpus": site_cpus, "gpus": 0.0})
    # the router before admission: no deadline filter, and every request dispatched to the engine at once
    # (1,000 slots: the gateway queues nothing, as the actor took up to 1,000 concurrent calls)
    old_router = {"filters": ["ready", "site_active", "model"],
                  "scorers": [{"type": "least_loaded", "weight": 1.0}, {"type": "site_locality", "weight": 1.0}],
                  "admission": {"slots": 1000}}
    router = {"round_robin": {"policy": "round_robin", **old_router},
              "least_loaded": {"policy": "least_loaded", **old_router},  # the router before admission
              "radio_first": {"policy": "radio_first"}}[policy]  # fmt: skip
    speed = args.speed
    return parse_config({
        "sites": sites,
        "models": [{"name": "tiny-llama", "source": "tiny-random", "max_model_len": 2048, "dtype": "float32"}],
        "replicas": [{"site": s["id"], "model": "tiny-llama"} for s in sites],
        "engine": {"kv_cache_gb": 0.25, "max_num_seqs": 8},
        "limits": {"max_tokens_limit": 256, "max_kpi_samples": 512},
        "server": {"host": "127.0.0.1", "port": 0, "grace_s": 1},
        "router": router,
        "radio": {
            "min_ai_headroom": 0.15, "headroom_margin": 0.05,
            "control_interval_s": args.control_s,
            # radio-clock (trace) seconds: one RAN report interval ahead, an hour of trend
            "forecast_horizon_s": max(args.interval_s, args.control_s * speed), "forecast_window_s": 3600.0,
            "stale_after_s": 30.0, "swap_variants": False,
            # hold a resume for 15 trace minutes (the hold runs on the real clock)
            "swap_hold_s": 900.0 / speed, "swap_hysteresis": 0.25,
        },
    })  # fmt: skip


async def push_history(client, history) -> None:
    """The first day's RAN load, each report at its own trace time (the forecast's earlier days)."""
    from airan.v1 import control_pb2
    from google.protobuf.timestamp_pb2 import Timestamp

    times = np.unique(history.ran_load["t_s"].to_numpy())
    shares = history.ran_share_array()
    start = history.start.timestamp() + history.interval_s  # a row is reported at its interval's end
    site_ids = [str(s) for s in history.topology.site_ids]
    loads = []
    for row, t in enumerate(times):
        ts = Timestamp()
        ts.FromNanoseconds(int(round((start + float(t)) * 1e9)))
        loads += [control_pb2.SiteRanLoad(site_id=s, ran_compute_share=float(v), time=ts)
                  for s, v in zip(site_ids, shares[row])]  # fmt: skip
    for i in range(0, len(loads), 300):
        await client.control.ReportRanLoad(control_pb2.ReportRanLoadRequest(loads=loads[i:i + 300]), timeout=30)


@dataclasses.dataclass
class Sample:
    t: float  # loop time
    cpu: dict  # replica id -> CPU seconds
    site_of: dict  # replica id -> site
    headroom: dict  # site -> forecast headroom cpus (None: not forecast)
    surged: dict  # site -> bool


async def sampler(plane, every_s: float, out: list[Sample], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():  # bounded by the replay's end
        cpu = await plane.pool.cpu_seconds()
        site_of = {r.view.replica_id: r.view.site_id for r in plane.pool.details()}
        sites = plane.gateway.sites
        out.append(Sample(loop.time(), cpu, site_of,
                          {s.config.id: s.headroom_cpus for s in sites.states()},
                          {s.config.id: s.surged for s in sites.states()}))  # fmt: skip
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except TimeoutError:
            pass


def usage_samples(samples: list[Sample], t0: float, speed: float, trace, site_cpus: float, outcomes):
    from sims.report import UsageSamples, demand_mask

    site_ids = tuple(str(s) for s in trace.topology.site_ids)
    times = np.unique(trace.ran_load["t_s"].to_numpy())
    shares = trace.ran_share_array()
    rows = []
    for a, b in zip(samples[:-1], samples[1:]):
        if a.t < t0:
            continue
        dt = b.t - a.t
        use = np.zeros(len(site_ids))
        for rid, c1 in b.cpu.items():
            c0 = a.cpu.get(rid)
            site = b.site_of.get(rid)
            if c0 is None or site not in site_ids:
                continue  # a replica that started in this interval is counted from its first sample
            use[site_ids.index(site)] += max(0.0, c1 - c0) / dt
        mid_trace_s = ((a.t + b.t) / 2 - t0) * speed
        row = max(0, int(np.searchsorted(times, mid_trace_s, side="right")) - 1)
        radio_left = site_cpus * (1.0 - shares[row].astype(np.float64))
        fh = np.array([np.nan if b.headroom.get(s) is None else b.headroom[s] for s in site_ids])
        surged = np.array([bool(b.surged.get(s)) for s in site_ids])
        rows.append((mid_trace_s, a.t - t0, b.t - t0, use, radio_left, fh, surged))
    if not rows:
        raise RuntimeError("no CPU samples during the replay")
    t_s = np.array([r[0] for r in rows])
    edges = np.array([rows[0][1]] + [r[2] for r in rows])
    sent = outcomes["sent_s"].to_numpy()
    done = sent + outcomes["latency_ms"].to_numpy() / 1000.0
    return UsageSamples(site_ids, t_s, np.stack([r[3] for r in rows]), np.stack([r[4] for r in rows]),
                        np.stack([r[5] for r in rows]), np.stack([r[6] for r in rows]),
                        demand_mask(edges, sent, done))  # fmt: skip


async def run_policy(policy: str, trace, history, args, out_dir: Path) -> dict:
    from airan.client import AsyncAiranClient
    from airan.factory.tiny import ensure_tiny_model
    from airan.stack import LocalStack
    from airan.store.registry import tiny_params_for
    from sims.replay import ReplayOptions, Replayer, outcomes_table, write_results

    config = stack_config(policy, trace, args.site_cpus, args)
    for spec in config.models:
        ensure_tiny_model(spec.name, tiny_params_for(spec))
    t_start = time.monotonic()
    async with LocalStack(config) as plane:
        startup_s = time.monotonic() - t_start
        async with AsyncAiranClient(plane.address) as client:
            await push_history(client, history)
        await asyncio.sleep(2 * args.control_s)  # the forecast's caps in force before the first query
        replayer = Replayer(trace, plane.address, ReplayOptions(
            speed=args.speed, call_slack_s=3.0, grace_s=10.0, ran_load_time="trace", ran_load_at="end",
            progress=False))  # fmt: skip
        samples: list[Sample] = []
        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler(plane, args.sample_s, samples, stop))
        await replayer.run()
        stop.set()
        await sampling
        events = []
        if plane.headroom is not None:
            for e in plane.headroom.events:
                events.append({**dataclasses.asdict(e)})
        swaps = list(plane.pool.swaps)
        caps = sorted({r.cap_mechanism for r in plane.pool.details()})
    outcomes = replayer.book.outcomes()
    table = outcomes_table(outcomes)
    res_dir = write_results(out_dir / policy, replayer.meta(), outcomes, replayer.pushes)
    loop_t0 = replayer.t0
    usage = usage_samples(samples, loop_t0, args.speed, trace, args.site_cpus, table)
    # wall-clock events -> trace seconds (the sampler's loop clock and the wall clock advance together)
    wall_t0 = datetime.fromisoformat(replayer.started_at).timestamp()
    for e in events:
        e["t_s"] = (e["at"] - wall_t0) * args.speed
    np.savez_compressed(res_dir / "usage.npz", t_s=usage.t_s, use=usage.use, radio_headroom=usage.radio_headroom,
                        forecast_headroom=usage.forecast_headroom, surged=usage.surged, demand=usage.demand,
                        site_ids=np.array(usage.site_ids))  # fmt: skip
    (res_dir / "control_events.json").write_text(json.dumps({"events": events, "swaps": swaps}, indent=1,
                                                            default=str))  # fmt: skip
    return {"policy": policy, "table": table, "usage": usage, "events": events, "swaps": swaps,
            "wall_s": replayer.wall_s, "startup_s": startup_s, "cap_mechanisms": caps}  # fmt: skip


# -- report ----------------------------------------------------------------------------------------

# what became of each NEAR_RT query, by the words of the answer or refusal (airan/core, airan/serving)
NEAR_RT_FATES = (
    ("refused: no replica could make it even idle", "even when idle"),
    ("refused: none can make it now (busy)", "no replica can answer within"),
    ("refused: admitted concurrency full", "forecast AI headroom admits"),
    ("refused: site surged", "surged sites"),
    ("refused: site below min AI headroom", "less AI headroom than"),
    ("refused: deadline passed before the gateway saw it", "deadline already passed"),
    ("queued, then dropped before its deadline", "dropped before its deadline"),
    ("late: deadline passed while answering", "was answering"),
)


def near_rt_fates(table) -> dict[str, int]:
    """NEAR_RT queries by what became of them: met, late, and each kind of refusal."""
    out: dict[str, int] = {}
    for r in table.to_pylist():
        if r["priority"] != "NEAR_RT":
            continue
        if r["outcome"] == "served":
            source = "by the detector" if r["answered_by"] == "detector" else "by a model"
            fate = f"answered {source} {'in time' if r['met_deadline'] else 'late'}"
        else:
            fate = next((name for name, marker in NEAR_RT_FATES if marker in (r["detail"] or "")),
                        f"other: {r['outcome']} {r['code']}")  # fmt: skip
        out[fate] = out.get(fate, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def prediction_ratios(table) -> dict:
    """NEAR_RT answers by a model: latency the controller saw / admission's prediction (p50, p99)."""
    ratios = [r["latency_ms"] / r["predicted_ms"] for r in table.to_pylist()
              if r["priority"] == "NEAR_RT" and r["answered_by"] == "model" and (r["predicted_ms"] or 0) > 0]
    if not ratios:
        return {"n": 0}
    p50, p99 = np.percentile(ratios, [50, 99])
    return {"n": len(ratios), "p50": round(float(p50), 3), "p99": round(float(p99), 3)}


def fmt_pct(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{100 * x:.1f}%"


def fmt_ms(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:,.1f}"


def table_lines(rows) -> list[str]:
    head = ("| policy | NEAR_RT goodput (model + detector) | by a model | attainment among admitted to a model "
            "| early rejects (share) | reject ms p50 / p99 "
            "| NON_RT served / met of sent | BEST_EFFORT served / met of sent | tokens | reservation violations "
            "| idle compute used | mean AI CPUs |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r.policy} | {fmt_pct(r.goodput)} ({r.near_rt_met_model} + {r.near_rt_met - r.near_rt_met_model} of {r.near_rt_sent}) | "
            f"{fmt_pct(r.model_goodput)} | "
            f"{fmt_pct(r.attainment_admitted)} ({r.near_rt_met_model}/{r.near_rt_admitted}) | "
            f"{r.early_rejects} ({fmt_pct(r.early_reject_share)}) | {fmt_ms(r.reject_ms_p50)} / {fmt_ms(r.reject_ms_p99)} | "
            f"{r.non_rt_served} / {r.non_rt_met} of {r.non_rt_sent} | "
            f"{r.best_effort_served} / {r.best_effort_met} of {r.best_effort_sent} | {r.tokens:,} | "
            f"{r.violation_intervals} of {r.intervals} ({fmt_pct(r.violation_intervals / max(1, r.intervals))}) | "
            f"{fmt_pct(r.idle_used_share)} | {r.mean_ai_cpus:.2f} |"
        )  # fmt: skip
    return lines


def machine() -> dict:
    cpu = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), cpu)
    except (OSError, subprocess.SubprocessError):
        pass
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg_start": list(os.getloadavg())}  # fmt: skip


async def main_async(args) -> int:
    from sims.report import plot_attainment_by_policy, plot_headroom_vs_use, policy_row
    from sims.trace import read_trace

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).isoformat()
    info = machine()
    t0 = time.monotonic()
    common = dict(core_scale=args.core_scale, events=args.events, flash_per_cell_day=args.flash,
                  ops_per_hour=args.ops_per_hour, interval_s=args.interval_s)  # fmt: skip
    history = read_trace(make_trace(out / "traces" / "history", "2025-06-02T00:00:00Z", 24.0, args.seed, **common))
    day = read_trace(make_trace(out / "traces" / "day", f"2025-06-03T{args.start_hour:02d}:00:00Z", args.hours,
                                args.seed + 1, **common))  # fmt: skip
    counts = {p: sum(q.priority == p for q in day.queries) for p in ("NEAR_RT", "NON_RT", "BEST_EFFORT")}
    print(f"trace: {args.hours:g} h from {args.start_hour:02d}:00, {len(day.queries)} queries {counts}; "
          f"replayed at x{args.speed:g} = {args.hours * 3600 / args.speed:.0f} s per policy", flush=True)
    results = {}
    for policy in args.policies:
        t_p = time.monotonic()
        results[policy] = await run_policy(policy, day, history, args, out)
        print(f"{policy}: stack {results[policy]['startup_s']:.0f} s, replay {results[policy]['wall_s']:.0f} s, "
              f"cap {results[policy]['cap_mechanisms']}, total {time.monotonic() - t_p:.0f} s", flush=True)
    rows = [policy_row(p, r["table"], r["usage"], r["wall_s"], args.tolerance) for p, r in results.items()]
    lines = table_lines(rows)
    print("\n".join(lines))
    for p, r in results.items():
        print(f"{p} NEAR_RT: {near_rt_fates(r['table'])}; model answers' time / prediction "
              f"{prediction_ratios(r['table'])}")
    radio_events = results.get("radio_first", {}).get("events", [])
    plot_headroom_vs_use({p: r["usage"] for p, r in results.items()}, radio_events, out / "headroom_vs_use.png")
    plot_attainment_by_policy({p: r["table"] for p, r in results.items()}, out / "attainment_by_policy.png")
    summary = {
        "started": started, "finished": datetime.now(timezone.utc).isoformat(),
        "total_s": round(time.monotonic() - t0, 1), "machine": {**info, "load_avg_end": list(__import__("os").getloadavg())},
        "args": vars(args), "queries": counts,
        "rows": [{**dataclasses.asdict(r), "goodput": r.goodput, "model_goodput": r.model_goodput,
                  "attainment_admitted": r.attainment_admitted,
                  "early_reject_share": r.early_reject_share} for r in rows],
        "per_policy": {p: {"wall_s": r["wall_s"], "startup_s": r["startup_s"], "cap_mechanisms": r["cap_mechanisms"],
                           "near_rt_fates": near_rt_fates(r["table"]),
                           "near_rt_time_over_prediction": prediction_ratios(r["table"]),
                           "drains": sum(e["kind"] == "drain" for e in r["events"]),
                           "resumes": sum(e["kind"] == "resume" for e in r["events"]),
                           "swaps": len(r["swaps"])} for p, r in results.items()},
        "table_markdown": lines,
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"total {summary['total_s']:.0f} s; results in {out}")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results/radio_first_replay")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    p.add_argument("--hours", type=float, default=24.0, help="simulated hours replayed (a shortened day: fewer)")
    p.add_argument("--start-hour", type=int, default=0)
    p.add_argument("--speed", type=float, default=360.0, help="trace seconds per replay second")
    p.add_argument("--interval-s", type=float, default=300.0, help="RAN load / KPI interval of the trace")
    p.add_argument("--site-cpus", type=float, default=0.66, help="each site's compute: a slice of this machine")
    p.add_argument("--core-scale", type=float, default=0.65, help="radio compute per site vs the simulator's")
    p.add_argument("--events", type=int, default=60, help="random events per simulated day")
    p.add_argument("--flash", type=float, default=1.0, help="flash crowds per cell-day")
    p.add_argument("--ops-per-hour", type=float, default=30.0)
    p.add_argument("--control-s", type=float, default=0.5, help="radio-first control interval (real seconds)")
    p.add_argument("--sample-s", type=float, default=0.5, help="CPU sampling interval (real seconds)")
    p.add_argument("--tolerance", type=float, default=0.02, help="CPUs of measuring tolerance for violations")
    p.add_argument("--seed", type=int, default=11)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main_async(parse_args())))
