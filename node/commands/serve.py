"""``spine-node serve``: run the node until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import threading
from pathlib import Path

from node.commands import command_settings
from node.errors import NodeError

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML configuration file (default: embedded defaults)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="listener TCP port, overrides the file (0 picks a free one)",
    )
    parser.add_argument(
        "--storage", type=Path, default=None, help="storage folder, overrides the file"
    )
    parser.add_argument("--bind", default=None, help="bind address, overrides the file")


def run(args: argparse.Namespace) -> int:
    from node.service import NodeService

    settings = command_settings(args, "serve")
    if settings is None:
        return 2
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("signal %s received: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        service = NodeService(settings)
        # this process's temporary files (pynetdicom writes each arriving dataset to one) go
        # to the storage's file system, where received files are hard-linked into the store and
        # leftovers of a crash are removed at the next start
        tempfile.tempdir = str(service.store.incoming_dir)
        host, port = service.start()
    except (NodeError, OSError) as err:
        print(f"spine-node serve: cannot start: {err}", file=sys.stderr)
        return 1
    message = f"{settings.node.ae_title} listening on {host}:{port}"
    logger.info(message)
    print(message, flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        service.stop()
        logger.info("stopped")
    return 0
