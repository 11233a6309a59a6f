"""Run the methods side by side on the labelled test sets (`airan eval run`).

In-process methods: `rules` (KPI thresholds tuned on DEV only) and `detector`
(the packaged LightGBM detector on the evidence the server computes for the
same request). Served models: every answer goes client -> gRPC -> gateway
(evidence, detector line, prompt, route) -> Ray replica -> vLLM in DIAGNOSIS
mode, exactly as a RAN controller's would, with a bounded number of queries in
flight. Models run one after the other, never together, so their latencies are
comparable. Every request ends in an answer or an error, and an error is
scored as a miss (`INVALID`: no valid diagnosis; `ERROR`: anything else).
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from airan.client import AsyncAiranClient, build_request, kpi
from airan.config import AiranConfig, load_config, parse_config
from airan.core.diagnosis import COMPACT_PROMPT_VERSION
from airan.core.evidence import Evidence
from airan.evaluation import rules
from airan.evaluation.dataset import EvalItem
from airan.evaluation.metrics import (
    BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, ERROR, INVALID, MethodReport, MethodScores, Prediction, failure_counts,
    score_method, summarize,
)  # fmt: skip
from airan.v1 import netops_pb2

SMOLLM2 = "smollm2-135m-instruct"
CONTROLLER = "eval-netops"
BASELINES = ("rules", "detector")
NEAR_RT_SUFFIX = "@near-rt"  # the brief (cause + cells) form of a model, asked at NEAR_RT
CAUSE_NAMES = {v: k.removeprefix("CAUSE_") for k, v in netops_pb2.Cause.items()}
ACTION_NAMES = {v: k.removeprefix("ACTION_") for k, v in netops_pb2.ActionType.items()}
REPO = Path(__file__).resolve().parents[2]


def ask_request(item: EvalItem, diagnosis: bool, max_tokens: int = 0, model: str = "",
                priority: str = "non_rt") -> netops_pb2.AskRequest:  # fmt: skip
    """The request a controller would send for this item; the radio site is named in the question,
    not in site_ids (those pick the serving site, and the eval stack need not have the item's).
    No request_id: the gateway would answer a repeated one from its idempotency cache."""
    return build_request(
        item.question,
        cell_ids=item.cell_ids,
        kpis=[kpi(k.name, k.value, k.unit, k.cell_id, k.time_s) for k in item.kpis],
        priority=priority,
        max_tokens=max_tokens,
        controller_id=CONTROLLER,
        diagnosis=diagnosis,
        model=model,
    )


def server_queries(items: Sequence[EvalItem]) -> list:
    """The `Query` the gateway builds from each item's request (proto round trip included), as
    airan.evaluation.queries.server_query does (which imports this module)."""
    from airan.config import LimitsConfig
    from airan.core.query import validate_query
    from airan.serving.api.convert import query_from_proto

    limits = LimitsConfig()
    return [validate_query(query_from_proto(ask_request(i, True), time.monotonic(), None), limits, (), time.monotonic())
            for i in items]  # fmt: skip


def server_evidence(queries: Sequence) -> list[Evidence]:
    """The evidence the gateway computes for each query (and shows the detector and the model)."""
    from airan.core.evidence import compute_evidence

    return [compute_evidence(q.kpis) for q in queries]


# --- in-process methods --------------------------------------------------------------------------------


def _first_action(d) -> tuple[str, float | None]:
    return (d.actions[0].type, d.actions[0].value) if d.actions else ("", None)


def detector_predictions(items: Sequence[EvalItem], queries: Sequence, detector, on_done=None) -> list[Prediction]:
    """The detector's answer to each query as the gateway computes it (evidence + predict), with the
    served playbook's first action; latency is that compute time."""
    from airan.core.diagnosis import playbook_diagnosis
    from airan.core.prompting import diagnosis_context

    out = []
    for item, query in zip(items, queries):
        t0 = time.perf_counter()
        answer = diagnosis_context(query, detector).detector
        d = playbook_diagnosis(answer.cause, answer.affected_cells, answer.confidence)
        latency = 1000 * (time.perf_counter() - t0)
        action, value = _first_action(d)
        out.append(Prediction(item.item_id, answer.cause, answer.affected_cells, latency_ms=latency, action=action,
                              action_value=value, confidence=answer.confidence))  # fmt: skip
        if on_done is not None:
            on_done()
    return out


def load_packaged_detector():
    from airan.store.registry import PACKAGED_DETECTOR, packaged_detector

    detector = packaged_detector()
    if detector is None:
        raise FileNotFoundError(
            f"no packaged detector at {PACKAGED_DETECTOR}: build it with "
            "`airan model build-detector --export airan/store/detector`, or leave out the detector method"
        )
    return detector


# --- served models through gRPC ------------------------------------------------------------------------


def prediction_of(item: EvalItem, r: netops_pb2.AskResponse, latency_ms: float) -> Prediction:
    d = r.diagnosis
    first = d.actions[0] if d.actions else None
    return Prediction(
        item.item_id, CAUSE_NAMES.get(d.cause, "UNKNOWN"), tuple(d.affected_cell_ids), valid=True,
        latency_ms=latency_ms, prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
        text=d.rationale, cited_kpis=tuple(d.cited_kpis),
        action=ACTION_NAMES.get(first.type, "") if first else "", action_value=first.value if first else None,
        confidence=d.confidence, server_ms=r.timings.total_ms,
    )  # fmt: skip


def failed_prediction(item: EvalItem, e: BaseException, latency_ms: float) -> Prediction:
    """An error is a miss: INVALID when the gateway found no valid diagnosis, ERROR otherwise."""
    if isinstance(e, grpc.aio.AioRpcError):
        details = e.details() or ""
        invalid = e.code() == grpc.StatusCode.INTERNAL and "no valid diagnosis" in details
        return Prediction(item.item_id, INVALID if invalid else ERROR, (), valid=False if invalid else None,
                          error=f"{e.code().name}: {details[:300]}", latency_ms=latency_ms)  # fmt: skip
    return Prediction(item.item_id, ERROR, (), error=f"{type(e).__name__}: {str(e)[:300]}", latency_ms=latency_ms)


async def ask_one(client: AsyncAiranClient, item: EvalItem, model: str = "", priority: str = "non_rt",
                  timeout_s: float = 300.0) -> Prediction:  # fmt: skip
    t0 = time.perf_counter()
    try:
        r = await client.ask(ask_request(item, True, model=model, priority=priority), timeout_s=timeout_s)
    except Exception as e:  # noqa: BLE001 - every failure is scored, none is dropped
        return failed_prediction(item, e, 1000 * (time.perf_counter() - t0))
    return prediction_of(item, r, 1000 * (time.perf_counter() - t0))


async def ask_items(
    address: str,
    items: Sequence[EvalItem],
    *,
    model: str = "",
    priority: str = "non_rt",
    concurrency: int = 4,
    timeout_s: float = 300.0,
    on_done: Callable[[Prediction], None] | None = None,
) -> tuple[list[Prediction], float]:
    """Predictions in item order and the run's wall time; at most `concurrency` queries in flight."""
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    gate = asyncio.Semaphore(concurrency)

    async def one(client: AsyncAiranClient, item: EvalItem) -> Prediction:
        async with gate:
            p = await ask_one(client, item, model, priority, timeout_s)
        if on_done is not None:
            on_done(p)
        return p

    async with AsyncAiranClient(address) as client:
        t0 = time.perf_counter()
        preds = await asyncio.gather(*(one(client, i) for i in items))  # one task per item, `gate` bounds work
        return list(preds), time.perf_counter() - t0


def stack_config(models: Sequence[str], base: AiranConfig | None = None, kv_cache_gb: float = 1.0,
                 max_num_seqs: int = 8) -> AiranConfig:  # fmt: skip
    """One site with every core; one replica per base model, each holding its requested LoRA adapters.
    Models are looked up in `base` (default: airan/configs/default.yaml), parents added as needed."""
    base = base or load_config(None)
    known = {m.name: m for m in base.models}
    missing = [m for m in models if m not in known]
    if missing:
        raise ValueError(f"unknown model(s) {', '.join(missing)}; the config has {', '.join(known)} "
                         "(pass --config with a config that defines them)")  # fmt: skip
    specs = {}
    for name in models:
        spec = known[name]
        if spec.is_adapter:
            specs.setdefault(spec.parent, known[spec.parent])
        specs.setdefault(name, spec)
    bases = [n for n, s in specs.items() if not s.is_adapter]
    adapters = {b: [n for n, s in specs.items() if s.is_adapter and s.parent == b] for b in bases}
    ranks = [json.loads((Path(s.path) / "adapter_config.json").read_text())["r"]
             for s in specs.values() if s.is_adapter]  # fmt: skip
    engine = {"kv_cache_gb": kv_cache_gb, "max_num_seqs": max_num_seqs}
    if ranks:
        engine["max_lora_rank"] = max(ranks)
    return parse_config({
        # the replicas split the cores, at least one each: the site offers Ray that many
        "sites": [{"id": "bs-01", "cpus": max(len(os.sched_getaffinity(0)), len(bases)), "memory_gb": 8}],
        "models": [s.model_dump(exclude_defaults=True) for s in specs.values()],
        "replicas": [{"site": "bs-01", "model": b, **({"adapters": adapters[b]} if adapters[b] else {})}
                     for b in bases],
        "engine": engine,
        "server": {"host": "127.0.0.1", "port": 0, "grace_s": 1, "default_model": models[0] if models else ""},
    })  # fmt: skip


def smollm2_stack_config(port: int = 0, kv_cache_gb: float = 1.0, max_num_seqs: int = 8) -> AiranConfig:
    """One site, one SmolLM2-135M-Instruct replica with every core (on 2 cores one replica is fastest)."""
    return parse_config({
        "sites": [{"id": "bs-01", "cpus": len(os.sched_getaffinity(0)), "memory_gb": 8}],
        "models": [{"name": SMOLLM2, "source": "smollm2", "dtype": "bfloat16", "max_model_len": 2048}],
        "replicas": [{"site": "bs-01", "model": SMOLLM2}],
        "engine": {"kv_cache_gb": kv_cache_gb, "max_num_seqs": max_num_seqs},
        "server": {"host": "127.0.0.1", "port": port, "grace_s": 1},
    })  # fmt: skip


# --- the evaluation -----------------------------------------------------------------------------------


@dataclass
class SetResult:
    name: str
    items: list[EvalItem]
    evidence: list[Evidence]
    queries: list = field(default_factory=list)  # the Query the gateway builds for each item
    predictions: dict[str, list[Prediction]] = field(default_factory=dict)
    scores: dict[str, MethodScores] = field(default_factory=dict)
    wall_s: dict[str, float] = field(default_factory=dict)


@dataclass
class Evaluation:
    meta: dict
    sets: dict[str, SetResult]

    @property
    def methods(self) -> list[str]:
        return list(dict.fromkeys(m for s in self.sets.values() for m in s.scores))

    def summary(self) -> dict:
        """summary.json: run facts at the top, then per set the scores of every method."""
        out = dict(self.meta)
        out["sets"] = {}
        for name, s in self.sets.items():
            out["sets"][name] = {
                "n": len(s.items),
                "labels": dict(sorted(_count(i.label for i in s.items).items())),
                "methods": {m: asdict(sc) for m, sc in s.scores.items()},
                "details": {m: {**failure_counts(s.predictions[m]), "wall_s": round(s.wall_s.get(m, 0.0), 3)}
                            for m in s.scores},  # fmt: skip
            }
        return out


def _count(xs) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def assert_disjoint(dev: Sequence[EvalItem], *sets: Sequence[EvalItem]) -> None:
    """Tuning data never shares a scenario (seed) with a test set."""
    dev_seeds = {i.seed for i in dev}
    for s in sets:
        shared = dev_seeds & {i.seed for i in s}
        if shared:
            raise ValueError(f"the development set shares {len(shared)} seed(s) with a test set, e.g. {min(shared)}")


class _Progress:
    """One tqdm bar per (set, method) on stderr; silent when disabled."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit="q", disable=not self.enabled, file=sys.stderr, dynamic_ncols=True,
                    leave=True)  # fmt: skip


async def evaluate(
    sets: dict[str, Sequence[EvalItem]],
    dev: Sequence[EvalItem],
    models: Sequence[str] = (),
    *,
    baselines: Sequence[str] = BASELINES,
    near_rt: bool = False,
    address: str | None = None,
    config: AiranConfig | None = None,
    concurrency: int = 4,
    timeout_s: float = 300.0,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    detector=None,
    progress: bool = True,
) -> Evaluation:
    """Score the baselines and every model on every set; rules are tuned on `dev` only.

    Models are asked at the control plane at `address`, or on a LocalStack of `config` (default:
    `stack_config(models)`, one site serving them all) started here. `near_rt` also asks each model
    at NEAR_RT (its brief cause + cells form), reported as `<model>@near-rt`.
    """
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ValueError(f"unknown baseline(s) {', '.join(sorted(unknown))}; choose from {', '.join(BASELINES)}")
    if "rules" in baselines:
        assert_disjoint(dev, *sets.values())
    bars = _Progress(progress)
    t_start = time.perf_counter()
    meta: dict = {
        "machine": machine_facts(),
        "git_commit": git_commit(),
        "prompt_version": COMPACT_PROMPT_VERSION,
        "sizes": {"dev": len(dev), **{k: len(v) for k, v in sets.items()}},
        "seeds": {"dev": _span(dev), **{k: _span(v) for k, v in sets.items()}},
        "bootstrap": {"resamples": n_resamples, "seed": seed, "level": 0.95, "over": "items"},
        "models": list(models),
        "baselines": list(baselines),
        "priority": "NON_RT" + (" and NEAR_RT" if near_rt else ""),
        "concurrency": concurrency,
        "latency": "models: client-observed per request, with `concurrency` in flight; in-process methods: "
                   "compute time per request (evidence included)",
    }  # fmt: skip
    results = {}
    for name, items in sets.items():
        queries = server_queries(items)
        results[name] = SetResult(name, list(items), server_evidence(queries), queries)

    if "rules" in baselines:
        t0 = time.perf_counter()
        th, dev_f1 = rules.tune(dev)
        meta["rules"] = {"thresholds": asdict(th), "dev_macro_f1": round(dev_f1, 4),
                         "tune_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
        for s in results.values():
            with bars.bar(len(s.items), f"{s.name}/rules") as bar:
                t0 = time.perf_counter()
                preds = rules.predict(s.items, th)
                bar.update(len(preds))
            _record(s, "rules", preds, time.perf_counter() - t0)
    if "detector" in baselines:
        detector = detector or load_packaged_detector()
        facts = ("name", "dev_macro_f1", "best_iteration", "temperature", "train_rows", "request")
        meta["detector"] = {k: detector.manifest[k] for k in facts if k in detector.manifest}
        for s in results.values():
            with bars.bar(len(s.items), f"{s.name}/detector") as bar:
                t0 = time.perf_counter()
                preds = detector_predictions(s.items, s.queries, detector, on_done=lambda: bar.update(1))
            _record(s, "detector", preds, time.perf_counter() - t0)

    if models:
        forms = [(m, m, "non_rt") for m in models]
        if near_rt:
            forms += [(m + NEAR_RT_SUFFIX, m, "near_rt") for m in models]
        if address is not None:
            meta["target"] = address
            await _ask_models(address, results, forms, meta, concurrency, timeout_s, bars)
        else:
            from airan.stack import LocalStack

            cfg = config or stack_config(models)
            async with LocalStack(cfg) as plane:
                meta["startup_s"] = {k: round(v, 1) for k, v in plane.startup_s.items()}
                await _ask_models(plane.address, results, forms, meta, concurrency, timeout_s, bars)

    for s in results.values():
        for method, preds in s.predictions.items():
            s.scores[method] = score_method(s.items, preds, s.evidence, n_resamples, seed)
    meta["wall_s"] = round(time.perf_counter() - t_start, 1)
    return Evaluation(meta, results)


def _record(s: SetResult, method: str, preds: list[Prediction], wall_s: float) -> None:
    s.predictions[method] = preds
    s.wall_s[method] = wall_s


async def _ask_models(address, results, forms, meta, concurrency, timeout_s, bars) -> None:
    first = next((s.items[0] for s in results.values() if s.items), None)
    async with AsyncAiranClient(address) as client:
        meta["replicas"] = [r.replica_id for r in (await client.replicas()).replicas]
        # one unscored query per form first: engine warm-up (and the prompt prefix cache) stays out of the latencies
        warm = {}
        for method, model, priority in forms:
            if first is not None:
                p = await ask_one(client, first, model, priority, timeout_s)
                warm[method] = p.error or "ok"
    meta["warmup"] = warm
    for method, model, priority in forms:  # one form at a time: comparable latencies
        for s in results.values():
            with bars.bar(len(s.items), f"{s.name}/{method}") as bar:
                preds, wall = await ask_items(address, s.items, model=model, priority=priority,
                                              concurrency=concurrency, timeout_s=timeout_s,
                                              on_done=lambda _p: bar.update(1))  # fmt: skip
            _record(s, method, preds, wall)


def _span(items: Sequence[EvalItem]) -> list[int]:
    seeds = [i.seed for i in items]
    return [min(seeds), max(seeds)] if seeds else []


# --- run facts ---------------------------------------------------------------------------------------


def machine_facts() -> dict:
    """CPU model and core counts (lscpu where it exists), usable CPUs, load at the start."""
    facts: dict = {"cpu_model": "", "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0))}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    fields = dict(re.findall(r"^([^:\n]+):\s*(.*)$", out, flags=re.M))
    facts["cpu_model"] = fields.get("Model name", "").strip()
    for key, name in (("CPU(s)", "cpus"), ("Core(s) per socket", "cores_per_socket"), ("Socket(s)", "sockets"),
                      ("Thread(s) per core", "threads_per_core")):  # fmt: skip
        if fields.get(key, "").strip().isdigit():
            facts[name] = int(fields[key])
    if not facts["cpu_model"] and Path("/proc/cpuinfo").is_file():
        m = re.search(r"^model name\s*:\s*(.*)$", Path("/proc/cpuinfo").read_text(), flags=re.M)
        facts["cpu_model"] = m.group(1).strip() if m else ""
    facts["loadavg_start"] = round(os.getloadavg()[0], 2)
    return facts


def git_commit() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10,
                                  check=False).stdout.strip()  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


# --- legacy: one set, MethodReports (`airan eval adapter`, airan/evaluation/adapter.py) -------------------


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
    methods: Sequence[str] = ("rules", "diagnosis"),
    *,
    address: str | None = None,
    config: AiranConfig | None = None,
    concurrency: int = 4,
    model: str = "",
    timeout_s: float = 300.0,
    progress: Callable[[str, int, int], None] | None = None,
) -> EvalResult:
    """One set, `rules` and/or `diagnosis` (the model at NON_RT), as MethodReports."""
    unknown = set(methods) - {"rules", "diagnosis"}
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(sorted(unknown))}; choose from rules, diagnosis")
    reports, predictions = [], {}
    meta: dict = {"n_items": len(items), "dev_items": len(dev), "concurrency": concurrency,
                  "prompt_version": COMPACT_PROMPT_VERSION}  # fmt: skip
    if "rules" in methods:
        th, dev_f1 = rules.tune(dev)
        t0 = time.perf_counter()
        preds = rules.predict(items, th)
        reports.append(summarize("rules", items, preds, time.perf_counter() - t0, uses_model=False))
        predictions["rules"] = preds
        meta["rule_thresholds"] = asdict(th)
        meta["rule_dev_macro_f1"] = round(dev_f1, 4)
    if "diagnosis" in methods:

        async def run(address: str) -> None:
            done = 0

            def tick(_: Prediction) -> None:
                nonlocal done
                done += 1
                if progress is not None:
                    progress("diagnosis", done, len(items))

            async with AsyncAiranClient(address) as client:
                if items:
                    await ask_one(client, items[0], model, "non_rt", timeout_s)  # warm-up, unscored
            preds, wall = await ask_items(address, items, model=model, concurrency=concurrency, timeout_s=timeout_s,
                                          on_done=tick)  # fmt: skip
            reports.append(summarize("diagnosis", items, preds, wall, uses_model=True))
            predictions["diagnosis"] = preds

        if address is not None:
            await run(address)
        else:
            from airan.stack import LocalStack

            async with LocalStack(config or smollm2_stack_config()) as plane:
                await run(plane.address)
    return EvalResult(meta, reports, predictions)

