"""A tiny Llama-architecture model with random weights, generated locally.

It exercises the serving mechanics (vLLM load, chat templates, routing, KV
cache, streaming) in seconds without any model download. Its answers are
noise: use SmolLM2 (`airan model prepare smollm2`) for real text.

Weights come from numpy's seeded generator (stable across numpy/torch
versions) and the BPE tokenizer is trained on a fixed in-code corpus of
network-operations text, so the same parameters give byte-identical files.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from airan.config import cache_dir

# Bump when the generator's output changes for the same parameters, so old
# cache entries are not reused.
GENERATOR_VERSION = 1

BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [BOS_TOKEN, IM_START, IM_END, PAD_TOKEN]

# ChatML, as SmolLM2/Qwen use, so prompts built for the tiny model look like
# the real model's.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

TinyDtype = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class TinyModelParams:
    """Everything that determines the generated files (and the cache key)."""

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
        if self.vocab_size < len(SPECIAL_TOKENS) + 256:
            raise ValueError("vocab_size must cover the 256 byte tokens and the special tokens")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def cache_key(self) -> str:
        """Short hash of the parameters, the corpus and the generator version."""
        payload = json.dumps(
            {
                "params": dataclasses.asdict(self),
                "corpus": _corpus_sha256(),
                "template": CHATML_TEMPLATE,
                "generator": GENERATOR_VERSION,
            },
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:10]


# --- the tokenizer's training corpus ---------------------------------------

KPI_UNITS = {
    "DRB.UEThpDl": "kbit/s",
    "DRB.UEThpUl": "kbit/s",
    "RRU.PrbUsedDl": "PRBs",
    "RRU.PrbUsedUl": "PRBs",
    "RRU.PrbAvailDl": "PRBs",
    "RRU.PrbAvailUl": "PRBs",
    "RRU.PrbTotDl": "%",
    "RRU.PrbTotUl": "%",
    "RRC.ConnMean": "UEs",
    "RRC.ConnMax": "UEs",
    "DRB.MeanActiveUeDl": "UEs",
    "DRB.RlcSduDelayDl": "us",
    "DRB.AirIfDelayDl": "ms",
    "MM.HoExeInterReq": "handovers",
    "MM.HoExeInterSucc": "handovers",
    "MM.HoExeInterFail": "handovers",
    "PEE.AvgPower": "W",
}

_OPS_SENTENCES = [
    "The cell {cell} reports {kpi} at {value} {unit}, above its daily median.",
    "Downlink throughput on {cell} dropped to {value} kbit/s during the busy hour.",
    "PRB utilisation on {cell} reached {pct}% for {minutes} minutes.",
    "Handover failures between {cell} and {cell2} rose to {count} in the last interval.",
    "Traffic steering moved {count} UEs from {cell} to {cell2} to balance the load.",
    "Energy saving: switch off carrier {cell} at night when RRC.ConnMean is below {count}.",
    "The near-RT RIC xApp must answer within {ms} ms to stay inside the control loop.",
    "Non-RT rApps work on loops longer than one second; near-RT loops run from 10 ms to 1 s.",
    "Check the fronthaul link of {site} if DRB.AirIfDelayDl exceeds {ms} ms.",
    "An anomaly was detected on {cell}: {kpi} changed by {pct}% in {minutes} minutes.",
    "Recommend increasing the power of {cell} by {small} dB to improve coverage.",
    "Interference on {cell} is high; consider reducing the tilt by {small} degrees.",
    "The site {site} has {count} active UEs and average power {value} W.",
    "Alarm cleared on {site} after the radio unit restarted at {time}.",
    "Why is the throughput of {cell} low? Congestion, interference or a backhaul fault.",
    "Root cause: the PRB usage is saturated and the scheduler queues grow.",
    "Summarise the KPIs of {site} for the last hour and flag anything unusual.",
    "The RAN controller asked for a diagnosis of {cell} with {count} samples.",
    "Latency budget exceeded: the answer took {ms} ms, the loop allows {ms2} ms.",
    "Mobility robustness: too-late handovers from {cell} to {cell2} increased.",
    "Load on {cell} follows a daily cycle with a peak near {time} and a trough at night.",
    "Scale the AI replicas on {site} down: radio load leaves only {pct}% headroom.",
    "Report: {kpi}={value} {unit}, {kpi2}={value2} {unit2} on {cell}.",
    "The operator wants a short answer in JSON with fields cause, action and confidence.",
    "No fault found on {cell}; the KPIs are within their normal range.",
]

_OPS_WORDS = (
    "cell site carrier sector antenna radio unit distributed central fronthaul midhaul backhaul "
    "scheduler slice tenant policy intent controller xApp rApp RIC E2 A1 O1 O-RAN 3GPP gNB eNB "
    "UE uplink downlink throughput latency delay jitter loss retransmission HARQ BLER CQI MCS "
    "RSRP RSRQ SINR interference coverage capacity congestion outage alarm fault anomaly trend "
    "forecast baseline threshold median peak trough busy hour night energy power sleep mode "
    "handover mobility neighbour beam MIMO bandwidth spectrum PRB resource block numerology "
    "diagnosis root cause mitigation action recommendation confidence severity minor major critical"
).split()


def network_ops_corpus() -> list[str]:
    """Fixed corpus (same on every call) of network-operations text."""
    rng = random.Random(20240611)  # fixed: the corpus is part of the tokenizer's identity
    sites = [f"bs-{i:02d}" for i in range(1, 17)]
    cells = [f"{s}/c{c}" for s in sites for c in range(1, 4)]
    kpis = list(KPI_UNITS)
    lines: list[str] = []
    for _ in range(6000):
        kpi, kpi2 = rng.sample(kpis, 2)
        cell, cell2 = rng.sample(cells, 2)
        fields = {
            "cell": cell,
            "cell2": cell2,
            "site": cell.split("/")[0],
            "kpi": kpi,
            "unit": KPI_UNITS[kpi],
            "kpi2": kpi2,
            "unit2": KPI_UNITS[kpi2],
            "value": rng.choice([rng.randint(0, 999), rng.randint(1000, 250000), round(rng.uniform(0, 100), 2)]),
            "value2": rng.randint(0, 50000),
            "pct": rng.randint(0, 100),
            "count": rng.randint(0, 400),
            "minutes": rng.choice([1, 5, 10, 15, 30, 60]),
            "ms": rng.choice([1, 2, 5, 10, 20, 50, 100, 250, 500, 1000]),
            "ms2": rng.choice([10, 100, 1000]),
            "small": rng.randint(1, 6),
            "time": f"{rng.randint(0, 23):02d}:{rng.choice([0, 10, 20, 30, 40, 50]):02d}",
        }
        lines.append(rng.choice(_OPS_SENTENCES).format(**fields))
        # KPI sample rows as controllers send them
        lines.append(
            f"{cell} t={rng.randint(0, 86400)} {kpi}={fields['value']} {kpi2}={fields['value2']}"
        )
        lines.append(" ".join(rng.choices(_OPS_WORDS, k=rng.randint(4, 12))))
    return lines


@functools.lru_cache(maxsize=1)
def _corpus_sha256() -> str:
    return hashlib.sha256("\n".join(network_ops_corpus()).encode()).hexdigest()


# --- generation --------------------------------------------------------------


def train_tokenizer(params: TinyModelParams):
    """Byte-level BPE (no unknown tokens) trained on the ops corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=params.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(network_ops_corpus(), trainer=trainer)
    return tokenizer


