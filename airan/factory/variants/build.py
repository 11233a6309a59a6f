"""`airan model build`: make a variant directory from its parent, with a manifest.

A build is deterministic for (recipe, parent weights, seed, calibration
size): the calibration prompts come from the simulator at that seed, every
choice is a stable sort, and torch runs on the CPU. It goes into a temporary
directory beside the final one and is renamed into place with its
manifest.json already inside, so readers never see half a variant, and an
existing variant is reused when its manifest records the same request.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from airan.config import ModelSpec, cache_dir
from airan.factory.variants.calibration import CalibrationSet, calibration_set, perplexity, with_parent_answers
from airan.factory.variants.recipes import RECIPES, Recipe, get_recipe

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# bump when a transform changes what it writes: older builds then stop matching and are rebuilt
FACTORY_VERSION = 2
DEFAULT_HELDOUT_ITEMS = 16
CALIB_MAX_TOKENS = 1024  # the simulator's prompts are 300-820 SmolLM2 tokens: none is cut
# One torch thread by default: results are then bitwise repeatable (a GEMM may split its sums
# differently across threads), and on the shared 2-core machines two threads were 2-4x *slower*
# than one whenever other engineers' engines were busy (OpenMP barriers spin on a busy core).
DEFAULT_THREADS = 1
# files of the parent that describe its weights, not the tokenizer: never copied
_NOT_COPIED = {"config.json", MANIFEST, "airan_tiny.json", "model.safetensors.index.json"}


class VariantBuildError(RuntimeError):
    """A build that cannot go on for a reason a person can fix; the message says which."""


def models_root(models_dir: Path | None = None) -> Path:
    return models_dir or cache_dir() / "models"


def variant_dir(name: str, models_dir: Path | None = None) -> Path:
    return models_root(models_dir) / name


def load_variant_manifest(name: str, models_dir: Path | None = None) -> dict | None:
    """The manifest of a complete build of `name`, or None."""
    from airan.factory.smollm2 import _weights_complete

    path = variant_dir(name, models_dir)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("manifest_version") != MANIFEST_VERSION:
        return None
    if not _weights_complete(path, manifest.get("weight_bytes", -1)):
        return None
    return manifest


def variant_spec(name: str, models_dir: Path | None = None, **overrides) -> ModelSpec:
    """A config `ModelSpec` serving a built variant (source local, registry facts filled)."""
    from airan.store.registry import ModelNotAvailable

    manifest = load_variant_manifest(name, models_dir)
    if manifest is None:
        raise ModelNotAvailable(f"variant '{name}' is not built; run `airan model build {name}`")
    fields = {
        "name": name, "source": "local", "path": Path(manifest["path"]), "dtype": "bfloat16",
        "format": manifest["format"], "parameters": manifest["parameters"],
        "weight_bytes": manifest["weight_bytes"], "parent": manifest["parent"], "method": manifest["method"],
    }  # fmt: skip
    fields.update(overrides)
    return ModelSpec(**fields)


# --- steps ----------------------------------------------------------------------------


class _Steps:
    """Numbered step lines on stderr, like `airan model prepare`."""

    def __init__(self, name: str, total: int, enabled: bool) -> None:
        from rich.console import Console

        self.name, self.total, self.enabled, self.done = name, total, enabled, 0
        self.console = Console(stderr=True, highlight=False)
        self.seconds: dict[str, float] = {}

    def __call__(self, text: str):
        steps = self

        class _Step:
            def __enter__(self):
                steps.done += 1
                self.start = time.perf_counter()
                if steps.enabled:
                    steps.console.print(f"[bold]{steps.name} [{steps.done}/{steps.total}][/bold] {text} ...")

            def __exit__(self, *exc):
                elapsed = time.perf_counter() - self.start
                steps.seconds[text] = round(elapsed, 2)
                if steps.enabled and exc[0] is None:
                    steps.console.print(f"      done in {elapsed:.1f} s", style="dim")

        return _Step()


def _sha256_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in sorted(files):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            while chunk := f.read(4 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _resolve_parent(recipe: Recipe, parent_dir: Path | None, root: Path, threads: int,
                    show_progress: bool) -> tuple[str, Path]:  # fmt: skip
    if parent_dir is not None:
        return Path(parent_dir).name, Path(parent_dir)
    if recipe.parent in RECIPES:  # a variant of a variant: build (or reuse) the parent first
        return recipe.parent, build_variant(recipe.parent, models_dir=root, threads=threads, show_progress=show_progress)
    if recipe.parent == "smollm2":
        from airan.factory.smollm2 import SMOLLM2_NAME, ModelPrepareError, prepare_smollm2

        try:
            return SMOLLM2_NAME, prepare_smollm2(show_progress=show_progress)
        except ModelPrepareError as e:
            raise VariantBuildError(f"the parent SmolLM2 is not available: {e}") from None
    path = Path(recipe.parent).expanduser()
    if not (path / "config.json").is_file():
        raise VariantBuildError(f"parent '{recipe.parent}' is neither 'smollm2' nor a model directory")
    return path.name, path


def load_frozen(path: Path, dtype=None):
    """A Hugging Face causal LM in eval mode with gradients off (float32 unless `dtype`), quietly."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # SDPA: the layer-by-layer passes give no mask and rely on its causal flag
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, attn_implementation="sdpa")
    finally:
        hf_logging.set_verbosity(previous)
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


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


