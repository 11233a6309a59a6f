"""Run the methods over a labelled set: rules in-process, the model through the real gRPC path.

Model answers go client -> gRPC -> gateway (prompt, route) -> Ray replica ->
vLLM, exactly as a RAN controller's would, with a few queries in flight to
keep the engine busy. The two model methods run one after the other, never
together, so their latencies and tok/s are comparable.
"""
from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import grpc

from airan.client import AsyncAiranClient, build_request, kpi
from airan.config import AiranConfig, parse_config
from airan.core.diagnosis import cause_from_text
from airan.evaluation import rules
from airan.evaluation.dataset import EvalItem
from airan.evaluation.metrics import ERROR, INVALID, MethodReport, Prediction, summarize
from airan.core.prompting import PROMPT_VERSION
from airan.v1 import netops_pb2

METHODS = ("rules", "free_text", "diagnosis")
SMOLLM2 = "smollm2-135m-instruct"
CONTROLLER = "eval-netops"
CAUSE_NAMES = {v: k.removeprefix("CAUSE_") for k, v in netops_pb2.Cause.items()}


def smollm2_stack_config(port: int = 0, kv_cache_gb: float = 1.0, max_num_seqs: int = 8) -> AiranConfig:
    """One site, one SmolLM2-135M-Instruct replica with every core (on 2 cores one replica is fastest)."""
    import os

    return parse_config({
        "sites": [{"id": "bs-01", "cpus": len(os.sched_getaffinity(0)), "memory_gb": 8}],
        "models": [{"name": SMOLLM2, "source": "smollm2", "dtype": "bfloat16", "max_model_len": 2048}],
        "replicas": [{"site": "bs-01", "model": SMOLLM2}],
        "engine": {"kv_cache_gb": kv_cache_gb, "max_num_seqs": max_num_seqs},
        "server": {"host": "127.0.0.1", "port": port, "grace_s": 1},
    })


def ask_request(item: EvalItem, diagnosis: bool, max_tokens: int = 0, model: str = "") -> netops_pb2.AskRequest:
    """The request a controller would send for this item; the radio site is named in the question,
    not in site_ids (those pick the serving site, and the eval stack need not have the item's).
    No request_id: the gateway would answer a repeated one from its idempotency cache."""
    return build_request(
        item.question,
        cell_ids=item.cell_ids,
        kpis=[kpi(k.name, k.value, k.unit, k.cell_id, k.time_s) for k in item.kpis],
        priority="non_rt",
        max_tokens=max_tokens,
        controller_id=CONTROLLER,
        diagnosis=diagnosis,
        model=model,
    )


def cells_in_text(text: str, context_cells: Sequence[str]) -> tuple[str, ...]:
    """Context cells a free-text answer names (bs-01/c1 but not bs-01/c12)."""
    return tuple(c for c in context_cells if re.search(re.escape(c) + r"(?![0-9])", text))


async def _ask_one(client: AsyncAiranClient, item: EvalItem, diagnosis: bool, max_tokens: int, model: str,
                   timeout_s: float) -> Prediction:
    t0 = time.perf_counter()
    try:
        r = await client.ask(ask_request(item, diagnosis, max_tokens, model), timeout_s=timeout_s)
    except grpc.aio.AioRpcError as e:
        latency = 1000 * (time.perf_counter() - t0)
        invalid = diagnosis and e.code() == grpc.StatusCode.INTERNAL and "no valid diagnosis" in (e.details() or "")
        return Prediction(
            item.item_id, INVALID if invalid else ERROR, (), valid=False if invalid else None,
            error=f"{e.code().name}: {(e.details() or '')[:300]}", latency_ms=latency,
        )
    latency = 1000 * (time.perf_counter() - t0)
    if diagnosis:
        d = r.diagnosis
        return Prediction(
            item.item_id, CAUSE_NAMES.get(d.cause, "UNKNOWN"), tuple(d.affected_cell_ids), valid=True,
            latency_ms=latency, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
            text=d.rationale,
        )
    return Prediction(
        item.item_id, cause_from_text(r.text), cells_in_text(r.text, item.context_cells), latency_ms=latency,
        prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens, text=r.text,
    )


