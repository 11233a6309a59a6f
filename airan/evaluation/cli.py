"""`airan eval`: build the labelled NetOps set, score rules and the model on it."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="Evaluate NetOps answers on a labelled set built from the simulator.", no_args_is_help=True)

SplitOption = Annotated[str, typer.Option(help="dev (for tuning) or test (for reporting)")]


def _split(split: str, n_dev: int, n_test: int):
    from airan.evaluation.dataset import build_splits

    if split not in ("dev", "test"):
        typer.echo(f"--split must be dev or test, not {split!r}", err=True)
        raise typer.Exit(2)
    dev, test = build_splits(n_dev, n_test)
    return dev, (dev if split == "dev" else test)


@app.command("dataset")
def dataset(
    out: Annotated[Path, typer.Argument(help="JSONL file to write")],
    split: SplitOption = "test",
    n: Annotated[int, typer.Option(help="items in the split")] = 200,
) -> None:
    """Write one split of the labelled set as JSONL (deterministic: same split and n, same file)."""
    from collections import Counter

    from airan.evaluation.dataset import DEV_SEED, TEST_SEED, build_dataset, write_jsonl

    if split not in ("dev", "test"):
        typer.echo(f"--split must be dev or test, not {split!r}", err=True)
        raise typer.Exit(2)
    items = build_dataset(n, DEV_SEED if split == "dev" else TEST_SEED, split)
    write_jsonl(items, out)
    counts = ", ".join(f"{k} {v}" for k, v in sorted(Counter(i.label for i in items).items()))
    typer.echo(f"{out}: {len(items)} items ({counts})")


@app.command("run")
def run(
    split: SplitOption = "test",
    n_test: Annotated[int, typer.Option(help="test items")] = 200,
    n_dev: Annotated[int, typer.Option(help="development items (rule tuning; disjoint seeds)")] = 70,
    methods: Annotated[str, typer.Option(help="comma-separated: rules, free_text, diagnosis")] = "rules,free_text,diagnosis",
    target: Annotated[Optional[str], typer.Option(help="a running control plane host:port (default: start one)")] = None,
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="airan YAML for the started stack (default: SmolLM2, 1 site)")
    ] = None,
    model: Annotated[str, typer.Option(help="model variant to ask (default: the server's)")] = "",
    concurrency: Annotated[int, typer.Option(help="model queries in flight")] = 4,
    out_dir: Annotated[Path, typer.Option(help="where the JSON, PNG and predictions go")] = Path("eval-results"),
    name: Annotated[str, typer.Option(help="file name stem")] = "netops_eval",
) -> None:
    """Score rules, free text and grounded diagnoses; print a table, write JSON, predictions and a confusion PNG."""
    import asyncio
    import sys

    from airan.config import ConfigError, load_config
    from airan.evaluation import report
    from airan.evaluation.runner import run_eval

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    dev, items = _split(split, n_dev, n_test)
    cfg = None
    if config is not None:
        try:
            cfg = load_config(config)
        except ConfigError as e:
            typer.echo(str(e), err=True)
            raise typer.Exit(2)

    def progress(method: str, done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            print(f"  {method}: {done}/{total}", file=sys.stderr, flush=True)

    try:
        result = asyncio.run(run_eval(items, dev, chosen, address=target, config=cfg, concurrency=concurrency,
                                      model=model, progress=progress))
    except ValueError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)
    result.meta["split"] = split
    report.print_table(result.reports, title=f"NetOps evaluation ({split}, {len(items)} items)")
    json_path = report.write_json(result, out_dir / f"{name}.json")
    png = report.save_confusion_png(result.reports, out_dir / f"{name}_cm.png", title=f"{split} set, {len(items)} items")
    preds = report.write_predictions(result.predictions, items, out_dir / f"{name}_predictions.jsonl")
    typer.echo(f"wrote {json_path}, {png}, {preds}")


@app.command("adapter")
def adapter(
    split: SplitOption = "dev",
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
