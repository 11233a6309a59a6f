"""Pure request routing: filters -> weighted scorers -> ranked tiers (no Ray/vLLM/gRPC)."""
from airan.core.routing.router import Router, RoutingDecision
from airan.core.routing.types import (
    Priority,
    ReplicaState,
    ReplicaView,
    RoutingContext,
    RoutingRequest,
    SiteView,
)

__all__ = [
    "Priority",
    "ReplicaState",
    "ReplicaView",
    "Router",
    "RoutingContext",
    "RoutingDecision",
    "RoutingRequest",
    "SiteView",
]
