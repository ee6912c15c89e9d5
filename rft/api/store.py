"""The server's records: files, fine-tuning jobs and their events, in sqlite under the data directory.

One database file (`<data_dir>/api.sqlite`, WAL mode) shared by the server and its job workers, so a
record survives `kill -9` of either: every write is a committed transaction. A job's status moves
only by compare-and-set (`transition`: from the states a change allows, atomically), so the server
(pause, cancel, resume) and a worker (succeeded, failed) never overwrite each other's decision.

Rows keep a few columns to filter and order on and the rest of the object as JSON; ids are
OpenAI-style (`file-...`, `ftjob-...`, `ftevent-...`) and generated here, never taken from a request.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL,
    purpose TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    key TEXT,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE UNIQUE INDEX IF NOT EXISTS events_by_key ON events (job_id, key);
"""


def new_id(prefix: str) -> str:
    """An OpenAI-style id: `prefix-` and 24 random hex digits."""
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


@dataclass
class Job:
    """A fine-tuning job's record: its status plus everything else as a dict (`data`)."""

    id: str
    created_at: int
    status: str
    data: dict[str, Any] = field(default_factory=dict)


class Store:
    """Files, jobs and events in one sqlite file; safe from several threads and processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # A connection per operation: no connection crosses threads, and a writer that died
        # (kill -9) leaves nothing open here. BEGIN IMMEDIATE makes read-modify-write atomic.
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # ------------------------------------------------------------------ files

    def add_file(self, record: dict[str, Any]) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO files (id, created_at, purpose, data) VALUES (?, ?, ?, ?)",
                (record["id"], record["created_at"], record["purpose"], json.dumps(record)),
            )

    def get_file(self, file_id: str) -> dict[str, Any] | None:
        with self._connect() as db:
            row = db.execute("SELECT data FROM files WHERE id = ? AND deleted = 0", (file_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def list_files(self, purpose: str | None = None, order: str = "desc") -> list[dict[str, Any]]:
        query = "SELECT data FROM files WHERE deleted = 0" + (" AND purpose = ?" if purpose else "")
        query += " ORDER BY seq " + ("ASC" if order == "asc" else "DESC")
        with self._connect() as db:
            rows = db.execute(query, (purpose,) if purpose else ()).fetchall()
        return [json.loads(r[0]) for r in rows]

    def delete_file(self, file_id: str) -> bool:
        with self._transaction() as db:
            cur = db.execute("UPDATE files SET deleted = 1 WHERE id = ? AND deleted = 0", (file_id,))
        return cur.rowcount == 1

    # ------------------------------------------------------------------ jobs

    def add_job(self, job: Job) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, created_at, status, data) VALUES (?, ?, ?, ?)",
                (job.id, job.created_at, job.status, json.dumps(job.data)),
            )

    def get_job(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT id, created_at, status, data FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job(row[0], row[1], row[2], json.loads(row[3])) if row else None

    def list_jobs(self, statuses: tuple[str, ...] | None = None, order: str = "desc") -> list[Job]:
        query = "SELECT id, created_at, status, data FROM jobs"
        args: tuple[Any, ...] = ()
        if statuses:
            query += f" WHERE status IN ({','.join('?' * len(statuses))})"
            args = statuses
        query += " ORDER BY seq " + ("ASC" if order == "asc" else "DESC")
        with self._connect() as db:
            rows = db.execute(query, args).fetchall()
        return [Job(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

    def transition(
        self, job_id: str, allowed: tuple[str, ...] | None, status: str | None = None, **updates: Any
    ) -> Job | None:
        """Set the job's `status` (and merge `updates` into its data) if its status is in `allowed`
        (None: any); the updated job, or None when the job is not there or not in an allowed state.
        An update whose value is None removes that key."""
        with self._transaction() as db:
            row = db.execute("SELECT id, created_at, status, data FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or (allowed is not None and row[2] not in allowed):
                return None
            data = json.loads(row[3])
            for key, value in updates.items():
                if value is None:
                    data.pop(key, None)
                else:
                    data[key] = value
            new_status = status or row[2]
            db.execute("UPDATE jobs SET status = ?, data = ? WHERE id = ?", (new_status, json.dumps(data), job_id))
        return Job(row[0], row[1], new_status, data)

    # ------------------------------------------------------------------ events

    def add_event(
        self,
        job_id: str,
        message: str,
        *,
        level: str = "info",
        type: str = "message",
        data: dict[str, Any] | None = None,
        created_at: int | None = None,
        key: str | None = None,
    ) -> bool:
        """Append an event; with `key`, only once per job (a second add with the key does nothing).
        True when it was added."""
        event = {
            "id": new_id("ftevent"),
            "created_at": created_at if created_at is not None else now(),
            "level": level,
            "message": message,
            "object": "fine_tuning.job.event",
            "type": type,
            "data": data,
        }
        with self._transaction() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO events (id, job_id, created_at, key, data) VALUES (?, ?, ?, ?, ?)",
                (event["id"], job_id, event["created_at"], key, json.dumps(event)),
            )
        return cur.rowcount == 1

    def event_keys(self, job_id: str, prefix: str) -> set[str]:
        with self._connect() as db:
            rows = db.execute(
                "SELECT key FROM events WHERE job_id = ? AND key LIKE ?", (job_id, prefix.replace("%", "") + "%")
            ).fetchall()
        return {r[0] for r in rows}

    def list_events(self, job_id: str) -> list[dict[str, Any]]:
        """A job's events, newest first (as OpenAI lists them)."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT data FROM events WHERE job_id = ? ORDER BY created_at DESC, seq DESC", (job_id,)
            ).fetchall()
        return [json.loads(r[0]) for r in rows]
