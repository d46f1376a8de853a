"""Parametric Maps and SEGs on real scanner series, and reading a SEG written by another tool.

Maps are built the way ``spine-node maps`` writes them (``node.commands.maps._write_pmap``) from
series assembled by :func:`processing.series.read_series`, with a map-like array (the b = 0 volume
scaled into the ADC range, one non-finite voxel). Each Parametric Map must pass dciodvfy, be read
by dcmqi's ``paramap2itkimage``, and come back with the geometry of the map's grid; where dcm2niix
converts the series, the values at each voxel's world position must be dcm2niix's b = 0 voxel
(same scaling), an independent check of the grid (mosaic de-tiling included).

The dcmqi SEGs (``real_mr/dcmqi_seg_sr``) are read without their PET/CT source images; the
expected values are read here from the files' own functional groups with pydicom.
"""

from __future__ import annotations

import copy
import json
import subprocess
import warnings
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from node.commands.maps import _write_pmap
from processing.maps import QuantMap
from processing.results import Lesion
from processing.series import Geometry, SeriesVolume, SourceFrame, group_by_series, read_series
from reporting.pmap import build_parametric_map
from reporting.seg import (
    ORIENTATION_TOLERANCE,
    ReaderSegmentationError,
    SourceGeometryError,
    build_segmentation,
    read_segmentation,
    source_alignment,
)
from tests.real_data import real_data_root, real_series_dir
from tests.reporting.tools import VENV_BIN, dciodvfy, dcmqi

#: case -> (series folder key of tests.real_data, Series Number or None, dcm2niix value check)
CASES: dict[str, tuple[str, int | None, bool]] = {
    "ge_oblique": ("ge_dwi", None, True),
    "siemens_mosaic": ("siemens_mosaic", None, True),
    "canon_enhanced": ("canon_enh", None, True),
    "canon_classic": ("canon_cl", None, False),
    "philips_classic": ("philips_cl", None, False),
    "xa60_enhanced": ("xa60", 14, True),
    "xa61_tracew": ("xa61", 14, False),
    "siemens_e11_classic": ("imagedata_dwi", None, False),
    "uih_tiled": ("uih_dti16", None, True),
}

IMAGE_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"}
SR_EXAMPLE_SEG = "real_mr/dcmqi_seg_sr/data/sr-example/seg.dcm"
LIVER_SEG = "real_mr/dcmqi_seg_sr/data/segmentations/liver.dcm"
VERSION = "0.1.0"


def _series(key: str, series_number: int | None) -> tuple[SeriesVolume, list[pydicom.Dataset]]:
    """The MR image series of a real folder (DICOMDIR and non-image objects left aside)."""
    datasets = []
    for path in sorted(real_series_dir(key).rglob("*")):
        if not path.is_file() or path.name.upper() == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue
        if str(ds.get("SOPClassUID", "")) in IMAGE_SOP_CLASSES and "PixelData" in ds:
            datasets.append(ds)
    groups = group_by_series(datasets)
    if series_number is not None:
        groups = {uid: s for uid, s in groups.items() if int(s[0].SeriesNumber) == series_number}
    assert len(groups) == 1, f"{key}: expected one series, got {len(groups)}"
    series = next(iter(groups.values()))
    return read_series(series), series


def _adc_like(volume: SeriesVolume) -> QuantMap:
    """The b = 0 volume scaled to 0..1e-3 mm2/s, one voxel non-finite (a failed fit)."""
    b0 = volume.array[0].astype(np.float64)
    values = (1e-3 * b0 / b0.max()).astype(np.float32)
    values[0, 0, 0] = np.nan
    return QuantMap(
        "ADC",
        values,
        np.isfinite(values),
        "mm2/s",
        volume.geometry,
        volume.series_instance_uid,
        {"b_values": [0.0, 1000.0]},
    )


def _lps_points(geometry: Geometry) -> np.ndarray:
    """(z, y, x, 3) LPS centres of every voxel of ``geometry``."""
    nx, ny, nz = geometry.size
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    index = np.stack([i, j, k], axis=-1).astype(float) * np.asarray(geometry.spacing)
    return np.asarray(geometry.origin) + index @ geometry.direction_matrix.T


