"""Node test helpers, importable as ``tests.node.conftest`` (they live in ``tests.node.fixtures``,
which ``tests/conftest.py`` registers as a plugin for the whole suite, fixtures included)."""

from __future__ import annotations

from tests.node.fixtures import REPO, NodeProcess, free_port, require_tool, write_config

__all__ = ["REPO", "NodeProcess", "free_port", "require_tool", "write_config"]
