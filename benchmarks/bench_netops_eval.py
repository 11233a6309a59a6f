"""Benchmark: NetOps diagnosis quality and latency of rules, the fast detector and served models, in one run.

The same evaluation as `airan eval run` (airan/evaluation/runner.py), with run facts for a results
file: the standard TEST set (700 cases, 100 per label) and the SHIFTED set (700: weaker events,
night hours, single-cell sites, concurrent events, held-out wordings), the DEV set for tuning the
rules only (disjoint seeds). In-process: `rules`, `detector` (the packaged LightGBM model on the
evidence the server computes). Each `--model` is asked through the real path (gRPC client ->
control plane -> Ray replica -> vLLM) in DIAGNOSIS mode at NON_RT, a few queries in flight;
`--near-rt` also asks the brief NEAR_RT form.

    .venv/bin/python benchmarks/bench_netops_eval.py --model smollm2-135m-instruct \\
        --model smollm2-netops-merged --shifted-items 350 --out benchmarks/results/netops_eval  # ~22 min on 2 cores

Writes <out>/summary.json (per set and method: macro-F1 and its bootstrap CI, cell F1, action
accuracy, faithfulness, prompt tokens, latency), macro_f1_<set>.png, confusion_<set>.png and
predictions.jsonl.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # keep the progress bars readable


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", default=[], help="served model to ask (repeatable)")
    ap.add_argument("--test-items", type=int, default=700)
    ap.add_argument("--shifted-items", type=int, default=700)
    ap.add_argument("--dev-items", type=int, default=700)
    ap.add_argument("--baselines", default="rules,detector")
    ap.add_argument("--near-rt", action="store_true", help="also ask each model at NEAR_RT (brief answers)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--target", default=None, help="a running control plane (default: start one here)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "netops_eval")
    args = ap.parse_args()

    from airan.evaluation import report
    from airan.evaluation.cli import build_set
    from airan.evaluation.runner import evaluate

    baselines = [b for b in args.baselines.split(",") if b and b != "none"]
    sets = {"test": build_set("test", args.test_items), "shifted": build_set("shifted", args.shifted_items)}
    dev = build_set("dev", args.dev_items) if "rules" in baselines else []
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.perf_counter()
    evaluation = asyncio.run(evaluate(
        {k: v for k, v in sets.items() if v}, dev, args.model, baselines=baselines, near_rt=args.near_rt,
        address=args.target, concurrency=args.concurrency, n_resamples=args.bootstrap,
    ))  # fmt: skip
    evaluation.meta.update({
        "started_utc": started,
        "bench_wall_s": round(time.perf_counter() - t0, 1),
        # the machine may be shared: other work's load shows in latency
        "loadavg_end": round(os.getloadavg()[0], 2),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    })  # fmt: skip
    summary = evaluation.summary()
    report.print_summary(summary)
    print(report.markdown_summary(summary))
    print("wrote " + ", ".join(str(p) for p in report.write_outputs(evaluation, args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
