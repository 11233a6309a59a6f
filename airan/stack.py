"""A whole airan stack on this machine (Ray site nodes, replicas, gRPC) for tests, demos and replays."""
from __future__ import annotations

from airan.config import AiranConfig
from airan.serving.server import ControlPlane


def LocalStack(config: AiranConfig) -> ControlPlane:
    """`async with LocalStack(config) as stack: ... stack.address` (forces local Ray mode)."""
    local = config.model_copy(update={"cluster": config.cluster.model_copy(update={"mode": "local"})})
    return ControlPlane(local)
