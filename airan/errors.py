"""Domain errors with the gRPC status each maps to (the core never imports grpc)."""
from __future__ import annotations

from enum import Enum


class ErrorKind(str, Enum):
    # values are grpc.StatusCode names
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"
    # the caller could not be identified (no or bad token / certificate), or may not do this
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"


class AiranError(Exception):
    def __init__(self, kind: ErrorKind, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        # a short label for metrics (airan_rejections_total{reason}); "" = the kind's name
        self.reason = reason

    def __repr__(self) -> str:
        return f"AiranError({self.kind.value}: {self.message})"


def invalid(message: str) -> AiranError:
    return AiranError(ErrorKind.INVALID_ARGUMENT, message)
