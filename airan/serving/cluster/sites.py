"""A Ray cluster whose nodes are the edge sites.

Local mode starts one Ray node per configured site on this machine, each with
the custom resource `site:<id>`, so placing a replica on a named site is real
Ray scheduling. Connect mode joins an existing cluster (e.g. KubeRay, one
worker group per site) and checks that every configured site has a node.
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


class SiteCluster:
    def __init__(self, config: AiranConfig) -> None:
        self.config = config
        self._local = None  # ray.cluster_utils.Cluster in local mode

    def start(self) -> None:
        cfg = self.config
        if cfg.cluster.mode == "local":
            from ray.cluster_utils import Cluster

            first, *rest = cfg.sites
            self._local = Cluster(initialize_head=True, head_node_args=self._node_args(first))
            for site in rest:
                self._local.add_node(**self._node_args(site))
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
