"""Benchmark: vectorised extended Tofts fit vs a per-voxel ``scipy.optimize.curve_fit`` baseline.

Both fit the same model (extended Tofts, Parker AIF with Hct 0.42, exact piecewise-linear
convolution on a 0.5 s internal grid, OSIPI start values and bounds) to the same 10,000 noisy
synthetic voxels (3.5 s sampling over 280 s, noise SD 0.01 mM). Prints voxels/s of each, the speed
ratio (target >= 50x) and the accuracy of each against the truth, so that "same accuracy" is
visible.

With ``--study`` it also times :func:`processing.maps.compute_maps` on one full-size phantom
follow-up study (DWI + DKI + DCE, whole volume): wall time per map group and peak memory
(targets <= 60 s and <= 4 GB on the 2-core machine).

Run: ``.venv/bin/python -m tests.bench.bench_tofts [--voxels N] [--study [DIR]]``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from scipy.optimize import curve_fit
from scipy.signal import lfilter

from processing.dce import ArterialInputFunction, ToftsModel, _FineGrid, tofts_concentration


def _synthetic(n_voxels: int, seed: int = 2024):
    rng = np.random.default_rng(seed)
    t = np.arange(0.0, 280.0, 3.5)
    aif = ArterialInputFunction.parker(t, hematocrit=0.42, bolus_arrival_time=20.0)
    ktrans = rng.uniform(0.02, 0.6, n_voxels)
    ve = rng.uniform(0.1, 0.6, n_voxels)
    vp = rng.uniform(0.0, 0.1, n_voxels)
    c = tofts_concentration(t, aif, ktrans=ktrans, ve=ve, vp=vp)
    c += rng.normal(0.0, 0.01, c.shape)
    return t, aif, c, ktrans, ve, vp


def _baseline_fit(t: np.ndarray, aif: ArterialInputFunction, c: np.ndarray) -> np.ndarray:
    """Straightforward per-voxel curve_fit of the same extended Tofts model."""
    grid = _FineGrid(t, aif, 0.0)
    cp = grid.cp
    dt = grid.time[1] - grid.time[0]
    idx = grid.index
    uniform = np.allclose(np.diff(grid.time), dt)
    assert uniform, "baseline expects a uniform internal grid"

    def model(_t: np.ndarray, ktrans: float, ve: float, vp: float) -> np.ndarray:
        k = ktrans / max(ve, 1e-9) / 60.0  # /s
        x = k * dt
        e = np.exp(-x)
        b = (-np.expm1(-x) - x * e) / (k * x)
        a = -np.expm1(-x) / k - b
        conv = lfilter([a, b], [1.0, -e], cp, zi=[-a * cp[0]])[0]
        return vp * cp[idx] + ktrans / 60.0 * conv[idx]

    out = np.full((c.shape[0], 3), np.nan)
    for i in range(c.shape[0]):
        try:
            out[i], _ = curve_fit(
                model, t, c[i], p0=(0.6, 0.2, 0.01), bounds=((0.0, 1e-6, 0.0), (5.0, 1.0, 1.0))
            )
        except RuntimeError:  # curve_fit did not converge: leave NaN, counted below
            continue
    return out


def _accuracy(name: str, kt: np.ndarray, ve: np.ndarray, vp: np.ndarray, truth) -> None:
    t_kt, t_ve, t_vp = truth
    ok = np.isfinite(kt)
    rel = np.abs(kt[ok] / t_kt[ok] - 1.0)
    print(
        f"  {name:<12} Ktrans |rel err| median {np.median(rel):.4f} p95 "
        f"{np.percentile(rel, 95):.4f}; "
        f"ve |err| p95 {np.percentile(np.abs(ve[ok] - t_ve[ok]), 95):.4f}; "
        f"vp |err| p95 {np.percentile(np.abs(vp[ok] - t_vp[ok]), 95):.4f}; "
        f"failed {np.count_nonzero(~ok)}"
    )


def bench_study(folder: Path | None) -> None:
    """Wall time and peak memory of compute_maps on a full phantom follow-up study."""
    import resource
    import tempfile

    import pydicom

    from processing.maps import compute_maps
    from processing.series import read_series

    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:
            from node.commands.phantom import write_phantom

            folder = Path(tmp) / "phantom"
            start = time.perf_counter()
            write_phantom(folder, seed=7, scenario="responder", vendor="standard", size="full")
            print(f"full phantom written in {time.perf_counter() - start:.1f} s")
        study = folder / "followup1"
        start = time.perf_counter()
        series = [
            read_series([pydicom.dcmread(f) for f in sorted(d.glob("*.dcm"))])
            for d in sorted(study.iterdir())
            if d.is_dir()
        ]
        t_read = time.perf_counter() - start
        start, cpu0 = time.perf_counter(), time.process_time()
        maps = compute_maps(series)
        t_maps, cpu = time.perf_counter() - start, time.process_time() - cpu0
    groups: dict[float, list[str]] = {}
    for name, m in maps.items():
        groups.setdefault(round(float(m.provenance["elapsed_s"]), 2), []).append(name)
    load = os.getloadavg()[0]
    print(
        f"compute_maps on a full follow-up study: {t_maps:.1f} s wall (target <= 60 s), "
        f"{cpu:.1f} s CPU, load average {load:.1f} on {os.cpu_count()} cores; "
        f"series reading {t_read:.1f} s"
    )
    for elapsed, names in sorted(groups.items()):
        print(f"  {elapsed:7.1f} s  {', '.join(sorted(names))}")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"  peak memory (max RSS of this process): {peak_gb:.2f} GB (target <= 4 GB)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxels", type=int, default=10_000)
    parser.add_argument(
        "--study",
        nargs="?",
        const="generate",
        default=None,
        help="also time compute_maps on a full phantom study (DIR of a phantom "
        "written by `spine-node phantom --size full`, or generate one)",
    )
    args = parser.parse_args(argv)
    if args.study is not None:
        bench_study(None if args.study == "generate" else Path(args.study))
    t, aif, c, kt, ve, vp = _synthetic(args.voxels)
    print(f"extended Tofts, {args.voxels} voxels x {t.size} time points")

    start = time.perf_counter()
    fit = ToftsModel(t, aif, extended=True).fit(c)
    t_vec = time.perf_counter() - start

    start = time.perf_counter()
    base = _baseline_fit(t, aif, c)
    t_base = time.perf_counter() - start

    print(
        f"  baseline (per-voxel scipy curve_fit): {t_base:8.2f} s  "
        f"{args.voxels / t_base:10.0f} voxels/s"
    )
    print(
        f"  processing.dce.ToftsModel:            {t_vec:8.2f} s  "
        f"{args.voxels / t_vec:10.0f} voxels/s"
    )
    print(f"  speed-up vs baseline: {t_base / t_vec:.1f}x (target >= 50x)")
    _accuracy("vectorised", fit.ktrans, fit.ve, fit.vp, (kt, ve, vp))
    _accuracy("curve_fit", base[:, 0], base[:, 1], base[:, 2], (kt, ve, vp))
    both = np.isfinite(fit.ktrans) & np.isfinite(base[:, 0])
    sse_vec = np.sum(
        (
            tofts_concentration(
                t,
                aif,
                ktrans=np.nan_to_num(fit.ktrans),
                ve=np.nan_to_num(fit.ve, nan=1.0),
                vp=fit.vp,
            )
            - c
        )
        ** 2,
        axis=1,
    )
    sse_base = np.sum(
        (tofts_concentration(t, aif, ktrans=base[:, 0], ve=base[:, 1], vp=base[:, 2]) - c) ** 2,
        axis=1,
    )
    print(
        f"  residual SSE ratio vectorised/curve_fit: median "
        f"{np.median(sse_vec[both] / sse_base[both]):.6f}, "
        f"max {np.max(sse_vec[both] / sse_base[both]):.6f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
