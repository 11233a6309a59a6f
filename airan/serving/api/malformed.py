"""Requests whose bytes are not a valid message get INVALID_ARGUMENT, like any other bad input.

grpc parses a request before any interceptor or servicer sees it, and answers a
parse failure itself with UNKNOWN ("Unexpected DecodeError"), no request id and
nothing counted. `MalformedRequestInterceptor` (the innermost of the chain,
airan/serving/api/interceptors.py) swaps each method's parser for one that
keeps the failure as an `Unparsed` request, and refuses that before the
servicer runs: the outer interceptors give the call an id, count it and map
the refusal like any other.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import grpc

from airan.errors import AiranError, invalid


@dataclass(frozen=True)
class Unparsed:
    """What a request that could not be parsed becomes; it has no fields (no request_id)."""

    method: str
    reason: str

    def error(self) -> AiranError:
        return invalid(f"the request to {self.method} is not a valid message of its type ({self.reason}); "
                       "send it with the airan.v1 protos")  # fmt: skip


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler  # unknown method, raw bytes, or a client stream (the reflection service)
        method = handler_call_details.method.lstrip("/")
        parse = handler.request_deserializer

        def tolerant_parse(data: bytes):
            try:
                return parse(data)
            except Exception as e:  # DecodeError, bad UTF-8 in a string field, ...
                return Unparsed(method, str(e) or type(e).__name__)

        kind = "unary_stream" if handler.response_streaming else "unary_unary"
        behavior = getattr(handler, kind)
        if inspect.isasyncgenfunction(behavior):

            async def streamed(request, context):
                if isinstance(request, Unparsed):
                    raise request.error()
                async for response in behavior(request, context):
                    yield response

            wrapped = streamed
        elif inspect.iscoroutinefunction(behavior):

            async def awaited(request, context):
                if isinstance(request, Unparsed):
                    raise request.error()
                return await behavior(request, context)

            wrapped = awaited
        else:
            return handler  # synchronous handlers (none here): grpc's own parse error stands
        return handler._replace(request_deserializer=tolerant_parse, **{kind: wrapped})
