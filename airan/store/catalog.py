"""The variant catalog: measured memory, speed and quality of each servable variant.

Pure functions over plain data: the variants benchmark's JSON in, `CatalogEntry`s
out, and the choice placement makes from them (the best-quality variant of a model
family that fits a site's AI headroom).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml

from airan.config import CatalogEntry
from airan.core.placement import family  # noqa: F401 - the family relation lives with the planner

MB = 1e6
NOT_SERVED_BY_AIRAN = ("llama.cpp",)  # the benchmark's peer runtime, not a replica airan can place
COMPILED_SUFFIX = "+compiled"


def entries_from_report(report: Mapping) -> dict[str, CatalogEntry]:
    """Catalog entries from a `benchmarks/bench_variants.py` results file (eager-mode rows).

    quality_rank orders by NetOps macro-F1, then held-out perplexity (lower is better).
    """
    streams = report["args"]["streams"]
    rows = [
        r for r in report["results"]
        if "error" not in r and r["model"] not in NOT_SERVED_BY_AIRAN and not r["model"].endswith(COMPILED_SUFFIX)
    ]  # fmt: skip
    ranked = sorted(rows, key=lambda r: (-r["macro_f1"], r["perplexity"]))
    return {
        r["model"]: CatalogEntry(
            parent=r.get("parent"),
            method=r["method"],
            weight_mb=round(r["weight_bytes"] / MB, 1),
            memory_mb=round(r["peak_rss_bytes"] / MB, 1),
            tok_s_1=round(r["tok_s_1"], 1),
            tok_s_16=round(r[f"tok_s_{streams}"], 1),
            ttft_ms=round(r["ttft_ms"], 1),
            macro_f1=round(r["macro_f1"], 4),
            validity=round(r["validity"], 4),
            perplexity=round(r["perplexity"], 3),
            quality_rank=rank,
            measured_on=report["machine"]["machine"],
            measured_at=report.get("finished") or report["machine"]["started"],
        )
        for rank, r in enumerate(ranked, start=1)
    }


def pick_variant(
    catalog: Mapping[str, CatalogEntry], model: str, memory_mb: float, min_tok_s: float = 0.0
) -> str | None:
    """The best-quality member of `model`'s family that fits `memory_mb` and streams at least
    `min_tok_s`; None when nothing fits (the site then serves no AI)."""
    fits = [
        name for name in family(catalog, model)
        if catalog[name].memory_mb <= memory_mb and catalog[name].tok_s_1 >= min_tok_s
    ]  # fmt: skip
    return min(fits, key=lambda n: (catalog[n].quality_rank, catalog[n].memory_mb), default=None)


HEADER = """\
# The variant catalog: measured on {machine}
# by benchmarks/bench_variants.py ({source}). Generated; do not edit by hand.
# Refresh: .venv/bin/python benchmarks/bench_variants.py && airan model catalog refresh
# memory_mb: peak RSS of one replica (engine processes, 1 GiB KV cache); tok_s_1 / tok_s_16:
# generated tokens/s for one stream / summed over 16; quality_rank 1 = best NetOps macro-F1.
"""


def write_catalog(entries: Mapping[str, CatalogEntry], path: Path, source: str) -> Path:
    machine = next(iter(entries.values())).measured_on if entries else "-"
    body = yaml.safe_dump({k: v.model_dump(mode="json") for k, v in entries.items()}, sort_keys=False)
    path.write_text(HEADER.format(machine=machine, source=source) + body)
    return path
