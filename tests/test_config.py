"""The typed config: references resolve, mistakes fail with the offending path."""
import pytest

from airan.config import ConfigError, load_config, parse_config

BASE = {
    "sites": [{"id": "bs-01"}],
    "models": [
        {"name": "base", "source": "tiny-random"},
        {"name": "base-lora", "source": "local", "path": "/x", "method": "lora", "parent": "base"},
    ],
}


def test_default_config_is_valid_and_serves_the_trained_smollm2_on_every_site():
    config = load_config()
    assert config.default_model == "smollm2-netops-merged"
    assert config.model(config.default_model).source == "variant"
    assert {r.site for r in config.replicas} == {s.id for s in config.sites}


@pytest.mark.parametrize(
    "patch, words",
    [
        ({"replicas": [{"site": "bs-09", "model": "base"}]}, "replica site 'bs-09'"),
        ({"replicas": [{"site": "bs-01", "model": "nope"}]}, "replica model 'nope'"),
        ({"replicas": [{"site": "bs-01", "model": "base-lora"}]}, "is a LoRA adapter"),
        ({"replicas": [{"site": "bs-01", "model": "base", "adapters": ["base"]}]}, "not a LoRA model"),
        ({"sites": [{"id": "bs-01"}, {"id": "bs-01"}]}, "duplicate site id"),
        ({"sites": [{"id": "BS 01"}]}, "sites.0.id"),
        ({"engine": {"kv_cache_gb": -1}}, "engine.kv_cache_gb"),
        ({"surprise": 1}, "surprise"),
        ({"cluster": {"mode": "connect"}}, "needs cluster.address"),
    ],
)
def test_bad_configs_name_the_problem(patch, words):
    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, **patch})
    assert words in str(e.value)


def test_adapter_on_its_parent_is_accepted():
    config = parse_config({**BASE, "replicas": [{"site": "bs-01", "model": "base", "adapters": ["base-lora"]}]})
    assert config.replicas[0].adapters == ["base-lora"]


LLAMACPP = {"kind": "llamacpp", "gguf_path": "/models/base.gguf"}


def test_engine_kind_defaults_to_vllm_and_llamacpp_takes_a_gguf():
    assert parse_config(BASE).engine.kind == "vllm"
    assert load_config().engine.kind == "vllm" and load_config().engine.gguf_path is None
    config = parse_config({**BASE, "engine": LLAMACPP, "replicas": [{"site": "bs-01", "model": "base"}]})
    assert config.engine.kind == "llamacpp" and str(config.engine.gguf_path) == "/models/base.gguf"


@pytest.mark.parametrize(
    "patch, words",
    [
        # an unknown kind names the known ones and what llamacpp needs
        ({"engine": {"kind": "llama.cpp"}}, "unknown engine kind 'llama.cpp': use 'vllm' (the default) or 'llamacpp'"),
        ({"engine": {"kind": "tgi"}}, "engine.kind: Value error, unknown engine kind 'tgi'"),
        ({"engine": {"kind": "llamacpp"}}, "engine.kind 'llamacpp' needs engine.gguf_path"),
        ({"engine": {"gguf_path": "/models/base.gguf"}}, "engine.gguf_path is read only by engine.kind 'llamacpp'"),
        ({"engine": LLAMACPP, "replicas": [{"site": "bs-01", "model": "base", "adapters": ["base-lora"]}]},
         "engine.kind 'llamacpp' serves no LoRA adapters: remove adapters from the replicas at bs-01"),
        ({"engine": LLAMACPP, "models": [*BASE["models"], {"name": "other", "source": "tiny-random"}],
          "replicas": [{"site": "bs-01", "model": "base"}, {"site": "bs-01", "model": "other"}]},
         "replicas serve base, other: serve that GGUF's model only"),
    ],
)
def test_bad_engine_configs_say_what_to_do(patch, words):
    with pytest.raises(ConfigError) as e:
        parse_config({**BASE, **patch})
    assert words in str(e.value)
