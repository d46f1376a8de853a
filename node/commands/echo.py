"""``spine-node echo``: C-ECHO a DICOM peer (or this node)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from node.config import load_settings
from node.errors import ConfigError, PeerError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--to",
        default=None,
        help="AE@host:port, or a peer name from the configuration; "
        "default: this node as configured",
    )
    parser.add_argument("--config", type=Path, default=None, help="TOML configuration file")
    parser.add_argument("--calling-ae", default=None, help="our AE title (default: ECHOSCU)")
    parser.add_argument("--timeout", type=float, default=30.0, help="timeouts in seconds")


def resolve_peer(target: str | None, config: Path | None) -> "PeerAddress":  # noqa: F821
    """``AE@host:port`` as given, or a configured peer's / the node's own address."""
    from node.scu import PeerAddress, peer_address

    if target and "@" in target:
        return PeerAddress.parse(target)
    settings = load_settings(config)
    if target:
        return peer_address(settings.peer(target), settings)
    node = settings.node
    host = "127.0.0.1" if node.bind_address in ("", "0.0.0.0") else node.bind_address
    return PeerAddress(node.ae_title, host, node.port)


def run(args: argparse.Namespace) -> int:
    from node.scu import echo

    try:
        peer = resolve_peer(args.to, args.config)
    except (ConfigError, KeyError, ValueError) as err:
        print(f"spine-node echo: {err}", file=sys.stderr)
        return 2
    try:
        status = echo(peer, calling_ae=args.calling_ae or "ECHOSCU", timeout_s=args.timeout)
    except PeerError as err:
        print(f"spine-node echo: {err}", file=sys.stderr)
        return 1
    print(f"C-ECHO {peer}: status 0x{status:04X}")
    return 0 if status == 0 else 1
