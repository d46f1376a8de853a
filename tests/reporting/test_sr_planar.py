"""Planar groups of the TID 1500 report (reporting.sr_planar): the lesion outline (TID 1410) and
the maximum axial diameter's end points (TID 1501) on the anatomical image they were measured on,
current time point first; dciodvfy, highdicom and dcmqi's tid1500reader read them back."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset

from processing.measure import axial_section, measure_lesion
from processing.results import TimePointResult
from reporting import codes as rcodes
from reporting.sr import build_measurement_report, reported_value
from reporting.sr_planar import AREA, locate_section, planar_evidence, planar_groups
from reporting.summary import summary_records
from tests.reporting.results_fixture import BASELINE, FOLLOW_UP, LESION, VERSION, build_inputs
from tests.reporting.sources import FOLLOW_UP_STUDY_UID, STUDY_UID, classic_mr_series
from tests.reporting.tools import dciodvfy, tid1500_json

ROWS, COLUMNS, SLICES = 32, 30, 6
SPACING = (1.25, 1.25, 4.0)  # column, row, slice (mm)


def _axial_t2(study_uid: str, date: str) -> list[Dataset]:
    """An axial T2 series (LPS: columns along +x, rows along +y, slices along +z)."""
    series = classic_mr_series(
        study_uid=study_uid,
        series_uid=f"{study_uid}.77",
        study_date=date,
        n_slices=SLICES,
        rows=ROWS,
        columns=COLUMNS,
        series_description="T2 TSE AX",
    )
    for k, ds in enumerate(series):
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [-20.0, -15.0, 10.0 + SPACING[2] * k]
        ds.SliceLocation = 10.0 + SPACING[2] * k
    return series


def _grid(series: list[Dataset]) -> sitk.Image:
    image = sitk.Image(COLUMNS, ROWS, SLICES, sitk.sitkUInt8)
    image.SetSpacing(SPACING)
    image.SetOrigin(tuple(float(v) for v in series[0].ImagePositionPatient))
    return image


def _ellipse_mask(grid: sitk.Image, semi_axes: tuple[float, float], slices: range) -> sitk.Image:
    zz, yy, xx = np.mgrid[0:SLICES, 0:ROWS, 0:COLUMNS]
    inside = ((xx - 14) / semi_axes[0]) ** 2 + ((yy - 15) / semi_axes[1]) ** 2 <= 1.0
    array = (inside & np.isin(zz, list(slices))).astype(np.uint8)
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(grid)
    return mask


def _with_planar(
    result: TimePointResult, series: list[Dataset], semi_axes: tuple[float, float]
) -> TimePointResult:
    """The fixture result with the diameter, section and planar measurement of an ellipse."""
    grid = _grid(series)
    # a larger section on slice 3 than on slices 2 and 4: the diameter is measured on slice 3
    mask = _ellipse_mask(grid, semi_axes, range(3, 4))
    small = _ellipse_mask(grid, (semi_axes[0] - 3, semi_axes[1] - 1), range(2, 5))
    mask = sitk.Or(mask, small)
    # as the chain does: measured on a cropped mask, located on the whole anatomical grid
    cropped = sitk.RegionOfInterest(mask, [24, 26, 5], [2, 2, 0])
    measured = measure_lesion(cropped)
    assert measured.axial_section is not None
    planar = locate_section(measured.axial_section, grid, series)
    measurements = dataclasses.replace(
        result.measurements,
        max_axial_diameter_mm=measured.max_axial_diameter_mm,
        axial_section=measured.axial_section,
    )
    return dataclasses.replace(result, measurements=measurements, planar=planar)


@pytest.fixture(scope="module")
def planar_inputs():
    base_t2 = _axial_t2(STUDY_UID, "20260105")
    fu_t2 = _axial_t2(FOLLOW_UP_STUDY_UID, "20260420")
    baseline = _with_planar(BASELINE, base_t2, (10.0, 6.0))
    follow_up = _with_planar(FOLLOW_UP, fu_t2, (7.0, 4.0))
    return baseline, follow_up, base_t2, fu_t2


def _image_of(scoord: Dataset) -> str:
    """SOP Instance UID of the image an SCOORD content item is drawn on."""
    return str(scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def _build(baseline: TimePointResult, follow_up: TimePointResult) -> hd.sr.Comprehensive3DSR:
    objects = build_inputs(VERSION)
    return build_measurement_report(
        [baseline, follow_up],
        segmentations=objects.segs,
        parametric_maps=objects.pmaps,
        algorithm_version=VERSION,
    )


@pytest.fixture(scope="module")
def report(planar_inputs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    baseline, follow_up, _, _ = planar_inputs
    path = tmp_path_factory.mktemp("sr-planar") / "sr.dcm"
    _build(baseline, follow_up).save_as(path)
    return path


def test_locate_section_on_the_axial_image_in_image_coordinates(planar_inputs) -> None:
    baseline, follow_up, base_t2, fu_t2 = planar_inputs
    for result, series in ((baseline, base_t2), (follow_up, fu_t2)):
        planar = result.planar
        section = result.measurements.axial_section
        assert planar is not None and section is not None
        # the section with the largest ellipse: slice 3 of the series
        assert planar.sop_instance_uid == series[3].SOPInstanceUID
        assert planar.series_instance_uid == series[3].SeriesInstanceUID
        assert planar.study_instance_uid == result.study_instance_uid
        assert planar.frame_number is None
        assert planar.diameter_mm == result.measurements.max_axial_diameter_mm
        # end points: voxel corners, (column, row) with pixel centres at +0.5: whole numbers
        (c0, r0), (c1, r1) = planar.diameter_end_points
        assert {c0 % 1, r0 % 1, c1 % 1, r1 % 1} == {0.0}
        distance = math.hypot((c1 - c0) * SPACING[0], (r1 - r0) * SPACING[1])
        assert distance == pytest.approx(planar.diameter_mm)
        outline = np.asarray(planar.outline)
        assert np.array_equal(outline[0], outline[-1]) and len(outline) > 8
        points = np.vstack([outline, np.asarray(planar.diameter_end_points)])
        assert (points >= 0).all()
        assert (points[:, 0] <= COLUMNS).all() and (points[:, 1] <= ROWS).all()
        assert planar.area_mm2 == section.area_mm2
    # the ellipse's major axis runs along the columns, centred on pixel (14, 15)
    (c0, _), (c1, _) = baseline.planar.diameter_end_points
    assert sorted([c0, c1]) == [4.0, 25.0]


def test_locate_section_multiframe_source_gets_the_frame_number(planar_inputs) -> None:
    baseline, _, base_t2, _ = planar_inputs
    section = baseline.measurements.axial_section
    frames = [6, 5, 4, 3, 2, 1]
    planar = locate_section(section, _grid(base_t2), [base_t2[0]], frames)
    assert (planar.sop_instance_uid, planar.frame_number) == (base_t2[0].SOPInstanceUID, 3)
    assert planar.outline == baseline.planar.outline


def test_locate_section_refuses_a_section_across_images() -> None:
    # sagittal images: columns along A (y), rows along -S (z), slices along L (x); the axial
    # section of the diameter is then a row across the images, on no single one of them
    array = np.zeros((8, 20, 20), np.uint8)
    array[2:6, 5:12, 4:15] = 1
    mask = sitk.GetImageFromArray(array)
    mask.SetDirection((0, 0, 1, 1, 0, 0, 0, -1, 0))
    section = axial_section(mask)
    assert section is not None and section.slice_axis == 1
    sources = classic_mr_series(n_slices=8, rows=20, columns=20)
    with pytest.raises(ValueError, match="not one of the images"):
        locate_section(section, mask, sources)
    with pytest.raises(ValueError, match="no source image"):
        axial = sitk.GetImageFromArray(array)
        locate_section(axial_section(axial), axial, sources[:2])


def test_planar_groups_latest_first_shared_tracking(planar_inputs) -> None:
    from reporting.sr import _time_point_context

    baseline, follow_up, _, _ = planar_inputs
    algorithm = hd.sr.AlgorithmIdentification(name="test", version=VERSION)
    groups = planar_groups(
        [baseline, follow_up],
        time_point_context=_time_point_context,
        finding_type=rcodes.segment_type("metastasis"),
        algorithm_id=algorithm,
    )
    kinds = [type(g).__name__ for g in groups]
    assert (
        kinds
        == [
            "PlanarROIMeasurementsAndQualitativeEvaluations",
            "MeasurementsAndQualitativeEvaluations",
        ]
        * 2
    )
    assert {g.tracking_uid for g in groups} == {LESION.tracking_uid}
    assert {g.tracking_identifier for g in groups} == {LESION.tracking_id}
    images = [follow_up.planar.sop_instance_uid] * 2 + [baseline.planar.sop_instance_uid] * 2
    region = groups[0].roi
    assert region is not None and region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    assert region.value[0].tolist() == region.value[-1].tolist()  # closed outline
    assert _image_of(region) == images[0]
    (diameter,) = [m for m in groups[1].get_measurements() if m.name.value == "AXDIAM"]
    line = diameter.referenced_coordinates[0]
    assert line.graphic_type == hd.sr.GraphicTypeValues.POLYLINE and len(line.value) == 2
    assert _image_of(line) == images[1]
    assert _image_of(groups[2].roi) == images[2]
    assert line.value.tolist() == [list(p) for p in follow_up.planar.diameter_end_points]
    # no planar measurement: no groups, no evidence
    assert (
        planar_groups(
            [BASELINE, FOLLOW_UP],
            time_point_context=_time_point_context,
            finding_type=rcodes.segment_type("metastasis"),
            algorithm_id=algorithm,
        )
        == []
    )
    assert planar_evidence([BASELINE, FOLLOW_UP]) == []
    evidence = planar_evidence([baseline, follow_up, baseline])
    assert [ds.SOPInstanceUID for ds in evidence] == [images[2], images[0]]
    assert [ds.StudyInstanceUID for ds in evidence] == [STUDY_UID, FOLLOW_UP_STUDY_UID]


def test_planar_group_refuses_a_diameter_other_than_the_volumetric_one(planar_inputs) -> None:
    from reporting.sr import _time_point_context
    from reporting.sr_planar import planar_group

    _, follow_up, _, _ = planar_inputs
    wrong = dataclasses.replace(
        follow_up, planar=dataclasses.replace(follow_up.planar, diameter_mm=1.0)
    )
    with pytest.raises(ValueError, match="differs"):
        planar_group(
            wrong,
            time_point_context=_time_point_context(wrong, 2),
            finding_type=rcodes.segment_type("metastasis"),
            algorithm_id=hd.sr.AlgorithmIdentification(name="test", version=VERSION),
        )


def test_sr_with_planar_groups_passes_dciodvfy(report: Path) -> None:
    dciodvfy(report)


def test_sr_planar_groups_read_back_with_highdicom(report: Path, planar_inputs) -> None:
    baseline, follow_up, base_t2, fu_t2 = planar_inputs
    sr = hd.sr.srread(report)
    container = next(item for item in sr.content[0].ContentSequence if item.name.value == "126010")
    groups = [item for item in container.ContentSequence if item.name.value == "125007"]
    # current time point's TID 1410 group first, then its TID 1501 group, then the baseline's
    regions = [
        item
        for group in groups[:4]
        for item in group.ContentSequence
        if item.name.value == "111030"  # Image Region
    ]
    assert [_image_of(r) for r in regions] == [fu_t2[3].SOPInstanceUID, base_t2[3].SOPInstanceUID]
    assert [r for r in groups[0].ContentSequence if r.name.value == "111030"] == regions[:1]
    assert not any(i.name.value == "121191" for g in groups[:4] for i in g.ContentSequence)
    assert all(any(i.name.value == "121191" for i in g.ContentSequence) for g in groups[4:])
    planar = sr.content.get_planar_roi_measurement_groups(tracking_uid=LESION.tracking_uid)
    assert [_image_of(g.roi) for g in planar] == [_image_of(r) for r in regions]
    for group, result in zip(planar, (follow_up, baseline), strict=True):
        items = {item.name.value: item for item in group[0].ContentSequence}
        assert items["C2348792"].value == f"{result.role.value} {result.study_date}"
        assert group.tracking_uid == LESION.tracking_uid
        diameter = [m for m in group.get_measurements() if m.name.value == "AXDIAM"]
        assert diameter[0].value == pytest.approx(result.measurements.max_axial_diameter_mm)
        area = [m for m in group.get_measurements() if m.name.value == AREA.value]
        assert area[0].value == pytest.approx(result.planar.area_mm2)
        assert area[0].unit.value == "mm2"
        outline = group.roi.value
        assert outline.tolist() == [list(p) for p in result.planar.outline]
    lines = [
        m.referenced_coordinates[0]
        for g in sr.content.get_image_measurement_groups(tracking_uid=LESION.tracking_uid)
        for m in g.get_measurements()
        if m.referenced_coordinates
    ]
    assert [line.value.tolist() for line in lines] == [
        [list(p) for p in follow_up.planar.diameter_end_points],
        [list(p) for p in baseline.planar.diameter_end_points],
    ]
    # the images drawn on are evidence (current study / other study)
    current = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    other = {
        ref.ReferencedSOPInstanceUID
        for study in sr.PertinentOtherEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert fu_t2[3].SOPInstanceUID in current and base_t2[3].SOPInstanceUID in other
    # the volumetric groups are all still there (two of them the ADC features)
    assert len(sr.content.get_volumetric_roi_measurement_groups()) == 6


def test_dcmqi_reads_planar_values_equal_to_summary(
    report: Path, planar_inputs, tmp_path: Path
) -> None:
    baseline, follow_up, _, _ = planar_inputs
    data = tid1500_json(report, tmp_path)
    groups = data["Measurements"]
    assert {g["TrackingUniqueIdentifier"] for g in groups} == {LESION.tracking_uid}
    planar = [g for g in groups if "segmentationSOPInstanceUID" not in g]
    assert [g["timePoint"] for g in planar] == [
        "follow-up 20260420",
        "follow-up 20260420",
        "baseline 20260105",
        "baseline 20260105",
    ]
    records = {r["role"]: r for r in summary_records([baseline, follow_up])}
    checked = 0
    for group in planar:
        result = follow_up if group["timePoint"].startswith("follow-up") else baseline
        record = records[result.role.value]
        written = reported_value(
            "max_axial_diameter",
            record["measurements"]["max_axial_diameter"],
            result.measurements,
        )
        assert written is not None
        items = {i["quantity"]["CodeValue"]: i for i in group["measurementItems"]}
        assert items["AXDIAM"]["units"]["CodeValue"] == written[1] == "mm"
        assert float(items["AXDIAM"]["value"]) == pytest.approx(written[0], rel=1e-9)
        # the volumetric group of the same time point has the same value
        same = [
            float(i["value"])
            for g in groups
            if "segmentationSOPInstanceUID" in g and g["timePoint"] == group["timePoint"]
            for i in g["measurementItems"]
            if i["quantity"]["CodeValue"] == "AXDIAM" and i["units"]["CodeValue"] == "mm"
        ]
        assert same == [float(items["AXDIAM"]["value"])]
        if "42798000" in items:
            assert float(items["42798000"]["value"]) == pytest.approx(result.planar.area_mm2)
        checked += 1
    assert checked == 4


def test_sr_without_planar_measurements_has_no_planar_groups(tmp_path: Path) -> None:
    _build(BASELINE, FOLLOW_UP).save_as(tmp_path / "sr.dcm")
    sr = hd.sr.srread(tmp_path / "sr.dcm")
    assert sr.content.get_planar_roi_measurement_groups() == []
    assert all(
        not m.referenced_coordinates
        for g in sr.content.get_image_measurement_groups()
        for m in g.get_measurements()
    )
