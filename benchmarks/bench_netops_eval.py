"""Benchmark: NetOps diagnosis quality of (a) KPI-threshold rules, (b) the base model in free text,
(c) the base model grounded with constrained decoding, on one fixed test set, in one run.

The test set (210 items, 30 per label: NORMAL and the simulator's six event kinds) and the
development set (70 items, rule tuning only) come from disjoint seeds. Model answers go through the
real path: gRPC client -> control plane -> Ray replica -> vLLM, SmolLM2-135M-Instruct (bf16) on a
LocalStack with 1 site and 1 replica, a few queries in flight. (b) and (c) run one after the other.

    .venv/bin/python benchmarks/bench_netops_eval.py                       # ~15-25 min on 2 cores
    .venv/bin/python benchmarks/bench_netops_eval.py --n-test 28 --out-dir /tmp/evalsmoke

Writes <out-dir>/netops_eval.json (metrics, confusion matrices, rule thresholds, run facts),
netops_eval_cm.png (one confusion-matrix panel per method) and netops_eval_predictions.jsonl.
Latency is client-observed per query (with `--concurrency` in flight, so it includes queueing);
tok/s is all completion tokens of a method over its wall time.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the progress lines readable


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-test", type=int, default=210)
    ap.add_argument("--n-dev", type=int, default=70)
    ap.add_argument("--split", choices=("test", "dev"), default="test", help="dev: for prompt work only")
    ap.add_argument("--methods", default="rules,free_text,diagnosis")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--target", default=None, help="a running control plane (default: start SmolLM2 here)")
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--name", default="netops_eval")
    args = ap.parse_args()

    from airan.evaluation import report
    from airan.evaluation.dataset import build_splits
    from airan.evaluation.runner import run_eval

    dev, test = build_splits(args.n_dev, args.n_test)
    items = test if args.split == "test" else dev
    started, load0, t0 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), os.getloadavg(), time.perf_counter()

    def progress(method: str, done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            print(f"  {method}: {done}/{total} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    result = asyncio.run(run_eval(items, dev, [m for m in args.methods.split(",") if m], address=args.target,
                                  concurrency=args.concurrency, progress=progress))
    result.meta.update({
        "split": args.split,
        "started_utc": started,
        "wall_s": round(time.perf_counter() - t0, 1),
        # the machine is shared: other work's load shows in latency and tok/s
        "loadavg_start_end": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
        "host": {"cpus": len(os.sched_getaffinity(0)), "machine": platform.machine(), "python": platform.python_version()},
        "git_commit": _git_commit(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    })
    report.print_table(result.reports, title=f"NetOps evaluation ({args.split}, {len(items)} items)")
    print(report.markdown_table(result.reports))
    out = args.out_dir
    paths = [
        report.write_json(result, out / f"{args.name}.json"),
        report.save_confusion_png(result.reports, out / f"{args.name}_cm.png",
                                  title=f"{args.split} set, {len(items)} items, SmolLM2-135M-Instruct"),
        report.write_predictions(result.predictions, items, out / f"{args.name}_predictions.jsonl"),
    ]
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


if __name__ == "__main__":
    raise SystemExit(main())
