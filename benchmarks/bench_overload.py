"""Overload: the default config at twice its measured capacity for five minutes, then low load.

    flock /tmp/airan-heavy.lock timeout 900 .venv/bin/python benchmarks/bench_overload.py     # ~11 min
    flock /tmp/airan-heavy.lock timeout 300 .venv/bin/python benchmarks/bench_overload.py --quick

Issue 17's goal: at 2x the measured capacity for 5 minutes resident memory stays bounded (<= 10%
growth), admitted NEAR_RT requests meet their deadlines, BEST_EFFORT is shed first with
RESOURCE_EXHAUSTED, and the system recovers when the load falls; every request ends in exactly one
answer or one error (lost: 0).

It runs `airan serve` on the default config (three sites, one SmolLM2 NetOps replica each on vLLM
CPU, admission and auth as shipped; its state in an SQLite file, as served) as its own process, so
the control plane's resident memory is its own, and drives it from this process over gRPC with the
stock client (auth: the local operator's token, acting for each controller):
- warm-up: one diagnosis per site, one at a time (admission measures each replica);
- capacity: a closed loop, 4 callers per replica, with the class mix below, for --capacity-s;
  capacity = answers per second;
- overload: open-loop Poisson arrivals at 2x capacity for --overload-s;
- recovery: open-loop at 0.5x capacity for --recovery-s, in 10 s windows: the first window with
  nothing shed and every admitted NEAR_RT answer in time is when it recovered.
Class mix: NEAR_RT 30% (diagnosis, deadline 2 s), NON_RT 30% (diagnosis, deadline 10 s), BEST_EFFORT
40% (a free-text summary, 48 tokens, no deadline); each names one of the three sites in turn.
Every call has a client timeout (deadline + 60 s; 300 s without one): a call that hits it, ends with
a status the server does not send (UNKNOWN, INTERNAL, CANCELLED), or has not ended when the run
ends is counted as lost. RSS (psutil) of the control plane and of the replicas' process trees (the
Ray actors and their vLLM engine processes) is sampled every 5 s; start = after the warm-up.
Results: benchmarks/results/overload/overload[_quick].json and the table printed here.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc
import psutil
import yaml
from google.protobuf.timestamp_pb2 import Timestamp

from airan.client import AsyncAiranClient, build_request
from airan.config import DEFAULT_CONFIG, dump_config, load_config
from airan.v1 import netops_pb2

RESULTS = Path(__file__).resolve().parent / "results" / "overload"
SITES = ("bs-01", "bs-02", "bs-03")
CLASSES = {  # name: (priority, share of requests, deadline s or None)
    "NEAR_RT": (netops_pb2.NEAR_RT, 0.3, 2.0),
    "NON_RT": (netops_pb2.NON_RT, 0.3, 10.0),
    "BEST_EFFORT": (netops_pb2.BEST_EFFORT, 0.4, None),
}
CONTROLLER = {"NEAR_RT": "xapp-ts", "NON_RT": "rapp-energy", "BEST_EFFORT": "noc-ops"}
SERVER_CODES = {"RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE", "INVALID_ARGUMENT", "NOT_FOUND",
                "ALREADY_EXISTS", "PERMISSION_DENIED", "UNAUTHENTICATED", "FAILED_PRECONDITION"}  # fmt: skip
T0 = 1_700_000_000.0


def kpis(site: str) -> list[netops_pb2.KpiSample]:
    """<site>/c1 saturates while its co-site cell stays put."""
    rows = []
    for i in range(3):
        for name, unit, cell, values in (
            ("RRU.PrbTotDl", "%", f"{site}/c1", (60.0, 62.0, 99.0)),
            ("DRB.UEThpDl", "kbit/s", f"{site}/c1", (16000.0, 15800.0, 6000.0)),
            ("RRU.PrbTotDl", "%", f"{site}/c2", (40.0, 41.0, 40.0)),
            ("DRB.UEThpDl", "kbit/s", f"{site}/c2", (15000.0, 15100.0, 14900.0)),
        ):
            ts = Timestamp()
            ts.FromNanoseconds(int((T0 + 60 * i) * 1e9))
            rows.append(netops_pb2.KpiSample(name=name, value=values[i], unit=unit, cell_id=cell, time=ts))
    return rows


def request(cls: str, site: str) -> netops_pb2.AskRequest:
    _, _, deadline_s = CLASSES[cls]
    common = dict(site_ids=[site], priority=cls, controller_id=CONTROLLER[cls], deadline_s=deadline_s)
    if cls == "BEST_EFFORT":
        return build_request(f"Summarise what limits throughput at {site} and what to check first.", max_tokens=48,
                             **common)  # fmt: skip
    return build_request(f"Why did throughput drop on {site}/c1?", cell_ids=[f"{site}/c1", f"{site}/c2"],
                         kpis=kpis(site), diagnosis=True, **common)  # fmt: skip


class Calls:
    """Every call sent and how it ended; each ends exactly once (recorded in `one`)."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.pending: set[asyncio.Task] = set()
        self.turn = 0

    def send(self, client: AsyncAiranClient, cls: str, phase: str, window: int = 0) -> asyncio.Task:
        site = SITES[self.turn % len(SITES)]
        self.turn += 1
        task = asyncio.create_task(self.one(client, cls, site, phase, window))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        return task

    async def one(self, client: AsyncAiranClient, cls: str, site: str, phase: str, window: int) -> None:
        deadline_s = CLASSES[cls][2]
        timeout_s = deadline_s + 60.0 if deadline_s is not None else 300.0
        rec = dict(phase=phase, window=window, cls=cls, site=site, deadline_s=deadline_s, sent=time.monotonic())
        self.records.append(rec)
        try:
            resp = await client.ask(request(cls, site), timeout_s=timeout_s)
            rec.update(status="OK", answered_by=netops_pb2.AnswerSource.Name(resp.placement.answered_by),
                       site_served=resp.site_id, predicted_s=resp.placement.predicted_ms / 1000)  # fmt: skip
        except grpc.aio.AioRpcError as e:
            rec.update(status=e.code().name, message=(e.details() or "")[:200])
        except asyncio.CancelledError:
            rec.update(status="NOT_ENDED")
            raise
        except Exception as e:  # the client itself failed: no status from the server
            rec.update(status=f"CLIENT_ERROR {type(e).__name__}", message=str(e)[:200])
        finally:
            rec["seconds"] = time.monotonic() - rec["sent"]
            # a client-side timeout is no answer from the server
            if rec.get("status") == "DEADLINE_EXCEEDED" and rec["seconds"] >= timeout_s - 0.5:
                rec["status"] = "CLIENT_TIMEOUT"


