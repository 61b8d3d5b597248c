"""Durable per-request log in SQLite (WAL).

Tables::

    requests(id TEXT PK, created REAL, endpoint, model, user, arm, lam REAL, assignment, stream INT,
             prompt_tokens INT, completion_tokens INT, latency_s REAL, ttft_s REAL, finish_reason,
             format_valid INT, compliant INT NULL, checks_json, batch_size INT, status,
             reason TEXT, http_status INT, unscored INT, n_choices INT, choice_index INT,
             client TEXT, reward INT NULL, reward_note TEXT)
    feedback(id INTEGER PK, request_id TEXT, score REAL, created REAL, comment TEXT)
    allocations(id INTEGER PK, created REAL, policy TEXT, allocation_json TEXT)

``status``: ok | error | cancelled | rejected (a 4xx after the API key check); ``reason`` says why
a request was not ok. A response with several choices (``n > 1``, several prompts) has one row per
choice: ``n_choices`` and ``choice_index`` (null on rows written before they existed, and 1 / 0 for
a single choice). At most one feedback record per request (:meth:`MetricsDB.add_feedback`).
``client``: the remote address; ``reward`` / ``reward_note``: what the row gave the adaptive arm
policy (1 / 0, null with the reason in ``reward_note``; both null without one) — ``serve/rewards.py``.
Logs written before these columns existed are upgraded in place (``ALTER TABLE ... ADD COLUMN``).

Every write commits before it returns (``synchronous=FULL`` by default), and the server writes a
request's row before it sends the response, so a ``kill -9`` never loses an acknowledged request.
One connection, guarded by a lock; callers may use it from any thread.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, created REAL NOT NULL, endpoint TEXT, model TEXT, user TEXT,
    arm TEXT, lam REAL, assignment TEXT, stream INTEGER,
    prompt_tokens INTEGER, completion_tokens INTEGER, latency_s REAL, ttft_s REAL,
    finish_reason TEXT, format_valid INTEGER, compliant INTEGER, checks_json TEXT,
    batch_size INTEGER, status TEXT
);
CREATE INDEX IF NOT EXISTS requests_arm ON requests(arm);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL, score REAL NOT NULL,
    created REAL NOT NULL, comment TEXT
);
CREATE INDEX IF NOT EXISTS feedback_req ON feedback(request_id);
CREATE TABLE IF NOT EXISTS allocations (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, policy TEXT, allocation_json TEXT
);
"""
_ADDED = {"reason": "TEXT", "http_status": "INTEGER", "unscored": "INTEGER", "n_choices": "INTEGER",
          "choice_index": "INTEGER", "client": "TEXT", "reward": "INTEGER", "reward_note": "TEXT"}

_COLS = ("id", "created", "endpoint", "model", "user", "arm", "lam", "assignment", "stream",
         "prompt_tokens", "completion_tokens", "latency_s", "ttft_s", "finish_reason",
         "format_valid", "compliant", "checks_json", "batch_size", "status", "reason", "http_status", "unscored", "n_choices", "choice_index",
         "client", "reward", "reward_note")


class MetricsDB:
    """The request log. ``path``: a file (created with its parent directory)."""

    def __init__(self, path: str | Path, *, synchronous: str = "FULL"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._con = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._con.execute("PRAGMA journal_mode=WAL")
        self._con.execute(f"PRAGMA synchronous={synchronous}")
        self._con.executescript(_SCHEMA)
        have = {r[1] for r in self._con.execute("PRAGMA table_info(requests)")}
        for col, kind in _ADDED.items():
            if col not in have:
                self._con.execute(f"ALTER TABLE requests ADD COLUMN {col} {kind}")

    def log_request(self, row: dict[str, Any]) -> None:
        """Insert (or replace) one request row; committed when this returns."""
        row = dict(row)
        if isinstance(row.get("checks_json"), (list, dict)):
            row["checks_json"] = json.dumps(row["checks_json"])
        for k in ("format_valid", "compliant", "stream", "reward"):
            if isinstance(row.get(k), bool):
                row[k] = int(row[k])
        row.setdefault("created", time.time())
        vals = [row.get(c) for c in _COLS]
        with self._lock:
            self._con.execute(
                f"INSERT OR REPLACE INTO requests ({','.join(_COLS)}) VALUES ({','.join('?' * len(_COLS))})", vals)

    def has_request(self, request_id: str) -> bool:
        with self._lock:
            return self._con.execute("SELECT 1 FROM requests WHERE id=?", (request_id,)).fetchone() is not None

    def add_feedback(self, request_id: str, score: float, comment: str | None = None) -> bool:
        """Record the request's feedback; False (nothing written) when it already has one."""
        with self._lock:
            if self._con.execute("SELECT 1 FROM feedback WHERE request_id=?", (request_id,)).fetchone():
                return False
            self._con.execute("INSERT INTO feedback (request_id, score, created, comment) VALUES (?,?,?,?)",
                              (request_id, float(score), time.time(), comment))
            return True

    def row(self, request_id: str) -> dict[str, Any] | None:
        """One request row (without feedback), None when absent."""
        with self._lock:
            r = self._con.execute(f"SELECT {','.join(_COLS)} FROM requests WHERE id=?", (request_id,)).fetchone()
        return dict(zip(_COLS, r)) if r else None

    def set_reward(self, request_id: str, reward: int | None, note: str | None) -> None:
        """Record what a request gave the adaptive policy (after feedback); committed when this returns."""
        with self._lock:
            self._con.execute("UPDATE requests SET reward=?, reward_note=? WHERE id=?", (reward, note, request_id))

    def log_allocation(self, policy: str, allocation: dict[str, Any]) -> None:
        with self._lock:
            self._con.execute("INSERT INTO allocations (created, policy, allocation_json) VALUES (?,?,?)",
                              (time.time(), policy, json.dumps(allocation)))

    def allocations(self) -> list[dict[str, Any]]:
        """Every logged allocation change, oldest first: {created, policy, allocation}."""
        with self._lock:
            cur = self._con.execute("SELECT created, policy, allocation_json FROM allocations ORDER BY id")
            return [{"created": c, "policy": p, "allocation": json.loads(a)} for c, p, a in cur.fetchall()]

    def request_ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._con.execute("SELECT id FROM requests")}

    def rows(self) -> list[dict[str, Any]]:
        """All request rows with ``feedback`` = mean feedback score of the request (or None)."""
        with self._lock:
            cur = self._con.execute(
                f"SELECT {','.join('r.' + c for c in _COLS)}, f.s FROM requests r LEFT JOIN "
                "(SELECT request_id, AVG(score) AS s FROM feedback GROUP BY request_id) f ON f.request_id = r.id "
                "ORDER BY r.created")
            return [dict(zip(_COLS + ("feedback",), r)) for r in cur.fetchall()]

    def close(self) -> None:
        """Checkpoint the WAL into the main file and close."""
        with self._lock:
            try:
                self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._con.close()
