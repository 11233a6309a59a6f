"""smollm2-netops-lora: training items, loss masking, seed hygiene, the committed adapter, serving.

Fast tests build training examples with the generated tiny model's tokenizer
(same ChatML template shape as SmolLM2) and train a one-step adapter on it
through the recipe, as `airan model build` does; the slow ones serve the
committed adapter beside SmolLM2 on a real stack.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

from airan.config import load_config
from airan.core.causes import ACTIONS, CAUSES
from airan.core.diagnosis import diagnosis_schema, parse_diagnosis
from airan.core.prompting import PromptRenderer, build_messages
from airan.evaluation import adapter as A
from airan.evaluation.dataset import DEV_SEED, LABELS, TEST_SEED, build_dataset, build_splits
from airan.evaluation.queries import server_query
from airan.factory.tiny import ensure_tiny_model, write_random_lora
from airan.factory.variants import RECIPES, build_variant, load_variant_manifest
from airan.factory.variants import lora as L
from airan.factory.variants import netops_data as D
from airan.store.registry import SMOLLM2_NAME, packaged_adapter_dir, read_manifest

NAME = "smollm2-netops-lora"
RECIPE = RECIPES[NAME]
PACKAGED_DIR = packaged_adapter_dir(NAME)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="module")
def renderer(tiny_dir) -> PromptRenderer:
    return PromptRenderer(tiny_dir)


@pytest.fixture(scope="module")
def items():
    train, _ = D.training_split(len(LABELS), 0)
    return train  # one item per label


def test_targets_are_valid_compact_diagnoses_for_the_items_context(items):
    assert [i.label for i in items] == list(LABELS)
    schema_keys = list(diagnosis_schema([])["properties"])
    for item in items:
        text = D.target_json(item)
        d = parse_diagnosis(text, item.context_cells)
        assert d.cause == item.label and d.affected_cell_ids == item.affected_cells
        raw = json.loads(text)
        assert list(raw) == schema_keys  # the order xgrammar decodes in
        assert json.dumps(raw, separators=(",", ":"), ensure_ascii=False) == text  # no whitespace to spend tokens on
        cause = CAUSES[item.label]  # the gold answer is the cause table's playbook
        assert raw["severity"] == cause.severity
        assert [a.type for a in d.actions] == [k for k, _ in cause.actions]
        for action, (kind, value) in zip(raw["actions"], cause.actions):
            spec = ACTIONS[kind]
            if spec.parameter is not None:
                assert spec.minimum <= action[spec.parameter] <= spec.maximum and action[spec.parameter] == value
                assert ("target_cell" in action) == spec.needs_target_cell
        if item.label != "NORMAL":  # the rationale cites the KPI that moved, on the affected cell
            assert cause.key_kpi in d.rationale and item.focus_cell in d.rationale


def test_prompt_is_the_servers_diagnosis_prompt_and_loss_covers_only_the_target(renderer, items):
    tok = renderer.tokenizer
    for item in items[:3]:
        ex = D.build_example(renderer, item)
        query = server_query(item)
        assert query.mode == "diagnosis" and query.kpis and query.model == ""
        messages = build_messages(query)
        assert "Reply with one JSON object only" in messages[0]["content"]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        assert list(ex.input_ids[: ex.n_prompt]) == prompt
        labels = ex.labels
        assert len(labels) == len(ex.input_ids)
        assert all(x == -100 for x in labels[: ex.n_prompt])
        assert labels[ex.n_prompt :] == list(ex.input_ids[ex.n_prompt :]) and -100 not in labels[ex.n_prompt :]
        assert tok.decode(ex.input_ids[ex.n_prompt : -1]) == ex.target
        target_ids = ex.input_ids[ex.n_prompt :]
        assert tok.decode([target_ids[k] for k in ex.cause_tokens]).strip('"') == item.label  # weighted in the loss
        assert ex.input_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_cached_top_layer_loss_equals_the_full_models_masked_loss(tiny_dir, renderer, items):
    model = L._load_parent(tiny_dir).float()
    ex = D.build_example(renderer, items[1])
    n_bottom = model.config.num_hidden_layers - 1
    with torch.no_grad():
        nll, _ = L.target_nll(model, ex, L.bottom_states(model, ex, n_bottom), n_bottom)
        ref = model(torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels])).loss
    assert nll.item() == pytest.approx(ref.item(), rel=1e-4)


def test_training_seeds_are_disjoint_from_dev_and_test():
    train, heldout = D.training_split(40, 7)
    dev, test = build_splits(70, 200)
    seeds = {i.seed for i in train + heldout}
    assert len(seeds) == 47 and not seeds & {i.seed for i in dev + test}
    assert not {i.item_id for i in train} & {i.item_id for i in heldout}
    D.assert_disjoint_from_eval(train)
    for set_seed in (DEV_SEED, TEST_SEED):
        with pytest.raises(AssertionError, match="DEV|TEST"):
            D.assert_disjoint_from_eval(build_dataset(3, set_seed))


def test_the_adapter_is_a_recipe_built_like_the_others():
    assert RECIPE.method == "lora" and RECIPE.is_adapter and RECIPE.parent == "smollm2"
    settings = L.TrainSettings.of(RECIPE, 0, RECIPE.calib_items, RECIPE.heldout_items)
    # the committed adapter was trained with these settings: the recipe rebuilds it
    committed = read_manifest(PACKAGED_DIR)
    assert {k: v for k, v in dataclasses.asdict(settings).items() if k in committed["request"]["settings"]} \
        == committed["request"]["settings"]
    assert (settings.rank, settings.alpha) == (committed["rank"], committed["lora_alpha"])
    assert list(settings.target_modules) == committed["target_modules"]


def _tiny_recipe():
    return RECIPE.with_params(top_layers=1, epochs=1, accum=2, warmup_steps=1)


def test_tiny_build_is_deterministic_and_writes_a_peft_adapter_with_manifest(tmp_path, tiny_dir):
    shas = []
    for k in range(2):
        path = build_variant(_tiny_recipe(), calib_items=4, heldout_items=1, models_dir=tmp_path / f"m{k}",
                             parent_dir=tiny_dir, show_progress=False)  # fmt: skip
        shas.append(hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest())
    manifest = load_variant_manifest(NAME, tmp_path / "m1")
    assert shas[0] == shas[1]
    assert manifest["method"] == "lora" and manifest["parent"] == tiny_dir.name and manifest["rank"] == RECIPE.params["rank"]
    assert manifest["training"]["steps"] == 2 and manifest["data"]["train_items"] == 4
    assert manifest["layers"] == [1] and manifest["adapter_bytes"] == (path / "adapter_model.safetensors").stat().st_size
    assert manifest["files_sha256"]["adapter_model.safetensors"] == shas[1]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == RECIPE.params["rank"]
    assert config["base_model_name_or_path"] == tiny_dir.name  # a name, not this machine's path
    # reused when asked again with the same settings
    again = build_variant(_tiny_recipe(), calib_items=4, heldout_items=1, models_dir=tmp_path / "m1",
                          parent_dir=tiny_dir, show_progress=False)  # fmt: skip
    assert load_variant_manifest(NAME, again.parent)["build_seconds"] == manifest["build_seconds"]


def test_cli_builds_and_exports_the_adapter_like_any_recipe(tmp_path, tiny_dir, monkeypatch):
    from dataclasses import replace

    from typer.testing import CliRunner

    from airan.factory.cli import app
    from airan.factory.variants.build import all_names

    # `all` retrains no committed adapter; naming it does
    assert NAME not in all_names() and set(all_names()) == set(RECIPES) - {NAME}
    monkeypatch.setenv("AIRAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(RECIPES, NAME, replace(_tiny_recipe(), parent=str(tiny_dir)))
    result = CliRunner().invoke(app, ["build", NAME, "--calib-items", "4", "--heldout-items", "1",
                                      "--export", str(tmp_path / "adapters")])  # fmt: skip
    assert result.exit_code == 0, result.output
    exported = tmp_path / "adapters" / NAME
    assert sorted(p.name for p in exported.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "manifest.json"]
    manifest = read_manifest(exported)
    assert manifest["request"]["calib_items"] == 4 and manifest["data"]["train_items"] == 4
    assert manifest["rebuild_command"].startswith(f"airan model build {NAME} --seed 0 --calib-items 4 --heldout-items 1")


def test_committed_adapter_matches_its_manifest_and_the_current_prompt():
    from safetensors import safe_open

    path = PACKAGED_DIR
    manifest = read_manifest(path)
    assert manifest is not None, f"{path}: missing or incomplete; rebuild with the manifest's rebuild_command"
    assert manifest["rank"] <= load_config().engine.max_lora_rank
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in keys}
    assert layers == set(manifest["layers"])
    assert {k.split(".")[-3] for k in keys} == set(manifest["target_modules"])
    assert manifest["data"]["train_set_seed"] not in (DEV_SEED, TEST_SEED)
    # the adapter learnt this system prompt: a new one needs `airan model build smollm2-netops-lora --force`
    system = build_messages(server_query(build_dataset(1, D.TRAIN_SET_SEED)[0]))[0]["content"]
    assert manifest["system_prompt_sha256"] == hashlib.sha256(system.encode()).hexdigest()


def test_default_config_serves_the_committed_adapter_beside_its_parent():
    config = load_config()
    spec = config.model(NAME)
    assert spec.is_adapter and spec.parent == SMOLLM2_NAME
    assert Path(spec.path) == PACKAGED_DIR
    assert any(NAME in r.adapters for r in config.replicas)


def test_relative_model_paths_resolve_beside_the_config_file(tmp_path, tiny_dir):
    from airan.store.registry import describe, materialize

    adapter = write_random_lora(tiny_dir, tmp_path / "adapters" / "a")
    (tmp_path / "conf").mkdir()
    cfg = tmp_path / "conf" / "c.yaml"
    cfg.write_text(json.dumps({
        "sites": [{"id": "bs-01"}],
        "models": [{"name": "t", "source": "tiny-random"},
                   {"name": "a", "source": "local", "path": "../adapters/a", "method": "lora", "parent": "t"},
                   {"name": "h", "source": "local", "path": "~/somewhere"}],
    }))  # fmt: skip
    config = load_config(cfg)
    assert Path(config.model("a").path) == adapter.resolve()
    assert str(config.model("h").path) == "~/somewhere"  # home-relative stays as written
    facts = describe(materialize(config.model("a")))
    assert facts["format"] == "safetensors" and facts["parameters"] > 0 and "LoRA" in facts["architecture"]


# --- slow: the committed adapter on a real stack ---------------------------------------

# the adapter answers these 14 DEV items (2 per cause) at least as well as the base
DEV_SUBSET = 14
MIN_MARGIN = 0.0


@pytest.mark.slow
async def test_adapter_is_served_where_it_is_held_and_beats_the_base_on_dev():
    from airan.client import AsyncAiranClient
    from airan.evaluation.runner import ask_request
    from airan.stack import LocalStack

    items = build_dataset(DEV_SUBSET, DEV_SEED, "dev")
    async with LocalStack(A.stack_config(n_sites=2, holders=1)) as plane:
        async with AsyncAiranClient(plane.address) as client:
            replicas = {r.site_id: r.replica_id for r in (await client.replicas()).replicas}
            assert sorted(replicas) == ["bs-01", "bs-02"]  # only bs-01's replica holds the adapter
            for k, item in enumerate(items[:3]):
                request = ask_request(item, True, model=NAME)
                if k == 0:  # even when the controller prefers the site without it
                    request.site_ids.append("bs-02")
                r = await client.ask(request, timeout_s=300)
                assert (r.site_id, r.replica_id, r.model) == ("bs-01", replicas["bs-01"], NAME)
                assert r.HasField("diagnosis") and set(r.diagnosis.affected_cell_ids) <= set(item.context_cells)
        base, adapter = (await A.compare_on(plane.address, items))[0]
    assert adapter.validity == 1.0 and adapter.cells_outside_context == 0
    assert adapter.macro_f1 >= base.macro_f1 + MIN_MARGIN, (base.macro_f1, adapter.macro_f1)
