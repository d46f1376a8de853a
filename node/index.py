"""The node's index: an SQLite database (WAL mode) with its schema managed here by migrations.

Tables: ``patients``, ``studies``, ``series``, ``instances`` (path, size, hash, received time,
calling AE), ``associations`` (peer, times, counts, outcome), ``events`` (audit-style record of
what happened: duplicates, stable/amended studies, rejected associations), ``outbox`` (results
waiting to be sent, with their retry state) and ``rejections`` (instances an IHE IOCM rejection
note withdrew, see :mod:`node.rejection`).

One :class:`Index` object is shared by the node's threads: a single connection guarded by a lock
(SQLite serialises writers anyway). Other processes (``spine-node status``, ``send --queue``) open
their own :class:`Index` on the same file; WAL lets them read while the node writes.

``synchronous=NORMAL`` in WAL mode is durable against a crash of the process (the case the node
is tested for) but a power loss can lose the last transactions; the instance files themselves
are fsynced before Success.

References
----------
SQLite WAL: https://www.sqlite.org/wal.html ; PRAGMA user_version for schema versions.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.errors import IndexDatabaseError

logger = logging.getLogger(__name__)

#: Each entry migrates from version i to i+1. Append, never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE patients (
        id INTEGER PRIMARY KEY,
        patient_id TEXT NOT NULL,
        issuer TEXT NOT NULL DEFAULT '',
        patient_name TEXT,
        birth_date TEXT,
        UNIQUE (patient_id, issuer)
    );
    CREATE TABLE studies (
        study_uid TEXT PRIMARY KEY,
        patient_key INTEGER REFERENCES patients(id),
        study_date TEXT,
        accession_number TEXT,
        state TEXT NOT NULL DEFAULT 'receiving',
        amended INTEGER NOT NULL DEFAULT 0,
        first_received REAL NOT NULL,
        last_received REAL NOT NULL,
        stable_at REAL,
        stable_count INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX studies_state ON studies(state);
    CREATE TABLE series (
        series_uid TEXT PRIMARY KEY,
        study_uid TEXT NOT NULL REFERENCES studies(study_uid),
        modality TEXT,
        series_number INTEGER,
        series_description TEXT
    );
    CREATE INDEX series_study ON series(study_uid);
    CREATE TABLE associations (
        id INTEGER PRIMARY KEY,
        direction TEXT NOT NULL,
        peer_ae TEXT,
        peer_host TEXT,
        peer_port INTEGER,
        started REAL NOT NULL,
        ended REAL,
        n_ok INTEGER NOT NULL DEFAULT 0,
        n_warning INTEGER NOT NULL DEFAULT 0,
        n_failed INTEGER NOT NULL DEFAULT 0,
        outcome TEXT
    );
    CREATE TABLE instances (
        sop_instance_uid TEXT PRIMARY KEY,
        sop_class_uid TEXT NOT NULL,
        series_uid TEXT NOT NULL REFERENCES series(series_uid),
        study_uid TEXT NOT NULL REFERENCES studies(study_uid),
        transfer_syntax_uid TEXT NOT NULL,
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        received REAL NOT NULL,
        calling_ae TEXT,
        association_id INTEGER
    );
    CREATE INDEX instances_series ON instances(series_uid);
    CREATE INDEX instances_study ON instances(study_uid);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        kind TEXT NOT NULL,
        study_uid TEXT,
        sop_instance_uid TEXT,
        detail TEXT
    );
    CREATE INDEX events_kind ON events(kind);
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL,
        sop_instance_uid TEXT NOT NULL,
        sop_class_uid TEXT NOT NULL,
        destination TEXT NOT NULL,
        reason TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'queued',
        tries INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL,
        last_status INTEGER,
        last_error TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE INDEX outbox_due ON outbox(state, next_attempt);
    """,
    # IHE IOCM rejection notes (node.rejection): rejected instances are hidden from analysis
    """
    CREATE TABLE rejections (
        sop_instance_uid TEXT PRIMARY KEY,
        note_uid TEXT NOT NULL,
        reason TEXT NOT NULL,
        time REAL NOT NULL
    );
    CREATE INDEX rejections_note ON rejections(note_uid);
    """,
)

