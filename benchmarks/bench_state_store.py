"""What writing the control plane's state costs on the event loop (plain data, no stack).

    .venv/bin/python benchmarks/bench_state_store.py            # 5 runs x 2,000 requests (~20 s)
    .venv/bin/python benchmarks/bench_state_store.py --quick    # a smoke test

The gateway writes through `StateStore` synchronously, on the event loop: an in-flight id when a
call starts and its removal when it ends; for an idempotent request also its answer (JSON, ~1-2 kB);
a radio report or a drain when one arrives. This times each write on the SQLite store (WAL,
synchronous=NORMAL, a temp file on this machine's disk, checkpoints on the store's own thread, as
served; filled to its bounds first, so each insert also drops the oldest row) against the in-memory store in the same run, per call in this thread's CPU time
(thread_time_ns: the machine is shared, and a call the scheduler preempts would otherwise count
another process's time slice) and in wall time (perf_counter_ns) beside it, and gives the
per-request cost (begin + answer + end). The table gives the median over runs of each run's p50 and
p99 and the spread (min-max) of p99 over runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from airan.core.diagnosis import Action, Diagnosis
from airan.core.prompting import RenderedPrompt
from airan.core.retrieval import Citation
from airan.serving.gateway import Answer, encode_answer
from airan.serving.state import DrainRecord, InFlightRecord, MemoryStateStore, RanReport, SqliteStateStore, StoredAnswer

RESULTS = Path(__file__).resolve().parent / "results" / "state_store.json"


def sample_answer(i: int) -> str:
    """A diagnosis answer as large as the served ones (text, evidence, actions, passages)."""
    answer = Answer(
        f"key-{i}", "CONGESTION A,B; DRB.UEThpDl RRU.PrbUsedDl", 412, 14, "bs-01-smollm2-netops-merged-0", "bs-01",
        "smollm2-netops-merged", "stop", 12.5, 180.25, 640.75,
        prompt=RenderedPrompt([1] * 412, 6, 0, passages=tuple(Citation(f"kpi:K{j}", f"KPI {j}", 1.5) for j in range(4))),
        diagnosis=Diagnosis("CONGESTION", ("bs-01/c1", "bs-01/c2"), "major",
                            (Action("ADD_CARRIER", "bs-01/c1", 1.0, "carrier"),), 0.82, "PRB use high, throughput low",
                            evidence=tuple(f"A: DRB.UEThpDl {j} below baseline" for j in range(6)),
                            detector_cause="CONGESTION", detector_confidence=0.9, cited_kpis=("DRB.UEThpDl",)),
        routing_note="served at the site asked for", predicted_ms=600.0, allowed_ms=1500.0,
    )  # fmt: skip
    return encode_answer(answer)


def fill(store) -> None:
    """At the bounds already (4,096 reports per site, 1,024 answers), as a store that has served a
    while: every timed insert also drops the oldest row."""
    payload = sample_answer(0)
    for i in range(4096):
        for site in ("bs-01", "bs-02", "bs-03"):
            store.add_ran_report(RanReport(site, 0.5, float(i), float(i)))
    for i in range(1024):
        store.put_answer(StoredAnswer("xapp-ts", f"old-{i}", payload, float(i)))


def one_run(store, n: int, clock) -> dict[str, list[int]]:
    payload = sample_answer(0)
    times: dict[str, list[int]] = {k: [] for k in ("begin", "end", "put_answer", "ran_report", "drain", "request")}
    for i in range(n):
        t0 = clock()
        store.begin(InFlightRecord(f"key-{i}", "xapp-ts", True, time.time()))
        t1 = clock()
        store.put_answer(StoredAnswer("xapp-ts", f"key-{i}", payload, time.time()))
        t2 = clock()
        store.end(f"key-{i}")
        t3 = clock()
        store.add_ran_report(RanReport(f"bs-0{i % 3 + 1}", 0.5, time.time(), time.time()))
        t4 = clock()
        store.set_drain(DrainRecord("bs-01", i % 2 == 0, time.time()))
        t5 = clock()
        times["begin"].append(t1 - t0)
        times["put_answer"].append(t2 - t1)
        times["end"].append(t3 - t2)
        times["ran_report"].append(t4 - t3)
        times["drain"].append(t5 - t4)
        times["request"].append(t3 - t0)
    return times


def pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000.0  # us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    n, runs = (200, 2) if args.quick else (2000, args.runs)
    clocks = {"cpu": time.thread_time_ns, "wall": time.perf_counter_ns}
    per: dict[tuple[str, str], dict[str, list[tuple[float, float]]]] = {}
    payload_bytes = len(sample_answer(0))
    for _ in range(runs):
        for clock_name, clock in clocks.items():
            with tempfile.TemporaryDirectory() as tmp:
                for name, store in (("sqlite", SqliteStateStore(Path(tmp) / "s.sqlite")), ("memory", MemoryStateStore())):
                    fill(store)
                    for op, values in one_run(store, n, clock).items():
                        per.setdefault((name, clock_name), {}).setdefault(op, []).append((pct(values, 0.5), pct(values, 0.99)))
                    store.close()
    rows = []
    print(f"state store writes, {runs} runs x {n} requests; answer payload {payload_bytes} bytes (us per call)")
    print(f"{'operation':<28}{'store':<8}{'clock':<6}{'p50':>8}{'p99':>9}{'p99 spread':>18}")
    for op in ("begin", "end", "put_answer", "request", "ran_report", "drain"):
        for name in ("sqlite", "memory"):
            for clock_name in clocks:
                runs_of = per[(name, clock_name)][op]
                p50 = statistics.median(v[0] for v in runs_of)
                p99s = [v[1] for v in runs_of]
                label = {"request": "request (begin+answer+end)"}.get(op, op)
                print(f"{label:<28}{name:<8}{clock_name:<6}{p50:>8.1f}{statistics.median(p99s):>9.1f}"
                      f"{min(p99s):>9.1f}-{max(p99s):<8.1f}")  # fmt: skip
                rows.append(dict(operation=op, store=name, clock=clock_name, p50_us=round(p50, 2),
                                 p99_us=round(statistics.median(p99s), 2), p99_min_us=round(min(p99s), 2),
                                 p99_max_us=round(max(p99s), 2)))  # fmt: skip
    if not args.quick:
        from airan.evaluation.runner import machine_facts

        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(dict(machine=machine_facts(), runs=runs, requests=n,
                                           answer_payload_bytes=payload_bytes, rows=rows), indent=2) + "\n")  # fmt: skip
        print(f"written {RESULTS}", file=sys.stderr)


if __name__ == "__main__":
    main()
