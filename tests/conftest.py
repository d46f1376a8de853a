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

#: The suite's longest files, longest first (1.5-5 min each on the 2-core machine; most other
#: files take seconds, none much more than a minute). ``make test`` runs 3 xdist workers with
#: ``--dist loadfile --no-loadscope-reorder``: a file runs whole on one worker, and files are
#: handed out in collection order, so these go first, the short files fill in behind them, and
#: the workers finish together (pytest-xdist's default order, by number of tests, would start
#: them last). A file that grows long belongs here (``make test`` prints the slowest tests).
LONGEST_FIRST = (
    "tests/node/test_cohort.py",
    "tests/e2e/test_analyze_scenarios.py",
    "tests/e2e/test_node_roundtrip.py",
    "tests/e2e/test_priors_orthanc.py",
    "tests/e2e/test_analyze_reruns.py",
    "tests/e2e/test_demo.py",
    "tests/e2e/test_ohif.py",
    "tests/processing/test_maps.py",
    "tests/e2e/test_orthanc_roundtrip.py",
    "tests/processing/test_classify.py",
    "tests/node/test_map_cache.py",
    "tests/e2e/test_analyze.py",
    "tests/processing/test_phantom.py",
    "tests/e2e/test_scanner_adc_qa.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the files of :data:`LONGEST_FIRST` first, in that order (the others keep theirs)."""
    rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
