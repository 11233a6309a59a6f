"""Python client for RAN-controller code (xApps, rApps, operator tools)."""
from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from airan.core.authz import LOCAL_OPERATOR, default_key_file, issue_token, read_or_create_key
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


# -- credentials (README "Security") ----------------------------------------------------
TOKEN_ENV = "AIRAN_TOKEN"  # a bearer token for the server (airan auth token --controller ID)
TLS_ENV = {"ca_file": "AIRAN_TLS_CA", "cert_file": "AIRAN_TLS_CERT", "key_file": "AIRAN_TLS_KEY",
           "server_name": "AIRAN_TLS_SERVER_NAME"}  # fmt: skip
LOCAL_TOKEN_TTL_S = 12 * 3600
_LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


@dataclass(frozen=True)
class ClientTLS:
    """TLS to the server: the CA that signed its certificate, and for mutual TLS this caller's own
    certificate and key (PEM files); `server_name` when the target is not the name it was issued for."""

    ca_file: str
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""

    @classmethod
    def from_env(cls) -> ClientTLS | None:
        """From AIRAN_TLS_CA (required), AIRAN_TLS_CERT, AIRAN_TLS_KEY and AIRAN_TLS_SERVER_NAME."""
        values = {field: os.environ.get(env, "") for field, env in TLS_ENV.items()}
        return cls(**values) if values["ca_file"] else None

    def credentials(self) -> grpc.ChannelCredentials:
        read = lambda f: Path(f).expanduser().read_bytes() if f else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def local_token(target: str, key_file: Path | None = None) -> str | None:
    """The caller's bearer token when none is given: $AIRAN_TOKEN; else, for a server on this machine,
    a `local-operator` token signed with this user's local key (the one a local server in auth mode
    token made); else None. The local key never signs a token for another host."""
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    host = target.rsplit(":", 1)[0] if not target.startswith("[") else target.split("]")[0] + "]"
    path = key_file or default_key_file()
    if host not in _LOOPBACK or not path.exists():
        return None
    return issue_token(read_or_create_key(path), LOCAL_OPERATOR, LOCAL_TOKEN_TTL_S)


def _with_token(details, token: str):
    metadata = [*(details.metadata or ()), ("authorization", f"Bearer {token}")]
    return details._replace(metadata=metadata) if hasattr(details, "_replace") else details.__class__(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)  # fmt: skip


# Add `authorization: Bearer <token>` to every call (stubs used directly included). grpc.aio files an
# interceptor under its first kind only, so each kind is its own class.
class _AsyncBearerUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self.token), request)


class _AsyncBearerStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self.token), request)


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self.token = token

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(_with_token(client_call_details, self.token), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(_with_token(client_call_details, self.token), request)


class AsyncAiranClient:
    """`async with AsyncAiranClient("127.0.0.1:50051") as c: await c.ask(build_request(...))`.

    Errors surface as `grpc.aio.AioRpcError` whose code and details say what was wrong.
    Credentials: `tls` (default: ClientTLS.from_env()) and `token` (default: `local_token(target)`;
    "" sends none).
    """

    def __init__(self, target: str, channel_options: list | None = None, *, token: str | None = None,
                 tls: ClientTLS | None = None) -> None:  # fmt: skip
        self.target = target
        tls = tls or ClientTLS.from_env()
        token = local_token(target) if token is None else token
        options = [*(channel_options or []), *(tls.options() if tls else [])]
        interceptors = [_AsyncBearerUnary(token), _AsyncBearerStream(token)] if token else None
        self.channel = grpc.aio.secure_channel(target, tls.credentials(), options=options, interceptors=interceptors) \
            if tls else grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)  # fmt: skip
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

    def __init__(self, target: str, *, token: str | None = None, tls: ClientTLS | None = None) -> None:
        tls = tls or ClientTLS.from_env()
        token = local_token(target) if token is None else token
        channel = grpc.secure_channel(target, tls.credentials(), options=tls.options()) if tls \
            else grpc.insecure_channel(target)  # fmt: skip
        self.channel = grpc.intercept_channel(channel, _Bearer(token)) if token else channel
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
