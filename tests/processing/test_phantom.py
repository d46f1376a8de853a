"""The synthetic CyberKnife patient: determinism, geometry, signal models, truth, DICOM validity."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from processing.phantom import generate_patient, true_tumour_mask
from processing.phantom.signals import parker_aif_blood
from tests.phantom_fixtures import PHANTOM_SEED

DCM2NIIX = Path(sys.executable).with_name("dcm2niix")


def _truth(path: Path) -> dict:
    return json.loads((path / "ground_truth.json").read_text())


def _series_files(path: Path, study: str, series: dict) -> list[Path]:
    return sorted((path / study / series["folder"]).glob("*.dcm"))


def _volume(path: Path, study: str, series: dict, index: int = 0) -> sitk.Image:
    nz = series["geometry"]["size"][2]
    files = _series_files(path, study, series)[index * nz : (index + 1) * nz]
    return sitk.ReadImage([str(f) for f in files])


def _volume_array(path: Path, study: str, series: dict) -> np.ndarray:
    """All volumes of a series as (V, k, j, i) float."""
    files = _series_files(path, study, series)
    nz = series["geometry"]["size"][2]
    arr = np.stack([pydicom.dcmread(f).pixel_array for f in files]).astype(float)
    return arr.reshape(len(files) // nz, nz, *arr.shape[1:])


def _tumour_mask(truth: dict, study: str, geometry: dict) -> np.ndarray:
    return true_tumour_mask(truth, study, geometry)


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_same_seed_gives_identical_files_pixels_and_uids(phantom_small: Path) -> None:
    from processing.phantom.mr import part10_bytes

    again = generate_patient(
        seed=PHANTOM_SEED, scenario="responder", vendor="standard", size="small"
    )
    truth = _truth(phantom_small)
    assert json.loads(json.dumps(again.ground_truth, default=float)) == truth
    # every file on disk is byte-identical to a fresh generation (pixels, UIDs, dates, everything)
    fresh = dict(again.iter_files())
    on_disk = {str(f.relative_to(phantom_small)): f for f in phantom_small.rglob("*.dcm")}
    assert set(fresh) == set(on_disk)
    for relpath, data in fresh.items():
        assert on_disk[relpath].read_bytes() == data, relpath
    # the cached-encoding writer equals pydicom's own writer of the same datasets
    for n, (relpath, ds) in enumerate(again.iter_datasets()):
        if n % 37 == 0 or relpath.startswith("rt/"):
            assert part10_bytes(ds) == fresh[relpath], relpath
    for study in again.studies:
        for series in study.series:
            assert (
                series.series_uid
                == truth["studies"][study.key]["series"][series.role]["SeriesInstanceUID"]
            )
    other = generate_patient(
        seed=PHANTOM_SEED + 1, scenario="responder", vendor="standard", size="small", followups=0
    )
    assert other.studies[0].study_uid != again.studies[0].study_uid
    assert not np.array_equal(other.studies[0].series[0].pixels, again.studies[0].series[0].pixels)


def test_ground_truth_geometry_equals_what_simpleitk_and_pydicom_read(phantom_small: Path) -> None:
    truth = _truth(phantom_small)
    assert set(truth["studies"]) == {"baseline", "followup1"}
    for study, st in truth["studies"].items():
        uids = set()
        for role, series in st["series"].items():
            img = _volume(phantom_small, study, series)
            g = series["geometry"]
            np.testing.assert_allclose(img.GetOrigin(), g["origin"], atol=1e-4)
            np.testing.assert_allclose(img.GetSpacing(), g["spacing"], atol=1e-6)
            np.testing.assert_allclose(img.GetDirection(), g["direction"], atol=1e-9)
            assert list(img.GetSize()) == g["size"]
            files = _series_files(phantom_small, study, series)
            assert len(files) == series["number_of_files"]
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            assert ds.StudyInstanceUID == st["StudyInstanceUID"]
            assert ds.FrameOfReferenceUID == st["FrameOfReferenceUID"]
            assert ds.SeriesInstanceUID == series["SeriesInstanceUID"]
            assert float(ds.RepetitionTime) == series["acquisition"]["RepetitionTime_ms"]
            uids.add(ds.SeriesInstanceUID)
        assert len(uids) == 6
    assert (
        truth["studies"]["baseline"]["FrameOfReferenceUID"]
        != truth["studies"]["followup1"]["FrameOfReferenceUID"]
    )


def test_tumour_truth_volume_and_masks(phantom_small: Path) -> None:
    truth = _truth(phantom_small)
    base = truth["studies"]["baseline"]["tumour"]
    fu = truth["studies"]["followup1"]["tumour"]
    assert 3.0 <= base["volume_ml_continuous"] <= 20.0
    # voxel-centre volume on the 1.56 x 1.56 x 5 mm grid agrees with the continuous truth within 8 %
    assert base["volume_ml_voxels_t2w"] == pytest.approx(base["volume_ml_continuous"], rel=0.08)
    # responder: -30 % volume, ADC(b50-1000) +35 %, Ktrans and vp -60 %
    ch = truth["studies"]["followup1"]["change_from_baseline"]
    assert ch["volume_relative"] == pytest.approx(-0.30, abs=0.01)
    assert ch["adc_b50-1000_relative"] == pytest.approx(0.35, abs=0.01)
    assert ch["Ktrans_relative"] == pytest.approx(-0.60, abs=0.02)
    assert ch["vp_relative"] == pytest.approx(-0.60, abs=0.02)
    assert truth["studies"]["followup1"]["expected_response"] == "local control"
    # the published shape reproduces the voxel counts on every grid, through the rigid transform
    for study in ("baseline", "followup1"):
        for role, series in truth["studies"][study]["series"].items():
            mask = _tumour_mask(truth, study, series["geometry"])
            assert int(mask.sum()) == truth["studies"][study]["tumour"]["voxel_counts"][role]
    assert fu["adc_by_bvalues"]["b0,1000"]["bvalues"] == [0.0, 1000.0]
    # diameters of the continuous shape: consistent with each other and with the volume
    for tum in (base, fu):
        d3 = tum["max_3d_diameter_mm"]
        assert (
            d3 >= tum["max_axial_diameter_mm"] > 10.0
            and d3 >= tum["max_craniocaudal_extent_mm"] > 10.0
        )
        assert tum["volume_ml_continuous"] * 1000.0 < np.pi / 6.0 * d3**3
    assert fu["max_3d_diameter_mm"] < base["max_3d_diameter_mm"]  # responder shrinks


def test_rigid_transform_is_consistent(phantom_small: Path) -> None:
    rigid = _truth(phantom_small)["studies"]["followup1"]["rigid_transform"]
    f2b = np.asarray(rigid["followup_to_baseline"])
    b2f = np.asarray(rigid["baseline_to_followup"])
    np.testing.assert_allclose(f2b @ b2f, np.eye(4), atol=1e-9)
    rot = b2f[:3, :3]
    angle = np.degrees(np.arccos((np.trace(rot) - 1) / 2))
    assert angle == pytest.approx(rigid["rotation_deg"], abs=1e-6)
    assert 2.0 <= rigid["rotation_deg"] <= 4.0 and 3.0 <= rigid["translation_norm_mm"] <= 6.0
    e = rigid["sitk_euler3d_baseline_to_followup"]
    tx = sitk.Euler3DTransform(e["center"], *e["angles_rad_xyz"], e["translation"])
    p = np.array([10.0, -20.0, 30.0])
    np.testing.assert_allclose(
        tx.TransformPoint(p.tolist()), b2f[:3, :3] @ p + b2f[:3, 3], atol=1e-6
    )


def test_dwi_signal_reproduces_truth_adc_and_snr(phantom_small: Path) -> None:
    truth = _truth(phantom_small)
    st = truth["studies"]["baseline"]
    dwi = st["series"]["dwi"]
    arr = _volume_array(phantom_small, "baseline", dwi)
    mask = _tumour_mask(truth, "baseline", dwi["geometry"])
    files = truth["dwi_files"]["baseline"]
    nz = dwi["geometry"]["size"][2]
    bvals = np.array([files[v * nz]["b"] for v in range(arr.shape[0])])
    b0 = arr[bvals == 0][0][mask]
    snr = b0.mean() / dwi["noise_sigma_counts"]
    assert 50 <= snr <= 100
    # noise at the stated level: two directions of the isotropic b = 50 shell differ by noise only
    b50 = arr[bvals == 50][:, mask]
    assert np.std(b50[0] - b50[1]) / np.sqrt(2) == pytest.approx(dwi["noise_sigma_counts"], rel=0.2)
    # log-linear OLS ADC of the tumour-mean direction-averaged signal over b = 50..1000
    subset = st["tumour"]["adc_by_bvalues"]["b50-1000"]
    b = np.asarray(subset["bvalues"])
    sig = np.array([np.exp(np.mean(np.log(arr[bvals == bi][:, mask]), axis=0)).mean() for bi in b])
    adc = -np.polyfit(b, np.log(sig), 1)[0]
    assert adc == pytest.approx(subset["adc_mm2_s"], rel=0.03)
    # kurtosis visible: ADC over b0-1000 differs from D
    assert st["tumour"]["adc_by_bvalues"]["b400-1000"]["adc_mm2_s"] < st["tumour"]["means"]["D"]
    # perfusion-free DKI (b >= 400) recovers the true K and D exactly on noiseless data; with
    # b = 0..100 in the fit, IVIM perfusion biases MK upwards (both truths are published)
    dki = st["tumour"]["dki_tensor_fit_noiseless"]
    assert dki["b400-2000"]["MK"] == pytest.approx(st["tumour"]["means"]["K"], rel=1e-3)
    assert dki["b400-2000"]["MD_mm2_s"] == pytest.approx(st["tumour"]["means"]["D"], rel=1e-3)
    assert dki["all"]["MK"] > st["tumour"]["means"]["K"]


def test_dce_aorta_follows_parker_aif_and_tumour_enhances(phantom_small: Path) -> None:
    truth = _truth(phantom_small)
    st = truth["studies"]["baseline"]
    dce = st["series"]["dce"]
    acq = dce["acquisition"]
    assert acq["number_of_temporal_positions"] >= 40 and acq["temporal_resolution_s"] <= 5.0
    arr = _volume_array(phantom_small, "baseline", dce)
    t = np.asarray(dce["frame_times_s"])
    cb = parker_aif_blood(t, bolus_arrival_s=acq["bolus_arrival_s"])
    np.testing.assert_allclose(dce["aif_whole_blood_mM"], cb)
    # aorta: voxels brighter than anything at the first-pass peak; invert SPGR with blood T1
    peak = int(np.argmax(cb))
    aorta = arr[peak] > np.percentile(arr[peak], 99.5)
    s = arr[:, aorta].mean(axis=1)
    tr = acq["RepetitionTime_ms"] / 1000.0
    a = np.deg2rad(acq["FlipAngle_deg"])
    r10 = 1000.0 / truth["tissue_parameters"]["blood"]["t1"]
    e10 = np.exp(-tr * r10)
    s_pre = s[: int(acq["bolus_arrival_s"] // acq["temporal_resolution_s"])].mean()
    m0 = s_pre * (1 - np.cos(a) * e10) / (np.sin(a) * (1 - e10))
    r1 = -np.log((m0 * np.sin(a) - s) / (m0 * np.sin(a) - s * np.cos(a))) / tr
    conc = (r1 - r10) / acq["r1_per_mM_per_s"]
    assert conc[peak] == pytest.approx(cb[peak], rel=0.1)
    assert conc[-1] == pytest.approx(cb[-1], rel=0.15)
    mask = _tumour_mask(truth, "baseline", dce["geometry"])
    tum = arr[:, mask].mean(axis=1)
    assert tum[-1] > 1.3 * tum[0]
    ds = pydicom.dcmread(_series_files(phantom_small, "baseline", dce)[-1], stop_before_pixels=True)
    assert int(ds.TemporalPositionIdentifier) == acq["number_of_temporal_positions"]
    assert ds.ContrastBolusAgent and float(ds.FlipAngle) == acq["FlipAngle_deg"]


def test_rt_course_as_cyberknife_writes_it(phantom_small: Path) -> None:
    truth = _truth(phantom_small)
    course = truth["course"]
    plan = pydicom.dcmread(phantom_small / "rt" / "rtplan.dcm")
    assert (
        "Accuray" in plan.Manufacturer
        and plan.BeamSequence[0].TreatmentMachineName == course["machine"]
    )
    assert len(plan.BeamSequence) == course["rtplan"]["number_of_beams"] >= 100
    isos = {tuple(b.ControlPointSequence[0].IsocenterPosition) for b in plan.BeamSequence}
    assert len(isos) > 50  # non-isocentric
    assert int(plan.FractionGroupSequence[0].NumberOfFractionsPlanned) == course["fractions"]
    assert float(plan.DoseReferenceSequence[0].TargetPrescriptionDose) == course["total_dose_gy"]
    assert plan.ApprovalStatus == "APPROVED" and plan.ReviewDate == course["review_date"]
    assert (
        plan.RTPlanDate < course["treatment_date"]
        and truth["studies"]["baseline"]["StudyDate"] < plan.RTPlanDate
    )
    ss = pydicom.dcmread(phantom_small / "rt" / "rtstruct.dcm")
    types = {o.ReferencedROINumber: o.RTROIInterpretedType for o in ss.RTROIObservationsSequence}
    names = {r.ROINumber: r.ROIName for r in ss.StructureSetROISequence}
    assert {names[k]: v for k, v in types.items()} == {
        "GTV": "GTV",
        "PTV": "PTV",
        "SpinalCord": "ORGAN",
    }
    ref_series = (
        ss.ReferencedFrameOfReferenceSequence[0]
        .RTReferencedStudySequence[0]
        .RTReferencedSeriesSequence[0]
    )
    assert (
        ref_series.SeriesInstanceUID
        == truth["studies"]["baseline"]["series"]["t2w"]["SeriesInstanceUID"]
    )
    # GTV contour area summed over slices x thickness ≈ tumour volume
    t2 = truth["studies"]["baseline"]["series"]["t2w"]["geometry"]
    vol = 0.0
    for c in ss.ROIContourSequence[0].ContourSequence:
        xy = np.asarray(c.ContourData, dtype=float).reshape(-1, 3)[:, :2]
        vol += (
            0.5
            * abs(np.dot(xy[:, 0], np.roll(xy[:, 1], 1)) - np.dot(xy[:, 1], np.roll(xy[:, 0], 1)))
            * t2["spacing"][2]
        )
    assert vol / 1000 == pytest.approx(
        truth["studies"]["baseline"]["tumour"]["volume_ml_continuous"], rel=0.12
    )
    dose = pydicom.dcmread(phantom_small / "rt" / "rtdose.dcm")
    assert dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    dmax = dose.pixel_array.max() * float(dose.DoseGridScaling)
    assert course["total_dose_gy"] < dmax <= course["rtdose"]["max_dose_gy_analytic"] + 1e-6


def test_standard_objects_pass_dciodvfy(phantom_small: Path) -> None:
    truth = _truth(phantom_small)
    files = [phantom_small / "rt" / n for n in ("rtplan.dcm", "rtstruct.dcm", "rtdose.dcm")]
    for study in truth["studies"]:
        for series in truth["studies"][study]["series"].values():
            f = _series_files(phantom_small, study, series)
            files += [f[0], f[len(f) // 2]] if study == "baseline" else [f[-1]]
    errors = {str(f.relative_to(phantom_small)): e for f in files if (e := _dciodvfy_errors(f))}
    assert errors == {}


@pytest.mark.skipif(
    not DCM2NIIX.exists() and shutil.which("dcm2niix") is None, reason="dcm2niix not installed"
)
def test_dcm2niix_reads_standard_dwi_bvalues_and_vectors(
    phantom_small: Path, tmp_path: Path
) -> None:
    _check_dcm2niix(phantom_small, tmp_path)


def _check_dcm2niix(path: Path, tmp_path: Path) -> None:
    truth = _truth(path)
    dwi = truth["studies"]["baseline"]["series"]["dwi"]
    exe = str(DCM2NIIX) if DCM2NIIX.exists() else "dcm2niix"
    subprocess.run(
        [exe, "-o", str(tmp_path), "-f", "dwi", str(path / "baseline" / dwi["folder"])],
        check=True,
        capture_output=True,
        timeout=300,
    )
    bval = np.loadtxt(tmp_path / "dwi.bval")
    bvec = np.loadtxt(tmp_path / "dwi.bvec")
    files = truth["dwi_files"]["baseline"]
    if "frames" in files[0]:
        frames = files[0]["frames"]
        nz = dwi["geometry"]["size"][2]
        per_volume = [frames[v * nz] for v in range(len(frames) // nz)]
    else:
        nz = dwi["geometry"]["size"][2]
        per_volume = [files[v * nz] for v in range(len(files) // nz)]
    np.testing.assert_allclose(bval, [f["b"] for f in per_volume], atol=0.5)
    rot = np.asarray(dwi["geometry"]["direction"]).reshape(3, 3)
    expected = np.array([rot.T @ np.asarray(f["gradient_lps"]) for f in per_volume]).T * np.array(
        [[1], [-1], [1]]
    )
    np.testing.assert_allclose(bvec, expected + 0.0, atol=1e-3)


def test_cli_writes_the_documented_layout(tmp_path: Path) -> None:
    from node.cli import build_parser

    out = tmp_path / "p"
    args = build_parser().parse_args(
        [
            "phantom",
            "--out",
            str(out),
            "--size",
            "small",
            "--seed",
            "3",
            "--scenario",
            "stable",
            "--followups",
            "0",
        ]
    )
    assert args._run(args) == 0
    truth = _truth(out)
    assert sorted(p.name for p in out.iterdir()) == ["baseline", "ground_truth.json", "rt"]
    assert sorted(p.name for p in (out / "rt").iterdir()) == [
        "rtdose.dcm",
        "rtplan.dcm",
        "rtstruct.dcm",
    ]
    series = truth["studies"]["baseline"]["series"]
    assert sorted(p.name for p in (out / "baseline").iterdir()) == sorted(
        s["folder"] for s in series.values()
    )
    for s in series.values():
        assert len(list((out / "baseline" / s["folder"]).glob("*.dcm"))) == s["number_of_files"]
    assert truth["patient"]["PatientName"] == "PHANTOM^3"


def test_cli_refuses_a_non_empty_output_folder(tmp_path: Path) -> None:
    from node.cli import build_parser

    (tmp_path / "x").write_text("occupied")
    args = build_parser().parse_args(["phantom", "--out", str(tmp_path), "--size", "small"])
    assert args._run(args) == 2


def test_cli_choices_match_the_generator() -> None:
    from node.commands import phantom as command
    from processing import phantom

    assert (command.SCENARIOS, command.VENDORS, command.SIZES) == (
        phantom.SCENARIOS,
        phantom.VENDORS,
        phantom.SIZES,
    )


# --- vendor variants --------------------------------------------------------------------------


def _private_diffusion(ds: pydicom.Dataset, vendor: str) -> tuple[float, np.ndarray]:
    """b-value and LPS gradient from a vendor's private tags, found by private creator."""
    if vendor == "siemens":
        blk = ds.private_block(0x0019, "SIEMENS MR HEADER")
        b = float(blk[0x0C].value)
        g = np.asarray(blk[0x0E].value, dtype=float) if b > 0 else np.zeros(3)
        # the CSA Image Header Info carries the same encoding (read with nibabel's CSA reader)
        with warnings.catch_warnings():  # nibabel warns that its DICOM readers are experimental
            warnings.simplefilter("ignore", UserWarning)
            from nibabel.nicom import csareader

        tags = csareader.read(ds.private_block(0x0029, "SIEMENS CSA HEADER")[0x10].value)["tags"]
        assert tags["B_value"]["items"] == [b]
        if b > 0:
            np.testing.assert_allclose(tags["DiffusionGradientDirection"]["items"], g, atol=1e-8)
        return b, g
    if vendor == "ge":
        b = float(int(ds.private_block(0x0043, "GEMS_PARM_01")[0x39].value[0]) % 1_000_000_000)
        acq = ds.private_block(0x0019, "GEMS_ACQU_01")
        logical = np.array([float(acq[e].value) for e in (0xBB, 0xBC, 0xBD)])
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        rot = np.stack([iop[:3], iop[3:], np.cross(iop[:3], iop[3:])], axis=1)
        return b, rot @ (logical * np.array([-1.0, -1.0, 1.0]))
    if vendor == "philips":
        b = float(ds.private_block(0x2001, "Philips Imaging DD 001")[0x03].value)
        mr = ds.private_block(0x2005, "Philips MR Imaging DD 001")
        return b, np.array([float(mr[e].value) for e in (0xB0, 0xB1, 0xB2)])
    raise ValueError(vendor)


