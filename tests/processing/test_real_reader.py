"""The reader on real scanner exports (issue 13: reader, UIH tiling, effective b-values,
acceptance 2).

Every check is against a reference this project did not compute: dcm2niix's ``.bval``/``.bvec`` and
NIfTI in the data's ``Ref/`` folders, the vendor's own gradient table, or the objects' SOP Classes.
Gzipped/zipped exports are unpacked by :mod:`tests.real_data` into a session temporary folder.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from processing.adc_qa import scanner_adc_mm2_s
from processing.classify import SeriesRole, classify_study, classify_volume
from processing.diffusion_encoding import diffusion_encoding, gradients_to_image_frame
from processing.series import (
    group_by_series,
    read_series,
    set_aside_reason,
    split_set_aside,
)
from tests.real_data import real_data_root, real_series_dir

UIH_REF = "real_mr/uih_umr770_dti16/Ref/dti_tra_dir16_PA_6_134431"
PHILIPS_CL_REF = "dwi_dcmqa/philips_dwi/Ref/701_DTI_Biobank_2mm_MB3S2_EPI_cl"
ACHIEVA_REF = "real_mr/philips_achieva_dti32/Ref/DT_HIGH_32DIR_SENSE_1201"


def _load(name: str) -> list[pydicom.Dataset]:
    folder = real_series_dir(name)
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            out.append(pydicom.dcmread(path))
        except pydicom.errors.InvalidDicomError:
            continue
    return out


def _ref(stem: str) -> tuple[np.ndarray, np.ndarray]:
    root = real_data_root()
    return (np.loadtxt(root / f"{stem}.bval"), np.loadtxt(root / f"{stem}.bvec").T)


def _bvec_frame(volume) -> np.ndarray:
    """Our gradients in dcm2niix's FSL frame: image frame with y negated (row-flipped NIfTI)."""
    return gradients_to_image_frame(volume.gradients, volume.geometry.direction_matrix) * [1, -1, 1]


@pytest.fixture(scope="module")
def philips_cl() -> list[pydicom.Dataset]:
    return _load("philips_cl")


