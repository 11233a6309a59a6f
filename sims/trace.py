"""The on-disk trace: a directory of Parquet tables plus `trace.json`, format version 2 (reads 1).

See sims/TRACE_FORMAT.md for the schema. KPIs and RAN load are streamed to
disk window by window, so a day of 10,000 cells never sits in memory.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sims.events import EVENT_KINDS, KIND_INDEX, EventTable
from sims.kpis import KPI_NAMES, KPIS
from sims.queries import Query
from sims.simulate import SimResult, Simulator, Window, run
from sims.topology import Controller, Topology

FORMAT = "airan-sim-trace"
VERSION = 2
# version 1 lacks the queries' `mode` and `detector_fallback` (read as free text, no fallback)
READABLE_VERSIONS = (1, 2)
META_FILE = "trace.json"
VERSION_KEY = b"airan.trace.version"
TABLE_KEY = b"airan.trace.table"
TABLES = ("sites", "cells", "links", "events", "kpis", "ran_load", "queries")


class TraceFormatError(ValueError):
    """Not a trace this version of airan can read; the message says why."""


def _schema(fields: list[pa.Field], table: str) -> pa.Schema:
    return pa.schema(fields, metadata={VERSION_KEY: str(VERSION).encode(), TABLE_KEY: table.encode()})


_DICT_STR = pa.dictionary(pa.int32(), pa.string())
KPI_SCHEMA = _schema(
    [pa.field("t_s", pa.float64(), nullable=False), pa.field("cell_id", _DICT_STR, nullable=False)]
    + [pa.field(name, pa.float32(), nullable=False) for name in KPI_NAMES],
    "kpis",
)
RAN_LOAD_SCHEMA = _schema(
    [pa.field("t_s", pa.float64(), nullable=False), pa.field("site_id", _DICT_STR, nullable=False),
     pa.field("ran_compute_share", pa.float32(), nullable=False)],
    "ran_load",
)
KPI_SAMPLE_TYPE = pa.struct([
    pa.field("name", pa.string(), nullable=False), pa.field("value", pa.float64(), nullable=False),
    pa.field("unit", pa.string(), nullable=False), pa.field("cell_id", pa.string(), nullable=False),
    pa.field("t_s", pa.float64(), nullable=False),
])
QUERY_SCHEMA = _schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("t_s", pa.float64(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("trigger", pa.string(), nullable=False),
        pa.field("priority", pa.string(), nullable=False),
        pa.field("controller_id", pa.string(), nullable=False),
        pa.field("site_ids", pa.list_(pa.string()), nullable=False),
        pa.field("cell_ids", pa.list_(pa.string()), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("budget_ms", pa.float64(), nullable=False),
        pa.field("max_tokens", pa.int32(), nullable=False),
        pa.field("event_id", pa.string(), nullable=False),
        pa.field("kpi_context", pa.list_(KPI_SAMPLE_TYPE), nullable=False),
        pa.field("mode", pa.string(), nullable=False),
        pa.field("detector_fallback", pa.bool_(), nullable=False),
    ],
    "queries",
)
_QUERY_V2_DEFAULTS = {"mode": "free_text", "detector_fallback": False}
EVENT_SCHEMA = _schema(
    [pa.field("event_id", pa.string(), nullable=False), pa.field("kind", pa.string(), nullable=False),
     pa.field("cell_id", pa.string(), nullable=False), pa.field("site_id", pa.string(), nullable=False),
     pa.field("start_s", pa.float64(), nullable=False), pa.field("duration_s", pa.float64(), nullable=False),
     pa.field("severity", pa.float32(), nullable=False)],
    "events",
)
SITE_SCHEMA = _schema(
    [pa.field("site_id", pa.string(), nullable=False), pa.field("x_km", pa.float64(), nullable=False),
     pa.field("y_km", pa.float64(), nullable=False), pa.field("cores", pa.float32(), nullable=False),
     pa.field("gpus", pa.float32(), nullable=False)],
    "sites",
)
CELL_SCHEMA = _schema(
    [pa.field("cell_id", pa.string(), nullable=False), pa.field("site_id", pa.string(), nullable=False),
     pa.field("area_type", pa.int8(), nullable=False), pa.field("prb", pa.float32(), nullable=False),
     pa.field("prb_khz", pa.float32(), nullable=False), pa.field("base_sinr_db", pa.float32(), nullable=False),
     pa.field("peak_ues", pa.float32(), nullable=False)],
    "cells",
)
LINK_SCHEMA = _schema(
    [pa.field("controller_id", pa.string(), nullable=False), pa.field("site_id", pa.string(), nullable=False),
     pa.field("latency_ms", pa.float32(), nullable=False)],
    "links",
)


def _write(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="zstd")


def _jsonable(obj):
    if is_dataclass(obj):
        return {k: _jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, datetime):
        return obj.isoformat()
    return obj


# -- topology, events, queries <-> tables ---------------------------------------------------------

def topology_tables(t: Topology) -> dict[str, pa.Table]:
    K, S = t.latency_ms.shape
    return {
        "sites": pa.Table.from_arrays(
            [pa.array(t.site_ids.tolist()), t.site_xy_km[:, 0], t.site_xy_km[:, 1], t.site_cores, t.site_gpus],
            schema=SITE_SCHEMA,
        ),
        "cells": pa.Table.from_arrays(
            [pa.array(t.cell_ids.tolist()), pa.array(t.site_ids[t.cell_site].tolist()), t.cell_area, t.cell_prb,
             t.cell_prb_khz, t.cell_base_sinr_db, t.cell_peak_ues],
            schema=CELL_SCHEMA,
        ),
        "links": pa.Table.from_arrays(
            [pa.array(np.repeat(t.controller_ids, S).tolist()), pa.array(np.tile(t.site_ids, K).tolist()),
             t.latency_ms.ravel()],
            schema=LINK_SCHEMA,
        ),
    }


def topology_from_tables(sites: pa.Table, cells: pa.Table, links: pa.Table, controllers: list[dict]) -> Topology:
    site_ids = np.array(sites["site_id"].to_pylist(), dtype=str)
    index = {s: i for i, s in enumerate(site_ids)}
    ctrls = tuple(Controller(**c) for c in controllers)
    lat = np.zeros((len(ctrls), len(site_ids)), dtype=np.float32)
    cidx = {c.id: k for k, c in enumerate(ctrls)}
    for c, s, v in zip(links["controller_id"].to_pylist(), links["site_id"].to_pylist(),
                       links["latency_ms"].to_numpy()):
        lat[cidx[c], index[s]] = v
    col = lambda tb, name: tb[name].to_numpy()  # noqa: E731
    return Topology(
        site_ids=site_ids,
        site_xy_km=np.stack([col(sites, "x_km"), col(sites, "y_km")], axis=1),
        site_cores=col(sites, "cores"),
        site_gpus=col(sites, "gpus"),
        cell_ids=np.array(cells["cell_id"].to_pylist(), dtype=str),
        cell_site=np.array([index[s] for s in cells["site_id"].to_pylist()], dtype=np.int32),
        cell_area=col(cells, "area_type"),
        cell_prb=col(cells, "prb"),
        cell_prb_khz=col(cells, "prb_khz"),
        cell_base_sinr_db=col(cells, "base_sinr_db"),
        cell_peak_ues=col(cells, "peak_ues"),
        controllers=ctrls,
        latency_ms=lat,
    )


def events_table(ev: EventTable, topo: Topology) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array(ev.event_ids.tolist(), pa.string()), pa.array([EVENT_KINDS[k] for k in ev.kind], pa.string()),
         pa.array(topo.cell_ids[ev.cell].tolist(), pa.string()),
         pa.array(topo.site_ids[topo.cell_site[ev.cell]].tolist(), pa.string()),
         ev.start_s, ev.duration_s, ev.severity],
        schema=EVENT_SCHEMA,
    )


def events_from_table(table: pa.Table, topo: Topology) -> EventTable:
    cell_index = {c: i for i, c in enumerate(topo.cell_ids)}
    return EventTable(
        event_ids=np.array(table["event_id"].to_pylist(), dtype=str),
        kind=np.array([KIND_INDEX[k] for k in table["kind"].to_pylist()], dtype=np.int8),
        cell=np.array([cell_index[c] for c in table["cell_id"].to_pylist()], dtype=np.int32),
        start_s=table["start_s"].to_numpy(),
        duration_s=table["duration_s"].to_numpy(),
        severity=table["severity"].to_numpy(),
    )


_QUERY_FIELDS = [f.name for f in QUERY_SCHEMA]


def queries_table(queries: list[Query]) -> pa.Table:
    cols = {name: [getattr(q, name) for q in queries] for name in _QUERY_FIELDS}
    return pa.Table.from_pydict(cols, schema=QUERY_SCHEMA)


def queries_from_table(table: pa.Table) -> list[Query]:
    return [Query(**row) for row in table.to_pylist()]


# -- writing ---------------------------------------------------------------------------------------

class TraceWriter:
    """Streams KPI and RAN-load windows to Parquet; `close()` writes the small tables and trace.json."""

    def __init__(self, path: str | Path, topology: Topology) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.topology = topology
        self._cells = pa.array(topology.cell_ids.tolist(), pa.string())
        self._sites = pa.array(topology.site_ids.tolist(), pa.string())
        # dictionary-encode only the id columns: KPI floats are high-cardinality, where it only costs time
        self._kpis = pq.ParquetWriter(self.path / "kpis.parquet", KPI_SCHEMA, compression="zstd",
                                      use_dictionary=["cell_id"])
        self._load = pq.ParquetWriter(self.path / "ran_load.parquet", RAN_LOAD_SCHEMA, compression="zstd",
                                      use_dictionary=["site_id"])
        self.rows = 0

    def write_window(self, w: Window) -> None:
        T, C, S = w.t_s.shape[0], self.topology.n_cells, self.topology.n_sites
        cells = pa.DictionaryArray.from_arrays(np.tile(np.arange(C, dtype=np.int32), T), self._cells)
        cols = [pa.array(np.repeat(w.t_s, C)), cells]
        cols += [pa.array(np.ascontiguousarray(w.kpis[name], dtype=np.float32).reshape(-1)) for name in KPI_NAMES]
        self._kpis.write_batch(pa.RecordBatch.from_arrays(cols, schema=KPI_SCHEMA))
        sites = pa.DictionaryArray.from_arrays(np.tile(np.arange(S, dtype=np.int32), T), self._sites)
        self._load.write_batch(pa.RecordBatch.from_arrays(
            [pa.array(np.repeat(w.t_s, S)), sites, pa.array(w.ran_share.reshape(-1))], schema=RAN_LOAD_SCHEMA,
        ))
        self.rows += T * C

    def close(self, events: EventTable, queries: list[Query], meta: dict) -> None:
        self._kpis.close()
        self._load.close()
        for name, table in topology_tables(self.topology).items():
            _write(table, self.path / f"{name}.parquet")
        _write(events_table(events, self.topology), self.path / "events.parquet")
        _write(queries_table(queries), self.path / "queries.parquet")
        meta = {
            "format": FORMAT,
            "version": VERSION,
            **meta,
            "n_sites": self.topology.n_sites,
            "n_cells": self.topology.n_cells,
            "n_events": len(events),
            "n_queries": len(queries),
            "kpi_rows": self.rows,
            "controllers": [asdict(c) for c in self.topology.controllers],
            "kpis": [asdict(k) for k in KPIS],
        }
        (self.path / META_FILE).write_text(json.dumps(_jsonable(meta), indent=2) + "\n")

    def abort(self) -> None:
        self._kpis.close()
        self._load.close()


def record_trace(
    sim: Simulator,
    path: str | Path,
    *,
    command: str = "",
    on_window: Callable[[Window], None] | None = None,
    window_intervals: int | None = None,
) -> SimResult:
    """Run the simulation and write everything it produces to `path`."""
    writer = TraceWriter(path, sim.topology)

    def sink(w: Window) -> None:
        writer.write_window(w)
        if on_window is not None:
            on_window(w)

    try:
        result = run(sim, sink, window_intervals)
    except BaseException:
        writer.abort()
        raise
    cfg = sim.config
    writer.close(sim.events, result.queries, {
        "created_by": command or "sims.trace.record_trace",
        "seed": cfg.seed,
        "start": cfg.start.isoformat(),
        "duration_s": cfg.duration_s,
        "interval_s": cfg.interval_s,
        "n_intervals": cfg.n_intervals,
        "truncated_queries": result.truncated_queries,
        "params": {"traffic": cfg.traffic, "radio": cfg.radio, "ranload": cfg.ranload, "queries": cfg.queries},
    })
    return result


# -- reading ---------------------------------------------------------------------------------------

def _table_version(table: pa.Table, file: Path) -> int:
    version = (table.schema.metadata or {}).get(VERSION_KEY)
    readable = {str(v).encode(): v for v in READABLE_VERSIONS}
    if version not in readable:
        raise TraceFormatError(f"{file}: table version {version!r}, this reader reads versions "
                               f"{', '.join(map(str, READABLE_VERSIONS))}")  # fmt: skip
    return readable[version]


def _read_table(path: Path, name: str, schema: pa.Schema) -> pa.Table:
    file = path / f"{name}.parquet"
    if not file.exists():
        raise TraceFormatError(f"{path}: missing {file.name}")
    table = pq.read_table(file)
    version = _table_version(table, file)
    if version == 1 and name == "queries":  # the columns version 2 added, at their defaults
        for col, value in _QUERY_V2_DEFAULTS.items():
            field = schema.field(col)
            table = table.append_column(field, pa.array([value] * table.num_rows, field.type))
    if not table.schema.equals(schema, check_metadata=False):
        raise TraceFormatError(f"{file}: schema differs from version {version}:\n{table.schema}")
    return table


@dataclass(eq=False)
class Trace:
    path: Path
    meta: dict
    topology: Topology
    events: EventTable
    queries: list[Query]
    ran_load: pa.Table

    @property
    def interval_s(self) -> float:
        return float(self.meta["interval_s"])

    @property
    def duration_s(self) -> float:
        return float(self.meta["duration_s"])

    @property
    def start(self) -> datetime:
        return datetime.fromisoformat(self.meta["start"])

    def kpi_table(self, columns: list[str] | None = None, cell_ids: list[str] | None = None) -> pa.Table:
        """KPI rows (read on demand: the table can be large), optionally a few columns and cells."""
        cols = None if columns is None else ["t_s", "cell_id", *[c for c in columns if c not in ("t_s", "cell_id")]]
        table = _read_table_cols(self.path, cols)
        if cell_ids is not None:
            table = table.filter(pc.is_in(pc.cast(table["cell_id"], pa.string()), pa.array(cell_ids, pa.string())))
        return table

    def kpi_array(self, name: str) -> np.ndarray:
        """(T, C) array of one KPI (rows are stored time-major, cells in topology order)."""
        values = self.kpi_table([name])[name].to_numpy()
        return values.reshape(-1, self.topology.n_cells)

    def ran_share_array(self) -> np.ndarray:
        return self.ran_load["ran_compute_share"].to_numpy().reshape(-1, self.topology.n_sites)


def _read_table_cols(path: Path, columns: list[str] | None) -> pa.Table:
    file = path / "kpis.parquet"
    table = pq.read_table(file, columns=columns)
    _table_version(table, file)
    return table


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        raise TraceFormatError(f"{path}: not a trace (no {META_FILE})") from None
    except json.JSONDecodeError as e:
        raise TraceFormatError(f"{path / META_FILE}: not JSON: {e}") from None
    if meta.get("format") != FORMAT:
        raise TraceFormatError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") not in READABLE_VERSIONS:
        raise TraceFormatError(f"{path}: trace version {meta.get('version')!r}, this reader reads versions "
                               f"{', '.join(map(str, READABLE_VERSIONS))}")  # fmt: skip
    return meta


def read_trace(path: str | Path) -> Trace:
    path = Path(path)
    meta = read_meta(path)
    topo = topology_from_tables(
        _read_table(path, "sites", SITE_SCHEMA), _read_table(path, "cells", CELL_SCHEMA),
        _read_table(path, "links", LINK_SCHEMA), meta["controllers"],
    )
    try:  # fail early on a missing or corrupt KPI table; its rows are read on demand
        kpi_schema = pq.read_schema(path / "kpis.parquet")
    except (FileNotFoundError, pa.ArrowInvalid) as e:
        raise TraceFormatError(f"{path}/kpis.parquet: {e}") from None
    if not kpi_schema.equals(KPI_SCHEMA, check_metadata=False):
        raise TraceFormatError(f"{path}/kpis.parquet: schema differs from version {meta['version']}")
    return Trace(
        path=path,
        meta=meta,
        topology=topo,
        events=events_from_table(_read_table(path, "events", EVENT_SCHEMA), topo),
        queries=queries_from_table(_read_table(path, "queries", QUERY_SCHEMA)),
        ran_load=_read_table(path, "ran_load", RAN_LOAD_SCHEMA),
    )
