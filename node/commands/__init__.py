"""One module per ``spine-node`` sub-command (``add_arguments`` and ``run``)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from node.config import Settings


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The command-line options that win over the configuration file."""
    node: dict[str, Any] = {}
    if getattr(args, "port", None) is not None:
        node["port"] = args.port
    if getattr(args, "storage", None) is not None:
        node["storage"] = str(args.storage)
    if getattr(args, "bind", None) is not None:
        node["bind_address"] = args.bind
    return {"node": node} if node else {}


def command_settings(args: argparse.Namespace, command: str) -> Settings | None:
    """The node's settings for a sub-command (``--config`` with the command-line overrides);
    None after printing ``spine-node <command>: <error>`` when the file is invalid (exit 2)."""
    from node.config import load_settings
    from node.errors import ConfigError

    try:
        return load_settings(args.config, settings_overrides(args))
    except ConfigError as err:
        print(f"spine-node {command}: {err}", file=sys.stderr)
        return None