def _dcm2niix_b0(folder: Path, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """dcm2niix's b = 0 volume and its affine (RAS) for the series in ``folder``."""
    out.mkdir()
    proc = subprocess.run(
        [str(VENV_BIN / "dcm2niix"), "-z", "n", "-f", "%s", "-o", str(out), str(folder)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    niftis = sorted(out.glob("*.nii"))
    assert len(niftis) == 1, [p.name for p in niftis]
    image = nib.load(niftis[0])
    data = np.asarray(image.dataobj, dtype=np.float64)
    bval = niftis[0].with_suffix(".bval")
    first_b0 = int(np.argmin(np.loadtxt(bval))) if bval.exists() else 0
    return (data[..., first_b0] if data.ndim == 4 else data), image.affine


@pytest.fixture(scope="module")
def seg_files() -> dict[str, pydicom.Dataset]:
    root = real_data_root()
    return {
        "sr-example": pydicom.dcmread(root / SR_EXAMPLE_SEG),
        "liver": pydicom.dcmread(root / LIVER_SEG),
    }


# ----------------------------------------------------------------------------- Parametric Maps
@pytest.mark.parametrize("case", sorted(CASES))
def test_parametric_map_of_real_series(tmp_path: Path, case: str) -> None:
    key, series_number, check_dcm2niix = CASES[case]
    volume, series = _series(key, series_number)
    qmap = _adc_like(volume)
    by_sop = {str(ds.SOPInstanceUID): ds for ds in series}
    name = _write_pmap(qmap, volume, by_sop, tmp_path)
    assert name is not None
    path = tmp_path / name
    dciodvfy(path)
    # the map is built on its 3-D companion series, one image per map frame, written beside it
    pmap = pydicom.dcmread(path, stop_before_pixels=True)
    [reference] = pmap.ReferencedSeriesSequence
    [folder] = tmp_path.glob("reference_*")
    companion = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]
    assert len(companion) == int(pmap.NumberOfFrames)
    assert {str(ds.SeriesInstanceUID) for ds in companion} == {str(reference.SeriesInstanceUID)}

    # dcmqi reads it, on the map's grid, with the map's values (um2/s; failed fit -> 0)
    dcmqi(
        "paramap2itkimage",
        "--inputDICOM",
        str(path),
        "--outputDirectory",
        str(tmp_path),
        "--prefix",
        case,
    )
    meta = json.loads((tmp_path / f"{case}-meta.json").read_text())
    assert meta["QuantityValueCode"]["CodeValue"] == "113041"
    image = sitk.ReadImage(str(tmp_path / f"{case}-pmap.nrrd"))
    geometry = volume.geometry
    assert image.GetSize() == tuple(geometry.size)
    np.testing.assert_allclose(image.GetOrigin(), geometry.origin, atol=1e-3)
    np.testing.assert_allclose(image.GetSpacing(), geometry.spacing, atol=1e-3)
    np.testing.assert_allclose(image.GetDirection(), geometry.direction, atol=1e-4)
    expected = np.where(np.isfinite(qmap.values), qmap.values.astype(np.float64) * 1e6, 0.0)
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), expected, rtol=1e-6, atol=1e-9)

    # the object itself: one orientation, frame positions on the grid, the series referenced
    pm = hd.pm.ParametricMap.from_dataset(pydicom.dcmread(path))
    iop = [
        float(v)
        for v in pm.SharedFunctionalGroupsSequence[0]
        .PlaneOrientationSequence[0]
        .ImageOrientationPatient
    ]
    direction = geometry.direction_matrix
    np.testing.assert_allclose(iop, [*direction[:, 0], *direction[:, 1]], atol=1e-4)
    positions = np.array(
        [
            [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
            for item in pm.PerFrameFunctionalGroupsSequence
        ]
    )
    np.testing.assert_allclose(positions, _lps_points(geometry)[:, 0, 0, :], atol=1e-3)
    # the map references its companion series (checked above); the companion, as its sources,
    # images of the acquisition
    sources = {
        str(item.ReferencedSOPInstanceUID) for ds in companion for item in ds.SourceImageSequence
    }
    assert sources and sources <= set(by_sop)
    assert all(ds.SeriesInstanceUID != volume.series_instance_uid for ds in companion)

    if check_dcm2niix:
        # independent grid check: dcm2niix's b0 voxel at each voxel's world position
        b0, affine = _dcm2niix_b0(real_series_dir(key), tmp_path / "dcm2niix")
        points = _lps_points(geometry).reshape(-1, 3) * [-1.0, -1.0, 1.0]  # LPS -> RAS
        ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(affine), points)).astype(int)
        assert (ijk >= 0).all() and (ijk < b0.shape[:3]).all()
        reference = b0[ijk[:, 0], ijk[:, 1], ijk[:, 2]].reshape(expected.shape)
        scaled = reference * 1e3 / volume.array[0].max()
        np.testing.assert_allclose(
            expected.reshape(-1)[1:], scaled.reshape(-1)[1:], rtol=1e-5, atol=1e-3
        )


