"""``spine-node phantom``: write a synthetic CyberKnife patient and its ground truth.

Layout written under ``--out DIR`` (documented in :mod:`processing.phantom`)::

    DIR/baseline/seriesNNN/00001.dcm ...
    DIR/rt/rtplan.dcm, DIR/rt/rtstruct.dcm, DIR/rt/rtdose.dcm
    DIR/followup1/seriesNNN/*.dcm (followup2 ...)
    DIR/ground_truth.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: choices, kept literal so that building the CLI parser imports no science (a test checks that
#: they equal processing.phantom's SCENARIOS, VENDORS and SIZES)
SCENARIOS = ("responder", "progression", "pseudoprogression", "stable")
VENDORS = ("standard", "siemens", "ge", "philips", "enhanced")
SIZES = ("full", "small")
#: declared contrast agents and field strengths (processing.phantom.protocol.CONTRAST_AGENTS and
#: FIELD_STRENGTHS_T)
CONTRAST_AGENTS = (
    "gadoterate",
    "gadobutrol",
    "gadoteridol",
    "gadobenate",
    "gadopentetate",
    "gadodiamide",
    "gadoxetate",
)
FIELD_STRENGTHS = (1.5, 3.0)
#: DWI b-value schemes (processing.phantom.protocol.DIFFUSION_SCHEMES)
DIFFUSION_SCHEMES = ("standard", "two-point")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output folder (created; must be empty if it exists)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="responder",
        help="response scenario (default responder)",
    )
    parser.add_argument(
        "--vendor",
        choices=VENDORS,
        default="standard",
        help="DICOM encoding variant (default standard)",
    )
    parser.add_argument(
        "--size", choices=SIZES, default="full", help="full or small (coarser, fewer slices)"
    )
    parser.add_argument(
        "--followups", type=int, default=1, help="number of follow-up studies (default 1, max 4)"
    )
    parser.add_argument(
        "--sagittal", action="store_true", help="add a sagittal T2-weighted series to each MR study"
    )
    parser.add_argument(
        "--contrast-agent",
        choices=CONTRAST_AGENTS,
        default="gadoterate",
        help="declared contrast agent; the DCE signal uses its true r1 (Rohrer "
        "2005 plasma) at the field strength (default gadoterate)",
    )
    parser.add_argument(
        "--field-strength",
        type=float,
        choices=FIELD_STRENGTHS,
        default=3.0,
        help="Magnetic Field Strength in T (default 3)",
    )
    parser.add_argument(
        "--vfa-series",
        action="store_true",
        help="write the VFA T1 acquisition as one series per flip angle",
    )
    parser.add_argument(
        "--diffusion-scheme",
        choices=DIFFUSION_SCHEMES,
        default="standard",
        help="DWI b-values: standard (b 0-2000, 8 shells) or two-point "
        "(b 0 + b 1500 x 3 directions, as body protocols)",
    )
    parser.add_argument(
        "--scanner-maps",
        action="store_true",
        help="add the scanner's TRACEW (series 51) and ADC (series 52, 1e-6 mm2/s) "
        "series derived from each DWI series",
    )
    parser.add_argument(
        "--non-image-objects",
        action="store_true",
        help="write a presentation state and a Philips private non-image object "
        "into each DWI series folder, as CD exports do",
    )


def write_phantom(
    out: Path,
    *,
    seed: int = 0,
    scenario: str = "responder",
    vendor: str = "standard",
    size: str = "full",
    followups: int = 1,
    sagittal: bool = False,
    contrast_agent: str = "gadoterate",
    field_strength: float = 3.0,
    vfa_series: bool = False,
    diffusion_scheme: str = "standard",
    scanner_maps: bool = False,
    non_image_objects: bool = False,
    trajectory: Any = None,
) -> dict:
    """Generate a phantom patient and write it under ``out``; returns the ground truth.

    ``trajectory``: a :class:`processing.phantom.trajectory.Trajectory` (randomised course) for
    :func:`processing.phantom.generate_patient`.
    """
    from processing.phantom import generate_patient

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty")
    phantom = generate_patient(
        seed=seed,
        scenario=scenario,
        vendor=vendor,
        size=size,
        followups=followups,
        sagittal=sagittal,
        contrast_agent=contrast_agent,
        field_strength=field_strength,
        vfa_series=vfa_series,
        diffusion_scheme=diffusion_scheme,
        scanner_maps=scanner_maps,
        non_image_objects=non_image_objects,
        trajectory=trajectory,
    )
    n = 0
    made: set[Path] = set()
    for relpath, data in phantom.iter_files():
        path = out / relpath
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        path.write_bytes(data)
        n += 1
    (out / "ground_truth.json").write_text(
        json.dumps(phantom.ground_truth, indent=1, default=float)
    )
    logger.info("phantom written: %d DICOM files, study %s", n, phantom.studies[0].study_uid)
    return phantom.ground_truth


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    try:
        write_phantom(
            args.out,
            seed=args.seed,
            scenario=args.scenario,
            vendor=args.vendor,
            size=args.size,
            followups=args.followups,
            sagittal=args.sagittal,
            contrast_agent=args.contrast_agent,
            field_strength=args.field_strength,
            vfa_series=args.vfa_series,
            diffusion_scheme=args.diffusion_scheme,
            scanner_maps=args.scanner_maps,
            non_image_objects=args.non_image_objects,
        )
    except (FileExistsError, ValueError) as err:
        logger.error("%s", err)
        return 2
    logger.info("done in %.1f s: %s", time.perf_counter() - t0, args.out)
    return 0
