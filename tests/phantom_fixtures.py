"""Session-scoped phantom patients for every test that needs one (registered in tests/conftest.py).

``make_phantom(scenario, vendor, size, seed=7, followups=1, sagittal=False)`` writes a patient once per test
session (cached under pytest's ``tmp_path_factory``) and returns its folder; the folder holds
``baseline/``, ``rt/``, ``followup1/`` ... and ``ground_truth.json`` (layout: processing.phantom).
``phantom_small`` is the standard-vendor, small-size responder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

PHANTOM_SEED = 7


@pytest.fixture(scope="session")
def make_phantom(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    from node.commands.phantom import write_phantom

    cache: dict[tuple[str, str, str, int, int, bool], Path] = {}

    def _make(scenario: str = "responder", vendor: str = "standard", size: str = "small",
              seed: int = PHANTOM_SEED, followups: int = 1, sagittal: bool = False) -> Path:
        key = (scenario, vendor, size, seed, followups, sagittal)
        if key not in cache:
            base = tmp_path_factory.mktemp(f"phantom-{scenario}-{vendor}-{size}-{seed}-{followups}")
            out = base / "patient"
            write_phantom(out, seed=seed, scenario=scenario, vendor=vendor, size=size, followups=followups,
                          sagittal=sagittal)
            cache[key] = out
        return cache[key]

    return _make


@pytest.fixture(scope="session")
def phantom_small(make_phantom: Callable[..., Path]) -> Path:
    """Folder of the small standard responder phantom (seed 7, one follow-up)."""
    return make_phantom("responder", "standard", "small")
