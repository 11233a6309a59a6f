"""Replicas hold an EngineClient; `engine.kind` picks the engine through one factory (no vLLM loaded here)."""
from __future__ import annotations

import ast
import asyncio
import json
import pickle
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import get_args

import pytest

from airan.config import EngineConfig, EngineKindName, ModelSpec, parse_config
from airan.serving.engine import kinds
from airan.serving.engine.kinds import ENGINE_KINDS, EngineKind, EngineSpec, build_engine, replica_engine
from airan.serving.engine.protocol import EngineClient, EngineUnavailableError

ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelSpec(name="m", source="tiny-random", max_model_len=1024)


@pytest.fixture
def llamacpp_installed(monkeypatch):
    """Pretend llama-cpp-python is installed (building the engine never imports it; start() does)."""
    monkeypatch.setitem(ENGINE_KINDS, "llamacpp", replace(ENGINE_KINDS["llamacpp"], requires=None))


@pytest.fixture
def llamacpp_missing(monkeypatch):
    monkeypatch.setitem(ENGINE_KINDS, "llamacpp", replace(ENGINE_KINDS["llamacpp"], requires="airan_no_such_module"))


def test_the_registry_has_exactly_the_configs_kinds_and_each_module_fits():
    assert set(ENGINE_KINDS) == set(get_args(EngineKindName))
    assert EngineConfig().kind == "vllm"
    for name, kind in ENGINE_KINDS.items():
        module = __import__(kind.module, fromlist=["_"])
        for attr in (kind.engine_class, "replica_settings", "replica_env"):
            assert callable(getattr(module, attr, None)), f"{name}: {kind.module}.{attr}"


def test_vllm_kind_builds_a_vllm_engine_with_the_settings_and_env_it_always_had():
    from airan.serving.engine.vllm_engine import VllmEngine, cpu_engine_env, settings_for

    engine_cfg = EngineConfig(kv_cache_gb=0.5, max_num_seqs=8)
    adapters = (("lora", "/adapters/lora"),)
    spec = replica_engine(engine_cfg, MODEL, Path("/models/m"), adapters, [0, 1])
    assert spec == EngineSpec("vllm", settings_for(MODEL, engine_cfg, Path("/models/m"), adapters), cpu_engine_env([0, 1]))
    engine = build_engine(spec)
    assert type(engine) is VllmEngine and isinstance(engine, EngineClient)
    assert engine.max_model_len == 1024


def test_the_spec_crosses_to_another_process_and_building_there_loads_no_engine_runtime():
    """Ray pickles the spec to the site's actor; building the engine there imports neither vLLM nor
    llama-cpp-python (their `start()` does)."""
    spec = replica_engine(EngineConfig(), MODEL, Path("/models/m"), (), [0])
    code = (
        "import json, pickle, sys\n"
        "from airan.serving.engine.kinds import build_engine\n"
        "engine = build_engine(pickle.loads(sys.stdin.buffer.read()))\n"
        "print(json.dumps([type(engine).__name__, engine.max_model_len,\n"
        "                  sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'llama_cpp', 'torch', 'ray'))]))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, input=pickle.dumps(spec), capture_output=True, check=True)
    assert json.loads(out.stdout.decode().strip().splitlines()[-1]) == ["VllmEngine", 1024, []]


def test_llamacpp_kind_builds_a_llamacpp_engine_on_the_configs_gguf(tmp_path, llamacpp_installed):
    from airan.serving.engine.llamacpp_engine import LlamaCppEngine, LlamaCppSettings

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    engine_cfg = EngineConfig(kind="llamacpp", gguf_path=gguf, seed=3)
    spec = replica_engine(engine_cfg, MODEL, Path("/models/m"), (), [0, 1, 2])
    assert spec.kind == "llamacpp" and spec.env == {"OMP_NUM_THREADS": "3"}
    assert spec.settings == LlamaCppSettings(gguf_path=gguf.resolve(), n_ctx=1024, n_threads=3, seed=3)
    engine = build_engine(spec)
    assert type(engine) is LlamaCppEngine and isinstance(engine, EngineClient)
    assert engine.max_model_len == 1024
    # no CPU plan (connect mode): engine.cpu_threads, else llama.cpp's default
    assert replica_engine(engine_cfg.model_copy(update={"cpu_threads": 4}), MODEL, Path("/m")).settings.n_threads == 4
    assert replica_engine(engine_cfg, MODEL, Path("/m")).env == {}

    with pytest.raises(EngineUnavailableError, match="is not a file"):
        replica_engine(engine_cfg.model_copy(update={"gguf_path": tmp_path / "nope.gguf"}), MODEL, Path("/m"))


def test_llamacpp_kind_without_the_extra_says_what_to_install(tmp_path, llamacpp_missing):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    engine_cfg = EngineConfig(kind="llamacpp", gguf_path=gguf)
    for call in (lambda: replica_engine(engine_cfg, MODEL, Path("/m")),
                 lambda: build_engine(EngineSpec("llamacpp", object()))):  # fmt: skip
        with pytest.raises(EngineUnavailableError, match=r"pip install 'airan\[llamacpp\]'"):
            call()


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("llama_cpp") is not None,
                    reason="llama-cpp-python is installed here")  # fmt: skip
