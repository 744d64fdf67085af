"""The controller's durable state: one SQLite database in the state directory (no torch).

What survives a restart (even `kill -9`): every agent the controller ever admitted (its last
Register and the SHA-256 of its credential), every job (the submitted file text, its state,
placement, ports, plan and the dispatcher's service token), each job's state history, and the
event log (the newest MAX_EVENTS). Metrics are not kept: the next report replaces them anyway.

Durability contract
- WAL journal, `synchronous=NORMAL`: a committed transaction survives the process being killed
  (it is in the WAL file); only a power loss may drop the last commits before a checkpoint.
- Writes never run on the event loop. `save_*` / `add_*` serialise on the caller's thread
  (cheap: a few small JSON strings) and queue the row; one writer thread commits everything
  queued in a single transaction, so a burst of changes costs one commit.
- `await sync()` returns once everything queued before it is committed. The job store calls it
  before sending a Deploy, so every process an agent runs belongs to a job the database knows:
  after a restart, whatever an agent reports that the database does not know can be stopped.
- Schema changes are numbered migrations (`MIGRATIONS`), applied in order at open time inside
  one transaction each; `PRAGMA user_version` records the applied version. A database newer
  than this code is refused (StoreError) rather than misread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from infscaled.errors import InfscaledError

log = logging.getLogger(__name__)

DB_FILE: Final = "controller.db"
MAX_EVENTS: Final = 10_000  # rows kept in the events table (pruned at open)
MAX_FINISHED_JOBS: Final = 1_000  # stopped / failed jobs kept (oldest pruned at open)

# Each entry upgrades the schema by one version; never edit a released entry, append a new one.
MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (  # 1: agents, jobs, state history, events
        """CREATE TABLE agents (
             id TEXT PRIMARY KEY,
             credential_sha256 TEXT NOT NULL,
             register TEXT NOT NULL,          -- the agent's last Register message, JSON
             first_seen REAL NOT NULL,
             last_seen REAL NOT NULL)""",
        """CREATE TABLE jobs (
             id TEXT PRIMARY KEY,
             name TEXT NOT NULL,
             created REAL NOT NULL,
             file_name TEXT NOT NULL,         -- as shown in messages (X-Infscaled-Job-File)
             file_text TEXT NOT NULL,         -- the TOML exactly as submitted
             name_override TEXT,              -- the JSON body's "name", when given
             unit_count INTEGER NOT NULL,
             unit_weights TEXT NOT NULL,      -- JSON list
             state TEXT NOT NULL,
             reason TEXT NOT NULL,
             plan TEXT,                       -- protocol.plan.plan_to_dict, JSON
             nodes TEXT NOT NULL,             -- {node: {agent, device, state, pid, reason}}
             ports TEXT NOT NULL,             -- {agent: [port, ...]}
             dispatcher_agent TEXT NOT NULL,
             dispatcher_port INTEGER NOT NULL,
             service_token TEXT NOT NULL,
             updated REAL NOT NULL)""",
        """CREATE TABLE job_states (
             seq INTEGER PRIMARY KEY AUTOINCREMENT,
             job_id TEXT NOT NULL,
             at REAL NOT NULL,
             state TEXT NOT NULL,
             reason TEXT NOT NULL)""",
        "CREATE INDEX job_states_job ON job_states (job_id, seq)",
        """CREATE TABLE events (
             seq INTEGER PRIMARY KEY,
             at REAL NOT NULL,
             kind TEXT NOT NULL,
             message TEXT NOT NULL,
             agent TEXT NOT NULL,
             job TEXT NOT NULL,
             node TEXT NOT NULL,
             state TEXT NOT NULL)""",
    ),
)
SCHEMA_VERSION: Final = len(MIGRATIONS)


class StoreError(InfscaledError):
    """The database cannot be opened or is of an unknown (newer) schema."""


@dataclass(frozen=True)
class AgentRecord:
    id: str
    credential_sha256: str
    register: dict[str, Any]  # the Register body (protocol.messages), as sent
    first_seen: float
    last_seen: float


@dataclass(frozen=True)
class JobRecord:
    id: str
    name: str
    created: float
    file_name: str
    file_text: str
    name_override: str | None
    unit_count: int
    unit_weights: list[int]
    state: str
    reason: str
    plan: dict[str, Any] | None
    nodes: dict[str, dict[str, Any]]
    ports: dict[str, list[int]]
    dispatcher_agent: str
    dispatcher_port: int
    service_token: str


@dataclass(frozen=True)
class EventRecord:
    seq: int
    at: float
    kind: str
    message: str
    agent: str
    job: str
    node: str
    state: str


@dataclass(frozen=True)
class Loaded:
    """Everything read back at start-up."""

    agents: list[AgentRecord]
    jobs: list[JobRecord]  # oldest first
    events: list[EventRecord]  # oldest first, at most `recent` of them


_Write = tuple[str, tuple[Any, ...]]
_STOP: Final = object()


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN ... COMMIT, or ROLLBACK on an error (the connection is in autocommit mode, so DDL
    inside a migration is transactional too, which sqlite3's implicit transactions are not)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def migrate(conn: sqlite3.Connection, path: str) -> int:
    """Bring the schema to SCHEMA_VERSION; returns the version found before."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise StoreError(f"{path}: database schema version {found} is newer than this infscaled "
                         f"understands ({SCHEMA_VERSION}); use a newer infscaled or another state_dir")
    for version in range(found, SCHEMA_VERSION):
        with transaction(conn):  # one per migration: a crash leaves the previous version intact
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
        log.info("%s: schema migrated to version %d", path, version + 1)
    return found


