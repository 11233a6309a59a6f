"""Every SmolLM2 variant served by vLLM on this CPU, and llama.cpp on the shipped GGUF, side by side.

    .venv/bin/python benchmarks/bench_variants.py                  # all models, ~30 min on 2 cores
    .venv/bin/python benchmarks/bench_variants.py --models smollm2-mlp50,llama.cpp --n-eval 14
    .venv/bin/python benchmarks/bench_variants.py --show benchmarks/results/variants.json

Each model runs alone in its own process (one engine at a time, the same 2 cores, the same prompt
token ids for every runtime), measured for:
- weights: bytes on disk of what the engine loads (the LoRA row: base + adapter);
- peak RSS: resident memory of the model's process tree (engine core and worker included) sampled
  every 50 ms from engine start to the end of the evaluation, less the harness's own RSS just before
  the engine started (the tokenizer and prompts every row shares);
- load: engine construction to ready;
- TTFT: median over 8 NetOps diagnosis prompts (~1.3k tokens each; the system prompt is a shared
  prefix, so prefix caching helps every runtime alike, the KPI table is new each time);
- tok/s, one stream: short prompts (a controller's question alone, ~60 tokens), 64 greedy tokens with
  end-of-sequence ignored, (64 - 1) / (last token - first token); best of 8, as the 2-core box is
  shared with the kernel's housekeeping and the runs are bimodal on it;
- tok/s over 16 concurrent streams: 16 other short prompts at once, 64 tokens each, all generated
  tokens / wall, best of 2 rounds. llama.cpp serves one sequence at a time (as its Python server does);
- perplexity on 16 held-out simulator texts (TEST items: prompt + the reference diagnosis);
- NetOps evaluation in DIAGNOSIS mode (schema-constrained JSON, greedy, one try: no gateway retry)
  on the TEST split: macro-F1 over the 7 causes and the share of valid diagnoses.

Writes <out-dir>/<name>.json and <name>_pareto.png; the README table is `--markdown`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

BASE = "smollm2-135m-instruct"
LORA = "smollm2-netops-lora"
LLAMA_CPP = "llama.cpp"
VARIANTS = ("smollm2-w8a8", "smollm2-w4a16", "smollm2-mlp50", "smollm2-drop10", "smollm2-wanda50",
            "smollm2-netops-merged", "smollm2-netops-w4a16")
MODELS = (BASE, *VARIANTS, LORA, LLAMA_CPP)
COMPILED = "+compiled"  # suffix: the same vLLM model with torch.compile instead of eager mode
DEFAULT_RUN = (*MODELS, BASE + COMPILED, "smollm2-drop10" + COMPILED)
MAX_MODEL_LEN = 2048
SINGLE_RUNS, ROUNDS = 8, 2
PPL_ITEMS = 16


# --- one model, in its own process ------------------------------------------------------


def _engine(name: str, threads: int):
    """(engine, lora name or None, facts) for a benchmark model name."""
    from airan.store.registry import describe
    from airan.factory.smollm2 import prepare_smollm2, smollm2_gguf

    base = prepare_smollm2(show_progress=False)
    if name == LLAMA_CPP:
        from airan.serving.engine.llamacpp_engine import LlamaCppEngine, LlamaCppSettings

        gguf = smollm2_gguf()
        settings = LlamaCppSettings(gguf, n_ctx=MAX_MODEL_LEN, n_threads=threads)
        import llama_cpp

        facts = {"runtime": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "format": "GGUF Q4_1",
                 "method": "gguf-q4_1", "parent": BASE,
                 "weight_bytes": gguf.stat().st_size, "parameters": describe(base)["parameters"]}  # fmt: skip
        return LlamaCppEngine(settings), None, facts
    import vllm

    from airan.serving.engine.vllm_engine import VllmEngine, VllmSettings
    from airan.factory.variants import load_variant_manifest

    model, compiled = name.removesuffix(COMPILED), name.endswith(COMPILED)
    adapters, lora, path = (), None, base
    facts = {"runtime": f"vLLM {vllm.__version__} CPU, " + ("compiled" if compiled else "eager"),
             "method": "base", "parent": None}
    if model == LORA:
        from airan.store.registry import packaged_adapter_dir, read_manifest

        adapter_dir = packaged_adapter_dir(LORA)
        manifest = read_manifest(adapter_dir)
        adapters, lora = ((LORA, str(adapter_dir)),), LORA
        facts |= {"method": "lora", "parent": BASE, "format": f"bf16 + LoRA r={manifest['rank']}", "parameters": describe(base)["parameters"] + manifest["parameters"],
                  "weight_bytes": describe(base)["weight_bytes"] + manifest["adapter_bytes"]}  # fmt: skip
    elif model != BASE:
        manifest = load_variant_manifest(model)
        if manifest is None:
            raise SystemExit(f"{model} is not built: airan model build {model}")
        path = Path(manifest["path"])
        facts |= {"format": manifest["format"], "parameters": manifest["parameters"], "method": manifest["method"],
                  "parent": manifest["parent"]}
    if "weight_bytes" not in facts:
        facts |= {"weight_bytes": describe(path)["weight_bytes"], "parameters": facts.get("parameters") or describe(path)["parameters"]}
        facts.setdefault("format", "bf16 safetensors")
    settings = VllmSettings(model_path=path, max_model_len=MAX_MODEL_LEN, kv_cache_gb=1, max_num_seqs=16,
                            enforce_eager=not compiled, adapters=adapters)  # fmt: skip
    return VllmEngine(settings), lora, facts


def _prompts(items) -> list[tuple[object, list[int]]]:
    from airan.core.diagnosis import DIAGNOSIS_MAX_TOKENS
    from airan.factory.smollm2 import prepare_smollm2
    from airan.evaluation.queries import server_query
    from airan.core.prompting import PromptRenderer

    renderer = PromptRenderer(prepare_smollm2(show_progress=False))
    out = []
    for item in items:
        query = server_query(item)
        out.append((query, list(renderer.render(query, MAX_MODEL_LEN - DIAGNOSIS_MAX_TOKENS).token_ids)))
    return out


def _short_prompts(items) -> list[list[int]]:
    """A controller's question alone, in the chat template: a decode-bound request."""
    from airan.factory.smollm2 import prepare_smollm2
    from airan.core.prompting import PromptRenderer

    tok = PromptRenderer(prepare_smollm2(show_progress=False)).tokenizer
    out = []
    for item in items:
        ids = tok.apply_chat_template([{"role": "user", "content": item.question}], add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


class RssSampler:
    """Peak resident memory of this process and its children, sampled on a thread."""

    def __init__(self, every_s: float = 0.05) -> None:
        import psutil

        self._me, self._every, self._stop = psutil.Process(), every_s, None
        self.baseline = self.peak = self.now()

    def now(self) -> int:
        import psutil

        total = 0
        for p in [self._me, *self._me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def __enter__(self):
        import threading

        self._stop = threading.Event()

        def loop() -> None:
            while not self._stop.wait(self._every):
                self.peak = max(self.peak, self.now())

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def _timed(engine, prompt: list[int], params, request_id: str) -> list[float]:
    """Arrival time of every generated token (a chunk of k tokens counts k arrivals)."""
    stamps, seen = [], 0
    async for chunk in engine.generate(prompt, params, request_id):
        now = time.perf_counter()
        stamps += [now] * (chunk.completion_tokens - seen)
        seen = chunk.completion_tokens
    return stamps


async def measure_one(name: str, n_eval: int, streams: int, tokens: int, threads: int) -> dict:
    from airan.evaluation.dataset import DEV_SEED, TEST_SEED, build_dataset

    engine, lora, facts = _engine(name, threads)
    dev = build_dataset(SINGLE_RUNS * 2 + ROUNDS * streams + 1, DEV_SEED, "dev")
    long_prompts = [p for _, p in _prompts(dev[:SINGLE_RUNS + 1])]
    short_prompts = _short_prompts(dev[SINGLE_RUNS + 1 :])
    eval_items = build_dataset(n_eval, TEST_SEED, "test")
    eval_prompts = _prompts(eval_items)

    rss = RssSampler()
    with rss:
        t0 = time.perf_counter()
        await engine.start()
        result = dict(facts, model=name, load_s=time.perf_counter() - t0)
        try:
            result |= await _serve(engine, lora, long_prompts, short_prompts, eval_items, eval_prompts, streams, tokens)
        except BaseException:
            await engine.shutdown()
            raise
    result |= {"peak_rss_bytes": rss.peak - rss.baseline, "harness_rss_bytes": rss.baseline}
    try:
        result["perplexity"] = await _perplexity(engine, name, lora, eval_items[:PPL_ITEMS])
    finally:
        await engine.shutdown()
    return result


async def _serve(engine, lora, long_prompts, short_prompts, eval_items, eval_prompts, streams, tokens) -> dict:
    from airan.core.diagnosis import DIAGNOSIS_MAX_TOKENS, diagnosis_schema, parse_diagnosis
    from airan.serving.engine.protocol import GenerationParams
    from airan.evaluation.metrics import INVALID, Prediction, summarize

    result = {}
    fixed = GenerationParams(max_tokens=tokens, ignore_eos=True, lora=lora)
    await _timed(engine, long_prompts[-1], fixed, "warmup")
    ttft, single = [], []
    for k in range(SINGLE_RUNS):
        start = time.perf_counter()
        stamps = await _timed(engine, long_prompts[k], GenerationParams(max_tokens=1, lora=lora), f"ttft-{k}")
        ttft.append(1000 * (stamps[0] - start))
        stamps = await _timed(engine, short_prompts[k], fixed, f"single-{k}")
        single.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    result |= {"ttft_ms": statistics.median(ttft), "tok_s_1": max(single), "tok_s_1_median": statistics.median(single)}
    summed = []
    for r in range(ROUNDS):
        batch = short_prompts[SINGLE_RUNS + r * streams : SINGLE_RUNS + (r + 1) * streams]
        start = time.perf_counter()
        runs = await asyncio.gather(*(_timed(engine, p, fixed, f"multi-{r}-{k}") for k, p in enumerate(batch)))
        summed.append(sum(len(s) for s in runs) / (time.perf_counter() - start))
    result[f"tok_s_{streams}"] = max(summed)

    # NetOps diagnoses, 8 in flight (llama.cpp queues them)
    gate = asyncio.Semaphore(8)

    async def diagnose(item, query, prompt) -> Prediction:
        params = GenerationParams(max_tokens=DIAGNOSIS_MAX_TOKENS, json_schema=diagnosis_schema(list(query.context_cells)), lora=lora)
        async with gate:
            start, text, chunk = time.perf_counter(), "", None
            async for chunk in engine.generate(prompt, params, f"eval-{item.item_id}"):
                text += chunk.text_delta
        latency = 1000 * (time.perf_counter() - start)
        try:
            d = parse_diagnosis(text, list(query.context_cells))
        except ValueError as e:
            return Prediction(item.item_id, INVALID, valid=False, error=str(e)[:200], latency_ms=latency, text=text)
        return Prediction(item.item_id, d.cause, d.affected_cell_ids, valid=True, latency_ms=latency,
                          prompt_tokens=len(prompt), completion_tokens=chunk.completion_tokens, text=d.rationale)  # fmt: skip

    start = time.perf_counter()
    preds = await asyncio.gather(*(diagnose(i, q, p) for i, (q, p) in zip(eval_items, eval_prompts)))
    report = summarize("diagnosis", eval_items, preds, time.perf_counter() - start, uses_model=True)
    result |= {"macro_f1": report.macro_f1, "validity": report.validity, "accuracy": report.accuracy,
               "eval_items": len(eval_items), "causes": [p.cause for p in preds]}  # fmt: skip
    return result


async def _perplexity(engine, name: str, lora, items) -> float:
    from airan.factory.smollm2 import prepare_smollm2
    from airan.factory.variants.netops_data import build_example
    from airan.core.prompting import PromptRenderer

    renderer = PromptRenderer(prepare_smollm2(show_progress=False))
    texts = [list(build_example(renderer, item).input_ids) for item in items]
    if name == LLAMA_CPP:  # logits for every position need their own context
        from dataclasses import replace

        from airan.serving.engine.llamacpp_engine import LlamaCppEngine

        await engine.shutdown()
        engine = LlamaCppEngine(replace(engine.settings, logits_all=True))
        await engine.start()
        try:
            logprobs = [lp for ids in texts for lp in engine.prompt_logprobs(ids)]
        finally:
            await engine.shutdown()
    else:
        logprobs = [lp for k, ids in enumerate(texts) for lp in await engine.prompt_logprobs(ids, f"ppl-{k}", lora)]
    return math.exp(-sum(logprobs) / len(logprobs))


# --- the run: one child process per model ------------------------------------------------


def run_child(name: str, args) -> dict:
    """Run one model in a fresh interpreter (its memory and threads are its own)."""
    out = args.out_dir / f".{args.name}.{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--one", name, "--result", str(out), "--n-eval", str(args.n_eval),
           "--streams", str(args.streams), "--tokens", str(args.tokens), "--threads", str(args.threads)]  # fmt: skip
    log = (args.out_dir / f".{args.name}.{name}.log").open("w")
    try:
        proc = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout_s)
    except subprocess.TimeoutExpired:
        return {"model": name, "error": f"timed out after {args.timeout_s:.0f} s (log {log.name})"}
    if proc.returncode != 0 or not out.exists():
        return {"model": name, "error": f"exit {proc.returncode} (log {log.name})"}
    result = json.loads(out.read_text())
    out.unlink()
    return result


