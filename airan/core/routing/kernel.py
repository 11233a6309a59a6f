"""The routing decision's numbers in one compiled call: admission's prediction, the deadline and
preferred-site filters, the weighted scorers and the top-k pick.

This is the one implementation of that arithmetic. The router runs it whole for a config made of the
filters and scorers it covers (the default's; router.py `_fast_path`), and the `deadline` /
`preferred_site` filters, the `least_loaded` / `kv_cache` / `site_locality` / `predicted_latency`
scorers and `admission.predict_s` run it for their own part alone (one filter or one scorer, no
pick) when the router takes its general path, filter by filter. Why compiled: at 4,000 replicas the
numpy version was ~15 calls of ~1 us each (half of it call overhead) plus the Python between them;
this call takes ~5-8 us (benchmarks/bench_admission_decision.py).

Compiled by numba on a process's first router (`warm_up`), and cached on disk (`cache=True`) so a
later process only loads it; no request pays the compilation. numba is imported then, not with this
module: a process that imports the routing types but never routes (a replica's Ray worker) does not
load it (~0.3 s).
"""
from __future__ import annotations

import math

import numpy as np

# PredictedLatencyScorer: a tenth of a second is added to every prediction, so a few milliseconds of
# network between otherwise equal replicas do not outweigh the site the request names
LATENCY_FLOOR_S = 0.1


def _score(load, kv_free, site_score, predicted, top, w_load, w_kv, w_locality, w_latency):
    """One replica's weighted score (see `decide`); `top` is the best prediction plus the floor."""
    return w_load * load + w_kv * kv_free + w_locality * site_score + w_latency * top / (predicted + LATENCY_FLOOR_S)


def _min(x, n):
    """min(x[:n]) in four independent chains (one chain waits for each comparison: ~3x slower)."""
    b0 = b1 = b2 = b3 = math.inf
    for i in range(0, n - 3, 4):
        b0, b1, b2, b3 = min(b0, x[i]), min(b1, x[i + 1]), min(b2, x[i + 2]), min(b3, x[i + 3])
    for i in range(n - n % 4, n):
        b0 = min(b0, x[i])
    return min(min(b0, b1), min(b2, b3))


def _decide(eligible, start_at, round_trip, prefill, decode, load, kv_free, locality, site_rows, site_start,
           named_sites, preferred_site, now, prompt, tokens, limit, w_load, w_kv, w_locality, w_latency, k,
           predicted, fits, total, top_i, top_v):  # fmt: skip
    """Over the replicas (those `eligible` rules out are skipped):

    predicted[i] = max(start_at[i] - now, 0) + round_trip[i] + prompt * prefill[i] + tokens * decode[i]
        (seconds to the answer; inf where not eligible);
    fits[i] = eligible and predicted[i] <= limit (the deadline filter; limit inf: no deadline), then,
        where some replicas of `preferred_site` (a site's position, -1: none) fit, only those (the
        preferred_site filter);
    total[i] = the score of a replica that fits (-inf elsewhere): w_load * load[i] + w_kv * kv_free[i]
        + w_locality * site score + w_latency * (best + floor) / (predicted[i] + floor), where best is
        the smallest prediction among the candidates and the site score is 1 at the first of
        `named_sites` (positions, each once), 0.8 at the others (site_locality) and locality[i]
        elsewhere;
    k > 0: the k best scores into top_i / top_v, best first, equal scores in index order.
    A site's replicas are site_rows[site_start[pos]:site_start[pos + 1]].

    Returns (how many replicas fit, how many picked, the best prediction, whether the preferred site
    narrowed the choice)."""
    n = eligible.shape[0]
    n_fit = 0
    for i in range(n):  # no branch and no serial dependency but a count: the compiler vectorizes it
        wait = max(start_at[i] - now, 0.0)
        p = wait + round_trip[i] + prompt * prefill[i] + tokens * decode[i] if eligible[i] else math.inf
        predicted[i] = p
        fit = (p <= limit) & eligible[i]
        fits[i] = fit
        n_fit += fit
    best = _min(predicted, n)
    if n_fit == 0:
        return 0, 0, best, False
    narrowed = False
    if preferred_site >= 0:
        best_here = math.inf
        for t in range(site_start[preferred_site], site_start[preferred_site + 1]):
            r = site_rows[t]
            if fits[r]:
                narrowed = True
                best_here = min(best_here, predicted[r])
        if narrowed:
            best = best_here
            rows = site_rows[site_start[preferred_site]:site_start[preferred_site + 1]]
            keep = rows[fits[rows]]
            fits[:] = False
            fits[keep] = True
            n_fit = keep.shape[0]
            total[:] = -math.inf
            for r in keep:
                total[r] = _score(load[r], kv_free[r], locality[r], predicted[r], best + LATENCY_FLOOR_S,
                                  w_load, w_kv, w_locality, w_latency)  # fmt: skip
    top = best + LATENCY_FLOOR_S
    if not narrowed:
        for i in range(n):  # no branch either
            v = _score(load[i], kv_free[i], locality[i], predicted[i], top, w_load, w_kv, w_locality, w_latency)
            total[i] = v if fits[i] else -math.inf
    if w_locality != 0.0:  # the named sites' replicas score their own site score
        for j in range(named_sites.shape[0]):
            pos = named_sites[j]
            if pos < 0:  # a site the table does not know
                continue
            site_score = 1.0 if j == 0 else 0.8
            for t in range(site_start[pos], site_start[pos + 1]):
                r = site_rows[t]
                if fits[r]:
                    total[r] = _score(load[r], kv_free[r], site_score, predicted[r], top, w_load, w_kv, w_locality,
                                      w_latency)  # fmt: skip
    m = 0
    floor = -math.inf  # the k-th best so far, once k are picked
    for s in range(0, n if k > 0 else 0, 4):  # four at a time: one comparison for nearly every four
        e = min(s + 4, n)
        if e - s == 4 and max(max(total[s], total[s + 1]), max(total[s + 2], total[s + 3])) <= floor:
            continue
        for i in range(s, e):
            v = total[i]
            if v <= floor:
                continue
            if m < k:
                m += 1
            j = m - 1  # insert, keeping the earlier index ahead of an equal score
            while j > 0 and top_v[j - 1] < v:
                top_v[j] = top_v[j - 1]
                top_i[j] = top_i[j - 1]
                j -= 1
            top_v[j] = v
            top_i[j] = i
            if m == k:
                floor = top_v[k - 1]
    return n_fit, m, best, narrowed


