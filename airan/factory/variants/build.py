"""`airan model build`: make a variant directory from its parent, with a manifest.

A build is deterministic for (recipe, parent weights, seed, calibration
size): the calibration prompts come from the simulator at that seed, every
choice is a stable sort, and torch runs on the CPU. `buildonce.build_once`
builds it in a temporary directory beside the final one and renames it into
place with its manifest.json already inside, so readers never see half a
variant, and an existing variant is reused when its manifest records the same
request. A recipe of method `lora` trains an adapter (`lora.train_adapter`)
instead of transforming the parent's weights; everything else is the same.
"""
from __future__ import annotations

import json
import platform
import shutil
import time
from functools import partial
from pathlib import Path

from airan.config import ModelSpec
from airan.factory.buildonce import Steps, build_once, weights_sha256
from airan.factory.smollm2 import ModelPrepareError, prepare_smollm2
from airan.factory.variants import lora
from airan.factory.variants.calibration import (
    CALIBRATION_VERSION,
    CalibrationSet,
    calibration_set,
    perplexity,
    with_parent_answers,
)
from airan.factory.variants.hf import load_frozen
from airan.factory.variants.recipes import RECIPES, Recipe, get_recipe
from airan.store.registry import (
    MANIFEST,
    PACKAGED_ADAPTERS,
    SMOLLM2_NAME,
    ModelNotAvailable,
    describe,
    model_dir,
    models_root,
    packaged_adapter_dir,
    read_manifest,
)

# bump when a transform changes what it writes: older builds then stop matching and are rebuilt
FACTORY_VERSION = 2
CALIB_MAX_TOKENS = 1024  # the simulator's prompts are 300-820 SmolLM2 tokens: none is cut
# One torch thread by default: results are then bitwise repeatable (a GEMM may split its sums
# differently across threads), and on the shared 2-core machines two threads were 2-4x *slower*
# than one whenever other engineers' engines were busy (OpenMP barriers spin on a busy core).
# Training (lora) picks its own unless told: see lora._threads.
DEFAULT_THREADS = 1
# files of the parent that describe its weights, not the tokenizer: never copied
_NOT_COPIED = {"config.json", MANIFEST, "model.safetensors.index.json"}


class VariantBuildError(RuntimeError):
    """A build that cannot go on for a reason a person can fix; the message says which."""


def variant_dir(name: str, models_dir: Path | None = None) -> Path:
    return model_dir(name, models_dir)


def load_variant_manifest(name: str, models_dir: Path | None = None) -> dict | None:
    """The manifest of a complete build of `name`, or None."""
    return read_manifest(variant_dir(name, models_dir))


def variant_spec(name: str, models_dir: Path | None = None, **overrides) -> ModelSpec:
    """A config `ModelSpec` serving a built variant (source local, registry facts filled)."""
    manifest = load_variant_manifest(name, models_dir)
    if manifest is None:
        raise ModelNotAvailable(f"variant '{name}' is not built; run `airan model build {name}`")
    fields = {
        "name": name, "source": "local", "path": variant_dir(name, models_dir), "dtype": "bfloat16",
        "format": manifest["format"], "parameters": manifest["parameters"],
        "weight_bytes": manifest["weight_bytes"], "parent": manifest["parent"], "method": manifest["method"],
    }  # fmt: skip
    fields.update(overrides)
    return ModelSpec(**fields)


def _resolve_parent(recipe: Recipe, parent_dir: Path | None, root: Path, threads: int,
                    show_progress: bool) -> tuple[str, Path]:  # fmt: skip
    if parent_dir is not None:
        return Path(parent_dir).name, Path(parent_dir)
    if recipe.parent in RECIPES:  # a variant of a variant: build (or reuse) the parent first
        return recipe.parent, build_variant(recipe.parent, models_dir=root, threads=threads, show_progress=show_progress)
    if recipe.parent == "smollm2":
        try:
            return SMOLLM2_NAME, prepare_smollm2(show_progress=show_progress)
        except ModelPrepareError as e:
            raise VariantBuildError(f"the parent SmolLM2 is not available: {e}") from None
    path = Path(recipe.parent).expanduser()
    if not (path / "config.json").is_file():
        raise VariantBuildError(f"parent '{recipe.parent}' is neither 'smollm2' nor a model directory")
    return path.name, path


def _storage_dtype(parent_config: dict):
    import torch

    name = parent_config.get("dtype") or parent_config.get("torch_dtype") or "bfloat16"
    return getattr(torch, name)


def _state_tensors(model, dtype, tied: bool, skip: set[str]) -> dict:
    out = {}
    for key, tensor in model.state_dict().items():
        if key in skip or (tied and key == "lm_head.weight"):
            continue
        out[key] = tensor.detach().to(dtype).contiguous()
    return out


