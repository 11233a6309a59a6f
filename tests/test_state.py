"""The control plane's state store on plain data (temp dirs): what a restart keeps, its bounds, and
that a killed writer loses nothing it had written; restoring sites and idempotent answers from it."""
from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest

from airan.config import parse_config
from airan.core.diagnosis import Action, Diagnosis
from airan.core.headroom import ForecastParams, HeadroomForecaster
from airan.core.prompting import RenderedPrompt
from airan.core.query import Query
from airan.core.retrieval import Citation
from airan.serving.gateway import Answer, Gateway, decode_answer, encode_answer, shown_prompt
from airan.serving.sites import SiteRegistry
from airan.serving.state import (
    DrainRecord,
    InFlightRecord,
    MemoryStateStore,
    RanReport,
    Recovery,
    SqliteStateStore,
    StateSchemaError,
    StoredAnswer,
    default_state_path,
    last_report_per_site,
    open_state_store,
)
from fakes import CONFIG, FakePool, FakeReplica, call_id


@pytest.fixture(params=["sqlite", "memory"])
def make_store(request, tmp_path):
    """A factory of stores of one backend; for sqlite each call reopens the same file."""
    memory = MemoryStateStore(max_reports_per_site=3, max_answers=2)

    def make(**bounds):
        if request.param == "memory":
            return memory
        return SqliteStateStore(tmp_path / "state.sqlite", **{"max_reports_per_site": 3, "max_answers": 2, **bounds})

    return make


def test_every_record_kind_reads_back_as_written(make_store):
    store = make_store()
    store.set_drain(DrainRecord("bs-01", True, 100.0))
    store.set_drain(DrainRecord("bs-02", True, 101.0))
    store.set_drain(DrainRecord("bs-02", False, 102.0))  # resumed: the newest record wins
    store.add_ran_report(RanReport("bs-01", 0.9, 95.5, 100.25))
    store.add_ran_report(RanReport("bs-02", 0.2, 96.0, 100.5))
    store.put_answer(StoredAnswer("xapp-a", "k1", '{"text": "a"}', 103.0))
    store.begin(InFlightRecord("k2", "xapp-a", True, 104.0))
    store.begin(InFlightRecord("call-9", "xapp-b", False, 105.0))
    store.end("call-9")
    store.close()

    saved = make_store().load()
    assert saved.drains == {"bs-01": DrainRecord("bs-01", True, 100.0), "bs-02": DrainRecord("bs-02", False, 102.0)}
    assert saved.ran_reports == [RanReport("bs-01", 0.9, 95.5, 100.25), RanReport("bs-02", 0.2, 96.0, 100.5)]
    assert saved.answers == [StoredAnswer("xapp-a", "k1", '{"text": "a"}', 103.0)]
    assert saved.in_flight == [InFlightRecord("k2", "xapp-a", True, 104.0)]


def test_idempotency_keys_are_scoped_by_controller_and_bounded(make_store):
    store = make_store()
    store.put_answer(StoredAnswer("xapp-a", "same-key", "A", 1.0))
    store.put_answer(StoredAnswer("xapp-b", "same-key", "B", 2.0))
    assert [(a.controller_id, a.payload) for a in store.load().answers] == [("xapp-a", "A"), ("xapp-b", "B")]
    store.put_answer(StoredAnswer("xapp-a", "k3", "C", 3.0))  # past max_answers=2: the oldest goes
    assert [a.payload for a in store.load().answers] == ["B", "C"]


def test_radio_reports_are_bounded_per_site_newest_kept(make_store):
    store = make_store()
    for i in range(6):
        store.add_ran_report(RanReport("bs-01", i / 10, float(i), float(i)))
    store.add_ran_report(RanReport("bs-02", 0.5, 9.0, 9.0))
    reports = store.load().ran_reports
    assert [r.share for r in reports if r.site_id == "bs-01"] == [0.3, 0.4, 0.5]
    assert [r.site_id for r in reports].count("bs-02") == 1
    assert last_report_per_site(reports) == (RanReport("bs-01", 0.5, 5.0, 5.0), RanReport("bs-02", 0.5, 9.0, 9.0))


def test_clear_in_flight_forgets_the_reported_ids(make_store):
    store = make_store()
    store.begin(InFlightRecord("k", "x", True, 1.0))
    store.clear_in_flight()
    assert make_store().load().in_flight == []


def test_opening_prunes_a_file_written_under_larger_bounds(tmp_path):
    big = SqliteStateStore(tmp_path / "s.sqlite", max_reports_per_site=100, max_answers=100)
    for i in range(10):
        big.add_ran_report(RanReport("bs-01", 0.1, float(i), float(i)))
        big.put_answer(StoredAnswer("x", f"k{i}", "p", float(i)))
    big.close()
    small = SqliteStateStore(tmp_path / "s.sqlite", max_reports_per_site=4, max_answers=3)
    saved = small.load()
    assert [r.measured_at for r in saved.ran_reports] == [6.0, 7.0, 8.0, 9.0]
    assert [a.request_id for a in saved.answers] == ["k7", "k8", "k9"]


