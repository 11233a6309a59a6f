"""grpc.aio server interceptors: what every RPC passes through before and after its servicer.

`server_interceptors()` builds the chain, outermost first:

1. `RequestIdInterceptor`: the one place a call's request id is minted. A
   client's `request_id` field (its idempotency key) is the id when it is well
   formed; otherwise the caller's `x-request-id` metadata when well formed (a
   tracing id, not an idempotency key); otherwise a fresh one is minted. It is echoed in trailing metadata
   (`x-request-id`) on answers and errors alike, and is what the server logs.
2. `MetricsInterceptor`: latency per RPC and status code (and queries per
   priority) into airan/serving/metrics.py's collectors.
3. `ErrorInterceptor`: the one mapping from exceptions to gRPC statuses
   (`status_for`); an unexpected exception becomes INTERNAL carrying the request
   id, is logged with it, and the server keeps serving.
4. `AuthInterceptor` (auth.mode mtls or token): the caller's identity (its
   certificate or token, airan/serving/auth.py) and its scope and rate
   (airan/core/authz.py): UNAUTHENTICATED, PERMISSION_DENIED or
   RESOURCE_EXHAUSTED (with `retry-after-ms` in the trailing metadata) before
   the servicer runs; an AskRequest without controller_id gets the identity, and
   the call its scope's sites (`Call.allowed_sites`: routing and views are confined to them).
   Health and reflection are open to every caller that passed TLS (probes carry
   no token; `grpcurl list` works).
5. `MalformedRequestInterceptor` (airan/serving/api/malformed.py): a request whose
   bytes do not parse reaches the chain as INVALID_ARGUMENT instead of grpc's UNKNOWN.

The id is minted here rather than in the gateway because every RPC needs one
(ControlService calls and calls that fail before reaching the gateway too: the
INTERNAL message and the metadata name it), and only the gRPC layer sees every
call. The gateway mints nothing: it answers under the id it is given.

To add an interceptor: subclass `CallInterceptor`, implement
`scope` (an async context manager around the servicer call), and add it to
`server_interceptors()`. One that refuses calls goes after `ErrorInterceptor`
and raises `AiranError`, so its refusals are mapped, counted and carry the id
like any other error.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc

from airan.config import AuthConfig
from airan.core.authz import Authorizer, Refusal
from airan.errors import AiranError, ErrorKind
from airan.serving import metrics
from airan.serving.auth import Authenticator
from airan.serving.api.convert import valid_request_id
from airan.serving.api.malformed import MalformedRequestInterceptor, Unparsed

log = logging.getLogger(__name__)

REQUEST_ID_METADATA = "x-request-id"
RETRY_AFTER_METADATA = "retry-after-ms"  # on RESOURCE_EXHAUSTED for a caller over its rate

# The one mapping from domain errors to gRPC statuses (tests check every kind is here).
STATUS_OF_KIND: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorKind.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
}


@dataclass
class Call:
    """What the chain knows about the RPC being served; one per call (see `current_call`)."""

    method: str  # "airan.v1.NetOpsService/Ask"
    request_id: str
    priority: str = ""  # set by the NetOps servicer: queries are also counted per priority
    controller: str = ""  # the authenticated caller ("" under auth.mode none)
    # the sites the caller's scope confines it to (None: every site, and under auth.mode none):
    # where its queries are routed and which sites its views show
    allowed_sites: frozenset[str] | None = None
    reason: str = ""  # why the call was refused (metrics), set where its error is mapped


_CALL: ContextVar[Call] = ContextVar("airan_grpc_call")


def current_call() -> Call:
    """The RPC being served by this task (set by `RequestIdInterceptor`)."""
    try:
        return _CALL.get()
    except LookupError:
        raise RuntimeError("no RPC context: build the server with server_interceptors()") from None


def new_request_id() -> str:
    return uuid.uuid4().hex


def status_for(error: Exception, request_id: str) -> tuple[grpc.StatusCode, str]:
    """The status and message a caller gets for an exception (the one mapping)."""
    if isinstance(error, AiranError):
        return STATUS_OF_KIND.get(error.kind, grpc.StatusCode.INTERNAL), error.message
    return (
        grpc.StatusCode.INTERNAL,
        f"internal error ({type(error).__name__}), request id {request_id}: the server log has the details "
        "under this id; retry, and report the id if it persists",
    )


# -- the chain ----------------------------------------------------------------------
Behavior = Callable[..., Any]


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Runs `scope` around every RPC's servicer call: unary or streaming, coroutine or generator."""

    def scope(self, method: str, request: Any, context: grpc.aio.ServicerContext):
        """An async context manager entered before the servicer runs and left after it ends or raises."""
        raise NotImplementedError

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return None
        method = handler_call_details.method.lstrip("/")
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: self._wrap(behavior, method)})
        return handler

    def _wrap(self, behavior: Behavior, method: str) -> Behavior:
        scope = self.scope
        if inspect.isasyncgenfunction(behavior):

            async def streamed(request, context) -> AsyncIterator[Any]:
                async with scope(method, request, context):
                    async for response in behavior(request, context):
                        yield response

            return streamed
        if inspect.iscoroutinefunction(behavior):  # unary, or streaming through context.write

            async def awaited(request, context):
                async with scope(method, request, context):
                    return await behavior(request, context)

            return awaited
        return behavior  # synchronous handlers (none here) run in grpc's thread pool, unwrapped


