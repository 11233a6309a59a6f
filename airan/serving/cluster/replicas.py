"""SLM replicas as Ray actors pinned to sites, and the pool the gateway routes over."""
from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import ray
from ray.exceptions import RayActorError, RayTaskError

from airan.config import AiranConfig, site_resource
from airan.serving.cluster.cpucap import CpuCap, remove_empty_groups, tree_cpu_seconds
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
# replica actors are named ACTOR_PREFIX + replica id in the cluster's namespace; a control plane
# that starts adopts the live ones it finds there (RayReplicaPool._adopt)
ACTOR_PREFIX = "airan-replica:"


# cap and accounting calls run on their own thread: an engine that is starting (or a throttled one)
# must not hold up the calls that set its cap
@ray.remote(concurrency_groups={"control": 1})
class ReplicaActor:
    """Holds one engine on its site's node; a thin adapter over the `EngineClient` protocol.

    Which engine is the config's `engine.kind` (vLLM by default), built by `build_engine`.
    """

    def __init__(self, replica_id: str, site_id: str, engine: EngineSpec, cpu_ids: list[int] | None = None,
                 cap_cpu: bool = False, initial_cap: float | None = None, slot: str = "",
                 model: str = "") -> None:  # fmt: skip
        self.replica_id = replica_id
        self.site_id = site_id
        # what a control plane that adopts it checks: the configured replica it fills, the model it
        # serves (a variant's name after a swap), the engine it was built with, and how often it loaded
        self.slot = slot or replica_id
        self.model = model
        self.spec = engine
        self.engine_loads = 0
        self.created_at = time.time()
        # radio first: join the CPU cap before the engine starts, so every process it forks (and the
        # engine's own start-up) is held to it
        # its group is scoped by its Ray node, so two stacks on one host never share or clean each other's
        self.cap = CpuCap(replica_id, cpu_ids, scope=ray.get_runtime_context().get_node_id()[:16]) if cap_cpu \
            else None  # fmt: skip
        if self.cap is not None:
            self.cap.join(os.getpid())
            self.cap.set(initial_cap)
        self.engine: EngineClient = build_engine(engine)

    async def start(self) -> dict:
        self.engine_loads += 1
        await self.engine.start()
        return await self.identity()

    @ray.method(concurrency_group="control")
    async def identity(self) -> dict:
        cap = self.cap.state().mechanism if self.cap is not None else ""
        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(), "cap_mechanism": cap,
                "replica_id": self.replica_id, "site_id": self.site_id, "slot": self.slot, "model": self.model,
                "engine": self.spec, "engine_loads": self.engine_loads, "created_at": self.created_at,
                "actor_id": ray.get_runtime_context().get_actor_id()}  # fmt: skip

    @ray.method(concurrency_group="control")
    async def set_cpu_cap(self, cpus: float | None) -> str:
        """Cap this replica's process tree at `cpus` cores; returns the mechanism in force."""
        if self.cap is None:
            return ""
        return self.cap.set(cpus).mechanism

    @ray.method(concurrency_group="control")
    async def cpu_seconds(self) -> float:
        """CPU seconds used by this replica's live process tree (actor, engine core, workers)."""
        return tree_cpu_seconds(os.getpid())

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
        if self.cap is not None:
            self.cap.release()


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


def plan_adoption(
    found: list[tuple[str, dict | None, str]], mismatch: Callable[[dict], str]
) -> tuple[dict[str, tuple[str, dict]], list[tuple[str, str]]]:
    """Of the replica actors found (name, identity, why it cannot serve or ""), which to adopt
    (slot -> (name, identity)) and which to stop ((name, why)). `mismatch(identity)` says why an
    actor does not hold what its slot should ("" when it does). Of two that fill one slot (a swap
    the previous control plane did not finish) the newer, which it was moving to, is kept."""
    keep: dict[str, tuple[str, dict]] = {}
    stop: list[tuple[str, str]] = []
    for name, info, problem in sorted(found, key=lambda f: f[1].get("created_at", 0.0) if f[1] else 0.0):
        problem = problem or mismatch(info)
        if problem:
            stop.append((name, problem))
            continue
        if info["slot"] in keep:
            older, _ = keep[info["slot"]]
            stop.append((older, f"superseded by {info['replica_id']} for {info['slot']}"))
        keep[info["slot"]] = (name, info)
    return keep, stop