@pytest.mark.slow
@pytest.mark.parametrize("vendor", ["siemens", "ge", "philips"])
def test_classic_vendor_private_diffusion_tags_dcm2niix_and_dciodvfy(
    make_phantom, vendor: str, tmp_path: Path
) -> None:
    from processing.phantom.mr import VENDOR_DEVIATIONS

    path = make_phantom("responder", vendor, "small")
    truth = _truth(path)
    # every DWI file: private b-value and gradient (by private creator) equal the truth
    for entry in truth["dwi_files"]["baseline"]:
        ds = pydicom.dcmread(path / entry["file"], stop_before_pixels=True)
        assert "DiffusionBValue" not in ds
        b, g = _private_diffusion(ds, vendor)
        assert b == entry["b"]
        np.testing.assert_allclose(g, entry["gradient_lps"], atol=1e-5)
    _check_dcm2niix(path, tmp_path)
    # dciodvfy: only the documented deviations, and those really occur where documented
    errors: set[str] = set()
    st = truth["studies"]["baseline"]
    for series in st["series"].values():
        files = _series_files(path, "baseline", series)
        for f in (files[0], files[-1]):
            errors.update(_dciodvfy_errors(f))
    undocumented = {e for e in errors if not any(d in e for d in VENDOR_DEVIATIONS[vendor])}
    assert undocumented == set()
    assert all(any(d in e for e in errors) for d in VENDOR_DEVIATIONS[vendor])
    # DCE timing as the vendor writes it
    dce = pydicom.dcmread(
        _series_files(path, "baseline", st["series"]["dce"])[-1], stop_before_pixels=True
    )
    last_s = st["series"]["dce"]["frame_times_s"][-1]
    if vendor in ("ge", "philips"):
        assert float(dce.TriggerTime) == pytest.approx(last_s * 1000.0)
    if vendor == "siemens":
        assert "TemporalPositionIdentifier" not in dce
        assert float(dce.private_block(0x0019, "SIEMENS MR HEADER")[0x16].value) == pytest.approx(
            last_s
        )
    if vendor == "philips":
        assert float(
            dce.private_block(0x2005, "Philips MR Imaging DD 001")[0xA0].value
        ) == pytest.approx(last_s)
    # geometry through SimpleITK, as for the standard variant
    for series in st["series"].values():
        img = _volume(path, "baseline", series)
        np.testing.assert_allclose(img.GetOrigin(), series["geometry"]["origin"], atol=1e-4)


