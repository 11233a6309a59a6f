"""gRPC servicers: proto in (convert), core call, proto out (convert).

They neither build proto messages (airan/serving/api/convert.py does) nor turn
errors into statuses, mint request ids or time calls (the interceptors in
airan/serving/api/interceptors.py do, for every RPC): an `AiranError` raised
here or in the gateway reaches the caller as its status and message.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

from airan.serving import metrics
from airan.serving.api import convert
from airan.serving.api.interceptors import current_call
from airan.serving.gateway import Delta, Gateway
from airan.serving.sites import SiteState
from airan.v1 import control_pb2_grpc, netops_pb2_grpc

log = logging.getLogger(__name__)


class NetOpsServicer(netops_pb2_grpc.NetOpsServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def _query(self, request, context):
        arrival = time.monotonic()
        query = convert.query_from_proto(request, arrival, context.time_remaining(), self.gateway.config.limits)
        call = current_call()
        call.priority = query.priority.value
        # the caller's scope confines where it is routed (the server's, not the request's, word)
        return replace(query, allowed_sites=call.allowed_sites), arrival, call.request_id

    async def Ask(self, request, context):
        query, arrival, request_id = self._query(request, context)
        answer = await self.gateway.ask(query, arrival, request_id=request_id)
        metrics.observe_answer(query.priority.value, answer.total_ms, answer.ttft_ms)
        return convert.answer_to_response(answer)

    async def AskStream(self, request, context):
        query, arrival, request_id = self._query(request, context)
        sent_text = False
        async for event in self.gateway.stream(query, arrival, request_id=request_id):
            if isinstance(event, Delta):
                sent_text = True
                yield convert.delta_chunk(request_id, event.text)
            else:
                metrics.observe_answer(query.priority.value, event.total_ms, event.ttft_ms)
                # a cached answer (idempotent retry) arrives whole, without deltas
                yield convert.answer_to_final_chunk(event, include_text=not sent_text)


class ControlServicer(control_pb2_grpc.ControlServiceServicer):
    def __init__(self, gateway: Gateway, node_of_site: dict[str, str] | None = None) -> None:
        self.gateway = gateway
        self.node_of_site = node_of_site or {}

    def _site(self, state: SiteState):
        site_id = state.config.id
        replica_ids = [v.replica_id for v in self.gateway.replica_views() if v.site_id == site_id]
        return convert.site_to_proto(state, self.node_of_site.get(site_id, ""), replica_ids)

    async def GetTopology(self, request, context):
        allowed = current_call().allowed_sites  # a site-scoped caller sees only its sites
        return convert.topology_response(
            self._site(s) for s in self.gateway.sites.states() if allowed is None or s.config.id in allowed
        )

    async def ListReplicas(self, request, context):
        convert.check_site_id_request(request)
        if request.site_id:
            self.gateway.sites.get(request.site_id)  # NOT_FOUND, naming the known sites
        nodes = self.gateway.replica_node_ids()
        allowed = current_call().allowed_sites  # a site-scoped caller sees only the replicas at its sites
        return convert.list_replicas_response(
            convert.replica_to_proto(
                v, nodes.get(v.replica_id, ""), self.gateway.config.model(v.model).max_model_len
            )
            for v in self.gateway.replica_views()
            if (not request.site_id or v.site_id == request.site_id) and (allowed is None or v.site_id in allowed)
        )

    async def DrainSite(self, request, context):
        convert.check_site_id_request(request)
        state = self.gateway.sites.set_drained(request.site_id, not request.resume)
        log.info("site %s %s (request %s)", request.site_id, "resumed" if request.resume else "drained",
                 current_call().request_id)
        return convert.drain_site_response(self._site(state), self.gateway.site_in_flight(request.site_id))

    async def ReportRanLoad(self, request, context):
        loads = convert.ran_loads_from_proto(request)  # every report within bounds, or none applied
        for site_id, _, _ in loads:
            self.gateway.sites.get(site_id)  # NOT_FOUND before any of the batch is applied
        surged = []
        for site_id, share, at in loads:
            if self.gateway.sites.report_ran_load(site_id, share, at):
                surged.append(site_id)
            metrics.SITE_AI_HEADROOM.labels(site_id).set(1 - share)
        return convert.report_ran_load_response(len(loads), surged)
