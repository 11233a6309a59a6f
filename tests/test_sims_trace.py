"""Trace format: round trip, versioning, schema checks, the committed example."""
from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from airan.cli import app
from sims.events import random_events
from sims.kpis import KPI_NAMES
from sims.simulate import SimConfig, Simulator
from sims.timefmt import parse_start
from sims.topology import generate_topology
from sims.trace import VERSION, TraceFormatError, read_trace, record_trace

EXAMPLE = Path(__file__).resolve().parents[1] / "sims" / "examples" / "city-3sites"


def make_sim(seed=5):
    topo = generate_topology(5, seed=seed)
    cfg = SimConfig(duration_s=1200, interval_s=20, seed=seed, start=parse_start("2025-06-02T19:00:00"))
    return Simulator(topo, random_events(topo, 1200, 6, seed), cfg)


def test_round_trip_is_identical(tmp_path):
    sim = make_sim()
    windows = []
    result = record_trace(sim, tmp_path / "t", on_window=windows.append, window_intervals=7)
    tr = read_trace(tmp_path / "t")
    assert tr.meta["version"] == VERSION and tr.meta["format"] == "airan-sim-trace"
    assert tr.topology.equals(sim.topology)
    assert tr.events.equals(sim.events)
    assert tr.queries == result.queries and len(tr.queries) > 0
    for name in KPI_NAMES:
        expected = np.concatenate([w.kpis[name] for w in windows])
        assert np.array_equal(tr.kpi_array(name), expected, equal_nan=True), name
    assert np.array_equal(tr.ran_share_array(), np.concatenate([w.ran_share for w in windows]))
    assert tr.start == sim.config.start and tr.interval_s == 20 and tr.duration_s == 1200
    # every Parquet table carries the format version in its schema metadata
    for f in (tmp_path / "t").glob("*.parquet"):
        assert pq.read_schema(f).metadata[b"airan.trace.version"] == str(VERSION).encode()


def test_reading_a_few_cells_and_columns(tmp_path):
    record_trace(make_sim(), tmp_path / "t")
    tr = read_trace(tmp_path / "t")
    cells = [str(c) for c in tr.topology.cell_ids[:2]]
    table = tr.kpi_table(["RRU.PrbTotDl"], cell_ids=cells)
    assert table.column_names == ["t_s", "cell_id", "RRU.PrbTotDl"]
    assert set(table["cell_id"].cast(pa.string()).to_pylist()) == set(cells)
    assert table.num_rows == 2 * tr.meta["n_intervals"]


def test_other_versions_and_broken_traces_are_refused(tmp_path):
    record_trace(make_sim(), tmp_path / "t")
    meta_file = tmp_path / "t" / "trace.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "version": VERSION + 1}))
    with pytest.raises(TraceFormatError, match="version"):
        read_trace(tmp_path / "t")
    meta_file.write_text(json.dumps(meta))
    events = pq.read_table(tmp_path / "t" / "events.parquet")
    pq.write_table(events.drop(["severity"]).replace_schema_metadata(events.schema.metadata),
                   tmp_path / "t" / "events.parquet")
    with pytest.raises(TraceFormatError, match="schema"):
        read_trace(tmp_path / "t")
    with pytest.raises(TraceFormatError, match="not a trace"):
        read_trace(tmp_path / "nothing-here")


def test_a_version_1_trace_reads_its_queries_as_free_text_without_fallback(tmp_path):
    record_trace(make_sim(), tmp_path / "t")
    now = read_trace(tmp_path / "t")
    assert any(q.mode == "diagnosis" and q.detector_fallback for q in now.queries)
    # rewrite it as version 1 wrote it: no mode / detector_fallback columns, version 1 everywhere
    meta_file = tmp_path / "t" / "trace.json"
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "version": 1}))
    for f in (tmp_path / "t").glob("*.parquet"):
        table = pq.read_table(f)
        if f.name == "queries.parquet":
            table = table.drop(["mode", "detector_fallback"])
        meta = {**table.schema.metadata, b"airan.trace.version": b"1"}
        pq.write_table(table.replace_schema_metadata(meta), f)
    old = read_trace(tmp_path / "t")
    assert [q.mode for q in old.queries] == ["free_text"] * len(now.queries)
    assert not any(q.detector_fallback for q in old.queries)
    assert [q.question for q in old.queries] == [q.question for q in now.queries]


def test_the_committed_example_is_small_loads_and_is_reproduced_by_its_command(tmp_path):
    size = sum(f.stat().st_size for f in EXAMPLE.iterdir())
    assert size < 1_000_000
    tr = read_trace(EXAMPLE)
    assert tr.topology.n_sites == 3 and 10 <= len(tr.queries) <= 99
    args = shlex.split(tr.meta["created_by"])
    assert args[:3] == ["airan", "sim", "generate"]
    args[3] = str(tmp_path / "again")
    result = CliRunner().invoke(app, [*args[1:], "--no-progress"])
    assert result.exit_code == 0, result.output
    again = read_trace(tmp_path / "again")
    assert again.queries == tr.queries and again.events.equals(tr.events) and again.topology.equals(tr.topology)
    for name in KPI_NAMES:
        assert np.array_equal(again.kpi_array(name), tr.kpi_array(name), equal_nan=True)
