"""Plain data the router works on: snapshots of replicas and sites, and the request."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum


class ReplicaState(str, Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"
    STOPPED = "stopped"


class Priority(str, Enum):
    NEAR_RT = "near_rt"
    NON_RT = "non_rt"
    BEST_EFFORT = "best_effort"

    @property
    def rank(self) -> int:
        """Service order: 0 (NEAR_RT) before 1 (NON_RT) before 2 (BEST_EFFORT)."""
        return _RANK[self]


_RANK = {Priority.NEAR_RT: 0, Priority.NON_RT: 1, Priority.BEST_EFFORT: 2}


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    site_id: str
    model: str
    state: ReplicaState = ReplicaState.READY
    in_flight: int = 0  # dispatched by the control plane, not finished
    running: int = 0  # engine-reported
    waiting: int = 0  # engine-reported
    kv_cache_usage: float = 0.0
    adapters: frozenset[str] = frozenset()  # LoRA adapters held on top of `model`
    # radio first (airan/core/headroom.py): requests it may hold at once for its site's forecast AI
    # headroom (None: no limit) and the CPUs its real use is capped to (None: not capped)
    max_concurrency: int | None = None
    cpu_cap: float | None = None
    cpu_share: float = 1.0  # the share of its full speed that cap leaves it (admission scales its rates by it)
    variant: str = ""  # the catalog variant it serves under `model`'s name ("" = `model` itself)

    def serves(self, model: str) -> bool:
        return model == self.model or model in self.adapters

    @property
    def queue_depth(self) -> int:
        # the control plane's own count is fresher than the engine's polled stats
        return max(self.in_flight, self.running + self.waiting)


@dataclass(frozen=True)
class SiteView:
    site_id: str
    drained: bool = False
    ai_headroom: float = 1.0  # 1 - share of compute the radio needs
    latency_ms: Mapping[str, float] = field(default_factory=dict)  # controller -> ms
    # radio first: CPUs the AI may use over the next control interval (capacity - forecast radio
    # share - margin; None: not forecast), and why the site takes no AI work when it is surged
    headroom_cpus: float | None = None
    surge_reason: str = ""


@dataclass(frozen=True)
class RoutingRequest:
    request_id: str
    model: str
    controller_id: str = ""
    site_ids: tuple[str, ...] = ()
    priority: Priority = Priority.BEST_EFFORT
    prompt_tokens: int = 0
    max_tokens: int = 0
    # admission: the absolute deadline (monotonic seconds; None = none) and the tokens its answer is
    # expected to take (the prediction's decode length; max_tokens when the gateway knows no better)
    deadline: float | None = None
    expected_tokens: int = 0
    # the sites the caller's scope confines it to (None: every site); set by the server from the
    # authenticated caller, never from the request
    allowed_sites: frozenset[str] | None = None


@dataclass(frozen=True)
class RoutingContext:
    request: RoutingRequest
    sites: Mapping[str, SiteView]
    min_ai_headroom: float = 0.0
    now: float = 0.0  # monotonic seconds of the decision; the deadline filter measures budgets from it
