"""A site's learned response model on delta features, beside the rule-based call.

scikit-learn pipeline: median imputation -> standardisation -> univariate feature selection
(ANOVA F, ``k`` best) -> L2-regularised logistic regression, wrapped in sigmoid (Platt)
calibration with internal stratified cross-validation so that the output is a calibrated
probability of local progression. Performance is estimated by stratified k-fold cross-validation
of the *whole* pipeline (selection and calibration are refitted inside every fold, so the estimate
is not optimistically biased by feature selection on all cases), as the AUC of the out-of-fold
probabilities with a 95 % percentile bootstrap confidence interval over cases.

Models are saved with joblib together with a format version, the model version, the ordered
feature list, the training metadata and the cross-validated metrics. A model trained on synthetic
(phantom) data is marked as such and its display name says that it is not clinically meaningful.

Feature naming contract: ``delta.<quantity>`` is the relative change from baseline of a dotted
quantity of :class:`processing.results.Change` (``delta.volume``, ``delta.vp.mean``,
``delta.radiomics.ADC.original_glcm_Contrast``); :func:`delta_features` builds them.

References
----------
.. [1] Platt J. Probabilistic outputs for support vector machines. 1999 (sigmoid calibration).
.. [2] Varma S, Simon R. Bias in error estimation when using cross-validation for model
   selection. BMC Bioinformatics 2006;7:91 (selection inside the CV loop).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from processing.results import Change, ResponseAssessment

logger = logging.getLogger(__name__)

MODEL_FORMAT = "spine-node-response-model"
MODEL_FORMAT_VERSION = 1
#: Columns of a cases table that are not features.
METADATA_COLUMNS = frozenset(
    {"case_id", "outcome", "data_origin", "scenario", "patient", "lesion", "notes"}
)
DATA_ORIGINS = ("synthetic", "clinical")
SYNTHETIC_STATEMENT = (
    "trained on synthetic (phantom) data: NOT clinically meaningful; for testing the pipeline only"
)
CLINICAL_STATEMENT = (
    "trained on this site's clinical cases; decision support only, not "
    "validated outside the training population"
)

_POSITIVE = {"1", "progression", "local progression", "lp", "true", "yes"}
_NEGATIVE = {"0", "local control", "control", "lc", "false", "no"}


@dataclass(frozen=True)
class TrainingCases:
    """Labelled cases: a feature matrix (cases x features, NaN = missing) and 0/1 outcomes."""

    feature_names: tuple[str, ...]
    features: np.ndarray
    outcomes: np.ndarray  # 1 = local progression, 0 = local control
    case_ids: tuple[str, ...]
    #: the patient of each case (the ``patient`` column), when known: cases of one patient are
    #: kept in the same cross-validation fold and resampled together by the bootstrap
    patients: tuple[str, ...] | None = None


def cases_from_rows(
    rows: Iterable[Mapping[str, str]], *, outcome_column: str = "outcome"
) -> TrainingCases:
    """Parse a cases table (e.g. ``csv.DictReader`` rows): one row per lesion follow-up.

    Columns: ``outcome`` (``1``/``progression``/``local progression`` or ``0``/``local control``),
    optional ``case_id`` and metadata columns (:data:`METADATA_COLUMNS`), and numeric feature
    columns (empty cell = missing).

    Raises
    ------
    ValueError
        Missing outcome column, unknown outcome labels, non-numeric feature values, fewer than
        two cases per class.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("the cases table is empty")
    columns = list(rows[0].keys())
    if outcome_column not in columns:
        raise ValueError(f"the cases table has no {outcome_column!r} column (columns: {columns})")
    names = tuple(c for c in columns if c not in METADATA_COLUMNS and c != outcome_column)
    if not names:
        raise ValueError("the cases table has no feature columns")
    x = np.full((len(rows), len(names)), np.nan)
    y = np.zeros(len(rows), dtype=int)
    ids = []
    for i, row in enumerate(rows):
        label = str(row[outcome_column]).strip().lower()
        if label in _POSITIVE:
            y[i] = 1
        elif label not in _NEGATIVE:
            raise ValueError(f"row {i + 1}: unknown outcome {row[outcome_column]!r}")
        ids.append(str(row.get("case_id") or i + 1))
        for j, name in enumerate(names):
            cell = (row.get(name) or "").strip()
            if cell:
                try:
                    x[i, j] = float(cell)
                except ValueError as err:
                    raise ValueError(f"row {i + 1}, column {name!r}: not a number") from err
    counts = np.bincount(y, minlength=2)
    if counts.min() < 2:
        raise ValueError(
            f"need at least 2 cases of each outcome, got {counts.tolist()} (control, progression)"
        )
    patients = tuple(str(row.get("patient") or "").strip() for row in rows)
    return TrainingCases(names, x, y, tuple(ids), patients if all(patients) else None)