async def ask_items(
    address: str,
    items: Sequence[EvalItem],
    diagnosis: bool,
    *,
    concurrency: int = 4,
    max_tokens: int = 0,
    model: str = "",
    timeout_s: float = 300.0,
    on_done: Callable[[Prediction], None] | None = None,
) -> tuple[list[Prediction], float]:
    """Predictions in item order and the run's wall time; at most `concurrency` queries in flight."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    gate = asyncio.Semaphore(concurrency)

    async def one(client: AsyncAiranClient, item: EvalItem) -> Prediction:
        async with gate:
            p = await _ask_one(client, item, diagnosis, max_tokens, model, timeout_s)
        if on_done is not None:
            on_done(p)
        return p

    async with AsyncAiranClient(address) as client:
        t0 = time.perf_counter()
        preds = await asyncio.gather(*(one(client, i) for i in items))  # one task per item: bounded
        return list(preds), time.perf_counter() - t0


@dataclass
class EvalResult:
    meta: dict
    reports: list[MethodReport]
    predictions: dict[str, list[Prediction]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"meta": self.meta, "methods": [asdict(r) for r in self.reports]}


async def run_eval(
    items: Sequence[EvalItem],
    dev: Sequence[EvalItem],
    methods: Sequence[str] = METHODS,
    *,
    address: str | None = None,
    config: AiranConfig | None = None,
    concurrency: int = 4,
    model: str = "",
    timeout_s: float = 300.0,
    progress: Callable[[str, int, int], None] | None = None,
) -> EvalResult:
    """Score `methods` on `items`; the rules are tuned on `dev` only.

    Model methods use the control plane at `address`, or a LocalStack of `config`
    (default: SmolLM2 on one site) started here.
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    reports, predictions = [], {}
    meta: dict = {
        "n_items": len(items), "labels": sorted({i.label for i in items}), "item_seeds": _span(items),
        "dev_items": len(dev), "dev_seeds": _span(dev), "concurrency": concurrency, "prompt_version": PROMPT_VERSION,
    }
    if "rules" in methods:
        th, dev_f1 = rules.tune(dev)
        t0 = time.perf_counter()
        preds = rules.predict(items, th)
        reports.append(summarize("rules", items, preds, time.perf_counter() - t0, uses_model=False))
        predictions["rules"] = preds
        meta["rule_thresholds"] = asdict(th)
        meta["rule_dev_macro_f1"] = round(dev_f1, 4)
    model_methods = [m for m in methods if m != "rules"]
    if model_methods:
        if address is not None:
            await _run_models(address, items, model_methods, reports, predictions, meta, concurrency, model,
                              timeout_s, progress)
        else:
            from airan.stack import LocalStack

            cfg = config or smollm2_stack_config()
            async with LocalStack(cfg) as plane:
                meta["startup_s"] = {k: round(v, 1) for k, v in plane.startup_s.items()}
                await _run_models(plane.address, items, model_methods, reports, predictions, meta, concurrency,
                                  model, timeout_s, progress)
    order = {m: k for k, m in enumerate(METHODS)}
    reports.sort(key=lambda r: order[r.method])
    return EvalResult(meta, reports, predictions)


async def _run_models(address, items, methods, reports, predictions, meta, concurrency, model, timeout_s, progress):
    async with AsyncAiranClient(address) as client:
        # one unscored query first: engine warm-up (and the prompt prefix cache) stays out of the latencies
        warm = await client.ask(ask_request(items[0], True, model=model), timeout_s=timeout_s) if items else None
        replicas = (await client.replicas()).replicas
    if warm is not None:
        meta["model"] = warm.model
    meta["replicas"] = [r.replica_id for r in replicas]
    for method in methods:
        done = 0

        def tick(_: Prediction, method=method) -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(method, done, len(items))

        preds, wall = await ask_items(address, items, method == "diagnosis", concurrency=concurrency,
                                      model=model, timeout_s=timeout_s, on_done=tick)
        reports.append(summarize(method, items, preds, wall, uses_model=True))
        predictions[method] = preds


def _span(items: Sequence[EvalItem]) -> list[int]:
    seeds = [i.seed for i in items]
    return [min(seeds), max(seeds)] if seeds else []