def _copy_side_files(parent: Path, out: Path) -> None:
    for file in sorted(parent.iterdir()):
        if file.is_file() and file.name not in _NOT_COPIED and file.suffix != ".safetensors" \
                and not file.name.endswith(".manifest.json") and not file.name.startswith("."):  # fmt: skip
            shutil.copyfile(file, out / file.name)


# --- the build ------------------------------------------------------------------------

_PARENT_PPL: dict[tuple[str, str], float] = {}


def _request(recipe: Recipe, parent_name: str, parent: Path, seed: int, calib_items: int,
             heldout_items: int) -> dict:  # fmt: skip
    """What every build depends on; its manifest records it, and a build recording the same is reused."""
    return {
        "factory_version": FACTORY_VERSION,
        "variant": recipe.name,
        "method": recipe.method,
        "params": dict(recipe.params),
        "parent": parent_name,
        "parent_weights_sha256": weights_sha256(parent),
        "seed": seed,
        "calib_items": calib_items,
        "heldout_items": heldout_items,
    }


def build_variant(
    recipe: Recipe | str,
    *,
    seed: int = 0,
    calib_items: int | None = None,
    heldout_items: int | None = None,
    models_dir: Path | None = None,
    parent_dir: Path | None = None,
    force: bool = False,
    show_progress: bool = True,
    threads: int | None = None,
    parent_answers: bool = True,
) -> Path:
    """Build (or reuse) the variant; return its directory.

    calib_items / heldout_items default to the recipe's; threads to DEFAULT_THREADS (a lora
    recipe: what the machine's load allows, not recorded). parent_answers=False calibrates on
    the prompts alone (no vLLM run; the unit tests use it), which is recorded in the request.
    """
    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    calib_items = calib_items or recipe.calib_items
    heldout_items = heldout_items or recipe.heldout_items
    if calib_items < 1 or heldout_items < 1 or (threads is not None and threads < 1):
        raise VariantBuildError("calib_items, heldout_items and threads must be >= 1")
    root = models_root(models_dir)
    parent_name, parent = _resolve_parent(recipe, parent_dir, root, threads, show_progress)
    final = variant_dir(recipe.name, root)
    request = _request(recipe, parent_name, parent, seed, calib_items, heldout_items)
    if recipe.is_adapter:
        request |= lora.request_extras(parent)
        settings = lora.TrainSettings.of(recipe, seed, calib_items, heldout_items)
        build = partial(lora.train_adapter, recipe=recipe, s=settings, parent=parent, parent_name=parent_name,
                        threads=threads, show_progress=show_progress)  # fmt: skip
    else:
        request |= {"calibration_version": CALIBRATION_VERSION, "threads": threads or DEFAULT_THREADS,
                    "parent_answers": parent_answers}  # fmt: skip
        if recipe.method == "merge-lora":  # a retrained adapter is a new build
            request["adapter_sha256"] = weights_sha256(_adapter_dir(recipe))
        build = partial(_build_model, recipe=recipe, request=request, parent=parent, root=root,
                        show_progress=show_progress)  # fmt: skip

    def build_and_describe(work: Path) -> dict:
        return {**build(work), "path": str(final), "rebuild_command": _rebuild_command(recipe, request)}

    return build_once(final, request, build_and_describe, force=force)


def _rebuild_command(recipe: Recipe, request: dict) -> str:
    command = (f"airan model build {recipe.name} --seed {request['seed']} --calib-items {request['calib_items']} "
               f"--heldout-items {request['heldout_items']}")  # fmt: skip
    if "threads" in request:
        command += f" --threads {request['threads']}"
    if recipe.is_adapter:
        command += " --export airan/store/adapters"
    return command


def _build_model(work: Path, recipe: Recipe, request: dict, parent: Path, root: Path, show_progress: bool) -> dict:
    """Transform the parent into a model directory in `work`; return the manifest's facts."""
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(request["threads"])
    try:
        return _transform(work, recipe, request, parent, root, show_progress)
    finally:
        torch.set_num_threads(previous_threads)