class RequestIdInterceptor(CallInterceptor):
    @asynccontextmanager
    async def scope(self, method, request, context):
        key = getattr(request, "request_id", "")
        # a malformed key is refused by convert.query_from_proto; the call still gets an id: without a
        # valid key, the caller's x-request-id metadata when well formed (a tracing id: it names the
        # call in logs and answers but is no idempotency key), else a fresh one
        if isinstance(key, str) and valid_request_id(key):
            request_id = key
        elif valid_request_id(sent := _metadata_request_id(context)):
            request_id = sent
        else:
            request_id = new_request_id()
        _CALL.set(Call(method, request_id))  # this RPC's task only
        context.set_trailing_metadata(((REQUEST_ID_METADATA, request_id),))
        yield


class MetricsInterceptor(CallInterceptor):
    @asynccontextmanager
    async def scope(self, method, request, context):
        started = time.perf_counter()
        code = None
        try:
            yield
            code = _code_name(context.code()) or "OK"
        except grpc.aio.AbortError:
            code = _code_name(context.code()) or "UNKNOWN"
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "UNKNOWN"  # grpc's own answer to an exception nothing mapped
            raise
        finally:
            call = _CALL.get(None)
            metrics.observe_rpc(method, code or "CANCELLED", time.perf_counter() - started,
                                call.priority if call else "", call.reason if call else "")  # fmt: skip


class ErrorInterceptor(CallInterceptor):
    @asynccontextmanager
    async def scope(self, method, request, context):
        try:
            yield
        except grpc.aio.AbortError:  # already a status
            raise
        except Exception as e:
            call = _CALL.get(None)
            request_id = call.request_id if call else "?"
            code, message = status_for(e, request_id)
            if call is not None and isinstance(e, AiranError):
                call.reason = e.reason
            if isinstance(e, AiranError):
                log.info("request %s: %s -> %s: %s", request_id, method, code.name, message)
            else:  # a bug, not the caller's fault: log it under the id, answer INTERNAL, keep serving
                log.exception("request %s: %s failed", request_id, method, exc_info=e)
            await context.abort(code, message)


def _metadata_request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's x-request-id metadata ("" when none)."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA and isinstance(value, str):
            return value
    return ""


def _code_name(code: Any) -> str | None:
    if code is None:
        return None
    if isinstance(code, grpc.StatusCode):
        return code.name
    try:  # grpc.aio reports the cygrpc integer status after an abort
        return next(c.name for c in grpc.StatusCode if c.value[0] == int(code))
    except (StopIteration, TypeError, ValueError):
        return str(code)


def sites_named(rpc: str, request: Any) -> list[str]:
    """The sites a request names (a scope's `sites` applies to them); none for one that did not parse."""
    if isinstance(request, Unparsed):
        return []
    if rpc in ("Ask", "AskStream"):
        return list(request.site_ids)
    if rpc == "DrainSite":
        return [request.site_id]
    if rpc == "ReportRanLoad":
        return [load.site_id for load in request.loads]
    if rpc == "ListReplicas":
        return [request.site_id] if request.site_id else []
    return []


# open to every caller that passed TLS: probes carry no token, and the API's schema is public (the protos)
OPEN_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                           "grpc.reflection.v1.ServerReflection"})
ASK_RPCS = frozenset({"Ask", "AskStream"})


class AuthInterceptor(CallInterceptor):
    def __init__(self, authenticator: Authenticator, authorizer: Authorizer) -> None:
        self.authenticator = authenticator
        self.authorizer = authorizer

    @asynccontextmanager
    async def scope(self, method, request, context):
        service, _, rpc = method.rpartition("/")
        if service in OPEN_SERVICES:
            yield
            return
        identity, why = self.authenticator.identify(context)
        asks = rpc in ASK_RPCS and not isinstance(request, Unparsed)
        controller_id = request.controller_id if asks else ""
        refusal = (
            self.authorizer.check(identity, rpc, sites_named(rpc, request), controller_id)
            if identity else Refusal(ErrorKind.UNAUTHENTICATED, why, "unauthenticated")
        )  # fmt: skip
        call = _CALL.get(None)
        if refusal is not None:
            if refusal.retry_after_s and call is not None:
                context.set_trailing_metadata(((REQUEST_ID_METADATA, call.request_id),
                                               (RETRY_AFTER_METADATA, str(math.ceil(refusal.retry_after_s * 1000)))))  # fmt: skip
            raise AiranError(refusal.kind, refusal.message, refusal.reason)
        if call is not None:
            call.controller = identity
            call.allowed_sites = self.authorizer.allowed_sites(identity)
        if asks and not controller_id:
            request.controller_id = identity  # the caller asks as itself
        yield


def server_interceptors(auth: AuthConfig | None = None) -> list[grpc.aio.ServerInterceptor]:
    """The chain every RPC passes, outermost first (see the module docstring to add one); with
    auth.mode mtls or token, callers are identified and held to their scopes before the request
    is checked further."""
    chain: list[grpc.aio.ServerInterceptor] = [RequestIdInterceptor(), MetricsInterceptor(), ErrorInterceptor()]
    if auth is not None and auth.mode != "none":
        chain.append(AuthInterceptor(Authenticator(auth), Authorizer.from_config(auth)))
    return [*chain, MalformedRequestInterceptor()]
