"""Benchmarks run by ``make bench`` (``python -m tests.bench``), and what they share."""

from __future__ import annotations

from pathlib import Path


def phantom_sizes(choice: str, keep: Path | None) -> list[tuple[str, Path | None]]:
    """The phantom sizes a benchmark's ``--size`` asks for (``both``: small, then full), each
    with its folder under ``--keep``: the folder itself for one size, a sub-folder per size for
    both, None (a temporary folder) without ``--keep``."""
    sizes = ["small", "full"] if choice == "both" else [choice]
    if keep is None:
        return [(size, None) for size in sizes]
    return [(size, keep / size if len(sizes) > 1 else keep) for size in sizes]
