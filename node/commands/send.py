"""``spine-node send PATH... --to AE@host:port``: C-STORE files or folders to a peer.

With ``--queue`` the files go into the node's durable outbox instead (``--to`` is then a
configured destination name) and the running node delivers them with retries.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from node.commands import command_settings
from node.errors import PeerError, is_success_or_warning


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders")
    parser.add_argument(
        "--to",
        required=True,
        help="AE@host:port, or a configured peer name (required with --queue)",
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML configuration file")
    parser.add_argument(
        "--storage",
        type=Path,
        default=None,
        help="storage folder (overrides the file; for --queue)",
    )
    parser.add_argument(
        "--queue", action="store_true", help="queue in the node's outbox instead of sending now"
    )
    parser.add_argument("--reason", default="manual send", help="reason recorded with --queue")
    parser.add_argument("--calling-ae", default=None, help="our AE title (default: the node's)")
    parser.add_argument("--timeout", type=float, default=60.0, help="timeouts in seconds")


def run(args: argparse.Namespace) -> int:
    from node.scu import PeerAddress, expand_paths, peer_address, send_files

    settings = command_settings(args, "send")
    if settings is None:
        return 2
    files = expand_paths(args.paths)
    if not files:
        print("spine-node send: no files found", file=sys.stderr)
        return 2
    if args.queue:
        from node.dispatch import Outbox
        from node.index import Index
        from node.store import Store

        index = Index(settings.node.database_path)
        try:
            store = Store(settings.node.storage, index)
            ids = Outbox(index, store, settings).enqueue(files, args.to, args.reason)
        except KeyError as err:
            print(f"spine-node send: {err.args[0]}", file=sys.stderr)
            return 2
        finally:
            index.close()
        print(f"queued {len(ids)} instance(s) for {args.to}")
        return 0
    try:
        if "@" in args.to:
            peer = PeerAddress.parse(args.to)
        else:
            peer = peer_address(settings.peer(args.to), settings)
    except (KeyError, ValueError) as err:
        print(f"spine-node send: {err}", file=sys.stderr)
        return 2
    try:
        results = send_files(
            files,
            peer,
            calling_ae=args.calling_ae or settings.node.ae_title,
            timeout_s=args.timeout,
        )
    except PeerError as err:
        print(f"spine-node send: {err}", file=sys.stderr)
        return 1
    failed = [r for r in results if not is_success_or_warning(r.status)]
    for r in failed:
        status = "none" if r.status is None else f"0x{r.status:04X}"
        print(f"FAILED {r.path} status {status} {r.error or ''}".rstrip())
    print(f"sent {len(results) - len(failed)} of {len(results)} instance(s) to {peer}")
    return 0 if not failed else 1
