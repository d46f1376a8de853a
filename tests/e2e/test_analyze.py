"""``spine-node analyze`` on phantom patients: the whole chain, offline, against ground truth."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

pytestmark = pytest.mark.slow

SCENARIO_CALLS = {
    "responder": "local control",
    "progression": "local progression",
}


def _analyze(paths: list[Path], out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", "analyze", *map(str, paths), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.fixture(scope="module")
def responder_run(make_phantom, tmp_path_factory):
    patient = make_phantom("responder", "standard", "small")
    out = tmp_path_factory.mktemp("analyze-responder")
    run = _analyze([patient], out)
    assert run.returncode == 0, run.stderr[-3000:]
    return patient, out, run


def test_outputs_and_summary(responder_run):
    patient, out, run = responder_run
    truth = json.loads((patient / "ground_truth.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    headers = [dcmread(out / name, stop_before_pixels=True) for name in summary["files"]]
    modalities = [ds.Modality for ds in headers]
    assert modalities.count("SEG") == 2  # the lesion on baseline and follow-up
    assert modalities.count("SR") == 1
    assert modalities.count("REG") == 1
    pmaps = [ds for ds in headers if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"]
    assert len(pmaps) >= 20  # ADC, IVIM, DKI, T1, Ktrans, ve, vp, kep, IAUC60, TTP per study
    course = summary["course"]
    assert course["fractions"] == truth["course"]["fractions"]
    assert course["prescription_dose_gy"] == pytest.approx(truth["course"]["total_dose_gy"])
    baseline, follow_up = summary["time_points"]
    assert baseline["role"] == "baseline" and follow_up["role"] == "follow-up"
    # the phantom writes no treatment record: the date is the approved plan's review date, flagged
    # as estimated (docs/science.md §4.3), at most a day before the true first fraction
    assert course["treatment_date_estimated"] is True
    true_days = truth["studies"]["followup1"]["days_since_treatment"]
    assert 0 <= follow_up["days_since_treatment"] - true_days <= 1
    assert follow_up["response"]["category"] == SCENARIO_CALLS["responder"]
    # baseline GTV from the RT Structure Set: within 3 % of the voxelised truth
    true_baseline = truth["studies"]["baseline"]["tumour"]["volume_ml_voxels_t2w"]
    assert baseline["measurements"]["volume"] == pytest.approx(true_baseline, rel=0.03)
    # tumour map means on the lesion found by the chain (not the true mask)
    for tp, key in ((baseline, "baseline"), (follow_up, "followup1")):
        tumour = truth["studies"][key]["tumour"]
        adc_truth = tumour["adc_by_bvalues"]["b50-1000"]["adc_mm2_s"]
        assert tp["measurements"]["ADC.mean"] == pytest.approx(adc_truth, rel=0.05)
        dce = tumour["means_by_series"]["dce"]
        assert tp["measurements"]["Ktrans.mean"] == pytest.approx(dce["Ktrans"], rel=0.10)
        assert tp["measurements"]["ve.mean"] == pytest.approx(dce["ve"], abs=0.05)
        assert tp["measurements"]["vp.mean"] == pytest.approx(dce["vp"], abs=0.02)
        # radiomics of the lesion on every map the issue names, failed-fit voxels or not; the
        # first-order mean of a map equals its ROI mean up to the resampling to 1 mm
        for quantity in ("ADC", "MK", "Ktrans", "ve", "vp", "IAUC60", "T2w", "T1w"):
            names = [k for k in tp["measurements"] if k.startswith(f"radiomics.{quantity}.")]
            assert len(names) > 90, (quantity, len(names))
            assert any(".glcm_" in k or "_glcm_" in k for k in names), quantity
        assert tp["measurements"]["radiomics.ADC.original_firstorder_Mean"] == pytest.approx(
            tp["measurements"]["ADC.mean"], rel=0.08
        )  # 1 mm B-spline resampling, edges
    assert "local control" in run.stdout


def test_rerun_gives_identical_uids(responder_run, tmp_path):
    patient, out, _ = responder_run
    again = _analyze([patient], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    first = json.loads((out / "summary.json").read_text())["outputs"]
    second = json.loads((tmp_path / "summary.json").read_text())["outputs"]
    assert [o["sop_instance_uid"] for o in first] == [o["sop_instance_uid"] for o in second]
    assert [o["series_instance_uid"] for o in first] == [o["series_instance_uid"] for o in second]


def test_nothing_to_analyse_is_a_clear_error(make_phantom, tmp_path):
    patient = make_phantom("responder", "standard", "small")
    run = _analyze([patient / "followup1"], tmp_path)  # no course, no baseline
    assert run.returncode == 2
    assert "no CyberKnife treatment course" in run.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    run = _analyze([empty], tmp_path / "out2")
    assert run.returncode == 2
    assert "no DICOM instance" in run.stderr


@pytest.fixture(scope="module")
def scenario_run(make_phantom, tmp_path_factory):
    """``analyze`` of one scenario's small phantom, once per module; the stable patient has the
    sagittal T2w too (spine protocols), so the registration test shares its run."""
    runs: dict[str, tuple[Path, Path]] = {}

    def run(scenario: str) -> tuple[Path, Path]:
        if scenario not in runs:
            patient = make_phantom(scenario, "standard", "small", sagittal=scenario == "stable")
            out = tmp_path_factory.mktemp(f"analyze-{scenario}")
            done = _analyze([patient], out)
            assert done.returncode == 0, done.stderr[-3000:]
            runs[scenario] = (patient, out)
        return runs[scenario]

    return run


@pytest.mark.parametrize("scenario", ["progression", "pseudoprogression", "stable"])
def test_every_scenario_gets_its_call(scenario_run, scenario):
    patient, out = scenario_run(scenario)
    truth = json.loads((patient / "ground_truth.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    follow_up = summary["time_points"][-1]
    expected = truth["studies"]["followup1"]["expected_response"]
    assert follow_up["response"]["category"] == expected
    true_volume = truth["studies"]["followup1"]["tumour"]["volume_ml_voxels_t2w"]
    assert follow_up["measurements"]["volume"] == pytest.approx(true_volume, rel=0.10)
    if scenario == "pseudoprogression":
        fired = {c["code"] for c in follow_up["response"]["criteria"] if c["fired"]}
        assert any("perfusion" in code or "vp" in code for code in fired), fired


def test_registration_recovers_the_known_displacement(scenario_run):
    """Issue 5, acceptance 3: within 1 mm and 1 degree (axial + sagittal T2w, as spine protocols)."""
    patient, out = scenario_run("stable")
    truth = json.loads((patient / "ground_truth.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    registration = summary["studies"][1]["registration"]
    assert registration["passed"], registration["reasons"]
    found = np.array(registration["matrix_followup_to_baseline"])
    true = np.array(truth["studies"]["followup1"]["rigid_transform"]["followup_to_baseline"])
    centre = np.append(truth["vertebra_centre_mm"], 1.0)
    error_mm = np.linalg.norm((found - true) @ centre)
    residual = found[:3, :3] @ true[:3, :3].T
    angle_deg = np.degrees(np.arccos(np.clip((np.trace(residual) - 1) / 2, -1, 1)))
    assert error_mm < 1.0
    assert angle_deg < 1.0


def _reader_seg(series_folder: Path, mask: np.ndarray) -> Dataset:
    """A radiologist's SEG drawn on the baseline T2w (another manufacturer than the node)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = sorted(
        (dcmread(p) for p in series_folder.glob("*.dcm")),
        key=lambda ds: float(ds.ImagePositionPatient[2]),
    )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="corrected GTV",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=50,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="Reader Workstation",
        manufacturer_model_name="viewer",
        software_versions="1",
        device_serial_number="1",
    )