@pytest.mark.slow
def test_enhanced_variant_one_multiframe_object_per_series(make_phantom, tmp_path: Path) -> None:
    path = make_phantom("responder", "enhanced", "small")
    truth = _truth(path)
    for study, st in truth["studies"].items():
        for role, series in st["series"].items():
            files = _series_files(path, study, series)
            assert len(files) == 1
            ds = pydicom.dcmread(files[0])
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1"
            g = series["geometry"]
            assert int(ds.NumberOfFrames) == series["number_of_files"]
            frames = ds.PerFrameFunctionalGroupsSequence
            nz = g["size"][2]
            rot = np.asarray(g["direction"]).reshape(3, 3)
            for n in (0, nz - 1, len(frames) - 1):
                fg = frames[n]
                expected = np.asarray(g["origin"]) + (n % nz) * g["spacing"][2] * rot[:, 2]
                np.testing.assert_allclose(
                    np.asarray(fg.PlanePositionSequence[0].ImagePositionPatient, float),
                    expected,
                    atol=1e-4,
                )
                np.testing.assert_allclose(
                    np.asarray(fg.PixelMeasuresSequence[0].PixelSpacing, float), g["spacing"][1::-1]
                )
            if role == "dwi" and study == "baseline":
                table = truth["dwi_files"]["baseline"][0]["frames"]
                for fg, t in zip(frames, table, strict=True):
                    diff = fg.MRDiffusionSequence[0]
                    assert diff.DiffusionBValue == t["b"]
                    if t["b"] > 0:
                        np.testing.assert_allclose(
                            diff.DiffusionGradientDirectionSequence[0].DiffusionGradientOrientation,
                            t["gradient_lps"],
                            atol=1e-9,
                        )
            if role == "dce":
                tpi = [fg.FrameContentSequence[0].TemporalPositionIndex for fg in frames[::nz]]
                assert tpi == list(range(1, len(series["frame_times_s"]) + 1))
            if study == "baseline":
                assert _dciodvfy_errors(files[0]) == []
            if role == "t2w":
                img = sitk.ReadImage(str(files[0]))
                np.testing.assert_allclose(img.GetOrigin(), g["origin"], atol=1e-4)
                np.testing.assert_allclose(img.GetSpacing(), g["spacing"], atol=1e-6)
                assert list(img.GetSize()) == g["size"]
    _check_dcm2niix(path, tmp_path)