def _tokenizer_config(tokenizer, params: TinyModelParams) -> dict:
    added = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok in SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": BOS_TOKEN,
        "eos_token": IM_END,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "clean_up_tokenization_spaces": False,
        "model_max_length": params.max_position_embeddings,
        "chat_template": CHATML_TEMPLATE,
    }


def _random_state_dict(params: TinyModelParams, vocab_size: int) -> dict[str, np.ndarray]:
    """Llama weights in HF naming; embeddings tied to the LM head."""
    rng = np.random.default_rng(params.seed)
    h, inter, hd = params.hidden_size, params.intermediate_size, params.head_dim

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(0.0, params.init_std, size=shape).astype(np.float32)

    state = {"model.embed_tokens.weight": normal(vocab_size, h)}
    for i in range(params.num_hidden_layers):
        p = f"model.layers.{i}."
        state[p + "self_attn.q_proj.weight"] = normal(params.num_attention_heads * hd, h)
        state[p + "self_attn.k_proj.weight"] = normal(params.num_key_value_heads * hd, h)
        state[p + "self_attn.v_proj.weight"] = normal(params.num_key_value_heads * hd, h)
        state[p + "self_attn.o_proj.weight"] = normal(h, params.num_attention_heads * hd)
        state[p + "mlp.gate_proj.weight"] = normal(inter, h)
        state[p + "mlp.up_proj.weight"] = normal(inter, h)
        state[p + "mlp.down_proj.weight"] = normal(h, inter)
        state[p + "input_layernorm.weight"] = np.ones(h, dtype=np.float32)
        state[p + "post_attention_layernorm.weight"] = np.ones(h, dtype=np.float32)
    state["model.norm.weight"] = np.ones(h, dtype=np.float32)
    return state


