"""Shared test fixtures: where the reference data lives, and scratch space."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["tests.phantom_fixtures"]

REPO = Path(__file__).resolve().parents[1]
#: ../shared/data beside the checkout (CI lays a copy of shared/ there, read-only).
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


# The node's fixtures (issue 2): `node_factory` (spine-node serve subprocesses), `node_log_dir`,
# and the suite-wide log capture that fails the session on a seeded patient identifier.
pytest_plugins = [*pytest_plugins, "tests.node.fixtures", "tests.orthanc_fixture"]