def test_mosaic_sources_use_the_map_grid() -> None:
    """A mosaic holds a volume in one stored frame: the map is referenced to it on its own grid."""
    volume, series = _series("siemens_mosaic", None)
    by_sop = {str(ds.SOPInstanceUID): ds for ds in series}
    sources, frames, grid = source_alignment(volume, by_sop)
    assert grid == volume.geometry and frames is None
    assert [ds.SOPInstanceUID for ds in sources] == [volume.source_frames[0][0].sop_instance_uid]
    assert (int(sources[0].Rows), int(sources[0].Columns)) != volume.array.shape[2:]
    qmap = _adc_like(volume)
    with pytest.raises(ValueError, match="values frames are"):
        # without the grid the mosaic's own matrix would be taken for the map's
        build_parametric_map(sources, qmap.values, "ADC", provenance={}, algorithm_version=VERSION)


# ------------------------------------------------------------------------- orientation tolerance
def _ge_b0() -> tuple[SeriesVolume, list[pydicom.Dataset], np.ndarray]:
    volume, series = _series("ge_dwi", None)
    by_sop = {str(ds.SOPInstanceUID): ds for ds in series}
    sources = [by_sop[f.sop_instance_uid] for f in volume.source_frames[0]]
    return volume, sources, _adc_like(volume).values


def test_ge_orientation_noise_is_within_the_stated_tolerance(tmp_path: Path) -> None:
    volume, sources, values = _ge_b0()
    iops = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in sources])
    deviation = float(np.abs(iops - iops[0]).max())
    assert 0.0 < deviation < ORIENTATION_TOLERANCE  # the GE series really differs (3e-8)
    pm = build_parametric_map(sources, values, "ADC", provenance={}, algorithm_version=VERSION)
    written = [
        float(v)
        for v in pm.SharedFunctionalGroupsSequence[0]
        .PlaneOrientationSequence[0]
        .ImageOrientationPatient
    ]
    np.testing.assert_allclose(written, iops[0], atol=1e-9)
    # the caller's datasets keep their own orientation
    assert not np.allclose(
        [float(v) for v in sources[1].ImageOrientationPatient], iops[0], atol=0.0, rtol=0.0
    )

    mask = np.zeros(values.shape, dtype=bool)
    mask[:, 100:140, 110:150] = True
    lesion = Lesion(
        tracking_id="L1", tracking_uid="1.2.826.0.1.3680043.8.498.777", vertebral_level="L2"
    )
    seg = build_segmentation(sources, mask, lesion, algorithm_version=VERSION)
    seg.save_as(tmp_path / "seg.dcm")
    dciodvfy(tmp_path / "seg.dcm")
    back = read_segmentation(pydicom.dcmread(tmp_path / "seg.dcm"))
    array = back.mask_for_sources(volume.source_frames[0])
    np.testing.assert_array_equal(array, mask)


def test_orientation_beyond_the_tolerance_is_refused() -> None:
    _, sources, values = _ge_b0()
    tilted = copy.deepcopy(sources[1])
    iop = [float(v) for v in tilted.ImageOrientationPatient]
    iop[1] += 3e-4
    tilted.ImageOrientationPatient = iop
    mixed = [sources[0], tilted]
    for build in (
        lambda: build_parametric_map(
            mixed, values, "ADC", provenance={}, algorithm_version=VERSION
        ),
        lambda: build_segmentation(
            mixed, values > 0, Lesion("L1", "1.2.3.4", "L2"), algorithm_version=VERSION
        ),
    ):
        with pytest.raises(SourceGeometryError, match=r"by 0\.000\d+ .*tolerance of 0\.0001"):
            build()


