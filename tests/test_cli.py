"""The command line is importable and lists the contract's sub-commands."""

from __future__ import annotations

import subprocess
import sys

from node.cli import COMMANDS, build_parser


def test_contract_commands_are_declared():
    expected = {
        "serve",
        "analyze",
        "phantom",
        "maps",
        "train",
        "demo",
        "echo",
        "send",
        "status",
        "reprocess",
    }
    assert expected <= set(COMMANDS)


def test_help_runs():
    out = subprocess.run(
        [sys.executable, "-m", "node.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "serve" in out.stdout and "phantom" in out.stdout


def test_parser_builds():
    assert build_parser().prog == "spine-node"
