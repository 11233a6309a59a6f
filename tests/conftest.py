"""Shared fixtures: configs for the real stack (tiny generated model, 127.0.0.1, free port)."""
from __future__ import annotations

import pytest

from airan.config import AiranConfig, parse_config


def tiny_stack_config(n_sites: int = 2, adapter_dir=None, **overrides) -> AiranConfig:
    """`n_sites` Ray site nodes, one tiny-model replica each, gRPC on a free 127.0.0.1 port.

    With `adapter_dir`, the last site's replica also holds the LoRA adapter `tiny-lora`.
    """
    sites = [
        {"id": f"bs-0{i + 1}", "cpus": 1, "latency_ms": {"xapp-test": 1.0 + 2 * i}} for i in range(n_sites)
    ]
    raw = {
        "sites": sites,
        "models": [{"name": "tiny-llama", "source": "tiny-random", "max_model_len": 512, "dtype": "float32"}],
        "replicas": [{"site": s["id"], "model": "tiny-llama"} for s in sites],
        "engine": {"kv_cache_gb": 0.25, "max_num_seqs": 8},
        "limits": {"max_tokens_limit": 256},
        # no /metrics port: stacks in one session may overlap (tests/test_metrics.py serves its own)
        "server": {"host": "127.0.0.1", "port": 0, "grace_s": 1, "metrics_port": 0},
    }
    if adapter_dir is not None:
        raw["models"].append(
            {"name": "tiny-lora", "source": "local", "path": str(adapter_dir), "method": "lora", "parent": "tiny-llama"}
        )
        raw["replicas"][-1]["adapters"] = ["tiny-lora"]
    raw.update(overrides)
    return parse_config(raw)


def prepare_tiny_models(config: AiranConfig) -> AiranConfig:
    """Generate the tiny models `config` names, as `airan model prepare tiny --config` does: the
    server only finds prepared models."""
    from airan.factory.tiny import ensure_tiny_model
    from airan.store.registry import tiny_params_for

    for spec in config.models:
        if spec.source == "tiny-random":
            ensure_tiny_model(spec.name, tiny_params_for(spec))
    return config


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> AiranConfig:
    from airan.factory.tiny import ensure_tiny_model, write_random_lora

    adapter = write_random_lora(ensure_tiny_model(), tmp_path_factory.mktemp("lora") / "tiny-lora")
    return prepare_tiny_models(tiny_stack_config(adapter_dir=adapter))
