"""Radio first on the real stack: Ray site node, vLLM CPU replicas of the tiny model, gRPC on 127.0.0.1.

A radio surge shrinks a site's headroom below what its model needs: the replica is swapped for a
lighter variant (the tiny model's drop-layers build); the new replica starts beside it while streams
run on the old one, and the stream in flight when the new one takes over is drained to its end. Then a bigger surge: no variant
fits, the site is SITE_SURGED with the reason, and its replica's real CPU use stays under the cap.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import time

import pytest

from airan.client import AsyncAiranClient, build_request
from airan.config import parse_config
from airan.serving.cluster.cpucap import tree_cpu_seconds
from airan.stack import LocalStack
from airan.core.routing.types import ReplicaState
from airan.v1 import control_pb2

pytestmark = [pytest.mark.slow]
SITE = "bs-01"


@pytest.fixture(scope="module")
def tiny_drop(tmp_path_factory):
    """The tiny model with one of its two layers dropped (2 heal steps): the lighter variant."""
    from airan.factory.tiny import ensure_tiny_model
    from airan.factory.variants import RECIPES, build_variant

    recipe = RECIPES["smollm2-drop10"]
    recipe = dataclasses.replace(recipe, name="tiny-drop", params={**recipe.params, "n_drop": 1, "heal_steps": 2})
    return build_variant(recipe, parent_dir=ensure_tiny_model(), show_progress=False, calib_items=6,
                         heldout_items=3, parent_answers=False)  # fmt: skip


def _entry(parent, tok_s_1, rank):
    # the reference near-RT answer (11 tokens in 1 s, no prefill cost here) on a 1-CPU catalog machine
    return {"parent": parent, "method": "base" if parent is None else "drop-layers", "weight_mb": 3,
            "memory_mb": 2000, "tok_s_1": tok_s_1, "tok_s_16": tok_s_1 * 4, "ttft_ms": 0.0, "macro_f1": 0.1,
            "validity": 1.0, "perplexity": 100.0, "quality_rank": rank, "measured_on": "test machine, 1 CPUs",
            "measured_at": "test"}  # fmt: skip


@pytest.fixture(scope="module")
def config(tiny_drop):
    from conftest import prepare_tiny_models

    return prepare_tiny_models(parse_config({
        "sites": [{"id": SITE, "cpus": 1, "latency_ms": {"xapp-test": 1.0}}],
        "models": [
            {"name": "tiny-llama", "source": "tiny-random", "max_model_len": 2048, "dtype": "float32"},
            {"name": "tiny-drop", "source": "local", "path": str(tiny_drop), "parent": "tiny-llama",
             "method": "drop-layers", "max_model_len": 2048},
        ],
        "replicas": [{"site": SITE, "model": "tiny-llama"}],
        "engine": {"kv_cache_gb": 0.25, "max_num_seqs": 8},
        "limits": {"max_tokens_limit": 1800},
        "server": {"host": "127.0.0.1", "port": 0, "grace_s": 1},
        "router": {"policy": "radio_first"},
        # needs: tiny-llama 11/22 = 0.5 CPU, tiny-drop 11/110 = 0.1 CPU
        "catalog": {"tiny-llama": _entry(None, 22.0, 1), "tiny-drop": _entry("tiny-llama", 110.0, 2)},
        "radio": {"min_ai_headroom": 0.05, "headroom_margin": 0.0, "control_interval_s": 0.3,
                  "forecast_window_s": 3.0, "forecast_horizon_s": 0.5, "stale_after_s": 600,
                  "swap_hold_s": 1.0},
    }))  # fmt: skip


async def _report(client, share: float, n: int = 6) -> None:
    for _ in range(n):  # a few reports: the forecast's trend needs some
        await client.report_ran_load({SITE: share})
        await asyncio.sleep(0.05)


async def _wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # bounded
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


async def test_a_surge_swaps_the_replica_under_a_stream_and_the_stream_completes(config):
    async with LocalStack(config) as plane, AsyncAiranClient(plane.address) as client:
        pool = plane.pool
        await _report(client, 0.0)
        [old] = (await client.replicas(SITE)).replicas
        assert old.model == "tiny-llama" and old.state == control_pb2.REPLICA_READY
        assert pool.details()[0].cap_mechanism in ("cgroup2", "cgroup1", "affinity")

        request = build_request("Summarise the state of bs-01 in detail.", site_ids=[SITE],
                                controller_id="xapp-test", priority="best_effort", max_tokens=1800)  # fmt: skip
        streams: list[tuple[float, list]] = []  # per stream: when it was opened, its (time, chunk)s
        draining_at: list[float] = []  # when the old replica was seen draining (the new one ready)

        async def one_stream():
            chunks = []
            streams.append((time.monotonic(), chunks))
            async for chunk in client.ask_stream(request, timeout_s=600):
                chunks.append((time.monotonic(), chunk))

        def old_state():
            return next((d.view.state for d in pool.details() if d.view.replica_id == old.replica_id), None)

        async def keep_one_stream_open():
            """Streams back to back on the old replica until it drains, so one is in flight when the new
            replica takes over (a stream lasts ~1 min at the surge's cap; the new replica starts in ~2)."""
            running = asyncio.create_task(one_stream())
            end = time.monotonic() + 600
            while time.monotonic() < end:  # bounded
                if old_state() is ReplicaState.DRAINING:
                    draining_at.append(time.monotonic())
                    break
                if running.done():
                    running.result()
                    running = asyncio.create_task(one_stream())
                await asyncio.sleep(0.1)
            await running

        keeper = asyncio.create_task(keep_one_stream_open())
        await _wait_for(lambda: _has_text(streams), 120, "the first stream's text")
        # the radio now needs 0.6 of the site: 0.4 CPU is below tiny-llama's 0.5, above tiny-drop's 0.1
        surge = asyncio.create_task(_report(client, 0.6, n=4000))  # keeps reporting through the swap

        async def swapped():
            return pool.swaps[-1] if pool.swaps else None

        swap = await _wait_for(swapped, 600, "the swap")
        await keeper
        surge.cancel()
        await asyncio.gather(surge, return_exceptions=True)

        assert swap["old"] == old.replica_id and swap["variant"] == "tiny-drop" and swap["streams_cut"] == 0
        assert draining_at, "the old replica was never seen draining"
        assert all(c and c[-1][1].final for _, c in streams)  # every stream ended with its final chunk
        # the stream in flight on the old replica when the new one took over: drained to its end
        open_then = [c for opened, c in streams if opened < draining_at[0] < c[-1][0]
                     and c[-1][1].replica_id == old.replica_id]  # fmt: skip
        assert len(open_then) == 1, f"{len(streams)} streams, none open on the old replica when it began draining"
        final = open_then[0][-1][1]
        assert final.finish_reason in ("length", "stop") and final.completion_tokens > 0
        print(f"stream ended {open_then[0][-1][0] - draining_at[0]:.1f} s after the old replica began draining; "
              f"{len(streams)} streams; swap {swap}")
        [new] = (await client.replicas(SITE)).replicas
        assert new.replica_id == swap["new"] and new.state == control_pb2.REPLICA_READY
        assert new.model == "tiny-llama"  # requests keep naming the model; the variant serves them
        r = await client.ask(build_request("Is bs-01 healthy?", site_ids=[SITE], controller_id="xapp-test",
                                           max_tokens=8), timeout_s=120)  # fmt: skip
        assert r.replica_id == new.replica_id

        # a bigger surge: 0.05 CPU fits no variant -> SITE_SURGED with the reason, requests refused
        await _report(client, 0.95, n=10)
        site = await _wait_for(
            lambda: _site_if(client, lambda s: s.state == control_pb2.SITE_SURGED), 30, "SITE_SURGED")
        assert "tiny-drop" in site.state_reason and "radio surge" in site.state_reason
        with pytest.raises(Exception) as e:
            await client.ask(build_request("Is bs-01 healthy?", site_ids=[SITE], max_tokens=8), timeout_s=30)
        assert "radio" in str(e.value)


async def _has_text(streams):
    return any(chunk.text_delta for _, c in streams for _, chunk in c)


async def _site_if(client, cond):
    [site] = (await client.topology()).sites
    return site if cond(site) else None


async def test_a_replica_s_real_cpu_use_stays_under_its_cap(config):
    """Busy replica, cap 0.25 CPU: its process tree's CPU seconds over wall seconds stay near 0.25."""
    light = {**config.catalog["tiny-llama"].model_dump(), "tok_s_1": 110.0}  # needs 0.1 CPU: 0.25 fits
    cfg = config.model_copy(update={"radio": config.radio.model_copy(update={"swap_variants": False}),
                                    "catalog": {**config.catalog, "tiny-llama": type(config.catalog["tiny-llama"])(**light)}})  # fmt: skip
    async with LocalStack(cfg) as plane, AsyncAiranClient(plane.address) as client:
        await _report(client, 0.75)  # 0.25 CPU left for the AI
        await asyncio.sleep(1.0)
        [detail] = plane.pool.details()
        cap = detail.view.cpu_cap
        assert cap is not None and cap <= 0.25 + 1e-6 and detail.view.max_concurrency == 2
        request = build_request("Describe bs-01.", site_ids=[SITE], controller_id="xapp-test", max_tokens=400)
        load = [asyncio.create_task(client.ask(request, timeout_s=300)) for _ in range(4)]
        await asyncio.sleep(3.0)  # the engine is busy
        pid = detail.pid
        c0, t0 = tree_cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(5.0)
        used = (tree_cpu_seconds(pid) - c0) / (time.monotonic() - t0)
        await asyncio.gather(*load, return_exceptions=True)
        print(f"cap {cap:.2f} CPU via {detail.cap_mechanism}: measured {used:.2f} CPU")
        if detail.cap_mechanism in ("cgroup2", "cgroup1"):
            assert used <= cap * 1.1 + 0.02
        assert os.cpu_count()