# --- scenarios and follow-ups -----------------------------------------------------------------


@pytest.mark.parametrize(
    "scenario,followups", [("progression", 1), ("pseudoprogression", 2), ("stable", 1)]
)
def test_scenarios_change_the_tumour_as_specified(scenario: str, followups: int) -> None:
    ph = generate_patient(
        seed=11, scenario=scenario, vendor="standard", size="small", followups=followups
    )
    gt = json.loads(json.dumps(ph.ground_truth, default=float))
    fu1 = gt["studies"]["followup1"]
    ch = fu1["change_from_baseline"]
    treat = gt["course"]["treatment_date"]
    assert gt["studies"]["baseline"]["StudyDate"] < treat < fu1["StudyDate"]
    assert fu1["StudyDate"] != gt["studies"]["baseline"]["StudyDate"]
    if scenario == "progression":
        assert ch["volume_relative"] == pytest.approx(0.40, abs=0.02)
        assert fu1["tumour"]["epidural_volume_ml"] > 0.5
        assert ch["adc_b50-1000_relative"] == pytest.approx(-0.05, abs=0.01)
        assert ch["Ktrans_relative"] == pytest.approx(0.30, abs=0.02)
        assert fu1["expected_response"] == "local progression"
        assert gt["studies"]["baseline"]["tumour"]["epidural_volume_ml"] == 0.0
    elif scenario == "pseudoprogression":
        assert fu1["days_since_treatment"] == 84
        assert ch["volume_relative"] == pytest.approx(0.30, abs=0.01)
        assert ch["vp_relative"] == pytest.approx(-0.60, abs=0.02)
        assert ch["adc_b50-1000_relative"] == pytest.approx(0.20, abs=0.01)
        assert fu1["expected_response"] == "indeterminate - possible pseudoprogression"
        fu2 = gt["studies"]["followup2"]
        assert fu2["days_since_treatment"] == 182 and fu2["expected_response"] == "local control"
        assert fu2["FrameOfReferenceUID"] not in (
            fu1["FrameOfReferenceUID"],
            gt["studies"]["baseline"]["FrameOfReferenceUID"],
        )
    else:
        assert abs(ch["volume_relative"]) < 0.05 and fu1["expected_response"] == "local control"
    for key in gt["studies"]:
        assert 3.0 <= gt["studies"][key]["tumour"]["volume_ml_continuous"] <= 20.0