def test_the_file_is_wal_and_a_newer_schema_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "s.sqlite"
    SqliteStateStore(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    with pytest.raises(StateSchemaError, match="schema 99.*move the file away"):
        SqliteStateStore(path)


def test_a_killed_writer_loses_nothing_it_had_written(tmp_path):
    """SIGKILL right after the writes (no close, no checkpoint): every write is read back."""
    path = tmp_path / "s.sqlite"
    script = textwrap.dedent(f"""
        import os, signal
        from airan.serving.state import SqliteStateStore, DrainRecord, RanReport, InFlightRecord, StoredAnswer
        s = SqliteStateStore({str(path)!r})
        for i in range(200):
            s.add_ran_report(RanReport("bs-01", i / 200, float(i), float(i)))
        s.set_drain(DrainRecord("bs-02", True, 7.0))
        s.put_answer(StoredAnswer("x", "k", "payload", 8.0))
        s.begin(InFlightRecord("lost-1", "x", True, 9.0))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    saved = SqliteStateStore(path).load()
    assert len(saved.ran_reports) == 200 and saved.ran_reports[-1].share == 199 / 200
    assert saved.drains["bs-02"].drained
    assert [a.request_id for a in saved.answers] == ["k"]
    assert [r.request_id for r in saved.in_flight] == ["lost-1"]


def test_open_state_store_follows_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRAN_CACHE", str(tmp_path / "cache"))
    base = {"sites": [{"id": "bs-01"}], "models": [{"name": "m", "source": "tiny-random"}],
            "cluster": {"namespace": "edge-a"}}  # fmt: skip
    default = open_state_store(parse_config(base))
    assert isinstance(default, SqliteStateStore) and default.path == default_state_path("edge-a")
    assert default.path == tmp_path / "cache" / "state" / "edge-a.sqlite"
    named = open_state_store(parse_config({**base, "state": {"path": str(tmp_path / "x.db")},
                                           "limits": {"idempotency_cache_size": 7}}))  # fmt: skip
    assert named.path == tmp_path / "x.db" and named.max_answers == 7
    assert isinstance(open_state_store(parse_config({**base, "state": {"backend": "memory"}})), MemoryStateStore)


# -- restoring the sites --------------------------------------------------------------------


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _registry(store, clock, forecast: bool):
    forecaster = None
    if forecast:
        forecaster = HeadroomForecaster([s.id for s in CONFIG.sites], ForecastParams(stale_after_s=60.0), clock=clock)
    return SiteRegistry(CONFIG.sites, 0.2, forecaster, 0.05, store, wall_clock=None if forecast else clock)


@pytest.mark.parametrize("forecast", [False, True])
def test_a_restored_registry_equals_the_one_that_wrote(tmp_path, forecast):
    clock = Clock(1_000_000.0)
    store = SqliteStateStore(tmp_path / "s.sqlite")
    before = _registry(store, clock, forecast)
    before.set_drained("bs-02", True)
    for i in range(6):  # enough for a trend
        clock.t += 1.0
        before.report_ran_load("bs-01", 0.5 + 0.07 * i, at=clock.t - 0.25)
    store.close()

    after = _registry(SqliteStateStore(tmp_path / "s.sqlite"), clock, forecast)
    assert after.restore(SqliteStateStore(tmp_path / "s.sqlite").load()) == []
    assert after.views() == before.views()
    one = after.get("bs-01")
    assert (one.ran_compute_share, one.ran_measured_at, one.ran_received_at) == \
        (pytest.approx(0.85), clock.t - 0.25, clock.t)  # fmt: skip
    assert after.get("bs-02").drained and after.surged("bs-01")


def test_a_radio_that_went_quiet_while_the_control_plane_was_down_is_stale_after_restore(tmp_path):
    clock = Clock(1_000_000.0)
    store = SqliteStateStore(tmp_path / "s.sqlite")
    _registry(store, clock, forecast=True).report_ran_load("bs-01", 0.3)
    clock.t += 120.0  # the control plane was down two minutes, past stale_after_s
    after = _registry(store, clock, forecast=True)
    after.restore(store.load())
    forecast = after.get("bs-01").forecast
    assert forecast.basis == "stale" and forecast.share == 1.0 and forecast.last_share == 0.3


def test_restore_skips_sites_the_config_no_longer_has():
    saved_store = MemoryStateStore()
    saved_store.set_drain(DrainRecord("bs-09", True, 1.0))
    saved_store.add_ran_report(RanReport("bs-01", 0.4, 1.0, 1.0))
    sites = SiteRegistry(CONFIG.sites, 0.2)
    assert sites.restore(saved_store.load()) == ["bs-09"]
    assert sites.get("bs-01").ran_compute_share == 0.4


# -- idempotent answers and in-flight ids through the gateway ---------------------------------


@pytest.fixture(scope="module")
def renderer():
    from airan.core.prompting import PromptRenderer
    from airan.factory.tiny import ensure_tiny_model

    return PromptRenderer(ensure_tiny_model())


def _gateway(renderer, store, replica=None):
    pool = FakePool({"r1": ("bs-01", replica or FakeReplica())})
    return Gateway(CONFIG, pool, SiteRegistry(CONFIG.sites, 0.2), {"m": renderer}, store=store)


def test_an_answer_survives_the_json_round_trip_without_its_token_ids():
    answer = Answer(
        "k", "text", 10, 3, "r1", "bs-01", "m", "stop", 1.0, 2.0, 3.0,
        prompt=RenderedPrompt([1, 2, 3], 4, 1, passages=(Citation("p1", "T", 0.5),)),
        diagnosis=Diagnosis("CONGESTION", ("c1",), "major", (Action("ADD_CARRIER", "c1", 1.0, "x"),), 0.8, "r",
                            evidence=("e",), cited_kpis=("K",)),  # fmt: skip
        citations=(Citation("p1", "T", 0.5),), answered_by="model", predicted_ms=5.0,
    )  # fmt: skip
    back = decode_answer(encode_answer(answer))
    assert back == replace(answer, prompt=shown_prompt(answer.prompt))
    assert back.prompt.passages == answer.prompt.passages and back.prompt.token_ids == []
    with pytest.raises(ValueError, match="not readable"):
        decode_answer('{"request_id": 5}')


async def test_an_idempotent_answer_is_given_again_by_a_new_gateway(tmp_path, renderer):
    store = SqliteStateStore(tmp_path / "s.sqlite")
    first_replica = FakeReplica(answers=["first answer"])
    first = await _gateway(renderer, store, first_replica).ask(
        Query("why?", request_id="key-1", controller_id="xapp-a", max_tokens=4))  # fmt: skip
    store.close()

    store = SqliteStateStore(tmp_path / "s.sqlite")
    second_replica = FakeReplica(answers=["another answer"])
    gateway = _gateway(renderer, store, second_replica)
    assert gateway.restore_answers(store.load().answers) == 1
    again = await gateway.ask(Query("why?", request_id="key-1", controller_id="xapp-a", max_tokens=4))
    assert again == replace(first, prompt=shown_prompt(first.prompt))
    assert second_replica.calls == 0 and store.load().in_flight == []


async def test_in_flight_ids_are_written_while_a_call_runs_and_removed_when_it_ends(tmp_path, renderer):
    store = SqliteStateStore(tmp_path / "s.sqlite")
    gateway = _gateway(renderer, store, FakeReplica(words=("w",) * 50, delay=0.02))
    keyed = asyncio.create_task(gateway.ask(Query("why?", request_id="key-2", controller_id="xapp-a", max_tokens=50)))
    one_off = asyncio.create_task(gateway.ask(Query("why?", "", controller_id="xapp-b", max_tokens=50), request_id=call_id()))
    for _ in range(100):  # bounded: until both are on the replica
        if len(store.load().in_flight) == 2:
            break
        await asyncio.sleep(0.01)
    records = {r.request_id: r for r in store.load().in_flight}
    assert records["key-2"].idempotent and records["key-2"].controller_id == "xapp-a"
    (one_off_id,) = set(records) - {"key-2"}
    assert not records[one_off_id].idempotent and records[one_off_id].controller_id == "xapp-b"
    await asyncio.gather(keyed, one_off)
    assert store.load().in_flight == []


async def test_a_failed_call_leaves_no_in_flight_record_and_no_answer(tmp_path, renderer):
    store = SqliteStateStore(tmp_path / "s.sqlite")
    gateway = _gateway(renderer, store)
    with pytest.raises(Exception):
        await gateway.ask(Query("why?", request_id="key-3", site_ids=("bs-99",)))
    saved = store.load()
    assert saved.in_flight == [] and saved.answers == []


def test_recovery_names_the_lost_calls_and_the_last_reports():
    recovery = Recovery(
        drains=2, drained=("bs-01",), ran_reports=5, last_reports=(RanReport("bs-01", 0.95, 10.0, 11.0),),
        answers=3, lost=(InFlightRecord("key-9", "x", True, 1.0), InFlightRecord("call-7", "y", False, 1.0)),
    )  # fmt: skip
    text = "\n".join(recovery.lines())
    assert "drained now: bs-01" in text and "5 radio report(s), 3 idempotent answer(s)" in text
    assert "bs-01: share 0.950 measured at 10.000, received at 11.000" in text
    lost = recovery.lost_line()
    assert lost.startswith("2 call(s) were in flight") and "key-9 (idempotent: a retry runs it anew), call-7" in lost
    assert Recovery().lost_line() == ""
