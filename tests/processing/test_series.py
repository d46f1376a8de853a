"""Assembling series into volumes: geometry, volume order, metadata, and the specific errors.

Synthetic series are built here with known geometry (oblique, LPS) and pixel values that encode
(volume, slice), so the test checks both the grid and that every slice landed in the right place.
The real-scanner geometry of the dcm2niix sets is checked against dcm2niix's NIfTI affine.
"""

from __future__ import annotations

import copy
import gzip
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from processing.diffusion_encoding import UnknownDiffusionEncodingError
from processing.series import (
    DuplicateSliceError,
    InconsistentGeometryError,
    MissingSliceError,
    MixedSeriesError,
    SeriesError,
    group_by_series,
    read_series,
)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"


def rotation(angles_deg: Sequence[float]) -> np.ndarray:
    """Rotation matrix from x, y, z Euler angles (degrees)."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _base(study: str, series: str, frame_of_ref: str, sop_class: str, **attrs) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = frame_of_ref
    ds.Modality = "MR"
    ds.Manufacturer = "SYNTHETIC"
    ds.MagneticFieldStrength = 3
    ds.SeriesDescription = ""
    ds.SeriesNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def make_series(
    volumes: Sequence[dict] | None = None,
    *,
    size: tuple[int, int, int] = (6, 5, 4),
    spacing: tuple[float, float, float] = (1.5, 1.25, 3.0),
    angles: Sequence[float] = (10.0, -15.0, 20.0),
    origin: Sequence[float] = (-40.0, 12.5, 100.0),
    enhanced: bool = False,
    common: dict | None = None,
    study: str | None = None,
    frame_of_ref: str | None = None,
    seed: int = 0,
) -> list[Dataset]:
    """A synthetic MR series; pixel value = 1000·volume + 10·slice + 1 (volume, slice in true
    order).

    ``volumes`` holds, per volume, the attributes that vary (e.g. ``{"DiffusionBValue": 1000,
    "DiffusionGradientOrientation": [...]}``, ``{"FlipAngle": 10}``,
    ``{"TemporalPositionIdentifier": 3, "AcquisitionTime": "120005"}``). Files are returned
    shuffled (seeded).
    """
    volumes = volumes or [{}]
    common = dict(common or {})
    study = study or generate_uid()
    series = generate_uid()
    frame_of_ref = frame_of_ref or generate_uid()
    nx, ny, nz = size
    r = rotation(angles)
    row, col, normal = r[:, 0], r[:, 1], r[:, 2]
    iop = [round(float(v), 10) for v in (*row, *col)]
    positions = [np.asarray(origin) + k * spacing[2] * normal for k in range(nz)]
    if not enhanced:
        out = []
        instance = 1
        for v, attrs in enumerate(volumes):
            for k in range(nz):
                ds = _base(study, series, frame_of_ref, MR_IMAGE_STORAGE, **common)
                ds.Rows, ds.Columns = ny, nx
                ds.PixelSpacing = [spacing[1], spacing[0]]
                ds.SliceThickness = spacing[2]
                ds.ImageOrientationPatient = iop
                ds.ImagePositionPatient = [round(float(c), 6) for c in positions[k]]
                ds.InstanceNumber = instance
                instance += 1
                for key, value in attrs.items():
                    setattr(ds, key, value)
                ds.PixelData = np.full((ny, nx), 1000 * v + 10 * k + 1, dtype=np.uint16).tobytes()
                out.append(ds)
        rng = np.random.default_rng(seed)
        return [out[i] for i in rng.permutation(len(out))]
    ds = _base(study, series, frame_of_ref, ENHANCED_MR_IMAGE_STORAGE, **common)
    ds.Rows, ds.Columns = ny, nx
    ds.NumberOfFrames = len(volumes) * nz
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    shared = Dataset()
    timing = Dataset()
    timing.RepetitionTime = common.get("RepetitionTime", 100.0)
    timing.FlipAngle = common.get("FlipAngle", 90.0)
    shared.MRTimingAndRelatedParametersSequence = [timing]
    echo = Dataset()
    echo.EffectiveEchoTime = common.get("EchoTime", 10.0)
    shared.MREchoSequence = [echo]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    pixels = []
    for v, attrs in enumerate(volumes):
        for k in range(nz):
            pf = Dataset()
            # Siemens XA style: the spatial groups are per-frame.
            meas = Dataset()
            meas.PixelSpacing = [spacing[1], spacing[0]]
            meas.SliceThickness = spacing[2]
            pf.PixelMeasuresSequence = [meas]
            ori = Dataset()
            ori.ImageOrientationPatient = iop
            pf.PlaneOrientationSequence = [ori]
            pos = Dataset()
            pos.ImagePositionPatient = [round(float(c), 6) for c in positions[k]]
            pf.PlanePositionSequence = [pos]
            content = Dataset()
            content.TemporalPositionIndex = attrs.get("TemporalPositionIndex", v + 1)
            if "FrameAcquisitionDateTime" in attrs:
                content.FrameAcquisitionDateTime = attrs["FrameAcquisitionDateTime"]
            pf.FrameContentSequence = [content]
            if "DiffusionBValue" in attrs:
                diff = Dataset()
                diff.DiffusionBValue = attrs["DiffusionBValue"]
                grad = attrs.get("DiffusionGradientOrientation")
                diff.DiffusionDirectionality = "DIRECTIONAL" if grad is not None else "NONE"
                if grad is not None:
                    item = Dataset()
                    item.DiffusionGradientOrientation = grad
                    diff.DiffusionGradientDirectionSequence = [item]
                pf.MRDiffusionSequence = [diff]
            if "FlipAngle" in attrs:
                t = Dataset()
                t.FlipAngle = attrs["FlipAngle"]
                t.RepetitionTime = common.get("RepetitionTime", 100.0)
                pf.MRTimingAndRelatedParametersSequence = [t]
            frames.append(pf)
            pixels.append(np.full((ny, nx), 1000 * v + 10 * k + 1, dtype=np.uint16))
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(frames))
    ds.PerFrameFunctionalGroupsSequence = [frames[i] for i in perm]
    ds.PixelData = np.stack([pixels[i] for i in perm]).tobytes()
    return [ds]


def _check_volume_order(array: np.ndarray) -> None:
    n_vol, nz = array.shape[:2]
    expected = 1000 * np.arange(n_vol)[:, None] + 10 * np.arange(nz)[None, :] + 1
    np.testing.assert_array_equal(array[:, :, 0, 0], expected)


DWI_VOLUMES = [
    {"DiffusionBValue": 0.0},
    {"DiffusionBValue": 500.0, "DiffusionGradientOrientation": [1.0, 0.0, 0.0]},
    {"DiffusionBValue": 500.0, "DiffusionGradientOrientation": [0.0, 1.0, 0.0]},
    {"DiffusionBValue": 1000.0, "DiffusionGradientOrientation": [0.0, 0.6, 0.8]},
]


@pytest.mark.parametrize("enhanced", [False, True], ids=["classic", "enhanced_xa_perframe"])
def test_oblique_geometry_and_volume_order(enhanced):
    size, spacing, angles, origin = (
        (6, 5, 4),
        (1.5, 1.25, 3.0),
        (10.0, -15.0, 20.0),
        (-40.0, 12.5, 100.0),
    )
    sv = read_series(
        make_series(
            DWI_VOLUMES, size=size, spacing=spacing, angles=angles, origin=origin, enhanced=enhanced
        )
    )
    assert sv.array.shape == (4, 4, 5, 6)
    assert sv.array.dtype == np.float32
    _check_volume_order(sv.array)
    r = rotation(angles)
    np.testing.assert_allclose(sv.geometry.origin, origin, atol=1e-5)
    np.testing.assert_allclose(sv.geometry.spacing, spacing, atol=1e-5)
    np.testing.assert_allclose(sv.geometry.direction_matrix, r, atol=1e-8)
    assert sv.geometry.size == size
    np.testing.assert_allclose(sv.b_values, [0, 500, 500, 1000])
    np.testing.assert_allclose(sv.gradients[3], [0, 0.6, 0.8])
    assert sv.volumes[0].gradient is None
    # SimpleITK image carries the same grid: the far corner maps to the right LPS point.
    img = sv.volume_image(2)
    corner = np.asarray(img.TransformIndexToPhysicalPoint((5, 4, 3)))
    expected = np.asarray(origin) + r @ (np.array([5, 4, 3]) * np.asarray(spacing))
    np.testing.assert_allclose(corner, expected, atol=1e-5)
    assert sitk.GetArrayViewFromImage(img)[3, 0, 0] == 2000 + 30 + 1
    # each slice knows its source frame
    frames = {f.sop_instance_uid for vol in sv.source_frames for f in vol}
    assert len(sv.source_frames) == 4 and all(len(v) == 4 for v in sv.source_frames)
    if enhanced:
        assert len(frames) == 1
        numbers = sorted(f.frame_number for vol in sv.source_frames for f in vol)
        assert numbers == list(range(1, 17))
    else:
        assert len(frames) == 16


def test_reversed_slice_order_is_sorted_along_normal():
    """Slices written from the top down still give a volume whose z axis is row × column."""
    dss = make_series(size=(4, 4, 5), angles=(0, 0, 0), origin=(0, 0, 0), spacing=(1, 1, 2))
    for ds in dss:
        ds.InstanceNumber = 100 - int(ds.InstanceNumber)
    sv = read_series(dss)
    np.testing.assert_allclose(sv.geometry.direction_matrix, np.eye(3))
    np.testing.assert_allclose(sv.geometry.origin, (0, 0, 0))
    _check_volume_order(sv.array)


def test_dce_times_relative_to_first_volume():
    vols = [
        {"TemporalPositionIdentifier": t + 1, "AcquisitionTime": f"1200{5 * t:02d}.5"}
        for t in range(6)
    ]
    sv = read_series(
        make_series(vols, common={"FlipAngle": 15, "RepetitionTime": 4.0, "EchoTime": 1.5})
    )
    assert [v.time for v in sv.volumes] == pytest.approx([0, 5, 10, 15, 20, 25])
    assert [v.temporal_position_index for v in sv.volumes] == [1, 2, 3, 4, 5, 6]
    _check_volume_order(sv.array)


def test_dce_trigger_time_preferred_when_it_varies():
    vols = [{"TriggerTime": 4500.0 * t, "AcquisitionTime": "120000"} for t in range(5)]
    sv = read_series(make_series(vols))
    assert [v.time for v in sv.volumes] == pytest.approx([0, 4.5, 9.0, 13.5, 18.0])


def test_vfa_flip_angles_per_volume():
    vols = [{"FlipAngle": fa} for fa in (3.0, 10.0, 20.0)]
    sv = read_series(make_series(vols, enhanced=True, common={"RepetitionTime": 4.0}))
    assert [v.flip_angle for v in sv.volumes] == [3.0, 10.0, 20.0]
    assert [v.repetition_time for v in sv.volumes] == [4.0, 4.0, 4.0]


def test_rescale_slope_and_intercept_applied():
    dss = make_series(size=(3, 3, 2))
    for ds in dss:
        ds.RescaleSlope = 2.5
        ds.RescaleIntercept = -10
    sv = read_series(dss)
    assert sv.array[0, 1, 0, 0] == pytest.approx(2.5 * 11 - 10)


def test_missing_slice_in_middle_of_stack():
    dss = make_series(size=(4, 4, 6))
    victim = next(ds for ds in dss if int(ds.InstanceNumber) == 3)
    with pytest.raises(MissingSliceError, match="missing slice"):
        read_series([ds for ds in dss if ds is not victim])


def test_missing_slice_in_one_volume_of_a_dwi():
    dss = make_series(DWI_VOLUMES, size=(4, 4, 5))
    victim = next(ds for ds in dss if int(ds.InstanceNumber) == 10)  # volume 1, last slice
    with pytest.raises(MissingSliceError, match="lack slice"):
        read_series([ds for ds in dss if ds is not victim])


def test_missing_frame_in_enhanced_object():
    (ds,) = make_series(DWI_VOLUMES, size=(4, 4, 5), enhanced=True)
    del ds.PerFrameFunctionalGroupsSequence[7]
    pixels = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(20, 4, 4)
    ds.PixelData = np.delete(pixels, 7, axis=0).tobytes()
    ds.NumberOfFrames = 19
    with pytest.raises(MissingSliceError):
        read_series([ds])


def test_same_instance_twice_is_a_duplicate():
    dss = make_series(size=(4, 4, 3))
    with pytest.raises(DuplicateSliceError, match="given twice"):
        read_series(dss + [dss[0]])


def test_duplicated_slice_position_with_new_uid():
    dss = make_series(size=(4, 4, 4))
    extra = copy.deepcopy(dss[0])
    extra.SOPInstanceUID = generate_uid()
    with pytest.raises(DuplicateSliceError, match="duplicated slice"):
        read_series(dss + [extra])


def test_mixed_orientation():
    dss = make_series(size=(4, 4, 4))
    dss[1].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    with pytest.raises(InconsistentGeometryError, match="mixed ImageOrientationPatient"):
        read_series(dss)


def test_mixed_pixel_spacing():
    dss = make_series(size=(4, 4, 4))
    dss[2].PixelSpacing = [2.0, 2.0]
    with pytest.raises(InconsistentGeometryError, match="mixed PixelSpacing"):
        read_series(dss)


def test_irregular_spacing():
    dss = make_series(size=(4, 4, 5), angles=(0, 0, 0), origin=(0, 0, 0), spacing=(1, 1, 3))
    for ds in dss:
        z = float(ds.ImagePositionPatient[2])
        if z > 7:
            ds.ImagePositionPatient = [0, 0, z + 1.0]
    with pytest.raises(InconsistentGeometryError, match="irregular slice spacing"):
        read_series(dss)


def test_sheared_stack_is_rejected():
    dss = make_series(size=(4, 4, 4), angles=(0, 0, 0), origin=(0, 0, 0), spacing=(1, 1, 3))
    for ds in dss:
        x, y, z = (float(c) for c in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x + 0.5 * z, y, z]  # gantry-tilt-like shear
    with pytest.raises(InconsistentGeometryError, match="sheared"):
        read_series(dss)


def test_two_series_are_refused_and_grouped():
    a = make_series(size=(3, 3, 2))
    b = make_series(size=(3, 3, 2), seed=1)
    with pytest.raises(MixedSeriesError, match="2 series"):
        read_series(a + b)
    groups = group_by_series(a + b)
    assert sorted(len(v) for v in groups.values()) == [2, 2]


def test_unknown_vendor_diffusion_encoding_is_an_error():
    dss = make_series([{"ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]}], size=(3, 3, 2))
    with pytest.raises(UnknownDiffusionEncodingError, match="no standard"):
        read_series(dss)
    with pytest.raises(SeriesError):  # callers catching SeriesError see it too
        read_series(dss)


def test_directional_diffusion_without_direction_is_an_error():
    dss = make_series(
        [{"DiffusionBValue": 1000.0, "DiffusionDirectionality": "DIRECTIONAL"}], size=(3, 3, 2)
    )
    with pytest.raises(SeriesError, match="no gradient direction"):
        read_series(dss)


def _corners_lps_and_values(
    affine_ras: np.ndarray, data: np.ndarray
) -> list[tuple[np.ndarray, float]]:
    """(LPS position, value) of the 8 corner voxels of a NIfTI volume (data indexed i, j, k)."""
    out = []
    shape = data.shape
    for i in (0, shape[0] - 1):
        for j in (0, shape[1] - 1):
            for k in (0, shape[2] - 1):
                ras = affine_ras @ np.array([i, j, k, 1.0])
                out.append((np.array([-ras[0], -ras[1], ras[2]]), float(data[i, j, k])))
    return out


def _read_any(path: Path) -> Dataset:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    return pydicom.dcmread(io.BytesIO(raw))


@pytest.mark.parametrize(
    "case", ["ge_oblique", "canon_enhanced", "canon_classic_sagittal", "siemens_sagittal_mosaic"]
)
def test_real_geometry_matches_dcm2niix(case, shared_data: Path, tmp_path: Path):
    """Grid corners (LPS) and their voxel values equal those of dcm2niix's NIfTI (any axis flips).

    The Siemens mosaic has no stored NIfTI, so dcm2niix (test dependency) converts it here.
    """
    import nibabel as nib

    root = shared_data / "dwi_dcmqa"
    inputs = {
        "ge_oblique": ("ge_dwi/In/01_Ax_DWI_TENSOR_R2/*", "ge_dwi/Ref/Ax_DWI_TENSOR_R2_1.nii"),
        "canon_enhanced": (
            "canon_dwi/In/enh/8000.dcm.gz",
            "canon_dwi/Ref/8000_DTI_PA-ALL_20d_enh.nii.gz",
        ),
        "canon_classic_sagittal": (
            "canon_dwi/In/cl/9000_*.dcm.gz",
            "canon_dwi/Ref/9000_SAG_DTI_PA-ortho_cl.nii.gz",
        ),
        "siemens_sagittal_mosaic": ("siemens_sag_mosaic_dwi/In/4_DWI_SagAPmosaic/*", None),
    }
    pattern, ref = inputs[case]
    files = sorted(root.glob(pattern))
    sv = read_series([_read_any(f) for f in files])
    if ref is None:
        import subprocess
        import sys

        exe = Path(sys.executable).parent / "dcm2niix"
        subprocess.run(
            [str(exe), "-o", str(tmp_path), "-f", "ref", "-z", "n", str(files[0].parent)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        nii_path = tmp_path / "ref.nii"
    else:
        nii_path = root / ref
    nii = nib.load(nii_path)
    data = np.asarray(nii.dataobj)[..., 0]
    assert sorted(data.shape) == sorted(sv.geometry.size)
    ours = sv.array[0]  # (z, y, x)
    size = sv.geometry.size
    for position, value in _corners_lps_and_values(nii.affine, data):
        best = None
        for i in (0, size[0] - 1):
            for j in (0, size[1] - 1):
                for k in (0, size[2] - 1):
                    d = float(np.linalg.norm(sv.geometry.index_to_lps((i, j, k)) - position))
                    if best is None or d < best[0]:
                        best = (d, float(ours[k, j, i]))
        assert best[0] < 0.05, f"{case}: corner {position} is {best[0]:.3f} mm from ours"
        assert best[1] == pytest.approx(value, rel=1e-5, abs=1e-3)


# ------------------------------------------------------------------------- phantom (acceptance 2)
PHANTOM_CASES = [
    ("standard", "responder"),
    ("siemens", "progression"),
    ("ge", "pseudoprogression"),
    ("philips", "stable"),
    ("enhanced", "responder"),
]


@pytest.mark.slow
@pytest.mark.parametrize("vendor, scenario", PHANTOM_CASES, ids=[v for v, _ in PHANTOM_CASES])
def test_phantom_geometry_and_diffusion_encoding_equal_ground_truth(vendor, scenario, make_phantom):
    """Every MR series of every study: grid = ground_truth.json geometry; every DWI file's b-value
    and LPS gradient = the truth written for that file (GE: logical frame, Philips/Siemens:
    private)."""
    import json

    root = make_phantom(scenario, vendor, "small")
    truth = json.loads((root / "ground_truth.json").read_text())
    by_series: dict[str, list[Dataset]] = {}
    sop_to_file: dict[str, str] = {}
    for path in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
        sop_to_file[ds.SOPInstanceUID] = str(path.relative_to(root))
    for key, study in truth["studies"].items():
        for role, series in study["series"].items():
            sv = read_series(by_series[series["SeriesInstanceUID"]])
            geo = series["geometry"]
            assert list(sv.geometry.size) == geo["size"], (key, role)
            np.testing.assert_allclose(sv.geometry.origin, geo["origin"], atol=1e-3)
            np.testing.assert_allclose(sv.geometry.spacing, geo["spacing"], atol=1e-4)
            np.testing.assert_allclose(sv.geometry.direction, geo["direction"], atol=1e-5)
            assert sv.frame_of_reference_uid == study["FrameOfReferenceUID"]
            acquisition = series["acquisition"]
            if role == "dce":
                times = np.array([m.time for m in sv.volumes])
                assert len(times) == acquisition["number_of_temporal_positions"]
                np.testing.assert_allclose(
                    np.diff(times), acquisition["temporal_resolution_s"], atol=1e-3
                )
            if role == "vfa_t1":
                assert [m.flip_angle for m in sv.volumes] == pytest.approx(
                    acquisition["flip_angles_deg"]
                )
            if role != "dwi":
                continue
            file_truth = {}
            for entry in truth["dwi_files"][key]:
                for frame in entry.get("frames", [dict(entry, frame=None)]):
                    file_truth[(entry["file"], frame["frame"])] = frame
            checked = 0
            for v, frames in enumerate(sv.source_frames):
                meta = sv.volumes[v]
                for frame in frames:
                    t = file_truth[(sop_to_file[frame.sop_instance_uid], frame.frame_number)]
                    assert meta.b_value == pytest.approx(t["b"], abs=1e-3)
                    if t["b"] > 5:
                        np.testing.assert_allclose(meta.gradient, t["gradient_lps"], atol=1e-4)
                    else:
                        assert meta.gradient is None
                    checked += 1
            assert checked == len(file_truth)


def _phantom_series(root: Path, role: str, study: str = "baseline") -> list[Dataset]:
    import json

    truth = json.loads((root / "ground_truth.json").read_text())
    folder = truth["studies"][study]["series"][role]["folder"]
    return [pydicom.dcmread(p) for p in sorted((root / study / folder).glob("*.dcm"))]


@pytest.mark.slow
def test_phantom_corrupt_series_give_specific_errors(make_phantom):
    """Acceptance 4 on phantom data: a dropped file, a duplicated slice, a re-oriented slice, a
    dropped enhanced frame and a stripped or unknown diffusion encoding each raise their error."""
    standard = make_phantom("responder", "standard", "small")
    t2w = _phantom_series(standard, "t2w")
    with pytest.raises(MissingSliceError):
        read_series(t2w[:5] + t2w[6:])
    dwi = _phantom_series(standard, "dwi")
    with pytest.raises(MissingSliceError):
        read_series(dwi[:100] + dwi[101:])
    extra = copy.deepcopy(dwi[100])
    extra.SOPInstanceUID = generate_uid()
    with pytest.raises(DuplicateSliceError):
        read_series(dwi + [extra])
    tilted = copy.deepcopy(t2w)
    tilted[3].ImageOrientationPatient = [1, 0, 0, 0, 0.9950042, 0.0998334]
    with pytest.raises(InconsistentGeometryError):
        read_series(tilted)
    stripped = copy.deepcopy(dwi)
    for ds in stripped:
        del ds.DiffusionBValue  # the "ep_b…" diffusion sequence still says what it is
    with pytest.raises(UnknownDiffusionEncodingError):
        read_series(stripped)
    siemens_dwi = _phantom_series(make_phantom("progression", "siemens", "small"), "dwi")
    for ds in siemens_dwi:
        # private creators this node does not know (the phantom writes the CSA header too)
        ds[0x0019, 0x0010].value = "ACME MR HEADER"
        if (0x0029, 0x0010) in ds:
            ds[0x0029, 0x0010].value = "ACME CSA HEADER"
    with pytest.raises(UnknownDiffusionEncodingError):
        read_series(siemens_dwi)
    (enhanced,) = _phantom_series(make_phantom("responder", "enhanced", "small"), "dwi")
    n = int(enhanced.NumberOfFrames)
    pixels = enhanced.pixel_array
    del enhanced.PerFrameFunctionalGroupsSequence[n // 2]
    enhanced.PixelData = np.delete(pixels, n // 2, axis=0).tobytes()
    enhanced.NumberOfFrames = n - 1
    with pytest.raises(MissingSliceError):
        read_series([enhanced])
