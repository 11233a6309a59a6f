"""Which replica actors a starting control plane adopts, on plain identities (no Ray started):
healthy ones that hold what their configured replica should; the rest are stopped, with why."""
from __future__ import annotations

from airan.config import parse_config
from airan.serving.cluster.replicas import RayReplicaPool, plan_adoption
from airan.serving.engine.kinds import replica_engine

CONFIG = parse_config({
    "sites": [{"id": "bs-01", "cpus": 1}, {"id": "bs-02", "cpus": 1}],
    "models": [{"name": "m", "source": "tiny-random"}, {"name": "m-w8", "source": "variant"}],
    "replicas": [{"site": "bs-01", "model": "m"}, {"site": "bs-02", "model": "m"}],
    "engine": {"kv_cache_gb": 0.25},
    "cluster": {"mode": "connect", "address": "auto"},
})  # fmt: skip
PATHS = {"m": "/models/m"}
VARIANTS = {"m-w8": "/models/m-w8"}


def _planned(config=CONFIG, slot="bs-01-m-0", cpus=(0,)):
    spec = next(r for r in config.replicas if slot.startswith(r.site))
    return spec, list(cpus), replica_engine(config.engine, config.model("m"), PATHS["m"], (), list(cpus))


def _identity(replica_id="bs-01-m-0", slot="bs-01-m-0", model="m", engine=None, created_at=1.0):
    return {"replica_id": replica_id, "slot": slot, "model": model, "created_at": created_at,
            "engine": engine if engine is not None else _planned()[2]}  # fmt: skip


def test_an_actor_with_the_configured_engine_matches_and_a_changed_setting_does_not():
    pool = RayReplicaPool(CONFIG, PATHS, VARIANTS)
    assert pool._mismatch(_identity(), _planned()) == ""
    changed = CONFIG.model_copy(update={"engine": CONFIG.engine.model_copy(update={"kv_cache_gb": 0.5})})
    assert "other settings" in pool._mismatch(_identity(engine=_planned(changed)[2]), _planned())
    assert "other settings" in pool._mismatch(_identity(), _planned(cpus=(1,)))  # bound to other cores now
    assert "no replica bs-09-m-0" in pool._mismatch(_identity(slot="bs-09-m-0"), None)


def test_a_swapped_variant_matches_only_when_it_is_servable_here():
    variant_engine = replica_engine(CONFIG.engine, CONFIG.model("m-w8"), VARIANTS["m-w8"], (), [0])
    swapped = _identity("bs-01-m-w8-s3", model="m-w8", engine=variant_engine)
    assert RayReplicaPool(CONFIG, PATHS, VARIANTS)._mismatch(swapped, _planned()) == ""
    assert "neither m nor a servable variant" in RayReplicaPool(CONFIG, PATHS)._mismatch(swapped, _planned())


def test_plan_keeps_one_healthy_matching_actor_per_slot_and_stops_the_rest_with_why():
    found = [
        ("a:bs-01-m-0", _identity(created_at=1.0), ""),
        ("a:bs-01-m-w8-s3", _identity("bs-01-m-w8-s3", model="m-w8", created_at=2.0), ""),  # a later swap
        ("a:bs-02-m-0", _identity("bs-02-m-0", slot="bs-02-m-0", created_at=1.5), "engine not healthy: dead"),
        ("a:bs-03-m-0", _identity("bs-03-m-0", slot="bs-03-m-0"), ""),
        ("a:gone", None, "gone: not found"),
    ]
    keep, stop = plan_adoption(found, lambda info: "no such slot" if info["slot"] == "bs-03-m-0" else "")
    assert {slot: name for slot, (name, _) in keep.items()} == {"bs-01-m-0": "a:bs-01-m-w8-s3"}
    assert dict(stop) == {
        "a:bs-01-m-0": "superseded by bs-01-m-w8-s3 for bs-01-m-0",
        "a:bs-02-m-0": "engine not healthy: dead",
        "a:bs-03-m-0": "no such slot",
        "a:gone": "gone: not found",
    }