def test_segmentation_of_a_mosaic_on_the_map_grid(tmp_path: Path) -> None:
    volume, series = _series("siemens_mosaic", None)
    by_sop = {str(ds.SOPInstanceUID): ds for ds in series}
    sources, _, _ = source_alignment(volume, by_sop)
    mask = np.zeros(volume.array.shape[1:], dtype=bool)
    mask[20:26, 30:50, 35:45] = True
    seg = build_segmentation(
        sources,
        mask,
        Lesion("L1", "1.2.826.0.1.3680043.8.498.778", "L4"),
        algorithm_version=VERSION,
        grid=volume.geometry,
    )
    seg.save_as(tmp_path / "seg.dcm")
    dciodvfy(tmp_path / "seg.dcm")
    reference = volume.volume_image(0)
    back = read_segmentation(pydicom.dcmread(tmp_path / "seg.dcm")).mask_on(reference)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back).astype(bool), mask)


# ----------------------------------------------------------------------------- a reader's SEG
def _per_frame(ds: pydicom.Dataset, keyword: str) -> list[Any]:
    shared = ds.SharedFunctionalGroupsSequence[0]
    return [
        (item if keyword in item else shared)[keyword][0]
        for item in ds.PerFrameFunctionalGroupsSequence
    ]


@pytest.mark.parametrize(
    "name,label,n_frames,type_meaning",
    [
        ("sr-example", "Neoplasm, Primary", 13, "Neoplasm, Primary"),
        ("liver", "Liver", 3, "Liver"),
    ],
)
def test_read_dcmqi_segmentation(
    seg_files: dict[str, pydicom.Dataset], name: str, label: str, n_frames: int, type_meaning: str
) -> None:
    ds = seg_files[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no complaint about a valid SEG from another tool
        seg = read_segmentation(ds)
    assert seg.number_of_frames == n_frames == int(ds.NumberOfFrames)
    assert [s.number for s in seg.segments] == [1]
    segment = seg.segment(1)
    assert segment.label == label
    assert segment.property_type.meaning == type_meaning
    assert (
        segment.property_type.value
        == ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue
    )
    assert (
        segment.category.value
        == ds.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0].CodeValue
    )
    assert seg.segmentation_type == "BINARY"
    assert (seg.rows, seg.columns) == (int(ds.Rows), int(ds.Columns))
    positions = [
        [float(v) for v in g.ImagePositionPatient] for g in _per_frame(ds, "PlanePositionSequence")
    ]
    orientations = [
        [float(v) for v in g.ImageOrientationPatient]
        for g in _per_frame(ds, "PlaneOrientationSequence")
    ]
    spacings = [[float(v) for v in g.PixelSpacing] for g in _per_frame(ds, "PixelMeasuresSequence")]
    sources = [
        item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for item in ds.PerFrameFunctionalGroupsSequence
    ]
    assert [list(f.position) for f in seg.frames] == positions
    assert [list(f.orientation) for f in seg.frames] == orientations
    assert [list(f.pixel_spacing) for f in seg.frames] == spacings
    assert [f.source_sop_instance_uids for f in seg.frames] == [(uid,) for uid in sources]
    assert seg.referenced_series_instance_uids == (
        ds.ReferencedSeriesSequence[0].SeriesInstanceUID,
    )
    assert set(seg.referenced_sop_instance_uids) == set(sources)
    assert ds.Rows and "PixelData" in ds  # the file itself is not modified by reading it