SCHEMA_VERSION = len(MIGRATIONS)


def recovery_hint(storage: Path | None = None) -> str:
    """The recovery command a refusal names (docs/operations.md, "If the index is damaged")."""
    where = f"--storage {storage}" if storage is not None else "--storage <storage>"
    return (
        f"Recover: stop the node, run 'spine-node rebuild-index {where}' (or --config FILE;"
        " re-reads every stored file, keeps the old index as a backup; docs/operations.md,"
        " 'If the index is damaged')"
    )


def damaged_message(path: Path, detail: str, storage: Path | None = None) -> str:
    """The one-line refusal for a damaged index: the file, what SQLite said, how to recover."""
    detail = " ".join(detail.split())[:200]
    return f"index {path} is damaged ({detail}); the node will not use it. {recovery_hint(storage)}"


@dataclass(frozen=True)
class InstanceRecord:
    """One stored instance as the index knows it."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax_uid: str
    path: str
    size: int
    sha256: str
    received: float
    calling_ae: str | None


@dataclass(frozen=True)
class NewInstance:
    """What the store hands the index for a freshly written instance."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax_uid: str
    path: str
    size: int
    sha256: str
    calling_ae: str | None
    association_id: int | None
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str | None
    birth_date: str | None
    study_date: str | None
    accession_number: str | None
    modality: str | None
    series_number: int | None
    series_description: str | None
    #: an IOCM rejection note (node.rejection): the SOP Instance UIDs it rejects, and why
    rejects: tuple[str, ...] = ()
    rejection_reason: str | None = None