def test_optional_sagittal_t2w_geometry(tmp_path: Path) -> None:
    ph = generate_patient(
        seed=5, scenario="stable", vendor="standard", size="small", followups=0, sagittal=True
    )
    sag = ph.ground_truth["studies"]["baseline"]["series"]["t2w_sag"]
    assert sag["role"] == "t2w"
    for relpath, ds in ph.iter_datasets():
        if relpath.startswith(f"baseline/{sag['folder']}/"):
            (tmp_path / relpath).parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(tmp_path / relpath, enforce_file_format=True)
    files = sorted((tmp_path / "baseline" / sag["folder"]).glob("*.dcm"))
    assert [float(v) for v in pydicom.dcmread(files[0]).ImageOrientationPatient] == [
        0,
        1,
        0,
        0,
        0,
        -1,
    ]
    img = sitk.ReadImage([str(f) for f in files])
    g = sag["geometry"]
    np.testing.assert_allclose(img.GetOrigin(), g["origin"], atol=1e-4)
    np.testing.assert_allclose(img.GetSpacing(), g["spacing"], atol=1e-6)
    np.testing.assert_allclose(img.GetDirection(), g["direction"], atol=1e-9)
    assert list(img.GetSize()) == g["size"]
    # the tumour is inside the sagittal slab and its mask on this grid matches the truth count
    mask = _tumour_mask(ph.ground_truth, "baseline", g)
    assert (
        int(mask.sum())
        == ph.ground_truth["studies"]["baseline"]["tumour"]["voxel_counts"]["t2w_sag"]
        > 0
    )
    assert _dciodvfy_errors(files[len(files) // 2]) == []


def test_the_main_tumour_part_stays_out_of_the_canal_and_the_truth_says_so() -> None:
    """A large lesion reaching past the posterior wall: its main (intraosseous) part is not drawn
    in the spinal canal, only an epidural component is, and the true volume is the drawn one."""
    from processing.phantom.anatomy import (
        LABEL,
        Anatomy,
        TumourShape,
        continuous_volume_ml,
        epidural_volume_ml,
    )

    centre = np.array([10.0, -20.0, 30.0])
    main = TumourShape(
        tuple(centre + [0.0, 12.0, 0.0]), tuple(np.eye(3).ravel()), (12.0, 12.0, 9.0), ()
    )
    step = 0.5
    axes = [np.arange(c - 30.0 + step / 2, c + 30.0, step) for c in centre]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    for shape in (main, main.with_epidural(tuple(centre + [0.0, 19.5, 0.0]), (8.0, 3.5, 11.0))):
        anatomy = Anatomy(tuple(centre), shape, {}, 0, ("L1", "L2", "L3", "L4", "L5"))
        tumour = anatomy.labels(pts) == LABEL["tumour"]
        in_canal = anatomy.in_canal(pts)
        assert (tumour == anatomy.tumour_contains(pts)).all()  # what the GTV contour follows
        drawn_ml = tumour.sum() * step**3 / 1000.0
        # the shape reaches 6 mm into the canal; the labels keep its main part out
        assert (shape.contains_main(pts) & in_canal).sum() * step**3 / 1000.0 > 0.3
        assert not (tumour & in_canal & ~shape.contains_epidural(pts)).any()
        assert (tumour & in_canal).any() == (shape.epidural_centre is not None)
        assert anatomy.tumour_volume_ml() == pytest.approx(drawn_ml, rel=0.01)
        held_out = continuous_volume_ml(shape) - anatomy.tumour_volume_ml()
        if shape.epidural_centre is None:
            assert held_out > 0.3
        else:  # the epidural component fills part of what the main part reached
            assert 0 < held_out < 0.3 and epidural_volume_ml(shape) > 0.2
