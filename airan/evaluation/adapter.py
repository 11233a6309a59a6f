"""A LoRA adapter against its base, through the real gRPC path (`airan eval adapter`).

One stack serves SmolLM2 with the adapter on the first replica(s); the same
labelled items are asked in DIAGNOSIS mode of the base, then of the adapter.
"""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from airan.config import AiranConfig, parse_config
from airan.evaluation.queries import MAX_MODEL_LEN
from airan.evaluation.runner import run_eval
from airan.stack import LocalStack
from airan.store.registry import SMOLLM2_NAME, packaged_adapter_dir

DEFAULT_ADAPTER = "smollm2-netops-lora"


def stack_config(adapter_path: Path | None = None, n_sites: int = 1, holders: int = 1, port: int = 0,
                 kv_cache_gb: float = 1.0, max_num_seqs: int = 8) -> AiranConfig:  # fmt: skip
    """SmolLM2 on `n_sites` sites (one replica each, the cores split among them); the first
    `holders` replicas also hold the adapter (default: the committed smollm2-netops-lora, served
    under its directory's name), so one replica serves base and adapter requests."""
    adapter = Path(adapter_path or packaged_adapter_dir(DEFAULT_ADAPTER)).resolve()
    rank = json.loads((adapter / "adapter_config.json").read_text())["r"]
    cores = len(os.sched_getaffinity(0))
    sites = [{"id": f"bs-{k + 1:02d}", "cpus": max(1, cores // n_sites), "memory_gb": 8} for k in range(n_sites)]
    return parse_config({
        "sites": sites,
        "models": [
            {"name": SMOLLM2_NAME, "source": "smollm2", "dtype": "bfloat16", "max_model_len": MAX_MODEL_LEN},
            {"name": adapter.name, "source": "local", "path": str(adapter), "method": "lora", "parent": SMOLLM2_NAME},
        ],
        "replicas": [{"site": site["id"], "model": SMOLLM2_NAME, **({"adapters": [adapter.name]} if k < holders else {})}
                     for k, site in enumerate(sites)],
        "engine": {"kv_cache_gb": kv_cache_gb, "max_num_seqs": max_num_seqs, "max_lora_rank": rank},
        "server": {"host": "127.0.0.1", "port": port, "grace_s": 1, "default_model": SMOLLM2_NAME},
    })  # fmt: skip


async def compare_on(address: str, items, *, adapter: str = DEFAULT_ADAPTER, concurrency: int = 4,
                     timeout_s: float = 600.0, progress=None):  # fmt: skip
    """(base report, adapter report, their predictions, run facts) in DIAGNOSIS mode, one model after the other."""
    reports, predictions, meta = [], {}, {}
    for label, model in (("base " + SMOLLM2_NAME, SMOLLM2_NAME), ("adapter " + adapter, adapter)):
        result = await run_eval(items, [], ["diagnosis"], address=address, concurrency=concurrency, model=model,
                                timeout_s=timeout_s, progress=progress)  # fmt: skip
        reports.append(replace(result.reports[0], method=label))
        predictions[label] = result.predictions["diagnosis"]
        meta[label] = result.meta
    return reports, predictions, meta


async def compare(items, adapter_path: Path | None = None, **kwargs):
    """Start a one-site stack whose replica holds base + adapter, and score both on `items`."""
    config = stack_config(adapter_path)
    adapter = next(m.name for m in config.models if m.is_adapter)
    async with LocalStack(config) as plane:
        return await compare_on(plane.address, items, adapter=adapter, **kwargs)