class Index:
    """The SQLite index of one node.

    Parameters
    ----------
    path : Path
        The database file (created with its folder when missing).
    timeout_s : float
        How long (s) to wait for another process's write lock before failing.
    """

    def __init__(self, path: Path, *, timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        # the index holds names, IDs and birth dates: owner-only whatever the umask
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.RLock()
        #: extension schemas already checked by this connection
        self._extensions: set[tuple[str, int]] = set()
        try:
            if not self.path.exists():
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
            self._conn = sqlite3.connect(
                str(self.path),
                timeout=timeout_s,
                check_same_thread=False,
                isolation_level=None,
            )
        except (OSError, sqlite3.Error) as err:
            raise IndexDatabaseError(f"cannot open index database {self.path}: {err}") from err
        self._conn.row_factory = sqlite3.Row
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as err:
            # a truncated or overwritten file: a clear refusal, not a traceback (issue 17)
            self._conn.close()
            if isinstance(err, sqlite3.OperationalError) and "locked" in str(err):
                raise IndexDatabaseError(f"index {self.path} is locked: {err}") from err
            raise IndexDatabaseError(damaged_message(self.path, str(err))) from err
        self._restrict_permissions()

    def _restrict_permissions(self) -> None:
        """Mode 0600 for the database and its ``-wal``/``-shm`` files (SQLite gives those the
        database's mode; an index made by an older node may be 0644)."""
        for suffix in ("", "-wal", "-shm"):
            file = self.path.with_name(self.path.name + suffix)
            try:
                if file.exists() and file.stat().st_mode & 0o077:
                    os.chmod(file, 0o600)
            except OSError as err:  # another user's index opened read-only: not ours to fix
                logger.debug("cannot restrict the mode of %s: %s", file.name, err.strerror)

    # -- integrity ------------------------------------------------------------------------------
    def check_integrity(self, *, full: bool = False, max_errors: int = 20) -> list[str]:
        """SQLite's own consistency check of the database file.

        Parameters
        ----------
        full : bool
            ``PRAGMA integrity_check`` (also checks that every index matches its table: reads
            everything, for ``spine-node verify``) instead of ``PRAGMA quick_check`` (page and
            record structure, fast enough for every start-up).
        max_errors : int
            At most this many problems are listed.

        Returns
        -------
        list of str
            The problems found; empty when the database is sound.
        """
        pragma = "integrity_check" if full else "quick_check"
        try:
            rows = self.query(f"PRAGMA {pragma}({int(max_errors)})")
        except sqlite3.DatabaseError as err:
            return [str(err)]
        problems = [str(row[0]) for row in rows]
        return [] if problems == ["ok"] else problems

    # -- plumbing -------------------------------------------------------------------------------
    def _migrate(self) -> None:
        with self._lock:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise IndexDatabaseError(
                    f"index {self.path} has schema version {version}, newer than this node "
                    f"({SCHEMA_VERSION}); upgrade the node"
                )
            for target in range(version, SCHEMA_VERSION):
                logger.info("migrating index %s to schema version %d", self.path, target + 1)
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in MIGRATIONS[target].split(";"):
                        if statement.strip():
                            self._conn.execute(statement)
                    self._conn.execute(f"PRAGMA user_version={target + 1}")
                    self._conn.execute("COMMIT")
                except sqlite3.Error:
                    self._conn.execute("ROLLBACK")
                    raise

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``) under the index lock."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Run a read-only query and return all rows."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def select(self, table: str, order_by: str, **equal: Any) -> list[sqlite3.Row]:
        """Rows of ``table`` whose columns equal the given values (``None`` values are no
        filter), ordered by ``order_by``. Table and column names come from the caller's code,
        never from input; values are bound parameters."""
        sql = f"SELECT * FROM {table}"
        clauses = [f"{column}=?" for column, value in equal.items() if value is not None]
        params = [value for value in equal.values() if value is not None]
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        return self.query(f"{sql} ORDER BY {order_by}", params)

    def close(self) -> None:
        """Close the connection (checkpointing the WAL)."""
        with self._lock:
            self._conn.close()

    # -- extension schemas ----------------------------------------------------------------------
    def ensure_extension_schema(self, name: str, migrations: Sequence[str]) -> int:
        """Create or migrate the tables of a part of the node that keeps its own schema.

        Parts such as the timeline or the follow-up tracker version their tables in
        ``<name>_schema_version`` (one row), independently of the core schema, with the same
        rules: migrations run in order inside one transaction, and a newer schema than this node
        knows is refused.

        Returns
        -------
        int
            The schema version now in place (``len(migrations)``).

        Raises
        ------
        IndexDatabaseError
            The database holds a newer schema of this part than the node knows.
        """
        target_version = len(migrations)
        with self._lock:
            if (name, target_version) in self._extensions:
                return target_version
        table = f"{name}_schema_version"
        with self.transaction() as db:
            db.execute(f"CREATE TABLE IF NOT EXISTS {table} (version INTEGER NOT NULL)")
            row = db.execute(f"SELECT version FROM {table}").fetchone()
            version = 0 if row is None else int(row[0])
            if row is None:
                db.execute(f"INSERT INTO {table} (version) VALUES (0)")
            if version > target_version:
                raise IndexDatabaseError(
                    f"{name} tables have schema version {version}, newer than this node "
                    f"({target_version}); upgrade the node"
                )
            for target in range(version, target_version):
                logger.info("migrating %s tables of %s to version %d", name, self.path, target + 1)
                for statement in migrations[target].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"UPDATE {table} SET version=?", (target + 1,))
        with self._lock:
            self._extensions.add((name, target_version))
        return target_version

    # -- instances ------------------------------------------------------------------------------
    def instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        """The stored instance with this SOP Instance UID, or ``None``."""
        rows = self.query(
            "SELECT sop_instance_uid, sop_class_uid, series_uid, study_uid, transfer_syntax_uid,"
            " path, size, sha256, received, calling_ae FROM instances WHERE sop_instance_uid=?",
            (sop_instance_uid,),
        )
        return InstanceRecord(**dict(rows[0])) if rows else None

    def add_instance(self, new: NewInstance, *, now: float | None = None) -> None:
        """Record a stored instance and (re)open its study for receiving.

        A study that was stable goes back to ``receiving`` and is flagged ``amended``.
        """
        now = time.time() if now is None else now
        with self.transaction() as db:
            self._insert_instance(db, new, now)

    def add_instances(self, instances: Sequence[tuple[NewInstance, float]]) -> None:
        """Record several stored instances in one transaction (an import's batch).

        The same rows as :meth:`add_instance` for each ``(instance, received time)`` in turn;
        if any row fails, none is recorded.
        """
        if not instances:
            return
        with self.transaction() as db:
            for new, now in instances:
                self._insert_instance(db, new, now)

    @staticmethod
    def _insert_instance(db: sqlite3.Connection, new: NewInstance, now: float) -> None:
        """The statements of :meth:`add_instance`, inside the caller's transaction."""
        db.execute(
            "INSERT INTO patients (patient_id, issuer, patient_name, birth_date)"
            " VALUES (?,?,?,?) ON CONFLICT (patient_id, issuer) DO NOTHING",
            (new.patient_id, new.issuer_of_patient_id, new.patient_name, new.birth_date),
        )
        patient_key = db.execute(
            "SELECT id FROM patients WHERE patient_id=? AND issuer=?",
            (new.patient_id, new.issuer_of_patient_id),
        ).fetchone()[0]
        db.execute(
            "INSERT INTO studies (study_uid, patient_key, study_date, accession_number,"
            " state, first_received, last_received) VALUES (?,?,?,?,'receiving',?,?)"
            " ON CONFLICT (study_uid) DO UPDATE SET"
            "  amended = CASE WHEN state='stable' THEN 1 ELSE amended END,"
            "  state='receiving', last_received=excluded.last_received",
            (new.study_uid, patient_key, new.study_date, new.accession_number, now, now),
        )
        db.execute(
            "INSERT INTO series (series_uid, study_uid, modality, series_number,"
            " series_description) VALUES (?,?,?,?,?) ON CONFLICT (series_uid) DO NOTHING",
            (
                new.series_uid,
                new.study_uid,
                new.modality,
                new.series_number,
                new.series_description,
            ),
        )
        db.execute(
            "INSERT INTO instances (sop_instance_uid, sop_class_uid, series_uid, study_uid,"
            " transfer_syntax_uid, path, size, sha256, received, calling_ae, association_id)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                new.sop_instance_uid,
                new.sop_class_uid,
                new.series_uid,
                new.study_uid,
                new.transfer_syntax_uid,
                new.path,
                new.size,
                new.sha256,
                now,
                new.calling_ae,
                new.association_id,
            ),
        )
        if new.rejection_reason is not None:
            db.executemany(
                "INSERT INTO rejections (sop_instance_uid, note_uid, reason, time)"
                " VALUES (?,?,?,?) ON CONFLICT (sop_instance_uid) DO NOTHING",
                [(uid, new.sop_instance_uid, new.rejection_reason, now) for uid in new.rejects],
            )
            db.execute(
                "INSERT INTO events (time, kind, study_uid, sop_instance_uid, detail)"
                " VALUES (?,?,?,?,?)",
                (
                    now,
                    "instances_rejected",
                    new.study_uid,
                    new.sop_instance_uid,
                    f"{len(new.rejects)} instance(s): {new.rejection_reason}",
                ),
            )

    def forget_instance(self, sop_instance_uid: str, *, kind: str, detail: str) -> bool:
        """Remove the row of an instance whose file is gone, recording event ``kind``.

        The row and the event are written in one transaction. The study and series rows stay
        (other instances, analyses and events refer to them).

        Returns
        -------
        bool
            Whether a row was removed.
        """
        with self.transaction() as db:
            row = db.execute(
                "SELECT study_uid FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)
            ).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,))
            db.execute(
                "INSERT INTO events (time, kind, study_uid, sop_instance_uid, detail)"
                " VALUES (?,?,?,?,?)",
                (time.time(), kind, row[0], sop_instance_uid, detail),
            )
        return True

    def study_instances(self, study_uid: str) -> list[InstanceRecord]:
        """All instances of a study (for the analysis a stable study starts)."""
        rows = self.query(
            "SELECT sop_instance_uid, sop_class_uid, series_uid, study_uid, transfer_syntax_uid,"
            " path, size, sha256, received, calling_ae FROM instances WHERE study_uid=?"
            " ORDER BY series_uid, received",
            (study_uid,),
        )
        return [InstanceRecord(**dict(r)) for r in rows]

    # -- studies --------------------------------------------------------------------------------
    def receiving_studies(self) -> list[tuple[str, float]]:
        """Studies still receiving, as ``(study_uid, last_received)`` (re-armed at start-up)."""
        rows = self.query("SELECT study_uid, last_received FROM studies WHERE state='receiving'")
        return [(r[0], r[1]) for r in rows]

    def mark_stable(self, study_uid: str, *, now: float | None = None) -> bool | None:
        """Mark a receiving study stable; return whether it was amended (``None``: not receiving).

        The ``amended`` flag is cleared, so the next late instance flags it again.
        """
        now = time.time() if now is None else now
        with self.transaction() as db:
            row = db.execute(
                "SELECT amended, stable_count FROM studies WHERE study_uid=? AND state='receiving'",
                (study_uid,),
            ).fetchone()
            if row is None:
                return None
            amended = bool(row["amended"]) or row["stable_count"] > 0
            db.execute(
                "UPDATE studies SET state='stable', amended=0, stable_at=?,"
                " stable_count=stable_count+1 WHERE study_uid=?",
                (now, study_uid),
            )
            db.execute(
                "INSERT INTO events (time, kind, study_uid, detail) VALUES (?,?,?,?)",
                (now, "study_amended" if amended else "study_stable", study_uid, None),
            )
        return amended

    # -- events ---------------------------------------------------------------------------------
    def add_event(
        self,
        kind: str,
        *,
        study_uid: str | None = None,
        sop_instance_uid: str | None = None,
        detail: str | None = None,
    ) -> None:
        """Record an event (never with patient identifiers in ``detail``)."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO events (time, kind, study_uid, sop_instance_uid, detail)"
                " VALUES (?,?,?,?,?)",
                (time.time(), kind, study_uid, sop_instance_uid, detail),
            )

    def events(self, kind: str | None = None) -> list[sqlite3.Row]:
        """Recorded events, oldest first, optionally of one kind."""
        if kind is None:
            return self.query("SELECT * FROM events ORDER BY id")
        return self.query("SELECT * FROM events WHERE kind=? ORDER BY id", (kind,))

    # -- associations ---------------------------------------------------------------------------
    def open_association(
        self,
        direction: str,
        peer_ae: str | None,
        peer_host: str | None,
        peer_port: int | None,
        *,
        outcome: str | None = None,
    ) -> int:
        """Record the start of an association; returns its id."""
        now = time.time()
        with self.transaction() as db:
            cur = db.execute(
                "INSERT INTO associations (direction, peer_ae, peer_host, peer_port, started,"
                " ended, outcome) VALUES (?,?,?,?,?,?,?)",
                (
                    direction,
                    peer_ae,
                    peer_host,
                    peer_port,
                    now,
                    now if outcome is not None else None,
                    outcome,
                ),
            )
            return int(cur.lastrowid or 0)

    def close_association(
        self, association_id: int, *, outcome: str, n_ok: int, n_warning: int, n_failed: int
    ) -> None:
        """Record the end of an association with its counts."""
        with self.transaction() as db:
            db.execute(
                "UPDATE associations SET ended=?, outcome=?, n_ok=?, n_warning=?, n_failed=?"
                " WHERE id=? AND ended IS NULL",
                (time.time(), outcome, n_ok, n_warning, n_failed, association_id),
            )
