"""Variant catalog: benchmark results -> typed entries -> config -> the variant a site gets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from airan.cli import app
from airan.config import DEFAULT_CONFIG, ConfigError, ModelSpec, load_config
from airan.store.catalog import entries_from_report, family, pick_variant, write_catalog
from airan.store.registry import ModelNotAvailable, materialize

REPO = Path(__file__).resolve().parent.parent
COMMITTED_RESULTS = REPO / "benchmarks" / "results" / "variants.json"


def _row(model, method, parent, rss_mb, tok_s, f1, ppl, weight_mb=100.0):
    return {"model": model, "method": method, "parent": parent, "weight_bytes": weight_mb * 1e6,
            "peak_rss_bytes": rss_mb * 1e6, "tok_s_1": tok_s, "tok_s_16": 4 * tok_s, "ttft_ms": 50.0,
            "macro_f1": f1, "validity": 1.0, "perplexity": ppl}  # fmt: skip


def _report(*rows) -> dict:
    return {"args": {"streams": 16}, "machine": {"machine": "test box", "started": "2026-11-27T00:00:00Z"},
            "finished": "2026-11-27T01:00:00Z", "results": list(rows)}  # fmt: skip


REPORT = _report(
    _row("base", "base", None, 1000, 40, 0.30, 8.0, weight_mb=270),
    _row("w4", "w4a16", "base", 600, 45, 0.30, 9.0, weight_mb=110),
    _row("pruned", "prune-mlp", "base", 800, 55, 0.20, 10.0),
    _row("lora", "lora", "base", 1100, 30, 0.60, 2.0),
    _row("other", "base", None, 300, 90, 0.90, 5.0),
    _row("lora-w4", "w4a16", "lora", 700, 40, 0.55, 3.0),
    _row("base+compiled", "base", None, 1000, 60, 0.30, 8.0),
    _row("llama.cpp", "gguf-q4_1", "base", 200, 120, 0.25, 8.5),
    {"model": "broken", "error": "exit 1"},
)


def test_entries_rank_by_macro_f1_then_perplexity_and_leave_out_what_airan_cannot_place():
    entries = entries_from_report(REPORT)
    assert set(entries) == {"base", "w4", "pruned", "lora", "other", "lora-w4"}
    ranks = {name: e.quality_rank for name, e in entries.items()}
    assert ranks == {"other": 1, "lora": 2, "lora-w4": 3, "base": 4, "w4": 5, "pruned": 6}  # base beats w4 on ppl
    assert entries["w4"].memory_mb == 600 and entries["w4"].weight_mb == 110 and entries["w4"].tok_s_16 == 180
    assert entries["w4"].measured_on == "test box" and entries["w4"].parent == "base"


def test_a_site_gets_the_best_variant_of_the_family_that_fits():
    entries = entries_from_report(REPORT)
    assert sorted(family(entries, "base")) == ["base", "lora", "lora-w4", "pruned", "w4"]  # variants of variants too
    assert pick_variant(entries, "base", memory_mb=2000) == "lora"
    assert pick_variant(entries, "base", memory_mb=1000) == "lora-w4"
    assert pick_variant(entries, "base", memory_mb=699) == "w4"  # a surge shrinks AI to the smaller variant
    assert pick_variant(entries, "base", memory_mb=999, min_tok_s=50) == "pruned"
    assert pick_variant(entries, "lora", memory_mb=999) == "lora-w4"
    assert pick_variant(entries, "base", memory_mb=500) is None  # nothing fits: no AI at this site
    assert pick_variant(entries, "unknown", memory_mb=1e9) is None


def test_catalog_file_beside_the_config_is_loaded_and_validated(tmp_path):
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    write_catalog(entries_from_report(REPORT), tmp_path / "cat.yaml", source="test")
    (tmp_path / "airan.yaml").write_text(yaml.safe_dump({**config, "catalog": "cat.yaml"}))
    loaded = load_config(tmp_path / "airan.yaml").catalog
    assert loaded == entries_from_report(REPORT)

    (tmp_path / "missing.yaml").write_text(yaml.safe_dump({**config, "catalog": "nope.yaml"}))
    with pytest.raises(ConfigError, match="catalog file not found.*airan model catalog refresh"):
        load_config(tmp_path / "missing.yaml")

    bad = {"base": {**entries_from_report(REPORT)["base"].model_dump(), "macro_f1": 1.5}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**config, "catalog": bad}))
    with pytest.raises(ConfigError, match=r"catalog\.base\.macro_f1"):
        load_config(tmp_path / "bad.yaml")


def test_refresh_command_writes_a_catalog_the_config_reads(tmp_path):
    results = tmp_path / "variants.json"
    results.write_text(json.dumps(REPORT))
    out = tmp_path / "catalog.yaml"
    runner = CliRunner()
    r = runner.invoke(app, ["model", "catalog", "refresh", "--results", str(results), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "Generated; do not edit by hand" in out.read_text()
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    (tmp_path / "airan.yaml").write_text(yaml.safe_dump({**config, "catalog": "catalog.yaml"}))
    shown = runner.invoke(app, ["model", "catalog", "--config", str(tmp_path / "airan.yaml")], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "w4a16" in shown.output, shown.output

    r = runner.invoke(app, ["model", "catalog", "refresh", "--results", str(tmp_path / "none.json"), "--out", str(out)])
    assert r.exit_code == 1 and "bench_variants.py" in r.output


def test_committed_catalog_is_the_committed_benchmark_run():
    """The default config's catalog was refreshed from the benchmark results in the repo."""
    report = json.loads(COMMITTED_RESULTS.read_text())
    assert load_config().catalog == entries_from_report(report)


def test_an_unbuilt_variant_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRAN_CACHE", str(tmp_path))
    with pytest.raises(ModelNotAvailable, match="airan model build smollm2-w4a16"):
        materialize(ModelSpec(name="smollm2-w4a16", source="variant"))


def test_parse_config_says_a_catalog_file_name_needs_load_config():
    from airan.config import parse_config

    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    with pytest.raises(ConfigError, match="load_config"):
        parse_config({**raw, "catalog": "catalog.yaml"})
