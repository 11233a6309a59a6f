"""Proto <-> domain conversion; the only module that knows both.

Servicers build no proto message themselves: every request is read and every
response is built here, so a field added to a proto is handled in one place.
"""
from __future__ import annotations

import time
from collections.abc import Iterable

from airan.config import LimitsConfig, SiteConfig
from airan.core import limits as bounds
from airan.core.diagnosis import Diagnosis
from airan.core.limits import valid_request_id  # noqa: F401  (the interceptors' check of an id)
from airan.serving.gateway import Answer
from airan.core.query import Query, query_from_fields
from airan.core.routing import Priority, ReplicaState, ReplicaView
from airan.serving.sites import SiteState
from airan.v1 import control_pb2, netops_pb2

# A client's request_id is an idempotency key and is echoed in gRPC metadata,
# so it must be a valid metadata value: printable ASCII, no spaces, bounded.
REQUEST_ID_MAX_CHARS = bounds.ID_MAX_CHARS
_DEFAULT_LIMITS = LimitsConfig()


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
_REPLICA_STATE_FROM_PROTO = {v: k for k, v in REPLICA_STATE.items()}


def check_ask_request(req: netops_pb2.AskRequest, limits: LimitsConfig = _DEFAULT_LIMITS) -> None:
    """Every field of an AskRequest within its bound (airan/core/limits.py), before anything is built
    from it: counts first, so a huge list is refused without reading its items."""
    bounds.check_request_id("request_id", req.request_id)
    bounds.check_text("controller_id", req.controller_id, bounds.ID_MAX_CHARS, identifier=True)
    bounds.check_text("question", req.question, limits.max_question_chars)
    bounds.check_text("model", req.model, bounds.MODEL_MAX_CHARS, identifier=True)
    bounds.check_number("max_tokens", req.max_tokens, 0, limits.max_tokens_limit, "0 = the server's default")
    bounds.check_number("temperature", req.temperature, 0.0, limits.max_temperature, "0 = greedy")
    bounds.check_enum("priority", req.priority, _ENUM_NAMES[netops_pb2.PriorityClass])
    bounds.check_enum("response_mode", req.response_mode, _ENUM_NAMES[netops_pb2.ResponseMode])
    bounds.check_items("site_ids", req.site_ids, bounds.MAX_SITE_IDS)
    bounds.check_items("cell_ids", req.cell_ids, bounds.MAX_CELL_IDS, "name the cells the question is about")
    bounds.check_items("kpi_context", req.kpi_context, limits.max_kpi_samples,
                       "send the most recent or most relevant samples")  # fmt: skip
    bounds.check_items("recent_events", req.recent_events, bounds.MAX_RECENT_EVENTS, "send the latest ones")
    for i, site_id in enumerate(req.site_ids):
        bounds.check_text(f"site_ids[{i}]", site_id, bounds.SITE_ID_MAX_CHARS, identifier=True)
    for i, cell_id in enumerate(req.cell_ids):
        bounds.check_text(f"cell_ids[{i}]", cell_id, bounds.CELL_ID_MAX_CHARS, identifier=True)
    for i, event in enumerate(req.recent_events):
        bounds.check_text(f"recent_events[{i}]", event, bounds.EVENT_MAX_CHARS)
    for i, k in enumerate(req.kpi_context):
        bounds.check_text(f"kpi_context[{i}].name", k.name, bounds.KPI_NAME_MAX_CHARS, identifier=True)
        bounds.check_text(f"kpi_context[{i}].unit", k.unit, bounds.KPI_UNIT_MAX_CHARS, identifier=True)
        bounds.check_text(f"kpi_context[{i}].cell_id", k.cell_id, bounds.CELL_ID_MAX_CHARS, identifier=True)
        if k.HasField("time"):
            bounds.check_timestamp(f"kpi_context[{i}].time", k.time.seconds, k.time.nanos)
    if req.HasField("deadline"):
        bounds.check_timestamp("deadline", req.deadline.seconds, req.deadline.nanos)


_ENUM_NAMES = {
    enum: {v.number: v.name for v in enum.DESCRIPTOR.values}
    for enum in (netops_pb2.PriorityClass, netops_pb2.ResponseMode)
}


