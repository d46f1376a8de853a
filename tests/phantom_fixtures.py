"""Session-scoped phantom patients for every test that needs one (registered in tests/conftest.py).

``make_phantom(scenario, vendor, size, seed=7, followups=1, sagittal=False)`` writes a patient once per test
run and returns its folder; the folder holds ``baseline/``, ``rt/``, ``followup1/`` ... and
``ground_truth.json`` (layout: processing.phantom). ``phantom_small`` is the standard-vendor,
small-size responder.

With pytest-xdist the workers share one phantom cache (in the run's common temporary folder): the
first worker that needs a patient writes it under a file lock into a temporary folder and renames
it into place; the others wait for the lock and reuse it. The phantom is deterministic, so which
worker writes it does not matter. Tests must not modify a cached phantom.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

PHANTOM_SEED = 7


@pytest.fixture(scope="session")
def make_phantom(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    from filelock import FileLock

    from node.commands.phantom import write_phantom

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # common to every worker of this run
    root = root / "phantom-cache"
    root.mkdir(exist_ok=True)

    def _make(
        scenario: str = "responder",
        vendor: str = "standard",
        size: str = "small",
        seed: int = PHANTOM_SEED,
        followups: int = 1,
        sagittal: bool = False,
    ) -> Path:
        name = f"{scenario}-{vendor}-{size}-{seed}-{followups}{'-sag' if sagittal else ''}"
        out = root / name / "patient"
        with FileLock(str(root / f"{name}.lock")):
            if not out.is_dir():
                partial = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
                write_phantom(
                    partial / "patient",
                    seed=seed,
                    scenario=scenario,
                    vendor=vendor,
                    size=size,
                    followups=followups,
                    sagittal=sagittal,
                )
                out.parent.mkdir(exist_ok=True)
                os.rename(partial / "patient", out)
                partial.rmdir()
        return out

    return _make


@pytest.fixture(scope="session")
def phantom_small(make_phantom: Callable[..., Path]) -> Path:
    """Folder of the small standard responder phantom (seed 7, one follow-up)."""
    return make_phantom("responder", "standard", "small")
