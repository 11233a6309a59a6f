"""smollm2-netops-lora: training items, loss masking, seed hygiene, the committed adapter, serving.

Fast tests build training examples with the generated tiny model's tokenizer
(same ChatML template shape as SmolLM2) and train a one-step adapter on it;
the slow ones serve the committed adapter beside SmolLM2 on a real stack.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from airan.config import load_config
from airan.core.diagnosis import diagnosis_schema, parse_diagnosis
from airan.evaluation.dataset import DEV_SEED, LABELS, TEST_SEED, build_dataset, build_splits
from airan.factory.tiny import ensure_tiny_model, write_random_lora
from airan.factory.variants import lora_netops as L
from airan.core.prompting import PromptRenderer, build_messages


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="module")
def renderer(tiny_dir) -> PromptRenderer:
    return PromptRenderer(tiny_dir)


@pytest.fixture(scope="module")
def items():
    train, _ = L.training_split(len(LABELS), 0)
    return train  # one item per label


def test_targets_are_valid_compact_diagnoses_for_the_items_context(items):
    assert [i.label for i in items] == list(LABELS)
    schema_keys = list(diagnosis_schema([])["properties"])
    for item in items:
        text = L.target_json(item)
        d = parse_diagnosis(text, item.context_cells)
        assert d.cause == item.label and d.affected_cell_ids == item.affected_cells
        raw = json.loads(text)
        assert list(raw) == schema_keys  # the order xgrammar decodes in
        assert json.dumps(raw, separators=(",", ":"), ensure_ascii=False) == text  # no whitespace to spend tokens on
        assert [a.type for a in d.actions] == [k for k, _ in L.ACTIONS_BY_CAUSE[item.label]]
        if item.label != "NORMAL":  # the rationale cites the KPI that moved, on the affected cell
            assert L.KEY_KPI[item.label] in d.rationale and item.focus_cell in d.rationale


def test_prompt_is_the_servers_diagnosis_prompt_and_loss_covers_only_the_target(renderer, items):
    tok = renderer.tokenizer
    for item in items[:3]:
        ex = L.build_example(renderer, item)
        query = L.server_query(item)
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
    ex = L.build_example(renderer, items[1])
    n_bottom = model.config.num_hidden_layers - 1
    with torch.no_grad():
        nll, _ = L.target_nll(model, ex, L.bottom_states(model, ex, n_bottom), n_bottom)
        ref = model(torch.tensor([ex.input_ids]), labels=torch.tensor([ex.labels])).loss
    assert nll.item() == pytest.approx(ref.item(), rel=1e-4)


def test_training_seeds_are_disjoint_from_dev_and_test():
    train, heldout = L.training_split(40, 7)
    dev, test = build_splits(70, 200)
    seeds = {i.seed for i in train + heldout}
    assert len(seeds) == 47 and not seeds & {i.seed for i in dev + test}
    assert not {i.item_id for i in train} & {i.item_id for i in heldout}
    L.assert_disjoint_from_eval(train)
    for set_seed in (DEV_SEED, TEST_SEED):
        with pytest.raises(AssertionError, match="DEV|TEST"):
            L.assert_disjoint_from_eval(build_dataset(3, set_seed))


def test_tiny_build_is_deterministic_and_writes_a_peft_adapter_with_manifest(tmp_path, tiny_dir):
    settings = L.TrainSettings(train_items=4, heldout_items=1, top_layers=1, epochs=1, accum=2, warmup_steps=1)
    shas = []
    for k in range(2):
        path = L.build_adapter(settings, models_dir=tmp_path / f"m{k}", parent_dir=tiny_dir, show_progress=False)
        shas.append(hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest())
    manifest = L.load_manifest(path)
    assert shas[0] == shas[1]
    assert manifest["method"] == "lora" and manifest["parent"] == L.PARENT and manifest["rank"] == L.RANK
    assert manifest["training"]["steps"] == 2 and manifest["data"]["train_items"] == 4
    assert manifest["layers"] == [1] and manifest["adapter_bytes"] == (path / "adapter_model.safetensors").stat().st_size
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == L.RANK
    # reused when asked again with the same settings
    again = L.build_adapter(settings, models_dir=tmp_path / "m1", parent_dir=tiny_dir, show_progress=False)
    assert L.load_manifest(again)["build_seconds"] == manifest["build_seconds"]


def test_committed_adapter_matches_its_manifest_and_the_current_prompt():
    from safetensors import safe_open

    path = L.PACKAGED_DIR
    manifest = L.load_manifest(path)
    assert manifest is not None, f"{path}: missing or incomplete; rebuild with the manifest's rebuild_command"
    assert manifest["rank"] <= load_config().engine.max_lora_rank
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in keys}
    assert layers == set(manifest["layers"])
    assert {k.split(".")[-3] for k in keys} == set(manifest["target_modules"])
    assert manifest["data"]["train_set_seed"] not in (DEV_SEED, TEST_SEED)
    # the adapter learnt this system prompt: a new one needs `airan model build smollm2-netops-lora --force`
    system = build_messages(L.server_query(build_dataset(1, L.TRAIN_SET_SEED)[0]))[0]["content"]
    assert manifest["system_prompt_sha256"] == hashlib.sha256(system.encode()).hexdigest()


def test_default_config_serves_the_committed_adapter_beside_its_parent():
    config = load_config()
    spec = config.model(L.NAME)
    assert spec.is_adapter and spec.parent == L.PARENT
    assert Path(spec.path) == L.PACKAGED_DIR
    assert any(L.NAME in r.adapters for r in config.replicas)


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
    async with LocalStack(L.stack_config(n_sites=2, holders=1)) as plane:
        async with AsyncAiranClient(plane.address) as client:
            replicas = {r.site_id: r.replica_id for r in (await client.replicas()).replicas}
            assert sorted(replicas) == ["bs-01", "bs-02"]  # only bs-01's replica holds the adapter
            for k, item in enumerate(items[:3]):
                request = ask_request(item, True, model=L.NAME)
                if k == 0:  # even when the controller prefers the site without it
                    request.site_ids.append("bs-02")
                r = await client.ask(request, timeout_s=300)
                assert (r.site_id, r.replica_id, r.model) == ("bs-01", replicas["bs-01"], L.NAME)
                assert r.HasField("diagnosis") and set(r.diagnosis.affected_cell_ids) <= set(item.context_cells)
        base, adapter = (await L.compare_on(plane.address, items))[0]
    assert adapter.validity == 1.0 and adapter.cells_outside_context == 0
    assert adapter.macro_f1 >= base.macro_f1 + MIN_MARGIN, (base.macro_f1, adapter.macro_f1)
