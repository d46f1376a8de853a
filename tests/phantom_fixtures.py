"""Session-scoped phantom patients for every test that needs one (registered in tests/conftest.py).

``make_phantom(scenario, vendor, size, seed=7, followups=1, sagittal=False)`` writes a patient
once per test run and returns its folder; the folder holds ``baseline/``, ``rt/``, ``followup1/``
... and ``ground_truth.json`` (layout: processing.phantom). ``phantom_small`` is the
standard-vendor, small-size responder.

``analyzed_phantom(scenario, ...)`` runs ``spine-node analyze`` (default settings, as a user would)
on such a patient once per test run and returns ``(patient, out)``: ``out`` holds the objects,
``summary.json`` and ``stdout.txt`` (the command's printed summary). Every test that only reads
the outputs of a phantom's analysis reads this shared run instead of analysing again (the chain is
the suite's most expensive step: about a minute per small patient).

With pytest-xdist the workers share one cache (in the run's common temporary folder): the first
worker that needs a patient (or an analysis) writes it under a file lock into a temporary folder
and renames it into place; the others wait for the lock and reuse it. Phantom and chain are
deterministic, so which worker writes it does not matter. Tests must not modify a cached folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

PHANTOM_SEED = 7
#: the run's shared map cache folder (:func:`shared_map_cache`)
MAP_CACHE = "map-cache"

#: an ``[analysis]`` table without radiomics, for the tests that check neither radiomics features
#: nor the size of the report: it halves the chain's time (the radiomics of every map, again for
#: each perturbation of the baseline ROI, and the ~2,000 SR items that carry them), and leaves every
#: other measurement, change, repeatability flag and call as it is (docs/science.md §2.4: feature
#: changes are exploratory, used only by a site model)
NO_RADIOMICS = "[analysis]\nradiomics = false\n"


def shared_maps(folder: Path) -> str:
    """The ``[analysis]`` line (after :data:`NO_RADIOMICS`) that points a node's map cache to
    :func:`shared_map_cache`: a node receiving a shared phantom by C-STORE then reuses the maps
    an ``analyze`` of the same files computed, and the other way round (the cache keys the
    instances' datasets, not the file meta information the node writes on receipt)."""
    return f'map_cache_dir = "{folder}"\n'


def _shared_root(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    """A folder common to every xdist worker of this run (the session's own one without xdist)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # common to every worker of this run
    root = root / name
    root.mkdir(exist_ok=True)
    return root


def _name(scenario: str, vendor: str, size: str, seed: int, followups: int, sagittal: bool) -> str:
    return f"{scenario}-{vendor}-{size}-{seed}-{followups}{'-sag' if sagittal else ''}"


def _cached(root: Path, name: str, leaf: str, write: Callable[[Path], None]) -> Path:
    """``root/name/leaf``, written once by ``write(folder)`` under a file lock shared by the
    xdist workers: into a temporary folder first, renamed into place when complete."""
    from filelock import FileLock

    out = root / name / leaf
    with FileLock(str(root / f"{name}.lock")):
        if not out.is_dir():
            partial = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
            write(partial / leaf)
            out.parent.mkdir(exist_ok=True)
            os.rename(partial / leaf, out)
            partial.rmdir()
    return out


@pytest.fixture(scope="session")
def make_phantom(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:

    from node.commands.phantom import write_phantom

    root = _shared_root(tmp_path_factory, "phantom-cache")

    def _make(
        scenario: str = "responder",
        vendor: str = "standard",
        size: str = "small",
        seed: int = PHANTOM_SEED,
        followups: int = 1,
        sagittal: bool = False,
    ) -> Path:
        return _cached(
            root,
            _name(scenario, vendor, size, seed, followups, sagittal),
            "patient",
            lambda folder: write_phantom(
                folder,
                seed=seed,
                scenario=scenario,
                vendor=vendor,
                size=size,
                followups=followups,
                sagittal=sagittal,
            ),
        )

    return _make


@pytest.fixture(scope="session")
def phantom_small(make_phantom: Callable[..., Path]) -> Path:
    """Folder of the small standard responder phantom (seed 7, one follow-up)."""
    return make_phantom("responder", "standard", "small")


def no_radiomics_config(folder: Path) -> Path:
    """A node configuration file in ``folder`` holding :data:`NO_RADIOMICS` only."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "no-radiomics.toml"
    path.write_text(NO_RADIOMICS, encoding="utf-8")
    return path


def run_analyze(paths: list[Path], out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``spine-node analyze <paths> --out <out> [extra]`` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "analyze", *map(str, paths), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="session")
def analyzed_phantom(
    tmp_path_factory: pytest.TempPathFactory, make_phantom: Callable[..., Path]
) -> Callable[..., tuple[Path, Path]]:
    """``analyze`` of a phantom patient, once per test run (shared by the xdist workers).

    The callable takes :func:`make_phantom`'s arguments, and ``radiomics=False`` for an analysis
    under :data:`NO_RADIOMICS`, and returns ``(patient, out)``. A failed
    analysis fails the test that asked for it (with the command's stderr), and is retried by the
    next one. The analysis keeps its maps in :func:`shared_map_cache`.
    """

    root = _shared_root(tmp_path_factory, "analysis-cache")
    map_cache = _shared_root(tmp_path_factory, MAP_CACHE)

    def _analyzed(
        scenario: str = "responder",
        vendor: str = "standard",
        size: str = "small",
        seed: int = PHANTOM_SEED,
        followups: int = 1,
        sagittal: bool = False,
        radiomics: bool = True,
    ) -> tuple[Path, Path]:
        patient = make_phantom(scenario, vendor, size, seed, followups, sagittal)
        name = _name(scenario, vendor, size, seed, followups, sagittal)
        if not radiomics:
            name += "-no-radiomics"

        def analyse(folder: Path) -> None:
            config = [] if radiomics else ["--config", str(no_radiomics_config(root / name))]
            run = run_analyze([patient], folder, "--map-cache", str(map_cache), *config)
            if run.returncode != 0:
                pytest.fail(f"analyze of the {name} phantom failed:\n{run.stderr[-3000:]}")
            (folder / "stdout.txt").write_text(run.stdout, encoding="utf-8")

        return patient, _cached(root, name, "out", analyse)

    return _analyzed


@pytest.fixture(scope="session")
def shared_map_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``analyze --map-cache`` folder of :func:`analyzed_phantom`'s analyses, common to the
    xdist workers: a test that analyses a shared phantom again (another ROI, another setting that
    leaves the maps alone, a subset of its studies) passes it and refits nothing that the shared
    analysis fitted, as a site's node re-analysing a patient does (node.map_cache: entries are
    keyed by the input instances and the map settings, written atomically). Ask for the shared
    analysis first, so that its entries are there. Tests of the maps themselves, and the
    determinism re-run, do not use it."""
    return _shared_root(tmp_path_factory, MAP_CACHE)