class Store:
    """The open database and its writer thread. `open()` it, `load()` once, then queue writes."""

    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        self.path = path
        self._conn = conn
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_forever, name="store-writer", daemon=True)
        self._writer.start()
        self._closed = False
        self.commits = 0  # transactions committed (tests, benchmarks)
        self.write_errors = 0

    @classmethod
    def open(cls, state_dir: str | Path, file_name: str = DB_FILE) -> Store:
        """Open (creating) `<state_dir>/<file_name>`; blocking: call it in a thread from asyncio."""
        directory = Path(state_dir).expanduser()
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = str(directory / file_name)
        try:
            # The writer thread owns the connection after load(); one thread at a time uses it.
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=5.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            migrate(conn, path)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: cannot open the controller database: {exc}") from None
        Path(path).chmod(0o600)  # it holds service tokens and credential hashes
        return cls(conn, path)

    # -- start-up --------------------------------------------------------------------------------

    def load(self, recent_events: int) -> Loaded:
        """Read everything back, pruning old events and finished jobs first (blocking)."""
        conn = self._conn
        with transaction(conn):
            conn.execute("DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?", (MAX_EVENTS,))
            old = [r[0] for r in conn.execute(
                "SELECT id FROM jobs WHERE state IN ('stopped', 'failed') ORDER BY created DESC LIMIT -1 OFFSET ?",
                (MAX_FINISHED_JOBS,))]
            conn.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in old])
            conn.executemany("DELETE FROM job_states WHERE job_id = ?", [(i,) for i in old])
        agents = [AgentRecord(r[0], r[1], json.loads(r[2]), r[3], r[4])
                  for r in conn.execute("SELECT id, credential_sha256, register, first_seen, last_seen FROM agents "
                                        "ORDER BY first_seen")]
        jobs = [JobRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], json.loads(r[7]), r[8], r[9],
                          json.loads(r[10]) if r[10] else None, json.loads(r[11]), json.loads(r[12]), r[13], r[14],
                          r[15])
                for r in conn.execute(
                    "SELECT id, name, created, file_name, file_text, name_override, unit_count, unit_weights, "
                    "state, reason, plan, nodes, ports, dispatcher_agent, dispatcher_port, service_token "
                    "FROM jobs ORDER BY created")]
        events = [EventRecord(*r) for r in conn.execute(
            "SELECT seq, at, kind, message, agent, job, node, state FROM "
            "(SELECT * FROM events ORDER BY seq DESC LIMIT ?) ORDER BY seq", (recent_events,))]
        return Loaded(agents, jobs, events)

    def history(self, job_id: str) -> list[tuple[float, str, str]]:
        """A job's state history (at, state, reason), oldest first; blocking, for tests and tools."""
        self.flush_blocking()
        return [tuple(r) for r in self._read(
            "SELECT at, state, reason FROM job_states WHERE job_id = ? ORDER BY seq", (job_id,))]  # type: ignore[misc]

    def _read(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        done: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()
        self._queue.put(("read", sql, args, done))
        return done.result(timeout=10)

    # -- writes (queued; any thread, usually the event loop's) -----------------------------------

    def save_agent(self, rec: AgentRecord) -> None:
        self._put("INSERT INTO agents (id, credential_sha256, register, first_seen, last_seen) "
                  "VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                  "credential_sha256 = excluded.credential_sha256, "
                  "register = excluded.register, last_seen = excluded.last_seen",
                  (rec.id, rec.credential_sha256, json.dumps(rec.register), rec.first_seen, rec.last_seen))

    def forget_agent(self, agent_id: str) -> None:
        self._put("DELETE FROM agents WHERE id = ?", (agent_id,))

    def save_job(self, rec: JobRecord) -> None:
        self._put(
            "INSERT INTO jobs (id, name, created, file_name, file_text, name_override, unit_count, unit_weights, "
            "state, reason, plan, nodes, ports, dispatcher_agent, dispatcher_port, service_token, updated) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
            "state = excluded.state, reason = excluded.reason, plan = excluded.plan, nodes = excluded.nodes, "
            "ports = excluded.ports, dispatcher_agent = excluded.dispatcher_agent, "
            "dispatcher_port = excluded.dispatcher_port, updated = excluded.updated",
            (rec.id, rec.name, rec.created, rec.file_name, rec.file_text, rec.name_override, rec.unit_count,
             json.dumps(rec.unit_weights), rec.state, rec.reason,
             json.dumps(rec.plan) if rec.plan is not None else None, json.dumps(rec.nodes), json.dumps(rec.ports),
             rec.dispatcher_agent, rec.dispatcher_port, rec.service_token, time.time()))

    def add_state(self, job_id: str, state: str, reason: str) -> None:
        self._put("INSERT INTO job_states (job_id, at, state, reason) VALUES (?, ?, ?, ?)",
                  (job_id, time.time(), state, reason))

    def add_event(self, rec: EventRecord) -> None:
        self._put("INSERT OR REPLACE INTO events (seq, at, kind, message, agent, job, node, state) "
                  "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                  (rec.seq, rec.at, rec.kind, rec.message, rec.agent, rec.job, rec.node, rec.state))
        if rec.seq % 1000 == 0:  # a long-running controller keeps its table bounded too
            self._put("DELETE FROM events WHERE seq <= ?", (rec.seq - MAX_EVENTS,))

    def _put(self, sql: str, args: tuple[Any, ...]) -> None:
        if self._closed:
            log.debug("store closed; dropping a write")
            return
        self._queue.put(("write", sql, args))

    async def sync(self) -> None:
        """Wait until every write queued before this call is committed."""
        if self._closed:
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put(("sync", done))
        await asyncio.wrap_future(done)

    def flush_blocking(self, timeout_s: float = 10.0) -> None:
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put(("sync", done))
        done.result(timeout=timeout_s)

    def close(self) -> None:
        """Commit what is queued, stop the writer, close the database (blocking)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._writer.join(timeout=30)
        self._conn.close()

    # -- the writer thread -----------------------------------------------------------------------

    def _write_forever(self) -> None:
        while True:
            batch = [self._queue.get()]
            while True:  # everything queued meanwhile joins this transaction
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in batch)
            self._commit([item for item in batch if item is not _STOP])
            if stop:
                return

    def _commit(self, batch: Sequence[Any]) -> None:
        writes: list[_Write] = [(item[1], item[2]) for item in batch if item[0] == "write"]
        if writes:
            try:
                with transaction(self._conn):
                    for sql, args in writes:
                        self._conn.execute(sql, args)
                self.commits += 1
            except sqlite3.Error as exc:
                # Not fatal: the controller keeps serving from memory; the log says what is at risk.
                self.write_errors += 1
                log.error("controller database %s: %d write(s) lost: %s", self.path, len(writes), exc)
        for item in batch:
            if item[0] == "sync":
                item[1].set_result(None)
            elif item[0] == "read":
                _answer(item[3], self._conn, item[1], item[2])


def _answer(future: concurrent.futures.Future[Any], conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> None:
    try:
        future.set_result(conn.execute(sql, args).fetchall())
    except sqlite3.Error as exc:
        future.set_exception(StoreError(str(exc)))
