"""The closed vocabulary of causes: one table that everything else reads.

One row per cause: the simulator's event kind that injects it, the proto enum
value (`CAUSE_<name>`), the KPIs it moves and which way, its playbook (actions
with parameter bounds, severity), its human wording and the words a free-text
answer uses for it. The simulator, the diagnosis schema, the rules baseline,
the training data and the demo read this table; a test checks it against the
proto enum. Adding an event kind: see README, "Extending airan".
"""
from __future__ import annotations

from dataclasses import dataclass

RISES, FALLS = +1, -1
STEADY = 0  # shown with the others for contrast, but the event does not move it


@dataclass(frozen=True)
class ActionSpec:
    """A recommended action; `parameter` None = the action takes no value."""

    name: str  # proto ActionType ACTION_<name>
    parameter: str | None = None
    unit: str = ""
    minimum: int = 0
    maximum: int = 0
    needs_target_cell: bool = False
    wording: str = ""


ACTIONS: dict[str, ActionSpec] = {
    a.name: a
    for a in (
        ActionSpec("NO_ACTION", wording="no change needed"),
        ActionSpec("OFFLOAD_TRAFFIC", "share_pct", "%", 5, 50, True, "move a share of the cell's traffic to neighbours"),
        ActionSpec("RAISE_TX_POWER", "delta_db", "dB", 1, 3, False, "raise transmit power to restore SINR"),
        ActionSpec("WAKE_SLEEPING_CELL", "delay_s", "s", 0, 60, True, "wake the sleeping capacity cell"),
        ActionSpec("ADJUST_HO_OFFSET", "delta_db", "dB", -6, 6, False, "retune the handover offset"),
        ActionSpec("ESCALATE", wording="hand over to a human operator"),
    )
}


@dataclass(frozen=True)
class Cause:
    name: str  # proto Cause CAUSE_<name>; diagnosis schema value
    wording: str  # what it looks like in the KPIs, for people and prompts
    event_kind: str | None = None  # the simulator event that injects it; None: no event (NORMAL, UNKNOWN)
    moves: tuple[tuple[str, int], ...] = ()  # (KPI, RISES, FALLS or STEADY) on the affected cell
    key_kpi: str | None = None  # the KPI whose move a rationale cites first
    severity: str = "LOW"  # the playbook's severity
    actions: tuple[tuple[str, int | None], ...] = (("NO_ACTION", None),)  # (action, value) in order
    keywords: tuple[str, ...] = ()  # words a free-text answer uses for it
    # simulator: typical duration (s), the controller class that asks about it, the follow-up it proposes
    duration_s: tuple[float, float] = (0.0, 0.0)
    asked_by: str = "NEAR_RT"
    proposal: tuple[str, str] | None = None  # (priority, what to propose)

    @property
    def kpis(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.moves)