class RayReplicaClient:
    def __init__(self, actor, streams: Counter | None = None, replica_id: str = "") -> None:
        self.actor = actor
        # the pool's count of open streams per replica: a swap drains the old replica on it
        self.streams = streams if streams is not None else Counter()
        self.replica_id = replica_id

    async def generate(self, prompt_token_ids, params, request_id):
        stream = self.actor.generate.options(num_returns="streaming").remote(
            prompt_token_ids, params, request_id
        )
        finished = False
        self.streams[self.replica_id] += 1
        try:
            async for ref in stream:
                chunk: GenerationChunk = await ref
                finished = chunk.finished
                yield chunk
        except (RayTaskError, RayActorError) as e:
            raise _unwrap(e) from e
        finally:
            self.streams[self.replica_id] -= 1
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
    engine: EngineSpec  # what it was started with (a replacement starts the same)
    node_id: str = ""
    error: str = ""
    started_at: float = field(default_factory=time.monotonic)
    cpus: list[int] | None = None  # the cores its engine threads are bound to (local mode)
    pid: int = 0
    cap_mechanism: str = ""  # how its CPU use is capped ("" = not capped)
    slot: str = ""  # the configured replica it fills (site-model-ordinal); a swap's successor keeps it
    adopted: bool = False  # left running by a previous control plane and taken over, not started here

    def __setattr__(self, name: str, value) -> None:
        if name == "view":  # views are replaced, never changed: count each replacement (`views_version`)
            global _VIEW_CHANGES
            _VIEW_CHANGES += 1
        super().__setattr__(name, value)


_VIEW_CHANGES = 0  # replica views replaced in this process (any pool)


