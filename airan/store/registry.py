"""Turns a config `ModelSpec` into a directory vLLM can load, and describes it.

`materialize` is what replicas call before building an engine: it is cheap
when the model is already there and never downloads anything on its own
except generating the tiny model, which takes about a second.
"""
from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

from airan.config import ModelSpec, cache_dir
from airan.factory.tiny import TinyModelParams, ensure_tiny_model

# safetensors dtype codes -> the names the config and torch use
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")


class ModelNotAvailable(RuntimeError):
    """The model a spec names cannot be served yet; the message says what to do."""


def tiny_params_for(spec: ModelSpec) -> TinyModelParams:
    """Generation parameters of the tiny model a `tiny-random` spec asks for."""
    defaults = TinyModelParams()
    # "auto" has no meaning for generated weights; float32 is exact and fast on CPU
    dtype = spec.dtype if spec.dtype != "auto" else "float32"
    return TinyModelParams(
        max_position_embeddings=max(defaults.max_position_embeddings, spec.max_model_len),
        dtype=dtype,
    )


def materialize(spec: ModelSpec) -> Path:
    """Return a local HF-format directory for `spec`, or raise `ModelNotAvailable`."""
    if spec.source == "tiny-random":
        return ensure_tiny_model(spec.name, tiny_params_for(spec))
    if spec.source == "local":
        return _check_local_dir(spec.name, Path(spec.path).expanduser(), spec.is_adapter)
    if spec.source == "smollm2":
        from airan.factory.smollm2 import find_prepared_smollm2

        prepared = find_prepared_smollm2()
        if prepared is None:
            raise ModelNotAvailable(
                f"model '{spec.name}': SmolLM2 is not prepared in {cache_dir() / 'models'}; "
                "run `airan model prepare smollm2` (downloads ~93 MB once, converts in ~20 s)"
            )
        return prepared
    if spec.source == "variant":
        from airan.factory.variants import load_variant_manifest

        manifest = load_variant_manifest(spec.name)
        if manifest is None:
            raise ModelNotAvailable(
                f"model '{spec.name}': the variant is not built in {cache_dir() / 'models'}; "
                f"run `airan model build {spec.name}`"
            )
        return Path(manifest["path"])
    raise ModelNotAvailable(f"model '{spec.name}': unknown source '{spec.source}'")


def _check_local_dir(name: str, path: Path, adapter: bool = False) -> Path:
    path = path.resolve()
    if not path.exists():
        raise ModelNotAvailable(
            f"model '{name}': local path {path} does not exist; copy a Hugging Face model "
            "directory there (config.json, *.safetensors, tokenizer files) or fix models[].path "
            "in the config"
        )
    if not path.is_dir():
        raise ModelNotAvailable(f"model '{name}': local path {path} is a file, expected a model directory")
    if adapter:
        if not (path / "adapter_config.json").is_file():
            raise ModelNotAvailable(
                f"model '{name}': {path} has no adapter_config.json, so it is not a PEFT LoRA adapter "
                "directory; rebuild it with `airan model build` or fix models[].path"
            )
        return path
    if not (path / "config.json").is_file():
        raise ModelNotAvailable(
            f"model '{name}': {path} has no config.json, so it is not a Hugging Face model "
            "directory; point models[].path at the directory that holds config.json"
        )
    if not any(next(path.glob(pattern), None) for pattern in _WEIGHT_PATTERNS):
        raise ModelNotAvailable(
            f"model '{name}': {path} has config.json but no weight files (*.safetensors); "
            "the copy looks incomplete"
        )
    return path


def read_safetensors_header(file: Path) -> dict:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets)."""
    with open(file, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise ValueError(f"{file}: too short to be a safetensors file")
        (header_len,) = struct.unpack("<Q", raw_len)
        # a real header is a few MB at most; a huge value means a corrupt file
        if header_len > 100 * 1024 * 1024:
            raise ValueError(f"{file}: implausible safetensors header length {header_len}")
        return json.loads(f.read(header_len))


def describe(path: str | Path) -> dict:
    """Registry facts of a model directory, read without loading the weights."""
    path = Path(path)
    adapter = path / "adapter_config.json"
    if adapter.is_file() and not (path / "config.json").is_file():  # a PEFT LoRA adapter: no model config
        lora = json.loads(adapter.read_text())
        config = {"architectures": [f"LoRA adapter r={lora.get('r')} of {lora.get('base_model_name_or_path')}"]}
    else:
        config = json.loads((path / "config.json").read_text())
    # multimodal/wrapped configs keep the language model's settings in text_config
    text_config = config.get("text_config") or config
    parameters = 0
    weight_bytes = 0
    dtype_bytes: Counter[str] = Counter()
    files = sorted(path.glob("*.safetensors"))
    for file in files:
        for tensor_name, info in read_safetensors_header(file).items():
            if tensor_name == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            start, end = info["data_offsets"]
            parameters += count
            weight_bytes += end - start
            dtype_bytes[_SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"].lower())] += end - start
    return {
        "path": str(path),
        "format": "safetensors" if files else "unknown",
        "architecture": (config.get("architectures") or [None])[0],
        "parameters": parameters,
        "weight_bytes": weight_bytes,
        # the dtype holding most of the bytes (norms are sometimes kept wider)
        "dtype": dtype_bytes.most_common(1)[0][0] if dtype_bytes else config.get("dtype") or config.get("torch_dtype"),
        "context_length": text_config.get("max_position_embeddings"),
        "vocab_size": text_config.get("vocab_size"),
    }


def cached_models() -> list[Path]:
    """Model directories in the cache (complete ones only: temp builds are skipped)."""
    root = cache_dir() / "models"
    if not root.is_dir():
        return []
    return sorted(
        d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and (d / "config.json").is_file()
    )