def machine_facts() -> dict:
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"machine": f"{cpu}, {len(os.sched_getaffinity(0))} CPUs, {mem:.0f} GiB, no GPU", "cpus": len(os.sched_getaffinity(0)),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip


# --- report ------------------------------------------------------------------------------

COLUMNS = ("model", "format", "params M", "weights MB", "peak RSS MB", "load s", "TTFT ms", "tok/s 1",
           "tok/s {n}", "ppl", "macro-F1", "valid")  # fmt: skip


def rows(report: dict) -> tuple[list[str], list[list[str]]]:
    n = report["args"]["streams"]
    header = [c.format(n=n) for c in COLUMNS]
    out = []
    for r in report["results"]:
        if "error" in r:
            out.append([r["model"], r["error"]] + [""] * (len(header) - 2))
            continue
        out.append([
            r["model"], r["format"], f"{r['parameters'] / 1e6:.1f}", f"{r['weight_bytes'] / 1e6:.0f}",
            f"{r['peak_rss_bytes'] / 1e6:.0f}", f"{r['load_s']:.1f}", f"{r['ttft_ms']:.0f}", f"{r['tok_s_1']:.1f}",
            f"{r[f'tok_s_{n}']:.0f}", f"{r['perplexity']:.2f}", f"{r['macro_f1']:.3f}", f"{r['validity']:.0%}",
        ])  # fmt: skip
    return header, out


