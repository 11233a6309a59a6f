"""`airan eval`: the honest labelled NetOps cases, and rules, detector and served models scored on them."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Evaluate NetOps diagnoses on labelled cases built from the simulator.", no_args_is_help=True)

SETS = ("dev", "test", "shifted")


def build_set(name: str, n: int):
    """`dev` (tuning only), `test` (the standard setting) or `shifted` (settings training never sees)."""
    from airan.evaluation.cases import DEV_SEED, TEST_SEED, build_cases, shifted_cases

    if name == "dev":
        return build_cases(n, DEV_SEED, name="dev")
    if name == "test":
        return build_cases(n, TEST_SEED, name="test")
    if name == "shifted":
        return shifted_cases(n)
    raise ValueError(f"unknown set {name!r}; choose from {', '.join(SETS)}")


@app.command("dataset")
def dataset(
    out: Annotated[Path, typer.Argument(help="JSONL file to write")],
    set_name: Annotated[str, typer.Option("--set", help="dev, test or shifted")] = "test",
    n: Annotated[int, typer.Option(help="items (labels in turn: a multiple of 7 is balanced)")] = 700,
) -> None:
    """Write one set of labelled cases as JSONL (deterministic: same set and n, same file)."""
    from collections import Counter

    from airan.evaluation.dataset import write_jsonl

    try:
        items = build_set(set_name, n)
    except ValueError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)
    write_jsonl(items, out)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(Counter(i.label for i in items).items()))
    typer.echo(f"{out}: {len(items)} items ({counts})")


@app.command("run")
def run(
    model: Annotated[
        Optional[list[str]], typer.Option("--model", help="a served model to ask (repeatable), e.g. smollm2-135m-instruct")
    ] = None,
    test_items: Annotated[int, typer.Option(help="standard TEST cases (7 labels in turn: 700 = 100 per label)")] = 700,
    shifted_items: Annotated[int, typer.Option(help="SHIFTED cases (weaker, night, single-cell, concurrent, held-out wording)")] = 700,
    dev_items: Annotated[int, typer.Option(help="DEV cases, for tuning the rules only (disjoint seeds)")] = 700,
    baselines: Annotated[str, typer.Option(help="comma-separated in-process methods: rules, detector (or none)")] = "rules,detector",
    near_rt: Annotated[bool, typer.Option("--near-rt", help="also ask each model at NEAR_RT (brief answers), reported as MODEL@near-rt")] = False,
    concurrency: Annotated[int, typer.Option(help="model queries in flight")] = 4,
    target: Annotated[Optional[str], typer.Option(help="a running control plane host:port (default: start one)")] = None,
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="airan YAML for the started stack (default: one site serving the --model list)")
    ] = None,
    timeout_s: Annotated[float, typer.Option(help="per-request timeout (an expired one is an ERROR, a miss)")] = 300.0,
    bootstrap: Annotated[int, typer.Option(min=1000, help="bootstrap resamples for the macro-F1 CI")] = 1000,
    seed: Annotated[int, typer.Option(help="bootstrap seed")] = 0,
    out: Annotated[Path, typer.Option(help="directory for summary.json, PNGs and predictions.jsonl")] = Path("eval-results"),
    progress: Annotated[bool, typer.Option(help="progress bars on stderr")] = True,
) -> None:
    """Rules, detector and each --model side by side on the TEST and SHIFTED sets; table, summary.json, PNGs."""
    import asyncio

    from airan.config import load_config_or_exit
    from airan.evaluation import report
    from airan.evaluation.runner import evaluate

    chosen = [b.strip() for b in baselines.split(",") if b.strip() and b.strip() != "none"]
    models = list(dict.fromkeys(model or []))
    if not chosen and not models:
        typer.echo("nothing to evaluate: give --model and/or --baselines", err=True)
        raise typer.Exit(2)
    cfg = load_config_or_exit(config) if config is not None else None
    sets = {"test": build_set("test", test_items), "shifted": build_set("shifted", shifted_items)}
    sets = {k: v for k, v in sets.items() if v}
    dev = build_set("dev", dev_items) if "rules" in chosen else []
    try:
        evaluation = asyncio.run(evaluate(
            sets, dev, models, baselines=chosen, near_rt=near_rt, address=target, config=cfg,
            concurrency=concurrency, timeout_s=timeout_s, n_resamples=bootstrap, seed=seed, progress=progress,
        ))  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)
    summary = evaluation.summary()
    report.print_summary(summary)
    paths = report.write_outputs(evaluation, out)
    typer.echo("wrote " + ", ".join(str(p) for p in paths))


@app.command("adapter")
def adapter(
    split: Annotated[str, typer.Option(help="dev (for tuning) or test (for reporting)")] = "dev",
    n: Annotated[int, typer.Option(help="items (labels in turn, so a multiple of 7 is balanced)")] = 70,
    path: Annotated[
        Optional[Path], typer.Option("--adapter", help="PEFT adapter directory (default: the committed smollm2-netops-lora)")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="model queries in flight")] = 4,
    out: Annotated[Optional[Path], typer.Option(help="write the reports and predictions as JSON here")] = None,
) -> None:
    """A LoRA adapter vs its base (SmolLM2) in DIAGNOSIS mode through gRPC -> gateway -> Ray replica -> vLLM."""
    import asyncio
    import json
    import sys
    from dataclasses import asdict

    from airan.evaluation.adapter import DEFAULT_ADAPTER, compare
    from airan.evaluation.dataset import DEV_SEED, TEST_SEED, build_dataset
    from airan.evaluation.report import markdown_table, print_table
    from airan.store.registry import packaged_adapter_dir

    if split not in ("dev", "test"):
        typer.echo(f"--split must be dev or test, not {split!r}", err=True)
        raise typer.Exit(2)
    items = build_dataset(n, DEV_SEED if split == "dev" else TEST_SEED, split)

    def progress(method: str, done: int, total: int) -> None:
        if done == total or done % max(1, total // 5) == 0:
            print(f"  {done}/{total}", file=sys.stderr, flush=True)

    reports, predictions, meta = asyncio.run(compare(items, path, concurrency=concurrency, progress=progress))
    print_table(reports, title=f"DIAGNOSIS mode, {split} set, {len(items)} items")
    typer.echo(markdown_table(reports))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "split": split, "n": len(items), "adapter": str(path or packaged_adapter_dir(DEFAULT_ADAPTER)), "meta": meta,
            "reports": [asdict(r) for r in reports],
            "predictions": {k: [asdict(p) for p in v] for k, v in predictions.items()},
        }, indent=2) + "\n")  # fmt: skip


@app.command("qa")
def qa(
    model: Annotated[
        Optional[list[str]], typer.Option("--model", help="a trained model to ask with retrieval too (repeatable)")
    ] = None,
    base: Annotated[str, typer.Option(help="the base model: asked without and with retrieval")] = "smollm2-135m-instruct",
    limit: Annotated[Optional[int], typer.Option(help="ask every k-th question only, this many (a bounded run)")] = None,
    concurrency: Annotated[int, typer.Option(help="questions in flight (1: latencies of one request at a time)")] = 1,
    max_tokens: Annotated[int, typer.Option(help="answer tokens per question")] = 64,
    target: Annotated[Optional[str], typer.Option(help="a running control plane host:port (default: start one)")] = None,
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="airan YAML for the started stack (default: one site serving the models)")
    ] = None,
    timeout_s: Annotated[float, typer.Option(help="per-question timeout (an expired one is an error)")] = 120.0,
    out: Annotated[Path, typer.Option(help="directory for summary.json and answers.jsonl")] = Path("eval-results/qa"),
    progress: Annotated[bool, typer.Option(help="progress bars on stderr")] = True,
) -> None:
    """Free-text answers on the QA set (>= 200 questions from the knowledge base, wordings disjoint from
    training): base without and with retrieval, and each --model with retrieval, through gRPC."""
    import asyncio

    from airan.config import load_config_or_exit
    from airan.core.knowledge import packaged_knowledge
    from airan.evaluation.qa import eval_set
    from airan.evaluation.qa_runner import evaluate_qa, markdown_table, methods_for, subset

    kb = packaged_knowledge()
    items = subset(eval_set(kb), limit)
    cfg = load_config_or_exit(config) if config is not None else None
    methods = methods_for(base, list(dict.fromkeys(model or [])))
    try:
        evaluation = asyncio.run(evaluate_qa(
            items, methods, kb, address=target, config=cfg, concurrency=concurrency, timeout_s=timeout_s,
            max_tokens=max_tokens, progress=progress,
        ))  # fmt: skip
    except (ValueError, FileNotFoundError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)
    typer.echo(f"QA set: {len(items)} questions ({sum(not i.answerable for i in items)} unanswerable), "
               f"{len(kb)} knowledge passages")  # fmt: skip
    typer.echo(markdown_table(evaluation))
    paths = evaluation.write(out)
    typer.echo("wrote " + ", ".join(str(p) for p in paths))
