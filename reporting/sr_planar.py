"""Planar measurement groups of the TID 1500 report: what a viewer can draw.

The report's volumetric groups (TID 1411, :mod:`reporting.sr`) reference the SEG and carry no
spatial coordinates, so image viewers (OHIF and others built on cornerstone3D) have nothing to
draw. Beside them, each time point whose lesion section could be located on an anatomical source
image (:class:`processing.results.PlanarMeasurement`, set by the analysis chain) gets two groups,
both with the Tracking Identifier and Tracking Unique Identifier of the lesion's volumetric groups
and the Time Point Context (TID 1502) of that time point:

* a Planar ROI group (TID 1410) whose referenced region is the lesion outline on the image where
  the maximum axial diameter was measured: a closed SCOORD POLYLINE (last point = first point) on
  that image (and frame, for multi-frame images). A 2-D SCOORD has no POLYGON graphic type
  (PS3.3 C.18.6.1.2; POLYGON exists for SCOORD3D only): a polygon is a POLYLINE whose first and
  last points are equal. Measurements: the maximum axial diameter (private AXDIAM, mm; the value
  of the volumetric group) and the area enclosed by the outline (Area, 42798000 SCT, mm2);
* a Measurements group (TID 1501) with the maximum axial diameter inferred from its two end
  points, an SCOORD POLYLINE of 2 points on the same image. The end points cannot go in the
  TID 1410 group: its measurements carry no spatial coordinates of their own (TID 1419; highdicom
  refuses them).

Coordinates are DICOM image coordinates (column, row), (0, 0) = top-left corner of the top-left
pixel. The diameter is measured in the patient's axial plane (:mod:`processing.measure`): on images
tilted from it (at most 8°, else no planar group), the drawn line is up to 1 % longer than the
value. The groups are written current time point first (then earlier ones, latest first), since
viewers label a drawn region with the first group's values: each group's values are those of the
image it is drawn on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from processing.results import AxialSection, ImagePoint, PlanarMeasurement, TimePointResult
from reporting import codes as rcodes

#: Area (SCT 42798000): the area enclosed by the lesion outline on the image.
AREA = CodedConcept(codes.SCT.Area.value, codes.SCT.Area.scheme_designator, codes.SCT.Area.meaning)


#: Largest distance (voxels) of a section point from its image's plane.
_PLANE_TOLERANCE = 1e-3


def locate_section(
    section: AxialSection,
    image: sitk.Image,
    sources: Sequence[Dataset],
    source_frames: Sequence[int] | None = None,
) -> PlanarMeasurement:
    """The axial section of a lesion on the source image holding it, in image coordinates.

    Parameters
    ----------
    section : processing.results.AxialSection
        Where the maximum axial diameter was measured (patient coordinates).
    image : SimpleITK.Image
        The volume the lesion was measured on (or any grid it was cropped from), its third index
        axis running through ``sources``.
    sources : Sequence[pydicom.Dataset]
        Its source images in slice order (one per slice), or the one multi-frame image.
    source_frames : Sequence[int], optional
        For a multi-frame image: its 1-based frame number of each slice.

    Returns
    -------
    processing.results.PlanarMeasurement
        Diameter end points and outline as DICOM image coordinates (column, row) of the image
        (pixel centres at +0.5).

    Raises
    ------
    ValueError
        The section is not one slice of ``image`` (e.g. non-axial images), or the slice has no
        source image.

    Notes
    -----
    :func:`reporting.seg.source_alignment` gives ``sources`` and ``source_frames`` of a series
    volume (mosaic images, for which it returns a grid, have no image per slice: not supported).
    """

    def to_index(points: Sequence[tuple[float, float, float]]) -> np.ndarray:
        return np.array([image.TransformPhysicalPointToContinuousIndex(p) for p in points])

    ends = to_index(section.diameter_end_points)
    outline = to_index(section.outline)
    k = int(round(float(ends[0, 2])))
    if np.abs(np.concatenate([ends[:, 2], outline[:, 2]]) - k).max() > _PLANE_TOLERANCE:
        raise ValueError("the axial section of the diameter is not one of the images")
    n_slices = len(source_frames) if source_frames is not None else len(sources)
    if not 0 <= k < n_slices or (source_frames is not None and len(sources) != 1):
        raise ValueError(f"slice {k} has no source image ({n_slices} slices)")
    source = sources[0] if source_frames is not None else sources[k]

    def image_points(points: np.ndarray) -> tuple[ImagePoint, ...]:
        return tuple((float(p[0]) + 0.5, float(p[1]) + 0.5) for p in points)

    diameter = image_points(ends)
    return PlanarMeasurement(
        study_instance_uid=str(source.StudyInstanceUID),
        series_instance_uid=str(source.SeriesInstanceUID),
        sop_class_uid=str(source.SOPClassUID),
        sop_instance_uid=str(source.SOPInstanceUID),
        frame_number=None if source_frames is None else int(source_frames[k]),
        diameter_mm=section.diameter_mm,
        diameter_end_points=(diameter[0], diameter[1]),
        outline=image_points(outline),
        area_mm2=section.area_mm2,
    )


def time_point_orders(results: Sequence[TimePointResult]) -> dict[int, int]:
    """Time Point Order of each result (1 = a lesion's earliest), keyed by ``id(result)``.

    The numbering of :func:`reporting.sr.build_measurement_report`: per lesion, by study date.
    """
    orders: dict[int, int] = {}
    counts: dict[str, int] = {}
    for result in sorted(results, key=lambda r: (r.lesion.tracking_uid, r.study_date)):
        counts[result.lesion.tracking_uid] = counts.get(result.lesion.tracking_uid, 0) + 1
        orders[id(result)] = counts[result.lesion.tracking_uid]
    return orders


def _source(planar: PlanarMeasurement) -> hd.sr.SourceImageForRegion:
    return hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=planar.sop_class_uid,
        referenced_sop_instance_uid=planar.sop_instance_uid,
        referenced_frame_numbers=None if planar.frame_number is None else [planar.frame_number],
    )


def _diameter(
    planar: PlanarMeasurement,
    algorithm_id: hd.sr.AlgorithmIdentification,
    *,
    with_end_points: bool = False,
) -> hd.sr.Measurement:
    """The maximum axial diameter NUM, inferred from its 2-point SCOORD POLYLINE if asked."""
    coordinates = None
    if with_end_points:
        coordinates = [
            hd.sr.CoordinatesForMeasurement(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=np.asarray(planar.diameter_end_points, dtype=float),
                source_image=_source(planar),
            )
        ]
    return hd.sr.Measurement(
        name=rcodes.MAX_AXIAL_DIAMETER,
        value=planar.diameter_mm,
        unit=rcodes.unit_code("mm"),
        algorithm_id=algorithm_id,
        referenced_coordinates=coordinates,
    )


def _closed(points: Sequence[tuple[float, float]]) -> np.ndarray:
    data = np.asarray(points, dtype=float)
    if len(data) < 4:
        raise ValueError(f"an outline needs at least 3 distinct points, got {len(data)}")
    if not np.array_equal(data[0], data[-1]):
        data = np.vstack([data, data[:1]])
    return data


#: The groups of one time point: TID 1410 (outline) and TID 1501 (diameter end points).
PlanarGroups = tuple[
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations,
    hd.sr.MeasurementsAndQualitativeEvaluations,
]


def planar_group(
    result: TimePointResult,
    *,
    time_point_context: hd.sr.TimePointContext,
    finding_type: CodedConcept,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> PlanarGroups:
    """The TID 1410 and TID 1501 groups of one lesion at one time point (see the module docstring).

    Raises
    ------
    ValueError
        The result has no planar measurement, or its diameter differs from the volumetric one.
    """
    planar = result.planar
    if planar is None:
        raise ValueError(
            f"time point {result.study_date} of lesion {result.lesion.tracking_uid} has no "
            "planar measurement"
        )
    if planar.diameter_mm != result.measurements.max_axial_diameter_mm:
        raise ValueError(
            f"planar diameter {planar.diameter_mm} mm differs from the lesion's maximum axial "
            f"diameter {result.measurements.max_axial_diameter_mm} mm"
        )
    measurements = [_diameter(planar, algorithm_id)]
    if planar.area_mm2 is not None:
        measurements.append(
            hd.sr.Measurement(
                name=AREA,
                value=planar.area_mm2,
                unit=rcodes.unit_code("mm2"),
                algorithm_id=algorithm_id,
            )
        )
    common: dict[str, Any] = dict(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result.lesion.tracking_uid, identifier=result.lesion.tracking_id
        ),
        time_point_context=time_point_context,
        finding_type=finding_type,
        finding_sites=[hd.sr.FindingSite(rcodes.vertebra_code(result.lesion.vertebral_level))],
        algorithm_id=algorithm_id,
    )
    outline = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,  # closed: the outline polygon
            graphic_data=_closed(planar.outline),
            source_image=_source(planar),
        ),
        measurements=measurements,
        **common,
    )
    line = hd.sr.MeasurementsAndQualitativeEvaluations(
        measurements=[_diameter(planar, algorithm_id, with_end_points=True)],
        **common,
    )
    return outline, line


def planar_groups(
    results: Sequence[TimePointResult],
    *,
    time_point_context: Callable[[TimePointResult, int], hd.sr.TimePointContext],
    finding_type: CodedConcept,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> list[
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
]:
    """The planar groups of the results that have a planar measurement, latest time point first.

    Per time point: its TID 1410 group, then its TID 1501 group (:func:`planar_group`).

    Parameters
    ----------
    results : Sequence[processing.results.TimePointResult]
        All results of the report (the time point orders count every one of them).
    time_point_context : callable
        ``(result, order) -> TimePointContext``, the one of the volumetric groups.
    finding_type : CodedConcept
        The lesions' finding type.
    algorithm_id : highdicom.sr.AlgorithmIdentification
        Algorithm of the measurements and of the groups.
    """
    orders = time_point_orders(results)
    with_planar = [r for r in results if r.planar is not None]
    by_lesion = sorted(with_planar, key=lambda r: r.lesion.tracking_uid)
    latest_first = sorted(by_lesion, key=lambda r: r.study_date, reverse=True)
    return [
        group
        for result in latest_first
        for group in planar_group(
            result,
            time_point_context=time_point_context(result, orders[id(result)]),
            finding_type=finding_type,
            algorithm_id=algorithm_id,
        )
    ]


def planar_evidence(results: Sequence[TimePointResult]) -> list[Dataset]:
    """Evidence entries (study, series, SOP class and instance UIDs) of the images drawn on.

    The images are referenced by the planar groups, so they must be listed as evidence of the
    report (Current Requested Procedure or Pertinent Other Evidence).
    """
    out: dict[str, Dataset] = {}
    for result in results:
        planar = result.planar
        if planar is None or planar.sop_instance_uid in out:
            continue
        ds = Dataset()
        ds.StudyInstanceUID = planar.study_instance_uid
        ds.SeriesInstanceUID = planar.series_instance_uid
        ds.SOPClassUID = planar.sop_class_uid
        ds.SOPInstanceUID = planar.sop_instance_uid
        out[planar.sop_instance_uid] = ds
    return list(out.values())
