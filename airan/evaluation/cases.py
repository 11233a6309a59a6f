"""Honest labelled NetOps cases from the simulator: the label never shapes the layout.

Each case is what a controller would send about one site: every cell of the
site with the same KPI set over 2-6 one-minute samples, some KPIs never
reported and some samples missing (absent, or NaN while a cell is off), a
question in one of many wordings, naming the cell or only the site. The label
is the cause of the injected event on the cell in question (NORMAL when
nothing was injected); a second, concurrent event may sit on a co-site cell.

Every random draw happens in the same order whatever the label, so two cases
with one seed and different labels share their layout: cells, KPI names,
sample times, missing samples and question. A method can only tell causes
apart by the KPI values (tests/test_cases.py checks this as a property).

`TRAIN`, `DEV`, `TEST` share one setting; `SHIFTED` uses settings training
never sees (weaker events, night hours, single-cell sites, two concurrent
events, more missing samples) and question wordings held out of training.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import timedelta

import numpy as np
from tqdm import tqdm

from airan.core.causes import CAUSES, EVENT_KINDS, LABELS
from airan.evaluation.dataset import EvalItem, KpiRow
from sims.events import FLASH_RISE, KIND_INDEX, EventTable, visible_at
from sims.kpis import KPI_NAMES, KPI_UNITS
from sims.simulate import SimConfig, Simulator
from sims.timefmt import parse_start
from sims.topology import generate_topology

INTERVAL_S = 60.0
SEEDS_PER_SET = 100_000
# set seeds: item seeds are set_seed * SEEDS_PER_SET + index, so sets never share a scenario
TRAIN_SEED, DEV_SEED, TEST_SEED, SHIFTED_SEED = 10, 11, 12, 13
_STREAM = 0xCA5E

CELL_QUESTIONS_TRAIN: tuple[str, ...] = (
    "Why did throughput drop on {cell}?",
    "What is wrong with {cell}?",
    "Is {cell} healthy? If not, what is the cause?",
    "What is the most likely cause of the KPI change on {cell}, and the one action to take now?",
    "Diagnose {cell}.",
    "Users on {cell} complain about slow data. What is going on?",
    "{cell} looks odd in the last minutes. Root cause?",
    "Check {cell} and tell me what to do.",
    "What happened to {cell}?",
    "Give a diagnosis for cell {cell} with one action.",
)
SITE_QUESTIONS_TRAIN: tuple[str, ...] = (
    "What is happening at {site}?",
    "Anything unusual at site {site} in the last few minutes?",
    "Diagnose site {site}.",
    "Is everything fine at {site}?",
    "Which cell at {site} has a problem, and why?",
)
# held out of training: the test sets ask in words the model never trained on
CELL_QUESTIONS_HELDOUT: tuple[str, ...] = (
    "Root-cause the degradation on {cell}, please.",
    "Something is off with {cell}; explain the KPIs and propose a fix.",
    "Can you tell me why {cell} misbehaves?",
    "Triage {cell}: cause, severity, action.",
)
SITE_QUESTIONS_HELDOUT: tuple[str, ...] = (
    "Status check for {site}: any fault?",
    "Summarise the health of {site} and flag the problem cell if there is one.",
)


@dataclass(frozen=True)
class CaseSettings:
    """How cases are drawn; one fixed setting per set."""

    n_sites: int = 3
    cells_per_site: tuple[int, int] = (1, 3)
    samples: tuple[int, int] = (2, 6)
    hours: tuple[float, float] = (7.0, 23.0)
    severity: tuple[float, float] = (0.4, 1.0)
    concurrent_prob: float = 0.2  # a second event on a co-site cell
    kpi_drop_prob: float = 0.15  # each KPI name left out of the whole context
    sample_drop_prob: float = 0.03  # one cell's report for one minute missing
    site_question_prob: float = 0.25
    heldout_wording: bool = False


STANDARD = CaseSettings()
SHIFTED = CaseSettings(
    cells_per_site=(1, 3), hours=(0.5, 5.5), severity=(0.2, 0.4), concurrent_prob=1.0, sample_drop_prob=0.12,
    heldout_wording=True,
)
SHIFTED_SINGLE_CELL = replace(SHIFTED, cells_per_site=(1, 1), concurrent_prob=0.0)
EVENT_DURATION_S = (900.0, 3600.0)  # long enough to cover any window


def _sig(v: float) -> float:
    return float(f"{v:.4g}")


def build_case(seed: int, label: str, item_id: str, settings: CaseSettings = STANDARD) -> EvalItem:
    if label not in LABELS:
        raise ValueError(f"label {label!r} is not one of {', '.join(LABELS)}")
    rng = np.random.default_rng([seed, _STREAM])
    # --- the layout: drawn before and apart from the label -------------------------------
    topo = generate_topology(settings.n_sites, seed=seed, cells_per_site=settings.cells_per_site)
    site = int(rng.integers(0, topo.n_sites))
    if label == "CELL_SLEEP" and int((topo.cell_site == site).sum()) < 2:
        # a coverage cell never sleeps: the only label-dependent choice, and a physical fact
        multi = [s for s in range(topo.n_sites) if int((topo.cell_site == s).sum()) >= 2]
        if not multi:  # every site single-cell: the same city with room for a capacity cell
            if settings.cells_per_site[1] < 2:
                raise ValueError("CELL_SLEEP needs a site with a capacity cell; these settings allow none")
            topo = generate_topology(settings.n_sites, seed=seed, cells_per_site=(2, settings.cells_per_site[1]))
            multi = list(range(topo.n_sites))
        site = multi[site % len(multi)]
    cells = np.flatnonzero(topo.cell_site == site)
    focus_pick = int(rng.integers(0, cells.size))
    second_pick = int(rng.integers(0, cells.size))
    start = parse_start(None) + timedelta(days=int(rng.integers(0, 7)))
    minute = int(rng.integers(int(settings.hours[0] * 60), int(settings.hours[1] * 60)))
    n_samples = int(rng.integers(settings.samples[0], settings.samples[1] + 1))
    after = int(rng.integers(0, 2))  # samples after the one that first shows the event
    kept_kpis = [k for k in KPI_NAMES if rng.random() >= settings.kpi_drop_prob] or list(KPI_NAMES)
    dropped = rng.random((n_samples, cells.size)) < settings.sample_drop_prob
    dropped[-1, :] = False  # the latest report of every cell arrives (a missing one is an outage's NaN)
    site_question = cells.size > 1 and rng.random() < settings.site_question_prob
    questions = _questions(settings, site_question)
    question = questions[int(rng.integers(0, len(questions)))]
    ev_offset = float(rng.uniform(0.0, 0.5 * INTERVAL_S))
    duration = float(np.exp(rng.uniform(*np.log(EVENT_DURATION_S))))
    severity = round(float(rng.uniform(*settings.severity)), 3)
    concurrent = cells.size > 1 and rng.random() < settings.concurrent_prob
    second_kind = EVENT_KINDS[int(rng.integers(0, len(EVENT_KINDS)))]
    second_severity = round(float(rng.uniform(*settings.severity)), 3)
    # --- the label's event(s) --------------------------------------------------------------
    focus = int(cells[focus_pick])
    if label == "CELL_SLEEP" and focus == cells[0]:
        focus = int(cells[1 + focus_pick % (cells.size - 1)])  # the capacity cell next to it
    ev_start = minute * INTERVAL_S + ev_offset
    if label == "FLASH_CROWD":  # shows once its ramp ends: start it earlier so every label shows at `minute`
        ev_start -= max(0.0, FLASH_RISE * duration - 0.5 * INTERVAL_S)
    kinds, where, starts, durations, severities = [], [], [], [], []
    if label != "NORMAL":
        kinds.append(KIND_INDEX[CAUSES[label].event_kind])
        where.append(focus)
        starts.append(ev_start)
        durations.append(duration)
        severities.append(severity)
    others = [int(c) for c in cells if c != focus]
    if concurrent and others and label != "NORMAL":
        other = others[second_pick % len(others)]
        kind = second_kind
        if kind == "cell_sleep" and other == cells[0]:
            kind = "congestion"  # the coverage cell cannot sleep
        kinds.append(KIND_INDEX[kind])
        where.append(other)
        starts.append(ev_start)
        durations.append(duration)
        severities.append(second_severity)
    events = EventTable.build(kinds, where, starts, durations, severities) if kinds else EventTable.empty()
    if kinds:  # the labelled event first shows in the report of `minute`, whatever its kind
        shows = visible_at(EventTable.build(kinds[:1], where[:1], starts[:1], durations[:1], severities[:1]), INTERVAL_S)
        assert int(shows[0]) == minute, (label, int(shows[0]), minute)
    last = minute + after
    first = last - n_samples + 1
    sim = Simulator(topo, events, SimConfig(duration_s=86_400.0, interval_s=INTERVAL_S, seed=seed, start=start))
    window = sim.window(first, last + 1)
    t0 = start.timestamp()
    rows = []
    for r in range(n_samples):
        t = t0 + (first + r) * INTERVAL_S
        for j, c in enumerate(cells):
            if dropped[r, j]:
                continue
            for name in kept_kpis:
                v = float(window.kpis[name][r, c])
                rows.append(KpiRow(name, _sig(v) if np.isfinite(v) else float("nan"), KPI_UNITS[name], str(topo.cell_ids[c]), t))
    cell_id, site_id = str(topo.cell_ids[focus]), str(topo.site_ids[site])
    affected = tuple(sorted(str(topo.cell_ids[c]) for c, k in zip(where, kinds) if label != "NORMAL" and k == kinds[0]))
    if site_question:
        text, asked = question.format(site=site_id), ()
    else:
        text, asked = question.format(cell=cell_id), (cell_id,)
    return EvalItem(
        item_id=item_id, seed=seed, label=label, affected_cells=affected, site_id=site_id, focus_cell=cell_id,
        question=text, cell_ids=asked, kpis=tuple(rows), event_start_s=None if label == "NORMAL" else t0 + ev_start,
        severity=severity if label != "NORMAL" else 0.0,
    )  # fmt: skip


def _questions(settings: CaseSettings, site_question: bool) -> tuple[str, ...]:
    if settings.heldout_wording:
        return SITE_QUESTIONS_HELDOUT if site_question else CELL_QUESTIONS_HELDOUT
    return SITE_QUESTIONS_TRAIN if site_question else CELL_QUESTIONS_TRAIN


def build_cases(
    n_items: int, set_seed: int, settings: CaseSettings = STANDARD, name: str = "", progress: str | None = None
) -> list[EvalItem]:
    """`n_items` cases, labels in turn (balanced), case i from seed set_seed * SEEDS_PER_SET + i;
    `progress`: a bar with that label (thousands of cases take seconds)."""
    if not 0 <= n_items <= SEEDS_PER_SET:
        raise ValueError(f"n_items must be within 0..{SEEDS_PER_SET}")
    prefix = name or f"s{set_seed}"
    return [
        build_case(set_seed * SEEDS_PER_SET + i, LABELS[i % len(LABELS)], f"{prefix}-{i:05d}", settings)
        for i in tqdm(range(n_items), desc=progress, disable=progress is None, unit="case")
    ]


def shifted_cases(n_items: int, set_seed: int = SHIFTED_SEED) -> list[EvalItem]:
    """The shifted test set: a quarter on single-cell sites, the rest with two concurrent events."""
    out = []
    for i in range(n_items):
        label = LABELS[i % len(LABELS)]
        single = i % 4 == 3 and label != "CELL_SLEEP"
        settings = SHIFTED_SINGLE_CELL if single else SHIFTED
        out.append(build_case(set_seed * SEEDS_PER_SET + i, label, f"shifted-{i:05d}", settings))
    return out
