"""What the control plane must not forget when it restarts: operator drains, the radio's reports,
answers to idempotent requests and the ids of requests in flight.

`StateStore` is the narrow protocol the control plane writes through on every change and reads
once at startup. `SqliteStateStore` (the default) keeps it in one SQLite file in WAL mode with
`synchronous=NORMAL`: a commit is in the write-ahead log before the call returns, so a control
plane that is killed (SIGKILL, OOM) loses nothing it had written; only a power loss of the machine
may drop the last commits. `MemoryStateStore` forgets everything with the process (a one-off local
stack, whose Ray nodes die with it anyway).

Records are plain data; answers are stored as the gateway's own JSON (opaque here). Every table is
bounded: RAN reports per site and answers by count, in-flight ids by the requests running.
"""
from __future__ import annotations

import sqlite3
import threading
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class DrainRecord:
    site_id: str
    drained: bool
    changed_at: float  # unix seconds


@dataclass(frozen=True)
class RanReport:
    site_id: str
    share: float
    measured_at: float  # when the radio measured it (unix seconds, the report's own time)
    received_at: float  # when the control plane received it (unix seconds)


@dataclass(frozen=True)
class StoredAnswer:
    # idempotency keys are scoped by the calling controller: two controllers may use the same key
    controller_id: str
    request_id: str
    payload: str  # the gateway's JSON of the answer
    stored_at: float


@dataclass(frozen=True)
class InFlightRecord:
    request_id: str  # the id the call is answered under (the client's key, or the minted id)
    controller_id: str
    idempotent: bool  # the id is the client's idempotency key: a retry may come
    started_at: float


@dataclass(frozen=True)
class SavedState:
    """Everything read back at startup, oldest first in each list."""

    drains: dict[str, DrainRecord] = field(default_factory=dict)
    ran_reports: list[RanReport] = field(default_factory=list)
    answers: list[StoredAnswer] = field(default_factory=list)
    in_flight: list[InFlightRecord] = field(default_factory=list)


class StateStore(Protocol):
    def load(self) -> SavedState: ...

    def set_drain(self, record: DrainRecord) -> None: ...

    def add_ran_report(self, report: RanReport) -> None: ...

    def put_answer(self, answer: StoredAnswer) -> None: ...

    def begin(self, record: InFlightRecord) -> None: ...

    def end(self, request_id: str) -> None: ...

    def clear_in_flight(self) -> None:
        """Forget every in-flight id (after startup has reported the ones a crash lost)."""
        ...

    def close(self) -> None: ...


