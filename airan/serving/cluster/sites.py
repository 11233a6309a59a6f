"""A Ray cluster whose nodes are the edge sites.

Local mode starts a Ray head that is no site (it holds no replica, so losing any
site's node leaves the cluster and the control plane up) and one Ray worker node
per configured site on this machine, each with the custom resource `site:<id>`,
so placing a replica on a named site is real Ray scheduling. Connect mode joins
an existing cluster (e.g. KubeRay, one worker group per site, the head running
no replicas) and checks that every configured site has a node.
"""
from __future__ import annotations

import logging
import math

import ray

from airan.config import AiranConfig

log = logging.getLogger(__name__)
# sites exchange only small messages through the object store
_OBJECT_STORE_BYTES = 96 * 1024 * 1024
# room for many replicas per site; each replica asks for one unit
SITE_RESOURCE_UNITS = 1000
# local mode: the head finds a site node whose raylet died within ~5 s (Ray's default: 3 s x 5 tries
# after a 5 s delay), so a lost site's replicas are placed elsewhere soon after they are found dead
_LOCAL_SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}


class SiteCluster:
    def __init__(self, config: AiranConfig) -> None:
        self.config = config
        self._local = None  # ray.cluster_utils.Cluster in local mode
        self._site_nodes: dict = {}  # local mode: site id -> its ray._private.node.Node

    def start(self) -> None:
        cfg = self.config
        if cfg.cluster.mode == "local":
            from ray.cluster_utils import Cluster

            # the head runs Ray's own services and the driver's worker, never a replica
            head = dict(num_cpus=0, object_store_memory=_OBJECT_STORE_BYTES, include_dashboard=False,
                        labels={"airan.io/role": "head"}, _system_config=_LOCAL_SYSTEM_CONFIG)  # fmt: skip
            self._local = Cluster(initialize_head=True, head_node_args=head)
            for site in cfg.sites:
                self._site_nodes[site.id] = self._local.add_node(**self._node_args(site))
            address = self._local.address
        else:
            address = cfg.cluster.address
        ray.init(address=address, namespace=cfg.cluster.namespace, log_to_driver=False)
        if self._local is not None:
            self._local.wait_for_nodes()
        self._check_sites_present()

    def _node_args(self, site) -> dict:
        return dict(
            # Ray counts whole CPUs per node; a site sized in fractions (a slice of one machine) gets one
            num_cpus=max(1, math.ceil(site.cpus)),
            num_gpus=site.gpus,
            resources={site.ray_resource: SITE_RESOURCE_UNITS},
            object_store_memory=_OBJECT_STORE_BYTES,
            include_dashboard=False,
            labels={"airan.io/site": site.id},
        )

    def _check_sites_present(self) -> None:
        have = ray.cluster_resources()
        missing = [s.id for s in self.config.sites if s.ray_resource not in have]
        if missing:
            raise RuntimeError(
                f"Ray cluster has no node for site(s) {', '.join(missing)}: each site's node must "
                "offer the custom resource 'site:<id>' (see the Helm chart's worker groups)"
            )

    def live_sites(self) -> set[str]:
        """Sites with a live node (Ray's view: a node whose raylet died is dropped within seconds)."""
        return set(self.node_of_site())

    def local_site_node(self, site_id: str):
        """Local mode: the Ray node (ray._private.node.Node) that is `site_id`, e.g. for fault tests."""
        if self._local is None:
            raise RuntimeError("only a local cluster (cluster.mode local) has its site nodes in this process")
        return self._site_nodes[site_id]

    def node_of_site(self) -> dict[str, str]:
        """site id -> Ray node id (first live node offering the site's resource)."""
        out: dict[str, str] = {}
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            for key in node.get("Resources", {}):
                if key.startswith("site:"):
                    out.setdefault(key.removeprefix("site:"), node["NodeID"])
        return out

    def shutdown(self) -> None:
        if ray.is_initialized():
            ray.shutdown()
        if self._local is not None:
            self._local.shutdown()
            self._local = None
            self._site_nodes = {}
