"""``spine-node status``: studies per state, last associations, outbox (no patient data)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from node.commands import command_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="TOML configuration file")
    parser.add_argument("--storage", type=Path, default=None, help="storage folder (overrides)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--last", type=int, default=10, help="associations to list")


def collect(index: "Index", last: int = 10) -> dict[str, Any]:  # noqa: F821
    """The status as a dictionary (UIDs, counts and AE titles only)."""

    def rows(sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in index.query(sql, params)]

    return {
        "studies": {
            r["state"]: r["n"]
            for r in rows("SELECT state, COUNT(*) AS n FROM studies GROUP BY state")
        },
        "instances": index.query("SELECT COUNT(*) FROM instances")[0][0],
        "associations": rows(
            "SELECT id, direction, peer_ae, peer_host, peer_port, started, ended, n_ok,"
            " n_warning, n_failed, outcome FROM associations ORDER BY id DESC LIMIT ?",
            (last,),
        ),
        "outbox": {
            r["state"]: r["n"]
            for r in rows("SELECT state, COUNT(*) AS n FROM outbox GROUP BY state")
        },
        "outbox_failed": rows(
            "SELECT id, destination, sop_instance_uid, tries, last_status, last_error"
            " FROM outbox WHERE state='failed' ORDER BY id"
        ),
        "events": {
            r["kind"]: r["n"] for r in rows("SELECT kind, COUNT(*) AS n FROM events GROUP BY kind")
        },
    }


def run(args: argparse.Namespace) -> int:
    from node.index import Index

    settings = command_settings(args, "status")
    if settings is None:
        return 2
    path = settings.node.database_path
    if not path.exists():
        print(f"spine-node status: no index at {path}", file=sys.stderr)
        return 1
    index = Index(path)
    try:
        status = collect(index, args.last)
        if not args.json:
            from node.dashboard.state import worklist_text
            from node.timeline import timeline_text

            worklist, timelines = worklist_text(index), timeline_text(index)
    finally:
        index.close()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print("worklist:")
    print(worklist)
    if timelines.strip():
        print("lesion timelines:")
        print(timelines)
    print(f"studies: {status['studies'] or 'none'}   instances: {status['instances']}")
    print(f"outbox: {status['outbox'] or 'empty'}")
    for item in status["outbox_failed"]:
        print(
            f"  failed #{item['id']} -> {item['destination']} {item['sop_instance_uid']}"
            f" tries {item['tries']}: {item['last_error']}"
        )
    print("last associations:")
    for a in status["associations"]:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a["started"]))
        print(
            f"  #{a['id']} {a['direction']} {a['peer_ae']}@{a['peer_host']}:{a['peer_port']}"
            f" {started} {a['outcome'] or 'open'} ok={a['n_ok']} warn={a['n_warning']}"
            f" failed={a['n_failed']}"
        )
    return 0
