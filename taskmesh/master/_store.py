"""
The master's request database: an embedded SQLite file, so that pending
requests survive a restart and finished ones stay queryable.

Every write is one short transaction of a few rows, run on the reactor
thread. In WAL mode with ``synchronous=NORMAL`` a commit appends to the
write-ahead log without waiting for the disk, so a write blocks the reactor
about as long as the SQL itself takes. SQLite fsyncs only at checkpoints,
every 1000 pages by default. Committed writes survive a crash of the master
process. A power loss or an operating system crash may lose the last few
transactions. The master holds an exclusive lock on the file while it runs,
so a second master cannot open the same database.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from typing import Any, Iterator

from taskmesh._messages import DispatchMode

from ._records import AcceptedAttempt, PendingRequest, RequestRecord, SlaveProgress
from ._states import TaskState

MEMORY_DATABASE = ":memory:"

# The value of PRAGMA user_version that this code reads and writes.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE requests (
    request_id TEXT PRIMARY KEY,
    task TEXT NOT NULL,
    args TEXT NOT NULL,
    mode TEXT NOT NULL,
    selector TEXT NOT NULL,
    target TEXT,
    expected TEXT NOT NULL,
    max_attempts INTEGER NOT NULL,
    timeout REAL NOT NULL,
    ttl REAL NOT NULL,
    created_at REAL NOT NULL,
    start_by REAL NOT NULL,
    deadline REAL NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    finished_at REAL
);
CREATE INDEX requests_by_state ON requests (state);
CREATE INDEX requests_by_created_at ON requests (created_at);
CREATE INDEX requests_by_finished_at ON requests (finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE progress (
    request_id TEXT NOT NULL REFERENCES requests (request_id) ON DELETE CASCADE,
    slave_id TEXT NOT NULL,
    percent REAL NOT NULL,
    message TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (request_id, slave_id)
);
CREATE TABLE results (
    request_id TEXT NOT NULL REFERENCES requests (request_id) ON DELETE CASCADE,
    slave_id TEXT NOT NULL,
    result TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (request_id, slave_id)
);
CREATE TABLE errors (
    request_id TEXT NOT NULL REFERENCES requests (request_id) ON DELETE CASCADE,
    slave_id TEXT NOT NULL,
    error_type TEXT NOT NULL,
    message TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (request_id, slave_id)
);
CREATE TABLE attempts (
    request_id TEXT NOT NULL REFERENCES requests (request_id) ON DELETE CASCADE,
    slave_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    redelivered INTEGER NOT NULL,
    accepted_at REAL NOT NULL,
    PRIMARY KEY (request_id, slave_id, attempt)
);
"""

_REQUEST_COLUMNS = (
    "request_id, task, args, mode, selector, target, expected, max_attempts, timeout, ttl,"
    " created_at, start_by, deadline, state, reason, finished_at"
)


class StoreError(Exception):
    """
    A failure to open, read or write the master's database.
    """


