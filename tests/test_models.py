"""The model package: tiny generated model, registry, SmolLM2 preparation."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from airan.config import ModelSpec
from airan.models.registry import ModelNotAvailable, cached_models, describe, materialize
from airan.models.tiny import TinyModelParams, ensure_tiny_model, tiny_model_dir


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private model cache, so tests never touch the user's or each other's."""
    root = tmp_path / "cache"
    monkeypatch.setenv("AIRAN_CACHE", str(root))
    return root


def _tree_digest(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())}


# --- tiny model ----------------------------------------------------------------


def test_tiny_model_is_deterministic_for_a_seed(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRAN_CACHE", str(tmp_path / "a"))
    first = ensure_tiny_model()
    monkeypatch.setenv("AIRAN_CACHE", str(tmp_path / "b"))
    second = ensure_tiny_model()
    assert first.name == second.name
    assert _tree_digest(first) == _tree_digest(second)

    other_seed = ensure_tiny_model(params=TinyModelParams(seed=1))
    assert other_seed != second
    a = _tree_digest(second)
    b = _tree_digest(other_seed)
    assert a["model.safetensors"] != b["model.safetensors"]
    # the tokenizer does not depend on the weight seed
    assert a["tokenizer.json"] == b["tokenizer.json"]


def test_tiny_model_is_idempotent_and_atomic(cache):
    start = time.perf_counter()
    path = ensure_tiny_model("tiny-test")
    first_s = time.perf_counter() - start
    assert path == tiny_model_dir("tiny-test", TinyModelParams())
    assert path.parent == cache / "models"
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    start = time.perf_counter()
    again = ensure_tiny_model("tiny-test")
    second_s = time.perf_counter() - start
    assert again == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime  # not rewritten
    assert second_s < 0.5 and second_s < first_s
    assert first_s < 15
    # no temporary build directories left behind
    assert [p.name for p in (cache / "models").iterdir()] == [path.name]


def test_tiny_model_loads_with_transformers_and_renders_chat(cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_tiny_model()
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert config["max_position_embeddings"] >= 1024

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert 1000 < len(tokenizer) <= config["vocab_size"]
    assert tokenizer.eos_token == "<|im_end|>"
    generation = json.loads((path / "generation_config.json").read_text())
    assert tokenizer.eos_token_id in generation["eos_token_id"]

    conversation = [
        {"role": "system", "content": "You are a RAN operations assistant."},
        {"role": "user", "content": "Why is DRB.UEThpDl low on bs-01/c1?"},
    ]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a RAN operations assistant.<|im_end|>\n"
        "<|im_start|>user\nWhy is DRB.UEThpDl low on bs-01/c1?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without_prompt = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert not without_prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3
    assert tokenizer.decode(ids) == text  # byte-level BPE round-trips
    # the ops corpus taught it the KPI names: far fewer tokens than characters
    assert len(tokenizer("DRB.UEThpDl RRU.PrbUsedDl")["input_ids"]) <= 8

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), config["vocab_size"])
    assert torch.isfinite(logits).all()


def test_describe_reads_safetensors_headers(cache):
    path = ensure_tiny_model()
    facts = describe(path)
    params = TinyModelParams()
    config = json.loads((path / "config.json").read_text())
    h, inter, layers = params.hidden_size, params.intermediate_size, params.num_hidden_layers
    kv = params.num_key_value_heads * params.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    expected = config["vocab_size"] * h + layers * per_layer + h
    assert facts["parameters"] == expected
    assert facts["weight_bytes"] == expected * 4  # float32
    assert facts["dtype"] == "float32"
    assert facts["context_length"] == params.max_position_embeddings
    assert facts["architecture"] == "LlamaForCausalLM"


# --- registry --------------------------------------------------------------------


def test_materialize_tiny_random_generates_once(cache):
    spec = ModelSpec(name="tiny-llama", source="tiny-random", max_model_len=1024, dtype="float32")
    path = materialize(spec)
    assert (path / "config.json").is_file()
    assert materialize(spec) == path
    assert path in cached_models()
    # a longer context than the default asks for a different model
    longer = materialize(spec.model_copy(update={"max_model_len": 4096}))
    assert longer != path
    assert describe(longer)["context_length"] == 4096


def test_materialize_local_missing_path_says_what_to_do(tmp_path):
    spec = ModelSpec(name="site-model", source="local", path=tmp_path / "nope")
    with pytest.raises(ModelNotAvailable, match=r"site-model.*does not exist.*models\[\]\.path"):
        materialize(spec)


def test_materialize_local_without_config_or_weights(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotAvailable, match="no config.json"):
        materialize(ModelSpec(name="m", source="local", path=empty))
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelNotAvailable, match="no weight files"):
        materialize(ModelSpec(name="m", source="local", path=empty))


def test_materialize_local_accepts_a_model_dir(cache):
    tiny = ensure_tiny_model()
    assert materialize(ModelSpec(name="copy", source="local", path=tiny)) == tiny.resolve()
