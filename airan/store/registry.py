"""Where prepared models live, and what a config `ModelSpec` resolves to.

The store only reads: `materialize` returns the directory of a model the
factory has already prepared (or a local directory the config names), and
raises `ModelNotAvailable` naming the command that makes it otherwise. It
imports no torch, transformers or factory code, so the server pays for none.

Every prepared model is a directory in the model cache holding its files and a
`manifest.json` (written by `airan.factory.buildonce` before the directory is
renamed into place, so a manifest means a complete build):

    cache_dir()/models/<name>-<key>/          airan model prepare tiny
    cache_dir()/models/smollm2-135m-instruct/ airan model prepare smollm2
    cache_dir()/models/<variant>/             airan model build <variant>
    airan/store/adapters/<adapter>/           committed LoRA adapters
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from airan.config import ModelSpec, cache_dir

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
SMOLLM2_NAME = "smollm2-135m-instruct"
# LoRA adapters that ship with the package (small; sites and CI serve them without training)
PACKAGED_ADAPTERS = Path(__file__).resolve().parent / "adapters"
# the fast diagnosis detector (LightGBM text model + manifest), rebuilt by `airan model build-detector`
PACKAGED_DETECTOR = Path(__file__).resolve().parent / "detector" / "netops-detector"

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


# --- where things live ---------------------------------------------------------------------


def models_root(models_dir: Path | None = None) -> Path:
    return Path(models_dir) if models_dir is not None else cache_dir() / "models"


def model_dir(name: str, models_dir: Path | None = None) -> Path:
    """Where the build of `name` (SmolLM2, a variant, an adapter) is published."""
    return models_root(models_dir) / name


def packaged_adapter_dir(name: str) -> Path:
    return PACKAGED_ADAPTERS / name


TinyDtype = Literal["float32", "bfloat16", "float16"]
_BYTE_TOKENS, _SPECIAL_TOKENS = 256, 4  # the tiny tokenizer: byte-level BPE + ChatML/pad specials


@dataclass(frozen=True)
class TinyModelParams:
    """Everything that determines a generated tiny model's files (and its directory name)."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    # fewer KV heads than query heads: grouped-query attention, like SmolLM2
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    vocab_size: int = 4096  # BPE target; the trained vocab may be a little smaller
    dtype: TinyDtype = "float32"
    seed: int = 0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        # vLLM's CPU attention backend supports head sizes from 32 up
        if self.head_dim < 32:
            raise ValueError(f"head_dim {self.head_dim} < 32 is not servable by vLLM on CPU")
        if self.max_position_embeddings < 1024:
            raise ValueError("max_position_embeddings must be >= 1024")
        if self.vocab_size < _BYTE_TOKENS + _SPECIAL_TOKENS:
            raise ValueError("vocab_size must cover the 256 byte tokens and the special tokens")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def key(self) -> str:
        """Short hash of the parameters: the directory name's suffix."""
        payload = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:10]


def tiny_params_for(spec: ModelSpec) -> TinyModelParams:
    """Generation parameters of the tiny model a `tiny-random` spec asks for."""
    defaults = TinyModelParams()
    # "auto" has no meaning for generated weights; float32 is exact and fast on CPU
    dtype = spec.dtype if spec.dtype != "auto" else "float32"
    return TinyModelParams(
        max_position_embeddings=max(defaults.max_position_embeddings, spec.max_model_len),
        dtype=dtype,
    )


def tiny_model_dir(name: str, params: TinyModelParams, models_dir: Path | None = None) -> Path:
    return models_root(models_dir) / f"{name}-{params.key()}"


# --- manifests -----------------------------------------------------------------------------


def read_manifest(path: Path) -> dict | None:
    """The manifest of the complete build in directory `path`, or None (absent, unreadable, of
    another manifest version, or with truncated weights)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("manifest_version") != MANIFEST_VERSION:
        return None
    if not weights_complete(Path(path), manifest.get("weight_bytes")):
        return None
    return manifest


def find_prepared_smollm2(models_dir: Path | None = None) -> Path | None:
    """The converted SmolLM2 directory if a complete preparation is there, else None."""
    path = model_dir(SMOLLM2_NAME, models_dir)
    return path if read_manifest(path) is not None and (path / "config.json").is_file() else None


def weights_complete(path: Path, expected_weight_bytes: int | None = None) -> bool:
    """Cheap truncation check: every safetensors file is as long as its header says, and the
    tensor bytes add up to `expected_weight_bytes` when that is given."""
    files = list(path.glob("*.safetensors"))
    if not files:
        return False
    total = 0
    for file in files:
        try:
            header = read_safetensors_header(file)
            with open(file, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
        except (OSError, ValueError):
            return False
        data_end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if file.stat().st_size != 8 + header_len + data_end:
            return False
        total += data_end
    return expected_weight_bytes is None or total == expected_weight_bytes


# --- resolving a spec ----------------------------------------------------------------------


def materialize(spec: ModelSpec) -> Path:
    """The local HF-format (or PEFT adapter) directory for `spec`; raise `ModelNotAvailable`,
    naming the command that prepares it, when it is not there. Never builds anything."""
    if spec.source == "tiny-random":
        path = tiny_model_dir(spec.name, tiny_params_for(spec))
        if read_manifest(path) is None:
            raise ModelNotAvailable(
                f"model '{spec.name}': the tiny test model is not generated in {models_root()}; "
                "run `airan model prepare tiny` (about a second; with --config for the config you serve)"
            )
        return path
    if spec.source == "local":
        return _check_local_dir(spec.name, Path(spec.path).expanduser(), spec.is_adapter)
    if spec.source == "smollm2":
        prepared = find_prepared_smollm2()
        if prepared is None:
            raise ModelNotAvailable(
                f"model '{spec.name}': SmolLM2 is not prepared in {models_root()}; "
                "run `airan model prepare smollm2` (downloads ~93 MB once, converts in ~20 s)"
            )
        return prepared
    if spec.source == "variant":
        path = model_dir(spec.name)
        if read_manifest(path) is None:
            raise ModelNotAvailable(
                f"model '{spec.name}': the variant is not built in {models_root()}; "
                f"run `airan model build {spec.name}`"
            )
        return path
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


# --- describing a directory ----------------------------------------------------------------


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
    root = models_root()
    if not root.is_dir():
        return []
    return sorted(
        d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and (d / "config.json").is_file()
    )


def packaged_detector():
    """The committed fast detector (`airan.core.detector.Detector`), or None where it was not built."""
    from airan.core.detector import MODEL_FILE, Detector

    if not (PACKAGED_DETECTOR / MODEL_FILE).is_file():
        return None
    return Detector.load(PACKAGED_DETECTOR)
