"""Python client for RAN-controller code (xApps, rApps, operator tools)."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Mapping

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from airan.v1 import control_pb2, control_pb2_grpc, netops_pb2, netops_pb2_grpc

PRIORITIES = {"near_rt": netops_pb2.NEAR_RT, "non_rt": netops_pb2.NON_RT, "best_effort": netops_pb2.BEST_EFFORT}


def kpi(name: str, value: float, unit: str = "", cell_id: str = "", time_s: float | None = None) -> netops_pb2.KpiSample:
    sample = netops_pb2.KpiSample(name=name, value=value, unit=unit, cell_id=cell_id)
    if time_s is not None:
        sample.time.FromNanoseconds(int(time_s * 1e9))
    return sample


def parse_kpi(text: str) -> netops_pb2.KpiSample:
    """`NAME=VALUE[unit][@CELL]`, e.g. `DRB.UEThpDl=850kbit/s@bs-01/c1` (the CLI's --kpi)."""
    import re

    match = re.fullmatch(r"\s*([^=\s]+)\s*=\s*([-+0-9.eE]+)\s*([^@]*?)\s*(?:@(\S+))?\s*", text)
    if not match:
        raise ValueError(f"KPI '{text}' is not NAME=VALUE[unit][@CELL]")
    name, value, unit, cell = match.groups()
    return kpi(name, float(value), unit, cell or "")


def build_request(
    question: str,
    *,
    site_ids: Iterable[str] = (),
    cell_ids: Iterable[str] = (),
    kpis: Iterable[netops_pb2.KpiSample] = (),
    priority: str = "best_effort",
    max_tokens: int = 0,
    temperature: float = 0.0,
    controller_id: str = "",
    request_id: str = "",
    deadline_s: float | None = None,
    diagnosis: bool = False,
    model: str = "",
    recent_events: Iterable[str] = (),
    retrieval: bool = True,
    detector_fallback: bool | None = None,
) -> netops_pb2.AskRequest:
    """`deadline_s` is a budget from now, carried as an absolute deadline in the request;
    `retrieval=False` asks a free-text answer without knowledge passages (an evaluation baseline)."""
    request = netops_pb2.AskRequest(
        controller_id=controller_id,
        site_ids=list(site_ids),
        cell_ids=list(cell_ids),
        question=question,
        kpi_context=list(kpis),
        priority=PRIORITIES[priority.lower()],
        max_tokens=max_tokens,
        temperature=temperature,
        request_id=request_id,
        response_mode=netops_pb2.DIAGNOSIS if diagnosis else netops_pb2.FREE_TEXT,
        model=model,
        recent_events=list(recent_events),
        no_retrieval=not retrieval,
    )
    if detector_fallback is not None:  # unset: the server's default
        request.detector_fallback = detector_fallback
    if deadline_s is not None:
        deadline = Timestamp()
        deadline.FromNanoseconds(int((time.time() + deadline_s) * 1e9))
        request.deadline.CopyFrom(deadline)
    return request


class AsyncAiranClient:
    """`async with AsyncAiranClient("127.0.0.1:50051") as c: await c.ask(build_request(...))`.

    Errors surface as `grpc.aio.AioRpcError` whose code and details say what was wrong.
    """

    def __init__(self, target: str, channel_options: list | None = None) -> None:
        self.target = target
        self.channel = grpc.aio.insecure_channel(target, options=channel_options or [])
        self.netops = netops_pb2_grpc.NetOpsServiceStub(self.channel)
        self.control = control_pb2_grpc.ControlServiceStub(self.channel)

    async def __aenter__(self) -> AsyncAiranClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def ask(self, request: netops_pb2.AskRequest, timeout_s: float | None = None) -> netops_pb2.AskResponse:
        return await self.netops.Ask(request, timeout=timeout_s)

    async def ask_stream(
        self, request: netops_pb2.AskRequest, timeout_s: float | None = None
    ) -> AsyncIterator[netops_pb2.AskChunk]:
        async for chunk in self.netops.AskStream(request, timeout=timeout_s):
            yield chunk

    async def topology(self) -> control_pb2.GetTopologyResponse:
        return await self.control.GetTopology(control_pb2.GetTopologyRequest())

    async def replicas(self, site_id: str = "") -> control_pb2.ListReplicasResponse:
        return await self.control.ListReplicas(control_pb2.ListReplicasRequest(site_id=site_id))

    async def drain_site(self, site_id: str, resume: bool = False) -> control_pb2.DrainSiteResponse:
        return await self.control.DrainSite(control_pb2.DrainSiteRequest(site_id=site_id, resume=resume))

    async def report_ran_load(self, loads: Mapping[str, float]) -> control_pb2.ReportRanLoadResponse:
        now = Timestamp()
        now.GetCurrentTime()
        return await self.control.ReportRanLoad(
            control_pb2.ReportRanLoadRequest(
                loads=[control_pb2.SiteRanLoad(site_id=s, ran_compute_share=v, time=now) for s, v in loads.items()]
            )
        )


class AiranClient:
    """Blocking client for controller code without an event loop."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(target)
        self.netops = netops_pb2_grpc.NetOpsServiceStub(self.channel)
        self.control = control_pb2_grpc.ControlServiceStub(self.channel)

    def ask(self, request: netops_pb2.AskRequest, timeout_s: float | None = None) -> netops_pb2.AskResponse:
        return self.netops.Ask(request, timeout=timeout_s)

    def ask_stream(self, request: netops_pb2.AskRequest, timeout_s: float | None = None):
        return self.netops.AskStream(request, timeout=timeout_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> AiranClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
