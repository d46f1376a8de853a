"""``spine-node maps PATH... --out DIR``: every quantitative map the given series allow.

Reads DICOM files (files or folders, recursively), groups them by study and series, assembles
the series (:mod:`processing.series`), computes the maps (:func:`processing.maps.compute_maps`)
and writes, per study, one DICOM Parametric Map per quantity (when :mod:`reporting.pmap` can
encode it) and ``maps.json``: per map the model, inputs used, unit, source series, summary
statistics, wall time and the Parametric Map file. Exit status 1 when no map could be computed.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--no-dicom", action="store_true",
                        help="write maps.json only (no Parametric Maps)")


def _dicom_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return files


def _read(files: list[Path]) -> list[Any]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(f))
        except (InvalidDicomError, OSError) as err:
            logger.warning("skipping %s: not readable as DICOM (%s)", f.name, err)
    return datasets


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def _source_images(volume: Any, by_sop: dict[str, Any]) -> tuple[list[Any], list[int] | None]:
    """Source datasets (and frame numbers for multi-frame) aligned with the map's slices."""
    frames = volume.source_frames[0]
    if any(f.mosaic_tile is not None for f in frames):
        raise ValueError("mosaic sources are not supported by the Parametric Map writer")
    if frames[0].frame_number is not None:
        return [by_sop[frames[0].sop_instance_uid]], [int(f.frame_number) for f in frames]
    return [by_sop[f.sop_instance_uid] for f in frames], None


def _write_pmap(qmap: Any, volume: Any, by_sop: dict[str, Any], out_dir: Path) -> str | None:
    try:
        from reporting.pmap import build_parametric_map
    except ImportError:
        return None
    from reporting.codes import QUANTITIES

    from node import __version__

    if qmap.quantity not in QUANTITIES:
        return None
    sources, frames = _source_images(volume, by_sop)
    pm = build_parametric_map(sources, qmap.values, qmap.quantity, provenance=qmap.provenance,
                              algorithm_version=__version__, source_frames=frames)
    name = f"pm_{qmap.quantity}.dcm"
    pm.save_as(out_dir / name)
    return name


def run(args: argparse.Namespace) -> int:
    from processing.maps import compute_maps, map_statistics
    from processing.series import SeriesError, group_by_series, read_series

    files = _dicom_files(list(args.paths))
    datasets = _read(files)
    by_study: dict[str, list[Any]] = defaultdict(list)
    for ds in datasets:
        by_study[str(ds.get("StudyInstanceUID", ""))].append(ds)
    args.out.mkdir(parents=True, exist_ok=True)
    n_maps = 0
    for study_uid, members in by_study.items():
        volumes = {}
        for series_uid, series in group_by_series(members).items():
            if "PixelData" not in series[0]:
                continue
            try:
                volumes[series_uid] = read_series(series)
            except SeriesError as err:
                logger.warning("series %s skipped: %s", series_uid, err)
        start = time.perf_counter()
        skipped: list[str] = []
        maps = compute_maps(volumes.values(), skipped=skipped)
        elapsed = time.perf_counter() - start
        for reason in skipped:
            print(f"{study_uid}: skipped {reason}")
        if not maps:
            logger.info("study %s: no series allows a quantitative map", study_uid)
            continue
        out_dir = args.out / study_uid if len(by_study) > 1 else args.out
        out_dir.mkdir(parents=True, exist_ok=True)
        by_sop = {str(ds.SOPInstanceUID): ds for ds in members}
        report: dict[str, Any] = {"study_instance_uid": study_uid, "elapsed_s": elapsed,
                                  "skipped": skipped, "maps": {}}
        for name, qmap in sorted(maps.items()):
            entry: dict[str, Any] = {
                "quantity": name, "unit": qmap.unit,
                "model": qmap.provenance.get("model"),
                "source_series_instance_uid": qmap.source_series_instance_uid,
                "grid": {"origin": qmap.geometry.origin, "spacing": qmap.geometry.spacing,
                         "direction": qmap.geometry.direction, "size": qmap.geometry.size},
                "statistics": map_statistics(qmap), "provenance": qmap.provenance,
            }
            if not args.no_dicom:
                try:
                    entry["parametric_map"] = _write_pmap(
                        qmap, volumes[qmap.source_series_instance_uid], by_sop, out_dir)
                except ValueError as err:
                    logger.warning("no Parametric Map for %s: %s", name, err)
                    entry["parametric_map"] = None
                    entry["parametric_map_error"] = str(err)
            report["maps"][name] = entry
            n_maps += 1
        (out_dir / "maps.json").write_text(json.dumps(_jsonable(report), indent=1))
        logger.info("study %s: %d maps written to %s (%.1f s)", study_uid, len(maps), out_dir,
                    elapsed)
        print(f"{study_uid}: {', '.join(sorted(maps))} -> {out_dir}")
    if n_maps == 0:
        print("spine-node maps: no quantitative map could be computed from the given files")
        return 1
    return 0