def query_from_proto(
    req: netops_pb2.AskRequest, now_monotonic: float, grpc_remaining_s: float | None,
    limits: LimitsConfig = _DEFAULT_LIMITS,
) -> Query:  # fmt: skip
    """The effective deadline is the earlier of the request's own and the gRPC call's.

    `request_id` stays the client's idempotency key (empty when none was given). Every field is
    checked against its bound first (`check_ask_request`; `limits`: the server's).
    """
    check_ask_request(req, limits)
    deadlines = []
    if req.HasField("deadline"):
        deadlines.append(now_monotonic + (req.deadline.ToNanoseconds() / 1e9 - time.time()))
    if grpc_remaining_s is not None:
        deadlines.append(now_monotonic + grpc_remaining_s)
    kpis = (
        (k.name, k.value, k.unit, k.cell_id, k.time.ToNanoseconds() / 1e9 if k.HasField("time") else None)
        for k in req.kpi_context
    )
    return query_from_fields(
        req.question,
        req.request_id,
        req.controller_id,
        req.site_ids,
        req.cell_ids,
        kpis,
        priority=_PRIORITY[req.priority],
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        deadline=min(deadlines) if deadlines else None,
        model=req.model,
        mode="diagnosis" if req.response_mode == netops_pb2.DIAGNOSIS else "free_text",
        recent_events=tuple(req.recent_events),
        detector_fallback=req.detector_fallback if req.HasField("detector_fallback") else None,
        retrieval=not req.no_retrieval,
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
        evidence=list(d.evidence),
        detector_cause=netops_pb2.Cause.Value(f"CAUSE_{d.detector_cause}") if d.detector_cause else 0,
        detector_confidence=d.detector_confidence,
        cited_kpis=list(d.cited_kpis),
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
            passage_ids=[c.passage_id for c in a.prompt.passages],
        )
    return out


def citations_to_proto(a: Answer) -> list[netops_pb2.Citation]:
    return [netops_pb2.Citation(passage_id=c.passage_id, title=c.title, score=c.score) for c in a.citations]


_ANSWER_SOURCE = {"model": netops_pb2.ANSWER_SOURCE_MODEL, "detector": netops_pb2.ANSWER_SOURCE_DETECTOR}


def placement_to_proto(a: Answer) -> netops_pb2.Placement:
    return netops_pb2.Placement(
        answered_by=_ANSWER_SOURCE[a.answered_by],
        requested_site_id=a.requested_site_id,
        note=a.routing_note,
        predicted_ms=a.predicted_ms,
        allowed_ms=a.allowed_ms,
        migrations=a.migrations,
    )


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
        citations=citations_to_proto(a),
        citations_dropped=a.citations_dropped,
        unverified_names=list(a.unverified_names),
        placement=placement_to_proto(a),
        **_extras(a),
    )


def answer_to_response(a: Answer) -> netops_pb2.AskResponse:
    return netops_pb2.AskResponse(text=a.text, **_answer_fields(a))


def answer_to_final_chunk(a: Answer, include_text: bool = False) -> netops_pb2.AskChunk:
    return netops_pb2.AskChunk(text_delta=a.text if include_text else "", final=True, **_answer_fields(a))


def delta_chunk(request_id: str, text: str) -> netops_pb2.AskChunk:
    return netops_pb2.AskChunk(request_id=request_id, text_delta=text)


# -- ControlService -------------------------------------------------------------
def site_to_proto(state: SiteState, ray_node_id: str = "", replica_ids: Iterable[str] = ()) -> control_pb2.Site:
    c = state.config
    return control_pb2.Site(
        site_id=c.id,
        cpus=c.cpus,
        gpus=c.gpus,
        memory_gb=c.memory_gb,
        x_km=c.x_km,
        y_km=c.y_km,
        latency_ms=dict(c.latency_ms),
        state=_site_state(state),
        ray_node_id=ray_node_id,
        replica_ids=list(replica_ids),
        ran_compute_share=state.ran_compute_share,
        ai_headroom=state.ai_headroom,
        state_reason="drained by an operator (DrainSite)" if state.drained else state.surge_reason,
        forecast_ran_share=state.forecast.share if state.forecast is not None else 0.0,
        headroom_cpus=state.headroom_cpus or 0.0,
    )


