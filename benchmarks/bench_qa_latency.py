"""Latency of a 64-token free-text answer on the default config: grounded (retrieval) vs the same
questions without passages (the baseline), side by side in one run.

Starts a `LocalStack` of `airan/configs/default.yaml` (or `--config`), makes sure its models are
built (`ensure_served_models`: the merged NetOps model, merged again if its adapter changed), warms
every replica up, then asks QA evaluation questions one at a time over gRPC (`Ask`, FREE_TEXT,
max_tokens 64, greedy), in rounds that alternate the two sides (A B B A ...). Latency is what the
client waited. Prints per side the median over rounds of p50 / p95 with the rounds' min-max, the
answers' token counts, and p95 of the answers that used all 64 tokens (finish_reason "length"); the
load average before and after says how busy the machine was.

    flock /tmp/airan-heavy.lock .venv/bin/python benchmarks/bench_qa_latency.py --questions 40 --rounds 2 \
        --out benchmarks/results/qa_latency.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np


async def _ask_all(address: str, items, retrieval: bool, max_tokens: int) -> list[dict]:
    from airan.client import AsyncAiranClient
    from airan.evaluation.qa_runner import qa_request

    rows = []
    async with AsyncAiranClient(address) as client:
        for item in items:
            t0 = time.perf_counter()
            r = await client.ask(qa_request(item, retrieval, max_tokens=max_tokens), timeout_s=120)
            rows.append({"ms": 1000 * (time.perf_counter() - t0), "tokens": r.completion_tokens,
                         "prompt_tokens": r.prompt_tokens, "finish": r.finish_reason, "replica": r.replica_id})  # fmt: skip
    return rows


def _pct(values, q) -> float:
    return round(float(np.percentile(values, q)), 1) if values else float("nan")


async def run(args) -> dict:
    from airan.config import load_config
    from airan.core.knowledge import packaged_knowledge
    from airan.evaluation.qa import eval_set
    from airan.evaluation.qa_runner import subset
    from airan.evaluation.runner import git_commit, machine_facts
    from airan.factory.ensure import ensure_served_models
    from airan.stack import LocalStack

    config = load_config(args.config)
    ensure_served_models(config)
    items = subset(eval_set(packaged_knowledge()), args.questions)
    facts = {"machine": machine_facts(), "git_commit": git_commit(), "config": str(args.config or "default.yaml"),
             "replicas": [(r.site, r.model) for r in config.replicas], "questions": len(items),
             "max_tokens": args.max_tokens, "rounds": args.rounds}  # fmt: skip
    sides = {"grounded (retrieval)": True, "baseline (no passages)": False}
    per_round: dict[str, list[list[dict]]] = {s: [] for s in sides}
    async with LocalStack(config) as plane:
        for side, retrieval in sides.items():  # warm-up, every replica (excluded)
            await _ask_all(plane.address, items[: 2 * len(config.replicas)], retrieval, args.max_tokens)
        order = [s for r in range(args.rounds) for s in (list(sides) if r % 2 == 0 else list(sides)[::-1])]
        for side in order:
            per_round[side].append(await _ask_all(plane.address, items, sides[side], args.max_tokens))
    facts["loadavg_end"] = round(os.getloadavg()[0], 2)
    table = {}
    for side, rounds in per_round.items():
        p50s = [_pct([r["ms"] for r in rows], 50) for rows in rounds]
        p95s = [_pct([r["ms"] for r in rows], 95) for rows in rounds]
        every = [r for rows in rounds for r in rows]
        full = [r["ms"] for r in every if r["finish"] == "length"]
        table[side] = {
            "p50_ms": statistics.median(p50s), "p50_ms_range": [min(p50s), max(p50s)],
            "p95_ms": statistics.median(p95s), "p95_ms_range": [min(p95s), max(p95s)],
            "answers": len(every), "tokens_mean": round(float(np.mean([r["tokens"] for r in every])), 1),
            "prompt_tokens_mean": round(float(np.mean([r["prompt_tokens"] for r in every])), 1),
            "full_64_answers": len(full), "full_64_p95_ms": _pct(full, 95),
            "ms_per_token_p50": _pct([r["ms"] / max(1, r["tokens"]) for r in every], 50),
        }  # fmt: skip
    return {**facts, "sides": table}


def show(result: dict) -> None:
    m = result["machine"]
    print(f"{result['config']}: {result['replicas']}; {result['questions']} questions x {result['rounds']} rounds, "
          f"max_tokens {result['max_tokens']}; {m['cpu_model']} ({m['cpus_usable']} CPUs), load "
          f"{m['loadavg_start']} -> {result['loadavg_end']}")  # fmt: skip
    print("| side | p50 ms (rounds) | p95 ms (rounds) | tokens mean | prompt tokens | 64-token answers | their p95 ms | ms/token p50 |")
    print("|---|---|---|---|---|---|---|---|")
    for side, s in result["sides"].items():
        print(f"| {side} | {s['p50_ms']:,.0f} ({s['p50_ms_range'][0]:,.0f}-{s['p50_ms_range'][1]:,.0f}) | "
              f"{s['p95_ms']:,.0f} ({s['p95_ms_range'][0]:,.0f}-{s['p95_ms_range'][1]:,.0f}) | {s['tokens_mean']} | "
              f"{s['prompt_tokens_mean']} | {s['full_64_answers']} of {s['answers']} | {s['full_64_p95_ms']:,.0f} | "
              f"{s['ms_per_token_p50']} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=None, help="airan YAML (default: airan/configs/default.yaml)")
    ap.add_argument("--questions", type=int, default=40, help="every k-th QA evaluation question, this many")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--show", type=Path, default=None, help="print a saved result and exit")
    args = ap.parse_args()
    if args.show:
        show(json.loads(args.show.read_text()))
        return
    result = asyncio.run(run(args))
    show(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
