"""``spine-node verify [--repair]``: check the index against the stored files.

1. ``PRAGMA integrity_check`` of the index (the full check; ``serve`` runs the quick one);
2. every indexed instance: its file is there (else *missing*), with the indexed size and
   SHA-256 (else *changed*);
3. every file under ``instances/``: indexed (else *orphaned*).

Exit status 0 when the store and the index are consistent, 1 otherwise (2: bad arguments).
``--repair`` removes the index rows of missing files (a ``verify_repair`` event for each), which
is always safe: the node no longer claims instances it does not hold, and a peer's next copy is
stored again. Orphaned and changed files are only listed: ``spine-node rebuild-index``
re-indexes every stored file. Output names files by their storage path and instances by SOP
Instance UID, never by patient data (docs/operations.md, "If the index is damaged").
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from node.commands import command_settings
from node.errors import NodeError
from node.index import Index


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="TOML configuration file")
    parser.add_argument("--storage", type=Path, default=None, help="storage folder (overrides)")
    parser.add_argument(
        "--repair",
        action="store_true",
        help="remove the index rows of missing files (recorded as events)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")


@dataclass
class Report:
    """What :func:`verify` found (storage paths relative to the storage folder)."""

    integrity: list[str] = field(default_factory=list)
    instances: int = 0
    files: int = 0
    missing: list[dict[str, str]] = field(default_factory=list)
    changed: list[dict[str, str]] = field(default_factory=list)
    orphaned: list[str] = field(default_factory=list)
    repaired: int = 0

    @property
    def consistent(self) -> bool:
        return not (self.integrity or self.missing or self.changed or self.orphaned)


def verify(index: Index, root: Path, *, repair: bool = False) -> Report:
    """Check ``index`` against the files of the store at ``root`` (see the module docstring).

    Parameters
    ----------
    index : Index
        The node's index.
    root : Path
        The storage folder (indexed paths are relative to it).
    repair : bool
        Remove the rows of missing files (a ``verify_repair`` event each).

    Returns
    -------
    Report
    """
    from node.store import stored_digest

    report = Report(integrity=index.check_integrity(full=True))
    root = Path(root).resolve()
    try:
        rows = index.query("SELECT sop_instance_uid, path, size, sha256 FROM instances")
    except sqlite3.DatabaseError as err:
        report.integrity.append(f"instances unreadable: {err}")
        rows = []
    report.instances = len(rows)
    indexed: set[str] = set()
    for row in rows:
        file = root / row["path"]
        indexed.add(os.path.normpath(file))
        entry = {"sop_instance_uid": row["sop_instance_uid"], "path": row["path"]}
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            report.missing.append(entry)
            continue
        try:
            if size != row["size"]:
                report.changed.append({**entry, "problem": "size differs"})
            elif stored_digest(file) != row["sha256"]:
                report.changed.append({**entry, "problem": "sha256 differs"})
        except (OSError, NodeError) as err:
            report.changed.append({**entry, "problem": f"unreadable: {type(err).__name__}"})
    instances_dir = root / "instances"
    for dirpath, _dirnames, filenames in os.walk(instances_dir):
        for name in filenames:
            report.files += 1
            file = os.path.normpath(os.path.join(dirpath, name))
            if file not in indexed:
                report.orphaned.append(os.path.relpath(file, root))
    report.orphaned.sort()
    if repair and report.missing:
        for entry in report.missing:
            if index.forget_instance(
                entry["sop_instance_uid"],
                kind="verify_repair",
                detail=f"file {entry['path']} missing: row removed by spine-node verify --repair",
            ):
                report.repaired += 1
        report.missing = []
    return report


def run(args: argparse.Namespace) -> int:
    settings = command_settings(args, "verify")
    if settings is None:
        return 2
    path = settings.node.database_path
    if not path.exists():
        print(
            f"spine-node verify: no index at {path}; 'spine-node rebuild-index' makes one from "
            "the stored files",
            file=sys.stderr,
        )
        return 1
    try:
        index = Index(path)
    except NodeError as err:
        print(f"spine-node verify: {err}", file=sys.stderr)
        return 1
    try:
        report = verify(index, settings.node.storage, repair=args.repair)
    finally:
        index.close()
    if args.json:
        print(json.dumps({**asdict(report), "consistent": report.consistent}, indent=2))
        return 0 if report.consistent else 1
    print(f"index {path}: {'; '.join(report.integrity) if report.integrity else 'integrity ok'}")
    print(f"{report.instances} indexed instance(s), {report.files} stored file(s)")
    for entry in report.missing:
        print(f"missing  {entry['sop_instance_uid']} {entry['path']}")
    for entry in report.changed:
        print(f"changed  {entry['sop_instance_uid']} {entry['path']} ({entry['problem']})")
    for orphan in report.orphaned:
        print(f"orphaned {orphan}")
    if report.repaired:
        print(f"repaired: {report.repaired} row(s) of missing files removed from the index")
    if report.consistent:
        print("consistent")
        return 0
    hint = " (--repair removes rows of missing files)" if report.missing else ""
    print(
        f"NOT consistent: {len(report.missing)} missing, {len(report.changed)} changed, "
        f"{len(report.orphaned)} orphaned{hint}; 'spine-node rebuild-index' re-indexes every "
        "stored file"
    )
    return 1