decide = None  # `_decide` compiled, once `warm_up` has run


def _jit(func, **options):
    from numba import njit

    try:
        return njit(cache=True, error_model="numpy", **options)(func)
    except RuntimeError:  # nowhere writable to cache it (read-only install and home): compile it per process
        return njit(error_model="numpy", **options)(func)


def warm_up() -> None:
    """Compile `_decide` into `decide` (or load it from the disk cache), for the argument types the
    router passes, on a table of two replicas; once a process."""
    global decide, _score, _min
    if decide is not None:
        return
    _score = _jit(_score, inline="always")  # compiled into `_decide`
    _min = _jit(_min, inline="always")
    compiled = _jit(_decide)
    f, b, i = np.zeros(2), np.ones(2, dtype=bool), np.zeros(2, dtype=np.int64)
    compiled(b, f, f, f, f, f, f, f, i, np.array([0, 2]), i, -1, 0.0, 0, 0, 1.0, 1.0, 1.0, 1.0, 1.0, 3,
             np.empty(2), np.empty(2, dtype=bool), np.empty(2), np.empty(4, dtype=np.int64), np.empty(4))  # fmt: skip
    decide = compiled


class Terms:
    """The scorers' weights as `decide` reads them (0: not configured), with the parameters of the
    columns they read: `least_loaded`'s saturation, `site_locality`'s latency scale."""

    __slots__ = ("load", "saturation", "kv", "locality", "scale_ms", "latency")

    def __init__(self, load: float = 0.0, saturation: int = 16, kv: float = 0.0, locality: float = 0.0,
                 scale_ms: float = 10.0, latency: float = 0.0) -> None:  # fmt: skip
        # floats, so the kernel compiled for floats serves (an int weight would compile another)
        self.load, self.saturation, self.kv = float(load), saturation, float(kv)
        self.locality, self.scale_ms, self.latency = float(locality), scale_ms, float(latency)


NO_TERMS = Terms()
_NO_SITES = np.zeros(0, dtype=np.int64)


def run(ctx, table, eligible: np.ndarray, terms: Terms = NO_TERMS, limit: float = math.inf,
        preferred: bool = False, k: int = 0, out=None) -> tuple[int, int, float, bool]:  # fmt: skip
    """`decide` on a table for one request. `limit`: the deadline filter's (inf: none); `preferred`:
    apply the preferred_site filter (to a request with a deadline that names a site). `out`:
    (predicted, fits, total, top_i, top_v) to write into (default: the table's scratch columns,
    which the next decision overwrites). Returns `decide`'s (fit, picked, best, narrowed)."""
    req = ctx.request
    start_at, prefill, decode = table.class_columns[req.priority]
    zeros = table.zeros
    sites = req.site_ids
    named = np.array([table.site_index(s) for s in dict.fromkeys(sites)], dtype=np.int64) if sites else _NO_SITES
    predicted, fits, total, top_i, top_v = out if out is not None else table.scratch
    if decide is None:  # a filter, scorer or prediction used before any router was built
        warm_up()
    return decide(
        eligible, start_at, table.round_trip_s(req.controller_id), prefill, decode,
        table.load_score(terms.saturation) if terms.load else zeros, table.kv_free if terms.kv else zeros,
        table.locality_base(req.controller_id, terms.scale_ms) if terms.locality else zeros,
        table.site_rows, table.site_start, named,
        table.site_index(sites[0]) if preferred and sites and req.deadline is not None else -1,
        float(ctx.now), int(req.prompt_tokens), int(req.expected_tokens), float(limit),
        terms.load, terms.kv, terms.locality, terms.latency, k, predicted, fits, total, top_i, top_v,
    )  # fmt: skip


def columns(ctx, table, eligible: np.ndarray, terms: Terms = NO_TERMS, limit: float = math.inf,
            preferred: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:  # fmt: skip
    """`run` into new columns, for one filter or one scorer at a time: (predicted, fits, scores
    (-inf where a replica does not fit), narrowed)."""
    n = len(table)
    out = (np.empty(n), np.empty(n, dtype=bool), np.empty(n), np.empty(1, dtype=np.int64), np.empty(1))
    narrowed = run(ctx, table, eligible, terms, limit, preferred, out=out)[3]
    return out[0], out[1], out[2], narrowed