def markdown(report: dict) -> str:
    header, body = rows(report)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def goals(report: dict) -> list[str]:
    """The issue's goals, as measured in this run."""
    n = report["args"]["streams"]
    by = {r["model"]: r for r in report["results"] if "error" not in r}
    base, peer = by.get(BASE), by.get(LLAMA_CPP)
    out = []
    if base:
        for key, what in (("weight_bytes", "weights"), ("peak_rss_bytes", "peak RSS")):
            small = [r for r in by.values() if r["model"] != LLAMA_CPP and r[key] <= base[key] / 2]
            best = max(small, key=lambda r: r["macro_f1"], default=None)
            out.append(f"<= half the base's {what}: " + (
                f"{best['model']} ({best[key] / base[key]:.0%}) keeps {best['macro_f1'] / max(base['macro_f1'], 1e-9):.0%} "
                f"of the base's macro-F1 ({best['macro_f1']:.3f} vs {base['macro_f1']:.3f}); goal >= 95%"
                if best else "no vLLM variant"))  # fmt: skip
        if LORA in by:
            gain = 100 * (by[LORA]["macro_f1"] - base["macro_f1"])
            out.append(f"LoRA macro-F1 {by[LORA]['macro_f1']:.3f} vs base {base['macro_f1']:.3f}: {gain:+.1f} points; goal >= +20")
    vllm_rows = [r for r in by.values() if r["model"] != LLAMA_CPP]
    if peer and vllm_rows:
        fast1 = max(vllm_rows, key=lambda r: r["tok_s_1"])
        fastn = max(vllm_rows, key=lambda r: r[f"tok_s_{n}"])
        out.append(f"fastest vLLM single stream: {fast1['model']} {fast1['tok_s_1']:.1f} tok/s = "
                   f"{fast1['tok_s_1'] / peer['tok_s_1']:.2f}x llama.cpp ({peer['tok_s_1']:.1f}); goal >= 1x")  # fmt: skip
        out.append(f"fastest vLLM over {n} streams: {fastn['model']} {fastn[f'tok_s_{n}']:.0f} tok/s = "
                   f"{fastn[f'tok_s_{n}'] / peer[f'tok_s_{n}']:.2f}x llama.cpp ({peer[f'tok_s_{n}']:.0f}); goal >= 2x")  # fmt: skip
    return out


