"""Benchmark: what a costly in-bounds request does to every other call while its prompt renders.

The gateway renders prompts (detector, retrieval, tokenizer) in a worker thread. Side by side in one
run, over the same in-process server (the real gRPC server, gateway and tokenizer; fake engines
that answer at once, so only the control plane's own work is measured):

  (A) on loop    the render called inline on the event loop, as before (the baseline);
  (B) off loop   `asyncio.to_thread`, as served.

Load: `--senders` callers each sending the costliest request within the bounds (a 4,000-character
question, 256 cells, 512 KPI samples, 64 events, DIAGNOSIS) back to back. Probe: one caller sending
GetTopology (no render) every 20 ms; its latency is what every other call waits for a busy loop.
Rounds alternate A B B A ...; the table gives the probe's median, p99 and max over all rounds, and
the costly requests answered per second.

    .venv/bin/python benchmarks/bench_render_off_loop.py --model smollm2 --seconds 8 --rounds 2
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from grpc_health.v1 import health  # noqa: E402

import airan.serving.gateway as gateway_module  # noqa: E402
from airan.client import AsyncAiranClient, build_request, kpi  # noqa: E402
from airan.config import LimitsConfig, load_config  # noqa: E402
from airan.core import limits as L  # noqa: E402
from airan.core.prompting import PromptRenderer  # noqa: E402
from airan.factory.tiny import ensure_tiny_model  # noqa: E402
from airan.serving.gateway import Gateway  # noqa: E402
from airan.serving.server import build_grpc_server  # noqa: E402
from airan.serving.sites import SiteRegistry  # noqa: E402
from airan.store.registry import materialize, packaged_detector  # noqa: E402
from fakes import CONFIG, FakePool, FakeReplica  # noqa: E402

PROBE_EVERY_S = 0.02


def costliest_request():
    lim = LimitsConfig()
    return build_request(
        ("why is throughput low " * 200)[: lim.max_question_chars], diagnosis=True,
        cell_ids=[f"bs-01/c{i}" for i in range(L.MAX_CELL_IDS)],
        kpis=[kpi(f"DRB.K{i % 40}", float(i), "u", f"bs-01/c{i % 256}", time.time() - 5) for i in range(lim.max_kpi_samples)],
        recent_events=["alarm " * 40] * L.MAX_RECENT_EVENTS,
    )  # fmt: skip


@contextmanager
def render_on_loop(enabled: bool):
    """(A): the gateway's worker-thread call made inline, on the event loop."""
    if not enabled:
        yield
        return

    async def inline(fn, *args, **kwargs):
        return fn(*args, **kwargs)

    real = gateway_module.asyncio.to_thread
    gateway_module.asyncio.to_thread = inline
    try:
        yield
    finally:
        gateway_module.asyncio.to_thread = real


async def one_round(address: str, senders: int, seconds: float) -> tuple[list[float], int]:
    request = costliest_request()
    stop = time.monotonic() + seconds
    answered = 0
    probe_ms: list[float] = []

    async with AsyncAiranClient(address) as client:
        async def sender():
            nonlocal answered
            while time.monotonic() < stop:
                try:
                    await client.netops.Ask(request, timeout=30)
                    answered += 1
                except Exception:  # refused (e.g. over the context): the render still ran
                    answered += 1

        async def probe():
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                await client.topology()
                probe_ms.append(1000 * (time.perf_counter() - t0))
                await asyncio.sleep(PROBE_EVERY_S)

        await asyncio.gather(probe(), *(sender() for _ in range(senders)))
    return probe_ms, answered


async def main(args) -> None:
    model_path = ensure_tiny_model() if args.model == "tiny" else materialize(load_config().model("smollm2-135m-instruct"))
    renderer = PromptRenderer(model_path)
    pool = FakePool({"r1": ("bs-01", FakeReplica(words=("NORMAL",))), "r2": ("bs-02", FakeReplica(words=("NORMAL",)))})
    gateway = Gateway(CONFIG, pool, SiteRegistry(CONFIG.sites, CONFIG.radio.min_ai_headroom), {"m": renderer},
                      detector=packaged_detector())  # fmt: skip
    server = build_grpc_server(gateway, {}, health.aio.HealthServicer())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    results = {"on loop (before)": ([], 0, 0.0), "off loop (served)": ([], 0, 0.0)}
    order = [name for _ in range(args.rounds) for name in (("on loop (before)", "off loop (served)") if _ % 2 == 0
                                                           else ("off loop (served)", "on loop (before)"))]  # fmt: skip
    try:
        for name in order:
            with render_on_loop(name.startswith("on loop")):
                probe, answered = await one_round(f"127.0.0.1:{port}", args.senders, args.seconds)
            samples, total, seconds = results[name]
            results[name] = (samples + probe, total + answered, seconds + args.seconds)
    finally:
        await server.stop(0)
    print(f"\nprobe: GetTopology every {PROBE_EVERY_S * 1000:.0f} ms beside {args.senders} callers sending the costliest "
          f"in-bounds request ({args.model} tokenizer), {args.rounds} rounds x {args.seconds:.0f} s per side\n")  # fmt: skip
    print("| render | probe calls | median ms | p99 ms | max ms | costly requests/s |")
    print("|---|---|---|---|---|---|")
    for name, (samples, total, seconds) in results.items():
        q = statistics.quantiles(samples, n=100, method="inclusive")
        print(f"| {name} | {len(samples)} | {statistics.median(samples):.1f} | {q[98]:.1f} | {max(samples):.1f} | "
              f"{total / seconds:.1f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