def test_llamacpp_kind_fails_without_llama_cpp_on_this_machine(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(EngineUnavailableError, match=r"'llama_cpp'.*pip install 'airan\[llamacpp\]'"):
        replica_engine(EngineConfig(kind="llamacpp", gguf_path=gguf), MODEL, Path("/m"))


def test_a_registered_kind_is_built_by_the_same_factory(monkeypatch):
    class FakeEngine:
        def __init__(self, settings):
            self.settings, self.max_model_len = settings, settings["ctx"]

        async def start(self): ...
        def generate(self, prompt_token_ids, params, request_id): ...
        async def abort(self, request_id): ...
        def load(self): ...
        async def check_health(self): ...
        async def shutdown(self): ...

    module = types.ModuleType("fake_engine_module")
    module.FakeEngine = FakeEngine
    module.replica_settings = lambda model, engine, path, adapters, cpus: {"ctx": model.max_model_len, "path": path}
    module.replica_env = lambda cpus: {"FAKE_THREADS": str(len(cpus or []))}
    monkeypatch.setitem(sys.modules, "fake_engine_module", module)
    monkeypatch.setitem(ENGINE_KINDS, "fake", EngineKind("fake_engine_module", "FakeEngine"))

    spec = replica_engine(SimpleNamespace(kind="fake"), MODEL, Path("/m"), (), [5])
    assert spec == EngineSpec("fake", {"ctx": 1024, "path": Path("/m")}, {"FAKE_THREADS": "1"})
    engine = build_engine(spec)
    assert isinstance(engine, FakeEngine) and isinstance(engine, EngineClient)


def test_an_unknown_kind_names_the_known_ones():
    with pytest.raises(EngineUnavailableError, match="'tgi' is not an engine airan knows.*vllm, llamacpp"):
        build_engine(EngineSpec("tgi", None))


# ------------------------------------------------------------- the replica actor and pool


def _references(path: Path) -> set[str]:
    """Every name, attribute, imported module and imported name in a module."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            out.add(node.id)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names} | {a.asname for a in node.names if a.asname}
        elif isinstance(node, ast.ImportFrom):
            out.add(node.module or "")
            out |= {a.name for a in node.names} | {a.asname for a in node.names if a.asname}
    return out


def test_the_replica_module_references_no_concrete_engine():
    refs = _references(ROOT / "airan" / "serving" / "cluster" / "replicas.py")
    concrete = {k.engine_class for k in ENGINE_KINDS.values()} | {"VllmSettings", "LlamaCppSettings"}
    modules = {k.module for k in ENGINE_KINDS.values()} | {m.rsplit(".", 1)[1] for m in (k.module for k in ENGINE_KINDS.values())}
    assert not refs & concrete, f"replicas.py names engine classes: {refs & concrete}"
    assert not refs & modules, f"replicas.py imports engine modules: {refs & modules}"
    assert not {r for r in refs if r.split(".")[0] in ("vllm", "llama_cpp")}
    assert {"EngineClient", "build_engine", "replica_engine"} <= refs


def _pool(engine: dict, replicas: list[dict]):
    from airan.serving.cluster.replicas import RayReplicaPool

    config = parse_config({
        "sites": [{"id": "bs-01"}, {"id": "bs-02"}],
        "models": [{"name": "m", "source": "tiny-random", "max_model_len": 1024}],
        "replicas": replicas,
        "engine": engine,
    })  # fmt: skip
    return RayReplicaPool(config, {"m": Path("/models/m")})


class _FakeActorClass:
    """Stands in for the Ray actor class: records what each replica actor was given."""

    def __init__(self) -> None:
        self.created: list[tuple[dict, tuple]] = []

    def options(self, **options):
        fake = self

        class _Handle:
            def remote(self, *args):
                fake.created.append((options, args))
                start = SimpleNamespace(remote=lambda: asyncio.sleep(0, {"node_id": "n", "pid": 1}))
                return SimpleNamespace(start=start)

        return _Handle()


def test_the_pool_sends_each_actor_the_configured_engine_spec(monkeypatch):
    from airan.serving.cluster import replicas
    from airan.serving.engine.vllm_engine import cpu_engine_env, settings_for

    actors = _FakeActorClass()
    monkeypatch.setattr(replicas, "ReplicaActor", actors)
    monkeypatch.setattr(replicas.os, "sched_getaffinity", lambda pid: {0, 1})
    pool = _pool({"kv_cache_gb": 0.5}, [{"site": "bs-01", "model": "m"}, {"site": "bs-02", "model": "m"}])

    asyncio.run(pool.start())  # no poller: the supervisor (not started here) probes the replicas
    assert [v.state.name for v in pool.views()] == ["READY", "READY"]
    import ray

    assert not ray.is_initialized(), "a pool started outside a cluster looked for actors to adopt and started Ray"
    for (options, (replica_id, site, spec, *_cap)), cpus in zip(actors.created, ([0], [1])):
        assert spec == EngineSpec("vllm", settings_for(pool.config.model("m"), pool.config.engine, Path("/models/m")),
                                  cpu_engine_env(cpus))  # fmt: skip
        assert options["runtime_env"] == {"env_vars": cpu_engine_env(cpus)} and options["num_cpus"] == 1


def test_the_pool_fails_before_any_actor_when_the_engine_cannot_run_here(monkeypatch, tmp_path, llamacpp_missing):
    from airan.serving.cluster import replicas

    actors = _FakeActorClass()
    monkeypatch.setattr(replicas, "ReplicaActor", actors)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    pool = _pool({"kind": "llamacpp", "gguf_path": str(gguf)}, [{"site": "bs-01", "model": "m"}])
    with pytest.raises(EngineUnavailableError, match=r"pip install 'airan\[llamacpp\]'"):
        asyncio.run(pool.start())
    assert actors.created == [] and pool.views() == []
