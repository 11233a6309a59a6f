"""The trained NetOps model as a fresh machine serves it: the committed adapter merged into
SmolLM2 at prepare time, on the real stack (Ray replica, vLLM on CPU, gRPC on 127.0.0.1)."""
from __future__ import annotations

import pytest

from airan.config import load_config
from airan.factory.ensure import served_model_names
from airan.factory.variants import lora as L
from airan.store.registry import packaged_adapter_dir

TRAINED = "smollm2-netops-merged"
ADAPTER = "smollm2-netops-lora"


def test_default_config_serves_the_trained_model_everywhere():
    config = load_config(None)
    assert config.server.default_model == TRAINED
    assert {r.model for r in config.replicas} == {TRAINED}
    assert served_model_names(config) == [TRAINED]


def test_ensure_builds_only_what_the_cache_lacks_and_refuses_what_it_cannot_build(tmp_path, monkeypatch):
    from airan.config import parse_config
    from airan.factory.ensure import ensure_served_models
    from airan.store.registry import ModelNotAvailable

    monkeypatch.setenv("AIRAN_CACHE", str(tmp_path / "cache"))
    config = parse_config({
        "sites": [{"id": "bs-01", "cpus": 1}],
        "models": [{"name": "tiny-ensure", "source": "tiny-random", "dtype": "float32", "max_model_len": 256}],
        "replicas": [{"site": "bs-01", "model": "tiny-ensure"}],
    })  # fmt: skip
    said = []
    assert ensure_served_models(config, say=said.append) == ["tiny-ensure"]
    assert ensure_served_models(config, say=said.append) == []  # now in the cache: nothing to do
    missing = parse_config({
        "sites": [{"id": "bs-01", "cpus": 1}],
        "models": [{"name": "operator-model", "source": "local", "path": str(tmp_path / "nowhere")}],
        "replicas": [{"site": "bs-01", "model": "operator-model"}],
    })  # fmt: skip
    with pytest.raises(ModelNotAvailable, match="cannot build"):
        ensure_served_models(missing, say=said.append)


def test_a_merged_model_whose_adapter_changed_is_stale(tmp_path, monkeypatch):
    """A cache left from an older adapter must not be served: ensure merges again when the adapter's
    weights differ from those the cached merge recorded."""
    import dataclasses

    from airan.factory.ensure import stale_merge
    from airan.factory.tiny import ensure_tiny_model, write_random_lora
    from airan.factory.variants import RECIPES, build_variant

    tiny = ensure_tiny_model()
    monkeypatch.setenv("AIRAN_CACHE", str(tmp_path / "cache"))
    adapter = write_random_lora(tiny, tmp_path / "adapter", seed=1)
    name = "tiny-stale-merged"
    monkeypatch.setitem(RECIPES, name, dataclasses.replace(RECIPES[TRAINED], name=name, params={"adapter": str(adapter)}))
    assert stale_merge(name) is None  # not built: nothing stale (ensure builds it as missing)
    build_variant(name, calib_items=2, heldout_items=1, parent_dir=tiny, parent_answers=False, show_progress=False)
    assert stale_merge(name) is None and stale_merge("smollm2-w8a8") is None
    write_random_lora(tiny, adapter, seed=2)  # retrained
    assert "changed" in stale_merge(name)
    build_variant(name, calib_items=2, heldout_items=1, parent_dir=tiny, parent_answers=False, show_progress=False)
    assert stale_merge(name) is None  # merged again: the new adapter's digest recorded


def test_committed_adapter_learnt_the_prompt_the_server_renders():
    # a stale adapter would merge fine and answer badly: retrain it (one command) before serving
    assert L.is_current(packaged_adapter_dir(ADAPTER)), f"retrain: airan model build {ADAPTER} --force --export airan/store/adapters"


@pytest.mark.slow
@pytest.mark.timeout(1200)
async def test_trained_model_diagnoses_a_known_injected_congestion():
    from airan.client import AsyncAiranClient, build_request
    from airan.demo import injected_congestion
    from airan.evaluation.runner import stack_config
    from airan.factory.ensure import ensure_served_models
    from airan.stack import LocalStack
    from airan.v1 import netops_pb2 as pb

    config = stack_config([TRAINED])
    ensure_served_models(config)  # a fresh clone: prepare SmolLM2, merge the committed adapter
    event = injected_congestion(config)
    cell = event["cell_ids"][0]
    async with LocalStack(config) as plane, AsyncAiranClient(plane.address) as client:
        for priority in ("near_rt", "non_rt"):
            r = await client.ask(build_request(diagnosis=True, priority=priority, model=TRAINED, **event), timeout_s=300)
            d = r.diagnosis
            assert r.model == TRAINED
            assert pb.Cause.Name(d.cause) == "CAUSE_CONGESTION", (priority, d)
            assert cell in d.affected_cell_ids, (priority, d)
            # the playbook's action for congestion, aimed at a cell with its parameter
            assert d.actions and d.actions[0].type == pb.ACTION_OFFLOAD_TRAFFIC and d.actions[0].unit, d.actions
            assert pb.Cause.Name(d.detector_cause) == "CAUSE_CONGESTION"
