"""Variant factory: quantised (W8A8, W4A16), structured-pruned and Wanda variants.

Fast tests run every transform on the generated tiny model; the slow ones
build (or reuse) the real SmolLM2 variants, serve each in vLLM in turn and
compare them with their parent.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import pytest
import torch

from airan.config import cache_dir
from airan.factory.tiny import ensure_tiny_model
from airan.factory.variants import RECIPES, build_variant, load_variant_manifest, variant_spec
from airan.store.registry import MANIFEST, TinyModelParams, describe, read_safetensors_header
from airan.factory.variants.calibration import calibration_set, perplexity
from airan.factory.variants.layerwise import LINEAR_NAMES, LayerwiseRunner, collect_input_stats
from airan.factory.variants.quantize import (
    SMOOTH_GROUPS,
    dequantize,
    gptq,
    pack_int32,
    quantize_rtn,
    smooth_layer_,
    symmetric_scale,
)
from airan.factory.variants.structured import drop_layers_, least_squares_down
from airan.factory.variants.wanda import wanda_mask

# resolved before any test points AIRAN_CACHE elsewhere: the real SmolLM2 and its variants live here
REAL_MODELS = cache_dir() / "models"
# prompts only (no vLLM answer run): the unit tests stay fast; the slow ones use the answers
TINY_CALIB = {"calib_items": 6, "heldout_items": 3, "parent_answers": False}


def _load(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _tiny_recipe(name: str, **params) -> object:
    recipe = RECIPES[name]
    return dataclasses.replace(recipe, name=name.replace("smollm2", "tiny"), params={**recipe.params, **params})


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRAN_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def tiny_parent(tiny_cache) -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="module")
def tiny_variants(tiny_cache, tiny_parent) -> dict[str, Path]:
    """Every recipe built from the tiny model (a 2-step heal keeps the pruning one quick, the
    adapter trains its one top layer for one epoch)."""
    from airan.factory.tiny import write_random_lora

    built = {}
    for name, recipe in RECIPES.items():
        extra = {"heal_steps": 2} if "heal_steps" in recipe.params else {}
        if recipe.method == "drop-layers":  # the tiny model has 2 layers
            extra["n_drop"] = 1
        if recipe.method == "merge-lora":
            extra["adapter"] = str(write_random_lora(tiny_parent, tiny_cache / "tiny-lora", seed=3))
        if recipe.method == "lora":
            extra.update(top_layers=1, epochs=1, accum=3, warmup_steps=1)
        built[name] = build_variant(
            _tiny_recipe(name, **extra), parent_dir=tiny_parent, show_progress=False, **TINY_CALIB
        )
    return built


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_parent):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_parent)


# --- calibration data -------------------------------------------------------------------


def test_calibration_comes_from_the_simulator_and_is_seeded(tiny_tokenizer):
    a = calibration_set(tiny_tokenizer, 6, seed=0)
    b = calibration_set(tiny_tokenizer, 6, seed=0)
    assert a.sha256() == b.sha256() and a.texts == b.texts
    assert calibration_set(tiny_tokenizer, 6, seed=1).sha256() != a.sha256()
    held = calibration_set(tiny_tokenizer, 6, seed=0, split="heldout")
    assert not set(held.texts) & set(a.texts)
    # alternately diagnosis and free-text prompts, each with simulated KPI context
    assert a.modes == ("diagnosis", "free_text") * 3
    assert any(a.cells) and all(c.startswith("bs-") for cells in a.cells for c in cells)
    assert all("Reply with one JSON object" in t for t in a.texts[0::2])
    assert not any("Reply with one JSON object" in t for t in a.texts[1::2])
    assert all("KPI context" in t or "Question:" in t for t in a.texts)
    for ids, start in zip(a.token_ids, a.loss_start):
        assert 1 <= start < len(ids)
    facts = a.describe()
    assert facts["items"] == 6 and facts["tokens"] == a.n_tokens and len(facts["sha256"]) == 64


def test_cached_parent_answers_are_appended_without_running_vllm(tiny_parent, tiny_tokenizer, tmp_path):
    from airan.factory.variants.calibration import with_parent_answers

    prompts = calibration_set(tiny_tokenizer, 2, seed=0)
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    fake = [[5, 6, im_end], [7, im_end]]
    (tmp_path / f"answers-{prompts.sha256()[:24]}.json").write_text(json.dumps({"answers": fake}))
    (answered,) = with_parent_answers([prompts], tiny_parent, tmp_path, show_progress=False)
    assert [a[len(p):] for a, p in zip(answered.token_ids, prompts.token_ids)] == [tuple(x) for x in fake]
    assert answered.answer_tokens == 5 and answered.loss_start == prompts.loss_start
    assert answered.sha256() != prompts.sha256() and answered.texts[1].endswith("<|im_end|>")


def test_layerwise_runner_reproduces_the_model(tiny_parent, tiny_tokenizer):
    model = _load(tiny_parent)
    data = calibration_set(tiny_tokenizer, 2, seed=0)
    runner = LayerwiseRunner(model, data.token_ids)
    for layer in runner.layers:
        runner.advance(layer)
    for ids, hidden in zip(data.token_ids, runner.hidden):
        with torch.no_grad():
            expected = model.model(torch.tensor([list(ids)])).last_hidden_state
        torch.testing.assert_close(model.model.norm(hidden), expected, atol=1e-5, rtol=1e-4)


# --- transforms ---------------------------------------------------------------------------


def _correlated_inputs(tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(tokens, dim // 4, generator=g) @ torch.randn(dim // 4, dim, generator=g)
    return base + 0.1 * torch.randn(tokens, dim, generator=g)


@pytest.mark.parametrize("bits, group_size", [(8, None), (4, 32)])
def test_gptq_beats_round_to_nearest_on_the_calibration_objective(bits, group_size):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 128, generator=g)
    x = _correlated_inputs(512, 128)
    gram = (x.T @ x).double()
    levels, scales = gptq(w, gram, bits, group_size, torch.float32)
    assert levels.dtype == torch.int8
    assert int(levels.min()) >= -(1 << (bits - 1)) and int(levels.max()) <= (1 << (bits - 1)) - 1
    assert scales.shape == (48, 128 // group_size if group_size else 1)

    def output_error(wq: torch.Tensor) -> float:
        return float(((x @ (w - wq).T) ** 2).sum())

    gs = group_size or 128
    rtn_scales = torch.stack([symmetric_scale(w[:, i : i + gs], bits, torch.float32) for i in range(0, 128, gs)], 1)
    rtn = torch.cat([quantize_rtn(w[:, i : i + gs], rtn_scales[:, i // gs], bits) for i in range(0, 128, gs)], 1)
    assert output_error(dequantize(levels, scales)) < 0.8 * output_error(dequantize(rtn.to(torch.int8), rtn_scales))


def test_int4_packing_matches_compressed_tensors():
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    g = torch.Generator().manual_seed(2)
    levels = torch.randint(-8, 8, (64, 96), generator=g, dtype=torch.int8)
    packed = pack_int32(levels, 4)
    assert packed.dtype == torch.int32 and packed.shape == (64, 12)
    torch.testing.assert_close(ct.unpack_from_int32(packed, 4, levels.shape), levels)
    torch.testing.assert_close(ct.pack_to_int32(levels, 4), packed)


def _unpack_int4(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of the pack-quantized layout: 8 unsigned nibbles per int32, lowest first, offset 8."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1)
    return (nibbles.reshape(shape[0], -1)[:, : shape[1]] - 8).to(torch.int8)


def test_int4_packing_round_trips():
    levels = torch.randint(-8, 8, (8, 64), generator=torch.Generator().manual_seed(5), dtype=torch.int8)
    torch.testing.assert_close(_unpack_int4(pack_int32(levels, 4), levels.shape), levels)


def test_smoothquant_leaves_the_layer_function_unchanged(tiny_parent, tiny_tokenizer):
    model = _load(tiny_parent)
    layer = model.model.layers[0]
    with torch.no_grad():  # give the norms something to divide
        layer.input_layernorm.weight.uniform_(0.5, 1.5)
    data = calibration_set(tiny_tokenizer, 2, seed=0)
    runner = LayerwiseRunner(model, data.token_ids)
    before = runner.forward(layer)
    stats = collect_input_stats(layer, LINEAR_NAMES, lambda: runner.forward(layer), absmax=True)
    scales = smooth_layer_(layer, {n: s.absmax for n, s in stats.items()}, alpha=0.5)
    assert set(scales) == {n for _, names in SMOOTH_GROUPS for n in names}
    assert any(float((s - 1).abs().max()) > 0.1 for s in scales.values())  # it did rescale
    for a, b in zip(before, runner.forward(layer)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_wanda_mask_keeps_exactly_half_of_each_row_by_score():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 64, generator=g)
    norm = torch.rand(64, generator=g)
    norm[5] = 0.0  # a dead channel: its weights score zero and go first
    keep = wanda_mask(w, norm, 0.5)
    assert (keep.sum(1) == 32).all()
    assert not keep[:, 5].any()
    score = w.abs() * norm
    for row in range(16):
        assert float(score[row][keep[row]].min()) >= float(score[row][~keep[row]].max())


def test_least_squares_refit_beats_dropping_columns():
    g = torch.Generator().manual_seed(4)
    x = _correlated_inputs(1024, 64, seed=4)
    w = torch.randn(16, 64, generator=g)
    gram = (x.T @ x).double()
    kept = torch.arange(0, 64, 2)
    plain = ((x @ w.T - x[:, kept] @ w[:, kept].T) ** 2).sum()
    refit = ((x @ w.T - x[:, kept] @ least_squares_down(w, gram, kept, damp=1e-4).T) ** 2).sum()
    assert refit < 0.5 * plain


def test_layer_drop_removes_the_least_influential_layers(tiny_cache, tiny_tokenizer):
    four = ensure_tiny_model("tiny-4l", TinyModelParams(num_hidden_layers=4))
    model = _load(four)
    data = calibration_set(tiny_tokenizer, 2, seed=0)
    info = drop_layers_(model, data.token_ids, n_drop=2)
    influence = info["block_influence"]
    assert len(info["dropped_layers"]) == 2 and info["num_hidden_layers"] == [4, 2]
    kept = [i for i in range(4) if i not in info["dropped_layers"]]
    assert max(influence[i] for i in info["dropped_layers"]) <= min(influence[i] for i in kept)
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    with torch.no_grad():
        out = model.generate(torch.tensor([list(data.token_ids[0][:20])]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 24


def test_layer_drop_recipe_builds_a_shallower_servable_model(tiny_cache):
    from airan.factory.variants import Recipe

    four = ensure_tiny_model("tiny-4l", TinyModelParams(num_hidden_layers=4))
    path = build_variant(Recipe("tiny-drop1", "drop-layers", {"n_drop": 1}), parent_dir=four,
                         show_progress=False, **TINY_CALIB)  # fmt: skip
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 3
    manifest = load_variant_manifest("tiny-drop1", path.parent)
    assert manifest["parameters"] < describe(four)["parameters"] and len(manifest["details"]["dropped_layers"]) == 1

    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and len(model.model.layers) == 3


# --- built tiny variants ------------------------------------------------------------------------


MANIFEST_FIELDS = (
    "name", "parent", "method", "parameters_recipe", "format", "parameters", "parent_parameters",
    "weight_bytes", "seed", "heldout", "files_sha256", "request", "rebuild_command", "build_seconds",
)  # fmt: skip


def test_every_variant_has_a_complete_manifest(tiny_variants, tiny_parent):
    for name, path in tiny_variants.items():
        manifest = json.loads((path / MANIFEST).read_text())
        missing = [k for k in MANIFEST_FIELDS if k not in manifest]
        assert not missing, f"{name}: {missing}"
        assert manifest["parent"] == tiny_parent.name and manifest["method"] == RECIPES[name].method
        assert manifest["parameters_recipe"].keys() == RECIPES[name].params.keys()
        assert manifest["request"]["seed"] == 0 and manifest["request"]["parent"] == tiny_parent.name
        assert manifest["weight_bytes"] == describe(path)["weight_bytes"] > 0
        assert manifest["files_sha256"].keys() == {f.name for f in path.glob("*.safetensors")}
        ppl = manifest["heldout"]["perplexity"]
        assert all(math.isfinite(v) and v > 1 for v in ppl.values())
        if RECIPES[name].is_adapter:  # trained on labelled simulator items; a PEFT adapter, served on its parent
            assert manifest["data"]["train_items"] == TINY_CALIB["calib_items"]
            assert manifest["data"]["heldout_items"] == TINY_CALIB["heldout_items"] and len(manifest["data"]["sha256"]) == 64
            assert (path / "adapter_config.json").is_file() and not (path / "config.json").exists()
            continue
        assert manifest["request"]["parent_answers"] is False
        assert manifest["calibration"]["source"] == "sims" and len(manifest["calibration"]["sha256"]) == 64
        assert manifest["calibration"]["items"] == TINY_CALIB["calib_items"]
        # the tokenizer and chat template came along
        assert (path / "tokenizer.json").is_file() and (path / "tokenizer_config.json").is_file()


def test_wanda_variant_is_half_zero_per_row_and_otherwise_the_parent(tiny_variants, tiny_parent):
    path = tiny_variants["smollm2-wanda50"]
    parent, pruned = _tensors(tiny_parent), _tensors(path)
    assert pruned.keys() == parent.keys()
    for key, tensor in pruned.items():
        if any(f".{n}.weight" in key for n in LINEAR_NAMES):
            zeros = (tensor == 0).sum(dim=1)
            assert (zeros == tensor.shape[1] // 2).all(), key
            kept = tensor != 0
            torch.testing.assert_close(tensor[kept], parent[key][kept])
        else:
            torch.testing.assert_close(tensor, parent[key])
    manifest = load_variant_manifest("tiny-wanda50", path.parent)
    assert manifest["details"]["sparsity"] == 0.5
    assert manifest["parameters"] == manifest["parent_parameters"]  # saved dense: not smaller


def test_mlp_pruned_variant_is_a_smaller_dense_llama(tiny_variants, tiny_parent):
    path = tiny_variants["smollm2-mlp50"]
    params = TinyModelParams()
    config = json.loads((path / "config.json").read_text())
    assert config["intermediate_size"] == params.intermediate_size // 2
    tensors = _tensors(path)
    assert tensors["model.layers.0.mlp.gate_proj.weight"].shape == (params.intermediate_size // 2, params.hidden_size)
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (params.hidden_size, params.intermediate_size // 2)
    removed = params.num_hidden_layers * 3 * params.hidden_size * (params.intermediate_size // 2)
    manifest = load_variant_manifest("tiny-mlp50", path.parent)
    assert manifest["parameters"] == manifest["parent_parameters"] - removed
    assert describe(path)["parameters"] == manifest["parameters"] == describe(tiny_parent)["parameters"] - removed
    assert manifest["details"]["heal"]["steps"] == 2
    assert 0 <= manifest["details"]["mean_relative_mlp_error"] < 1
    assert set(manifest["heldout"]["perplexity"]) == {"parent", "before_heal", "variant"}

    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


@pytest.mark.parametrize("name, bits", [("smollm2-w8a8", 8), ("smollm2-w4a16", 4)])
def test_quantised_checkpoint_is_what_vllm_loads(tiny_variants, tiny_parent, name, bits):
    path = tiny_variants[name]
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == ("int-quantized" if bits == 8 else "pack-quantized")
    tensors = _tensors(path)
    q = "model.layers.1.mlp.down_proj"
    out_f, in_f = TinyModelParams().hidden_size, TinyModelParams().intermediate_size
    if bits == 8:
        assert tensors[f"{q}.weight"].dtype == torch.int8 and tensors[f"{q}.weight"].shape == (out_f, in_f)
        assert tensors[f"{q}.weight_scale"].shape == (out_f, 1)
    else:
        group = RECIPES[name].params["group_size"]
        assert tensors[f"{q}.weight_packed"].shape == (out_f, in_f // 8)
        assert tensors[f"{q}.weight_scale"].shape == (out_f, in_f // group)
        assert tensors[f"{q}.weight_shape"].tolist() == [out_f, in_f]
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors  # tied, kept

    # vLLM's own parser picks its int8 / mixed-precision int4 schemes for these linears
    ct = pytest.importorskip("vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors")
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import (
        CompressedTensorsW8A8Int8,
        CompressedTensorsWNA16,
    )

    parsed = ct.CompressedTensorsConfig.from_config(json.loads(json.dumps(qc)))
    scheme = parsed.target_scheme_map["Linear"]
    chosen = parsed._get_scheme_from_parts(
        weight_quant=scheme["weights"], input_quant=scheme["input_activations"], format=scheme["format"], layer_name=q
    )
    assert isinstance(chosen, CompressedTensorsW8A8Int8 if bits == 8 else CompressedTensorsWNA16)


@pytest.mark.parametrize("name", ["smollm2-w8a8", "smollm2-w4a16"])
def test_quantised_weights_dequantise_to_a_model_close_to_the_parent(tiny_variants, tiny_parent, tiny_tokenizer, name):
    path = tiny_variants[name]
    tensors = _tensors(path)
    model = _load(tiny_parent)
    state = model.state_dict()
    for key in list(state):
        prefix = key.removesuffix(".weight")
        if f"{prefix}.weight_scale" in tensors:
            if f"{prefix}.weight_packed" in tensors:
                shape = torch.Size(tensors[f"{prefix}.weight_shape"].tolist())
                levels = _unpack_int4(tensors[f"{prefix}.weight_packed"], shape)
            else:
                levels = tensors[key]
            state[key] = dequantize(levels, tensors[f"{prefix}.weight_scale"].float())
        elif key in tensors:
            state[key] = tensors[key].float()  # norms carry the SmoothQuant scales
    model.load_state_dict(state)
    data = calibration_set(tiny_tokenizer, 3, seed=0, split="heldout")
    parent_ppl = perplexity(_load(tiny_parent), data)
    assert abs(perplexity(model, data) / parent_ppl - 1) < 0.05


def test_merged_lora_variant_computes_what_base_plus_adapter_computes(tiny_variants, tiny_parent, tiny_cache):
    from peft import PeftModel

    merged = _load(tiny_variants["smollm2-netops-merged"])
    manifest = load_variant_manifest(_tiny_recipe("smollm2-netops-merged").name, tiny_variants["smollm2-netops-merged"].parent)
    with_adapter = PeftModel.from_pretrained(_load(tiny_parent), manifest["parameters_recipe"]["adapter"]).eval()
    ids = torch.tensor([[1, 5, 9, 42, 7, 3, 11]])
    with torch.no_grad():
        expected, got, base = with_adapter(ids).logits, merged(ids).logits, _load(tiny_parent)(ids).logits
    assert not torch.allclose(expected, base, atol=1e-3)  # the random adapter does change the outputs
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=2e-2)  # stored in the parent's dtype
    assert manifest["request"]["adapter_sha256"] and manifest["details"]["rank"] == 8


def test_quantised_variants_take_fewer_bytes(tiny_variants, tiny_parent):
    parent = describe(tiny_parent)["weight_bytes"]
    w8 = describe(tiny_variants["smollm2-w8a8"])["weight_bytes"]
    w4 = describe(tiny_variants["smollm2-w4a16"])["weight_bytes"]
    assert w4 < w8 < parent
    assert describe(tiny_variants["smollm2-wanda50"])["weight_bytes"] == parent


def test_build_is_deterministic_and_reused(tiny_variants, tiny_parent, tmp_path):
    recipe = _tiny_recipe("smollm2-w4a16")
    first = tiny_variants["smollm2-w4a16"]
    manifest = load_variant_manifest(recipe.name, first.parent)
    mtime = (first / "model.safetensors").stat().st_mtime_ns

    assert build_variant(recipe, parent_dir=tiny_parent, show_progress=False, **TINY_CALIB) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt

    again = build_variant(recipe, parent_dir=tiny_parent, models_dir=tmp_path / "a", show_progress=False, **TINY_CALIB)
    other = load_variant_manifest(recipe.name, again.parent)
    assert other["files_sha256"] == manifest["files_sha256"]
    assert other["calibration"]["sha256"] == manifest["calibration"]["sha256"]

    seeded = build_variant(recipe, parent_dir=tiny_parent, models_dir=tmp_path / "b", seed=1,
                           show_progress=False, **TINY_CALIB)  # fmt: skip
    reseeded = load_variant_manifest(recipe.name, seeded.parent)
    assert reseeded["calibration"]["sha256"] != manifest["calibration"]["sha256"]
    assert reseeded["files_sha256"] != manifest["files_sha256"]
    # a different calibration size is a different build, replacing the old one in place
    bigger = build_variant(recipe, parent_dir=tiny_parent, models_dir=tmp_path / "b", seed=1,
                           show_progress=False, **{**TINY_CALIB, "calib_items": 7})  # fmt: skip
    assert bigger == seeded and load_variant_manifest(recipe.name, seeded.parent)["calibration"]["items"] == 7
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_variant_spec_serves_a_built_variant(tiny_variants):
    from airan.store.registry import ModelNotAvailable, materialize

    path = tiny_variants["smollm2-mlp50"]
    spec = variant_spec("tiny-mlp50", path.parent)
    assert spec.source == "local" and spec.path == path and spec.method == "prune-mlp"
    assert spec.parameters == describe(path)["parameters"] and spec.parent
    assert materialize(spec) == path.resolve()
    with pytest.raises(ModelNotAvailable, match="airan model build nope"):
        variant_spec("nope", path.parent)


def test_cli_build_and_list(tiny_cache, tiny_parent):
    from typer.testing import CliRunner

    from airan.factory.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["build", "smollm2-nope"])
    assert result.exit_code == 2 and "unknown variant" in result.output

    rows = _list_rows(runner)
    assert set(RECIPES) <= set(rows)
    from airan.store.registry import packaged_adapter_dir

    for name in RECIPES:  # each says how to build it, but for the committed adapter the default config serves
        if rows[name]["path"] == str(packaged_adapter_dir(name)):
            assert rows[name]["status"] == "ready" and RECIPES[name].is_adapter
        else:
            assert f"airan model build {name}" in rows[name]["status"]

    # a variant under a registry name (built here from the tiny model) shows as built
    build_variant(RECIPES["smollm2-wanda50"], parent_dir=tiny_parent, show_progress=False, **TINY_CALIB)
    row = _list_rows(runner)["smollm2-wanda50"]
    assert row["status"] == "ready" and row["params"] > 0  # the default config serves it as `source: variant`


def _list_rows(runner) -> dict[str, dict]:
    from airan.factory.cli import app

    result = runner.invoke(app, ["list", "--json"])
    assert result.exit_code == 0, result.output
    return {r["name"]: r for r in json.loads(result.output)}


# --- the real SmolLM2 variants (slow) -----------------------------------------------------------

# reduced builds, kept between runs, when `airan model build` has not made the real ones
TEST_BUILDS = REAL_MODELS / ".test-variants"
REDUCED = {"calib_items": 8, "heldout_items": 4}


@functools.cache
def _real_path(name: str) -> Path:
    """The parent or a variant: the real build when `airan model build` made one, else a reduced build."""
    if name == "parent":
        from airan.factory.smollm2 import prepare_smollm2

        return prepare_smollm2(models_dir=REAL_MODELS, show_progress=False)
    if load_variant_manifest(name, REAL_MODELS) is not None:
        return REAL_MODELS / name
    recipe = RECIPES[name]
    if recipe.params.get("heal_steps"):
        recipe = recipe.with_params(heal_steps=8)
    return build_variant(recipe, models_dir=TEST_BUILDS, show_progress=False, **REDUCED)


def _diagnosis_query():
    from airan.factory.variants.calibration import _as_airan_query, simulated_queries

    # an event explanation from a simulated city no calibration set uses
    q, t0 = next((q, t0) for q, t0 in simulated_queries(424_242) if q.kind == "event_explain")
    return _as_airan_query(q, t0, "diagnosis")


def _engine_rss_mib() -> float:
    import psutil

    return sum(p.memory_info().rss for p in psutil.Process().children(recursive=True)) / 2**20


async def _serve(path: Path) -> dict:
    """Start one engine, ask one diagnosis, stop it."""
    from airan.core.diagnosis import diagnosis_schema, parse_diagnosis
    from airan.serving.engine.protocol import GenerationParams
    from airan.serving.engine.vllm_engine import VllmEngine, VllmSettings
    from airan.core.prompting import PromptRenderer

    query = _diagnosis_query()
    prompt = PromptRenderer(path).render(query, 1024 - 256).token_ids
    # kv_cache_gb=1: the same 1 GiB KV cache as VLLM_CPU_KVCACHE_SPACE=1
    engine = VllmEngine(VllmSettings(model_path=path, max_model_len=1024, kv_cache_gb=1, max_num_seqs=4))
    await engine.start()
    try:
        rss = _engine_rss_mib()
        text = ""
        params = GenerationParams(max_tokens=256, json_schema=diagnosis_schema(query.context_cells))
        async for chunk in engine.generate(prompt, params, "diagnosis"):
            text += chunk.text_delta
    finally:
        await engine.shutdown()
    return {"text": text, "cells": query.context_cells, "rss_mib": rss,
            "diagnosis": _try(parse_diagnosis, text, query.context_cells)}  # fmt: skip


def _try(fn, *args):
    try:
        return fn(*args)
    except ValueError as e:  # InvalidDiagnosis: reported by the test that needs it
        return e


@functools.cache
def _served(name: str) -> dict:
    """One model (the parent or a variant) built if needed and served by its own engine, once per session."""
    import asyncio

    path = _real_path(name)
    result = asyncio.run(_serve(path)) | {"path": path}
    params = (load_variant_manifest(name, path.parent) or describe(path))["parameters"]
    print(f"\n{name}: {params / 1e6:.1f}M parameters, {describe(path)['weight_bytes'] / 1e6:.0f} MB, "
          f"engine RSS {result['rss_mib']:.0f} MiB\n  {result['text']}")  # fmt: skip
    return result


# Each test builds (reduced, kept between runs) and serves only the models it names, so no test's
# timeout covers another variant's work. On the 2-core CI machine a reduced build took 1-3 min and an
# engine's start plus one diagnosis about 1 min; 1,200 s leaves more than 2x.
REAL_TIMEOUT_S = 1200


# One real SmolLM2 build per kernel path vLLM takes: int8 W8A8 (oneDNN), int4 W4A16, and a dense smaller
# Llama (MLP-pruned). The other recipes reuse these paths (wanda50, netops-merged: dense at the parent's
# shape; drop10: fewer layers; netops-w4a16: W4A16 again); every recipe runs on the tiny model above, and
# benchmarks/bench_variants.py serves them all on the real model. CI measured 20+ min for all eight.
REAL_KERNEL_PATHS = ["smollm2-w8a8", "smollm2-w4a16", "smollm2-mlp50"]


@pytest.mark.slow
@pytest.mark.timeout(REAL_TIMEOUT_S)
@pytest.mark.parametrize("name", REAL_KERNEL_PATHS)
def test_real_variant_loads_in_vllm_and_answers_a_diagnosis(name):
    result = _served(name)
    assert not isinstance(result["diagnosis"], Exception), f"{result['diagnosis']}: {result['text']}"
    assert result["diagnosis"].cause
    manifest = load_variant_manifest(name, result["path"].parent)
    assert manifest["parent"] in ("smollm2-135m-instruct", *RECIPES) and manifest["request"]["parent_answers"]


@pytest.mark.slow
@pytest.mark.timeout(REAL_TIMEOUT_S)
@pytest.mark.parametrize("name", ["smollm2-mlp50"])
def test_real_pruned_variant_is_structurally_smaller(name):
    """A structural fact, not a speed: decode speed is compared side by side in benchmarks/bench_variants.py."""
    parent, pruned = _real_path("parent"), _real_path(name)
    manifest = load_variant_manifest(name, pruned.parent)
    assert manifest["parameters"] < 0.8 * describe(parent)["parameters"]
    assert describe(pruned)["parameters"] == manifest["parameters"]
    parent_cfg, pruned_cfg = (json.loads((p / "config.json").read_text()) for p in (parent, pruned))
    if manifest["method"] == "prune-mlp":  # a dense, smaller Llama: about half the MLP width, every layer kept
        assert pruned_cfg["intermediate_size"] <= parent_cfg["intermediate_size"] // 2 + 32
        assert pruned_cfg["num_hidden_layers"] == parent_cfg["num_hidden_layers"]
    else:
        assert pruned_cfg["num_hidden_layers"] == parent_cfg["num_hidden_layers"] - 10


@pytest.mark.slow
@pytest.mark.timeout(REAL_TIMEOUT_S)
@pytest.mark.parametrize("name", ["smollm2-w8a8", "smollm2-w4a16"])
def test_real_quantised_variant_takes_less_memory(name):
    """On disk and as loaded: vLLM reads these integer tensors as they are.

    Engine RSS is printed, not compared: oneDNN prepacks the int8 weights into its own buffers and the
    freed originals stay in the worker's heap (W8A8 showed the bf16 parent's 3.0 GiB over its processes,
    mostly libraries and the 1 GiB KV cache; W4A16 about 170 MiB lower). Memory is compared in
    benchmarks/bench_variants.py.
    """
    parent, variant = _real_path("parent"), _real_path(name)
    assert describe(variant)["weight_bytes"] < 0.7 * describe(parent)["weight_bytes"]
    header = read_safetensors_header(variant / "model.safetensors")
    quantised = [k for k, v in header.items() if k != "__metadata__" and v["dtype"] in ("I8", "I32")]
    assert len(quantised) >= 7 * 30  # every decoder linear of the 30 layers