class RequestStore:
    """
    Requests, progress, results, errors and accepted attempts in SQLite.

    The store keeps at most ``max_finished`` finished requests and deletes
    the oldest ones beyond that. Every method raises :class:`StoreError`
    when SQLite fails.
    """

    def __init__(self, path: str, *, max_finished: int) -> None:
        """
        Args:
            path: the database file, created when missing, or ``:memory:``
                for a database that ends with the process.
            max_finished: the number of finished requests to keep.
        """
        if max_finished < 1:
            raise ValueError(f"max_finished must be at least 1, not {max_finished}")
        self._path = path
        self._max_finished = max_finished
        self._database: sqlite3.Connection | None = None
        self._finished_count = 0

    @property
    def path(self) -> str:
        """
        The database file, or ``:memory:``.
        """
        return self._path

    @property
    def is_durable(self) -> bool:
        """
        Whether the requests outlive the process.
        """
        return self._path != MEMORY_DATABASE

    @property
    def is_open(self) -> bool:
        """
        Whether the database is open.
        """
        return self._database is not None

    def open(self) -> None:
        """
        Open the database, creating its tables when the file is new, and
        take the exclusive lock.

        Raises:
            StoreError: the file cannot be opened or created, another process
                holds the lock, or a newer taskmesh created it.
        """
        if self._database is not None:
            return
        try:
            # timeout=0: a database locked by another master fails at once
            # instead of blocking the reactor.
            database = sqlite3.connect(self._path, isolation_level=None, timeout=0)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the master database {self._path}: {e}") from None
        try:
            database.execute("PRAGMA locking_mode = EXCLUSIVE")
            database.execute("PRAGMA journal_mode = WAL")
            database.execute("PRAGMA synchronous = NORMAL")
            database.execute("PRAGMA foreign_keys = ON")
            self._migrate(database)
            [(count,)] = database.execute(
                "SELECT count(*) FROM requests WHERE finished_at IS NOT NULL"
            ).fetchall()
        except sqlite3.Error as e:
            database.close()
            if "locked" in str(e):
                raise StoreError(
                    f"the master database {self._path} is locked: another taskmesh master"
                    " uses it. Stop that master or give this one another [master] database"
                ) from None
            raise StoreError(f"cannot open the master database {self._path}: {e}") from None
        self._database = database
        self._finished_count = count

    def _migrate(self, database: sqlite3.Connection) -> None:
        [(version,)] = database.execute("PRAGMA user_version").fetchall()
        if version == SCHEMA_VERSION:
            return
        if version != 0:
            raise StoreError(
                f"the master database {self._path} has schema version {version}, but this"
                f" taskmesh reads version {SCHEMA_VERSION}; use the taskmesh version that"
                " created it"
            )
        database.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    database.execute(statement)
            database.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            database.execute("ROLLBACK")
            raise
        database.execute("COMMIT")

    def close(self) -> None:
        """
        Close the database and release its lock. Closing twice does nothing.
        """
        database, self._database = self._database, None
        if database is not None:
            database.close()

    # -- Writes ----------------------------------------------------------------

    def add_request(self, request: PendingRequest) -> None:
        """
        Insert a new pending request.
        """
        with self._transaction() as database:
            database.execute(
                f"INSERT INTO requests ({_REQUEST_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    request.request_id,
                    request.task,
                    _dump(request.args),
                    request.mode.value,
                    _dump(request.selector),
                    request.target,
                    _dump(sorted(request.expected)),
                    request.max_attempts,
                    request.timeout,
                    request.ttl,
                    request.created_at,
                    request.start_by,
                    request.deadline,
                    request.state.value,
                    request.reason,
                    request.finished_at,
                ),
            )

    def set_progress(self, request_id: str, slave_id: str, progress: SlaveProgress) -> None:
        """
        Store the latest progress report of one slave, replacing the previous one.
        """
        with self._transaction() as database:
            database.execute(
                "INSERT INTO progress (request_id, slave_id, percent, message, updated_at)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (request_id, slave_id) DO UPDATE SET"
                " percent = excluded.percent, message = excluded.message,"
                " updated_at = excluded.updated_at",
                (request_id, slave_id, progress.percent, progress.message, progress.updated_at),
            )

    def add_result(self, request_id: str, slave_id: str, result: Any, received_at: float) -> None:
        """
        Insert one slave's result, a JSON value.
        """
        with self._transaction() as database:
            database.execute(
                "INSERT INTO results (request_id, slave_id, result, received_at)"
                " VALUES (?, ?, ?, ?)",
                (request_id, slave_id, _dump(result), received_at),
            )

    def add_error(
        self, request_id: str, slave_id: str, error_type: str, message: str, received_at: float
    ) -> None:
        """
        Insert one slave's error.
        """
        with self._transaction() as database:
            database.execute(
                "INSERT INTO errors (request_id, slave_id, error_type, message, received_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (request_id, slave_id, error_type, message, received_at),
            )

    def add_attempt(self, request_id: str, attempt: AcceptedAttempt) -> None:
        """
        Insert one start of a request on a slave.
        """
        with self._transaction() as database:
            database.execute(
                "INSERT INTO attempts (request_id, slave_id, attempt, redelivered, accepted_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    request_id,
                    attempt.slave_id,
                    attempt.attempt,
                    int(attempt.redelivered),
                    attempt.accepted_at,
                ),
            )

    def finish(self, request_id: str, state: TaskState, reason: str, finished_at: float) -> None:
        """
        Record the end of a pending request and delete the oldest finished
        requests beyond ``max_finished``, in one transaction.
        """
        with self._transaction() as database:
            updated = database.execute(
                "UPDATE requests SET state = ?, reason = ?, finished_at = ?"
                " WHERE request_id = ? AND finished_at IS NULL",
                (state.value, reason, finished_at, request_id),
            ).rowcount
            excess = self._finished_count + updated - self._max_finished
            if excess > 0:
                # The oldest finished requests go first; rowid (insertion
                # order) breaks ties between equal finish times.
                deleted = database.execute(
                    "DELETE FROM requests WHERE request_id IN ("
                    " SELECT request_id FROM requests WHERE finished_at IS NOT NULL"
                    " ORDER BY finished_at, rowid LIMIT ?)",
                    (excess,),
                ).rowcount
            else:
                deleted = 0
        self._finished_count += updated - deleted

    # -- Reads -----------------------------------------------------------------

    def contains(self, request_id: str) -> bool:
        """
        Return whether a pending or kept finished request has this id.
        """
        rows = self._query("SELECT 1 FROM requests WHERE request_id = ?", (request_id,))
        return bool(rows)

    def load_pending(self) -> list[PendingRequest]:
        """
        Load every pending request with its progress, replies and attempts,
        oldest first.
        """
        rows = self._query(
            f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE state = ? ORDER BY created_at, rowid",
            (TaskState.PENDING.value,),
        )
        return [self._load_details(row) for row in rows]

    def get(self, request_id: str) -> RequestRecord | None:
        """
        Return a snapshot of one request, or None when the store has no such id.
        """
        rows = self._query(
            f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE request_id = ?", (request_id,)
        )
        if not rows:
            return None
        return self._load_details(rows[0]).snapshot()

    def recent_finished(self, limit: int) -> list[RequestRecord]:
        """
        Return up to ``limit`` finished requests, newest first by creation time.
        """
        rows = self._query(
            f"SELECT {_REQUEST_COLUMNS} FROM requests WHERE finished_at IS NOT NULL"
            " ORDER BY created_at DESC, rowid DESC LIMIT ?",
            (limit,),
        )
        return [self._load_details(row).snapshot() for row in rows]

    def _load_details(self, row: tuple[Any, ...]) -> PendingRequest:
        (
            request_id,
            task,
            args,
            mode,
            selector,
            target,
            expected,
            max_attempts,
            timeout,
            ttl,
            created_at,
            start_by,
            deadline,
            state,
            reason,
            finished_at,
        ) = row
        request = PendingRequest(
            request_id=request_id,
            task=task,
            args=json.loads(args),
            mode=DispatchMode(mode),
            selector=json.loads(selector),
            target=target,
            expected=frozenset(json.loads(expected)),
            max_attempts=max_attempts,
            timeout=timeout,
            ttl=ttl,
            created_at=created_at,
            start_by=start_by,
            deadline=deadline,
            state=TaskState(state),
            reason=reason,
            finished_at=finished_at,
        )
        key = (request_id,)
        for slave_id, percent, message, updated_at in self._query(
            "SELECT slave_id, percent, message, updated_at FROM progress WHERE request_id = ?",
            key,
        ):
            request.progress[slave_id] = SlaveProgress(percent, message, updated_at)
        for slave_id, result in self._query(
            "SELECT slave_id, result FROM results WHERE request_id = ? ORDER BY rowid", key
        ):
            request.results[slave_id] = json.loads(result)
        for slave_id, error_type, message in self._query(
            "SELECT slave_id, error_type, message FROM errors WHERE request_id = ? ORDER BY rowid",
            key,
        ):
            request.errors[slave_id] = (error_type, message)
        for slave_id, attempt, redelivered, accepted_at in self._query(
            "SELECT slave_id, attempt, redelivered, accepted_at FROM attempts"
            " WHERE request_id = ? ORDER BY accepted_at, rowid",
            key,
        ):
            request.attempts.append(
                AcceptedAttempt(slave_id, attempt, bool(redelivered), accepted_at)
            )
        return request

    # -- Plumbing ----------------------------------------------------------------

    def _require_open(self) -> sqlite3.Connection:
        if self._database is None:
            raise StoreError(f"the master database {self._path} is not open")
        return self._database

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        database = self._require_open()
        try:
            database.execute("BEGIN IMMEDIATE")
            yield database
            database.execute("COMMIT")
        except sqlite3.Error as e:
            self._roll_back(database)
            raise StoreError(f"cannot write to the master database {self._path}: {e}") from None
        except BaseException:
            self._roll_back(database)
            raise

    @staticmethod
    def _roll_back(database: sqlite3.Connection) -> None:
        # A failed COMMIT may leave the transaction open or may already have
        # rolled it back, depending on the error.
        if database.in_transaction:
            try:
                database.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def _query(self, sql: str, parameters: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        database = self._require_open()
        try:
            return database.execute(sql, parameters).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"cannot read the master database {self._path}: {e}") from None


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