def pareto_png(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = report["args"]["streams"]
    ok = [r for r in report["results"] if "error" not in r]
    colors = {r["model"]: plt.cm.tab20(k % 20) for k, r in enumerate(ok)}  # one colour per model in every panel
    panels = (("weight_bytes", "weights (MB)", 1e-6), ("tok_s_1", "tok/s, one stream", 1),
              (f"tok_s_{n}", f"tok/s summed over {n} streams", 1))  # fmt: skip
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    for ax, (key, label, scale) in zip(axes, panels):
        points = sorted(((r[key] * scale, r["macro_f1"], r["model"]) for r in ok), key=lambda p: p[0])
        for x, y, model in points:
            ax.scatter(x, y, s=60, color=colors[model], marker="s" if model == LLAMA_CPP else "o")
            ax.annotate(model.removeprefix("smollm2-"), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        # the front: no other point is better on both axes (less memory / more speed, more F1)
        smaller_is_better = key == "weight_bytes"
        better_x = (lambda a, b: a <= b) if smaller_is_better else (lambda a, b: a >= b)
        front = sorted((p for p in points if not any(better_x(q[0], p[0]) and q[1] > p[1] for q in points if q is not p)),
                       key=lambda p: p[0])  # fmt: skip
        ax.step([p[0] for p in front], [p[1] for p in front], where="post" if smaller_is_better else "pre",
                color="grey", alpha=0.6, label="Pareto front")  # fmt: skip
        ax.set_xlabel(label)
        ax.set_ylabel("NetOps macro-F1 (DIAGNOSIS mode)")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="lower right")
    fig.suptitle(f"SmolLM2-135M variants on {report['machine']['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    header, body = rows(report)
    table = Table(title=f"SmolLM2 variants on {report['machine']['machine']}")
    for h in header:
        table.add_column(h, justify="left" if h in ("model", "format") else "right")
    for r in body:
        table.add_row(*r)
    console = Console(width=max(Console().width, 150))
    console.print(table)
    for line in goals(report):
        console.print("  " + line)


# --- entry -------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_RUN), help=f"comma-separated; add {COMPILED} to a vLLM model for torch.compile")
    p.add_argument("--n-eval", type=int, default=70, help="TEST items for the NetOps evaluation (7 labels in turn)")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="llama.cpp threads")
    p.add_argument("--timeout-s", type=float, default=2400.0, help="bound on one model's run")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--name", default="variants")
    p.add_argument("--show", type=Path, default=None, help="print a saved results file and exit")
    p.add_argument("--markdown", action="store_true", help="with --show: the README table")
    p.add_argument("--plot", action="store_true", help="with --show: redraw the Pareto PNG beside the file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:  # child: measure one model, write its JSON
        result = asyncio.run(measure_one(args.one, args.n_eval, args.streams, args.tokens, args.threads))
        args.result.write_text(json.dumps(result))
        return 0
    if args.show:
        report = json.loads(args.show.read_text())
        print(markdown(report)) if args.markdown else print_report(report)
        if args.plot:
            print(f"wrote {pareto_png(report, args.show.with_name(args.show.stem + '_pareto.png'))}")
        return 0
    from rich.progress import Progress, TextColumn, TimeElapsedColumn

    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m.removesuffix(COMPILED) not in MODELS or m == LLAMA_CPP + COMPILED]
    if unknown:
        print(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_facts(), "args": {k: v for k, v in vars(args).items() if k in ("n_eval", "streams", "tokens", "threads")},
              "models": models, "results": []}  # fmt: skip
    with Progress(TextColumn("{task.description}"), TimeElapsedColumn()) as progress:
        for k, name in enumerate(models):
            task = progress.add_task(f"[{k + 1}/{len(models)}] {name}")
            result = run_child(name, args)
            report["results"].append(result)
            done = result.get("error") or f"{result['tok_s_1']:.0f} tok/s, macro-F1 {result['macro_f1']:.3f}"
            progress.update(task, description=f"[{k + 1}/{len(models)}] {name}: {done}")
            progress.stop_task(task)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report["load_avg"] = os.getloadavg()
    out = args.out_dir / f"{args.name}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    png = pareto_png(report, args.out_dir / f"{args.name}_pareto.png")
    print_report(report)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
