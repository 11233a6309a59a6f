"""Benchmark: end-to-end diagnosis latency per priority class, gRPC path vs the same engine called directly.

The question of "Inside the loop budget": how long does a RAN controller wait for a DIAGNOSIS answer
at NEAR_RT (brief: cause + cells, max 16 tokens) and NON_RT (may cite KPIs, max 64 tokens) priority,
on this machine, idle, through the whole path? And how much of it is the engine?

Requests are the honest simulator cases (`build_cases(n, TEST_SEED)`) as the evaluation asks them
(`airan.evaluation.runner.ask_request(item, diagnosis=True, priority=...)`), deadline-free, every
case asked once per side (a case is never asked twice of one engine: prefix caching would serve its
prompt from the cache), classes interleaved. Two loads: one request at a time (`c1`), and a mix of
both classes with `--mix-concurrency` requests in flight (`mix`).

Two configurations (`--configs`):

  one      one site, one SmolLM2 replica with every core of this machine (the default config's engine
           settings);
  default  `airan/configs/default.yaml` as shipped: three sites, one replica each (bs-01's holds the
           LoRA adapter too), sharing the cores (one thread each on 2 cores; bs-01 and bs-03 share core 0).

Two sides per configuration, both kept running for the whole configuration, measured one after the
other in rounds A B, B A, A B ... (`--rounds`, >= 3; never both at once):

  grpc     `LocalStack(config)`; `NetOpsService.Ask` on 127.0.0.1 (client -> gRPC -> gateway: evidence,
           detector, prompt, grammar, route -> Ray actor -> vLLM AsyncLLM), as a controller would;
  direct   a `VllmEngine` in a child process of this benchmark, fed the exact prompt token ids and
           `GenerationParams` (grammar included: vLLM decodes under it as a structured-output regex)
           the real `Gateway` (with the packaged detector, as `airan serve` runs it) dispatches for
           each request, captured over a recording pool. It runs one attempt; the gateway retries an
           invalid answer once (the table says how often the direct answer would have needed that).

Same engine, same environment on both sides: the direct engine gets the `VllmSettings` and CPU
environment (`VLLM_CPU_OMP_THREADS_BIND`, `OMP_NUM_THREADS`) of one of the stack's replicas, from
the functions the replica pool uses, and the niceness the replica's Ray worker runs at (Ray starts
workers at `worker_niceness`, 15 by default), read back from the running replica and set in the child
before anything starts. The child process plays the Ray actor's part (it hosts AsyncLLM's front end;
the engine core and worker are its children, spawned, as vLLM does in a Ray actor). Effective
settings, environment, niceness and CPU binding of every process are read back from both sides and
compared. For `default` the direct engine is a single engine with the thread share and settings of
bs-02's replica (one thread, its core alone): what one replica of three gets when it serves alone.

    .venv/bin/python benchmarks/bench_diagnosis_latency.py --wait-quiet-s 90    # SmolLM2, ~30 min on 2 cores
    .venv/bin/python benchmarks/bench_diagnosis_latency.py --model tiny --requests 6 --mix 4 --rounds 3 \\
        --out /tmp/diag_tiny.json                                                # mechanics only
    .venv/bin/python benchmarks/bench_diagnosis_latency.py --show benchmarks/results/diagnosis_latency.json

Latency is client-observed: from the call to the whole answer (gRPC: the unary `Ask` returning;
direct: the engine's finished chunk). The gRPC side also records the gateway's own timings (queue,
time to first token, total, from the servicer's arrival); the direct side the engine's queue time and
its first chunk. Per class and phase: p50 and p95 of each round, the median over rounds and the
min-max spread; every phase records, with a CPU meter, what ran on the machine meanwhile.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (str(REPO), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import bench_grpc_path as g  # noqa: E402  (sets VLLM_LOGGING_LEVEL for both sides)

CLASSES = ("near_rt", "non_rt")
PHASES = ("c1", "mix")
SIDES = ("grpc", "direct")
# the goals: NEAR_RT p95 on the idle machine, through gRPC
GOALS_MS = {"one": 500.0, "default": 1000.0}
DEFAULT_OUT = REPO / "benchmarks" / "results" / "diagnosis_latency.json"
DIRECT_TWIN = "bs-02"  # default config: the replica whose settings and CPU share the direct engine gets


# --------------------------------------------------------------------------------------------
# configurations
# --------------------------------------------------------------------------------------------
def bench_configs(model: str, names: list[str]) -> dict:
    """name -> AiranConfig: the default config as shipped (port 0), and its one-replica version."""
    from airan.config import load_config

    base = load_config()
    server = base.server.model_copy(update={"port": 0, "grace_s": 1.0})
    base = base.model_copy(update={"server": server})
    if model == "tiny":  # mechanics only: every replica serves the generated tiny model, no adapters
        tiny = next(m for m in base.models if m.source == "tiny-random").name
        base = base.model_copy(update={
            "replicas": [r.model_copy(update={"model": tiny, "adapters": []}) for r in base.replicas],
            "server": server.model_copy(update={"default_model": tiny}),
        })  # fmt: skip
    out = {}
    for name in names:
        if name == "default":
            out[name] = base
        else:  # one site with every core, one replica of the default model, no adapter
            cores = len(os.sched_getaffinity(0))
            site = base.sites[0].model_copy(update={"cpus": cores})
            replica = base.replicas[0].model_copy(update={"adapters": [], "count": 1})
            out[name] = base.model_copy(update={"sites": [site], "replicas": [replica]})
    return {k: type(v).model_validate(v.model_dump()) for k, v in out.items()}  # re-validated


def direct_engine_spec(config, name: str):
    """(VllmSettings, env, cpu ids, replica id) of the replica the direct engine copies."""
    from airan.serving.cluster.replicas import RayReplicaPool
    from airan.serving.engine.kinds import replica_engine
    from airan.store.registry import materialize

    plan = RayReplicaPool(config, {})._cpu_plan()  # local mode, as LocalStack runs it
    specs = [(s, i) for s in config.replicas for i in range(s.count)]
    twin = DIRECT_TWIN if name == "default" else specs[0][0].site
    k = next(k for k, (s, _) in enumerate(specs) if s.site == twin)
    spec, ordinal = specs[k]
    model = config.model(spec.model)
    engine = replica_engine(config.engine, model, materialize(model), (), plan[k])
    env = dict(engine.env)
    # inside a Ray actor vLLM forces `spawn` for its engine-core and worker processes
    env["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    return engine.settings, env, plan[k], f"{spec.site}-{spec.model}-{ordinal}"


# --------------------------------------------------------------------------------------------
# requests and what the gateway dispatches for them
# --------------------------------------------------------------------------------------------
@dataclass
class Workload:
    items: list  # EvalItem per request index
    classes: list[str]  # priority class per request index
    requests: list  # AskRequest per request index
    token_ids: list  # prompt ids the gateway dispatches, per request index
    params: list  # GenerationParams the gateway dispatches (first attempt), per request index
    warmup: list[int]
    rounds: list[dict]  # per round: phase -> request indices


def build_workload(args) -> Workload:
    """Distinct cases for warm-up and for every (round, phase): no prompt is asked twice of one engine."""
    from airan.evaluation.cases import TEST_SEED, build_cases
    from airan.evaluation.runner import ask_request

    n_warm = 2 * len(CLASSES) + args.mix_concurrency
    per_round = len(CLASSES) * args.requests + args.mix
    items = build_cases(n_warm + args.rounds * per_round, TEST_SEED)
    classes = [CLASSES[i % len(CLASSES)] for i in range(len(items))]  # interleaved arrivals
    requests = [ask_request(item, diagnosis=True, priority=cls) for item, cls in zip(items, classes)]
    rounds, start = [], n_warm
    for _ in range(args.rounds):
        c1 = list(range(start, start + len(CLASSES) * args.requests))
        mix = list(range(c1[-1] + 1, c1[-1] + 1 + args.mix))
        rounds.append({"c1": c1, "mix": mix})
        start = mix[-1] + 1 if mix else c1[-1] + 1
    return Workload(items, classes, requests, [], [], list(range(n_warm)), rounds)


class FirstDispatchPool(g.CapturePool):
    """`CapturePool` that keeps the first attempt: its empty answer is no valid diagnosis, so the
    gateway retries once (sampling) and then gives up; the first dispatch is what a replica gets."""

    async def generate(self, prompt_token_ids, params, request_id):
        from airan.serving.engine.protocol import GenerationChunk

        if self.sent is None:
            self.sent = (list(prompt_token_ids), params)
            self.sent_at = time.perf_counter()
        yield GenerationChunk(text_delta="", completion_tokens=0, prompt_tokens=len(prompt_token_ids), finished=True,
                              finish_reason="stop")  # fmt: skip


class ReplayPool(FirstDispatchPool):
    """Answers every dispatch with a given text: the real gateway then says whether it accepts it."""

    answer: tuple[str, int, str] = ("", 0, "stop")

    async def generate(self, prompt_token_ids, params, request_id):
        from airan.serving.engine.protocol import GenerationChunk

        text, tokens, reason = self.answer
        yield GenerationChunk(text_delta=text, completion_tokens=tokens, prompt_tokens=len(prompt_token_ids),
                              finished=True, finish_reason=reason)  # fmt: skip


def real_gateway(config, model: str, renderer, pool):
    from airan.serving.gateway import Gateway
    from airan.serving.server import load_detector
    from airan.serving.sites import SiteRegistry

    return Gateway(config, pool, SiteRegistry(config.sites, config.radio.min_ai_headroom), {model: renderer},
                   detector=load_detector())  # fmt: skip


async def capture(config, model: str, renderer, requests) -> list[tuple[list[int], object, float]]:
    """(prompt token ids, GenerationParams, ms from the call to the dispatch) of the gateway's first
    dispatch for each `AskRequest`: the ms are the gateway's own work (validate, evidence, detector,
    prompt, grammar, route) in this process, without an engine."""
    from airan.errors import AiranError
    from airan.serving.api.convert import query_from_proto

    pool = FirstDispatchPool(model)
    gateway = real_gateway(config, model, renderer, pool)
    out = []
    for request in requests:
        pool.sent = None
        t0 = time.perf_counter()
        query = query_from_proto(request, time.monotonic(), None)  # as NetOpsServicer does
        try:
            await gateway.ask(query, request_id=uuid.uuid4().hex)
        except AiranError:
            pass  # the empty answer is refused; the dispatch is recorded
        assert pool.sent is not None, "the gateway dispatched nothing"
        out.append((*pool.sent, 1000 * (pool.sent_at - t0)))
    return out


async def first_try_valid(config, model: str, renderer, requests, answers: dict) -> dict[int, bool]:
    """index -> whether the real gateway accepts the direct engine's answer at the first attempt."""
    from airan.errors import AiranError
    from airan.serving.api.convert import query_from_proto

    pool = ReplayPool(model)
    gateway = real_gateway(config, model, renderer, pool)
    out = {}
    for i, answer in answers.items():
        pool.answer = answer
        try:
            a = await gateway.ask(query_from_proto(requests[i], time.monotonic(), None), request_id=uuid.uuid4().hex)
            out[i] = a.attempts == 1
        except AiranError:
            out[i] = False
    return out


