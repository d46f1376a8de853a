"""``spine-node analyze`` on the responder phantom: the whole chain, offline, against ground truth.

The responder's analysis (default settings, as a user runs it) is shared by the suite
(:func:`tests.phantom_fixtures.analyzed_phantom`); the other scenarios' calls are in
``test_analyze_scenarios.py``; the analyses compared with this one (a rerun, a reader's SEG) and
an unusable follow-up are in ``test_analyze_reruns.py``.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from pydicom import dcmread

from tests.phantom_fixtures import run_analyze

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def responder_run(analyzed_phantom):
    patient, out = analyzed_phantom("responder", "standard", "small")
    return patient, out, (out / "stdout.txt").read_text(encoding="utf-8")


def test_outputs_and_summary(responder_run):
    patient, out, stdout = responder_run
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
    assert follow_up["response"]["category"] == "local control"
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
    assert "local control" in stdout
    # rule set 2.0 with each criterion's source: in the summary, the printed text and the SR
    response = follow_up["response"]
    assert response["rule_set"] == "spine-sbrt-response 2.0"
    assert response["leaning"] == "treatment effect"  # the responder's vp and Ktrans fall
    assert all(c["source"] for c in response["criteria"])
    assert "(spine-sbrt-response 2.0)" in stdout
    # the follow-up lesion, refined on its images, with its volume range
    assert re.search(
        r"lesion refined on follow-up images: [0-9.]+ mL \(.*; [0-9.]+-[0-9.]+ mL at lesion "
        r"probability 0\.75/0\.25\)",
        stdout,
    ), stdout
    assert "[Kumar 2017 (Technol Cancer Res Treat): vp cut-off -20 %]" in stdout
    adc = next(
        c
        for c in follow_up["changes"]
        if c["quantity"] == "ADC.median" and c["reference"] == "baseline"
    )
    assert adc["repeatability_test_retest"] == 0.129
    assert 0 < adc["repeatability_segmentation"] < 0.1  # the baseline ROI perturbations
    assert adc["repeatability"] == pytest.approx(np.hypot(0.129, adc["repeatability_segmentation"]))
    sr = next(ds for ds in (dcmread(out / n) for n in summary["files"]) if ds.Modality == "SR")
    texts, meanings = set(), set()

    def walk(items):
        for item in items:
            texts.add(str(item.get("TextValue", "")))
            for code in item.get("ConceptCodeSequence", []):
                meanings.add(str(code.CodeMeaning))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    assert "spine-sbrt-response 2.0" in meanings  # the groups' measurement method
    assert "response rule set=spine-sbrt-response 2.0" in texts
    assert "source of perfusion-fall=Kumar 2017 (Technol Cancer Res Treat): vp cut-off -20 %" in (
        texts
    )


def test_nothing_to_analyse_is_a_clear_error(make_phantom, tmp_path):
    patient = make_phantom("responder", "standard", "small")
    run = run_analyze([patient / "followup1"], tmp_path)  # no course, no baseline
    assert run.returncode == 2
    assert "no CyberKnife treatment course" in run.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    run = run_analyze([empty], tmp_path / "out2")
    assert run.returncode == 2
    assert "no DICOM instance" in run.stderr


def test_every_produced_object_passes_dciodvfy(responder_run):
    """Issue 7, acceptance 1, on the chain's real outputs (every object, warnings listed)."""
    from tests.reporting.tools import dciodvfy

    _, out, _ = responder_run
    files = json.loads((out / "summary.json").read_text())["files"]
    assert len(files) >= 30
    for name in files:
        dciodvfy(out / name)