def test_reader_seg_of_the_baseline_is_preferred_and_changes_the_deltas(
    make_phantom, tmp_path, responder_run
):
    """A corrected baseline (a radiologist's SEG) replaces the RTSTRUCT GTV; later deltas follow."""
    from scipy import ndimage

    from processing.phantom import true_tumour_mask

    patient, first_out, _ = responder_run
    truth = json.loads((patient / "ground_truth.json").read_text())
    t2w = truth["studies"]["baseline"]["series"]["t2w"]
    # the reader trims the GTV by one voxel in-plane
    mask = true_tumour_mask(truth, "baseline", t2w["geometry"])
    mask = ndimage.binary_erosion(mask, structure=np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]]))
    seg = _reader_seg(patient / "baseline" / t2w["folder"], mask)
    seg_folder = tmp_path / "reader"
    seg_folder.mkdir()
    seg.save_as(seg_folder / "corrected-gtv.dcm")
    run = _analyze([patient, seg_folder], tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    before = json.loads((first_out / "summary.json").read_text())
    voxel_ml = np.prod(t2w["geometry"]["spacing"]) / 1000.0
    baseline = summary["time_points"][0]["measurements"]
    assert baseline["volume"] == pytest.approx(mask.sum() * voxel_ml, rel=1e-6)
    assert any("reader SEG" in note for note in summary["notes"])

    def volume_change(s):
        return next(
            c["relative"]
            for c in s["time_points"][-1]["changes"]
            if c["quantity"] == "volume" and c["reference"] == "baseline"
        )

    assert volume_change(summary) != pytest.approx(volume_change(before), abs=1e-3)


def test_an_unusable_follow_up_is_skipped_not_fatal(make_phantom, tmp_path):
    """A follow-up without any anatomical series cannot carry the lesion: it is reported and
    skipped, and the rest of the patient is still analysed."""
    patient = make_phantom("responder", "standard", "small")
    truth = json.loads((patient / "ground_truth.json").read_text())
    partial = tmp_path / "followup-without-anatomy"
    partial.mkdir()
    for role, series in truth["studies"]["followup1"]["series"].items():
        if role in ("dwi", "dce", "vfa_t1"):
            (partial / series["folder"]).symlink_to(patient / "followup1" / series["folder"])
    run = _analyze([patient / "baseline", patient / "rt", partial], tmp_path / "out")
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [tp["role"] for tp in summary["time_points"]] == ["baseline"]
    follow_up_uid = truth["studies"]["followup1"]["StudyInstanceUID"]
    assert any(follow_up_uid in note and "not analysed" in note for note in summary["notes"])


def test_every_produced_object_passes_dciodvfy(responder_run):
    """Issue 7, acceptance 1, on the chain's real outputs (every object, warnings listed)."""
    from tests.reporting.tools import dciodvfy

    _, out, _ = responder_run
    files = json.loads((out / "summary.json").read_text())["files"]
    assert len(files) >= 30
    for name in files:
        dciodvfy(out / name)
