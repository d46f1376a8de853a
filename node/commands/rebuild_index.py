"""``spine-node rebuild-index``: make a new index from the stored files (node stopped).

The recovery for a damaged, truncated or deleted index (``serve`` refuses to start on one):

1. every file under ``instances/`` is read (header only) and hashed, as the receive path does,
   into a new index ``index.sqlite3.rebuild``; a file that cannot be indexed (not DICOM, no
   valid UIDs, a second file of one instance) is moved to ``quarantine/`` with a ``.error``
   reason, and listed;
2. what the old index still holds is carried over, table by table, where SQLite can read it:
   events, associations, outbox, rejections, the state of the studies, and the tables of the
   node's other parts (timelines, follow-ups...); a table that cannot be read is named in the
   output and starts empty;
3. studies without a recovered state are marked ``stable`` (they were received before the
   rebuild: no re-analysis, no result sent again, only a new instance amends them);
4. the old index (with its ``-wal``) is copied to ``index.sqlite3.before-rebuild-<time>``, and
   the new one renamed over it (``os.replace``: the index file is never absent).

Run it with the node stopped. Output names counts and storage paths, never patient data
(docs/operations.md, "If the index is damaged").
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from node.commands import command_settings
from node.errors import NodeError
from node.index import Index, NewInstance
from node.store import Store

#: rows recorded per index transaction
BATCH = 500
#: core tables whose rows are carried over from the old index (instances are re-read instead)
CARRIED_TABLES = ("events", "associations", "outbox", "rejections")


@dataclass
class RebuildResult:
    """What :func:`rebuild` did (storage paths relative to the storage folder)."""

    indexed: int = 0
    backup: Path | None = None
    recovered: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="TOML configuration file")
    parser.add_argument("--storage", type=Path, default=None, help="storage folder (overrides)")


def _remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


def _carry_over(old_path: Path, new: Index) -> tuple[list[str], list[str]]:
    """Copy what the old index still holds into ``new``; ``(recovered, lost)`` table names."""
    recovered: list[str] = []
    lost: list[str] = []
    try:
        old = sqlite3.connect(f"{old_path.resolve().as_uri()}?mode=ro", uri=True)
        names = [
            (str(r[0]), str(r[1]))
            for r in old.execute("SELECT name, sql FROM sqlite_master WHERE type='table'")
        ]
    except sqlite3.DatabaseError as err:
        return [], [f"all ({err})"]
    try:
        existing = {str(r[0]) for r in new.query("SELECT name FROM sqlite_master")}
        new.query("PRAGMA foreign_keys=OFF")
        for name, create_sql in names:
            if name.startswith("sqlite_") or name in ("instances", "patients", "series"):
                continue
            try:
                rows = old.execute(f'SELECT * FROM "{name}"').fetchall()
                columns = [d[0] for d in old.execute(f'SELECT * FROM "{name}" LIMIT 0').description]
                with new.transaction() as db:
                    if name not in existing:
                        db.execute(create_sql)
                        for (index_sql,) in old.execute(
                            "SELECT sql FROM sqlite_master WHERE type='index' AND tbl_name=?"
                            " AND sql IS NOT NULL",
                            (name,),
                        ):
                            db.execute(index_sql)
                    if name == "studies":
                        db.executemany(
                            "UPDATE studies SET state=?, amended=?, first_received=?,"
                            " stable_at=?, stable_count=? WHERE study_uid=?",
                            [
                                (r["state"], r["amended"], r["first_received"], r["stable_at"])
                                + (r["stable_count"], r["study_uid"])
                                for r in (dict(zip(columns, row, strict=True)) for row in rows)
                            ],
                        )
                    else:
                        if name.endswith("_schema_version") and name in existing:
                            db.execute(f'DELETE FROM "{name}"')
                        marks = ",".join("?" * len(columns))
                        cols = ",".join(f'"{c}"' for c in columns)
                        db.executemany(
                            f'INSERT OR IGNORE INTO "{name}" ({cols}) VALUES ({marks})', rows
                        )
                recovered.append(name)
            except (sqlite3.DatabaseError, KeyError) as err:
                lost.append(f"{name} ({type(err).__name__}: {str(err)[:80]})")
    finally:
        old.close()
        new.query("PRAGMA foreign_keys=ON")
    return recovered, lost


def _set_aside(store: Store, file: Path, reason: str) -> str:
    """Move a stored file the rebuild cannot index into ``quarantine/`` with a ``.error``
    reason (an unindexed file would keep the store inconsistent, and a store of such files
    alone would be refused at start-up); returns its new path relative to the storage."""
    stem = f"rebuild-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
    target = store.quarantine_dir / f"{stem}.dcm"
    os.replace(file, target)
    (store.quarantine_dir / f"{stem}.error").write_text(
        f"{reason} (was {file.relative_to(store.root)})\n", encoding="utf-8"
    )
    return str(target.relative_to(store.root))


def rebuild(database_path: Path, storage: Path) -> RebuildResult:
    """Rebuild the index of the store at ``storage`` into ``database_path`` (see the module
    docstring)."""

    database_path = Path(database_path)
    work = database_path.with_name(database_path.name + ".rebuild")
    _remove_database(work)
    new = Index(work)
    store = Store(storage, new)
    indexed = 0
    unreadable: list[str] = []
    duplicates: list[str] = []
    seen: set[str] = set()
    batch: list[tuple[NewInstance, float]] = []
    try:
        for dirpath, dirnames, filenames in os.walk(store.instances_dir):
            dirnames.sort()
            for name in sorted(filenames):
                file = Path(dirpath) / name
                relative = str(file.relative_to(store.root))
                try:
                    record = store.describe_stored(file)
                    received = file.stat().st_mtime
                except (NodeError, OSError) as err:
                    reason = f"not indexed by rebuild-index: {type(err).__name__}"
                    unreadable.append(f"{relative} -> {_set_aside(store, file, reason)}")
                    continue
                if record.sop_instance_uid in seen:
                    reason = "not indexed by rebuild-index: a second file of the same instance"
                    duplicates.append(f"{relative} -> {_set_aside(store, file, reason)}")
                    continue
                seen.add(record.sop_instance_uid)
                batch.append((record, received))
                if len(batch) >= BATCH:
                    new.add_instances(batch)
                    indexed += len(batch)
                    batch = []
        new.add_instances(batch)
        indexed += len(batch)
        now = time.time()
        with new.transaction() as db:
            db.execute("UPDATE studies SET state='stable', stable_at=?, stable_count=1", (now,))
        recovered: list[str] = []
        lost: list[str] = []
        if database_path.exists():
            recovered, lost = _carry_over(database_path, new)
        new.add_event(
            "index_rebuilt",
            detail=f"{indexed} instance(s) re-read from stored files, {len(unreadable)}"
            f" unreadable; tables recovered: {', '.join(recovered) or 'none'}",
        )
    finally:
        new.close()
    backup = None
    if database_path.exists():
        backup = database_path.with_name(
            f"{database_path.name}.before-rebuild-{time.strftime('%Y%m%dT%H%M%S')}"
        )
        for suffix in ("", "-wal"):
            source = database_path.with_name(database_path.name + suffix)
            if source.exists():
                target = backup.with_name(backup.name + suffix)
                shutil.copyfile(source, target)
                os.chmod(target, 0o600)
        # the old -wal must not be replayed into the new file
        for suffix in ("-wal", "-shm", "-journal"):
            database_path.with_name(database_path.name + suffix).unlink(missing_ok=True)
    os.replace(work, database_path)
    _remove_database(work)
    return RebuildResult(
        indexed=indexed,
        backup=backup,
        recovered=recovered,
        lost=lost,
        unreadable=unreadable,
        duplicates=duplicates,
    )


def run(args: argparse.Namespace) -> int:
    settings = command_settings(args, "rebuild-index")
    if settings is None:
        return 2
    try:
        result = rebuild(settings.node.database_path, settings.node.storage)
    except (NodeError, OSError, sqlite3.Error) as err:
        print(f"spine-node rebuild-index: failed, old index left in place: {err}", file=sys.stderr)
        return 1
    print(f"index {settings.node.database_path}: {result.indexed} instance(s) re-indexed")
    if result.backup is not None:
        print(f"old index kept as {result.backup}")
    print(f"recovered from the old index: {', '.join(result.recovered) or 'nothing'}")
    for item in result.lost:
        print(f"not recovered: {item}")
    for item in result.unreadable:
        print(f"unreadable, not indexed, moved: {item}")
    for item in result.duplicates:
        print(f"second file of an already indexed instance, moved: {item}")
    return 0