def delta_features(
    changes: Sequence[Change],
    *,
    reference: str = "baseline",
) -> dict[str, float]:
    """``delta.<quantity>`` -> relative change from ``reference`` (comparable changes only).

    Quantities whose reference value is 0 (no relative change) are left out.
    """
    return {
        f"delta.{c.quantity}": float(c.relative)
        for c in changes
        if c.reference == reference and c.comparable and c.relative is not None
    }


def case_row(
    changes: Sequence[Change], *, outcome: bool, case_id: str, data_origin: str = "synthetic"
) -> dict[str, str]:
    """One row of a cases table (see :func:`cases_from_rows`) from a follow-up's changes.

    Parameters
    ----------
    changes : sequence of Change
        The follow-up's changes (:func:`processing.change.compute_changes`).
    outcome : bool
        True for local progression (the label), False for local control.
    case_id : str
        Identifier of the lesion follow-up (a UID or pseudonym; never a patient identifier).
    data_origin : {"synthetic", "clinical"}
    """
    if data_origin not in DATA_ORIGINS:
        raise ValueError(f"data_origin must be one of {DATA_ORIGINS}, got {data_origin!r}")
    row = {
        "case_id": case_id,
        "data_origin": data_origin,
        "outcome": "local progression" if outcome else "local control",
    }
    row.update({name: repr(value) for name, value in sorted(delta_features(changes).items())})
    return row


