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


def test_default_config_is_valid_and_serves_smollm2():
    config = load_config()
    assert config.default_model == "smollm2-135m-instruct"
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