def lost(rec: dict) -> bool:
    return rec.get("status", "NOT_ENDED") not in SERVER_CODES | {"OK"}


# the gateway's messages for a request it never dispatched (airan/serving/gateway.py)
_REFUSED_AT_ADMISSION = ("refused at admission", "no replica can take this query", "no room at the chosen replicas")


def end_kind(rec: dict) -> str:
    """How a call ended, in the gateway's words: answered, refused at admission, dropped from a
    queue before its deadline, late while a replica answered, preempted or shed (BEST_EFFORT)."""
    status, message = rec.get("status", "NOT_ENDED"), rec.get("message", "")
    if status == "OK":
        return "answered"
    if message.startswith(_REFUSED_AT_ADMISSION):
        return "refused at admission"
    for marker, kind in (("dropped before its deadline", "dropped from a queue"), ("was answering", "late while answering"),
                         ("preempted", "preempted"), ("shed from", "shed from a queue")):  # fmt: skip
        if marker in message:
            return kind
    return status


_ADMITTED_ENDS = {"answered", "dropped from a queue", "late while answering", "preempted", "shed from a queue"}


def admitted(rec: dict) -> bool:
    """Answered, or ended after admission took it (dropped from a queue, late while answering...)."""
    return end_kind(rec) in _ADMITTED_ENDS


def pick_class(rng: random.Random) -> str:
    x, acc = rng.random(), 0.0
    for cls, (_, share, _) in CLASSES.items():
        acc += share
        if x < acc:
            return cls
    return "BEST_EFFORT"


