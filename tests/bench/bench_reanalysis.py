"""Benchmark: re-analysing a patient when one more follow-up arrives, against a first analysis.

A phantom patient with two follow-ups (baseline, RT course, follow-up 1, follow-up 2) is analysed
by ``spine-node analyze`` three times, each a fresh process as the node's worker would run it:

1. baseline + follow-up 1 with an empty map cache (the analysis the node ran when follow-up 1
   arrived; it fills the cache);
2. **re-analysis**: all three studies with that cache (follow-up 2 has arrived);
3. the **named baseline**: all three studies with no cache, the first full analysis of this patient.

Printed: the wall time of each run and the chain's stage times (from ``summary.json``), the
ratio re-analysis / first full analysis (issue 18, target <= 0.6) for the whole command and for
the chain alone, and whether run 2 reproduced run 3's outputs (same SOP Instance UIDs).

Run: ``.venv/bin/python -m tests.bench.bench_reanalysis [--size small|full|both] [--keep DIR]``
(default both sizes, small first).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench import phantom_sizes

REPO = Path(__file__).resolve().parents[2]
TARGET_RATIO = 0.6


def _run(args: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"spine-node {args[0]} failed: {done.stderr[-800:]}")
    return time.perf_counter() - start


def _stages(out: Path) -> dict[str, float]:
    timings = json.loads((out / "summary.json").read_text())["timings_s"]
    merged: dict[str, float] = {}
    for name, seconds in timings.items():
        key = "maps (cached)" if name.startswith("maps cached") else name
        merged[key] = merged.get(key, 0.0) + float(seconds)
    return merged


def _uids(out: Path) -> set[str]:
    from pydicom import dcmread

    return {
        str(dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
        for p in out.glob("*.dcm")
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("small", "full", "both"), default="both")
    parser.add_argument("--keep", type=Path, help="keep the phantom and outputs here")
    args = parser.parse_args(argv)
    codes = [_run_size(size, keep) for size, keep in phantom_sizes(args.size, args.keep)]
    return max(codes)


def _run_size(size: str, keep: Path | None) -> int:
    """The three runs on one phantom size; 0 when the re-analysis reproduced the outputs."""
    root = keep or Path(tempfile.mkdtemp(prefix="bench-reanalysis-"))
    try:
        patient = root / "patient"
        if not patient.exists():
            _run(
                ["phantom", "--out", str(patient), "--size", size, "--seed", "11"]
                + ["--followups", "2"]
            )
        cache = root / "map-cache"
        shutil.rmtree(cache, ignore_errors=True)
        studies = [patient / "baseline", patient / "rt", patient / "followup1"]
        runs = {
            "first (baseline + follow-up 1, empty cache)": (studies, root / "first", cache),
            "re-analysis (+ follow-up 2, cache)": (
                [*studies, patient / "followup2"],
                root / "again",
                cache,
            ),
            "first full analysis (3 studies, no cache)": (
                [*studies, patient / "followup2"],
                root / "full",
                None,
            ),
        }
        walls: dict[str, float] = {}
        chains: dict[str, float] = {}
        print(f"re-analysis: {size} phantom patient, 2 follow-ups, spine-node analyze")
        for label, (folders, out, map_cache) in runs.items():
            shutil.rmtree(out, ignore_errors=True)
            extra = ["--map-cache", str(map_cache)] if map_cache is not None else []
            walls[label] = _run(["analyze", *map(str, folders), "--out", str(out), *extra])
            stages = _stages(out)
            chains[label] = sum(stages.values())
            detail = ", ".join(f"{k} {v:.1f}" for k, v in stages.items())
            print(f"  {label:45s} {walls[label]:6.1f} s (chain {chains[label]:.1f} s: {detail})")
        again, full = list(runs)[1], list(runs)[2]
        ratio = walls[again] / walls[full]
        chain_ratio = chains[again] / chains[full]
        same = _uids(root / "again") == _uids(root / "full")
        print(
            f"ratio against the baseline (first full analysis, same run): {ratio:.2f} x "
            f"(chain alone {chain_ratio:.2f} x); target <= {TARGET_RATIO}: "
            f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}"
        )
        print(f"re-analysis outputs equal the uncached run's (SOP Instance UIDs): {same}")
        return 0 if same else 1
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