CAUSES: dict[str, Cause] = {
    c.name: c
    for c in (
        Cause("NORMAL", "KPIs within usual ranges", keywords=("normal", "healthy", "no issue", "no problem")),
        Cause(
            "CELL_OUTAGE",
            # the committed adapter learnt this wording (its system prompt); a change needs a rebuild
            "a cell carries no traffic: RRC.ConnMean and DRB.UEThpDl near zero, PEE.AvgPower drops, co-site cells gain UEs",
            event_kind="cell_outage",
            moves=(("RRC.ConnMean", FALLS), ("RRU.PrbAvailDl", FALLS), ("DRB.UEThpDl", FALLS), ("PEE.AvgPower", FALLS)),
            key_kpi="RRC.ConnMean",
            severity="CRITICAL",
            actions=(("ESCALATE", None),),
            keywords=("outage", "off air", "down", "no traffic"),
            duration_s=(300.0, 1800.0),
            proposal=("NON_RT", "tilt and transmit-power changes for the co-site and neighbour cells to cover the gap"),
        ),
        Cause(
            "INTERFERENCE",
            "SINR and CQI fall, BLER rises, throughput falls while load is unchanged",
            event_kind="interference",
            moves=(("L1M.SS-SINR", FALLS), ("CARR.WBCQIMean", FALLS), ("TB.BlerDl", RISES), ("DRB.UEThpDl", FALLS),
                   ("RRU.PrbTotDl", RISES)),  # fmt: skip
            key_kpi="L1M.SS-SINR",
            severity="MEDIUM",
            actions=(("RAISE_TX_POWER", 2),),
            keywords=("interference", "sinr", "bler"),
            duration_s=(600.0, 3600.0),
            proposal=("NON_RT", "transmit-power, tilt or carrier changes that restore SINR"),
        ),
        Cause(
            "CONGESTION",
            "sustained high demand: PRB use near 100%, many active UEs, per-UE throughput falls, RLC delay rises",
            event_kind="congestion",
            moves=(("RRC.ConnMean", RISES), ("RRU.PrbTotDl", RISES), ("DRB.UEThpDl", FALLS),
                   ("DRB.RlcSduDelayDl", RISES), ("DRB.MeanActiveUeDl", RISES)),  # fmt: skip
            key_kpi="RRU.PrbTotDl",
            severity="MEDIUM",
            actions=(("OFFLOAD_TRAFFIC", 20),),
            keywords=("congestion", "congested", "overload", "prb"),
            duration_s=(1800.0, 7200.0),
            proposal=("NON_RT", "cell individual offsets (CIO, dB) that move load to neighbour cells"),
        ),
        Cause(
            "HO_FAILURE_STORM",
            "many handover attempts with a high share of MM.HoExeInterFail",
            event_kind="ho_failure_storm",
            # ping-pong: attempts (and so successes) rise, failures rise faster; SINR stays (not a radio fault)
            moves=(("MM.HoExeInterReq", RISES), ("MM.HoExeInterSucc", RISES), ("MM.HoExeInterFail", RISES),
                   ("L1M.SS-SINR", STEADY)),  # fmt: skip
            key_kpi="MM.HoExeInterFail",
            severity="HIGH",
            actions=(("ADJUST_HO_OFFSET", 2),),
            keywords=("handover", "ho failure", "mobility"),
            duration_s=(300.0, 1200.0),
            proposal=("NEAR_RT", "handover hysteresis (dB) and time-to-trigger (ms) values that stop the ping-pong"),
        ),
        Cause(
            "CELL_SLEEP",
            "a capacity cell switched off for energy saving: its power and UEs drop, the coverage cell gains UEs",
            event_kind="cell_sleep",
            moves=(("PEE.AvgPower", FALLS), ("RRC.ConnMean", FALLS), ("RRU.PrbAvailDl", FALLS)),
            key_kpi="PEE.AvgPower",
            severity="LOW",
            actions=(("NO_ACTION", None),),
            keywords=("sleep", "energy saving", "switched off"),
            duration_s=(1800.0, 5 * 3600.0),
            asked_by="NON_RT",
            proposal=("NON_RT", "the PRB-load thresholds at which the sleeping cell should wake up"),
        ),
        Cause(
            "FLASH_CROWD",
            "a sudden short surge of UEs and PRB use, rising within minutes",
            event_kind="flash_crowd",
            moves=(("RRC.ConnMean", RISES), ("RRU.PrbTotDl", RISES), ("DRB.UEThpDl", FALLS),
                   ("DRB.RlcSduDelayDl", RISES), ("DRB.MeanActiveUeDl", RISES)),  # fmt: skip
            key_kpi="RRC.ConnMean",
            severity="MEDIUM",
            actions=(("OFFLOAD_TRAFFIC", 30),),
            keywords=("flash crowd", "surge", "sudden"),
            duration_s=(600.0, 2400.0),
            proposal=("NEAR_RT", "a temporary CIO (dB) and admission threshold to ride out the surge"),
        ),
        Cause("UNKNOWN", "the KPIs do not support a conclusion"),
    )
}

# the simulator's event kinds, in the order of the table (their index is the trace's int8 code)
EVENT_CAUSES: tuple[Cause, ...] = tuple(c for c in CAUSES.values() if c.event_kind)
EVENT_KINDS: tuple[str, ...] = tuple(c.event_kind for c in EVENT_CAUSES)
# what a labelled item can be: nothing wrong, or one injected event
LABELS: tuple[str, ...] = ("NORMAL", *(c.name for c in EVENT_CAUSES))
SEVERITIES: tuple[str, ...] = ("LOW", "MEDIUM", "HIGH", "CRITICAL")


def cause_of_event(kind: str) -> Cause:
    return next(c for c in EVENT_CAUSES if c.event_kind == kind)
