"""Diffusion encoding for every vendor, checked against dcm2niix's .bval/.bvec (issue 3,
acceptance 1).

Reference: ``../shared/data/dwi_dcmqa`` (dcm2niix validation sets). The data README documents how
dcm2niix's FSL ``.bvec`` relates to LPS gradients: g_img = Rᵀ·g_LPS (R's columns: row, column,
row × column) followed by a per-axis sign flip. b ≈ 0 volumes (b < 5 s/mm²) carry no usable
direction (Philips writes a dummy one), so directions are compared on the diffusion-weighted
volumes.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from processing.diffusion_encoding import (
    GE_ACQU,
    GE_PARM,
    UnknownDiffusionEncodingError,
    diffusion_encoding,
    gradients_to_image_frame,
    private_value,
)
from processing.series import SeriesVolume, read_series

TOL = 1e-3

# name: (input glob under dwi_dcmqa, dcm2niix output stem, documented bvec sign flip of g_img)
CASES = {
    "ge_oblique": ("ge_dwi/In/01_Ax_DWI_TENSOR_R2/*", "ge_dwi/Ref/Ax_DWI_TENSOR_R2_1", (1, -1, 1)),
    "siemens_sag_mosaic": (
        "siemens_sag_mosaic_dwi/In/4_DWI_SagAPmosaic/*",
        "siemens_sag_mosaic_dwi/Ref/4_DWI_SagAPmosaic",
        (1, 1, 1),
    ),
    "canon_enhanced": (
        "canon_dwi/In/enh/8000.dcm.gz",
        "canon_dwi/Ref/8000_DTI_PA-ALL_20d_enh",
        (1, -1, 1),
    ),
    "canon_classic": (
        "canon_dwi/In/cl/9000_*.dcm.gz",
        "canon_dwi/Ref/9000_SAG_DTI_PA-ortho_cl",
        (1, -1, 1),
    ),
    "philips_classic": (
        "philips_dwi/In/cl/DICOM/IM_*",
        "philips_dwi/Ref/701_DTI_Biobank_2mm_MB3S2_EPI_cl",
        (1, -1, 1),
    ),
}


def _read(path: Path) -> Dataset:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as fh:
            return pydicom.dcmread(io.BytesIO(fh.read()))
    return pydicom.dcmread(path)


@pytest.fixture(scope="module")
def dcmqa(shared_data: Path) -> Path:
    return shared_data / "dwi_dcmqa"


@pytest.fixture(scope="module")
def series_cache(dcmqa: Path) -> dict[str, tuple[list[Dataset], SeriesVolume]]:
    out = {}
    for name, (pattern, _, _) in CASES.items():
        files = sorted(dcmqa.glob(pattern))
        assert files, f"no input files for {name}"
        datasets = [_read(p) for p in files]
        out[name] = (datasets, read_series(datasets))
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_b_values_equal_dcm2niix_bval(name, dcmqa, series_cache):
    _, volume = series_cache[name]
    bval = np.loadtxt(dcmqa / (CASES[name][1] + ".bval"))
    assert volume.b_values.shape == bval.shape
    np.testing.assert_allclose(volume.b_values, bval, atol=TOL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_gradients_equal_dcm2niix_bvec_after_frame_conversion(name, dcmqa, series_cache):
    _, volume = series_cache[name]
    bval = np.loadtxt(dcmqa / (CASES[name][1] + ".bval"))
    bvec = np.loadtxt(dcmqa / (CASES[name][1] + ".bvec")).T
    weighted = bval > 5
    assert weighted.sum() >= 6
    g_img = gradients_to_image_frame(volume.gradients, volume.geometry.direction_matrix)
    flipped = g_img * np.asarray(CASES[name][2], dtype=float)
    err = np.abs(flipped[weighted] - bvec[weighted]).max()
    assert err < TOL, f"{name}: max |error| {err:.2e}"
    # LPS gradients are unit vectors, and b0 volumes carry none.
    np.testing.assert_allclose(np.linalg.norm(volume.gradients[weighted], axis=1), 1.0, atol=1e-6)
    assert all(volume.volumes[i].gradient is None for i in np.flatnonzero(~weighted))


def test_ge_private_gradients_are_logical_frame_as_documented(dcmqa, series_cache):
    """README convention for GE: the private (0019,xxBB-BD) vector with (−x, y, z) is the .bvec."""
    datasets, volume = series_cache["ge_oblique"]
    bvec = np.loadtxt(dcmqa / (CASES["ge_oblique"][1] + ".bvec")).T
    raw_by_volume = {}
    for ds in datasets:
        raw = [float(private_value(ds, 0x0019, GE_ACQU, off, "DS")) for off in (0xBB, 0xBC, 0xBD)]
        b = float(private_value(ds, 0x0043, GE_PARM, 0x39, "IS")[0]) % 1e9
        sop = ds.SOPInstanceUID
        for v, frames in enumerate(volume.source_frames):
            if any(f.sop_instance_uid == sop for f in frames):
                raw_by_volume[v] = (b, raw)
    for v, (b, raw) in raw_by_volume.items():
        if b > 5:
            np.testing.assert_allclose(np.array(raw) * (-1, 1, 1), bvec[v], atol=TOL)


def test_philips_volume_order_follows_private_diffusion_order(series_cache, dcmqa):
    """dcm2niix orders Philips classic volumes by (2005,xx96); b0 repeats stay 0.001…0.004.

    Instance numbers are reversed on a fresh read to show the order comes from (2005,xx96)
    ("Philips MR Imaging DD 006"), not from the file or instance order.
    """
    _, volume = series_cache["philips_classic"]
    assert volume.b_values[[0, 4, 8, 12, 16]].tolist() == pytest.approx(
        [0, 0.001, 0.002, 0.003, 0.004], abs=1e-6
    )
    assert volume.array.shape == (17, 32, 112, 112)
    files = sorted(dcmqa.glob(CASES["philips_classic"][0]))
    datasets = [_read(p) for p in files]
    for ds in datasets:
        ds.InstanceNumber = 10_000 - int(ds.InstanceNumber)
    reordered = read_series(datasets)
    np.testing.assert_allclose(reordered.b_values, volume.b_values)
    np.testing.assert_array_equal(reordered.gradients, volume.gradients)
    np.testing.assert_array_equal(reordered.array, volume.array)


def _ge_like(b_raw: int, block: int) -> Dataset:
    """A minimal GE-style image whose private creators reserve element block ``block``."""
    ds = Dataset()
    ds.SOPInstanceUID = "2.25.1"
    ds.Manufacturer = "GE MEDICAL SYSTEMS"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.InPlanePhaseEncodingDirection = "COL"
    ds.ScanningSequence = ["EP", "SE"]
    ds.add_new((0x0019, 0x0010), "LO", "SOME OTHER CREATOR")
    ds.add_new((0x0019, 0x10BB), "DS", "0.9")  # decoy at the usual element number
    ds.add_new((0x0019, block), "LO", GE_ACQU)
    for off, val in ((0xBB, "0.6"), (0xBC, "0.0"), (0xBD, "0.8")):
        ds.add_new((0x0019, (block << 8) | off), "DS", val)
    ds.add_new((0x0043, block), "LO", GE_PARM)
    ds.add_new((0x0043, (block << 8) | 0x39), "IS", [b_raw, 8, 0, 0])
    return ds


def test_ge_private_tags_found_by_creator_in_any_block_and_offset_removed():
    ds = _ge_like(1_000_001_000, 0x11)
    enc = diffusion_encoding(ds)
    assert enc is not None and enc.source == "ge"
    assert enc.b_value == pytest.approx(1000.0)
    # axial COL: image-frame vector (−x, −y, z) of the logical one, identity orientation → LPS.
    np.testing.assert_allclose(enc.gradient, (-0.6, -0.0, 0.8), atol=1e-9)


def test_diffusion_weighted_image_without_known_encoding_is_an_error():
    ds = Dataset()
    ds.SOPInstanceUID = "2.25.2"
    ds.Manufacturer = "ACME"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    with pytest.raises(UnknownDiffusionEncodingError, match="no standard"):
        diffusion_encoding(ds)


def test_non_diffusion_image_has_no_encoding():
    ds = Dataset()
    ds.SOPInstanceUID = "2.25.3"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    assert diffusion_encoding(ds) is None


def test_philips_isotropic_label_gives_trace_without_direction():
    ds = Dataset()
    ds.SOPInstanceUID = "2.25.4"
    blk = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
    blk.add_new(0x03, "FL", 1000.0)
    blk.add_new(0x04, "CS", "I")
    enc = diffusion_encoding(ds)
    assert enc is not None
    assert (enc.b_value, enc.gradient, enc.directionality) == (1000.0, None, "ISOTROPIC")


def test_ge_slop_int_in_a_non_epi_image_is_not_a_b_value():
    """GE writes (0043,xx39) in every image; a spin-echo T2w is not diffusion-weighted."""
    ds = _ge_like(1_000_000_008, 0x10)
    ds.ScanningSequence = "SE"
    assert diffusion_encoding(ds) is None


def test_siemens_csa_header_alone_gives_the_same_encoding_and_mosaic(dcmqa, series_cache):
    """Without the "SIEMENS MR HEADER" elements (older VB/VD exports), b, gradient and the mosaic
    tile count come from the CSA Image Header Info and still equal dcm2niix's .bval/.bvec."""
    pattern, stem, _ = CASES["siemens_sag_mosaic"]
    datasets = [_read(p) for p in sorted(dcmqa.glob(pattern))]
    for ds in datasets:
        block = ds.private_block(0x0019, "SIEMENS MR HEADER")
        for offset in (0x0A, 0x0C, 0x0D, 0x0E):
            if offset in block:
                del ds[block.get_tag(offset)]
    volume = read_series(datasets)
    assert {v.source for v in (diffusion_encoding(ds) for ds in datasets)} == {"siemens_csa"}
    _, reference = series_cache["siemens_sag_mosaic"]
    np.testing.assert_allclose(volume.b_values, np.loadtxt(dcmqa / (stem + ".bval")), atol=TOL)
    np.testing.assert_allclose(volume.gradients, reference.gradients, atol=1e-6)
    np.testing.assert_array_equal(volume.array, reference.array)
