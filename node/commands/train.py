"""``spine-node train --cases CSV --out MODEL``: fit a site's response model on labelled cases.

The CSV has one row per lesion follow-up: an ``outcome`` column (``local progression`` / ``1`` or
``local control`` / ``0``), optional ``case_id``, ``patient`` (several follow-ups of one patient
are then kept in one cross-validation fold and bootstrapped together) and ``data_origin``
columns, and numeric
``delta.*`` feature columns (relative changes from baseline, see
:func:`processing.response_model.delta_features`). The command writes the model (joblib, with
version, feature list and training metadata) and a metrics report (JSON: cross-validated AUC with
its 95 % bootstrap confidence interval), and prints a summary. Unless every row says
``data_origin = clinical`` (or ``--data-origin clinical`` is given), the model is treated as
trained on synthetic data and labelled as not clinically meaningful.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", type=Path, required=True, help="labelled cases (CSV)")
    parser.add_argument("--out", type=Path, required=True, help="model file to write (joblib)")
    parser.add_argument(
        "--report",
        type=Path,
        default=None,
        help="metrics report (JSON); default: MODEL with .metrics.json",
    )
    parser.add_argument(
        "--data-origin",
        choices=("synthetic", "clinical"),
        default=None,
        help="where the cases come from; default: the CSV's data_origin column, else synthetic",
    )
    parser.add_argument("--name", default="site response model", help="model name")
    parser.add_argument("--model-version", default="1", help="model version string")
    parser.add_argument(
        "--k-features",
        type=int,
        default=10,
        help="features kept by univariate selection (default 10)",
    )
    parser.add_argument(
        "--c", type=float, default=1.0, help="inverse L2 regularisation strength (default 1.0)"
    )
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=2000,
        help="bootstrap resamples for the AUC confidence interval (default 2000)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _data_origin(rows: list[dict[str, str]], given: str | None) -> str:
    if given is not None:
        return given
    origins = {(row.get("data_origin") or "").strip().lower() for row in rows}
    return "clinical" if origins == {"clinical"} else "synthetic"


def run(args: argparse.Namespace) -> int:
    from processing.response_model import cases_from_rows, fit_response_model

    try:
        raw = args.cases.read_bytes()
        rows = list(csv.DictReader(raw.decode("utf-8-sig").splitlines()))
        cases = cases_from_rows(rows)
    except (OSError, UnicodeDecodeError) as err:
        print(f"spine-node train: cannot read {args.cases}: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"spine-node train: {args.cases}: {err}", file=sys.stderr)
        return 2
    origin = _data_origin(rows, args.data_origin)
    source = f"{args.cases.name} sha256:{hashlib.sha256(raw).hexdigest()}"
    try:
        model = fit_response_model(
            cases,
            k_features=args.k_features,
            c=args.c,
            folds=args.folds,
            seed=args.seed,
            n_bootstrap=args.bootstrap,
            data_origin=origin,
            name=args.name,
            model_version=args.model_version,
            source=source,
        )
    except ValueError as err:
        print(f"spine-node train: cannot fit the model: {err}", file=sys.stderr)
        return 1
    report_path = args.report or args.out.with_name(args.out.name + ".metrics.json")
    report = {
        "model": str(args.out),
        "display_name": model.display_name,
        "clinical_validity": model.metadata["clinical_validity"],
        "feature_names": list(model.feature_names),
        "metadata": model.metadata,
        "metrics": model.metrics,
    }
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        model.save(args.out)
        report_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except OSError as err:
        print(f"spine-node train: cannot write outputs: {err}", file=sys.stderr)
        return 1
    m = model.metrics
    low, high = m["auc_ci95"]
    print(
        f"trained {model.display_name} on {m['n_cases']} cases "
        f"({m['n_progression']} local progression), {len(model.feature_names)} features"
    )
    print(
        f"cross-validated AUC {m['auc']:.3f} (95 % CI {low:.3f}-{high:.3f}, "
        f"{m['folds']}-fold split {m.get('fold_split', 'by case')}, bootstrap)"
    )
    print(f"NOTE: model {model.metadata['clinical_validity']}")
    print(f"model: {args.out}\nmetrics: {report_path}")
    logger.info("response model written (%d cases, AUC %.3f)", m["n_cases"], m["auc"])
    return 0
