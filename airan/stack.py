"""A whole airan stack on this machine (Ray site nodes, replicas, gRPC) for tests, demos and replays."""
from __future__ import annotations

from airan.config import AiranConfig
from airan.serving.server import ControlPlane


def LocalStack(config: AiranConfig) -> ControlPlane:
    """`async with LocalStack(config) as stack: ... stack.address` (forces local Ray mode).

    Its Ray nodes and replicas die with it, so unless the config names a `state` it keeps its state
    in memory: a drain left by one test or demo run does not reach the next.
    """
    update: dict = {"cluster": config.cluster.model_copy(update={"mode": "local"})}
    if "state" not in config.model_fields_set:
        update["state"] = config.state.model_copy(update={"backend": "memory"})
    return ControlPlane(config.model_copy(update=update))
