"""processing.response_model: calibrated pipeline, honest CV AUC, versioned save/load,
explanation."""

from __future__ import annotations

import numpy as np
import pytest

from processing.change import compute_changes
from processing.response import assess_response
from processing.response_model import (
    SYNTHETIC_STATEMENT,
    ResponseModel,
    TrainingCases,
    attach_model_prediction,
    case_row,
    cases_from_rows,
    cross_validated_auc,
    delta_features,
    fit_response_model,
)
from processing.results import LesionMeasurements, MapStatistics


def synthetic_cohort(n: int = 60, seed: int = 0, n_noise: int = 6) -> list[dict[str, str]]:
    """Delta features of a synthetic cohort; progression is driven by volume and vp change."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        progression = i % 3 == 0
        row = {
            "case_id": f"C{i:03d}",
            "outcome": "local progression" if progression else "local control",
            "data_origin": "synthetic",
            "delta.volume": f"{rng.normal(0.35 if progression else 0.0, 0.15):.4f}",
            "delta.vp.mean": f"{rng.normal(0.25 if progression else -0.5, 0.25):.4f}",
            "delta.ADC.mean": f"{rng.normal(0.0 if progression else 0.2, 0.2):.4f}",
        }
        for j in range(n_noise):
            row[f"delta.radiomics.ADC.noise{j}"] = f"{rng.normal():.4f}"
        rows.append(row)
    rows[5]["delta.ADC.mean"] = ""  # a missing value is imputed
    return rows


def test_cases_parsing_and_errors():
    cases = cases_from_rows(synthetic_cohort(40))
    assert cases.features.shape == (40, 9)
    assert cases.feature_names[0] == "delta.volume"
    assert int(cases.outcomes.sum()) == 14
    assert np.isnan(cases.features[5, 2])
    with pytest.raises(ValueError, match="no 'outcome' column"):
        cases_from_rows([{"case_id": "1", "delta.volume": "0.1"}])
    with pytest.raises(ValueError, match="unknown outcome"):
        cases_from_rows([{"outcome": "maybe", "delta.volume": "0.1"}])
    with pytest.raises(ValueError, match="not a number"):
        cases_from_rows(
            [{"outcome": "1", "delta.volume": "big"}] * 2
            + [{"outcome": "0", "delta.volume": "0"}] * 2
        )


def test_fit_reports_cross_validated_auc_with_ci_and_explains():
    cases = cases_from_rows(synthetic_cohort(60))
    model = fit_response_model(cases, k_features=4, n_bootstrap=500)
    m = model.metrics
    assert m["n_cases"] == 60 and m["n_progression"] == 20 and m["folds"] == 5
    assert 0.85 <= m["auc"] <= 1.0
    low, high = m["auc_ci95"]
    assert low < m["auc"] <= high and low > 0.7
    assert model.synthetic and SYNTHETIC_STATEMENT in model.display_name
    assert model.metadata["clinical_validity"] == SYNTHETIC_STATEMENT

    growing = {"delta.volume": 0.5, "delta.vp.mean": 0.4, "delta.ADC.mean": -0.05}
    shrinking = {"delta.volume": -0.3, "delta.vp.mean": -0.6, "delta.ADC.mean": 0.3}
    p_grow, p_shrink = model.predict_probability(growing), model.predict_probability(shrinking)
    assert p_grow > 0.8 and p_shrink < 0.2
    top = model.top_features(growing, n=2)
    assert {name for name, _ in top} <= {"delta.volume", "delta.vp.mean", "delta.ADC.mean"}
    assert all(value > 0 for _, value in top)  # pushing towards progression


def test_feature_selection_inside_cv_keeps_random_labels_near_chance():
    # 40 cases, 300 noise features, random outcomes: selecting on all cases before CV would
    # report a high AUC; selection inside every fold must not
    rng = np.random.default_rng(11)
    x = rng.normal(size=(40, 300))
    y = np.array([1] * 16 + [0] * 24)
    cases = TrainingCases(
        tuple(f"delta.f{i}" for i in range(300)), x, y, tuple(str(i) for i in range(40))
    )
    model = fit_response_model(cases, k_features=5, n_bootstrap=300)
    low, high = model.metrics["auc_ci95"]
    assert low < 0.5 < high
    assert model.metrics["auc"] < 0.75


def test_follow_ups_of_one_patient_stay_in_one_fold():
    # 30 patients with random outcomes and noise features, each seen at two follow-ups with
    # nearly the same features: splitting folds by case lets a patient's twin row in the
    # training fold predict it (optimistic AUC); splitting by patient keeps chance at chance
    rng = np.random.default_rng(4)
    n = 30
    base = rng.normal(size=(n, 50))
    x = np.repeat(base, 2, axis=0) + rng.normal(scale=0.01, size=(2 * n, 50))
    y = np.repeat(np.array([1] * 12 + [0] * 18), 2)
    ids = tuple(str(i) for i in range(2 * n))
    patients = tuple(f"P{i // 2:03d}" for i in range(2 * n))
    names = tuple(f"delta.f{i}" for i in range(50))
    by_case = cross_validated_auc(TrainingCases(names, x, y, ids), k_features=50, n_bootstrap=200)
    by_patient = cross_validated_auc(
        TrainingCases(names, x, y, ids, patients), k_features=50, n_bootstrap=200
    )
    assert by_patient["fold_split"] == "by patient"
    assert "over patients" in by_patient["ci_method"]
    assert by_case["auc"] > 0.85
    assert by_patient["auc"] < 0.75
    low, high = by_patient["auc_ci95"]
    assert low < 0.5 < high


def test_patient_column_is_read():
    rows = synthetic_cohort(48, seed=2)
    for i, row in enumerate(rows):
        row["patient"] = f"P{i // 2}"
    assert cases_from_rows(rows).patients[:3] == ("P0", "P0", "P1")
    assert cases_from_rows(synthetic_cohort(48, seed=2)).patients is None


def test_save_load_round_trip_and_refuses_other_files(tmp_path):
    cases = cases_from_rows(synthetic_cohort(48, seed=2))
    model = fit_response_model(cases, k_features=3, n_bootstrap=200, model_version="2026.1")
    path = tmp_path / "model.joblib"
    model.save(path)
    again = ResponseModel.load(path)
    assert again.feature_names == model.feature_names
    assert again.metadata["model_version"] == "2026.1"
    assert again.metrics == model.metrics
    case = {"delta.volume": 0.2, "delta.vp.mean": -0.1}
    assert again.predict_probability(case) == model.predict_probability(case)
    import joblib

    joblib.dump({"something": "else"}, tmp_path / "other.joblib")
    with pytest.raises(ValueError, match="not a spine-node-response-model"):
        ResponseModel.load(tmp_path / "other.joblib")
    with pytest.raises(ValueError, match="none of the model's features"):
        model.predict_probability({"delta.unknown": 1.0})


def test_node_uses_the_model_beside_the_rule_based_call():
    cases = cases_from_rows(synthetic_cohort(48, seed=3))
    model = fit_response_model(cases, k_features=3, n_bootstrap=200)

    def lm(volume, vp, adc):
        return LesionMeasurements(
            volume_ml=volume,
            map_statistics={
                "vp": MapStatistics("vp", "1", 100, vp, vp, 0.01, vp, vp),
                "ADC": MapStatistics("ADC", "mm2/s", 100, adc, adc, 1e-4, adc, adc),
            },
        )

    changes = compute_changes(lm(9.1, 0.1, 0.8e-3), lm(6.5, 0.08, 0.85e-3))
    features = delta_features(changes)
    assert features["delta.volume"] == pytest.approx(0.4)
    assert features["delta.vp.mean"] == pytest.approx(0.25)
    rule_call = assess_response(changes, days_since_treatment=250)
    combined = attach_model_prediction(rule_call, model, features)
    assert combined.category == rule_call.category
    assert combined.model_probability > 0.7
    assert combined.model_top_features[0][0] in ("delta.volume", "delta.vp.mean")
    assert "NOT clinically meaningful" in combined.model_name
    # the node may hand over the changes themselves
    assert attach_model_prediction(rule_call, model, changes) == combined


def test_case_rows_from_changes_parse_back_to_the_same_features():
    def lm(volume, vp):
        return LesionMeasurements(
            volume_ml=volume,
            map_statistics={"vp": MapStatistics("vp", "1", 100, vp, vp, 0.01, vp, vp)},
        )

    base = lm(6.0, 0.08)
    rows = [
        case_row(
            compute_changes(lm(6.0 * (1 + dv), 0.08 * (1 + dvp)), base),
            outcome=dv > 0.2,
            case_id=f"L{i}",
        )
        for i, (dv, dvp) in enumerate([(0.4, 0.3), (0.3, 0.2), (-0.2, -0.5), (0.0, -0.1)])
    ]
    assert rows[0]["outcome"] == "local progression" and rows[0]["data_origin"] == "synthetic"
    cases = cases_from_rows(rows)
    assert cases.case_ids == ("L0", "L1", "L2", "L3")
    assert cases.outcomes.tolist() == [1, 1, 0, 0]
    column = cases.feature_names.index("delta.volume")
    np.testing.assert_allclose(cases.features[:, column], [0.4, 0.3, -0.2, 0.0], atol=1e-12)
