"""``spine-node maps PATH... --out DIR``: every quantitative map the given series allow.

Reads DICOM files (files or folders, recursively), groups them by study and series, assembles
the series (:mod:`processing.series`), computes the maps (:func:`processing.maps.compute_maps`)
and writes, per study, one DICOM Parametric Map per quantity (when :mod:`reporting.pmap` can
encode it) and ``maps.json``: per map the model, inputs used, unit, source series, summary
statistics, wall time and the Parametric Map file. Objects that are not images to analyse
(DICOMDIR, presentation states, vendor private objects, SR, SEG, non-DICOM companion files) and
derived volumes left out of a series are listed under ``set_aside`` with a one-line reason each,
and counted on the console; when the study holds a scanner ADC series,
``scanner_adc_qa`` compares the node's ADC with it (:mod:`processing.adc_qa`). Exit status 1
when no map could be computed.
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
    parser.add_argument(
        "--no-dicom", action="store_true", help="write maps.json only (no Parametric Maps)"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="the node's TOML configuration: its [analysis] map settings "
        "(contrast agent relaxivities) apply",
    )


def _set_aside_summary(entries: list[Any]) -> str:
    """``"3 object(s) set aside: 1 DICOMDIR, 1 Presentation State, …"`` for the console."""
    from collections import Counter

    kinds = Counter(e.reason.split(" (")[0].split(":")[0] for e in entries)
    return f"{len(entries)} object(s) set aside: " + ", ".join(
        f"{n} {kind}" for kind, n in kinds.most_common()
    )


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


def _write_pmap(
    qmap: Any,
    volume: Any,
    by_sop: dict[str, Any],
    out_dir: Path,
    companions: dict[str, list[Any]] | None = None,
) -> str | None:
    """Write the Parametric Map of ``qmap`` into ``out_dir``; its file name (None: no encoding).

    The map is built on the 3-D companion series of its source series
    (:mod:`reporting.companion`, as the node's chain does), written once per source series into
    ``out_dir/reference_<series number>/`` and kept in ``companions`` (by source Series Instance
    UID; empty when it cannot be built: the map then references its acquisition; default: a new
    dict, i.e. the companion is built for this map).

    Raises
    ------
    ValueError
        The map cannot be encoded (e.g. an unknown quantity or unit).
    processing.errors.InputError
        The sources cannot carry the map (:class:`reporting.seg.SourceGeometryError` for source
        orientations that differ beyond the stated tolerance).
    """
    from node import __version__
    from reporting.codes import QUANTITIES
    from reporting.companion import (
        COMPANION_SERIES_NUMBER_BASE,
        CompanionError,
        build_companion_series,
    )
    from reporting.pmap import build_parametric_map
    from reporting.seg import source_alignment

    if qmap.quantity not in QUANTITIES:
        return None
    companions = {} if companions is None else companions
    series_uid = qmap.source_series_instance_uid
    if series_uid not in companions:
        number = COMPANION_SERIES_NUMBER_BASE + len(companions)
        try:
            images = build_companion_series(
                volume,
                by_sop,
                algorithm_version=__version__,
                pre_contrast_frames=qmap.provenance.get("n_baseline_frames"),
                series_number=number,
            )
        except CompanionError as err:
            logger.warning("no companion series for series %s: %s", series_uid, err)
            images = []
        if images:
            folder = out_dir / f"reference_{number}"
            folder.mkdir(parents=True, exist_ok=True)
            for k, image in enumerate(images, start=1):
                image.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
        companions[series_uid] = images
    if companions[series_uid]:
        sources, frames, grid = companions[series_uid], None, None
    else:  # no companion: the map references its acquisition
        sources, frames, grid = source_alignment(volume, by_sop)
    pm = build_parametric_map(
        sources,
        qmap.values,
        qmap.quantity,
        provenance=qmap.provenance,
        algorithm_version=__version__,
        source_frames=frames,
        grid=grid,
    )
    name = f"pm_{qmap.quantity}.dcm"
    pm.save_as(out_dir / name)
    return name


def run(args: argparse.Namespace) -> int:
    from node.pipeline import DicomFolder
    from node.worker import chain_settings_from
    from processing.adc_qa import find_scanner_adc, scanner_adc_qa
    from processing.errors import InputError
    from processing.maps import compute_maps, map_statistics
    from processing.series import (
        SeriesError,
        SetAside,
        group_by_series,
        read_series,
        set_aside_entry,
        set_aside_reason,
    )

    map_settings = chain_settings_from(args.config).map_settings()
    folder = DicomFolder(list(args.paths))
    datasets = folder.load()
    # objects that belong to no study (non-DICOM files, DICOMDIR)
    unstudied: list[Any] = [
        SetAside(reason=reason, file_name=path.name) for path, reason in folder.skipped
    ]
    by_study: dict[str, list[Any]] = defaultdict(list)
    aside_by_study: dict[str, list[Any]] = defaultdict(list)
    for ds in datasets:
        study = str(ds.get("StudyInstanceUID", "") or "")
        reason = set_aside_reason(ds)
        if reason is None:
            by_study[study].append(ds)
            continue
        (aside_by_study[study] if study else unstudied).append(set_aside_entry(ds, reason))
    args.out.mkdir(parents=True, exist_ok=True)
    if not by_study and (unstudied or aside_by_study):
        # nothing to analyse: still say what was found and why it was set aside
        everything = unstudied + [e for entries in aside_by_study.values() for e in entries]
        print(f"spine-node maps: {_set_aside_summary(everything)}")
        (args.out / "maps.json").write_text(
            json.dumps(
                _jsonable(
                    {
                        "study_instance_uid": None,
                        "skipped": [],
                        "set_aside": [e.as_dict() for e in everything],
                        "maps": {},
                    }
                ),
                indent=1,
            )
        )
    n_maps = 0
    for study_uid, members in by_study.items():
        set_aside: list[Any] = unstudied + aside_by_study.get(study_uid, [])
        volumes = {}
        for series_uid, series in group_by_series(members, set_aside=set_aside).items():
            try:
                volumes[series_uid] = read_series(series)
            except (SeriesError, ValueError, NotImplementedError, RuntimeError) as err:
                logger.warning("series %s skipped: %s", series_uid, err)
                set_aside.append(
                    SetAside(
                        reason=f"series not assembled: {err}",
                        series_instance_uid=series_uid,
                        sop_class_uid=str(series[0].get("SOPClassUID", "") or ""),
                    )
                )
                continue
            set_aside.extend(volumes[series_uid].excluded)
        start = time.perf_counter()
        skipped: list[str] = []
        maps = compute_maps(volumes.values(), settings=map_settings, skipped=skipped)
        elapsed = time.perf_counter() - start
        for reason in skipped:
            print(f"{study_uid}: skipped {reason}")
        if set_aside:
            print(f"{study_uid}: {_set_aside_summary(set_aside)} (reasons in maps.json)")
        if not maps and not set_aside:
            logger.info("study %s: no series allows a quantitative map", study_uid)
            continue
        out_dir = args.out / study_uid if len(by_study) > 1 else args.out
        out_dir.mkdir(parents=True, exist_ok=True)
        by_sop = {str(ds.SOPInstanceUID): ds for ds in members}
        companions: dict[str, list[Any]] = {}  # source Series Instance UID -> companion images
        report: dict[str, Any] = {
            "study_instance_uid": study_uid,
            "elapsed_s": elapsed,
            "skipped": skipped,
            "set_aside": [e.as_dict() for e in set_aside],
            "maps": {},
        }
        if not maps:
            logger.info("study %s: no series allows a quantitative map", study_uid)
        for name, qmap in sorted(maps.items()):
            entry: dict[str, Any] = {
                "quantity": name,
                "unit": qmap.unit,
                "model": qmap.provenance.get("model"),
                "source_series_instance_uid": qmap.source_series_instance_uid,
                "grid": {
                    "origin": qmap.geometry.origin,
                    "spacing": qmap.geometry.spacing,
                    "direction": qmap.geometry.direction,
                    "size": qmap.geometry.size,
                },
                "statistics": map_statistics(qmap),
                "provenance": qmap.provenance,
            }
            if not args.no_dicom:
                try:
                    entry["parametric_map"] = _write_pmap(
                        qmap, volumes[qmap.source_series_instance_uid], by_sop, out_dir, companions
                    )
                except (InputError, ValueError) as err:
                    logger.warning("no Parametric Map for %s: %s", name, err)
                    entry["parametric_map"] = None
                    entry["parametric_map_error"] = str(err)
            report["maps"][name] = entry
            n_maps += 1
        scanner = find_scanner_adc(volumes.values())
        if scanner is not None:
            adc = maps.get("ADC")
            report["scanner_adc_qa"] = scanner_adc_qa(
                None if adc is None else adc.image(),
                scanner,
                by_sop.get(scanner.source_frames[0][0].sop_instance_uid),
            )
        (out_dir / "maps.json").write_text(json.dumps(_jsonable(report), indent=1))
        logger.info(
            "study %s: %d maps written to %s (%.1f s)", study_uid, len(maps), out_dir, elapsed
        )
        print(f"{study_uid}: {', '.join(sorted(maps))} -> {out_dir}")
    if n_maps == 0:
        print("spine-node maps: no quantitative map could be computed from the given files")
        return 1
    return 0
