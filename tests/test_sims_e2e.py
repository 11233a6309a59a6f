"""Replay a short generated trace against the real stack (Ray site nodes, vLLM CPU replicas, gRPC)."""
from __future__ import annotations

import io

import pytest
import yaml
from rich.console import Console

from airan.config import DEFAULT_CONFIG, parse_config
from airan.factory.tiny import ensure_tiny_model
from airan.stack import LocalStack
from airan.store.registry import tiny_params_for
from sims.events import random_events
from sims.queries import QueryParams
from sims.replay import OUTCOMES, ReplayOptions, Replayer, read_results, write_results
from sims.report import per_class, render_tables, write_plots
from sims.simulate import SimConfig, Simulator
from sims.timefmt import parse_start
from sims.topology import topology_from_config
from sims.trace import read_trace, record_trace

pytestmark = pytest.mark.slow


def two_site_config():
    """airan/configs/default.yaml with its first two sites serving the tiny random model, on a free port."""
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw.pop("catalog")  # a file name that only load_config resolves; not needed here
    raw["sites"] = raw["sites"][:2]
    tiny = next((m for m in raw["models"] if m.get("source") == "tiny-random"), None)
    if tiny is None:
        tiny = {"name": "tiny-llama", "source": "tiny-random", "max_model_len": 1024, "dtype": "float32"}
        raw["models"].append(tiny)
    raw["models"] = [tiny]
    raw["replicas"] = [{"site": s["id"], "model": tiny["name"]} for s in raw["sites"]]
    raw["server"] = {**raw.get("server", {}), "host": "127.0.0.1", "port": 0, "grace_s": 1,
                     "default_model": tiny["name"]}
    config = parse_config(raw)
    # the server serves prepared models only (`airan model prepare tiny`)
    ensure_tiny_model(tiny["name"], tiny_params_for(config.model(tiny["name"])))
    return config


def short_trace(config, path):
    topo = topology_from_config(config, seed=3)
    duration = 300.0
    cfg = SimConfig(duration_s=duration, interval_s=5, seed=3, start=parse_start("2025-06-02T18:00:00Z"),
                    queries=QueryParams(summary_every_s=60, ops_per_hour=60))
    record_trace(Simulator(topo, random_events(topo, duration, 4, seed=3), cfg), path)
    return read_trace(path)


async def test_replay_against_the_real_control_plane_ends_every_query_once(tmp_path):
    config = two_site_config()
    trace = short_trace(config, tmp_path / "trace")
    assert 12 <= len(trace.queries) <= 40
    async with LocalStack(config) as stack:
        replayer = Replayer(trace, stack.address, ReplayOptions(speed=60, call_slack_s=20, progress=False))
        await replayer.run()
    outcomes = replayer.book.outcomes()
    assert [o.query_id for o in outcomes] == [q.query_id for q in trace.queries]
    assert sum(replayer.book.counts[k] for k in OUTCOMES) == len(trace.queries)
    served = [o for o in outcomes if o.outcome == "served"]
    assert served, [(o.reason, o.detail) for o in outcomes]
    # the detector answers at the control plane: no site served those
    assert {o.served_site_id for o in served if o.answered_by == "model"} <= {s.id for s in config.sites}
    assert all(o.served_site_id == "" for o in served if o.answered_by == "detector")
    assert all(o.latency_ms > 0 and o.answered_by in ("model", "detector") for o in served)
    # a model answer has tokens; the detector's (a diagnosis no replica could give in time) has none
    assert all((o.completion_tokens > 0) == (o.answered_by == "model") for o in served), [
        (o.kind, o.answered_by, o.completion_tokens) for o in served]
    # every query fits the model and is valid: misses are the plane's decisions, not malformed requests
    assert not [o for o in outcomes if o.reason in ("invalid_argument", "not_found", "client_exception")], [
        (o.reason, o.detail) for o in outcomes if o.outcome == "error"]
    assert replayer.pushes and all(p.ok for p in replayer.pushes)

    path = write_results(tmp_path / "results", replayer.meta(), outcomes, replayer.pushes)
    res = read_results(path)
    buf = io.StringIO()
    render_tables(res, Console(file=buf, width=140))
    assert "Per class" in buf.getvalue() and "bs-01" in buf.getvalue()
    assert sum(r.count for r in per_class(res.outcomes) if r.key != "all") == len(trace.queries)
    files = write_plots(res, trace, tmp_path / "plots")
    assert all(f.stat().st_size > 10_000 for f in files) and len(files) == 3
