"""SLM replicas as Ray actors pinned to sites, and the pool the gateway routes over."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field, replace

import ray
from ray.exceptions import RayActorError, RayTaskError

from airan.config import AiranConfig, site_resource
from airan.serving.engine.kinds import EngineSpec, build_engine, replica_engine
from airan.serving.engine.protocol import (
    EngineClient,
    EngineDeadError,
    EngineLoad,
    GenerationChunk,
    GenerationParams,
    ReplicaUnavailableError,
    RequestFailedError,
)
from airan.core.routing import ReplicaState, ReplicaView

log = logging.getLogger(__name__)


@ray.remote
class ReplicaActor:
    """Holds one engine on its site's node; a thin adapter over the `EngineClient` protocol.

    Which engine is the config's `engine.kind` (vLLM by default), built by `build_engine`.
    """

    def __init__(self, replica_id: str, site_id: str, engine: EngineSpec) -> None:
        self.replica_id = replica_id
        self.site_id = site_id
        self.engine: EngineClient = build_engine(engine)

    async def start(self) -> dict:
        await self.engine.start()
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    async def generate(self, prompt_token_ids: list[int], params: GenerationParams, request_id: str):
        async for chunk in self.engine.generate(prompt_token_ids, params, request_id):
            yield chunk

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def load(self) -> EngineLoad:
        await self.engine.check_health()
        return self.engine.load()

    async def shutdown(self) -> None:
        await self.engine.shutdown()


def _unwrap(e: Exception) -> Exception:
    """Ray wraps actor-side exceptions; turn them back into the engine protocol's errors."""
    if isinstance(e, RayTaskError):
        cause = e.cause if getattr(e, "cause", None) is not None else e
        if isinstance(cause, (EngineDeadError, RequestFailedError)):
            return cause
        if isinstance(cause, RayActorError):
            return ReplicaUnavailableError(str(cause))
        return RequestFailedError(str(cause))
    if isinstance(e, RayActorError):
        return ReplicaUnavailableError(f"replica actor is gone: {e}")
    return e


class RayReplicaClient:
    def __init__(self, actor) -> None:
        self.actor = actor

    async def generate(self, prompt_token_ids, params, request_id):
        stream = self.actor.generate.options(num_returns="streaming").remote(
            prompt_token_ids, params, request_id
        )
        finished = False
        try:
            async for ref in stream:
                chunk: GenerationChunk = await ref
                finished = chunk.finished
                yield chunk
        except (RayTaskError, RayActorError) as e:
            raise _unwrap(e) from e
        finally:
            if not finished:
                ray.cancel(stream)
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        try:
            await asyncio.wait_for(self.actor.abort.remote(request_id), timeout=5)
        except Exception as e:  # the replica may already be gone; nothing left to abort
            log.debug("abort %s: %s", request_id, e)


@dataclass
class _Replica:
    view: ReplicaView
    actor: object
    node_id: str = ""
    error: str = ""
    started_at: float = field(default_factory=time.monotonic)


class RayReplicaPool:
    """Starts the configured replicas on their sites and keeps their load fresh."""

    def __init__(self, config: AiranConfig, model_paths: dict[str, os.PathLike]) -> None:
        self.config = config
        self.model_paths = model_paths
        self._replicas: dict[str, _Replica] = {}
        self._poller: asyncio.Task | None = None

    # -- ReplicaPool protocol -------------------------------------------------
    def views(self) -> list[ReplicaView]:
        return [r.view for r in self._replicas.values()]

    def client(self, replica_id: str) -> RayReplicaClient:
        return RayReplicaClient(self._replicas[replica_id].actor)

    def mark_failed(self, replica_id: str, reason: str) -> None:
        r = self._replicas.get(replica_id)
        if r is not None:
            log.warning("replica %s failed: %s", replica_id, reason)
            r.view = replace(r.view, state=ReplicaState.FAILED)
            r.error = reason

    def node_ids(self) -> dict[str, str]:
        """Replica id -> Ray node id ("" until the replica's engine has started)."""
        return {rid: r.node_id for rid, r in self._replicas.items()}

    def details(self) -> list[_Replica]:
        return list(self._replicas.values())

    # -- lifecycle --------------------------------------------------------------
    def _cpu_plan(self) -> list[list[int] | None]:
        """CPU ids per replica: on one machine (local mode) split the cores, else the engine's default."""
        specs = [(s, i) for s in self.config.replicas for i in range(s.count)]
        if self.config.cluster.mode != "local":
            return [None] * len(specs)
        cores = sorted(os.sched_getaffinity(0))
        per = self.config.engine.cpu_threads or max(1, len(cores) // max(1, len(specs)))
        return [[cores[(k * per + j) % len(cores)] for j in range(per)] for k in range(len(specs))]

    async def start(self) -> None:
        # every replica's engine first: a kind this install cannot run fails here, before any actor
        plans = []
        cpu_plan = iter(self._cpu_plan())
        for spec in self.config.replicas:
            model = self.config.model(spec.model)
            for ordinal in range(spec.count):
                adapters = tuple((a, str(self.model_paths[a])) for a in spec.adapters)
                cpus = next(cpu_plan)
                engine = replica_engine(self.config.engine, model, self.model_paths[spec.model], adapters, cpus)
                plans.append((f"{spec.site}-{spec.model}-{ordinal}", spec, cpus, engine))
        starts = []
        for replica_id, spec, cpus, engine in plans:
            actor = ReplicaActor.options(
                name=replica_id,
                num_cpus=len(cpus) if cpus else 1,
                resources={site_resource(spec.site): 1},
                runtime_env={"env_vars": engine.env},
                max_concurrency=1000,
            ).remote(replica_id, spec.site, engine)
            view = ReplicaView(
                replica_id, spec.site, spec.model, ReplicaState.STARTING, adapters=frozenset(spec.adapters)
            )
            self._replicas[replica_id] = _Replica(view, actor)
            starts.append(self._start_one(replica_id))
        await asyncio.gather(*starts)
        self._poller = asyncio.create_task(self._poll_loads(), name="airan-replica-load")

    async def _start_one(self, replica_id: str) -> None:
        r = self._replicas[replica_id]
        try:
            info = await r.actor.start.remote()
        except Exception as e:
            self.mark_failed(replica_id, f"engine did not start: {_unwrap(e)}")
            return
        r.node_id = info["node_id"]
        r.view = replace(r.view, state=ReplicaState.READY)
        log.info("replica %s ready at site %s in %.1fs", replica_id, r.view.site_id, time.monotonic() - r.started_at)

    async def _poll_loads(self) -> None:
        interval = self.config.router.stats_interval_s
        while True:
            await asyncio.gather(
                *(self._poll_one(r) for r in self._replicas.values() if r.view.state is ReplicaState.READY)
            )
            await asyncio.sleep(interval)

    async def _poll_one(self, r: _Replica) -> None:
        try:
            load: EngineLoad = await asyncio.wait_for(r.actor.load.remote(), timeout=10)
        except asyncio.TimeoutError:
            return  # a busy engine answers late; keep the last figures
        except Exception as e:
            self.mark_failed(r.view.replica_id, f"health check failed: {_unwrap(e)}")
            return
        if r.view.state is ReplicaState.READY:
            r.view = replace(r.view, running=load.running, waiting=load.waiting, kv_cache_usage=load.kv_cache_usage)

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await asyncio.gather(
            *(asyncio.wait_for(r.actor.shutdown.remote(), 30) for r in self._replicas.values()),
            return_exceptions=True,
        )
        for r in self._replicas.values():
            ray.kill(r.actor)
            r.view = replace(r.view, state=ReplicaState.STOPPED)
