"""Topology generator: sizes, structure, determinism, latency from distance."""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from airan.config import load_config
from sims.topology import AREA_TYPES, generate_topology, topology_from_config


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 300), st.integers(0, 2**32))
def test_sites_have_one_to_three_cells_grouped_by_site(n_sites, seed):
    t = generate_topology(n_sites, seed=seed)
    assert t.n_sites == n_sites
    counts = t.cells_per_site
    assert counts.min() >= 1 and counts.max() <= 3 and counts.sum() == t.n_cells
    assert (np.diff(t.cell_site) >= 0).all()  # grouped: per-site sums can use contiguous runs
    assert len(set(t.site_ids)) == n_sites and len(set(t.cell_ids)) == t.n_cells
    for c, s in zip(t.cell_ids, t.cell_site):
        assert re.fullmatch(rf"{t.site_ids[s]}/c[123]", c)
    assert t.latency_ms.shape == (len(t.controllers), n_sites) and (t.latency_ms > 0).all()
    assert set(np.unique(t.cell_area)) <= set(range(len(AREA_TYPES)))
    assert (t.site_cores > 0).all() and (t.cell_prb > 0).all()
    x = np.random.default_rng(seed).random((2, t.n_cells)).astype(np.float32)
    sums = t.site_sum(x)
    assert np.allclose(sums, np.add.reduceat(x, t.site_start, axis=1), rtol=1e-5)


def test_the_three_site_default_matches_the_default_config_ids():
    t = generate_topology(3, seed=0)
    assert list(t.site_ids) == ["bs-01", "bs-02", "bs-03"]
    assert "xapp-ts" in t.controller_ids and "rapp-energy" in t.controller_ids


def test_ten_thousand_cells_exactly_and_fast():
    t = generate_topology(n_cells=10_000, seed=1)
    assert t.n_cells == 10_000 and 3_300 <= t.n_sites <= 10_000
    assert re.fullmatch(r"bs-\d{4,5}", t.site_ids[0])


def test_same_seed_same_topology_other_seed_other_topology():
    a, b, c = (generate_topology(50, seed=s) for s in (4, 4, 5))
    assert a.equals(b) and not a.equals(c)


def test_latency_grows_with_distance_to_the_controller():
    t = generate_topology(400, seed=2)
    k = t.controller_index("xapp-ts")
    ctrl = t.controllers[k]
    dist = np.hypot(t.site_xy_km[:, 0] - ctrl.x_km, t.site_xy_km[:, 1] - ctrl.y_km)
    assert np.corrcoef(dist, t.latency_ms[k])[0, 1] > 0.3
    assert (t.latency_ms[k] >= ctrl.base_ms).all()


def test_topology_from_config_keeps_the_config_sites_and_latencies():
    cfg = load_config()  # the built-in 3-site config
    t = topology_from_config(cfg, seed=0)
    assert list(t.site_ids) == [s.id for s in cfg.sites]
    for s, site in enumerate(cfg.sites):
        assert t.site_xy_km[s].tolist() == [site.x_km, site.y_km]
        for ctrl, ms in site.latency_ms.items():
            assert t.latency_ms[t.controller_index(ctrl), s] == pytest.approx(ms)
    assert t.site_configs()[0]["id"] == "bs-01"


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        generate_topology(0)
    with pytest.raises(ValueError):
        generate_topology(3, n_cells=5)
    with pytest.raises(ValueError):
        generate_topology(3, cells_per_site=(1, 4))
