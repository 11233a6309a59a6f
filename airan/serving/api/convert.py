"""Proto <-> domain conversion; the only module that knows both."""
from __future__ import annotations

import time

from airan.core.diagnosis import Diagnosis
from airan.serving.gateway import Answer
from airan.core.query import KpiSample, Query
from airan.core.routing import Priority, ReplicaState
from airan.v1 import control_pb2, netops_pb2

_PRIORITY = {
    netops_pb2.PRIORITY_CLASS_UNSPECIFIED: Priority.BEST_EFFORT,
    netops_pb2.NEAR_RT: Priority.NEAR_RT,
    netops_pb2.NON_RT: Priority.NON_RT,
    netops_pb2.BEST_EFFORT: Priority.BEST_EFFORT,
}
REPLICA_STATE = {
    ReplicaState.STARTING: control_pb2.REPLICA_STARTING,
    ReplicaState.READY: control_pb2.REPLICA_READY,
    ReplicaState.DRAINING: control_pb2.REPLICA_DRAINING,
    ReplicaState.FAILED: control_pb2.REPLICA_FAILED,
    ReplicaState.STOPPED: control_pb2.REPLICA_STOPPED,
}


def query_from_proto(req: netops_pb2.AskRequest, now_monotonic: float, grpc_remaining_s: float | None) -> Query:
    """The effective deadline is the earlier of the request's own and the gRPC call's."""
    deadlines = []
    if req.HasField("deadline"):
        deadlines.append(now_monotonic + (req.deadline.ToNanoseconds() / 1e9 - time.time()))
    if grpc_remaining_s is not None:
        deadlines.append(now_monotonic + grpc_remaining_s)
    return Query(
        question=req.question,
        request_id=req.request_id,
        controller_id=req.controller_id,
        site_ids=tuple(req.site_ids),
        cell_ids=tuple(req.cell_ids),
        kpis=tuple(
            KpiSample(
                k.name,
                k.value,
                k.unit,
                k.cell_id,
                k.time.ToNanoseconds() / 1e9 if k.HasField("time") else None,
            )
            for k in req.kpi_context
        ),
        priority=_PRIORITY.get(req.priority, Priority.BEST_EFFORT),
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        deadline=min(deadlines) if deadlines else None,
        model=req.model,
        mode="diagnosis" if req.response_mode == netops_pb2.DIAGNOSIS else "free_text",
        recent_events=tuple(req.recent_events),
    )


def diagnosis_to_proto(d: Diagnosis) -> netops_pb2.Diagnosis:
    return netops_pb2.Diagnosis(
        cause=netops_pb2.Cause.Value(f"CAUSE_{d.cause}"),
        affected_cell_ids=list(d.affected_cell_ids),
        severity=netops_pb2.Severity.Value(f"SEVERITY_{d.severity}"),
        actions=[
            netops_pb2.RecommendedAction(
                type=netops_pb2.ActionType.Value(f"ACTION_{a.type}"),
                target_cell_id=a.target_cell_id,
                value=a.value,
                unit=a.unit,
            )
            for a in d.actions
        ],
        confidence=d.confidence,
        rationale=d.rationale,
    )


def _extras(a: Answer) -> dict:
    out = {}
    if a.diagnosis is not None:
        out["diagnosis"] = diagnosis_to_proto(a.diagnosis)
    if a.prompt is not None:
        out["prompt"] = netops_pb2.PromptInfo(
            prompt_version=a.prompt.version,
            context_rows=a.prompt.context_rows,
            context_rows_dropped=a.prompt.context_rows_dropped,
        )
    return out


def timings(a: Answer) -> netops_pb2.Timings:
    return netops_pb2.Timings(queue_ms=a.queue_ms, ttft_ms=a.ttft_ms, total_ms=a.total_ms)


def _answer_fields(a: Answer) -> dict:
    """Fields AskResponse and the final AskChunk share."""
    return dict(
        request_id=a.request_id,
        prompt_tokens=a.prompt_tokens,
        completion_tokens=a.completion_tokens,
        replica_id=a.replica_id,
        site_id=a.site_id,
        model=a.model,
        finish_reason=a.finish_reason,
        timings=timings(a),
        **_extras(a),
    )


def answer_to_response(a: Answer) -> netops_pb2.AskResponse:
    return netops_pb2.AskResponse(text=a.text, **_answer_fields(a))


def answer_to_final_chunk(a: Answer, include_text: bool = False) -> netops_pb2.AskChunk:
    return netops_pb2.AskChunk(text_delta=a.text if include_text else "", final=True, **_answer_fields(a))
