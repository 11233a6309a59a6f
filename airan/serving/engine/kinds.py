"""Which engine a replica holds: chosen by the config's `engine.kind`, built in one place.

Replica actors depend only on the `EngineClient` protocol. The pool asks `replica_engine()` on
the control plane for a picklable `EngineSpec` (the kind, that engine's own settings, the
environment of its actor), failing at startup when this install cannot run the kind; the actor
turns the spec into an engine with `build_engine()` on its site's node. Engine modules are
imported only when a kind is used, by name: vLLM is heavy, llama-cpp-python optional.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from airan.serving.engine.protocol import EngineClient, EngineUnavailableError


@dataclass(frozen=True)
class EngineKind:
    """Where an engine kind lives. `module` defines the engine class and two functions:
    `replica_settings(model, engine_config, model_path, adapters, cpu_ids)` -> the class's
    settings, and `replica_env(cpu_ids)` -> environment variables of the replica actor."""

    module: str
    engine_class: str
    # a module this kind needs beyond airan's own dependencies, and how to install it
    requires: str | None = None
    install: str = ""


ENGINE_KINDS: dict[str, EngineKind] = {
    "vllm": EngineKind("airan.serving.engine.vllm_engine", "VllmEngine"),
    "llamacpp": EngineKind("airan.serving.engine.llamacpp_engine", "LlamaCppEngine", requires="llama_cpp",
                           install="pip install 'airan[llamacpp]' (builds llama.cpp from source, ~5 min on 2 cores)"),
}  # fmt: skip


@dataclass(frozen=True)
class EngineSpec:
    """What a replica actor needs to build its engine (sent to it by Ray, so plain data)."""

    kind: str
    settings: object  # the engine module's own settings dataclass
    env: dict[str, str] = field(default_factory=dict)


def engine_kind(kind: str) -> EngineKind:
    """The registered kind, or a clear error when this install cannot run it."""
    try:
        spec = ENGINE_KINDS[kind]
    except KeyError:
        raise EngineUnavailableError(
            f"engine.kind {kind!r} is not an engine airan knows (known: {', '.join(ENGINE_KINDS)})"
        ) from None
    if spec.requires and importlib.util.find_spec(spec.requires) is None:
        raise EngineUnavailableError(
            f"engine.kind {kind!r} needs the Python module {spec.requires!r}, which is not installed "
            f"here: {spec.install}, or use engine.kind 'vllm'"
        )
    return spec


def replica_engine(engine, model, model_path: Path, adapters: tuple[tuple[str, str], ...] = (),
                   cpu_ids: list[int] | None = None) -> EngineSpec:  # fmt: skip
    """The `EngineSpec` of one replica from the typed config (EngineConfig + ModelSpec); raises
    `EngineUnavailableError` when the kind cannot run here or its GGUF is missing."""
    kind = engine_kind(engine.kind)
    module = importlib.import_module(kind.module)
    settings = module.replica_settings(model, engine, model_path, adapters, cpu_ids)
    return EngineSpec(engine.kind, settings, dict(module.replica_env(cpu_ids)))


def build_engine(spec: EngineSpec) -> EngineClient:
    """The one engine factory: the `EngineClient` of `spec.kind`, not started (`start()` loads it)."""
    kind = engine_kind(spec.kind)
    engine_class = getattr(importlib.import_module(kind.module), kind.engine_class)
    return engine_class(spec.settings)