def _request(recipe: Recipe, parent_name: str, parent_sha: str, seed: int, calib_items: int,
             heldout_items: int, threads: int, parent_answers: bool) -> dict:  # fmt: skip
    from airan.factory.variants.calibration import CALIBRATION_VERSION

    return {
        "factory_version": FACTORY_VERSION,
        "calibration_version": CALIBRATION_VERSION,
        "threads": threads,
        "parent_answers": parent_answers,
        "variant": recipe.name,
        "method": recipe.method,
        "params": dict(recipe.params),
        "parent": parent_name,
        "parent_weights_sha256": parent_sha,
        "seed": seed,
        "calib_items": calib_items,
        "heldout_items": heldout_items,
    }


def build_variant(
    recipe: Recipe | str,
    *,
    seed: int = 0,
    calib_items: int | None = None,
    heldout_items: int = DEFAULT_HELDOUT_ITEMS,
    models_dir: Path | None = None,
    parent_dir: Path | None = None,
    force: bool = False,
    show_progress: bool = True,
    threads: int = DEFAULT_THREADS,
    parent_answers: bool = True,
) -> Path:
    """Build (or reuse) the variant; return its directory.

    parent_answers=False calibrates on the prompts alone (no vLLM run; the unit
    tests use it), which is recorded in the manifest's request.
    """
    import fcntl

    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    calib_items = calib_items or recipe.calib_items
    if calib_items < 1 or heldout_items < 1 or threads < 1:
        raise VariantBuildError("calib_items, heldout_items and threads must be >= 1")
    root = models_root(models_dir)
    root.mkdir(parents=True, exist_ok=True)
    parent_name, parent = _resolve_parent(recipe, parent_dir, root, threads, show_progress)
    parent_sha = _sha256_files(list(parent.glob("*.safetensors")))
    request = _request(recipe, parent_name, parent_sha, seed, calib_items, heldout_items, threads,
                       parent_answers)
    if recipe.method == "merge-lora":  # a retrained adapter is a new build
        request["adapter_sha256"] = _sha256_files(list(_adapter_dir(recipe).glob("*.safetensors")))

    def reusable() -> Path | None:
        manifest = load_variant_manifest(recipe.name, root)
        return variant_dir(recipe.name, root) if manifest and manifest.get("request") == request and not force else None

    if (done := reusable()) is not None:
        return done
    # one build per variant at a time; a second caller waits and then reuses the result
    with open(root / f".{recipe.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (done := reusable()) is not None:
                return done
            import torch

            previous_threads = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                return _build_locked(recipe, request, parent, root, show_progress)
            finally:
                torch.set_num_threads(previous_threads)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_locked(recipe: Recipe, request: dict, parent: Path, root: Path, show_progress: bool) -> Path:
    import torch
    from transformers import AutoTokenizer

    from airan.store.registry import describe

    started = time.perf_counter()
    seed = request["seed"]
    torch.manual_seed(seed)
    heal_steps = int(recipe.params.get("heal_steps", 0))
    steps = _Steps(recipe.name, 6 + (1 if heal_steps else 0) + (1 if request["parent_answers"] else 0), show_progress)
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
    config_updates: dict = {}
    quant_tensors: dict = {}
    skip: set[str] = set()
    details: dict = {}
    with steps(f"{recipe.method} on {len(calib.token_ids)} calibration prompts ({calib.n_tokens} tokens)"):
        details, config_updates, quant_tensors, skip = _apply(recipe, model, calib, store_dtype, show_progress)
    if heal_steps:
        ppl["before_heal"] = perplexity(model, heldout)
        with steps(f"healing: {heal_steps} distillation steps"):
            teacher = load_frozen(parent)
            from airan.factory.variants.structured import heal_

            details["heal"] = heal_(
                model, teacher, calib.token_ids, calib.loss_start, steps=heal_steps,
                lr=float(recipe.params.get("heal_lr", 5e-5)), seed=seed, show_progress=show_progress,
            )  # fmt: skip
            del teacher
    with steps("variant perplexity on held-out simulator prompts and answers"):
        ppl["variant"] = perplexity(model, heldout)
    parameters = sum(p.numel() for p in model.parameters())

    final = variant_dir(recipe.name, root)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{recipe.name}-", dir=root))
    try:
        with steps(f"writing {recipe.format} into the model cache"):
            from safetensors.torch import save_file

            tensors = _state_tensors(model, store_dtype, tied, skip)
            tensors.update(quant_tensors)
            save_file(tensors, str(work / "model.safetensors"), metadata={"format": "pt"})
            config = {**parent_config, **config_updates}
            (work / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            _copy_side_files(parent, work)
            facts = describe(work)
            manifest = {
                "manifest_version": MANIFEST_VERSION,
                "name": recipe.name,
                "path": str(final),
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
                "files_sha256": {f.name: _sha256_files([f]) for f in sorted(work.glob("*.safetensors"))},
                "request": request,
                "rebuild_command": f"airan model build {recipe.name} --seed {seed} "
                f"--calib-items {request['calib_items']} --heldout-items {request['heldout_items']} "
                f"--threads {request['threads']}",
                "build_seconds": round(time.perf_counter() - started, 1),
                "step_seconds": steps.seconds,
                "versions": _versions(),
            }
            (work / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        publish_dir(work, final)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return final


def publish_dir(work: Path, final: Path) -> None:
    """Move a finished build into place at once, replacing an older one; readable by Ray workers,
    which may run as another user."""
    os.chmod(work, 0o755)
    for file in work.iterdir():
        os.chmod(file, 0o644)
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
        os.rename(final, old / "v")
        shutil.rmtree(old, ignore_errors=True)
    os.rename(work, final)


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
        lora = json.loads((adapter / "adapter_config.json").read_text())
        return {"adapter": recipe.params["adapter"], "rank": lora["r"], "lora_alpha": lora["lora_alpha"],
                "target_modules": sorted(lora["target_modules"])}, {}, {}, set()  # fmt: skip
    if recipe.method == "drop-layers":
        from airan.factory.variants.structured import drop_layers_

        details = drop_layers_(model, seqs, int(p["n_drop"]))
        config = {"num_hidden_layers": model.config.num_hidden_layers}
        if isinstance(getattr(model.config, "layer_types", None), list):
            config["layer_types"] = model.config.layer_types
        return details, config, {}, set()
    raise VariantBuildError(f"unknown method {recipe.method!r}")


def _adapter_dir(recipe: Recipe) -> Path:
    from airan.factory.variants import lora_netops

    adapter = str(recipe.params.get("adapter"))
    if adapter == lora_netops.NAME:
        return lora_netops.PACKAGED_DIR
    if (Path(adapter) / "adapter_config.json").is_file():  # a PEFT adapter directory
        return Path(adapter)
    raise VariantBuildError(f"adapter {adapter!r} is neither {lora_netops.NAME} nor a PEFT adapter directory")


def _versions() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}  # fmt: skip


def build_all(names: list[str] | None = None, **kwargs) -> list[Path]:
    return [build_variant(RECIPES[n], **kwargs) for n in (names or list(RECIPES))]