class RayReplicaPool:
    """Starts the configured replicas on their sites and keeps their load fresh."""

    def __init__(self, config: AiranConfig, model_paths: dict[str, os.PathLike],
                 variant_paths: dict[str, os.PathLike] | None = None) -> None:  # fmt: skip
        self.config = config
        self.model_paths = model_paths
        # catalog variants a replica may serve after a swap (radio first): an adopted one is checked against them
        self.variant_paths = variant_paths or {}
        self.detached = config.cluster.detach_replicas
        self.adoption: list[str] = []  # what start() did with the replica actors it found, one line each
        self._replicas: dict[str, _Replica] = {}
        self._poller: asyncio.Task | None = None
        self._streams: Counter[str] = Counter()
        self._serial = 0
        # radio first: replicas join a CPU cap (airan/serving/cluster/cpucap.py) that follows the headroom
        self.cap_cpu = config.router.policy == "radio_first"
        self.swaps: list[dict] = []  # make-before-break swaps done: when, which, how long each step took

    # -- ReplicaPool protocol -------------------------------------------------
    def views(self) -> list[ReplicaView]:
        return [r.view for r in self._replicas.values()]

    @property
    def views_version(self) -> tuple[int, int]:
        """Changes whenever `views()` would (a view replaced, a replica added or removed): the gateway
        rebuilds its routing table on it instead of comparing every view per request."""
        return _VIEW_CHANGES, len(self._replicas)

    def client(self, replica_id: str) -> RayReplicaClient:
        return RayReplicaClient(self._replicas[replica_id].actor, self._streams, replica_id)

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
        even = max(1, len(cores) // max(1, len(specs)))
        plan, start = [], 0
        for spec, _ in specs:
            # never more threads than the site's Ray node offers (a 1-CPU site on a 2-core machine)
            per = self.config.engine.cpu_threads or max(1, min(even, math.ceil(self.config.site(spec.site).cpus)))
            plan.append([cores[(start + j) % len(cores)] for j in range(per)])
            start += per
        return plan

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
        adopted = await self._adopt(plans) if self.detached else set()
        if self.cap_cpu:
            # groups left by actors that were killed: this cluster's nodes' at once, others' once stale
            nodes = {n["NodeID"][:16] for n in ray.nodes()}
            await asyncio.to_thread(remove_empty_groups, nodes)
        starts = []
        for replica_id, spec, cpus, engine in plans:
            if replica_id in adopted:
                continue
            view = ReplicaView(
                replica_id, spec.site, spec.model, ReplicaState.STARTING, adapters=frozenset(spec.adapters)
            )
            self._launch(view, cpus, engine)
            starts.append(self._start_one(replica_id))
        await asyncio.gather(*starts)

    async def _adopt(self, plans: list[tuple[str, object, list[int] | None, EngineSpec]]) -> set[str]:
        """Take over the replica actors a previous control plane left in this namespace: each that
        answers, whose engine is up and healthy, and that holds what its configured replica should
        (the same engine spec: model or a servable variant of it, settings, cores) serves on without
        a reload; the others are stopped. Returns the configured replica ids (slots) adopted."""
        if not ray.is_initialized():  # no cluster joined, nothing to adopt (and listing would start a local Ray)
            return set()
        names = [n for n in await asyncio.to_thread(ray.util.list_named_actors) if n.startswith(ACTOR_PREFIX)]
        if not names:
            return set()
        found = await asyncio.gather(*(self._inspect(n) for n in names))
        actors = {name: actor for name, actor, _, _ in found}
        planned = {replica_id: (spec, cpus, engine) for replica_id, spec, cpus, engine in plans}
        keep, stop = plan_adoption([(name, info, problem) for name, _, info, problem in found],
                                   lambda info: self._mismatch(info, planned.get(info["slot"])))  # fmt: skip
        for name, why in stop:
            self.adoption.append(f"stopped {name.removeprefix(ACTOR_PREFIX)}: {why}")
            log.warning("replica actor %s not adopted, stopping it: %s", name, why)
            actor = actors[name]
            if actor is None:
                continue
            try:
                await asyncio.wait_for(actor.shutdown.remote(), 30)
            except Exception as e:
                log.debug("shutdown %s: %s", name, _unwrap(e))
            ray.kill(actor)
        for slot, (name, info) in keep.items():
            actor = actors[name]
            spec, cpus, _ = planned[slot]
            served = info["model"]
            # its own site: a replica re-placed after its node died serves elsewhere than configured
            view = ReplicaView(info["replica_id"], info["site_id"], spec.model, ReplicaState.READY,
                               adapters=frozenset(spec.adapters), variant="" if served == spec.model else served)  # fmt: skip
            self._replicas[view.replica_id] = _Replica(
                view, actor, node_id=info["node_id"], cpus=cpus, pid=info["pid"], cap_mechanism=info["cap_mechanism"],
                slot=slot, adopted=True, engine=info["engine"],
            )  # fmt: skip
            serial = re.search(r"-[sr](\d+)$", view.replica_id)  # a swap's or a restart's successor
            if view.replica_id != slot and serial:  # later swaps and restarts must not reuse its name
                self._serial = max(self._serial, int(serial.group(1)))
            self.adoption.append(f"adopted {view.replica_id} ({served}, pid {info['pid']}, engine loaded "
                                 f"{info['engine_loads']}x)")  # fmt: skip
            log.info("adopted replica %s at %s (%s, pid %s): engine not reloaded", view.replica_id, view.site_id,
                     served, info["pid"])  # fmt: skip
        return set(keep)

    async def _inspect(self, name: str) -> tuple[str, object, dict | None, str]:
        """(name, handle, identity, why it cannot be adopted or "")."""
        try:
            actor = ray.get_actor(name)
        except ValueError as e:  # it died since it was listed
            return name, None, None, f"gone: {e}"
        try:
            info = await asyncio.wait_for(actor.identity.remote(), timeout=10)
        except Exception as e:
            return name, actor, None, f"did not answer: {_unwrap(e)}"
        if not info.get("engine_loads"):
            return name, actor, info, "its engine never started"
        try:
            await asyncio.wait_for(actor.load.remote(), timeout=10)  # the engine's own health check
        except Exception as e:
            return name, actor, info, f"engine not healthy: {_unwrap(e)}"
        return name, actor, info, ""

    def _mismatch(self, info: dict, planned: tuple[object, list[int] | None, EngineSpec] | None) -> str:
        """Why an actor does not hold what its configured replica should ("" when it does)."""
        if planned is None:
            return f"the config has no replica {info['slot']} any more"
        spec, cpus, engine = planned
        served = info["model"]
        if served == spec.model:
            expected = engine
        elif served in self.variant_paths:
            adapters = tuple((a, str(self.model_paths[a])) for a in spec.adapters)
            expected = replica_engine(self.config.engine, self.config.model(served), self.variant_paths[served],
                                      adapters, cpus)  # fmt: skip
        else:
            return f"serves {served}, which is neither {spec.model} nor a servable variant of it"
        if info["engine"] != expected:
            return f"its engine ({served}) was built with other settings than the config gives now"
        return ""

    async def abort_everywhere(self, request_ids: list[str]) -> None:
        """Abort engine requests by id on every adopted replica (a crashed control plane's requests
        its engine may still be generating; a diagnosis's second attempt ran as '<id>#2', a stream
        resumed on another replica as '<id>~<n>')."""
        resumes = [""] + [f"~{n}" for n in range(1, self.config.reliability.max_stream_resumes + 1)]
        ids = [f"{rid}{attempt}{resume}" for rid in request_ids for attempt in ("", "#2") for resume in resumes]
        if not ids:
            return

        async def one(r: _Replica) -> None:
            for request_id in ids:
                try:
                    await asyncio.wait_for(r.actor.abort.remote(request_id), timeout=5)
                except Exception as e:
                    log.debug("abort %s on %s: %s", request_id, r.view.replica_id, _unwrap(e))

        await asyncio.gather(*(one(r) for r in self._replicas.values() if r.adopted))

    def _launch(self, view: ReplicaView, cpus: list[int] | None, engine: EngineSpec,
                initial_cap: float | None = None, beside: bool = False, slot: str = "") -> _Replica:  # fmt: skip
        slot = slot or view.replica_id
        actor = ReplicaActor.options(
            name=ACTOR_PREFIX + view.replica_id,
            # detached: it outlives this control plane, and the next one adopts it (no engine reload)
            lifetime="detached" if self.detached else None,
            # a replica started beside the one it replaces (make before break) takes no Ray CPUs: the
            # site's node has none left until the old one stops, and the CPU cap, not Ray's count,
            # bounds what the two use together
            num_cpus=0 if beside else (len(cpus) if cpus else 1),
            resources={site_resource(view.site_id): 1},
            runtime_env={"env_vars": engine.env},
            max_concurrency=1000,
        ).remote(view.replica_id, view.site_id, engine, cpus, self.cap_cpu, initial_cap, slot,
                 view.variant or view.model)  # fmt: skip
        r = _Replica(view, actor, cpus=cpus, slot=slot, engine=engine)
        self._replicas[view.replica_id] = r
        return r

    async def _start_one(self, replica_id: str) -> None:
        r = self._replicas[replica_id]
        try:
            info = await r.actor.start.remote()
        except Exception as e:
            self.mark_failed(replica_id, f"engine did not start: {_unwrap(e)}")
            return
        r.node_id = info["node_id"]
        r.pid = info.get("pid", 0)
        r.cap_mechanism = info.get("cap_mechanism", "")
        r.view = replace(r.view, state=ReplicaState.READY)
        log.info("replica %s ready at site %s in %.1fs", replica_id, r.view.site_id, time.monotonic() - r.started_at)

    # -- health and recovery (driven by airan/serving/cluster/supervisor.py) -----------------------
    async def probe(self, replica_id: str, timeout_s: float) -> None:
        """One health call: the engine's own health check and its load, which the view takes.
        Raises ReplicaUnavailableError/EngineDeadError when the replica is gone, TimeoutError when it
        does not answer within `timeout_s`, RequestFailedError when the call failed otherwise."""
        r = self._replicas[replica_id]
        try:
            load: EngineLoad = await asyncio.wait_for(r.actor.load.remote(), timeout=timeout_s)
        except asyncio.TimeoutError:
            raise
        except Exception as e:
            raise _unwrap(e) from e
        if r.view.state is ReplicaState.READY:
            r.view = replace(r.view, running=load.running, waiting=load.waiting, kv_cache_usage=load.kv_cache_usage)

    def claimed_cpus(self, replica_id: str) -> float:
        """The Ray CPUs the replica takes at its site (what a replacement needs there)."""
        cpus = self._replicas[replica_id].cpus
        return float(len(cpus)) if cpus else 1.0

    async def relaunch(self, replica_id: str, site_id: str, start_timeout_s: float) -> str:
        """Start a replacement for the failed `replica_id` on `site_id` (same model, adapters, cores and
        settings; a new id, `<site>-<model>-r<n>`); once it is ready the failed one is dropped and the
        new id returned. Not ready within `start_timeout_s` (or cancelled): it is stopped and the error
        raised, and the failed one stays for the next try."""
        old = self._replicas[replica_id]
        try:  # a hung one must not come back; for a dead one this is a no-op
            ray.kill(old.actor, no_restart=True)
        except Exception as e:
            log.debug("kill %s: %s", replica_id, e)
        self._serial += 1
        served = old.view.variant or old.view.model
        new_id = f"{site_id}-{served}-r{self._serial}"
        home = site_id == old.view.site_id
        view = replace(old.view, replica_id=new_id, site_id=site_id, state=ReplicaState.STARTING, in_flight=0,
                       running=0, waiting=0, kv_cache_usage=0.0)  # fmt: skip
        # it fills the failed one's slot: a later control plane adopts it as that configured replica
        self._launch(view, old.cpus, old.engine, initial_cap=old.view.cpu_cap if home else None, slot=old.slot)
        try:
            await asyncio.wait_for(self._start_one(new_id), start_timeout_s)
            new = self._replicas[new_id]
            if new.view.state is not ReplicaState.READY:
                raise RuntimeError(new.error or "engine did not start")
        except BaseException as e:
            failed = self._replicas.pop(new_id, None)
            if failed is not None:
                ray.kill(failed.actor, no_restart=True)
            if isinstance(e, asyncio.TimeoutError):
                raise RuntimeError(f"replacement {new_id} at {site_id} not ready in {start_timeout_s:.0f}s") from None
            raise
        self._replicas.pop(replica_id, None)
        self._streams.pop(replica_id, None)
        return new_id

    # -- radio first: limits and variants ------------------------------------------------------
    async def set_limits(self, replica_id: str, max_concurrency: int | None, cpu_cap: float | None,
                         cpu_share: float = 1.0) -> None:  # fmt: skip
        """Admitted concurrency (read by routing) and the real CPU cap of one replica (`cpu_share`: the
        share of its full speed that cap leaves it, which admission scales its measured rates by)."""
        r = self._replicas.get(replica_id)
        if r is None:
            return
        r.view = replace(r.view, max_concurrency=max_concurrency, cpu_cap=cpu_cap, cpu_share=cpu_share)
        if self.cap_cpu and r.view.state in (ReplicaState.STARTING, ReplicaState.READY, ReplicaState.DRAINING):
            try:
                r.cap_mechanism = await asyncio.wait_for(r.actor.set_cpu_cap.remote(cpu_cap), timeout=10)
            except Exception as e:  # a replica that cannot be reached is found by the health poll
                log.warning("cpu cap of %s not set: %s", replica_id, _unwrap(e))

    async def cpu_seconds(self) -> dict[str, float]:
        """Replica id -> CPU seconds of its process tree so far. In local mode read here (psutil on
        the actor's pid): a replica throttled by its cap answers an actor call late; else asked of the
        actor (replicas that answer in 5 s)."""
        live = [r for r in self._replicas.values() if r.view.state in (ReplicaState.READY, ReplicaState.DRAINING)]
        if self.config.cluster.mode == "local":
            pids = {r.view.replica_id: r.pid for r in live if r.pid}
            return await asyncio.to_thread(lambda: {rid: tree_cpu_seconds(pid) for rid, pid in pids.items()})

        async def one(r: _Replica):
            try:
                return r.view.replica_id, await asyncio.wait_for(r.actor.cpu_seconds.remote(), timeout=5)
            except Exception:
                return r.view.replica_id, None

        return {rid: v for rid, v in await asyncio.gather(*(one(r) for r in live)) if v is not None}

    def open_streams(self, replica_id: str) -> int:
        return self._streams[replica_id]

    async def swap(self, replica_id: str, variant: str, model_path: os.PathLike, drain_timeout_s: float = 300.0,
                   busy: Callable[[str], int] | None = None, initial_cap: float | None = None) -> str:  # fmt: skip
        """Make before break: start `variant` beside `replica_id` on its site, route to it once it is
        ready, drain the old one (no new requests; its open streams and what `busy` counts, e.g. the
        gateway's queue for it, finish), then stop it. Returns the new replica's id; on a failed start
        the old replica keeps serving and the error is raised."""
        old = self._replicas[replica_id]
        t0 = time.monotonic()
        self._serial += 1
        logical = old.view.model
        new_id = f"{old.view.site_id}-{variant}-s{self._serial}"
        spec = self.config.model(variant)
        adapters = tuple((a, str(self.model_paths[a])) for a in old.view.adapters)
        engine = replica_engine(self.config.engine, spec, model_path, adapters, old.cpus)
        view = replace(old.view, replica_id=new_id, state=ReplicaState.STARTING, in_flight=0, running=0, waiting=0,
                       variant="" if variant == logical else variant, max_concurrency=0)  # fmt: skip
        # it starts under a cap too: the control loop splits the site's headroom among the old, the new
        cap = initial_cap if initial_cap is not None else old.view.cpu_cap
        self._launch(view, old.cpus, engine, initial_cap=cap, beside=True, slot=old.slot)
        await self._start_one(new_id)
        new = self._replicas[new_id]
        if new.view.state is not ReplicaState.READY:
            self._replicas.pop(new_id, None)
            ray.kill(new.actor)
            raise RuntimeError(f"swap {replica_id} -> {variant}: {new.error}")
        # the new one has the old one's limits until the next control step sets its own
        await self.set_limits(new_id, old.view.max_concurrency, old.view.cpu_cap, old.view.cpu_share)
        ready_s = time.monotonic() - t0
        old.view = replace(old.view, state=ReplicaState.DRAINING)
        await asyncio.sleep(0.5)  # a request routed to it just before has time to open its stream
        deadline = time.monotonic() + drain_timeout_s

        def open_work() -> int:
            return max(self._streams[replica_id], busy(replica_id) if busy is not None else 0)

        while open_work() > 0 and time.monotonic() < deadline:  # bounded by the timeout
            await asyncio.sleep(0.05)
        left = open_work()
        old.view = replace(old.view, state=ReplicaState.STOPPED)  # stopping on purpose: not a failure
        try:
            await asyncio.wait_for(old.actor.shutdown.remote(), 30)
        except Exception as e:
            log.warning("swap: shutting down %s: %s", replica_id, _unwrap(e))
        ray.kill(old.actor)
        self._replicas.pop(replica_id, None)
        self._streams.pop(replica_id, None)
        self.swaps.append({"at": time.time(), "site_id": view.site_id, "old": replica_id, "new": new_id,
                           "variant": variant, "ready_s": round(ready_s, 2),
                           "drain_s": round(time.monotonic() - t0 - ready_s, 2), "streams_cut": left})  # fmt: skip
        log.info("swap at %s: %s -> %s (%s) ready in %.1fs, drained in %.1fs", view.site_id, replica_id, new_id,
                 variant, ready_s, time.monotonic() - t0 - ready_s)
        return new_id

    async def stop(self, keep_replicas: bool = False) -> None:
        """Stop polling; stop every replica, or with `keep_replicas` leave them serving (detached)
        for the next control plane to adopt."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        if keep_replicas and self.detached:
            log.info("leaving %d replica(s) running for the next control plane: %s", len(self._replicas),
                     ", ".join(self._replicas))  # fmt: skip
            return
        await asyncio.gather(
            *(asyncio.wait_for(r.actor.shutdown.remote(), 30) for r in self._replicas.values()),
            return_exceptions=True,
        )
        for r in self._replicas.values():
            ray.kill(r.actor)
            r.view = replace(r.view, state=ReplicaState.STOPPED)
