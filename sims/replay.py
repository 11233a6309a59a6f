"""Replay a trace against a running airan control plane, open loop.

Pure part: `build_schedule` turns the trace into a timed list of actions
(RAN-load pushes and queries at trace time / speed), `ask_request` builds the
AskRequest a query stands for, `classify` names an RPC's outcome, and
`OutcomeBook` holds exactly one outcome per query.

Shell: `Replayer.run()` fires each action at its time without waiting for
earlier answers (open loop), with a per-call timeout of budget + slack, and
stops at the schedule's end + a grace period. Whatever happens (errors,
Ctrl-C, the end of the grace period), every query leaves with one outcome:
served, shed or error.

Speed scales the gaps between arrivals only: a query's deadline budget is
real time, as the controller would have it.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from google.protobuf.timestamp_pb2 import Timestamp

from airan.v1 import control_pb2, netops_pb2
from sims.queries import Query
from sims.trace import Trace

RESULTS_FORMAT = "airan-sim-results"
RESULTS_VERSION = 2  # 2 added `answered_by` and `predicted_ms`; version 1 results read with their defaults
OUTCOMES = ("served", "shed", "error")
RESPONSE_MODE_PROTO = {"free_text": netops_pb2.FREE_TEXT, "diagnosis": netops_pb2.DIAGNOSIS}
ANSWER_SOURCE = {netops_pb2.ANSWER_SOURCE_MODEL: "model", netops_pb2.ANSWER_SOURCE_DETECTOR: "detector"}
PRIORITY_PROTO = {"NEAR_RT": netops_pb2.NEAR_RT, "NON_RT": netops_pb2.NON_RT, "BEST_EFFORT": netops_pb2.BEST_EFFORT}
SHED_CODES = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED")
# UNAVAILABLE also means 'no connection'; these details come from the transport, not the control plane
TRANSPORT_MARKERS = (
    "failed to connect", "connection refused", "socket closed", "connection reset", "dns resolution",
    "goaway", "broken pipe", "connection attempt timed out", "endpoint is closing", "ssl",
)
# the control plane's DEADLINE_EXCEEDED after dispatch ("... while replica X was answering")
AFTER_DISPATCH_MARKERS = ("was answering", "mid-answer")


# -- pure core -------------------------------------------------------------------------------------

@dataclass(frozen=True, order=True)
class Action:
    due_s: float  # seconds after the replay starts
    order: int  # at equal times: RAN load (0) before queries (1), so a query sees the load of its time
    kind: str  # "ran_load" | "ask"
    index: int  # query index, or row index into the RAN-load times


def build_schedule(query_times: np.ndarray, load_times: np.ndarray, speed: float) -> list[Action]:
    """Actions in firing order; trace time 0 fires at replay time 0."""
    if not speed > 0 or not math.isfinite(speed):
        raise ValueError("speed must be a positive number")
    acts = [Action(float(t) / speed, 0, "ran_load", i) for i, t in enumerate(load_times)]
    acts += [Action(float(t) / speed, 1, "ask", i) for i, t in enumerate(query_times)]
    acts.sort()
    return acts


def _timestamp(unix_s: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(round(unix_s * 1e9)))
    return ts


def ask_request(q: Query, *, now_unix: float, request_id: str, trace_start_unix: float) -> netops_pb2.AskRequest:
    """The AskRequest for a query sent at `now_unix`: deadline = send time + budget.

    KPI sample times stay on the trace's clock (its start + t_s), like the question text. A query that
    does not opt in to the detector's fallback leaves it unset: the server's default.
    """
    request = netops_pb2.AskRequest(
        controller_id=q.controller_id,
        site_ids=list(q.site_ids),
        cell_ids=list(q.cell_ids),
        question=q.question,
        kpi_context=[
            netops_pb2.KpiSample(
                name=k["name"], value=k["value"], unit=k["unit"], cell_id=k["cell_id"],
                time=_timestamp(trace_start_unix + k["t_s"]),
            )
            for k in q.kpi_context
        ],
        priority=PRIORITY_PROTO[q.priority],
        max_tokens=q.max_tokens,
        temperature=0.0,
        request_id=request_id,
        deadline=_timestamp(now_unix + q.budget_ms / 1000.0),
        response_mode=RESPONSE_MODE_PROTO[q.mode],
    )
    if q.detector_fallback:
        request.detector_fallback = True
    return request


def ran_load_request(site_ids: list[str], shares: np.ndarray, now_unix: float) -> control_pb2.ReportRanLoadRequest:
    ts = _timestamp(now_unix)
    return control_pb2.ReportRanLoadRequest(loads=[
        control_pb2.SiteRanLoad(site_id=s, ran_compute_share=float(v), time=ts) for s, v in zip(site_ids, shares)
    ])


def classify(code: str, details: str, client_timed_out: bool = False) -> tuple[str, str]:
    """(outcome, reason) for an RPC that ended with status `code`."""
    d = details.lower()
    if code == "OK":
        return "served", "answered"
    if client_timed_out:
        return "error", "client_timeout"
    if code in ("UNAVAILABLE", "RESOURCE_EXHAUSTED") and any(m in d for m in TRANSPORT_MARKERS):
        return "error", "transport"
    if code == "DEADLINE_EXCEEDED" and any(m in d for m in AFTER_DISPATCH_MARKERS):
        return "error", "deadline_during_generation"
    if code == "UNAVAILABLE" and "mid-answer" in d:
        return "error", "replica_failed"
    if code in SHED_CODES:
        return "shed", {"RESOURCE_EXHAUSTED": "overloaded", "UNAVAILABLE": "no_replica",
                        "DEADLINE_EXCEEDED": "deadline_before_dispatch"}[code]
    return "error", code.lower() or "unknown"


@dataclass
class Outcome:
    query_id: str
    t_s: float  # trace time of the query
    kind: str
    priority: str
    controller_id: str
    site_id: str  # the query's preferred site
    cell_id: str
    budget_ms: float
    ran_share: float  # the trace's RAN compute share at the preferred site when the query was due
    outcome: str = "error"
    reason: str = ""
    code: str = ""
    detail: str = ""
    scheduled_s: float = math.nan  # replay time it was due
    sent_s: float = math.nan  # replay time it was sent
    latency_ms: float = math.nan  # send -> answer or status, as the client saw it
    met_deadline: bool = False
    served_site_id: str = ""
    replica_id: str = ""
    model: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queue_ms: float = math.nan
    ttft_ms: float = math.nan
    server_total_ms: float = math.nan
    answered_by: str = ""  # served: "model" or "detector" (the fast detector, when no replica could in time)
    predicted_ms: float = math.nan  # served by a model under a deadline: admission's predicted answer time


OUTCOME_SCHEMA = pa.schema(
    [
        pa.field(f.name, {"str": pa.string(), "float": pa.float64(), "int": pa.int64(), "bool": pa.bool_()}[f.type])
        for f in fields(Outcome)
    ],
    metadata={b"airan.results.version": str(RESULTS_VERSION).encode()},
)


class DuplicateOutcome(RuntimeError):
    pass


class OutcomeBook:
    """One slot per query; a second outcome for the same query is a bug and raises."""

    def __init__(self, templates: list[Outcome]) -> None:
        self.templates = templates
        self.slots: list[Outcome | None] = [None] * len(templates)
        self.counts: Counter[str] = Counter()
        self.on_record: Callable[[Outcome], None] | None = None

    def __len__(self) -> int:
        return len(self.slots)

    def recorded(self, i: int) -> bool:
        return self.slots[i] is not None

    def record(self, i: int, **values) -> Outcome:
        if self.slots[i] is not None:
            raise DuplicateOutcome(f"query {self.templates[i].query_id} already has an outcome")
        out = Outcome(**{**asdict(self.templates[i]), **values})
        if out.outcome not in OUTCOMES:
            raise ValueError(f"unknown outcome {out.outcome!r}")
        self.slots[i] = out
        self.counts[out.outcome] += 1
        if self.on_record is not None:
            self.on_record(out)
        return out

    def fill_missing(self, reason: str, detail: str = "") -> int:
        n = 0
        for i, slot in enumerate(self.slots):  # bounded by the number of queries
            if slot is None:
                self.record(i, outcome="error", reason=reason, detail=detail)
                n += 1
        return n

    def outcomes(self) -> list[Outcome]:
        missing = sum(s is None for s in self.slots)
        if missing:
            raise RuntimeError(f"{missing} queries have no outcome yet")
        return list(self.slots)  # type: ignore[arg-type]


def outcome_templates(trace: Trace) -> list[Outcome]:
    topo = trace.topology
    times = np.unique(trace.ran_load["t_s"].to_numpy())
    shares = trace.ran_share_array()
    site_index = {s: i for i, s in enumerate(topo.site_ids)}
    out = []
    for q in trace.queries:  # bounded by the number of queries
        site = q.site_ids[0] if q.site_ids else ""
        row = int(np.searchsorted(times, q.t_s, side="right")) - 1
        share = float(shares[row, site_index[site]]) if site in site_index and row >= 0 else math.nan
        out.append(Outcome(
            query_id=q.query_id, t_s=q.t_s, kind=q.kind, priority=q.priority, controller_id=q.controller_id,
            site_id=site, cell_id=q.cell_ids[0] if q.cell_ids else "", budget_ms=q.budget_ms, ran_share=share,
        ))
    return out


# -- shell -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReplayOptions:
    speed: float = 60.0
    call_slack_s: float = 10.0  # a call may run this long past its budget, to see late answers
    grace_s: float | None = None  # after the last action; None = the longest call timeout + 1 s
    max_in_flight: int = 10_000  # beyond this the client itself is the bottleneck: record, do not send
    push_ran_load: bool = True
    # the time a RAN-load report carries: "wall" (when it is pushed) or "trace" (the trace's own
    # clock, its start + t_s: a forecast of the radio's load then sees the trace's time of day)
    ran_load_time: str = "wall"
    # when a RAN-load row is pushed: "start" of its interval (the row's label), or "end", when the
    # trace format says it becomes visible to a controller (the radio reports what it needed over
    # the interval just past, so a controller acting on it must forecast the next one)
    ran_load_at: str = "start"
    connect_timeout_s: float = 10.0
    ran_load_timeout_s: float = 5.0
    progress: bool = True


@dataclass
class Push:
    t_s: float
    sent_s: float
    ok: bool
    code: str
    latency_ms: float
    surged_site_ids: list[str] = field(default_factory=list)


PUSH_SCHEMA = pa.schema([
    pa.field("t_s", pa.float64()), pa.field("sent_s", pa.float64()), pa.field("ok", pa.bool_()),
    pa.field("code", pa.string()), pa.field("latency_ms", pa.float64()),
    pa.field("surged_site_ids", pa.list_(pa.string())),
])


def _default_client(target: str):
    from airan.client import AsyncAiranClient

    return AsyncAiranClient(target)


class Replayer:
    def __init__(
        self,
        trace: Trace,
        target: str,
        options: ReplayOptions = ReplayOptions(),
        *,
        client_factory: Callable[[str], object] = _default_client,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.trace = trace
        self.target = target
        self.opt = options
        self.client_factory = client_factory
        self.wall = wall_clock
        self.book = OutcomeBook(outcome_templates(trace))
        self.pushes: list[Push] = []
        self.run_id = uuid.uuid4().hex[:8]  # request ids unique per run: the server caches answers by id
        self.started_at: str = ""
        self.wall_s = 0.0
        self.interrupted = False
        self.stopped_early = 0
        self.t0: float | None = None  # the event loop's time at replay time 0 (samplers align on it)
        self._load_times = np.unique(trace.ran_load["t_s"].to_numpy())
        self._shares = trace.ran_share_array()
        self._site_ids = [str(s) for s in trace.topology.site_ids]
        self._trace_start_unix = trace.start.timestamp()
        if options.ran_load_at not in ("start", "end"):
            raise ValueError(f"ran_load_at must be 'start' or 'end', got {options.ran_load_at!r}")
        # seconds after its label that a RAN-load row is pushed (and, on the trace clock, stamped)
        self._load_delay_s = trace.interval_s if options.ran_load_at == "end" else 0.0
        self.schedule = build_schedule(
            np.array([q.t_s for q in trace.queries]),
            self._load_times + self._load_delay_s if options.push_ran_load else np.array([]),
            options.speed,
        )

    def call_timeout_s(self, q: Query) -> float:
        return q.budget_ms / 1000.0 + self.opt.call_slack_s

    @property
    def grace_s(self) -> float:
        if self.opt.grace_s is not None:
            return self.opt.grace_s
        longest = max((self.call_timeout_s(q) for q in self.trace.queries), default=0.0)
        return longest + 1.0

    async def _ask(self, client, i: int, scheduled: float, t0: float) -> None:
        loop = asyncio.get_running_loop()
        q = self.trace.queries[i]
        sent = loop.time()
        base = {"scheduled_s": scheduled, "sent_s": sent - t0}
        timeout = self.call_timeout_s(q)
        try:
            request = ask_request(q, now_unix=self.wall(), request_id=f"{self.run_id}-{q.query_id}",
                                  trace_start_unix=self._trace_start_unix)
            resp = await client.netops.Ask(request, timeout=timeout)
        except asyncio.CancelledError:
            self.book.record(i, outcome="error", reason="interrupted" if self.interrupted else "cancelled_at_end",
                             latency_ms=1000 * (loop.time() - sent), **base)
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes an outcome
            elapsed = loop.time() - sent
            code_fn = getattr(e, "code", None)
            if callable(code_fn):  # grpc.aio.AioRpcError
                code = code_fn().name
                details = (e.details() or "")[:300]
                timed_out = code == "DEADLINE_EXCEEDED" and elapsed >= 0.98 * timeout
                outcome, reason = classify(code, details, timed_out)
            else:
                code, details, (outcome, reason) = "", f"{type(e).__name__}: {e}"[:300], ("error", "client_exception")
            self.book.record(i, outcome=outcome, reason=reason, code=code, detail=details,
                             latency_ms=1000 * elapsed, **base)
        else:
            latency = 1000 * (loop.time() - sent)
            # detail: the placement's note, why it was served away from its site or by the detector
            self.book.record(
                i, outcome="served", reason="answered", code="OK", latency_ms=latency, detail=resp.placement.note[:300],
                met_deadline=latency <= q.budget_ms, served_site_id=resp.site_id, replica_id=resp.replica_id,
                model=resp.model, finish_reason=resp.finish_reason, prompt_tokens=resp.prompt_tokens,
                completion_tokens=resp.completion_tokens, queue_ms=resp.timings.queue_ms,
                ttft_ms=resp.timings.ttft_ms, server_total_ms=resp.timings.total_ms,
                answered_by=ANSWER_SOURCE.get(resp.placement.answered_by, ""),
                predicted_ms=resp.placement.predicted_ms or math.nan, **base,
            )

    def _stamp(self, t_s: float) -> float:
        return self._trace_start_unix + t_s if self.opt.ran_load_time == "trace" else self.wall()

    async def _push(self, client, row: int, t0: float) -> None:
        loop = asyncio.get_running_loop()
        sent = loop.time()
        t_s = float(self._load_times[row])
        try:
            resp = await client.control.ReportRanLoad(
                ran_load_request(self._site_ids, self._shares[row], self._stamp(t_s + self._load_delay_s)),
                timeout=self.opt.ran_load_timeout_s,
            )
            self.pushes.append(Push(t_s, sent - t0, True, "OK", 1000 * (loop.time() - sent),
                                    list(resp.surged_site_ids)))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a failed push is recorded, the replay goes on
            code_fn = getattr(e, "code", None)
            code = code_fn().name if callable(code_fn) else type(e).__name__
            self.pushes.append(Push(t_s, sent - t0, False, code, 1000 * (loop.time() - sent)))

    async def run(self) -> None:
        """Fire the schedule; returns when every query has an outcome (also on cancellation)."""
        loop = asyncio.get_running_loop()
        self.started_at = datetime.now(timezone.utc).isoformat()
        tasks: set[asyncio.Task] = set()
        t0 = loop.time()
        try:
            async with self.client_factory(self.target) as client:
                channel = getattr(client, "channel", None)
                if channel is not None:
                    try:
                        await asyncio.wait_for(channel.channel_ready(), self.opt.connect_timeout_s)
                    except TimeoutError:
                        self.book.fill_missing("connect_failed", f"no connection to {self.target} "
                                               f"within {self.opt.connect_timeout_s:g} s")
                        return
                t0 = self.t0 = loop.time()
                for act in self.schedule:  # bounded by the schedule's length
                    delay = t0 + act.due_s - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if act.kind == "ran_load":
                        task = loop.create_task(self._push(client, act.index, t0))
                    elif sum(not t.done() for t in tasks) >= self.opt.max_in_flight:
                        self.book.record(act.index, outcome="error", reason="client_backlog",
                                         scheduled_s=act.due_s,
                                         detail=f"{self.opt.max_in_flight} queries already in flight")
                        continue
                    else:
                        task = loop.create_task(self._ask(client, act.index, act.due_s, t0))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.wait(set(tasks), timeout=self.grace_s)
                self.stopped_early = sum(not t.done() for t in tasks)
        except asyncio.CancelledError:
            self.interrupted = True
            raise
        finally:
            for t in list(tasks):
                t.cancel()
            if tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
            self.book.fill_missing("interrupted" if self.interrupted else "not_sent")
            self.wall_s = loop.time() - t0

    def meta(self) -> dict:
        return {
            "format": RESULTS_FORMAT,
            "version": RESULTS_VERSION,
            "trace": str(Path(self.trace.path).resolve()),
            "target": self.target,
            "run_id": self.run_id,
            "started_at": self.started_at,
            "wall_s": round(self.wall_s, 3),
            "interrupted": self.interrupted,
            "stopped_at_grace_end": self.stopped_early,
            "options": asdict(self.opt),
            "n_queries": len(self.book),
            "counts": {k: self.book.counts.get(k, 0) for k in OUTCOMES},
            "ran_load_pushes": len(self.pushes),
            "ran_load_push_failures": sum(not p.ok for p in self.pushes),
        }


# -- results on disk -------------------------------------------------------------------------------

def outcomes_table(outcomes: list[Outcome]) -> pa.Table:
    cols = {f.name: [getattr(o, f.name) for o in outcomes] for f in fields(Outcome)}
    return pa.Table.from_pydict(cols, schema=OUTCOME_SCHEMA)


def write_results(path: str | Path, meta: dict, outcomes: list[Outcome], pushes: list[Push]) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(outcomes_table(outcomes), path / "outcomes.parquet", compression="zstd")
    pushes = sorted(pushes, key=lambda p: (p.sent_s, p.t_s))
    pq.write_table(
        pa.Table.from_pydict({f.name: [getattr(p, f.name) for p in pushes] for f in fields(Push)}, schema=PUSH_SCHEMA),
        path / "ran_load_pushes.parquet", compression="zstd",
    )
    (path / "replay.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return path


@dataclass
class Results:
    path: Path
    meta: dict
    outcomes: pa.Table
    pushes: pa.Table


def read_results(path: str | Path) -> Results:
    path = Path(path)
    try:
        meta = json.loads((path / "replay.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: not replay results (no replay.json)") from None
    if meta.get("format") != RESULTS_FORMAT or meta.get("version") not in (1, RESULTS_VERSION):
        raise ValueError(f"{path}: results format {meta.get('format')!r} v{meta.get('version')!r}, "
                         f"expected {RESULTS_FORMAT!r} v1 or v{RESULTS_VERSION}")
    outcomes = pq.read_table(path / "outcomes.parquet")
    for f in fields(Outcome):  # version 1: the columns version 2 added, at their defaults
        if f.name not in outcomes.column_names:
            field = OUTCOME_SCHEMA.field(f.name)
            outcomes = outcomes.append_column(field, pa.array([f.default] * outcomes.num_rows, field.type))
    return Results(path, meta, outcomes, pq.read_table(path / "ran_load_pushes.parquet"))