async def open_loop(client: AsyncAiranClient, calls: Calls, rate_per_s: float, duration_s: float, phase: str,
                    rng: random.Random, window_s: float = 0.0) -> None:  # fmt: skip
    """Poisson arrivals at `rate_per_s` for `duration_s`, sent whatever the server answers."""
    start = time.monotonic()
    next_at = start
    while True:  # bounded by duration_s
        next_at += rng.expovariate(rate_per_s)
        if next_at - start >= duration_s:
            break
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        window = int((time.monotonic() - start) // window_s) if window_s else 0
        calls.send(client, pick_class(rng), phase, window)
    await asyncio.sleep(max(0.0, start + duration_s - time.monotonic()))


async def closed_loop(client: AsyncAiranClient, calls: Calls, callers: int, duration_s: float,
                      rng: random.Random) -> float:  # fmt: skip
    """`callers` callers, each sending its next request when the last one ended; answers per second."""
    end = time.monotonic() + duration_s

    async def caller() -> None:
        while time.monotonic() < end:  # bounded by duration_s
            await calls.send(client, pick_class(rng), "capacity")

    start = time.monotonic()
    await asyncio.gather(*(caller() for _ in range(callers)))
    elapsed = time.monotonic() - start
    answered = sum(1 for r in calls.records if r["phase"] == "capacity" and r.get("status") == "OK")
    return answered / elapsed


# -- resident memory ---------------------------------------------------------------------------

def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def replica_processes() -> list[psutil.Process]:
    """The Ray replica actors (their vLLM engine processes are their children)."""
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if cmd.startswith("ray::ReplicaActor"):
            out.append(p)
    return out


class RssSampler:
    def __init__(self, control_plane: psutil.Process) -> None:
        self.control_plane = control_plane
        self.samples: list[dict] = []
        self._task: asyncio.Task | None = None
        self.t0 = time.monotonic()

    def sample(self, label: str = "") -> dict:
        replicas = replica_processes()
        s = dict(t=round(time.monotonic() - self.t0, 1), label=label,
                 control_plane_mb=self.control_plane.memory_info().rss / 2**20,
                 replicas_mb=sum(tree_rss(p) for p in replicas) / 2**20, replicas=len(replicas))  # fmt: skip
        self.samples.append(s)
        return s

    def start(self, every_s: float = 5.0) -> None:
        async def loop():
            while True:
                await asyncio.to_thread(self.sample)
                await asyncio.sleep(every_s)

        self._task = asyncio.create_task(loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


# -- the control plane as its own process --------------------------------------------------------

def serve(config_file: Path, log_file: Path, timeout_s: float = 400.0) -> tuple[subprocess.Popen, str]:
    airan = Path(sys.executable).with_name("airan")
    proc = subprocess.Popen([str(airan), "serve", "--config", str(config_file), "--port", "0", "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=log_file.open("w"), text=True)  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # bounded; readline returns "" when the process ends
        line = proc.stdout.readline()
        if not line:
            break
        found = re.search(r"airan serving on (\S+)", line)
        if found:
            return proc, found.group(1)
    proc.kill()
    raise RuntimeError(f"airan serve did not come up:\n{log_file.read_text()[-3000:]}")


def bench_config(state_file: Path) -> str:
    config = load_config(DEFAULT_CONFIG)
    server = config.server.model_copy(update={"metrics_port": 0})
    state = config.state.model_copy(update={"path": state_file})
    raw = yaml.safe_load(dump_config(config.model_copy(update={"server": server, "state": state})))
    return yaml.safe_dump(raw, sort_keys=False)


# -- the report ----------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def phase_summary(records: list[dict], seconds: float) -> dict:
    by_cls: dict[str, Counter] = {cls: Counter() for cls in CLASSES}
    for r in records:
        by_cls[r["cls"]][r.get("status", "NOT_ENDED")] += 1
    near = [r for r in records if r["cls"] == "NEAR_RT" and r.get("status") == "OK"]
    near_s = [r["seconds"] for r in near]
    in_time = [r for r in near if r["seconds"] <= r["deadline_s"]]
    near_admitted = [r for r in records if r["cls"] == "NEAR_RT" and admitted(r)]
    # how far each answer's time was from what admission predicted for it (answered / predicted)
    ratios = [r["seconds"] / r["predicted_s"] for r in near if r.get("predicted_s")]
    return dict(
        seconds=round(seconds, 1), sent=len(records), offered_per_s=round(len(records) / seconds, 2) if seconds else None,
        answered=sum(1 for r in records if r.get("status") == "OK"), lost=sum(1 for r in records if lost(r)),
        by_class={cls: dict(c) for cls, c in by_cls.items()},
        near_rt_admitted=len(near_admitted), near_rt_in_time=len(in_time),
        near_rt_missed_after_admission=len(near_admitted) - len(in_time),
        ends_by_class={cls: dict(Counter(end_kind(r) for r in records if r["cls"] == cls)) for cls in CLASSES},
        near_rt_actual_over_predicted_p50=pct(ratios, 0.5), near_rt_actual_over_predicted_p99=pct(ratios, 0.99),
        near_rt_p50_s=pct(near_s, 0.5), near_rt_p99_s=pct(near_s, 0.99), near_rt_max_s=max(near_s, default=None),
        near_rt_deadline_s=CLASSES["NEAR_RT"][2],
        near_rt_by_detector=sum(1 for r in near if r.get("answered_by") == "ANSWER_SOURCE_DETECTOR"),
    )  # fmt: skip


def recovery_windows(records: list[dict], window_s: float) -> list[dict]:
    out = []
    for w in sorted({r["window"] for r in records}):
        rs = [r for r in records if r["window"] == w]
        near = [r for r in rs if r["cls"] == "NEAR_RT" and r.get("status") == "OK"]
        out.append(dict(window=w, start_s=w * window_s, sent=len(rs),
                        shed=sum(1 for r in rs if r.get("status") in ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED")),
                        near_rt_late=sum(1 for r in near if r["seconds"] > r["deadline_s"])))  # fmt: skip
    return out


def print_report(out: dict) -> None:
    print(f"\noverload on the default config ({out['machine']['cpu_model'] or '?'}, "
          f"{out['machine']['cpus_usable']} usable cores, load {out['machine'].get('load_1m', '?')} at start)")
    print(f"capacity (closed loop, {out['callers']} callers): {out['capacity_per_s']:.2f} answers/s; "
          f"overload offered at {out['overload_rate_per_s']:.2f}/s, recovery at {out['recovery_rate_per_s']:.2f}/s")
    head = f"{'phase':<10}{'s':>6}{'sent':>7}{'offered/s':>10}{'answered':>9}{'lost':>6}  {'NEAR_RT in time':>16}  {'NEAR_RT p50/p99 s (deadline)':>30}"
    print(head)
    for name in ("capacity", "overload", "recovery"):
        p = out["phases"][name]
        near = f"{p['near_rt_in_time']}/{p['near_rt_admitted']}"
        lat = "-" if p["near_rt_p99_s"] is None else \
            f"{p['near_rt_p50_s']:.2f}/{p['near_rt_p99_s']:.2f} ({p['near_rt_deadline_s']:.1f})"  # fmt: skip
        print(f"{name:<10}{p['seconds']:>6.0f}{p['sent']:>7}{p['offered_per_s']:>10.2f}{p['answered']:>9}{p['lost']:>6}"
              f"  {near:>16}  {lat:>30}")  # fmt: skip
    print("\nhow each class ended, overload phase (status: count)")
    for cls, c in out["phases"]["overload"]["by_class"].items():
        total = sum(c.values())
        shed = c.get("RESOURCE_EXHAUSTED", 0) + c.get("DEADLINE_EXCEEDED", 0)
        print(f"  {cls:<12} sent {total:>5}  shed {shed:>5} ({100 * shed / max(1, total):.0f}%)  "
              + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))  # fmt: skip
        ends = out["phases"]["overload"]["ends_by_class"][cls]
        print(f"  {'':<12} " + ", ".join(f"{k} {v}" for k, v in sorted(ends.items())))
    p = out["phases"]["overload"]
    if p["near_rt_actual_over_predicted_p50"] is not None:
        print(f"  NEAR_RT answered time / admission's prediction: p50 {p['near_rt_actual_over_predicted_p50']:.2f}, "
              f"p99 {p['near_rt_actual_over_predicted_p99']:.2f}")
    r = out["rss"]
    print(f"\nRSS MiB       start    end   max   growth")
    for who in ("control_plane", "replicas"):
        s, e, m = r[f"{who}_start_mb"], r[f"{who}_end_mb"], r[f"{who}_max_mb"]
        print(f"  {who:<11}{s:>7.0f}{e:>7.0f}{m:>6.0f}  {100 * (e - s) / s:+.1f}%")
    rec = out["recovered_after_s"]
    print(f"\nrecovery: {'first clean 10 s window starts %.0f s after the load fell' % rec if rec is not None else 'no clean window'}"
          f"; lost in all phases: {out['lost_total']} of {out['sent_total']}")  # fmt: skip


async def run(args, partial: list[dict]) -> dict:
    from airan.evaluation.runner import machine_facts

    machine = machine_facts()
    machine["load_1m"] = round(os.getloadavg()[0], 1)
    rng = random.Random(17)
    with tempfile.TemporaryDirectory(prefix="airan-overload-") as tmp:
        config_file = Path(tmp) / "airan.yaml"
        config_file.write_text(bench_config(Path(tmp) / "state.sqlite"))
        t_start = time.monotonic()
        proc, address = serve(config_file, Path(tmp) / "serve.log")
        startup_s = time.monotonic() - t_start
        print(f"control plane up at {address} in {startup_s:.0f} s (pid {proc.pid})", file=sys.stderr)
        rss = RssSampler(psutil.Process(proc.pid))
        calls = Calls()
        partial.append({"records": calls.records, "rss": rss.samples})
        try:
            async with AsyncAiranClient(address) as client:
                for site in SITES:  # warm-up, one at a time
                    try:
                        await client.ask(request("NON_RT", site), timeout_s=120)
                    except grpc.aio.AioRpcError as e:
                        print(f"warm-up at {site}: {e.code().name} {e.details()}", file=sys.stderr)
                start_sample = rss.sample("start")
                rss.start()
                callers = 4 * len(SITES)
                capacity = max(0.1, await closed_loop(client, calls, callers, args.capacity_s, rng))
                print(f"capacity {capacity:.2f} answers/s", file=sys.stderr)
                t0 = time.monotonic()
                await open_loop(client, calls, 2 * capacity, args.overload_s, "overload", rng)
                overload_s = time.monotonic() - t0
                t0 = time.monotonic()
                await open_loop(client, calls, 0.5 * capacity, args.recovery_s, "recovery", rng, window_s=10.0)
                recovery_s = time.monotonic() - t0
                # every call sent must end: wait, bounded by the longest client timeout
                if calls.pending:
                    await asyncio.wait(set(calls.pending), timeout=320)
                for task in list(calls.pending):
                    task.cancel()
                await asyncio.gather(*calls.pending, return_exceptions=True)
                await rss.stop()
                end_sample = rss.sample("end")
        finally:
            await rss.stop()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
        log_tail = (Path(tmp) / "serve.log").read_text()[-2000:]

    records = calls.records
    phases = {
        "capacity": phase_summary([r for r in records if r["phase"] == "capacity"], args.capacity_s),
        "overload": phase_summary([r for r in records if r["phase"] == "overload"], overload_s),
        "recovery": phase_summary([r for r in records if r["phase"] == "recovery"], recovery_s),
    }
    windows = recovery_windows([r for r in records if r["phase"] == "recovery"], 10.0)
    clean = next((w for w in windows if w["shed"] == 0 and w["near_rt_late"] == 0), None)
    samples = rss.samples
    out = dict(
        machine=machine, startup_s=round(startup_s, 1), callers=callers, capacity_per_s=capacity,
        overload_rate_per_s=2 * capacity, recovery_rate_per_s=0.5 * capacity, class_mix=
        {cls: dict(share=share, deadline_s=d, controller=CONTROLLER[cls]) for cls, (_, share, d) in CLASSES.items()},
        phases=phases, recovery_windows=windows, recovered_after_s=None if clean is None else clean["start_s"],
        sent_total=len(records), lost_total=sum(1 for r in records if lost(r)),
        lost_examples=[r for r in records if lost(r)][:10],
        rss=dict(
            control_plane_start_mb=start_sample["control_plane_mb"], control_plane_end_mb=end_sample["control_plane_mb"],
            control_plane_max_mb=max(s["control_plane_mb"] for s in samples),
            replicas_start_mb=start_sample["replicas_mb"], replicas_end_mb=end_sample["replicas_mb"],
            replicas_max_mb=max(s["replicas_mb"] for s in samples), replica_processes=end_sample["replicas"],
            samples=samples,
        ),
        examples={code: next((r["message"] for r in records if r.get("status") == code), "")
                  for code in ("RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "UNAVAILABLE")},
        serve_log_tail=log_tail,
    )  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 s capacity, 40 s overload, 20 s recovery (a smoke test)")
    ap.add_argument("--capacity-s", type=float, default=45.0)
    ap.add_argument("--overload-s", type=float, default=300.0)
    ap.add_argument("--recovery-s", type=float, default=60.0)
    args = ap.parse_args()
    if args.quick:
        args.capacity_s, args.overload_s, args.recovery_s = 20.0, 40.0, 20.0
    partial: list[dict] = []
    try:
        out = asyncio.run(run(args, partial))
    except BaseException:
        RESULTS.mkdir(parents=True, exist_ok=True)  # what was measured before it failed, to read why
        (RESULTS / "overload_failed_run.json").write_text(json.dumps(partial, indent=1, default=str) + "\n")
        raise
    print_report(out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"overload{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
