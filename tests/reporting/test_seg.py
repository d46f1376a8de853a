"""SEG of a lesion: dciodvfy, dcmqi and highdicom read-back, deterministic UIDs, Enhanced MR."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import dcmread

from processing.results import Lesion
from reporting.seg import SourceGeometryError, build_segmentation
from tests.reporting.sources import b0_frames, canon_enhanced, classic_mr_series
from tests.reporting.tools import dciodvfy, dcmqi

LESION = Lesion(
    tracking_id="GTV L2", tracking_uid="1.2.826.0.1.3680043.8.498.77", vertebral_level="L2"
)


def _mask(shape: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    n = shape[0]
    mask[n // 3 : n // 3 + 2, 5:12, 4:9] = True
    mask[n // 3 + 1, 12, 9] = True  # an irregular voxel so a transposition would show
    return mask


def _itk_slices_by_position(image: sitk.Image, positions: list[list[float]]) -> np.ndarray:
    """Slices of an ITK image at the given DICOM Image Position (Patient) values, in that order."""
    array = sitk.GetArrayFromImage(image)
    out = []
    for ipp in positions:
        i, j, k = image.TransformPhysicalPointToIndex([float(v) for v in ipp])
        assert (i, j) == (0, 0), f"corner of slice at {ipp} maps to ({i}, {j})"
        out.append(array[k])
    return np.stack(out)


def test_classic_series_segmentation_round_trip(tmp_path: Path) -> None:
    sources = classic_mr_series()
    mask = _mask((len(sources), 24, 20))
    seg = build_segmentation(
        sources, mask, LESION, algorithm_version="0.1.0", algorithm_parameters={"threshold": "0.5"}
    )
    path = tmp_path / "seg.dcm"
    seg.save_as(path)

    dciodvfy(path)

    # highdicom read-back: codes, tracking, algorithm, pixels per source instance
    back = hd.seg.Segmentation.from_dataset(dcmread(path))
    assert back.get_segment_numbers(tracking_uid=LESION.tracking_uid) == [1]
    description = back.get_segment_description(1)
    assert description.segmented_property_category.value == "49755003"
    assert description.segmented_property_type.value == "14799000"
    assert description.segmented_property_type.scheme_designator == "SCT"
    assert [c.value for c in description.anatomic_regions] == ["14293000"]  # L2 vertebra
    assert description.tracking_id == "GTV L2"
    assert description.SegmentLabel == "L2 metastasis"
    algorithm = description.algorithm_identification[0]
    assert (algorithm.AlgorithmVersion, algorithm.AlgorithmParameters) == ("0.1.0", "threshold=0.5")
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in sources], segment_numbers=[1]
    )
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), mask)
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID

    # dcmqi reads it; the label map equals the mask, slice by slice at the source positions
    dcmqi(
        "segimage2itkimage",
        "--inputDICOM",
        str(path),
        "--outputDirectory",
        str(tmp_path),
        "--prefix",
        "dcmqi",
        "--outputType",
        "nrrd",
    )
    label = sitk.ReadImage(str(tmp_path / "dcmqi-1.nrrd"))
    slices = _itk_slices_by_position(label, [ds.ImagePositionPatient for ds in sources])
    np.testing.assert_array_equal(slices.astype(bool), mask)


def test_segmentation_uids_are_deterministic() -> None:
    sources = classic_mr_series()
    mask = _mask((len(sources), 24, 20))
    first = build_segmentation(sources, mask, LESION, algorithm_version="0.1.0")
    again = build_segmentation(sources, mask, LESION, algorithm_version="0.1.0")
    newer = build_segmentation(sources, mask, LESION, algorithm_version="0.2.0")
    changed = mask.copy()
    changed[0, 0, 0] = True
    other_input = build_segmentation(sources, changed, LESION, algorithm_version="0.1.0")
    uids = lambda s: (s.SeriesInstanceUID, s.SOPInstanceUID)  # noqa: E731
    assert uids(first) == uids(again)
    assert first.SOPInstanceUID.startswith("2.25.") and len(first.SOPInstanceUID) <= 64
    assert uids(newer)[0] != uids(first)[0] and uids(newer)[1] != uids(first)[1]
    assert uids(other_input)[1] != uids(first)[1]


def test_segmentation_rejects_misaligned_mask() -> None:
    sources = classic_mr_series()
    with pytest.raises(SourceGeometryError, match="5 frames but 6 source images"):
        build_segmentation(sources, np.ones((5, 24, 20), bool), LESION, algorithm_version="1")
    with pytest.raises(ValueError, match="empty"):
        build_segmentation(sources, np.zeros((6, 24, 20), bool), LESION, algorithm_version="1")


@pytest.mark.parametrize("per_frame_geometry", [False, True], ids=["shared", "per-frame"])
def test_enhanced_mr_segmentation(
    tmp_path: Path, shared_data: Path, per_frame_geometry: bool
) -> None:
    source = canon_enhanced(shared_data, per_frame_geometry=per_frame_geometry)
    before = source.to_json_dict(bulk_data_threshold=1, bulk_data_element_handler=lambda e: "")
    frames = b0_frames(source)
    assert len(frames) == 40
    mask = np.zeros((40, 80, 80), dtype=bool)
    mask[18:22, 30:50, 32:47] = True
    mask[20, 51, 40] = True
    seg = build_segmentation(
        [source], mask, LESION, algorithm_version="0.1.0", source_frames=frames
    )
    # the caller's dataset is not altered
    assert (
        source.to_json_dict(bulk_data_threshold=1, bulk_data_element_handler=lambda e: "") == before
    )
    path = tmp_path / "seg_enh.dcm"
    seg.save_as(path)
    dciodvfy(path)

    back = hd.seg.Segmentation.from_dataset(dcmread(path))
    pixels = back.get_pixels_by_source_frame(source.SOPInstanceUID, frames, segment_numbers=[1])
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), mask)
    # every SEG frame references the source instance and all 13 source frames at its position
    positions = {}
    for number, item in enumerate(source.PerFrameFunctionalGroupsSequence, start=1):
        key = tuple(round(float(v), 3) for v in item.PlanePositionSequence[0].ImagePositionPatient)
        positions.setdefault(key, set()).add(number)
    for item in back.PerFrameFunctionalGroupsSequence:
        refs = item.DerivationImageSequence[0].SourceImageSequence
        assert {r.ReferencedSOPInstanceUID for r in refs} == {source.SOPInstanceUID}
        key = tuple(round(float(v), 3) for v in item.PlanePositionSequence[0].ImagePositionPatient)
        assert {int(r.ReferencedFrameNumber) for r in refs} == positions[key]
    shared = back.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx(
        [
            float(v)
            for v in (
                source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence
                if not per_frame_geometry
                else source.PerFrameFunctionalGroupsSequence[0].PixelMeasuresSequence
            )[0].PixelSpacing
        ]
    )

    dcmqi(
        "segimage2itkimage",
        "--inputDICOM",
        str(path),
        "--outputDirectory",
        str(tmp_path),
        "--prefix",
        "enh",
        "--outputType",
        "nrrd",
    )
    label = sitk.ReadImage(str(tmp_path / "enh-1.nrrd"))
    ipps = [
        source.PerFrameFunctionalGroupsSequence[f - 1].PlanePositionSequence[0].ImagePositionPatient
        for f in frames
    ]
    np.testing.assert_array_equal(_itk_slices_by_position(label, ipps).astype(bool), mask)


def test_invalid_source_patient_attributes_do_not_break_the_seg(tmp_path: Path) -> None:
    """A source with an invalid Patient's Sex/Age (dcmqi issue 453) still gives a valid SEG."""
    sources = classic_mr_series()
    for ds in sources:
        ds.PatientSex = "X"
        with pytest.warns(UserWarning, match="Invalid value for VR AS"):
            ds.PatientAge = "45"
    seg = build_segmentation(
        sources, _mask((len(sources), 24, 20)), LESION, algorithm_version="0.1.0"
    )
    assert (seg.PatientSex, "PatientAge" in seg) == ("", False)
    assert sources[0].PatientSex == "X"  # the caller's datasets are untouched
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    dciodvfy(path)
