"""A burst on the default config: 10 NEAR_RT diagnoses with 1 s deadlines and 20 BEST_EFFORT ones, all
sent at once and all naming bs-01 (the scenario issue 16 measured on main before admission).

    # both sides in one run, in this tree: the router as it was before admission (its filters and
    # scorers, no deadline filter, every request dispatched to the engine at once), then the default
    flock /tmp/airan-heavy.lock .venv/bin/python benchmarks/bench_admission_burst.py --label same_tree \
        --sides before after
    flock /tmp/airan-heavy.lock .venv/bin/python benchmarks/bench_admission_burst.py --label after
    # the same burst against the router before admission (a worktree of that commit, same venv):
    git worktree add /tmp/airan-before eaad6be && cp airan/v1/*_pb2*.py /tmp/airan-before/airan/v1/
    flock /tmp/airan-heavy.lock env PYTHONPATH=/tmp/airan-before .venv/bin/python \\
        benchmarks/bench_admission_burst.py --label before

It starts the whole local stack (Ray site nodes, three SmolLM2 replicas on vLLM, gRPC on 127.0.0.1)
with the airan that Python imports, warms each replica up with one diagnosis naming its site, one at
a time (so admission has measured the replicas' speed), sends the burst `--rounds` times (the second with
detector_fallback on the NEAR_RT requests where the server knows the field) and prints, per round:
NEAR_RT answered in time, refused early (status, time to refuse), failed late; BEST_EFFORT answers,
throughput and latency; which sites served. Results: benchmarks/results/admission_burst_<label>.json.
It uses only AskRequest fields both versions know, plus detector_fallback where the stubs have it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from collections import Counter
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from airan.client import AsyncAiranClient
from airan.config import load_config
from airan.stack import LocalStack
from airan.v1 import netops_pb2

RESULTS = Path(__file__).resolve().parent / "results"
T0 = 1_700_000_000.0
N_NEAR_RT, N_BEST_EFFORT, NEAR_RT_DEADLINE_S = 10, 20, 1.0


def kpis() -> list[netops_pb2.KpiSample]:
    """bs-01/c1 saturates while its co-site cell stays put (the gateway tests' congestion case)."""
    rows = []
    for i in range(3):
        for name, unit, cell, values in (
            ("RRU.PrbTotDl", "%", "bs-01/c1", (60.0, 62.0, 99.0)),
            ("DRB.UEThpDl", "kbit/s", "bs-01/c1", (16000.0, 15800.0, 6000.0)),
            ("RRU.PrbTotDl", "%", "bs-01/c2", (40.0, 41.0, 40.0)),
            ("DRB.UEThpDl", "kbit/s", "bs-01/c2", (15000.0, 15100.0, 14900.0)),
        ):
            ts = Timestamp()
            ts.FromNanoseconds(int((T0 + 60 * i) * 1e9))
            rows.append(netops_pb2.KpiSample(name=name, value=values[i], unit=unit, cell_id=cell, time=ts))
    return rows


def request(priority: int, deadline_s: float | None, fallback: bool, site: str = "bs-01") -> netops_pb2.AskRequest:
    r = netops_pb2.AskRequest(
        controller_id="xapp-ts", site_ids=[site], cell_ids=["bs-01/c1", "bs-01/c2"],
        question="Why did throughput drop on bs-01/c1?", kpi_context=kpis(), priority=priority,
        response_mode=netops_pb2.DIAGNOSIS,
    )  # fmt: skip
    if deadline_s is not None:
        ts = Timestamp()
        ts.FromNanoseconds(int((time.time() + deadline_s) * 1e9))
        r.deadline.CopyFrom(ts)
    if fallback and "detector_fallback" in r.DESCRIPTOR.fields_by_name:
        r.detector_fallback = True
    return r


async def one(stub, req: netops_pb2.AskRequest, cls: str, deadline_s: float | None) -> dict:
    t0 = time.monotonic()
    try:
        resp = await stub.Ask(req, timeout=180)
        out = dict(status="OK", site=resp.site_id, cause=netops_pb2.Cause.Name(resp.diagnosis.cause))
        if "placement" in resp.DESCRIPTOR.fields_by_name and resp.HasField("placement"):
            out["answered_by"] = netops_pb2.AnswerSource.Name(resp.placement.answered_by)
            out["note"] = resp.placement.note
    except grpc.aio.AioRpcError as e:
        out = dict(status=e.code().name, message=(e.details() or "")[:300])
    out.update(cls=cls, seconds=time.monotonic() - t0, deadline_s=deadline_s)
    return out


async def burst(stub, fallback: bool) -> tuple[list[dict], float]:
    calls = [one(stub, request(netops_pb2.NEAR_RT, NEAR_RT_DEADLINE_S, fallback), "NEAR_RT", NEAR_RT_DEADLINE_S)
             for _ in range(N_NEAR_RT)]  # fmt: skip
    calls += [one(stub, request(netops_pb2.BEST_EFFORT, None, False), "BEST_EFFORT", None)
              for _ in range(N_BEST_EFFORT)]  # fmt: skip
    t0 = time.monotonic()
    results = await asyncio.gather(*calls)
    return list(results), time.monotonic() - t0


def summarize(results: list[dict], makespan_s: float) -> dict:
    near = [r for r in results if r["cls"] == "NEAR_RT"]
    best = [r for r in results if r["cls"] == "BEST_EFFORT"]
    in_time = [r for r in near if r["status"] == "OK" and r["seconds"] <= r["deadline_s"]]
    by_detector = [r for r in in_time if r.get("answered_by") == "ANSWER_SOURCE_DETECTOR"]
    refused = [r for r in near if r["status"] != "OK" and r["seconds"] < 0.5 * r["deadline_s"]]
    late = [r for r in near if r not in in_time and r not in refused]
    best_ok = [r for r in best if r["status"] == "OK"]
    ms = lambda xs: [round(1000 * x, 1) for x in xs]  # noqa: E731
    return dict(
        near_rt_in_time=len(in_time), near_rt_in_time_by_detector=len(by_detector),
        near_rt_in_time_ms=ms(sorted(r["seconds"] for r in in_time)),
        near_rt_refused_early=len(refused), refused_statuses=dict(Counter(r["status"] for r in refused)),
        time_to_refuse_ms=ms(sorted(r["seconds"] for r in refused)),
        near_rt_late=len(late), late_statuses=dict(Counter(r["status"] for r in late)),
        late_ms=ms(sorted(r["seconds"] for r in late)),
        best_effort_answered=len(best_ok), best_effort_errors=dict(Counter(r["status"] for r in best if r["status"] != "OK")),
        best_effort_per_min=round(60 * len(best_ok) / makespan_s, 1),
        best_effort_p50_s=round(statistics.median([r["seconds"] for r in best_ok]), 2) if best_ok else None,
        best_effort_max_s=round(max([r["seconds"] for r in best_ok]), 2) if best_ok else None,
        sites=dict(sorted(Counter(r["site"] for r in results if r["status"] == "OK" and r.get("site")).items())),
        makespan_s=round(makespan_s, 2),
        example_refusal=next((r["message"] for r in refused), ""),
        example_note=next((r["note"] for r in results if r.get("note")), ""),
    )  # fmt: skip


def print_summary(label: str, rnd: int, fallback: bool, s: dict) -> None:
    print(f"\n[{label}] round {rnd}{' (NEAR_RT with detector_fallback)' if fallback else ''}: makespan {s['makespan_s']} s")
    ttr = s["time_to_refuse_ms"]
    print(f"  NEAR_RT   answered in time {s['near_rt_in_time']}/{N_NEAR_RT}"
          f" (by the detector {s['near_rt_in_time_by_detector']}) {s['near_rt_in_time_ms']} ms;"
          f" refused early {s['near_rt_refused_early']} {s['refused_statuses']}"
          f"{f' in {min(ttr)}-{max(ttr)} ms' if ttr else ''};"
          f" failed late {s['near_rt_late']} {s['late_statuses']} {s['late_ms']} ms")  # fmt: skip
    print(f"  BE        answered {s['best_effort_answered']}/{N_BEST_EFFORT} errors {s['best_effort_errors']};"
          f" {s['best_effort_per_min']}/min; p50 {s['best_effort_p50_s']} s, max {s['best_effort_max_s']} s")  # fmt: skip
    print(f"  sites     {s['sites']}")
    if s["example_refusal"]:
        print(f"  refusal   {s['example_refusal']}")
    if s["example_note"]:
        print(f"  note      {s['example_note']}")


# "before" in this tree: the router before admission (its filters and scorers; 1,000 slots, so the
# gateway queues nothing and every request goes to the engine at once, as the actor took up to 1,000
# concurrent calls). What this tree cannot undo: vLLM's priority order and the detector fallback.
BEFORE_ROUTER = {"filters": ["ready", "site_active", "model"],
                 "scorers": [{"type": "least_loaded", "weight": 1.0}, {"type": "site_locality", "weight": 1.0}],
                 "admission": {"slots": 1000}}  # fmt: skip


def side_config(side: str):
    config = load_config()
    if side == "before":
        router = config.router.model_copy(update={
            "filters": BEFORE_ROUTER["filters"],
            "scorers": [type(config.router.scorers[0])(**s) for s in BEFORE_ROUTER["scorers"]],
            "admission": config.router.admission.model_copy(update=BEFORE_ROUTER["admission"]),
        })  # fmt: skip
        config = config.model_copy(update={"router": router})
    return config


async def main_async(label: str, rounds: int, side: str = "after") -> dict:
    config = side_config(side)
    out = dict(label=label, side=side, machine=f"{platform.processor() or '?'}; {os.cpu_count()} cores; "
                                              f"load {os.getloadavg()[0]:.1f} at start", rounds=[])  # fmt: skip
    async with LocalStack(config) as stack:
        # AsyncAiranClient: default.yaml serves auth.mode token, and the client signs this user's
        # local-operator token for 127.0.0.1
        async with AsyncAiranClient(stack.address) as client:
            stub = client.netops
            for site in ("bs-01", "bs-02", "bs-03"):  # warm-up, one at a time, one per replica
                await one(stub, request(netops_pb2.NON_RT, None, False, site), "warm", None)
            for rnd in range(1, rounds + 1):
                fallback = rnd == 2
                results, makespan = await burst(stub, fallback)
                s = summarize(results, makespan)
                print_summary(f"{label}: {side}", rnd, fallback, s)
                out["rounds"].append(dict(fallback=fallback, summary=s, results=results))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--label", required=True, help="before | after (names the results file)")
    ap.add_argument("--rounds", type=int, default=2, help="bursts on one warm stack (the 2nd with detector_fallback)")
    ap.add_argument("--sides", nargs="+", default=["after"], choices=["before", "after"],
                    help="before: this tree's router configured as before admission; after: the default config; "
                         "both: one fresh stack each, in this order, in one run")  # fmt: skip
    args = ap.parse_args()
    sides = [asyncio.run(main_async(args.label, args.rounds, side)) for side in args.sides]
    out = sides[0] if len(sides) == 1 else dict(label=args.label, sides=sides)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"admission_burst_{args.label}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