@pytest.mark.parametrize("name", ["sr-example", "liver"])
def test_dcmqi_segmentation_mask_on_grids(seg_files: dict[str, pydicom.Dataset], name: str) -> None:
    ds = seg_files[name]
    seg = read_segmentation(ds)
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns)) > 0
    # foreground pixel centres in LPS, from the file's own per-frame geometry
    points = []
    for frame, ipp, iop, spacing in zip(
        pixels,
        _per_frame(ds, "PlanePositionSequence"),
        _per_frame(ds, "PlaneOrientationSequence"),
        _per_frame(ds, "PixelMeasuresSequence"),
    ):
        row_dir = np.array([float(v) for v in iop.ImageOrientationPatient[:3]])
        col_dir = np.array([float(v) for v in iop.ImageOrientationPatient[3:]])
        dy, dx = (float(v) for v in spacing.PixelSpacing)
        r, c = np.nonzero(frame)
        points.append(
            np.array([float(v) for v in ipp.ImagePositionPatient])
            + np.outer(c * dx, row_dir)
            + np.outer(r * dy, col_dir)
        )
    points = np.concatenate(points)

    # the grid of the (absent) source images: the SEG frames ascend in z, so does this grid
    first = min(float(p.ImagePositionPatient[2]) for p in _per_frame(ds, "PlanePositionSequence"))
    spacing = _per_frame(ds, "PixelMeasuresSequence")[0]
    step = float(spacing.SpacingBetweenSlices)
    grid = sitk.Image(int(ds.Columns), int(ds.Rows), int(ds.NumberOfFrames), sitk.sitkUInt8)
    x0, y0 = (
        float(v)
        for v in ds.PerFrameFunctionalGroupsSequence[0]
        .PlanePositionSequence[0]
        .ImagePositionPatient[:2]
    )
    grid.SetOrigin((x0, y0, first))
    grid.SetSpacing((float(spacing.PixelSpacing[1]), float(spacing.PixelSpacing[0]), step))

    # by the SEG's own geometry (highdicom stacks it descending: resampled here)
    array = sitk.GetArrayFromImage(seg.mask_on(grid))
    assert int(array.sum()) == int(pixels.sum()) == len(points)
    index = np.rint((points - grid.GetOrigin()) / grid.GetSpacing()).astype(int)
    assert array[index[:, 2], index[:, 1], index[:, 0]].all()

    # through the source references (the images are absent: their UIDs and grid are enough)
    uids = [
        item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        for item in ds.PerFrameFunctionalGroupsSequence
    ]
    sop_class = str(
        ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPClassUID
    )
    frames = [SourceFrame(sop_class, uid) for uid in uids]
    by_reference = sitk.GetArrayFromImage(seg.mask_on(grid, source_frames=frames))
    np.testing.assert_array_equal(by_reference.astype(bool), pixels)
    np.testing.assert_array_equal(by_reference, array)
    unrelated = frames[:-1] + [SourceFrame(sop_class, "1.2.826.0.1.3680043.8.498.9")]
    assert not seg.mask_for_sources(unrelated, reference=grid)[-1].any()
    # dcmqi does not state that spatial locations are preserved: checked against the grid
    with pytest.raises(ReaderSegmentationError, match="spatial locations"):
        seg.mask_for_sources(frames)
    shifted = sitk.Image(grid)
    shifted.SetOrigin((x0 + 1.0, y0, first))
    with pytest.raises(ReaderSegmentationError, match="lies 1 mm from the slice"):
        seg.mask_on(shifted, source_frames=frames)


def test_read_segmentation_refuses_other_objects(seg_files: dict[str, pydicom.Dataset]) -> None:
    sr = pydicom.dcmread(real_data_root() / "real_mr/dcmqi_seg_sr/data/sr-example/sr.dcm")
    with pytest.raises(ReaderSegmentationError, match="is not a Segmentation"):
        read_segmentation(sr)
    seg = read_segmentation(seg_files["liver"])
    with pytest.raises(ReaderSegmentationError, match="no segment 2"):
        seg.segment(2)


def test_enhanced_per_frame_orientation_beyond_the_tolerance_is_refused(shared_data: Path) -> None:
    """Per-frame orientations (Siemens XA layout) are held to the same stated tolerance."""
    from tests.reporting.sources import b0_frames, canon_enhanced

    ds = canon_enhanced(shared_data, per_frame_geometry=True)
    frames = b0_frames(ds)
    values = np.full((len(frames), int(ds.Rows), int(ds.Columns)), 1e-3, dtype=np.float32)
    item = ds.PerFrameFunctionalGroupsSequence[frames[1] - 1].PlaneOrientationSequence[0]
    iop = [float(v) for v in item.ImageOrientationPatient]
    iop[0] += 0.5 * ORIENTATION_TOLERANCE  # within: written with the first frame's orientation
    item.ImageOrientationPatient = iop
    build_parametric_map(
        [ds], values, "ADC", provenance={}, algorithm_version=VERSION, source_frames=frames
    )
    iop[0] += 2.0 * ORIENTATION_TOLERANCE
    item.ImageOrientationPatient = iop
    with pytest.raises(SourceGeometryError, match=rf"source frame {frames[1]} .*by 0\.000"):
        build_parametric_map(
            [ds], values, "ADC", provenance={}, algorithm_version=VERSION, source_frames=frames
        )
