"""A labelled NetOps set from the simulator: KPI windows around known injected events.

Each item is one question a RAN controller would ask about a cell or site,
with the E2SM-KPM samples of the cell in question (full KPI set) and of its
co-site cells (load KPIs) over a few consecutive 1-minute intervals: two
before the event shows, the interval it shows in, and one more. The label is
the injected event's cause (or NORMAL when nothing was injected) and the
event's cell.

Leakage is avoided by construction: the KPI names, the number of intervals
and the question wording never depend on the label, so a method can only
tell causes apart by the KPI values. Everything is plain data (dataclasses,
JSONL) built by pure functions; the same seed gives the same items.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

from airan.core.causes import CAUSES, EVENT_CAUSES, LABELS, cause_of_event
from sims.events import KIND_INDEX, EventTable, cells_for_kind, visible_at
from sims.kpis import KPI_UNITS
from sims.simulate import SimConfig, Simulator
from sims.timefmt import parse_start
from sims.topology import generate_topology

INTERVAL_S = 60.0
WINDOW_INTERVALS = 4  # v-2 .. v+1, v = the interval whose report first shows the event
N_SITES = 3
CELLS_PER_SITE = (2, 3)  # every site has co-site cells (and a capacity cell that can sleep)
HOURS = (8.0, 22.0)  # daytime: enough traffic for load events to show at all
EVENT_DURATION_S = (600.0, 2400.0)  # long enough to cover the window for every kind
SEVERITY = (0.4, 1.0)  # as the simulator's random events
SEEDS_PER_SET = 100_000  # item seeds of a set: set_seed * SEEDS_PER_SET + index
DEV_SEED, TEST_SEED = 1, 2
# the cell in question gets a KPI set wide enough for every cause; co-site cells their load
_BASE_FOCUS_KPIS: tuple[str, ...] = (
    "RRC.ConnMean", "RRU.PrbAvailDl", "RRU.PrbTotDl", "DRB.UEThpDl", "DRB.RlcSduDelayDl",
    "TB.BlerDl", "L1M.SS-SINR", "MM.HoExeInterReq", "MM.HoExeInterFail", "PEE.AvgPower",
)  # fmt: skip
# ... plus the key KPI of any cause the base set lacks, so a new event kind's evidence is always in view
FOCUS_KPIS: tuple[str, ...] = tuple(dict.fromkeys((*_BASE_FOCUS_KPIS, *(c.key_kpi for c in EVENT_CAUSES if c.key_kpi))))
COSITE_KPIS: tuple[str, ...] = ("RRC.ConnMean", "RRU.PrbTotDl")
CELL_QUESTIONS: tuple[str, ...] = (
    "Why did throughput drop on {cell}?",
    "What is wrong with {cell}?",
    "Is {cell} healthy? If not, what is the cause?",
    "What is the most likely cause of the KPI change on {cell}, and the one action to take now?",
    "Explain what {cell} and its co-site cells show.",
    "Users on {cell} complain about slow data. What is going on?",
)
SITE_QUESTIONS: tuple[str, ...] = (
    "What is happening at {site}?",
    "Anything unusual at site {site} in the last few minutes?",
)
_STREAM = 0xE7A1  # the eval's own random stream, apart from the simulator's


@dataclass(frozen=True)
class KpiRow:
    name: str
    value: float
    unit: str
    cell_id: str
    time_s: float  # unix seconds, whole


@dataclass(frozen=True)
class EvalItem:
    item_id: str
    seed: int
    label: str  # one of LABELS
    affected_cells: tuple[str, ...]  # the event's cell; empty for NORMAL
    site_id: str
    focus_cell: str  # the cell the controller looks at (the event's cell for events)
    question: str
    cell_ids: tuple[str, ...]  # cells named in the request (empty for site questions)
    kpis: tuple[KpiRow, ...]
    event_start_s: float | None  # unix seconds; None for NORMAL
    severity: float  # 0 for NORMAL

    @property
    def context_cells(self) -> list[str]:
        """The cells a diagnosis may name (as the server computes them)."""
        return sorted({*self.cell_ids, *(k.cell_id for k in self.kpis if k.cell_id)})

    def to_json(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_json(raw: dict) -> EvalItem:
        fields = dict(raw)
        fields["affected_cells"] = tuple(fields["affected_cells"])
        fields["cell_ids"] = tuple(fields["cell_ids"])
        fields["kpis"] = tuple(KpiRow(**k) for k in fields["kpis"])
        return EvalItem(**fields)


def label_of(kind: str) -> str:
    """The label of an event kind (the cause table's row for it)."""
    return cause_of_event(kind).name


def build_item(seed: int, label: str, item_id: str) -> EvalItem:
    """One item: a random city, day and time; the labelled event (if any) on one cell."""
    if label not in LABELS:
        raise ValueError(f"label {label!r} is not one of {', '.join(LABELS)}")
    rng = np.random.default_rng([seed, _STREAM])
    topo = generate_topology(N_SITES, seed=seed, cells_per_site=CELLS_PER_SITE)
    start = parse_start(None) + timedelta(days=int(rng.integers(0, 7)))  # midnight of some weekday
    minute = int(rng.integers(int(HOURS[0] * 60), int(HOURS[1] * 60)))
    event_kind = CAUSES[label].event_kind  # None for NORMAL: nothing injected
    kind = None if event_kind is None else KIND_INDEX[event_kind]
    pool = np.arange(topo.n_cells) if kind is None else cells_for_kind(topo, kind)
    cell = int(pool[rng.integers(0, pool.size)])
    site = int(topo.cell_site[cell])
    if kind is None:
        events, shows_at, ev_start, severity = EventTable.empty(), minute, None, 0.0
    else:
        ev_start = round(minute * INTERVAL_S + float(rng.uniform(0.0, 0.5 * INTERVAL_S)), 3)
        lo, hi = EVENT_DURATION_S
        duration = round(float(np.exp(rng.uniform(np.log(lo), np.log(hi)))), 3)
        severity = round(float(rng.uniform(*SEVERITY)), 3)
        events = EventTable.build([kind], [cell], [ev_start], [duration], [severity])
        shows_at = int(visible_at(events, INTERVAL_S)[0])
        # the window's last interval must still be inside the event, or the label would be wrong
        assert ev_start + duration >= (shows_at + 2) * INTERVAL_S, "event shorter than the window"
    sim = Simulator(topo, events, SimConfig(duration_s=86_400.0, interval_s=INTERVAL_S, seed=seed, start=start))
    i0 = shows_at - (WINDOW_INTERVALS - 2)
    window = sim.window(i0, i0 + WINDOW_INTERVALS)
    t0 = start.timestamp()
    cosite = [int(c) for c in np.flatnonzero(topo.cell_site == site) if c != cell]
    rows: list[KpiRow] = []
    for r in range(WINDOW_INTERVALS):  # oldest first, the cell in question before its co-site cells
        t = t0 + (i0 + r) * INTERVAL_S
        for c, names in [(cell, FOCUS_KPIS), *((c, COSITE_KPIS) for c in cosite)]:
            for name in names:
                v = float(window.kpis[name][r, c])
                if np.isfinite(v):  # quality KPIs are missing while a cell is off: no UE reported them
                    rows.append(KpiRow(name, round(v, 3), KPI_UNITS[name], str(topo.cell_ids[c]), t))
    cell_id, site_id = str(topo.cell_ids[cell]), str(topo.site_ids[site])
    if rng.random() < 0.25:
        question = SITE_QUESTIONS[int(rng.integers(0, len(SITE_QUESTIONS)))].format(site=site_id)
        asked: tuple[str, ...] = ()
    else:
        question = CELL_QUESTIONS[int(rng.integers(0, len(CELL_QUESTIONS)))].format(cell=cell_id)
        asked = (cell_id,)
    return EvalItem(
        item_id=item_id,
        seed=seed,
        label=label,
        affected_cells=() if label == "NORMAL" else (cell_id,),
        site_id=site_id,
        focus_cell=cell_id,
        question=question,
        cell_ids=asked,
        kpis=tuple(rows),
        event_start_s=None if ev_start is None else t0 + ev_start,
        severity=severity,
    )


def build_dataset(n_items: int, set_seed: int, name: str = "") -> list[EvalItem]:
    """`n_items` items, labels in turn (balanced), item i from seed set_seed * SEEDS_PER_SET + i."""
    if not 0 <= n_items <= SEEDS_PER_SET:
        raise ValueError(f"n_items must be within 0..{SEEDS_PER_SET}")
    if set_seed < 0:
        raise ValueError("set_seed must be >= 0")
    prefix = name or f"s{set_seed}"
    return [
        build_item(set_seed * SEEDS_PER_SET + i, LABELS[i % len(LABELS)], f"{prefix}-{i:04d}")
        for i in range(n_items)
    ]


def build_splits(n_dev: int, n_test: int, dev_seed: int = DEV_SEED, test_seed: int = TEST_SEED):
    """(dev, test) from disjoint seeds: tuning on dev can never see a test scenario."""
    if dev_seed == test_seed:
        raise ValueError("dev and test need different set seeds")
    dev = build_dataset(n_dev, dev_seed, "dev")
    test = build_dataset(n_test, test_seed, "test")
    assert_disjoint(dev, test)
    return dev, test


def assert_disjoint(dev: list[EvalItem], test: list[EvalItem]) -> None:
    shared = {i.seed for i in dev} & {i.seed for i in test}
    if shared:
        raise AssertionError(f"dev and test share {len(shared)} seed(s), e.g. {min(shared)}")


def write_jsonl(items: list[EvalItem], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(i.to_json(), sort_keys=True) + "\n" for i in items))
    return path


def read_jsonl(path: str | Path) -> list[EvalItem]:
    return [EvalItem.from_json(json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]
