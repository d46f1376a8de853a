"""RT Structure Set → mask: IBSI CT phantom reference count and synthetic contours with known
answers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from processing.rtstruct import (
    RTStructError,
    contours_to_mask,
    find_roi,
    list_rois,
    rtstruct_to_mask,
)

IBSI_CT = Path("ibsi1") / "ibsi_1_ct_radiomics_phantom"
IBSI_INITIAL_ROI_VOXELS = 125_256  # reference_values_mirp/ibsi_1_chest_config_*.csv


def _grid(size, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> sitk.Image:
    image = sitk.Image([int(s) for s in size], sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    return image


def _rect(x0, x1, y0, y1, z) -> np.ndarray:
    return np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]], dtype=float)


def _circle(cx, cy, z, radius, n=256) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.column_stack(
        [cx + radius * np.cos(angles), cy + radius * np.sin(angles), np.full(n, z)]
    )


def _structure_set(
    rois: dict[int, tuple[str, str | None, list[np.ndarray]]], for_uid: str
) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.SOPInstanceUID = "2.25.1"
    ds.Modality = "RTSTRUCT"
    ds.StructureSetROISequence = DicomSequence()
    ds.ROIContourSequence = DicomSequence()
    ds.RTROIObservationsSequence = DicomSequence()
    for number, (name, kind, contours) in rois.items():
        item = Dataset()
        item.ROINumber = number
        item.ROIName = name
        item.ReferencedFrameOfReferenceUID = for_uid
        ds.StructureSetROISequence.append(item)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ContourSequence = DicomSequence()
        for points in contours:
            c = Dataset()
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(points)
            c.ContourData = [float(v) for v in points.flatten()]
            rc.ContourSequence.append(c)
        ds.ROIContourSequence.append(rc)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        if kind:
            obs.RTROIInterpretedType = kind
        ds.RTROIObservationsSequence.append(obs)
    return ds


@pytest.fixture(scope="module")
def ibsi_ct(shared_data: Path) -> tuple[sitk.Image, Dataset]:
    root = shared_data / IBSI_CT / "dicom"
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(root / "image")))
    ct = reader.Execute()
    rtstruct = pydicom.dcmread(next((root / "mask").glob("*.dcm")))
    return ct, rtstruct


def test_ibsi_ct_phantom_roi_voxel_count(ibsi_ct) -> None:
    ct, rtstruct = ibsi_ct
    mask = rtstruct_to_mask(rtstruct, "GTV-1", ct)
    count = int(sitk.GetArrayViewFromImage(mask).sum())
    # acceptance 5: within 1 % of the IBSI initial ROI voxel count (diagnostic values, configs A-E)
    assert abs(count - IBSI_INITIAL_ROI_VOXELS) <= 0.01 * IBSI_INITIAL_ROI_VOXELS, count
    assert count == IBSI_INITIAL_ROI_VOXELS  # the voxel-centre rule reproduces it exactly


def test_ibsi_ct_phantom_mask_matches_reference_nifti_mask(ibsi_ct, shared_data: Path) -> None:
    ct, rtstruct = ibsi_ct
    for_uid = str(rtstruct.StructureSetROISequence[0].ReferencedFrameOfReferenceUID)
    mask = rtstruct_to_mask(rtstruct, 1, ct, frame_of_reference_uid=for_uid)
    reference = sitk.ReadImage(str(shared_data / IBSI_CT / "nifti" / "mask" / "mask.nii.gz"))
    reference = sitk.Resample(
        reference, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )
    a = sitk.GetArrayViewFromImage(mask) > 0
    b = sitk.GetArrayViewFromImage(reference) > 0
    dice = 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
    assert dice > 0.99, dice


def test_frame_of_reference_mismatch_is_refused(ibsi_ct) -> None:
    ct, rtstruct = ibsi_ct
    with pytest.raises(RTStructError, match="frame of reference"):
        rtstruct_to_mask(rtstruct, "GTV-1", ct, frame_of_reference_uid="1.2.3.4")


def test_in_plane_rasterisation_by_voxel_centre_with_hole_and_second_contour() -> None:
    grid = _grid((20, 12, 3))
    outer = _rect(2.3, 7.6, 1.2, 4.9, 1.0)  # centres x 3..7, y 2..4 -> 15
    hole = _rect(4.1, 5.9, 2.5, 3.5, 1.0)  # centre (5, 3) -> 1
    other = _rect(11.5, 13.5, 6.5, 9.5, 1.0)  # centres x 12..13, y 7..9 -> 6
    mask = sitk.GetArrayFromImage(
        contours_to_mask([outer, hole, other], grid, contour_spacing_mm=1.0)
    )
    assert mask.sum() == 15 - 1 + 6
    assert mask[1, 3, 5] == 0 and mask[1, 2, 5] == 1
    assert mask[0].sum() == 0 and mask[2].sum() == 0


def test_slice_coverage_on_thinner_target_slices() -> None:
    planes = [0.0, 3.0, 6.0, 9.0, 12.0]
    contours = [_rect(2.3, 7.6, 1.2, 4.9, z) for z in planes]
    grid = _grid((12, 8, 19), origin=(0.0, 0.0, -3.0))  # z = -3 ... 15 mm, 1 mm slices
    mask = sitk.GetArrayFromImage(contours_to_mask(contours, grid))
    covered = np.flatnonzero(mask.sum(axis=(1, 2)))
    # each plane covers [z - 1.5, z + 1.5): slices z = -1 ... 13 mm
    assert covered.tolist() == list(range(2, 17))
    assert mask.sum() == 15 * 15


def test_gap_between_contour_planes_stays_empty() -> None:
    contours = [_rect(2.3, 7.6, 1.2, 4.9, z) for z in (0.0, 2.0, 8.0, 10.0)]
    grid = _grid((12, 8, 12), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, -4.0))
    mask = sitk.GetArrayFromImage(contours_to_mask(contours, grid))
    assert np.flatnonzero(mask.sum(axis=(1, 2))).tolist() == [2, 3, 6, 7]


def test_sphere_volume_on_oblique_target_grid() -> None:
    radius = 15.0
    contours = []
    for z in np.arange(-radius + 0.5, radius, 1.0):
        r = math.sqrt(radius**2 - z**2)
        contours.append(_circle(0.0, 0.0, z, r))
    angle = math.radians(30)
    direction = (1, 0, 0, 0, math.cos(angle), -math.sin(angle), 0, math.sin(angle), math.cos(angle))
    centre_offset = np.array(direction, dtype=float).reshape(3, 3) @ np.full(3, 25.0)
    grid = _grid((50, 50, 50), origin=tuple(-centre_offset), direction=direction)
    mask = contours_to_mask(contours, grid)
    volume = float(sitk.GetArrayViewFromImage(mask).sum())  # 1 mm3 voxels
    truth = 4.0 / 3.0 * math.pi * radius**3
    assert abs(volume - truth) / truth < 0.03, (volume, truth)
    axial = contours_to_mask(contours, _grid((50, 50, 50), origin=(-25.0, -25.0, -25.0)))
    axial_volume = float(sitk.GetArrayViewFromImage(axial).sum())
    assert abs(axial_volume - truth) / truth < 0.02, (axial_volume, truth)


def test_roi_lookup_by_type_name_and_errors() -> None:
    ss = _structure_set(
        {
            1: ("PTV_24Gy", "PTV", [_rect(0, 5, 0, 5, 0.0)]),
            2: ("GTV L2", "GTV", [_rect(1, 4, 1, 4, 0.0)]),
            3: ("SpinalCord", "ORGAN", []),
        },
        "1.2.3",
    )
    rois = list_rois(ss)
    summary = [(r.number, r.interpreted_type, r.n_contours) for r in rois]
    assert summary == [(1, "PTV", 1), (2, "GTV", 1), (3, "ORGAN", 0)]
    assert find_roi(ss, "gtv l2").number == 2
    assert find_roi(ss, "^ptv").number == 1
    with pytest.raises(RTStructError, match="no ROI"):
        find_roi(ss, "CTV")
    with pytest.raises(RTStructError, match="no closed planar contours"):
        rtstruct_to_mask(ss, 3, _grid((5, 5, 1)))


@pytest.mark.parametrize("scenario", ["responder", "progression", "stable"])
def test_phantom_baseline_gtv_volume_within_3_percent(make_phantom, scenario) -> None:
    """Acceptance 4 (baseline part): RTSTRUCT GTV on the baseline T2w grid vs the phantom truth."""
    import json

    from processing.series import read_series

    root = make_phantom(scenario, "standard", "small")
    truth = json.loads((root / "ground_truth.json").read_text())
    series = truth["studies"]["baseline"]["series"]["t2w"]
    t2w = read_series(
        [pydicom.dcmread(p) for p in sorted((root / "baseline" / series["folder"]).glob("*.dcm"))]
    )
    rtstruct = pydicom.dcmread(root / "rt" / "rtstruct.dcm")
    mask = rtstruct_to_mask(
        rtstruct, "GTV", t2w.volume_image(0), frame_of_reference_uid=t2w.frame_of_reference_uid
    )
    volume_ml = (
        float(sitk.GetArrayViewFromImage(mask).sum()) * float(np.prod(mask.GetSpacing())) / 1000.0
    )
    tumour = truth["studies"]["baseline"]["tumour"]
    # truth on the same grid (voxel centres inside the tumour surface)
    assert abs(volume_ml - tumour["volume_ml_voxels_t2w"]) / tumour["volume_ml_voxels_t2w"] < 0.03
    # the continuous volume differs from any 5 mm-slice voxelisation by a few per cent
    assert abs(volume_ml - tumour["volume_ml_continuous"]) / tumour["volume_ml_continuous"] < 0.05
