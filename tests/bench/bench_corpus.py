"""Benchmark: ``spine-node maps`` on every real DWI series of the corpus, against dcm2niix.

For each real series (``tests.real_data.REAL_SERIES``: Philips, GE, Siemens mosaic and enhanced,
Canon classic and enhanced, United Imaging tiled, Siemens E11 with three shells), in the same run:

- ``dcm2niix`` (the baseline) converts the series to NIfTI (the first step of any independent
  analysis of it);
- ``spine-node maps`` reads the series, fits every map it allows and writes the Parametric Maps and
  ``maps.json``.

Both run as subprocesses on the same unpacked folder (gzipped/zipped exports are unpacked once
before timing), each timed over ``--repeat`` runs (the best is kept). Printed per series: seconds
of each, the ratio maps/dcm2niix, and the maps written. ``spine-node maps`` includes the Python
start-up and imports (``spine-node --help`` is timed as well so that this constant is visible).

Run: ``.venv/bin/python -m tests.bench.bench_corpus [--repeat N] [NAME ...]``.
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

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.real_data import REAL_SERIES, real_series_dir  # noqa: E402

BIN = Path(sys.executable).parent
#: the corpus series that hold diffusion images (the others are SEG/SR or non-diffusion)
DWI_SERIES = (
    "philips_cl",
    "philips_achieva_dti32",
    "ge_dwi",
    "siemens_mosaic",
    "canon_cl",
    "canon_enh",
    "xa60",
    "xa61",
    "uih_dti16",
    "imagedata_dwi",
)


def _best_of(repeat: int, command: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    best = float("inf")
    result = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        best = min(best, time.perf_counter() - start)
    assert result is not None
    return best, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "names",
        nargs="*",
        default=list(DWI_SERIES),
        help=f"series names (default: all of {', '.join(DWI_SERIES)})",
    )
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in REAL_SERIES]
    if unknown:
        parser.error(f"unknown series: {', '.join(unknown)}")
    dcm2niix = shutil.which("dcm2niix", path=str(BIN)) or shutil.which("dcm2niix")
    if dcm2niix is None:
        print("dcm2niix not found (pip install dcm2niix): no baseline")
        return 1
    node = str(BIN / "spine-node")
    startup, _ = _best_of(args.repeat, [node, "--help"])
    print(f"spine-node start-up (--help): {startup:.2f} s")
    print(f"{'series':<24}{'dcm2niix s':>11}{'maps s':>9}{'ratio':>8}  maps written")
    failures = 0
    with tempfile.TemporaryDirectory(prefix="bench-corpus-") as tmp:
        for name in args.names:
            folder = real_series_dir(name)
            nii_dir = Path(tmp) / f"{name}-nii"
            nii_dir.mkdir()
            t_ref, ref = _best_of(
                args.repeat, [dcm2niix, "-z", "n", "-f", "%s", "-o", str(nii_dir), str(folder)]
            )
            out = Path(tmp) / f"{name}-maps"
            t_maps, res = _best_of(
                args.repeat,
                [node, "--log-level", "WARNING", "maps", str(folder), "--out", str(out)],
            )
            written = []
            for report in sorted(out.rglob("maps.json")):
                written.extend(json.loads(report.read_text()).get("maps", {}))
            if ref.returncode != 0 or res.returncode != 0:
                failures += res.returncode != 0
            ratio = t_maps / t_ref if t_ref > 0 else float("nan")
            print(
                f"{name:<24}{t_ref:>11.2f}{t_maps:>9.2f}{ratio:>7.1f}x  "
                f"{', '.join(sorted(written)) or '(none: ' + res.stdout.strip()[-80:] + ')'}",
                flush=True,
            )
    print(
        "ratio = spine-node maps time / dcm2niix time on the same series, same run "
        "(best of %d)" % args.repeat
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