def _site_state(state: SiteState) -> int:
    if state.drained:
        return control_pb2.SITE_DRAINED
    return control_pb2.SITE_SURGED if state.surged else control_pb2.SITE_ACTIVE


def site_from_proto(p: control_pb2.Site) -> tuple[SiteState, str, tuple[str, ...]]:
    """(state, ray node id, replica ids); `ai_headroom` is derived from the compute share, site labels are not sent."""
    config = SiteConfig(
        id=p.site_id, cpus=p.cpus, gpus=p.gpus, memory_gb=p.memory_gb, x_km=p.x_km, y_km=p.y_km,
        latency_ms=dict(p.latency_ms),
    )
    state = SiteState(config, drained=p.state == control_pb2.SITE_DRAINED, ran_compute_share=p.ran_compute_share,
                      surge_reason=p.state_reason if p.state == control_pb2.SITE_SURGED else "")
    return state, p.ray_node_id, tuple(p.replica_ids)


def replica_to_proto(view: ReplicaView, ray_node_id: str = "", max_model_len: int = 0) -> control_pb2.Replica:
    return control_pb2.Replica(
        replica_id=view.replica_id,
        site_id=view.site_id,
        model=view.model,
        state=REPLICA_STATE[view.state],
        load=control_pb2.ReplicaLoad(
            running=view.running, waiting=view.waiting, kv_cache_usage=view.kv_cache_usage, in_flight=view.in_flight
        ),
        ray_node_id=ray_node_id,
        max_model_len=max_model_len,
    )


def replica_from_proto(p: control_pb2.Replica) -> tuple[ReplicaView, str, int]:
    """(view, ray node id, max_model_len); the adapters a replica holds are not sent."""
    view = ReplicaView(
        replica_id=p.replica_id,
        site_id=p.site_id,
        model=p.model,
        state=_REPLICA_STATE_FROM_PROTO[p.state],
        in_flight=p.load.in_flight,
        running=p.load.running,
        waiting=p.load.waiting,
        kv_cache_usage=p.load.kv_cache_usage,
    )
    return view, p.ray_node_id, p.max_model_len


def topology_response(sites: Iterable[control_pb2.Site]) -> control_pb2.GetTopologyResponse:
    return control_pb2.GetTopologyResponse(sites=list(sites))


def list_replicas_response(replicas: Iterable[control_pb2.Replica]) -> control_pb2.ListReplicasResponse:
    return control_pb2.ListReplicasResponse(replicas=list(replicas))


def drain_site_response(site: control_pb2.Site, in_flight: int) -> control_pb2.DrainSiteResponse:
    return control_pb2.DrainSiteResponse(site=site, in_flight=in_flight)


def ran_loads_from_proto(req: control_pb2.ReportRanLoadRequest) -> list[tuple[str, float, float | None]]:
    """(site, share, when the radio measured it in unix seconds, or None when the report has no time).

    The whole batch is checked before any of it is returned, so a bad report refuses the batch and none
    of it is applied."""
    bounds.check_items("loads", req.loads, bounds.MAX_RAN_LOADS, "split the batch")
    for i, load in enumerate(req.loads):
        bounds.check_text(f"loads[{i}].site_id", load.site_id, bounds.SITE_ID_MAX_CHARS, required=True,
                          identifier=True)  # fmt: skip
        bounds.check_share(f"loads[{i}].ran_compute_share (site {load.site_id!r})", load.ran_compute_share)
        if load.HasField("time"):
            bounds.check_timestamp(f"loads[{i}].time", load.time.seconds, load.time.nanos)
    return [
        (load.site_id, load.ran_compute_share, load.time.ToNanoseconds() / 1e9 if load.HasField("time") else None)
        for load in req.loads
    ]


def report_ran_load_response(accepted: int, surged_site_ids: Iterable[str]) -> control_pb2.ReportRanLoadResponse:
    return control_pb2.ReportRanLoadResponse(accepted=accepted, surged_site_ids=list(surged_site_ids))


def check_site_id_request(req: control_pb2.ListReplicasRequest | control_pb2.DrainSiteRequest) -> None:
    """ListReplicas (empty = every site) and DrainSite (a site is required): the site id within its bound."""
    required = isinstance(req, control_pb2.DrainSiteRequest)
    bounds.check_text("site_id", req.site_id, bounds.SITE_ID_MAX_CHARS, required=required, identifier=True)