def _save_weights(state: dict[str, np.ndarray], dtype: TinyDtype, path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    tensors = {name: torch.from_numpy(array).to(torch_dtype).contiguous() for name, array in state.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def _model_config(params: TinyModelParams, vocab_size: int, special_ids: dict[str, int]) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": params.hidden_size,
        "intermediate_size": params.intermediate_size,
        "num_hidden_layers": params.num_hidden_layers,
        "num_attention_heads": params.num_attention_heads,
        "num_key_value_heads": params.num_key_value_heads,
        "head_dim": params.head_dim,
        "max_position_embeddings": params.max_position_embeddings,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": params.init_std,
        "bos_token_id": special_ids[BOS_TOKEN],
        "eos_token_id": special_ids[IM_END],
        "pad_token_id": special_ids[PAD_TOKEN],
        # "dtype" is read by transformers >= 4.56, "torch_dtype" by older releases
        "dtype": params.dtype,
        "torch_dtype": params.dtype,
        "use_cache": True,
    }


def write_tiny_model(params: TinyModelParams, out_dir: Path) -> None:
    """Write a complete HF model directory for `params` into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(params)
    vocab_size = tokenizer.get_vocab_size()
    special_ids = {tok: tokenizer.token_to_id(tok) for tok in SPECIAL_TOKENS}

    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(tokenizer, params))
    _write_json(
        out_dir / "special_tokens_map.json",
        {"bos_token": BOS_TOKEN, "eos_token": IM_END, "pad_token": PAD_TOKEN,
         "additional_special_tokens": [IM_START, IM_END]},
    )
    _write_json(out_dir / "config.json", _model_config(params, vocab_size, special_ids))
    _write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": special_ids[BOS_TOKEN],
            # stop at the end of an assistant turn or at end of text
            "eos_token_id": [special_ids[IM_END], special_ids[BOS_TOKEN]],
            "pad_token_id": special_ids[PAD_TOKEN],
        },
    )
    _save_weights(_random_state_dict(params, vocab_size), params.dtype, out_dir / "model.safetensors")
    _write_json(
        out_dir / "airan_tiny.json",
        {"generator_version": GENERATOR_VERSION, "params": dataclasses.asdict(params),
         "cache_key": params.cache_key()},
    )


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def tiny_model_dir(name: str, params: TinyModelParams) -> Path:
    return cache_dir() / "models" / f"{name}-{params.cache_key()}"


def ensure_tiny_model(name: str = "tiny-llama", params: TinyModelParams | None = None) -> Path:
    """Return the directory of the tiny model for `params`, generating it once.

    The model is built in a temporary sibling directory and renamed into
    place, so readers never see a half-written model and concurrent callers
    (several Ray actors starting at once) all end with the same directory.
    """
    params = params or TinyModelParams()
    final = tiny_model_dir(name, params)
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        write_tiny_model(params, tmp)
        # mkdtemp/safetensors create owner-only modes; the cache is shared with Ray workers
        os.chmod(tmp, 0o755)
        for file in tmp.iterdir():
            os.chmod(file, 0o644)
        try:
            os.rename(tmp, final)
        except OSError:
            # another process renamed its copy first; theirs is identical
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_random_lora(base_dir: Path, out_dir: Path, rank: int = 8, seed: int = 0) -> Path:
    """A PEFT-format LoRA adapter (q/v projections) with random weights for `base_dir`.

    For mechanics tests of adapter serving and routing, as the tiny model is for engines.
    """
    from safetensors.numpy import save_file

    config = json.loads((Path(base_dir) / "config.json").read_text())
    hidden = config["hidden_size"]
    head_dim = hidden // config["num_attention_heads"]
    out_features = {"q_proj": hidden, "v_proj": config["num_key_value_heads"] * head_dim}
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for proj, out in out_features.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = rng.normal(0, 0.02, (rank, hidden)).astype(np.float32)
            tensors[f"{prefix}.lora_B.weight"] = rng.normal(0, 0.02, (out, rank)).astype(np.float32)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    _write_json(
        out_dir / "adapter_config.json",
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": str(base_dir),
            "r": rank,
            "lora_alpha": 2 * rank,
            "lora_dropout": 0.0,
            "target_modules": list(out_features),
            "bias": "none",
            "fan_in_fan_out": False,
        },
    )
    return out_dir
