"""Radio-traffic simulator: topology, traffic, KPIs, events, RAN load, query traces, replay, report.

Public API (imported lazily, so `airan --help` does not load numpy and pyarrow):

    generate_topology, topology_from_config      sims.topology
    random_events, flash_crowds, events_from_specs, EventTable, EVENT_KINDS   sims.events
    SimConfig, Simulator, run                     sims.simulate
    KPIS, KPI_NAMES, KPI_UNITS                    sims.kpis
    QueryParams, Query                            sims.queries
    record_trace, read_trace, Trace               sims.trace
    Replayer, ReplayOptions, read_results         sims.replay
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "generate_topology": "sims.topology", "topology_from_config": "sims.topology", "Topology": "sims.topology",
    "random_events": "sims.events", "flash_crowds": "sims.events", "events_from_specs": "sims.events",
    "EventTable": "sims.events", "EVENT_KINDS": "sims.events",
    "SimConfig": "sims.simulate", "Simulator": "sims.simulate", "run": "sims.simulate",
    "KPIS": "sims.kpis", "KPI_NAMES": "sims.kpis", "KPI_UNITS": "sims.kpis",
    "QueryParams": "sims.queries", "Query": "sims.queries",
    "record_trace": "sims.trace", "read_trace": "sims.trace", "Trace": "sims.trace",
    "Replayer": "sims.replay", "ReplayOptions": "sims.replay", "read_results": "sims.replay",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sims' has no attribute {name!r}")
