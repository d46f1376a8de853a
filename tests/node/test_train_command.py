"""``spine-node train``: end to end on a synthetic labelled cohort written by the test."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from node.cli import build_parser
from processing.response_model import SYNTHETIC_STATEMENT, ResponseModel

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    """Run a sub-command in-process without node.cli.main's logging set-up (which would replace
    the root handlers the node tests' conftest installed)."""
    args = build_parser().parse_args(argv)
    return int(args._run(args))


def write_cohort(path: Path, n: int = 48, seed: int = 5, origin: str = "synthetic") -> None:
    """Mixed scenarios: progression (volume up, vp up), pseudoprogression (volume up, vp down),
    responders and stable lesions, with delta features as the node computes them."""
    rng = np.random.default_rng(seed)
    scenarios = ("progression", "pseudoprogression", "responder", "stable")
    centre = {
        "progression": (0.45, 0.25, -0.05),
        "pseudoprogression": (0.20, -0.60, 0.20),
        "responder": (-0.30, -0.60, 0.35),
        "stable": (0.02, -0.05, 0.03),
    }
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "case_id",
                "scenario",
                "data_origin",
                "outcome",
                "delta.volume",
                "delta.vp.mean",
                "delta.ADC.mean",
                "delta.radiomics.ADC.glcm_Contrast",
            ]
        )
        for i in range(n):
            scenario = scenarios[i % 4]
            dv, dvp, dadc = (m + rng.normal(0, 0.12) for m in centre[scenario])
            outcome = "local progression" if scenario == "progression" else "local control"
            writer.writerow(
                [
                    f"P{i:03d}",
                    scenario,
                    origin,
                    outcome,
                    f"{dv:.4f}",
                    f"{dvp:.4f}",
                    f"{dadc:.4f}",
                    f"{rng.normal():.4f}",
                ]
            )


def test_train_writes_model_and_metrics_and_the_model_is_usable(tmp_path, capsys):
    cases = tmp_path / "cohort.csv"
    write_cohort(cases)
    model_path = tmp_path / "models" / "site.joblib"
    rc = main(
        [
            "train",
            "--cases",
            str(cases),
            "--out",
            str(model_path),
            "--bootstrap",
            "300",
            "--model-version",
            "test-1",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "NOT clinically meaningful" in out and "cross-validated AUC" in out
    report = json.loads((tmp_path / "models" / "site.joblib.metrics.json").read_text())
    metrics = report["metrics"]
    assert metrics["n_cases"] == 48 and metrics["n_progression"] == 12
    assert metrics["auc"] > 0.9
    low, high = metrics["auc_ci95"]
    assert low <= metrics["auc"] <= high and low > 0.75
    assert report["clinical_validity"] == SYNTHETIC_STATEMENT
    assert report["metadata"]["source"].startswith("cohort.csv sha256:")
    assert report["feature_names"] == [
        "delta.volume",
        "delta.vp.mean",
        "delta.ADC.mean",
        "delta.radiomics.ADC.glcm_Contrast",
    ]

    model = ResponseModel.load(model_path)
    assert model.metadata["model_version"] == "test-1" and model.synthetic
    progression = {"delta.volume": 0.5, "delta.vp.mean": 0.3, "delta.ADC.mean": -0.05}
    pseudo = {"delta.volume": 0.2, "delta.vp.mean": -0.6, "delta.ADC.mean": 0.2}
    assert model.predict_probability(progression) > 0.7 > 0.3 > model.predict_probability(pseudo)


def test_clinical_origin_and_bad_input(tmp_path, capsys):
    cases = tmp_path / "clinical.csv"
    write_cohort(cases, n=40, origin="clinical")
    assert (
        main(
            [
                "train",
                "--cases",
                str(cases),
                "--out",
                str(tmp_path / "m.joblib"),
                "--bootstrap",
                "100",
                "--report",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["metadata"]["data_origin"] == "clinical"
    assert "NOT clinically meaningful" not in report["display_name"]
    capsys.readouterr()

    bad = tmp_path / "bad.csv"
    bad.write_text("case_id,delta.volume\n1,0.2\n")
    assert main(["train", "--cases", str(bad), "--out", str(tmp_path / "x.joblib")]) == 2
    assert "no 'outcome' column" in capsys.readouterr().err
    assert not (tmp_path / "x.joblib").exists()
    missing = main(
        ["train", "--cases", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "y.joblib")]
    )
    assert missing == 2


def test_train_as_a_process(tmp_path):
    cases = tmp_path / "cohort.csv"
    write_cohort(cases, n=40, seed=9)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.cli",
            "train",
            "--cases",
            str(cases),
            "--out",
            str(tmp_path / "model.joblib"),
            "--bootstrap",
            "200",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "NOT clinically meaningful" in out.stdout
    assert (tmp_path / "model.joblib").stat().st_size > 0
