"""`airan sim ...` commands: generate a trace, inspect it, replay it against airan, report."""
from __future__ import annotations

import asyncio
import shlex
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Simulate radio traffic, record and replay query traces.", no_args_is_help=True)


def _fail(message: str) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(1)


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


@app.command()
def generate(
    out: Annotated[Path, typer.Argument(help="trace directory to write")],
    sites: Annotated[Optional[int], typer.Option(help="number of sites (1-3 cells each)")] = None,
    cells: Annotated[Optional[int], typer.Option(help="exact number of cells instead of --sites")] = None,
    config: Annotated[Optional[Path], typer.Option(help="take site ids, positions, latencies from this airan config")] = None,
    duration: Annotated[str, typer.Option(help="simulated time, e.g. 10m, 2h, 1d")] = "1d",
    interval: Annotated[str, typer.Option(help="KPI granularity period, 1s .. 15m")] = "60s",
    start: Annotated[str, typer.Option(help="ISO start of the period (UTC if no zone)")] = "2025-06-02T00:00:00Z",
    seed: Annotated[int, typer.Option(help="same seed, same trace")] = 0,
    events: Annotated[Optional[int], typer.Option(help="random events, kinds in turn (default: ~0.3 per cell-day, at least 6)")] = None,
    event: Annotated[Optional[list[str]], typer.Option(help="KIND:CELL@START+DURATION[:SEVERITY], repeatable")] = None,
    flash_per_cell_day: Annotated[float, typer.Option(help="flash-crowd rate")] = 0.1,
    summary_every: Annotated[str, typer.Option(help="periodic KPI summary per site (0 = none)")] = "15m",
    ops_per_hour: Annotated[float, typer.Option(help="operator questions per hour, whole network")] = 12.0,
    load_scale: Annotated[float, typer.Option(help="scales every cell's busy-hour UEs")] = 1.0,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Simulate a period of radio traffic and record KPIs, RAN load, events and queries."""
    from tqdm import tqdm

    from sims.events import EVENT_KINDS, events_from_specs, flash_crowds, random_events
    from sims.queries import QueryParams
    from sims.simulate import SimConfig, Simulator
    from sims.timefmt import parse_duration, parse_start
    from sims.topology import generate_topology, topology_from_config
    from sims.trace import record_trace
    from sims.traffic import TrafficParams

    try:
        duration_s, interval_s = parse_duration(duration), parse_duration(interval)
        summary_s = parse_duration(summary_every)
        if config is not None:
            from airan.config import load_config

            topo = topology_from_config(load_config(config), seed=seed)
        elif cells is not None:
            topo = generate_topology(n_cells=cells, seed=seed)
        else:
            topo = generate_topology(sites if sites is not None else 3, seed=seed)
        n_random = events if events is not None else max(
            len(EVENT_KINDS), round(0.3 * topo.n_cells * duration_s / 86400))
        ev = random_events(topo, duration_s, n_random, seed, min_duration_s=min(2 * interval_s, duration_s))
        ev = ev.concat(flash_crowds(topo, duration_s, flash_per_cell_day, seed)).concat(
            events_from_specs(event or [], topo))
        cfg = SimConfig(
            duration_s=duration_s, interval_s=interval_s, seed=seed, start=parse_start(start),
            traffic=TrafficParams(interval_s=interval_s, load_scale=load_scale),
            queries=QueryParams(summary_every_s=summary_s, ops_per_hour=ops_per_hour),
        )
        sim = Simulator(topo, ev, cfg)
    except Exception as e:  # configuration mistakes: say what, exit 1
        raise _fail(f"generate: {e}") from None
    step = sim.default_window_intervals()
    bar = tqdm(total=cfg.n_intervals, unit="interval", disable=not progress, file=sys.stderr)
    t0 = time.perf_counter()
    given = {"sites": sites, "cells": cells, "config": config, "duration": duration, "interval": interval,
             "start": start, "seed": seed, "events": events, "flash-per-cell-day": flash_per_cell_day,
             "summary-every": summary_every, "ops-per-hour": ops_per_hour, "load-scale": load_scale}
    command = "airan sim generate " + " ".join(
        [shlex.quote(str(out))] + [f"--{k} {shlex.quote(str(v))}" for k, v in given.items() if v is not None]
        + [f"--event {shlex.quote(e)}" for e in event or []])
    result = record_trace(sim, out, command=command, on_window=lambda w: bar.update(w.t_s.shape[0]),
                          window_intervals=step)
    bar.close()
    elapsed = time.perf_counter() - t0
    by_class = Counter(q.priority for q in result.queries)
    typer.echo(
        f"{out}: {topo.n_sites} sites, {topo.n_cells} cells, {cfg.n_intervals} intervals of {interval_s:g} s, "
        f"{topo.n_cells * cfg.n_intervals:,} KPI rows, {len(ev)} events, {len(result.queries)} queries "
        f"({', '.join(f'{k} {v}' for k, v in sorted(by_class.items()))}); "
        f"{_dir_size(Path(out)) / 1e6:.2f} MB in {elapsed:.1f} s"
    )
    if result.truncated_queries:
        typer.echo(f"warning: {result.truncated_queries} queries over the cap were left out", err=True)


@app.command()
def info(trace: Annotated[Path, typer.Argument(help="trace directory")]) -> None:
    """Describe a trace: topology, events, queries per class and kind."""
    from rich.console import Console
    from rich.table import Table

    from sims.events import EVENT_KINDS
    from sims.trace import TraceFormatError, read_trace

    try:
        tr = read_trace(trace)
    except TraceFormatError as e:
        raise _fail(str(e)) from None
    m = tr.meta
    console = Console()
    console.print(
        f"[bold]{trace}[/] {m['format']} v{m['version']}: {m['n_sites']} sites, {m['n_cells']} cells, "
        f"{m['n_intervals']} x {m['interval_s']:g} s from {m['start']}, seed {m['seed']}, "
        f"{m['kpi_rows']:,} KPI rows"
    )
    t = Table(title="Queries", title_justify="left")
    for col in ("class", "kind", "mode", "count", "median budget ms"):
        t.add_column(col)
    groups: dict[tuple[str, str, str], list[float]] = {}
    for q in tr.queries:
        mode = q.mode + (" + fallback" if q.detector_fallback else "")
        groups.setdefault((q.priority, q.kind, mode), []).append(q.budget_ms)
    for (p, k, mode), b in sorted(groups.items()):
        t.add_row(p, k, mode, str(len(b)), f"{sorted(b)[len(b) // 2]:,.0f}")
    console.print(t)
    ev = tr.events
    t = Table(title=f"Events ({len(ev)})", title_justify="left")
    for col in ("id", "kind", "cell", "start s", "duration s", "severity"):
        t.add_column(col)
    for e in range(min(len(ev), 30)):
        t.add_row(str(ev.event_ids[e]), EVENT_KINDS[ev.kind[e]], str(tr.topology.cell_ids[ev.cell[e]]),
                  f"{ev.start_s[e]:.0f}", f"{ev.duration_s[e]:.0f}", f"{ev.severity[e]:.2f}")
    console.print(t)


@app.command()
def sites(trace: Annotated[Path, typer.Argument(help="trace directory")]) -> None:
    """Print the trace's sites as an airan config `sites:` block, to serve the same topology."""
    import yaml

    from sims.trace import TraceFormatError, read_trace

    try:
        tr = read_trace(trace)
    except TraceFormatError as e:
        raise _fail(str(e)) from None
    typer.echo(yaml.safe_dump({"sites": tr.topology.site_configs()}, sort_keys=False))


@app.command()
def replay(
    trace: Annotated[Path, typer.Argument(help="trace directory")],
    target: Annotated[str, typer.Option(help="airan gRPC address")] = "127.0.0.1:50051",
    speed: Annotated[float, typer.Option(help="trace seconds per replay second")] = 60.0,
    out: Annotated[Optional[Path], typer.Option(help="results directory (default results/<trace>-<time>)")] = None,
    call_slack: Annotated[float, typer.Option(help="seconds a call may run past its deadline budget")] = 10.0,
    grace: Annotated[Optional[float], typer.Option(help="seconds to wait for answers after the last query")] = None,
    ran_load: Annotated[bool, typer.Option(help="push the trace's RAN load with ReportRanLoad")] = True,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Send the trace's queries (open loop, at trace time / speed) and record every outcome."""
    from tqdm import tqdm

    from sims.replay import ReplayOptions, Replayer, write_results
    from sims.trace import TraceFormatError, read_trace

    try:
        tr = read_trace(trace)
        replayer = Replayer(tr, target, ReplayOptions(
            speed=speed, call_slack_s=call_slack, grace_s=grace, push_ran_load=ran_load, progress=progress))
    except (TraceFormatError, ValueError) as e:
        raise _fail(f"replay: {e}") from None
    if out is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out = Path("results") / f"{Path(trace).resolve().name}-{stamp}"
    last = max((q.t_s for q in tr.queries), default=0.0) / speed
    typer.echo(f"replaying {len(tr.queries)} queries to {target} over ~{last:.0f} s "
               f"(+ up to {replayer.grace_s:.0f} s for answers)", err=True)
    bar = tqdm(total=len(tr.queries), unit="query", disable=not progress, file=sys.stderr)

    def on_record(o) -> None:
        bar.update(1)
        c = replayer.book.counts
        bar.set_postfix(served=c["served"], shed=c["shed"], error=c["error"], refresh=False)

    replayer.book.on_record = on_record
    code = 0
    try:
        asyncio.run(replayer.run())
    except KeyboardInterrupt:
        code = 130
    finally:
        bar.close()
    path = write_results(out, replayer.meta(), replayer.book.outcomes(), replayer.pushes)
    c = replayer.book.counts
    typer.echo(f"{path}: {len(replayer.book)} outcomes (served {c['served']}, shed {c['shed']}, "
               f"error {c['error']}); next: airan sim report {path}")
    if c["error"] and all(o.reason == "connect_failed" for o in replayer.book.outcomes()):
        code = 1
    raise typer.Exit(code)


@app.command()
def report(
    results: Annotated[Path, typer.Argument(help="results directory from `airan sim replay`")],
    trace: Annotated[Optional[Path], typer.Option(help="the replayed trace (default: the path in replay.json)")] = None,
    out: Annotated[Optional[Path], typer.Option(help="where to write PNGs (default RESULTS/plots)")] = None,
    bins: Annotated[int, typer.Option(help="time bins of the attainment plot")] = 30,
) -> None:
    """Print per-class and per-site SLO tables and write PNG plots."""
    from rich.console import Console

    from sims.replay import read_results
    from sims.report import plot_attainment, plot_cell_load, plot_latency_cdf, render_tables
    from sims.trace import TraceFormatError, read_trace

    try:
        res = read_results(results)
    except ValueError as e:
        raise _fail(str(e)) from None
    console = Console(width=None if sys.stdout.isatty() else 130)  # tables stay readable in logs and pipes
    render_tables(res, console)
    out = out or results / "plots"
    out.mkdir(parents=True, exist_ok=True)
    files = [plot_latency_cdf(res.outcomes, out / "latency_cdf.png"),
             plot_attainment(res.outcomes, out / "attainment.png", bins=bins)]
    trace_path = trace or Path(res.meta.get("trace", ""))
    try:
        files.insert(0, plot_cell_load(read_trace(trace_path), out / "cell_load.png"))
    except TraceFormatError as e:
        console.print(f"[yellow]no cell-load plot: {e} (pass --trace)[/]")
    for f in files:
        console.print(f"wrote {f}")