class MemoryStateStore:
    """The same bounds as SQLite, kept in this process only."""

    def __init__(self, max_reports_per_site: int = 4096, max_answers: int = 1024) -> None:
        self.max_reports_per_site = max_reports_per_site
        self.max_answers = max_answers
        self._drains: dict[str, DrainRecord] = {}
        self._reports: dict[str, deque[RanReport]] = {}
        self._answers: OrderedDict[tuple[str, str], StoredAnswer] = OrderedDict()
        self._in_flight: dict[str, InFlightRecord] = {}

    def load(self) -> SavedState:
        reports = sorted((r for q in self._reports.values() for r in q), key=lambda r: (r.received_at, r.measured_at))
        return SavedState(dict(self._drains), reports, list(self._answers.values()), list(self._in_flight.values()))

    def set_drain(self, record: DrainRecord) -> None:
        self._drains[record.site_id] = record

    def add_ran_report(self, report: RanReport) -> None:
        self._reports.setdefault(report.site_id, deque(maxlen=self.max_reports_per_site)).append(report)

    def put_answer(self, answer: StoredAnswer) -> None:
        if not self.max_answers:
            return
        key = (answer.controller_id, answer.request_id)
        self._answers.pop(key, None)
        self._answers[key] = answer
        while len(self._answers) > self.max_answers:
            self._answers.popitem(last=False)

    def begin(self, record: InFlightRecord) -> None:
        self._in_flight[record.request_id] = record

    def end(self, request_id: str) -> None:
        self._in_flight.pop(request_id, None)

    def clear_in_flight(self) -> None:
        self._in_flight.clear()

    def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS drains (
    site_id TEXT PRIMARY KEY, drained INTEGER NOT NULL, changed_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS ran_reports (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, site_id TEXT NOT NULL, site_seq INTEGER NOT NULL,
    share REAL NOT NULL, measured_at REAL NOT NULL, received_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS ran_reports_site ON ran_reports (site_id, site_seq);
CREATE TABLE IF NOT EXISTS answers (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, controller_id TEXT NOT NULL, request_id TEXT NOT NULL,
    payload TEXT NOT NULL, stored_at REAL NOT NULL, UNIQUE (controller_id, request_id));
CREATE TABLE IF NOT EXISTS in_flight (
    request_id TEXT PRIMARY KEY, controller_id TEXT NOT NULL, idempotent INTEGER NOT NULL,
    started_at REAL NOT NULL);
"""


# the rows past a bound, counted from the newest (at open: a file written under larger bounds)
_TRIM_REPORTS = ("DELETE FROM ran_reports WHERE site_id = ? AND site_seq <= COALESCE((SELECT site_seq FROM "
                 "ran_reports WHERE site_id = ? ORDER BY site_seq DESC LIMIT 1 OFFSET ?), -1)")  # fmt: skip
_TRIM_ANSWERS = "DELETE FROM answers WHERE seq <= COALESCE((SELECT seq FROM answers ORDER BY seq DESC LIMIT 1 OFFSET ?), -1)"


class StateSchemaError(RuntimeError):
    """The state file was written by an incompatible airan version."""


class SqliteStateStore:
    """One SQLite file; each write is one short transaction that only appends to the write-ahead log
    (an insert into a bounded table also drops, by an index range, the rows past the bound), cheap
    enough to run on the event loop (benchmarks/bench_state_store.py measures it). Checkpointing the
    log into the file, which syncs it to disk, runs every `checkpoint_interval_s` on a thread of its
    own with its own connection. Opening the file prunes it to the current bounds."""

    def __init__(self, path: str | Path, max_reports_per_site: int = 4096, max_answers: int = 1024,
                 checkpoint_interval_s: float | None = 1.0) -> None:  # fmt: skip
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_reports_per_site = max_reports_per_site
        self.max_answers = max_answers
        self._lock = threading.Lock()  # one connection; writes may come from a worker thread
        self._db = self._connect()
        self._db.execute("PRAGMA wal_autocheckpoint=0")  # never on the write path: the checkpoint thread does it
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            self._db.close()
            raise StateSchemaError(
                f"{self.path} holds airan state schema {row[0]}, this version reads {SCHEMA_VERSION}: "
                "move the file away (its drains and idempotent answers are then forgotten) or run the matching airan"
            )
        self._prune(self._db)
        self._stop = threading.Event()
        self._checkpoints: threading.Thread | None = None
        if checkpoint_interval_s:
            self._checkpoints = threading.Thread(target=self._checkpoint_loop, args=(checkpoint_interval_s,),
                                                 name="airan-state-checkpoint", daemon=True)  # fmt: skip
            self._checkpoints.start()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5.0)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA journal_size_limit=16777216")  # the log is cut back to 16 MiB after a checkpoint
        return db

    def _checkpoint_loop(self, interval_s: float) -> None:
        db = self._connect()
        try:
            while not self._stop.wait(interval_s):
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")  # never waits for, nor blocks, a writer
        except sqlite3.Error as e:  # the file went away under us: writes will say so, loudly
            import logging

            logging.getLogger(__name__).error("state store checkpoints stopped: %s", e)
        finally:
            db.close()

    def load(self) -> SavedState:
        with self._lock:
            db = self._db
            drains = {
                s: DrainRecord(s, bool(d), t) for s, d, t in db.execute("SELECT site_id, drained, changed_at FROM drains")
            }
            reports = [RanReport(*row) for row in db.execute(
                "SELECT site_id, share, measured_at, received_at FROM ran_reports ORDER BY seq")]  # fmt: skip
            answers = [StoredAnswer(*row) for row in db.execute(
                "SELECT controller_id, request_id, payload, stored_at FROM answers ORDER BY seq")]  # fmt: skip
            in_flight = [InFlightRecord(r, c, bool(i), t) for r, c, i, t in db.execute(
                "SELECT request_id, controller_id, idempotent, started_at FROM in_flight ORDER BY started_at")]  # fmt: skip
        return SavedState(drains, reports, answers, in_flight)

    def set_drain(self, record: DrainRecord) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO drains VALUES (?, ?, ?)",
                             (record.site_id, int(record.drained), record.changed_at))  # fmt: skip

    def add_ran_report(self, report: RanReport) -> None:
        with self._lock, self._transaction() as db:
            # the site's own sequence number: its oldest rows past the bound are a range of it (by index)
            (n,) = db.execute("SELECT COALESCE(MAX(site_seq), 0) + 1 FROM ran_reports WHERE site_id = ?",
                              (report.site_id,)).fetchone()  # fmt: skip
            db.execute(
                "INSERT INTO ran_reports (site_id, site_seq, share, measured_at, received_at) VALUES (?, ?, ?, ?, ?)",
                (report.site_id, n, report.share, report.measured_at, report.received_at),
            )
            db.execute("DELETE FROM ran_reports WHERE site_id = ? AND site_seq <= ?",
                       (report.site_id, n - self.max_reports_per_site))  # fmt: skip

    def put_answer(self, answer: StoredAnswer) -> None:
        if not self.max_answers:
            return
        with self._lock, self._transaction() as db:
            # a key stored again moves to the newest end (REPLACE gives it a new seq)
            seq = db.execute(
                "INSERT OR REPLACE INTO answers (controller_id, request_id, payload, stored_at) VALUES (?, ?, ?, ?)",
                (answer.controller_id, answer.request_id, answer.payload, answer.stored_at),
            ).lastrowid
            # seq only grows, so the newest max_answers rows lie within the last max_answers seqs (fewer
            # when a key was stored again): a range delete on the key, not a count
            db.execute("DELETE FROM answers WHERE seq <= ?", (seq - self.max_answers,))

    @contextmanager
    def _transaction(self):
        self._db.execute("BEGIN")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def begin(self, record: InFlightRecord) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO in_flight VALUES (?, ?, ?, ?)",
                             (record.request_id, record.controller_id, int(record.idempotent), record.started_at))  # fmt: skip

    def end(self, request_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM in_flight WHERE request_id = ?", (request_id,))

    def clear_in_flight(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM in_flight")

    def _prune(self, db: sqlite3.Connection) -> None:
        """Drop reports beyond the newest `max_reports_per_site` of each site and answers beyond the
        newest `max_answers` (at open: a file written under larger bounds)."""
        db.execute("BEGIN IMMEDIATE")
        try:
            for (site_id,) in db.execute("SELECT DISTINCT site_id FROM ran_reports").fetchall():
                db.execute(_TRIM_REPORTS, (site_id, site_id, self.max_reports_per_site))
            db.execute(_TRIM_ANSWERS, (self.max_answers,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._stop.set()
        if self._checkpoints is not None:
            self._checkpoints.join(timeout=10)
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:  # another connection still reads: the log stays, nothing is lost
                pass
            self._db.close()


@dataclass(frozen=True)
class Recovery:
    """What a starting control plane took over from the previous one, for its log and operators."""

    drains: int = 0  # sites whose drain state was restored (drained or resumed)
    drained: tuple[str, ...] = ()
    ran_reports: int = 0
    last_reports: tuple[RanReport, ...] = ()  # the newest report of each site
    answers: int = 0  # idempotent answers a retry gets again
    lost: tuple[InFlightRecord, ...] = ()  # calls in flight when the previous control plane stopped
    skipped_sites: tuple[str, ...] = ()  # in the saved state, no longer in the config

    def lines(self) -> list[str]:
        out = [f"restored {self.drains} drain record(s) (drained now: {', '.join(self.drained) or 'none'}), "
               f"{self.ran_reports} radio report(s), {self.answers} idempotent answer(s)"]  # fmt: skip
        for r in self.last_reports:
            out.append(f"last radio report of {r.site_id}: share {r.share:.3f} measured at {r.measured_at:.3f}, "
                       f"received at {r.received_at:.3f} (unix s)")  # fmt: skip
        if self.skipped_sites:
            out.append(f"saved state of site(s) no longer configured, ignored: {', '.join(self.skipped_sites)}")
        return out

    def lost_line(self) -> str:
        """The calls a crash cut off ("" when none)."""
        if not self.lost:
            return ""
        ids = ", ".join(f"{r.request_id}{' (idempotent: a retry runs it anew)' if r.idempotent else ''}"
                        for r in self.lost[:20])  # fmt: skip
        more = f" and {len(self.lost) - 20} more" if len(self.lost) > 20 else ""
        return (f"{len(self.lost)} call(s) were in flight when the previous control plane stopped; their callers "
                f"saw the connection fail and got no answer: {ids}{more}")


def last_report_per_site(reports: list[RanReport]) -> tuple[RanReport, ...]:
    """The newest received report of each site, in site order of first appearance."""
    last: dict[str, RanReport] = {}
    for r in reports:
        last[r.site_id] = r
    return tuple(last.values())


def default_state_path(namespace: str) -> Path:
    from airan.config import cache_dir

    return cache_dir() / "state" / f"{namespace}.sqlite"


def open_state_store(config) -> StateStore:
    """The store `config.state` names (an `AiranConfig`)."""
    state = config.state
    answers = config.limits.idempotency_cache_size
    if state.backend == "memory":
        return MemoryStateStore(state.max_ran_reports_per_site, answers)
    path = state.path.expanduser() if state.path is not None else default_state_path(config.cluster.namespace)
    return SqliteStateStore(path, state.max_ran_reports_per_site, answers)