def f_scores(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ANOVA F scores (sklearn ``f_classif``) for feature selection; a feature constant over
    the training cases (F undefined) scores 0 instead of NaN with a warning per fit."""
    import warnings

    from sklearn.feature_selection import f_classif

    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        f, p = f_classif(x, y)
    return np.nan_to_num(f, nan=0.0), np.nan_to_num(p, nan=1.0)


def build_pipeline(
    *, k_features: int = 10, c: float = 1.0, calibration_folds: int = 3, seed: int = 0
) -> Any:
    """The calibrated pipeline (unfitted): impute, scale, select k best, logistic regression.

    Parameters
    ----------
    k_features : int
        Features kept by univariate selection (capped at the number of features).
    c : float
        Inverse L2 regularisation strength of the logistic regression (> 0).
    calibration_folds : int
        Internal folds of the sigmoid calibration.
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.feature_selection import SelectKBest
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if k_features < 1:
        raise ValueError(f"k_features must be >= 1, got {k_features}")
    if not c > 0:
        raise ValueError(f"c must be > 0, got {c}")
    base = Pipeline(
        [
            ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
            ("scale", StandardScaler()),
            ("select", SelectKBest(f_scores, k=k_features)),
            ("classify", LogisticRegression(C=c, max_iter=1000)),
        ]
    )
    return CalibratedClassifierCV(
        base,
        method="sigmoid",
        cv=StratifiedKFold(calibration_folds, shuffle=True, random_state=seed),
    )


def _pipeline_for(cases: TrainingCases, k_features: int, c: float, seed: int) -> Any:
    k = min(k_features, len(cases.feature_names))
    smallest = int(np.bincount(cases.outcomes, minlength=2).min())
    return build_pipeline(k_features=k, c=c, calibration_folds=max(2, min(3, smallest)), seed=seed)


def cross_validated_auc(
    cases: TrainingCases,
    *,
    folds: int = 5,
    k_features: int = 10,
    c: float = 1.0,
    seed: int = 0,
    n_bootstrap: int = 2000,
) -> dict[str, Any]:
    """Cross-validated AUC of the whole pipeline with a 95 % bootstrap confidence interval.

    Returns
    -------
    dict
        ``auc`` (out-of-fold probabilities), ``auc_ci95`` (percentile bootstrap over cases,
        ``n_bootstrap`` resamples), ``fold_aucs``, ``folds``, ``brier`` score, ``n_cases``,
        ``n_progression``.
    """
    from sklearn.base import clone
    from sklearn.metrics import brier_score_loss, roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = cases.outcomes
    smallest = int(np.bincount(y, minlength=2).min())
    groups = np.asarray(cases.patients) if cases.patients is not None else None
    if groups is not None:
        # several follow-ups of one patient are not independent cases: folds split patients
        smallest = min(smallest, *(len(set(groups[y == k])) for k in (0, 1)))
    n_folds = max(2, min(folds, smallest))
    if groups is not None:
        splitter = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(cases.features, y, groups)
    else:
        splits = StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(cases.features, y)
    oof = np.zeros(len(y))
    fold_aucs = []
    for train, test in splits:
        sub = TrainingCases(
            cases.feature_names,
            cases.features[train],
            y[train],
            tuple(cases.case_ids[i] for i in train),
        )
        model = clone(_pipeline_for(sub, k_features, c, seed))
        model.fit(cases.features[train], y[train])
        oof[test] = model.predict_proba(cases.features[test])[:, 1]
        if len(set(y[test])) == 2:
            fold_aucs.append(float(roc_auc_score(y[test], oof[test])))
    auc = float(roc_auc_score(y, oof))
    rng = np.random.default_rng(seed)
    # resampling units: patients (all their cases together) when known, else cases
    if groups is not None:
        units = [np.flatnonzero(groups == g) for g in dict.fromkeys(groups)]
    else:
        units = [np.array([i]) for i in range(len(y))]
    boot = []
    for _ in range(n_bootstrap):
        idx = np.concatenate([units[k] for k in rng.integers(0, len(units), len(units))])
        if len(set(y[idx])) == 2:
            boot.append(roc_auc_score(y[idx], oof[idx]))
    low, high = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    unit = "patients" if groups is not None else "cases"
    return {
        "auc": auc,
        "auc_ci95": [low, high],
        "ci_method": f"percentile bootstrap over {unit} "
        f"of out-of-fold probabilities ({len(boot)} resamples)",
        "fold_split": "by patient" if groups is not None else "by case",
        "fold_aucs": fold_aucs,
        "folds": n_folds,
        "brier": float(brier_score_loss(y, oof)),
        "n_cases": int(len(y)),
        "n_progression": int(y.sum()),
    }


@dataclass
class ResponseModel:
    """A fitted, calibrated response model with its feature list and training metadata."""

    estimator: Any
    feature_names: tuple[str, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def synthetic(self) -> bool:
        return self.metadata.get("data_origin") != "clinical"

    @property
    def display_name(self) -> str:
        """Name and version, with the synthetic-data warning when it applies."""
        name = (
            f"{self.metadata.get('name', 'site response model')} v"
            f"{self.metadata.get('model_version', '?')}"
        )
        return f"{name} [{SYNTHETIC_STATEMENT}]" if self.synthetic else name

    def _row(self, features: Mapping[str, float]) -> np.ndarray:
        missing = [n for n in self.feature_names if n not in features]
        if len(missing) == len(self.feature_names):
            raise ValueError("none of the model's features is available")
        if missing:
            logger.info(
                "%d of %d model features missing; imputed with training medians",
                len(missing),
                len(self.feature_names),
            )
        return np.array([[float(features.get(n, math.nan)) for n in self.feature_names]])

    def predict_probability(self, features: Mapping[str, float]) -> float:
        """Calibrated probability of local progression for one case (``delta.*`` features)."""
        return float(self.estimator.predict_proba(self._row(features))[0, 1])

    def top_features(
        self,
        features: Mapping[str, float],
        *,
        n: int = 5,
    ) -> tuple[tuple[str, float], ...]:
        """The ``n`` features contributing most to this case's score.

        Contribution = logistic coefficient × standardised feature value (log-odds units,
        positive = towards progression), averaged over the calibration folds' fitted pipelines.
        """
        row = self._row(features)
        totals = np.zeros(len(self.feature_names))
        fitted = [cc.estimator for cc in self.estimator.calibrated_classifiers_]
        for pipe in fitted:
            z = pipe.named_steps["scale"].transform(pipe.named_steps["impute"].transform(row))[0]
            support = pipe.named_steps["select"].get_support()
            coef = np.zeros(len(self.feature_names))
            coef[support] = pipe.named_steps["classify"].coef_[0]
            totals += coef * z
        totals /= len(fitted)
        order = np.argsort(-np.abs(totals))[:n]
        return tuple((self.feature_names[i], float(totals[i])) for i in order if totals[i] != 0)

    def save(self, path: str | Path) -> None:
        """Write the model with joblib (format, versions, feature list, metadata, metrics)."""
        import joblib

        joblib.dump(
            {
                "format": MODEL_FORMAT,
                "format_version": MODEL_FORMAT_VERSION,
                "feature_names": list(self.feature_names),
                "metadata": self.metadata,
                "metrics": self.metrics,
                "estimator": self.estimator,
            },
            str(path),
        )

    @classmethod
    def load(cls, path: str | Path) -> ResponseModel:
        """Read a model written by :meth:`save`. Only load files this site wrote (pickle).

        Raises
        ------
        ValueError
            Not a response model file, or an unsupported format version.
        """
        import joblib
        import sklearn

        try:
            data = joblib.load(str(path))
        except (OSError, EOFError, ValueError) as err:
            raise ValueError(f"cannot read response model {path}: {err}") from err
        if not isinstance(data, dict) or data.get("format") != MODEL_FORMAT:
            raise ValueError(f"{path} is not a {MODEL_FORMAT} file")
        if data.get("format_version") != MODEL_FORMAT_VERSION:
            raise ValueError(
                f"{path}: unsupported model format version "
                f"{data.get('format_version')} (expected {MODEL_FORMAT_VERSION})"
            )
        trained_with = data["metadata"].get("sklearn_version")
        if trained_with != sklearn.__version__:
            logger.warning(
                "response model trained with scikit-learn %s, running %s",
                trained_with,
                sklearn.__version__,
            )
        return cls(
            data["estimator"],
            tuple(data["feature_names"]),
            dict(data["metadata"]),
            dict(data["metrics"]),
        )


def fit_response_model(
    cases: TrainingCases,
    *,
    k_features: int = 10,
    c: float = 1.0,
    folds: int = 5,
    seed: int = 0,
    n_bootstrap: int = 2000,
    data_origin: str = "synthetic",
    name: str = "site response model",
    model_version: str = "1",
    source: str | None = None,
) -> ResponseModel:
    """Cross-validate, then fit the calibrated pipeline on all cases.

    Parameters
    ----------
    cases : TrainingCases
        Labelled delta features.
    k_features, c : int, float
        Selection size and inverse regularisation strength.
    folds, seed, n_bootstrap : int
        Outer cross-validation folds, random seed, bootstrap resamples for the AUC CI.
    data_origin : {"synthetic", "clinical"}
        Where the cases come from; synthetic models are flagged as not clinically meaningful.
    source : str, optional
        Description of the training data (e.g. the CSV's SHA-256), stored in the metadata.
    """
    import sklearn

    if data_origin not in DATA_ORIGINS:
        raise ValueError(f"data_origin must be one of {DATA_ORIGINS}, got {data_origin!r}")
    metrics = cross_validated_auc(
        cases, folds=folds, k_features=k_features, c=c, seed=seed, n_bootstrap=n_bootstrap
    )
    estimator = _pipeline_for(cases, k_features, c, seed)
    estimator.fit(cases.features, cases.outcomes)
    metadata = {
        "name": name,
        "model_version": model_version,
        "data_origin": data_origin,
        "clinical_validity": SYNTHETIC_STATEMENT
        if data_origin == "synthetic"
        else CLINICAL_STATEMENT,
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "sklearn_version": sklearn.__version__,
        "numpy_version": np.__version__,
        "pipeline": "median imputation > standard scaling > SelectKBest(ANOVA F) > L2 logistic "
        "regression > sigmoid calibration",
        "params": {
            "k_features": min(k_features, len(cases.feature_names)),
            "C": c,
            "folds": metrics["folds"],
            "seed": seed,
        },
        "n_cases": int(len(cases.outcomes)),
        "n_progression": int(cases.outcomes.sum()),
        "source": source,
        "positive_class": "local progression",
    }
    logger.info(
        "response model fitted on %d cases (%d progression), CV AUC %.3f",
        metadata["n_cases"],
        metadata["n_progression"],
        metrics["auc"],
    )
    return ResponseModel(estimator, cases.feature_names, metadata, metrics)


def attach_model_prediction(
    assessment: ResponseAssessment,
    model: ResponseModel,
    features: Mapping[str, float] | Sequence[Change],
    *,
    n_top: int = 5,
) -> ResponseAssessment:
    """The rule-based assessment with the site model's probability and top features beside it.

    ``features`` is either the ``delta.*`` feature mapping or the follow-up's changes (turned into
    features by :func:`delta_features`).
    """
    if not isinstance(features, Mapping):
        features = delta_features(features)
    return dataclasses.replace(
        assessment,
        model_probability=model.predict_probability(features),
        model_top_features=model.top_features(features, n=n_top),
        model_name=model.display_name,
    )
