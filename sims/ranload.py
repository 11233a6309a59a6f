"""RAN compute load per site: the share of the site's compute the radio stack needs.

A vRAN host runs L1 (channel coding, FFTs: scales with PRBs used and carrier
bandwidth), L2 (scheduler: scales with active UEs) and a fixed share for
transport/OAM. Whatever is left is the AI headroom the control plane may use.
Sleeping cells keep a small share (wake-up listening); cells down use none.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sims.topology import Topology


@dataclass(frozen=True)
class RanLoadParams:
    site_base_cores: float = 1.0  # transport, OAM, O-RAN E2 agent
    cell_idle_cores: float = 0.5  # per cell on air, at 20 MHz
    cell_idle_cores_per_bw: float = 0.3  # extra idle cores per 20 MHz-equivalent of bandwidth
    cell_l1_cores: float = 1.5  # at 100 % PRB use, at 20 MHz
    cell_l1_cores_per_bw: float = 1.0  # extra per 20 MHz-equivalent
    ue_cores: float = 0.01  # L2 scheduler per active UE
    sleep_cores: float = 0.1
    dl_weight: float = 0.6  # DL/UL mix of the L1 work (UL decoding is costlier per PRB)


def ran_compute_share(
    topology: Topology,
    kpis: dict[str, np.ndarray],
    avail: np.ndarray | None = None,
    sleep: np.ndarray | None = None,
    p: RanLoadParams = RanLoadParams(),
) -> np.ndarray:
    """(T, S) float32 in [0, 1] from (T, C) KPIs of the same window."""
    f32 = np.float32
    bw = (topology.cell_prb * topology.cell_prb_khz / f32(106 * 180)).astype(np.float32)[None, :]
    util = kpis["RRU.PrbTotDl"] * f32(p.dl_weight / 100.0) + kpis["RRU.PrbTotUl"] * f32((1 - p.dl_weight) / 100.0)
    cores = f32(p.cell_idle_cores) + f32(p.cell_idle_cores_per_bw) * bw
    cores = cores + (f32(p.cell_l1_cores) + f32(p.cell_l1_cores_per_bw) * bw) * util
    cores = cores + f32(p.ue_cores) * kpis["DRB.MeanActiveUeDl"]
    if avail is not None:
        cores = cores * avail
    if sleep is not None:
        cores = cores + f32(p.sleep_cores) * sleep
    site = topology.site_sum(cores) + f32(p.site_base_cores)
    return np.clip(site / topology.site_cores[None, :], 0.0, 1.0).astype(np.float32)