def _transform(work: Path, recipe: Recipe, request: dict, parent: Path, root: Path, show_progress: bool) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    started = time.perf_counter()
    seed = request["seed"]
    torch.manual_seed(seed)
    heal_steps = int(recipe.params.get("heal_steps", 0))
    steps = Steps(recipe.name, 6 + (1 if heal_steps else 0) + (1 if request["parent_answers"] else 0), show_progress)
    parent_config = json.loads((parent / "config.json").read_text())
    store_dtype = _storage_dtype(parent_config)
    tied = bool(parent_config.get("tie_word_embeddings", False))

    with steps("calibration and held-out prompts from the simulator"):
        tokenizer = AutoTokenizer.from_pretrained(str(parent))
        calib = calibration_set(tokenizer, request["calib_items"], seed, split="calib", max_tokens=CALIB_MAX_TOKENS)
        heldout = calibration_set(tokenizer, request["heldout_items"], seed, split="heldout",
                                  max_tokens=CALIB_MAX_TOKENS)  # fmt: skip
    with steps(f"loading the parent {request['parent']} in float32"):
        model = load_frozen(parent)
        parent_parameters = sum(p.numel() for p in model.parameters())
    if request["parent_answers"]:
        with steps("the parent's answers to those prompts, served by vLLM (cached per parent)"):
            answers = root / ".calibration" / request["parent_weights_sha256"][:16]
            try:
                calib, heldout = with_parent_answers([calib, heldout], parent, answers, seed=seed,
                                                     show_progress=show_progress)  # fmt: skip
            except ImportError as e:
                raise VariantBuildError(
                    f"the parent's answers are generated with vLLM, which is not importable here ({e}); "
                    "install airan[cpu] (or airan[cuda])"
                ) from None
    with steps("parent perplexity on held-out simulator prompts and answers"):
        key = (request["parent_weights_sha256"], heldout.sha256())
        if key not in _PARENT_PPL:
            _PARENT_PPL[key] = perplexity(model, heldout)
        parent_ppl = _PARENT_PPL[key]

    ppl: dict[str, float] = {"parent": parent_ppl}
    with steps(f"{recipe.method} on {len(calib.token_ids)} calibration prompts ({calib.n_tokens} tokens)"):
        details, config_updates, quant_tensors, skip = _apply(recipe, model, calib, store_dtype, show_progress)
    if heal_steps:
        ppl["before_heal"] = perplexity(model, heldout)
        with steps(f"healing: {heal_steps} distillation steps"):
            from airan.factory.variants.structured import heal_  # torch at import, like every transform

            teacher = load_frozen(parent)
            details["heal"] = heal_(
                model, teacher, calib.token_ids, calib.loss_start, steps=heal_steps,
                lr=float(recipe.params.get("heal_lr", 5e-5)), seed=seed, show_progress=show_progress,
            )  # fmt: skip
            del teacher
    with steps("variant perplexity on held-out simulator prompts and answers"):
        ppl["variant"] = perplexity(model, heldout)
    parameters = sum(p.numel() for p in model.parameters())

    with steps(f"writing {recipe.format} into the model cache"):
        tensors = _state_tensors(model, store_dtype, tied, skip)
        tensors.update(quant_tensors)
        save_file(tensors, str(work / "model.safetensors"), metadata={"format": "pt"})
        config = {**parent_config, **config_updates}
        (work / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        _copy_side_files(parent, work)
        facts = describe(work)
    return {
        "name": recipe.name,
        "parent": request["parent"],
        "parent_path": str(parent),
        "method": recipe.method,
        "summary": recipe.summary,
        "parameters_recipe": dict(recipe.params),
        "format": recipe.format,
        "dtype": str(store_dtype).removeprefix("torch."),
        # logical parameters of the network (a packed int4 tensor stores 8 per element)
        "parameters": parameters,
        "parent_parameters": parent_parameters,
        "stored_elements": facts["parameters"],
        "weight_bytes": facts["weight_bytes"],
        "seed": seed,
        "calibration": calib.describe(),
        "heldout": {**heldout.describe(), "perplexity": {k: round(v, 4) for k, v in ppl.items()}},
        "details": details,
        "build_seconds": round(time.perf_counter() - started, 1),
        "step_seconds": steps.seconds,
        "versions": _versions(),
    }


def _apply(recipe: Recipe, model, calib: CalibrationSet, store_dtype, show_progress: bool):
    """Run the recipe's transform on `model`; (details, config updates, extra tensors, skipped keys)."""
    import torch

    p = recipe.params
    seqs = calib.token_ids
    if recipe.method in ("w8a8", "w4a16"):
        from airan.factory.variants import quantize as q

        bits, act_bits = (8, 8) if recipe.method == "w8a8" else (4, None)
        group_size = p.get("group_size") if bits == 4 else None
        q.check_group_size(model, group_size, bits)
        # W8A8 scales are float32 parameters in vLLM; int4 group scales take the activation dtype
        scale_dtype = torch.float32 if bits == 8 else store_dtype
        packed = q.quantize_model_(
            model, seqs, bits=bits, group_size=group_size, act_bits=act_bits,
            smooth_alpha=p.get("smooth_alpha"), damp=float(p.get("damp", 0.01)),
            scale_dtype=scale_dtype, show_progress=show_progress,
        )  # fmt: skip
        tensors = q.quantized_tensors(packed, bits=bits, scale_dtype=scale_dtype)
        skip = {f"{path}.weight" for path in packed}
        config = {"quantization_config": q.quantization_config(bits=bits, group_size=group_size, act_bits=act_bits)}
        details = {"quantized_linears": len(packed), "bits": bits, "activation_bits": act_bits,
                   "group_size": group_size, "smoothquant_alpha": p.get("smooth_alpha"),
                   "rounding": "gptq"}  # fmt: skip
        return details, config, tensors, skip
    if recipe.method == "wanda":
        from airan.factory.variants.wanda import wanda_prune_

        details = wanda_prune_(model, seqs, float(p.get("sparsity", 0.5)), show_progress=show_progress)
        return details, {}, {}, set()
    if recipe.method == "prune-mlp":
        from airan.factory.variants.structured import prune_mlp_

        details = prune_mlp_(
            model, seqs, float(p["keep_ratio"]), align=int(p.get("align", 32)),
            compensate=bool(p.get("compensate", True)), damp=float(p.get("damp", 0.01)),
            show_progress=show_progress,
        )  # fmt: skip
        return details, {"intermediate_size": model.config.intermediate_size}, {}, set()
    if recipe.method == "merge-lora":
        from peft import PeftModel

        adapter = _adapter_dir(recipe)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        if merged is not model:  # peft merges into the base modules in place
            raise VariantBuildError("peft returned a new model instead of merging in place")
        adapter_config = json.loads((adapter / "adapter_config.json").read_text())
        # an adapter trained for an older prompt merges fine but answers today's prompt badly: say so
        trained_for = lora.prompt_version_of(adapter)
        if trained_for is not None and not lora.is_current(adapter):
            Steps(recipe.name, 0, show_progress).say(
                f"      warning: adapter {adapter} was trained for prompt {trained_for}, the server renders "
                f"{lora.COMPACT_PROMPT_VERSION}: retrain it first with `airan model build {adapter.name} --force "
                "--export airan/store/adapters`", style="yellow")  # fmt: skip
        return {"adapter": recipe.params["adapter"], "rank": adapter_config["r"],
                "lora_alpha": adapter_config["lora_alpha"], "target_modules": sorted(adapter_config["target_modules"]),
                "adapter_prompt_version": trained_for}, {}, {}, set()  # fmt: skip
    if recipe.method == "drop-layers":
        from airan.factory.variants.structured import drop_layers_

        details = drop_layers_(model, seqs, int(p["n_drop"]))
        config = {"num_hidden_layers": model.config.num_hidden_layers}
        if isinstance(getattr(model.config, "layer_types", None), list):
            config["layer_types"] = model.config.layer_types
        return details, config, {}, set()
    raise VariantBuildError(f"unknown method {recipe.method!r}")


def _adapter_dir(recipe: Recipe) -> Path:
    """A merge recipe's adapter: a committed one by name (airan/store/adapters/), or a PEFT directory."""
    adapter = str(recipe.params.get("adapter"))
    for path in (packaged_adapter_dir(adapter), Path(adapter)):
        if (path / "adapter_config.json").is_file():
            return path
    raise VariantBuildError(f"adapter {adapter!r} is neither a committed adapter in {PACKAGED_ADAPTERS} "
                            "nor a PEFT adapter directory")  # fmt: skip


def _versions() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}  # fmt: skip


def all_names() -> list[str]:
    """What `airan model build all` builds: every recipe but those whose build ships with airan
    (a committed adapter in airan/store/adapters/ is retrained only when asked for by name)."""
    return [name for name in RECIPES if read_manifest(packaged_adapter_dir(name)) is None]


def build_all(names: list[str] | None = None, **kwargs) -> list[Path]:
    return [build_variant(RECIPES[n], **kwargs) for n in (names or all_names())]


def export(name: str, path: Path, dest: Path) -> Path:
    """Copy what the repository keeps of a build into `dest`: an adapter whole (DEST/<name>/,
    small, served as committed), a model variant its manifest only (DEST/<name>.json)."""
    dest = Path(dest)
    if get_recipe(name).is_adapter:
        target = dest / name
        target.mkdir(parents=True, exist_ok=True)
        for file in ("adapter_config.json", "adapter_model.safetensors", MANIFEST):
            shutil.copyfile(path / file, target / file)
        return target
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"{name}.json"
    target.write_text(json.dumps(read_manifest(path), indent=2, sort_keys=True) + "\n")
    return target