# ----------------------------------------------------------------------------- acceptance 2
def test_cd_export_through_maps_command_sets_aside_every_non_image(tmp_path: Path, capsys) -> None:
    """Acceptance 2: the gunzipped Philips CD export (DICOMDIR, GSPS, Philips private objects) plus
    dcm2niix companion files goes through ``spine-node maps`` without a traceback, every object set
    aside is listed with its reason in maps.json, and the DWI series still gives its ADC."""
    from node.cli import main

    folder = real_series_dir("philips_cl")
    extras = tmp_path / "sidecars"
    extras.mkdir()
    root = real_data_root()
    for suffix in (".bval", ".bvec", ".json"):
        (extras / f"dwi{suffix}").write_bytes((root / f"{PHILIPS_CL_REF}{suffix}").read_bytes())
    out = tmp_path / "out"
    assert main(["maps", str(folder), str(extras), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "Traceback" not in printed.out + printed.err
    assert "object(s) set aside" in printed.out
    report = json.loads((out / "maps.json").read_text())
    aside = {e["file"]: e for e in report["set_aside"]}
    assert set(aside) == {
        "DICOMDIR",
        "PS_0545",
        "XX_0546",
        "XX_0547",
        "dwi.bval",
        "dwi.bvec",
        "dwi.json",
    }
    assert all(e["reason"] for e in report["set_aside"])
    assert "DICOMDIR" in aside["DICOMDIR"]["reason"]
    assert aside["PS_0545"]["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.11.1"
    assert "Presentation State" in aside["PS_0545"]["reason"]
    assert {aside[f]["sop_class_uid"] for f in ("XX_0546", "XX_0547")} == {
        "1.3.46.670589.11.0.0.12.2",
        "1.3.46.670589.11.0.0.12.4",
    }
    assert all("Philips private" in aside[f]["reason"] for f in ("XX_0546", "XX_0547"))
    assert all(
        "not a DICOM file" in aside[f"dwi{s}"]["reason"] for s in (".bval", ".bvec", ".json")
    )
    assert "ADC" in report["maps"]
    assert report["maps"]["ADC"]["provenance"]["b_values"][-1] == pytest.approx(1000.0)


def test_cd_export_classify_study_sets_aside_and_reads_one_dwi_series(philips_cl) -> None:
    """Requirement 4: the Philips classic export is one directional DWI series whose b-values and
    gradients equal dcm2niix's Ref .bval/.bvec (same volume order, FSL frame (x, -y, z))."""
    inventory = classify_study(philips_cl, volumes=(volumes := {}))
    reasons = sorted(e.reason.split(" (")[0] for e in inventory.set_aside)
    assert reasons == [
        "DICOMDIR",
        "Philips private non-image object",
        "Philips private non-image object",
        "Presentation State",
    ]
    dwi = inventory.by_role(SeriesRole.DWI)
    assert len(dwi) == 1 and not inventory.errors
    volume = volumes[dwi[0].series_instance_uid]
    bval, bvec = _ref(PHILIPS_CL_REF)
    assert volume.n_volumes == len(bval) == 17
    np.testing.assert_allclose(volume.b_values, bval, atol=1e-3)
    directional = bval > 5
    np.testing.assert_allclose(_bvec_frame(volume)[directional], bvec[directional], atol=2e-3)
    assert dwi[0].diffusion.adc


# ----------------------------------------------------------------------------- Philips isotropic
def test_philips_achieva_isotropic_volume_left_out() -> None:
    """The scanner's isotropic (trace) image inside the DTI series ((2001,1004) = I, zero gradient
    at b = 1000) is recognised and kept out: 33 volumes whose b-values/gradients equal Ref
    .bval/.bvec."""
    datasets = _load("philips_achieva_dti32")
    volume = read_series(datasets)
    bval, bvec = _ref(ACHIEVA_REF)
    assert volume.n_volumes == len(bval) == 33
    np.testing.assert_allclose(volume.b_values, bval, atol=1e-3)
    np.testing.assert_allclose(_bvec_frame(volume)[1:], bvec[1:], atol=2e-3)
    assert len(volume.excluded) == 1
    assert "(2001,1004) = I" in volume.excluded[0].reason
    assert "60 frame(s)" in volume.excluded[0].reason
    cls = classify_volume(volume)
    assert cls.role is SeriesRole.DWI
    assert cls.diffusion.n_isotropic == 0 and cls.diffusion.n_directions >= 20


# ----------------------------------------------------------------------------- UIH tiles
@pytest.fixture(scope="module")
def uih_volume():
    return read_series(_load("uih_dti16"))


def test_uih_tiles_geometry_and_volumes_equal_ref_nifti(uih_volume) -> None:
    """De-tiled UIH VFRAME images: every voxel's world position (LPS -> RAS: negate x, y) falls on a
    voxel centre of dcm2niix's NIfTI within 0.1 mm, the voxel values are identical, volume by
    volume in the same order, and the grid equals the NIfTI affine."""
    volume = uih_volume
    img = nib.load(str(real_data_root() / f"{UIH_REF}.nii"))
    ref = np.asarray(img.dataobj)
    assert volume.array.shape == (17, 20, 64, 64) and ref.shape == (64, 64, 20, 17)
    g = volume.geometry
    nz, ny, nx = volume.array.shape[1:]
    idx = np.stack(
        np.meshgrid(np.arange(nx), np.arange(ny), np.arange(nz), indexing="ij"), axis=-1
    ).reshape(-1, 3)
    lps = np.asarray(g.origin) + (g.direction_matrix @ (np.asarray(g.spacing)[:, None] * idx.T)).T
    ras = lps * [-1.0, -1.0, 1.0]
    ijk = (np.linalg.inv(img.affine) @ np.c_[ras, np.ones(len(ras))].T)[:3].T
    nearest = np.rint(ijk)
    offset_mm = np.linalg.norm((img.affine[:3, :3] @ (ijk - nearest).T).T, axis=1)
    assert offset_mm.max() < 0.1
    nearest = nearest.astype(int)
    assert np.all((nearest >= 0) & (nearest < ref.shape[:3]))
    for t in range(volume.n_volumes):
        ours = volume.array[t][idx[:, 2], idx[:, 1], idx[:, 0]]
        np.testing.assert_array_equal(ours, ref[nearest[:, 0], nearest[:, 1], nearest[:, 2], t])
    # the grid itself: spacing and slice spacing as the NIfTI's
    np.testing.assert_allclose(sorted(g.spacing), sorted(img.header.get_zooms()[:3]), atol=1e-3)
    # every tile references its file and tile index
    assert {f.mosaic_tile for f in volume.source_frames[0]} == set(range(20))


def test_uih_effective_b_values_and_gradients(uih_volume) -> None:
    """Effective b-values from (0065,xx09) equal Ref .bval (1.25, 929.75); the gradients, read as
    LPS, give in the image frame the scanner's own table (Grad_PA.csv) and dcm2niix's .bvec within
    the 2.4 deg obliquity of the slices (dcm2niix writes (0065,xx37) unrotated)."""
    bval, bvec = _ref(UIH_REF)
    np.testing.assert_allclose(uih_volume.b_values, bval, atol=0.01)
    image_frame = gradients_to_image_frame(
        uih_volume.gradients, uih_volume.geometry.direction_matrix
    )
    table = np.loadtxt(
        real_data_root() / "real_mr/uih_umr770_dti16/In/DTI_134434/Grad_PA.csv", delimiter=","
    )
    np.testing.assert_allclose(image_frame[1:], table, atol=2e-3)
    ours = image_frame[1:] * [1, -1, 1]
    cos = np.sum(ours * bvec[1:], axis=1) / np.linalg.norm(bvec[1:], axis=1)
    assert np.degrees(np.arccos(np.clip(cos, -1, 1))).max() < 3.0
    cls = classify_volume(uih_volume)
    assert cls.role is SeriesRole.DWI and cls.diffusion.shells == ((0.0, 0), (929.8, 16))


def test_uih_nominal_b_value_is_the_fallback() -> None:
    ds = _load("uih_dti16")[1]
    assert diffusion_encoding(ds).b_value == pytest.approx(929.75, abs=0.01)
    block = ds.private_block(0x0065, "Image Private Header")
    del ds[block.get_tag(0x09)]
    assert diffusion_encoding(ds).b_value == pytest.approx(1000.0)


# ----------------------------------------------------------------------------- Siemens XA61
def test_xa61_tracew_series_read_as_trace_never_mixed_with_directional() -> None:
    """Series 14 and 15 (DERIVED\\PRIMARY\\DIFFUSION\\TRACEW, ISOTROPIC) are trace series of two
    volumes (b0, b2000, no gradient) with their own role; series 16 stays 7 directional volumes."""
    datasets = _load("xa61")
    volumes: dict = {}
    inventory = classify_study(datasets, volumes=volumes)
    by_number = {volumes[s.series_instance_uid].series_number: s for s in inventory.series}
    assert set(by_number) == {14, 15, 16}
    for number in (14, 15):
        cls = by_number[number]
        volume = volumes[cls.series_instance_uid]
        assert cls.role is SeriesRole.TRACE
        assert volume.n_volumes == 2
        np.testing.assert_allclose(volume.b_values, [0.0, 2000.0])
        assert all(v.gradient is None for v in volume.volumes)
        assert cls.diffusion.adc  # b0 + b2000: an ADC is possible from the trace
    dwi = by_number[16]
    assert dwi.role is SeriesRole.DWI and dwi.n_volumes == 7
    v16 = volumes[dwi.series_instance_uid]
    bval, bvec = _ref(
        "real_mr/siemens_xa60_xa61_enhanced/Ref/"
        "phantom_check_MBfactor_CimaX_XA61_16_C2P_cmrr_mbep2d_diff_p2_mb1"
    )
    np.testing.assert_allclose(v16.b_values, bval)
    np.testing.assert_allclose(_bvec_frame(v16)[1:], bvec[1:], atol=2e-3)
    assert all(v.image_type[0] == "ORIGINAL" for v in v16.volumes)
    assert inventory.adc[0] == dwi.series_instance_uid  # directional series ranked first
    assert not inventory.set_aside


def test_xa61_tracew_objects_in_the_directional_series_are_left_out() -> None:
    """Were the TRACEW objects of series 14 filed under series 16's UID, they would still be kept
    out of it: series 16 reads as its 7 directional volumes, the 2 trace volumes set aside."""
    datasets = _load("xa61")
    groups = {int(ds.SeriesNumber): [] for ds in datasets}
    for ds in datasets:
        groups[int(ds.SeriesNumber)].append(ds)
    plain = read_series(groups[16])
    uid16 = str(groups[16][0].SeriesInstanceUID)
    moved = []
    for ds in groups[14]:
        ds = copy.deepcopy(ds)
        ds.SeriesInstanceUID = uid16
        moved.append(ds)
    volume = read_series(groups[16] + moved)
    assert volume.n_volumes == 7
    np.testing.assert_array_equal(volume.array, plain.array)
    assert len(volume.excluded) == 2
    assert all("trace" in e.reason for e in volume.excluded)


# ----------------------------------------------------------------------------- scanner ADC
def _ge_series() -> list[pydicom.Dataset]:
    return _load("ge_dwi")


def _as_scanner_adc(
    datasets: list[pydicom.Dataset], value: int, *, series_uid: str | None = None
) -> list[pydicom.Dataset]:
    """Real GE b0 slices turned into a scanner ADC map (ImageType ADC, pixels = ``value``)."""
    b0 = [ds for ds in datasets if diffusion_encoding(ds).is_b0]
    out = []
    uid = series_uid or generate_uid()
    for ds in b0:
        adc = copy.deepcopy(ds)
        adc.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
        adc.SOPInstanceUID = generate_uid()
        adc.SeriesInstanceUID = uid
        pixels = np.full_like(ds.pixel_array, value)
        adc.PixelData = pixels.tobytes()
        out.append(adc)
    return out


def test_scanner_adc_series_role_and_values_in_mm2_per_s() -> None:
    """No real export here holds a scanner ADC series: a real GE series with its Image Type set to
    ADC is classified as the scanner ADC and its integers (1e-6 mm²/s) read as mm²/s."""
    datasets = _as_scanner_adc(_ge_series(), 850)
    volume = read_series(datasets)
    cls = classify_volume(volume)
    assert cls.role is SeriesRole.ADC_MAP
    values, note = scanner_adc_mm2_s(volume, datasets[0])
    np.testing.assert_allclose(values, 850e-6)
    assert "1e-6" in note
    # a Real World Value Mapping in um2/s is used when present
    item = pydicom.Dataset()
    item.RealWorldValueSlope = 2.0
    item.RealWorldValueIntercept = 0.0
    unit = pydicom.Dataset()
    unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "um2/s", "UCUM", "um2/s"
    item.MeasurementUnitsCodeSequence = [unit]
    datasets[0].RealWorldValueMappingSequence = [item]
    values, note = scanner_adc_mm2_s(volume, datasets[0])
    np.testing.assert_allclose(values, 1700e-6)
    assert "Real World Value Mapping" in note


def test_derived_adc_images_inside_a_directional_series_are_left_out() -> None:
    """Scanner ADC images written into the acquired series (same Series Instance UID) are kept
    out of it with a reason; the acquired volumes are unchanged."""
    original = _ge_series()
    plain = read_series(original)
    mixed = original + _as_scanner_adc(original, 900, series_uid=str(original[0].SeriesInstanceUID))
    volume = read_series(mixed)
    assert volume.n_volumes == plain.n_volumes == 7
    np.testing.assert_array_equal(volume.array, plain.array)
    assert len(volume.excluded) == 1 and "scanner-derived map" in volume.excluded[0].reason
    assert classify_volume(volume).role is SeriesRole.DWI


# ----------------------------------------------------------------------------- other objects
def test_maps_command_on_objects_only_lists_them(tmp_path: Path, capsys) -> None:
    """A folder with only an SR, a SEG and an RWVM written by other tools: no map (exit 1), no
    traceback, and maps.json still lists the three objects with their reasons."""
    from node.cli import main

    out = tmp_path / "out"
    assert main(["maps", str(real_series_dir("dcmqi_sr_example")), "--out", str(out)]) == 1
    printed = capsys.readouterr()
    assert "Traceback" not in printed.out + printed.err and "3 object(s) set aside" in printed.out
    report = json.loads((out / "maps.json").read_text())
    assert sorted(e["file"] for e in report["set_aside"]) == ["rwvm.dcm", "seg.dcm", "sr.dcm"]
    assert report["maps"] == {}


def test_sr_rwvm_and_seg_from_other_tools_are_set_aside_by_sop_class() -> None:
    datasets = _load("dcmqi_sr_example")
    by_modality = {str(ds.Modality): ds for ds in datasets}
    assert "Structured Report" in set_aside_reason(by_modality["SR"])
    assert "Real World Value Mapping" in set_aside_reason(by_modality["RWV"])
    assert "Segmentation" in set_aside_reason(by_modality["SEG"])
    assert set_aside_reason(by_modality["SEG"], keep_segmentations=True) is None
    images, aside = split_set_aside(datasets)
    assert images == [] and len(aside) == 3


def test_group_by_series_records_objects_without_series_uid(philips_cl) -> None:
    aside: list = []
    groups = group_by_series(philips_cl, set_aside=aside)
    assert [a.file_name for a in aside] == ["DICOMDIR"]
    assert sum(len(g) for g in groups.values()) == len(philips_cl) - 1


# ----------------------------------------------------------------------------- phantom encodings
def test_phantom_dwi_with_presentation_state_and_vendor_private_object(tmp_path: Path) -> None:
    """The phantom's opt-in CD-export companions (GSPS, Philips private object in the DWI series)
    are set aside by classification and by ``spine-node maps``; the DWI series is unchanged."""
    from node.cli import main
    from processing.phantom import generate_patient, mr

    ph = generate_patient(seed=7, size="small", followups=0)
    study = ph.studies[0]
    dwi = next(s for s in study.series if s.role == "dwi")
    images = [ds for _, ds in mr.series_datasets(ph, study, dwi)]
    extras = list(mr.non_image_objects(ph, study, dwi))
    assert str(extras[1][1].SeriesInstanceUID) == dwi.series_uid
    volumes: dict = {}
    inventory = classify_study(images + [ds for _, ds in extras], volumes=volumes)
    assert sorted(e.reason.split(" (")[0] for e in inventory.set_aside) == [
        "Philips private non-image object",
        "Presentation State",
    ]
    assert volumes[dwi.series_uid].n_volumes == len(dwi.volumes)
    folder = tmp_path / "export"
    for relpath, ds in [*mr.series_datasets(ph, study, dwi), *extras]:
        path = folder / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
    out = tmp_path / "out"
    assert main(["maps", str(folder), "--out", str(out)]) == 0
    report = json.loads((out / "maps.json").read_text())
    assert sorted(e["file"] for e in report["set_aside"]) == ["PS_0001.dcm", "XX_0001.dcm"]
    assert "ADC" in report["maps"]