# --------------------------------------------------------------------------------------------
# samples
# --------------------------------------------------------------------------------------------
@dataclass
class Sample:
    index: int
    cls: str
    ok: bool
    error: str = ""
    latency_ms: float = 0.0  # client-observed, call to whole answer
    first_ms: float | None = None  # direct: first chunk; grpc: the gateway's ttft (from its arrival)
    queue_ms: float | None = None  # direct: engine queue; grpc: the gateway's queue (admission+routing+engine)
    server_total_ms: float | None = None  # grpc only: the gateway's total (from its arrival)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    text: str = ""
    site_id: str = ""
    cause: str = ""


async def run_indices(one, indices: list[int], concurrency: int) -> tuple[list[Sample], float]:
    """`one(i)` for every index, `concurrency` at a time (arrivals as soon as a slot frees)."""
    samples: list = [None] * len(indices)
    work = iter(enumerate(indices))

    async def worker() -> None:
        for k, i in work:
            samples[k] = await one(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(indices))))))
    return samples, time.perf_counter() - t0


async def direct_one(engine, token_ids, params, i: int, cls: str, timeout_s: float) -> Sample:
    text, first, last = [], None, None
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in engine.generate(token_ids, params, f"bench-{uuid.uuid4().hex}"):
                first = first if first is not None else time.perf_counter()
                text.append(chunk.text_delta)
                last = chunk
                if chunk.finished:
                    break
    except Exception as e:  # recorded, counted, shown
        return Sample(i, cls, False, f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    if last is None or not last.finished:
        return Sample(i, cls, False, "stream ended without a finished chunk")
    return Sample(
        i, cls, True, latency_ms=1000 * (end - t0), first_ms=1000 * (first - t0), queue_ms=last.engine_queue_ms,
        prompt_tokens=len(token_ids), completion_tokens=last.completion_tokens,
        finish_reason=last.finish_reason or "stop", text="".join(text),
    )  # fmt: skip


async def grpc_one(client, request, i: int, cls: str, timeout_s: float) -> Sample:
    from airan.evaluation.runner import CAUSE_NAMES

    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):  # client-side bound only: the request carries no deadline
            r = await client.ask(request)
    except Exception as e:
        code = getattr(e, "code", None)
        return Sample(i, cls, False, f"{code().name}: {e.details()}" if callable(code) else f"{type(e).__name__}: {e}")
    end = time.perf_counter()
    return Sample(
        i, cls, True, latency_ms=1000 * (end - t0), first_ms=r.timings.ttft_ms, queue_ms=r.timings.queue_ms,
        server_total_ms=r.timings.total_ms, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
        finish_reason=r.finish_reason, text=r.text, site_id=r.site_id,
        cause=CAUSE_NAMES.get(r.diagnosis.cause, str(r.diagnosis.cause)),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# process facts: niceness, threads and CPU binding of an engine's processes
# --------------------------------------------------------------------------------------------
def thread_nices(pid: int) -> dict[int, list[str]]:
    """nice value -> names of a process's threads at it (Linux keeps niceness per thread: a Ray worker
    runs its Python main thread, and what that thread starts, at `worker_niceness`, its own C++ I/O
    threads at 0)."""
    out: dict[int, set[str]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            nice = int(stat.rsplit(")", 1)[1].split()[16])  # field 19
            name = (task / "comm").read_text().strip()
        except (OSError, ValueError, IndexError):
            continue
        out.setdefault(nice, set()).add("main thread" if task.name == str(pid) else name)
    return {k: sorted(v) for k, v in sorted(out.items())}


def main_thread_nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def process_facts(root_pid: int) -> list[dict]:
    """The front-end process (Ray actor or direct child) and vLLM's processes below it: niceness of the
    main thread and of every thread, threads' CPU binding."""
    import psutil

    out = []
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        try:
            title = " ".join(p.cmdline())
            role = "front end" if p.pid == root_pid else title.split()[0] if "VLLM::" in title else None
            if role is None:
                continue
            bindings = set()
            for t in p.threads():
                try:
                    bindings.add(tuple(sorted(os.sched_getaffinity(t.id))))
                except OSError:
                    continue
            nices = thread_nices(p.pid)
            out.append({"role": role, "nice": main_thread_nice(p.pid), "thread_nices": {str(k): v for k, v in nices.items()},
                        "thread_cpu_sets": sorted(list(b) for b in bindings), "threads": p.num_threads()})  # fmt: skip
        except psutil.Error:
            continue
    return sorted(out, key=lambda d: (d["role"] != "front end", d["role"]))


def engine_facts(engine) -> dict:
    """`bench_grpc_path.engine_facts` (effective vLLM settings and OMP environment of a started engine),
    self-contained: run in a replica actor it travels by value (the actor cannot import the benchmarks)."""
    import os as _os

    cfg = engine._llm.vllm_config
    keys = ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE", "VLLM_WORKER_MULTIPROC_METHOD")
    return {
        "pid": _os.getpid(),
        "model": cfg.model_config.model,
        "dtype": str(cfg.model_config.dtype),
        "max_model_len": cfg.model_config.max_model_len,
        "enforce_eager": cfg.model_config.enforce_eager,
        "seed": cfg.model_config.seed,
        "max_num_seqs": cfg.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
        "enable_prefix_caching": cfg.cache_config.enable_prefix_caching,
        "kv_cache_memory_bytes": cfg.cache_config.kv_cache_memory_bytes,
        "block_size": cfg.cache_config.block_size,
        "env": {k: _os.environ.get(k) for k in keys},
    }


def comparable(facts: dict) -> dict:
    """What must agree between the sides (not pids, thread counts or the front end's binding)."""
    keep = {k: v for k, v in facts.items() if k not in ("pid", "processes")}
    keep["processes"] = [
        {"role": p["role"], "nice": p["nice"]}
        | ({} if p["role"] == "front end" else {"thread_cpu_sets": p["thread_cpu_sets"], "thread_nices": sorted(p["thread_nices"])})
        for p in facts.get("processes", [])
    ]  # fmt: skip
    return keep


# --------------------------------------------------------------------------------------------
# the direct side: an engine in a child process at the replica's niceness
# --------------------------------------------------------------------------------------------
def _direct_host(conn, settings, env: dict, nice: int, token_ids: list, params: list, classes: list, timeout_s: float):
    """Child process: niceness and environment first (nothing heavy imported yet), then the engine."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)  # this (only) thread; every later thread and child inherits it
        os.environ.update(env)
        asyncio.run(_direct_serve(conn, settings, token_ids, params, classes, timeout_s))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


async def _direct_serve(conn, settings, token_ids, params, classes, timeout_s) -> None:
    from airan.serving.engine.vllm_engine import VllmEngine

    engine = VllmEngine(settings)
    t0 = time.monotonic()
    await engine.start()
    facts = engine_facts(engine)
    facts["processes"] = process_facts(os.getpid())
    conn.send(("ready", facts, time.monotonic() - t0))
    try:
        while True:
            msg = await asyncio.to_thread(conn.recv)
            if msg[0] == "stop":
                break
            _, indices, concurrency = msg

            async def one(i: int) -> Sample:
                return await direct_one(engine, token_ids[i], params[i], i, classes[i], timeout_s)

            samples, wall = await run_indices(one, indices, concurrency)
            conn.send(("done", [asdict(s) for s in samples], wall))
    finally:
        await engine.shutdown()
        conn.send(("stopped",))


class DirectSide:
    def __init__(self, settings, env: dict, nice: int, work: Workload, timeout_s: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_direct_host, args=(child, settings, env, nice, work.token_ids, work.params, work.classes, timeout_s),
            name="bench-direct-engine", daemon=False,  # vLLM starts children of its own
        )  # fmt: skip
        self.facts: dict = {}
        self.startup_s = 0.0

    async def _recv(self, timeout_s: float):
        if not await asyncio.to_thread(self.conn.poll, timeout_s):
            raise TimeoutError(f"direct engine process silent for {timeout_s:.0f} s")
        msg = self.conn.recv()
        if msg[0] == "error":
            raise RuntimeError(f"direct engine process failed:\n{msg[1]}")
        return msg

    async def start(self) -> None:
        self.proc.start()
        _, self.facts, self.startup_s = await self._recv(600)

    async def run(self, indices: list[int], concurrency: int, timeout_s: float) -> tuple[list[Sample], float]:
        self.conn.send(("run", indices, concurrency))
        _, samples, wall = await self._recv(timeout_s)
        return [Sample(**s) for s in samples], wall

    async def stop(self) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(("stop",))
                await self._recv(60)
        finally:
            await asyncio.to_thread(self.proc.join, 30)
            if self.proc.is_alive():
                self.proc.terminate()


class Meter(g.CpuMeter):
    """`CpuMeter` that names the direct engine's host process."""

    direct_pid: int | None = None

    def _classify(self, proc, descendants):
        if proc.pid == self.direct_pid:
            return "direct host (AsyncLLM)"
        return super()._classify(proc, descendants)


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------
def pct(values, q):
    return g.pct(list(values), q)


def class_stats(rounds: list[list[Sample]]) -> dict:
    """One class of one phase of one side: per-round p50/p95, their median and min-max, pooled figures."""
    per_round = []
    for samples in rounds:
        lat = [s.latency_ms for s in samples if s.ok]
        per_round.append({"n": len(samples), "ok": len(lat), "p50": pct(lat, 50), "p95": pct(lat, 95)})
    pooled = [s for r in rounds for s in r if s.ok]

    def over_rounds(key):
        vals = [r[key] for r in per_round if r[key] is not None]
        if not vals:
            return {"median": None, "min": None, "max": None}
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

    first = [s.first_ms for s in pooled if s.first_ms is not None]
    queue = [s.queue_ms for s in pooled if s.queue_ms is not None]
    out = {
        "count": sum(r["n"] for r in per_round),
        "ok": len(pooled),
        "errors": sorted({s.error for r in rounds for s in r if not s.ok})[:5],
        "per_round": per_round,
        "p50": over_rounds("p50"),
        "p95": over_rounds("p95"),
        "pooled_p50": pct([s.latency_ms for s in pooled], 50),
        "pooled_p95": pct([s.latency_ms for s in pooled], 95),
        "prompt_tokens_p50": pct([s.prompt_tokens for s in pooled], 50),
        "completion_tokens_p50": pct([s.completion_tokens for s in pooled], 50),
        "completion_tokens_max": max((s.completion_tokens for s in pooled), default=None),
        "finish_length": sum(s.finish_reason == "length" for s in pooled),
        "first_ms_p50": pct(first, 50),
        "queue_ms_p50": pct(queue, 50),
        "after_first_ms_p50": pct([s.latency_ms - s.first_ms for s in pooled if s.first_ms is not None], 50),
    }
    server_total = [s for s in pooled if s.server_total_ms is not None]
    if server_total:
        out["server_total_ms_p50"] = pct([s.server_total_ms for s in server_total], 50)
        out["transport_ms_p50"] = pct([s.latency_ms - s.server_total_ms for s in server_total], 50)
        sites: dict[str, list[float]] = {}
        for s in server_total:
            sites.setdefault(s.site_id, []).append(s.latency_ms)
        out["by_site"] = {k: {"n": len(v), "p50": pct(v, 50), "p95": pct(v, 95)} for k, v in sorted(sites.items())}
    return out


# --------------------------------------------------------------------------------------------
# one configuration: both sides up, rounds A B, B A, ...
# --------------------------------------------------------------------------------------------
async def run_config(name: str, config, work: Workload, args, console) -> dict:
    from airan.client import AsyncAiranClient
    from airan.stack import LocalStack

    settings, env, cpus, twin = direct_engine_spec(config, name)
    meter = Meter()
    console.rule(f"[bold]{name}[/]: {len(config.sites)} site(s), {sum(r.count for r in config.replicas)} replica(s); "
                 f"direct engine = replica {twin}'s settings, CPUs {cpus}")  # fmt: skip
    t0 = time.monotonic()
    with console.status(f"{name}: starting Ray, the replicas and the gRPC server..."):
        plane = await LocalStack(config).__aenter__()
    direct = None
    try:
        stack_startup = {"total": round(time.monotonic() - t0, 1), **{k: round(v, 1) for k, v in plane.startup_s.items()}}
        replicas = {}
        for r in plane.pool.details():
            if r.view.state.name != "READY":
                raise RuntimeError(f"replica {r.view.replica_id} is {r.view.state.name}: {r.error}")
            facts = await asyncio.wait_for(r.actor.__ray_call__.remote(lambda actor: engine_facts(actor.engine)), 60)
            facts["processes"] = process_facts(facts["pid"])
            replicas[r.view.replica_id] = facts
        twin_facts = replicas[twin]
        # the niceness the replica's Python main thread (and vLLM's processes it started) run at
        nice = twin_facts["processes"][0]["nice"] if args.nice is None else args.nice
        console.print(f"{name}: stack up in {stack_startup['total']} s; replica niceness (main thread/engine core/worker) "
                      + ", ".join(f"{k} {'/'.join(str(p['nice']) for p in v['processes'])}" for k, v in replicas.items())
                      + f"; the direct engine runs at nice {nice}")  # fmt: skip

        direct = DirectSide(settings, env, nice, work, args.timeout_s)
        meter.direct_pid = None
        with console.status(f"{name}: starting the direct engine (nice {nice}, {env})..."):
            await direct.start()
        meter.direct_pid = direct.proc.pid
        engine_diff = g.dict_diff(comparable(direct.facts), comparable(twin_facts))
        if engine_diff:
            console.print(f"[red]{name}: the direct engine differs from replica {twin}:[/] {json.dumps(engine_diff)}")

        async with AsyncAiranClient(plane.address) as client:

            async def grpc_run(indices, conc):
                async def one(i):
                    return await grpc_one(client, work.requests[i], i, work.classes[i], args.timeout_s)

                return await run_indices(one, indices, conc)

            async def direct_run(indices, conc):
                return await direct.run(indices, conc, args.timeout_s * max(1, len(indices)))

            runners = {"grpc": grpc_run, "direct": direct_run}
            # warm-up, excluded: each class one at a time, then a burst at the mix's concurrency
            with console.status(f"{name}: warm-up (both sides)..."):
                for side in SIDES:
                    k = 2 * len(CLASSES)
                    await runners[side](work.warmup[:k], 1)
                    await runners[side](work.warmup[k:], args.mix_concurrency)

            order = []
            for r in range(args.rounds):
                order += [(s, r) for s in (SIDES if r % 2 == 0 else SIDES[::-1])]
            rounds = {side: [] for side in SIDES}
            for side, r in order:
                quiet = await g.wait_quiet(args.wait_quiet_s, console) if args.wait_quiet_s > 0 else {}
                result = {"round": r, "quiet_wait": quiet, "phases": {}}
                for phase, conc in (("c1", 1), ("mix", args.mix_concurrency)):
                    indices = work.rounds[r][phase]
                    if not indices:
                        continue
                    with console.status(f"{name}: {side} round {r + 1}/{args.rounds}, {phase} ({len(indices)} requests)..."):
                        before = meter.snapshot()
                        samples, wall = await runners[side](indices, conc)
                        cpu = g.CpuMeter.delta(before, meter.snapshot())
                    result["phases"][phase] = {"samples": samples, "wall_s": wall, "cpu": cpu, "concurrency": conc}
                    near = [s.latency_ms for s in samples if s.ok and s.cls == "near_rt"]
                    non = [s.latency_ms for s in samples if s.ok and s.cls == "non_rt"]
                    bad = sum(not s.ok for s in samples)
                    console.print(
                        f"  {name} {side:6} round {r + 1} {phase:3}: NEAR_RT p50/p95 {g.fmt(pct(near, 50))}/{g.fmt(pct(near, 95))} ms, "
                        f"NON_RT {g.fmt(pct(non, 50))}/{g.fmt(pct(non, 95))} ms, {len(samples)} requests"
                        + (f", [red]{bad} failed[/]" if bad else "")
                        + f", other work {100 * (cpu['other_share'] or 0):.0f} % CPU"
                    )  # fmt: skip
                rounds[side].append(result)
    finally:
        with console.status(f"{name}: stopping..."):
            if direct is not None:
                await direct.stop()
            await plane.stop()

    # the direct answers, judged by the real gateway as the gRPC path's first attempt would be
    renderer = args.renderer
    answers = {s.index: (s.text, s.completion_tokens, s.finish_reason)
               for r in rounds["direct"] for ph in r["phases"].values() for s in ph["samples"] if s.ok}  # fmt: skip
    valid = await first_try_valid(config, args.served_model, renderer, work.requests, answers)

    out = {
        "config": config.model_dump(mode="json", exclude_none=True, exclude={"catalog"}),
        "direct_twin": twin,
        "direct_cpus": cpus,
        "direct_env": env,
        "direct_nice": nice,
        "engine_settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "startup_s": {"grpc": stack_startup, "direct": round(direct.startup_s, 1)},
        "engines": {"direct": direct.facts, "replicas": replicas},
        "engine_diff": engine_diff,
        "order": [f"{side} (round {r + 1})" for side, r in order],
        "phases": {},
        "cpu": {},
        "checks": {},
        "samples": {},
    }
    for side in SIDES:
        out["phases"][side], out["cpu"][side], out["samples"][side] = {}, {}, {}
        for phase in PHASES:
            runs = [r["phases"][phase] for r in rounds[side] if phase in r["phases"]]
            if not runs:
                continue
            out["phases"][side][phase] = {
                cls: class_stats([[s for s in run["samples"] if s.cls == cls] for run in runs]) for cls in CLASSES
            }
            out["cpu"][side][phase] = [
                {"round": r["round"] + 1, "wall_s": round(run["wall_s"], 2), **run["cpu"]}
                for r, run in zip(rounds[side], runs)
            ]
            out["samples"][side][phase] = [
                {k: v for k, v in asdict(s).items() if k != "text"} | {"text": s.text[:160]}
                for run in runs for s in run["samples"]
            ]  # fmt: skip
    d_all = {s.index: s for r in rounds["direct"] for ph in r["phases"].values() for s in ph["samples"] if s.ok}
    g_all = {s.index: s for r in rounds["grpc"] for ph in r["phases"].values() for s in ph["samples"] if s.ok}
    both = sorted(set(d_all) & set(g_all))
    for cls in CLASSES:
        idx = [i for i in both if work.classes[i] == cls]
        out["checks"][cls] = {
            "compared": len(idx),
            "prompt_tokens_match": sum(g_all[i].prompt_tokens == len(work.token_ids[i]) for i in idx),
            "identical_text": sum(g_all[i].text == d_all[i].text for i in idx),
            "direct_first_try_valid": sum(valid.get(i, False) for i in idx),
        }
    return out


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def ms(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def spread(d: dict) -> str:
    return f"{ms(d['median'])} ({ms(d['min'])}-{ms(d['max'])})"


def table_rows(report: dict) -> list[list[str]]:
    rows = []
    for name, res in report["configs"].items():
        for phase in PHASES:
            for cls in CLASSES:
                for side in SIDES:
                    s = res["phases"].get(side, {}).get(phase, {}).get(cls)
                    if s is None:
                        continue
                    other = [c["other_share"] or 0.0 for c in res["cpu"][side][phase]]
                    rows.append([
                        name, phase if phase == "mix" else "1 at a time", cls.upper(), side,
                        f"{s['ok']}/{s['count']}", spread(s["p50"]), spread(s["p95"]),
                        ms(s["prompt_tokens_p50"]), ms(s["completion_tokens_p50"]),
                        f"{100 * max(other):.0f}",
                    ])  # fmt: skip
    return rows


COLUMNS = ("config", "load", "class", "side", "ok/n", "p50 ms (min-max over rounds)", "p95 ms (min-max)",
           "prompt tok p50", "completion tok p50", "other work % CPU (max round)")  # fmt: skip


def markdown_table(report: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    return "\n".join(lines)


def goals(report: dict) -> dict:
    out = {}
    for name, res in report["configs"].items():
        s = res["phases"].get("grpc", {}).get("c1", {}).get("near_rt")
        if s is None or name not in GOALS_MS:
            continue
        p95 = s["p95"]["median"]
        out[name] = {"goal_ms": GOALS_MS[name], "near_rt_p95_ms": p95, "worst_round_p95_ms": s["p95"]["max"],
                     "met": p95 is not None and p95 <= GOALS_MS[name]}  # fmt: skip
    return out


def print_report(report: dict, console) -> None:
    from rich.table import Table

    m = report["machine"]
    t = Table(
        title=f"Diagnosis latency, end to end — {report['model']}, {report['rounds']} rounds, "
        f"medians over rounds (min-max), mix = {report['args']['mix_concurrency']} in flight",
        caption=f"{m['cpu_model']}, {m['cores_usable']} cores, {m['memory_gib']} GiB, vLLM {m['vllm']}",
    )
    for col in COLUMNS:
        t.add_column(col, justify="left" if col in ("config", "load", "class", "side") else "right")
    for row in table_rows(report):
        t.add_row(*row)
    console.print(t)
    prep = report["workload"].get("gateway_prep_ms_p50", {})
    if prep:
        console.print("the gateway's own work before dispatch (validate, evidence, detector, prompt, grammar, route), "
                      "in-process without an engine, p50: " + ", ".join(f"{c.upper()} {v:.1f} ms" for c, v in prep.items()))  # fmt: skip
    for name, res in report["configs"].items():
        for cls in CLASSES:
            gs, ds = res["phases"]["grpc"].get("c1", {}).get(cls), res["phases"]["direct"].get("c1", {}).get(cls)
            if not gs or not ds:
                continue
            console.print(
                f"{name} {cls.upper()} 1 at a time, p50s: gRPC {ms(gs['pooled_p50'])} ms = transport+servicer "
                f"{ms(gs.get('transport_ms_p50'))} + gateway total {ms(gs.get('server_total_ms_p50'))} (queue "
                f"{ms(gs['queue_ms_p50'])}, to first token {ms(gs['first_ms_p50'])}); direct {ms(ds['pooled_p50'])} ms "
                f"(engine queue {ms(ds['queue_ms_p50'])}, first chunk {ms(ds['first_ms_p50'])}, then "
                f"{ms(ds['after_first_ms_p50'])} to the end); completion tokens p50 {ms(ds['completion_tokens_p50'])}, "
                f"max {ms(ds['completion_tokens_max'])}, cut by max_tokens {ds['finish_length']}"
            )  # fmt: skip
            if len(gs.get("by_site", {})) > 1:
                console.print("    gRPC by serving site: " + "; ".join(
                    f"{k} n={v['n']} p50 {ms(v['p50'])} p95 {ms(v['p95'])}" for k, v in gs["by_site"].items()))  # fmt: skip
        c = res["checks"]
        console.print(
            f"{name} checks: same engine settings/env/niceness/binding as replica {res['direct_twin']}: "
            + ("[green]yes[/]" if not res["engine_diff"] else f"[red]NO[/] {json.dumps(res['engine_diff'])}")
            + "; " + "; ".join(
                f"{cls.upper()} prompt lengths equal {v['prompt_tokens_match']}/{v['compared']}, identical answers "
                f"{v['identical_text']}/{v['compared']}, direct answer valid at first try {v['direct_first_try_valid']}/{v['compared']}"
                for cls, v in c.items())
        )  # fmt: skip
        for side in SIDES:
            for phase, rounds in res["cpu"][side].items():
                used: dict[str, float] = {}
                for r in rounds:
                    for k, v in r["cpu_s"].items():
                        used[k] = used.get(k, 0.0) + v
                wall = sum(r["wall_s"] for r in rounds)
                top = sorted({tuple(x) for r in rounds for x in r["other_processes_top"]}, reverse=True)[:3]
                console.print(
                    f"    CPU {name} {side} {phase}: {wall:.0f} s wall; "
                    + "; ".join(f"{k} {v:.1f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.05)
                    + (f"; busiest others: {', '.join(f'{lbl[:40]} {s:.1f}' for s, lbl in top)}" if top else "")
                )  # fmt: skip
    for name, goal in report["goals"].items():
        console.print(
            f"goal {name}: NEAR_RT p95 through gRPC, one at a time, {ms(goal['near_rt_p95_ms'])} ms (median of rounds; "
            f"worst round {ms(goal['worst_round_p95_ms'])}) vs <= {ms(goal['goal_ms'])} ms: "
            + ("[green]met[/]" if goal["met"] else "[red]not met[/]")
        )  # fmt: skip
    console.print(f"load average before/after: {report['load']['before']} / {report['load']['after']}")
    console.print("\n" + markdown_table(report))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["configs"])
    fig, axes = plt.subplots(len(names), len(PHASES), figsize=(11, 3.6 * len(names)), squeeze=False)
    colors = {"grpc": "#1f77b4", "direct": "#ff7f0e"}
    for row, name in enumerate(names):
        res = report["configs"][name]
        for col, phase in enumerate(PHASES):
            ax = axes[row][col]
            data, labels, cols = [], [], []
            for cls in CLASSES:
                for side in SIDES:
                    samples = [s["latency_ms"] for s in res["samples"].get(side, {}).get(phase, []) if s["ok"] and s["cls"] == cls]
                    if samples:
                        data.append(samples)
                        labels.append(f"{cls.upper()}\n{side}")
                        cols.append(colors[side])
            if not data:
                ax.set_visible(False)
                continue
            box = ax.boxplot(data, whis=(5, 95), showfliers=True, patch_artist=True, widths=0.6)
            ax.set_xticks(range(1, len(labels) + 1), labels)
            for patch, c in zip(box["boxes"], cols):
                patch.set_facecolor(c)
                patch.set_alpha(0.5)
            for k, samples in enumerate(data, start=1):
                jitter = [k + 0.18 * ((j * 0.618) % 1 - 0.5) for j in range(len(samples))]
                ax.scatter(jitter, samples, s=4, color="black", alpha=0.35, zorder=3)
            if name in GOALS_MS:
                ax.axhline(GOALS_MS[name], color="red", linestyle="--", linewidth=1)
                ax.text(len(labels) + 0.45, GOALS_MS[name], f"NEAR_RT p95 goal {GOALS_MS[name]:.0f} ms", color="red",
                        ha="right", va="bottom", fontsize=8)  # fmt: skip
            n_rep = sum(r.get("count", 1) for r in res["config"]["replicas"])
            load = "one at a time" if phase == "c1" else f"mix, {report['args']['mix_concurrency']} in flight"
            ax.set_title(f"{name} ({n_rep} replica{'s' if n_rep > 1 else ''}), {load}", fontsize=10)
            ax.set_ylabel("end-to-end latency, ms")
            ax.set_ylim(bottom=0)
            ax.grid(axis="y", alpha=0.3)
    m = report["machine"]
    fig.suptitle(f"Diagnosis latency: gRPC path vs direct engine, {report['model']}; boxes p25-p75, whiskers p5-p95, "
                 f"all rounds\n{m['cpu_model']}, {m['cores_usable']} cores", fontsize=10)  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
async def main_async(args) -> int:
    from rich.console import Console

    from airan.core.prompting import PromptRenderer
    from airan.store.registry import ModelNotAvailable, materialize

    console = Console(width=None if sys.stdout.isatty() else 150)
    machine = g.machine_info()
    load_before = [round(x, 2) for x in os.getloadavg()]
    console.print(f"[bold]machine[/]: {machine['cpu_model']}, {machine['cores_usable']} cores, {machine['memory_gib']} GiB; "
                  f"vLLM {machine['vllm']}, torch {machine['torch']}, Ray {machine['ray']}; load average {load_before}")  # fmt: skip
    configs = bench_configs(args.model, args.configs)
    first = next(iter(configs.values()))
    args.served_model = first.replicas[0].model
    spec = first.model(args.served_model)
    try:
        model_path = materialize(spec)
    except ModelNotAvailable as e:
        console.print(f"[red]{e}[/]")
        return 2
    args.renderer = PromptRenderer(model_path)

    work = build_workload(args)
    dispatched = await capture(first, args.served_model, args.renderer, work.requests)
    work.token_ids = [ids for ids, _, _ in dispatched]
    work.params = [p for _, p, _ in dispatched]
    prep = {cls: [dispatched[i][2] for i in range(len(work.items)) if work.classes[i] == cls] for cls in CLASSES}
    prompt = {cls: [len(work.token_ids[i]) for i in range(len(work.items)) if work.classes[i] == cls] for cls in CLASSES}
    maxt = {cls: sorted({work.params[i].max_tokens for i in range(len(work.items)) if work.classes[i] == cls}) for cls in CLASSES}
    console.print(
        f"[bold]workload[/]: {len(work.items)} simulator cases (TEST seed), {args.requests} per class per round one at a time, "
        f"{args.mix} mixed at {args.mix_concurrency} in flight, {args.rounds} rounds, {len(work.warmup)} warm-up; prompt tokens "
        + ", ".join(f"{c.upper()} {min(v)}-{max(v)} (p50 {pct(v, 50):.0f}), max_tokens {maxt[c]}" for c, v in prompt.items())
        + "; the gateway's own work before dispatch (validate, evidence, detector, prompt, grammar, route) p50 "
        + ", ".join(f"{c.upper()} {pct(v, 50):.1f} ms" for c, v in prep.items())
    )  # fmt: skip

    report = {
        "benchmark": "diagnosis_latency_grpc_vs_direct",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "code": g.code_version(),
        "args": {k: v for k, v in vars(args).items() if k not in ("renderer", "served_model", "show")} | {"out": str(args.out)},
        "machine": machine,
        "model": args.served_model,
        "rounds": args.rounds,
        "workload": {
            "cases": len(work.items),
            "prompt_tokens": {c: {"min": min(v), "p50": pct(v, 50), "max": max(v)} for c, v in prompt.items()},
            "max_tokens": maxt,
            "gateway_prep_ms_p50": {c: pct(v, 50) for c, v in prep.items()},
            "example_params": {c: repr(work.params[CLASSES.index(c)]) for c in CLASSES},
            "example_question": work.items[0].question,
        },
        "configs": {},
    }
    for name, config in configs.items():
        report["configs"][name] = await run_config(name, config, work, args, console)
    report["load"] = {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}
    report["goals"] = goals(report)
    console.rule("results")
    print_report(report, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    png = args.out.with_suffix(".png")
    plot(report, png)
    console.print(f"results written to {args.out} and {png}")
    failed = sum(s["count"] - s["ok"] for res in report["configs"].values() for side in res["phases"].values()
                 for ph in side.values() for s in ph.values())  # fmt: skip
    diff = any(res["engine_diff"] for res in report["configs"].values())
    return 1 if failed or diff else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2",
                   help="smollm2: the default config's model (run `airan model prepare smollm2` first); tiny: every "
                   "replica serves the generated tiny model (mechanics only)")
    p.add_argument("--configs", nargs="+", choices=("one", "default"), default=["one", "default"])
    p.add_argument("--requests", type=int, default=40, help="requests per class per round, one at a time")
    p.add_argument("--mix", type=int, default=16, help="requests per round in the mixed phase (classes alternate; 0: none)")
    p.add_argument("--mix-concurrency", type=int, default=4, help="requests in flight in the mixed phase")
    p.add_argument("--rounds", type=int, default=3, help="rounds per side, in A B, B A, ... order")
    p.add_argument("--nice", type=int, default=None,
                   help="niceness of the direct engine (default: the replica's, read back from its Ray worker)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="client-side bound on one request")
    p.add_argument("--wait-quiet-s", type=float, default=0.0,
                   help="before each side of each round, wait up to this long for other work to use < 10%% of the CPU")
    p.add_argument("--out", type=Path, default=None, help=f"JSON results (PNG beside it); default {DEFAULT_OUT.relative_to(REPO)}")
    p.add_argument("--show", type=Path, default=None, help="print the tables of a saved results file (and redraw its PNG) and exit")
    args = p.parse_args(argv)
    for name in ("requests", "mix_concurrency", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.mix < 0:
        p.error("--mix must be >= 0")
    if args.out is None:
        args.out = DEFAULT_OUT if args.model == "smollm2" else DEFAULT_OUT.with_name("diagnosis_latency_tiny.json")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.show:
        from rich.console import Console

        report = json.loads(args.show.read_text())
        print_report(report, Console(width=None if sys.stdout.isatty() else 150))
        plot(report, args.show.with_suffix(".png"))
        return 0
    # import the serving path now: the run measures the code as it was when it started
    import airan.serving.api.convert, airan.client, airan.serving.cluster.replicas, airan.serving.engine.vllm_engine  # noqa: F401,E401
    import airan.serving.gateway, airan.store.registry, airan.core.prompting, airan.serving.server, airan.stack  # noqa: F401,E401
    import airan.evaluation.runner, airan.evaluation.cases  # noqa: F401,E401

    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
