"""Topology: edge sites (base stations) with 1-3 cells, RAN controllers, and the latency between them.

Everything is a numpy array aligned by index so the traffic and KPI cores can
work on all cells at once. Cells are stored grouped by site (site 0's cells
first), which lets per-site sums use `np.add.reduceat` instead of loops.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from airan.config import AiranConfig

AREA_TYPES: tuple[str, ...] = ("residential", "business", "transport", "mixed")
RESIDENTIAL, BUSINESS, TRANSPORT, MIXED = range(4)

# carrier options: (PRBs, PRB bandwidth in kHz) = 20 MHz @15 kHz SCS, 40 MHz and 100 MHz @30 kHz
CARRIERS = np.array([(106, 180.0), (106, 360.0), (273, 360.0)], dtype=np.float32)

FIBRE_MS_PER_KM = 0.005 * 2.0  # 5 us/km in fibre, x2 for routes that are not straight lines
HOP_MS, KM_PER_HOP = 0.05, 2.0  # store-and-forward through aggregation switches along the way


@dataclass(frozen=True)
class Controller:
    """A RAN controller that asks questions: a near-RT RIC xApp, a non-RT RIC rApp or an operator tool."""

    id: str
    kind: str  # "near_rt_ric" | "non_rt_ric" | "operator"
    x_km: float
    y_km: float
    base_ms: float  # processing + switching latency before distance is added


# Ids match airan/configs/default.yaml's latency_ms keys, so generated traces replay against it.
DEFAULT_CONTROLLERS: tuple[Controller, ...] = (
    Controller("xapp-ts", "near_rt_ric", 0.0, 0.0, 0.5),  # edge cloud in the city
    Controller("rapp-energy", "non_rt_ric", 40.0, 30.0, 5.0),  # regional data centre
    Controller("noc-ops", "operator", 300.0, 0.0, 8.0),  # national operations centre
)


class SiteSum:
    """(T, C) -> (T, S) sums over each site's cells; bincount is ~3x faster than reduceat here."""

    def __init__(self, cell_site: np.ndarray, n_sites: int) -> None:
        self.cell_site = cell_site.astype(np.intp)
        self.n_sites = n_sites
        self._index: dict[int, np.ndarray] = {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        T = x.shape[0]
        idx = self._index.get(T)
        if idx is None:
            if len(self._index) >= 4:  # windows come in at most a couple of lengths
                self._index.clear()
            idx = (np.arange(T, dtype=np.intp)[:, None] * self.n_sites + self.cell_site[None, :]).ravel()
            self._index[T] = idx
        flat = np.ascontiguousarray(x).reshape(-1)
        return np.bincount(idx, weights=flat, minlength=T * self.n_sites).reshape(T, self.n_sites).astype(np.float32)


@dataclass(frozen=True, eq=False)
class Topology:
    site_ids: np.ndarray  # (S,) str
    site_xy_km: np.ndarray  # (S, 2) float64
    site_cores: np.ndarray  # (S,) float32: compute the radio stack and AI share
    site_gpus: np.ndarray  # (S,) float32
    cell_ids: np.ndarray  # (C,) str, "bs-01/c1"
    cell_site: np.ndarray  # (C,) int32, non-decreasing
    cell_area: np.ndarray  # (C,) int8 index into AREA_TYPES
    cell_prb: np.ndarray  # (C,) float32 PRBs per carrier (DL and UL pools alike)
    cell_prb_khz: np.ndarray  # (C,) float32 PRB bandwidth
    cell_base_sinr_db: np.ndarray  # (C,) float32 mean SINR of the cell's UEs in an unloaded network
    cell_peak_ues: np.ndarray  # (C,) float32 connected UEs at the busy hour (before noise)
    controllers: tuple[Controller, ...]
    latency_ms: np.ndarray  # (K, S) float32 one-way latency controller -> site

    @property
    def n_sites(self) -> int:
        return int(self.site_ids.shape[0])

    @property
    def n_cells(self) -> int:
        return int(self.cell_ids.shape[0])

    @property
    def site_start(self) -> np.ndarray:
        """Index of each site's first cell (for np.add.reduceat over the cell axis)."""
        return np.searchsorted(self.cell_site, np.arange(self.n_sites)).astype(np.intp)

    @cached_property
    def site_sum(self) -> SiteSum:
        return SiteSum(self.cell_site, self.n_sites)

    @property
    def cells_per_site(self) -> np.ndarray:
        return np.bincount(self.cell_site, minlength=self.n_sites)

    @property
    def controller_ids(self) -> list[str]:
        return [c.id for c in self.controllers]

    def controller_index(self, controller_id: str) -> int:
        return self.controller_ids.index(controller_id)

    def site_latency(self, site: int) -> dict[str, float]:
        return {c.id: round(float(self.latency_ms[k, site]), 3) for k, c in enumerate(self.controllers)}

    def equals(self, other: Topology) -> bool:
        arrays = [f for f in self.__dataclass_fields__ if f != "controllers"]  # dataclass fields only
        return self.controllers == other.controllers and all(
            np.array_equal(getattr(self, f), getattr(other, f)) for f in arrays
        )

    def site_configs(self) -> list[dict]:
        """Sites as airan config dicts (`sites:` in YAML), so a control plane can serve this topology."""
        return [
            {
                "id": str(self.site_ids[s]),
                "cpus": float(self.site_cores[s]),
                "gpus": float(self.site_gpus[s]),
                "x_km": round(float(self.site_xy_km[s, 0]), 3),
                "y_km": round(float(self.site_xy_km[s, 1]), 3),
                "latency_ms": self.site_latency(s),
            }
            for s in range(self.n_sites)
        ]


def _site_ids(prefix: str, n: int) -> np.ndarray:
    width = max(2, len(str(n)))
    return np.array([f"{prefix}-{i + 1:0{width}d}" for i in range(n)])


def _latency(rng: np.random.Generator, controllers, xy: np.ndarray) -> np.ndarray:
    cxy = np.array([(c.x_km, c.y_km) for c in controllers], dtype=np.float64).reshape(-1, 2)
    base = np.array([c.base_ms for c in controllers], dtype=np.float64)[:, None]
    dist = np.hypot(xy[None, :, 0] - cxy[:, None, 0], xy[None, :, 1] - cxy[:, None, 1])
    # per-link jitter: queueing in switches and the access ring, heavy-tailed but small
    jitter = rng.lognormal(mean=np.log(0.2), sigma=0.6, size=dist.shape)
    return (base + (FIBRE_MS_PER_KM + HOP_MS / KM_PER_HOP) * dist + jitter).astype(np.float32)


def _cells(
    rng: np.random.Generator,
    site_ids: np.ndarray,
    counts: np.ndarray,
    areas_per_site: np.ndarray,
) -> dict[str, np.ndarray]:
    n_sites = site_ids.shape[0]
    cell_site = np.repeat(np.arange(n_sites, dtype=np.int32), counts)
    n_cells = int(cell_site.shape[0])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    local = np.arange(n_cells) - starts[cell_site]  # 0..2 within the site
    cell_ids = np.char.add(np.char.add(site_ids[cell_site].astype(str), "/c"), (local + 1).astype(str))
    area = areas_per_site[cell_site].astype(np.int8)
    # the first cell is the coverage layer (wide, 20 MHz); extra cells are capacity layers (40/100 MHz)
    carrier = np.where(local == 0, 0, rng.choice([1, 2], size=n_cells, p=[0.6, 0.4]))
    prb = CARRIERS[carrier, 0]
    prb_khz = CARRIERS[carrier, 1]
    base_sinr = np.clip(rng.normal(13.0, 4.0, n_cells), 2.0, 25.0).astype(np.float32)
    # busy-hour UEs scale with the carrier; lognormal spread between cells of the same kind
    area_scale = np.array([1.0, 1.2, 1.4, 1.0], dtype=np.float32)[area]
    peak = (prb / 106.0) ** 0.6 * 90.0 * area_scale * rng.lognormal(0.0, 0.35, n_cells)
    return {
        "cell_ids": cell_ids,
        "cell_site": cell_site,
        "cell_area": area,
        "cell_prb": prb.astype(np.float32),
        "cell_prb_khz": prb_khz.astype(np.float32),
        "cell_base_sinr_db": base_sinr,
        "cell_peak_ues": peak.astype(np.float32),
    }


def _area_types(rng: np.random.Generator, xy: np.ndarray, radius_km: float) -> np.ndarray:
    """Business core in the centre, transport corridors along a few lines, residential/mixed elsewhere."""
    n = xy.shape[0]
    r = np.hypot(xy[:, 0], xy[:, 1]) / max(radius_km, 1e-9)
    angles = rng.uniform(0, np.pi, size=3)
    # distance of each site to each line through the centre
    d_line = np.abs(xy[:, 0:1] * np.sin(angles)[None, :] - xy[:, 1:2] * np.cos(angles)[None, :])
    corridor = (d_line.min(axis=1) < max(0.25, 0.04 * radius_km)) & (rng.random(n) < 0.6)
    u = rng.random(n)
    area = np.where(r < 0.25, np.where(u < 0.7, BUSINESS, MIXED), np.where(u < 0.6, RESIDENTIAL, MIXED))
    return np.where(corridor, TRANSPORT, area).astype(np.int8)


def generate_topology(
    n_sites: int | None = None,
    *,
    n_cells: int | None = None,
    seed: int = 0,
    cells_per_site: tuple[int, int] = (1, 3),
    controllers: tuple[Controller, ...] = DEFAULT_CONTROLLERS,
    site_prefix: str = "bs",
) -> Topology:
    """A city of sites on a plane: give `n_sites`, or `n_cells` for an exact cell count.

    Sites are about 0.8 km apart on average, denser towards the centre.
    """
    lo, hi = cells_per_site
    if not 1 <= lo <= hi <= 3:
        raise ValueError("cells_per_site must be within 1..3")
    if (n_sites is None) == (n_cells is None):
        raise ValueError("give exactly one of n_sites or n_cells")
    rng = np.random.default_rng([seed, 1])
    if n_cells is not None:
        if n_cells < 1:
            raise ValueError("n_cells must be >= 1")
        counts = rng.integers(lo, hi + 1, size=n_cells)  # at most n_cells sites are needed
        n_sites = int(np.searchsorted(np.cumsum(counts), n_cells) + 1)
        counts = counts[:n_sites]
        counts[-1] -= int(counts.sum()) - n_cells  # trim the last site to hit n_cells exactly
    else:
        if n_sites < 1:
            raise ValueError("n_sites must be >= 1")
        counts = rng.integers(lo, hi + 1, size=n_sites)
    radius = 0.45 * np.sqrt(n_sites) + 0.5
    # half the sites clustered around the centre, the rest spread over the disc
    clustered = rng.random(n_sites) < 0.5
    rad = np.where(clustered, np.abs(rng.normal(0, 0.35, n_sites)), np.sqrt(rng.random(n_sites))) * radius
    ang = rng.uniform(0, 2 * np.pi, n_sites)
    xy = np.stack([rad * np.cos(ang), rad * np.sin(ang)], axis=1)
    site_ids = _site_ids(site_prefix, n_sites)
    areas = _area_types(rng, xy, radius)
    # vRAN host sized for the cells' busy hour with little spare: AI gets what the radio leaves
    cores = (4.0 * counts + 4.0 + 4.0 * (rng.random(n_sites) < 0.3)).astype(np.float32)
    gpus = (rng.random(n_sites) < 0.2).astype(np.float32)
    cells = _cells(rng, site_ids, counts, areas)
    return Topology(
        site_ids=site_ids,
        site_xy_km=xy,
        site_cores=cores,
        site_gpus=gpus,
        controllers=tuple(controllers),
        latency_ms=_latency(rng, controllers, xy),
        **cells,
    )


def topology_from_config(
    config: AiranConfig,
    *,
    seed: int = 0,
    cells_per_site: tuple[int, int] = (1, 3),
    controllers: tuple[Controller, ...] = DEFAULT_CONTROLLERS,
) -> Topology:
    """A topology with the config's site ids, positions and (where given) controller latencies.

    The sites' radio side (cells, carriers, load) is generated; the config's
    `cpus` describe what AI may use on this machine, not the site's full compute.
    """
    base = generate_topology(len(config.sites), seed=seed, cells_per_site=cells_per_site, controllers=controllers)
    xy = np.array([(s.x_km, s.y_km) for s in config.sites], dtype=np.float64)
    site_ids = np.array([s.id for s in config.sites])
    rng = np.random.default_rng([seed, 2])
    latency = _latency(rng, controllers, xy)
    for s, site in enumerate(config.sites):
        for k, c in enumerate(controllers):
            if c.id in site.latency_ms:
                latency[k, s] = site.latency_ms[c.id]
    counts = base.cells_per_site
    cells = _cells(np.random.default_rng([seed, 3]), site_ids, counts, base.cell_area[base.site_start])
    return Topology(
        site_ids=site_ids,
        site_xy_km=xy,
        site_cores=base.site_cores,
        site_gpus=base.site_gpus,
        controllers=tuple(controllers),
        latency_ms=latency,
        **cells,
    )
