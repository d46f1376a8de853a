"""``spine-node reprocess --failed [--id N ...]``: re-queue failed outbox items.

The running node's dispatcher picks them up at its next poll. (Re-analysis of a study belongs
to the analysis part of the node and is not available here yet.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from node.commands import command_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="TOML configuration file")
    parser.add_argument("--storage", type=Path, default=None, help="storage folder (overrides)")
    parser.add_argument("--failed", action="store_true", help="re-queue every failed item")
    parser.add_argument("--id", type=int, nargs="+", default=None, help="outbox item ids")


def run(args: argparse.Namespace) -> int:
    from node.dispatch import Outbox
    from node.index import Index
    from node.store import Store

    if not args.failed and not args.id:
        print("spine-node reprocess: give --failed or --id N ...", file=sys.stderr)
        return 2
    settings = command_settings(args, "reprocess")
    if settings is None:
        return 2
    index = Index(settings.node.database_path)
    try:
        outbox = Outbox(index, Store(settings.node.storage, index), settings)
        count = outbox.requeue(None if args.failed and not args.id else args.id)
    finally:
        index.close()
    print(f"re-queued {count} outbox item(s)")
    return 0
