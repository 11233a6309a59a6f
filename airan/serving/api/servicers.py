"""gRPC servicers: proto in, core call, proto out; domain errors become statuses."""
from __future__ import annotations

import logging
import time
import uuid
from dataclasses import replace

import grpc

from airan.serving import metrics
from airan.serving.api.convert import REPLICA_STATE, answer_to_final_chunk, answer_to_response, query_from_proto
from airan.errors import AiranError
from airan.serving.gateway import Answer, Delta, Gateway
from airan.v1 import control_pb2, control_pb2_grpc, netops_pb2, netops_pb2_grpc

log = logging.getLogger(__name__)


async def _abort(context: grpc.aio.ServicerContext, error: Exception, method: str, priority: str):
    if isinstance(error, AiranError):
        code, message = grpc.StatusCode[error.kind.value], error.message
    else:  # a bug, not the caller's fault: log it, answer INTERNAL, keep serving
        log.exception("%s failed", method, exc_info=error)
        code, message = grpc.StatusCode.INTERNAL, f"internal error ({type(error).__name__}); see server log"
    metrics.QUERIES.labels(method, priority, code.name).inc()
    await context.abort(code, message)


def _observe(method: str, priority: str, answer: Answer) -> None:
    metrics.QUERIES.labels(method, priority, "OK").inc()
    metrics.LATENCY.labels(priority).observe(answer.total_ms / 1000)
    metrics.TTFT.labels(priority).observe(answer.ttft_ms / 1000)


class NetOpsServicer(netops_pb2_grpc.NetOpsServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def _query(self, request, context):
        arrival = time.monotonic()
        query = query_from_proto(request, arrival, context.time_remaining())
        if not query.request_id:
            query = replace(query, request_id=uuid.uuid4().hex)
        return query, arrival

    async def Ask(self, request, context):
        query, arrival = self._query(request, context)
        try:
            answer = await self.gateway.ask(query, arrival)
        except Exception as e:
            await _abort(context, e, "Ask", query.priority.value)
        _observe("Ask", query.priority.value, answer)
        return answer_to_response(answer)

    async def AskStream(self, request, context):
        query, arrival = self._query(request, context)
        sent_text = False
        try:
            async for event in self.gateway.stream(query, arrival):
                if isinstance(event, Delta):
                    sent_text = True
                    yield netops_pb2.AskChunk(request_id=query.request_id, text_delta=event.text)
                else:
                    _observe("AskStream", query.priority.value, event)
                    # a cached answer (idempotent retry) arrives whole, without deltas
                    yield answer_to_final_chunk(event, include_text=not sent_text)
        except Exception as e:
            await _abort(context, e, "AskStream", query.priority.value)


class ControlServicer(control_pb2_grpc.ControlServiceServicer):
    def __init__(self, gateway: Gateway, node_of_site: dict[str, str] | None = None) -> None:
        self.gateway = gateway
        self.node_of_site = node_of_site or {}

    def _site(self, state) -> control_pb2.Site:
        c = state.config
        return control_pb2.Site(
            site_id=c.id,
            cpus=c.cpus,
            gpus=c.gpus,
            memory_gb=c.memory_gb,
            x_km=c.x_km,
            y_km=c.y_km,
            latency_ms=c.latency_ms,
            state=control_pb2.SITE_DRAINED if state.drained else control_pb2.SITE_ACTIVE,
            ray_node_id=self.node_of_site.get(c.id, ""),
            replica_ids=[v.replica_id for v in self.gateway.pool.views() if v.site_id == c.id],
            ran_compute_share=state.ran_compute_share,
            ai_headroom=state.ai_headroom,
        )

    async def GetTopology(self, request, context):
        return control_pb2.GetTopologyResponse(sites=[self._site(s) for s in self.gateway.sites.states()])

    async def ListReplicas(self, request, context):
        if request.site_id and request.site_id not in self.gateway.sites:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown site '{request.site_id}'; known sites: {', '.join(self.gateway.sites.ids)}",
            )
        nodes = {d.view.replica_id: d.node_id for d in getattr(self.gateway.pool, "details", list)()}
        replicas = []
        for v in self.gateway.replica_views():
            if request.site_id and v.site_id != request.site_id:
                continue
            replicas.append(
                control_pb2.Replica(
                    replica_id=v.replica_id,
                    site_id=v.site_id,
                    model=v.model,
                    state=REPLICA_STATE[v.state],
                    load=control_pb2.ReplicaLoad(
                        running=v.running, waiting=v.waiting, kv_cache_usage=v.kv_cache_usage, in_flight=v.in_flight
                    ),
                    ray_node_id=nodes.get(v.replica_id, ""),
                    max_model_len=self.gateway.config.model(v.model).max_model_len,
                )
            )
        return control_pb2.ListReplicasResponse(replicas=replicas)

    async def DrainSite(self, request, context):
        try:
            state = self.gateway.sites.set_drained(request.site_id, not request.resume)
        except AiranError as e:
            await context.abort(grpc.StatusCode[e.kind.value], e.message)
        log.info("site %s %s", request.site_id, "resumed" if request.resume else "drained")
        return control_pb2.DrainSiteResponse(
            site=self._site(state), in_flight=self.gateway.site_in_flight(request.site_id)
        )

    async def ReportRanLoad(self, request, context):
        surged = []
        try:
            for load in request.loads:
                if self.gateway.sites.report_ran_load(load.site_id, load.ran_compute_share):
                    surged.append(load.site_id)
                metrics.SITE_AI_HEADROOM.labels(load.site_id).set(1 - load.ran_compute_share)
        except AiranError as e:
            await context.abort(grpc.StatusCode[e.kind.value], e.message)
        return control_pb2.ReportRanLoadResponse(accepted=len(request.loads), surged_site_ids=surged)
