"""``spine-node cohort --patients N --out DIR``: a labelled phantom cohort for ``spine-node train``.

Writes N synthetic CyberKnife patients (:mod:`processing.phantom`) with mixed scenarios — the four
scenarios in turn (responder, progression, pseudoprogression, stable), the DICOM encoding variant
changing every four patients and the seed with every patient, so that no two cases are alike —
runs the node's analysis (:func:`node.pipeline.run_patient` on the phantom's folder, with the IOCM
rejection notes it holds applied: the same numbers the node computes) on each in a pool of worker
processes, and writes:

``DIR/cases.csv``
    one row per lesion follow-up, built with :func:`processing.response_model.case_row` from the
    chain's changes: ``delta.*`` features, ``outcome`` from the phantom's scenario (progression ->
    local progression; responder, stable and pseudoprogression -> local control, their true
    outcome), ``data_origin = synthetic``, and the metadata columns ``patient``, ``scenario`` and
    ``notes`` (vendor, seed, size). The input of ``spine-node train --cases``.
``DIR/patients.json``
    per-patient status (analysed, or failed with its reason), the rule-based call beside the
    phantom's expected call, and the time spent (phantom, reading, chain stages).

A patient whose phantom or chain fails is reported and left out; the exit status is 1 when any
patient failed, 2 on bad arguments. The phantom DICOM files are deleted once their patient is
analysed unless ``--keep`` is given. The chain runs with ``repeatability=False, outputs=False``:
a cohort needs the changes (``delta.*`` are relative changes, independent of the repeatability
flags), not the per-case repeatability perturbation nor the SEG / Parametric Map / SR / PDF
objects; the rule-based call in ``patients.json`` is therefore made against the published MDCs
only.
Patients are pseudonymised as ``P001``...; no patient identifier is written or logged.

A model trained on such a cohort is labelled as not clinically meaningful (``spine-node train``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from collections import Counter
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.commands.phantom import SCENARIOS, SIZES, VENDORS
from node.logs import logging_target

logger = logging.getLogger(__name__)

#: scenario -> true outcome (True = local progression). A pseudoprogression is an indeterminate
#: *call* at its first follow-up, but its outcome is local control.
SCENARIO_OUTCOME: dict[str, bool] = {
    "responder": False,
    "progression": True,
    "pseudoprogression": False,
    "stable": False,
}
#: columns written before the features (all are metadata for processing.response_model)
LEADING_COLUMNS = ("case_id", "patient", "scenario", "notes", "data_origin", "outcome")
MAX_FOLLOWUPS = 4


@dataclass(frozen=True)
class CohortPatient:
    """One planned phantom patient of a cohort.

    Attributes
    ----------
    number : int
        1-based position in the cohort (the pseudonym is ``P<number>``).
    scenario : {'responder', 'progression', 'pseudoprogression', 'stable'}
    vendor : {'standard', 'siemens', 'ge', 'philips', 'enhanced'}
    seed : int
        The phantom's random seed.
    """

    number: int
    scenario: str
    vendor: str
    seed: int
    #: a randomised course (processing.phantom.trajectory) instead of the scenario's fixed one
    randomised: bool = False

    @property
    def pseudonym(self) -> str:
        return f"P{self.number:03d}"


def cohort_plan(patients: int, *, seed: int = 0, randomised: bool = False) -> list[CohortPatient]:
    """The cohort's patients: scenarios in turn, vendor changing every four patients, seed + i.

    Parameters
    ----------
    patients : int
        Number of patients (>= 1).
    seed : int
        Seed of the first patient; patient i (0-based) has seed ``seed + i``.
    randomised : bool
        Each patient's course is drawn from ranges by its seed
        (:func:`processing.phantom.trajectory.random_trajectory`; the course cycles with the
        seed) instead of being one of the four fixed scenarios.
    """
    if patients < 1:
        raise ValueError(f"patients must be >= 1, got {patients}")
    if randomised:
        from processing.phantom.trajectory import COURSES

        return [
            CohortPatient(
                i + 1,
                COURSES[(seed + i) % len(COURSES)],
                VENDORS[(i // len(SCENARIOS)) % len(VENDORS)],
                seed + i,
                randomised=True,
            )
            for i in range(patients)
        ]
    return [
        CohortPatient(
            i + 1,
            SCENARIOS[i % len(SCENARIOS)],
            VENDORS[(i // len(SCENARIOS)) % len(VENDORS)],
            seed + i,
        )
        for i in range(patients)
    ]


def analyse_patient(
    patient: CohortPatient,
    folder: Path,
    *,
    size: str = "small",
    followups: int = 1,
    settings: Any = None,
    keep: bool = False,
) -> dict[str, Any]:
    """Write one phantom patient, run the chain on it and turn its follow-ups into case rows.

    Runs in a worker process. Never raises for a failing patient: the returned status says
    ``"state": "failed"`` with the reason.

    Parameters
    ----------
    patient : CohortPatient
    folder : Path
        Where the phantom is written (must not exist or be empty); removed afterwards unless
        ``keep``.
    size : {'small', 'full'}
        Phantom size.
    followups : int
        Follow-up studies per patient (one case row each).
    settings : node.chain.ChainSettings, optional
        The chain's settings (default: the node's defaults); run without repeatability and outputs.
    keep : bool
        Keep the phantom's DICOM files.

    Returns
    -------
    dict
        ``patient``, ``scenario``, ``vendor``, ``seed``, ``state`` (``analysed`` / ``failed``),
        ``reason``, ``rows`` (case rows), ``calls`` (per follow-up: case id, rule-based call,
        expected call), ``notes`` (the chain's), ``times_s`` (phantom, read, chain, total) and
        ``chain_timings_s`` (per stage).
    """
    from node.chain import ChainSettings
    from node.commands.phantom import write_phantom
    from node.errors import NodeError
    from node.pipeline import DicomFolder, run_patient
    from processing.errors import ProcessingError

    status: dict[str, Any] = {
        "patient": patient.pseudonym,
        "randomised": patient.randomised,
        "scenario": patient.scenario,
        "vendor": patient.vendor,
        "seed": patient.seed,
        "size": size,
        "state": "failed",
        "reason": None,
        "rows": [],
        "calls": [],
        "notes": [],
        "times_s": {},
        "chain_timings_s": {},
    }
    times = status["times_s"]
    settings = dataclasses.replace(
        settings or ChainSettings(), repeatability=False, outputs=False, model_path=None
    )
    t0 = time.perf_counter()
    try:
        trajectory = None
        if patient.randomised:
            from processing.phantom.trajectory import random_trajectory

            trajectory = random_trajectory(patient.seed)
            status["growth"] = trajectory.growth
            status["baseline_volume_ml_nominal"] = trajectory.baseline_volume_ml
        truth = write_phantom(
            folder,
            seed=patient.seed,
            scenario=patient.scenario,
            vendor=patient.vendor,
            size=size,
            followups=followups,
            trajectory=trajectory,
        )
        times["phantom"] = time.perf_counter() - t0
        # the node's runner, on the phantom's folder: rejection notes in it are applied
        run = run_patient(DicomFolder([folder]), settings)
        times["read"] = run.times_s["load"]
        times["chain"] = run.times_s["chain"]
    except (OSError, ValueError, ProcessingError, NodeError) as err:
        # bad phantom arguments, unreadable files, unusable data: this patient fails
        status["reason"] = f"{type(err).__name__}: {err}"
        logger.warning("cohort patient %s failed", patient.pseudonym, exc_info=True)
    except Exception as err:  # noqa: BLE001
        # process boundary of the cohort's per-patient loop (a worker process): a bug shown by
        # one patient is reported with its traceback in the log, the cohort goes on
        status["reason"] = f"unexpected {type(err).__name__}: {err}"
        logger.error("cohort patient %s failed unexpectedly", patient.pseudonym, exc_info=True)
    else:
        if run.result is None:
            status["reason"] = f"nothing to analyse: {run.reason}"
        else:
            _record_cases(status, patient, truth, run.result, size)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    times["total"] = time.perf_counter() - t0
    status["times_s"] = {k: round(v, 2) for k, v in times.items()}
    return status


def _record_cases(
    status: dict[str, Any], patient: CohortPatient, truth: dict[str, Any], result: Any, size: str
) -> None:
    """Fill ``status`` with the case rows and calls of an analysed phantom patient.

    ``result`` is the chain's :class:`node.chain.ChainResult`; ``truth`` the phantom's
    ground truth (:func:`node.commands.phantom.write_phantom`).
    """
    from processing.response_model import case_row

    status["chain_timings_s"] = {k: round(v, 2) for k, v in result.timings.items()}
    status["notes"] = list(result.notes)
    followup_keys = {
        str(study.get("StudyInstanceUID")): key
        for key, study in truth["studies"].items()
        if key != "baseline"
    }
    notes = f"{patient.vendor} vendor, seed {patient.seed}, {size} phantom"
    baseline_volume = result.results[0].measurements.volume_ml if result.results else None
    studies = {study.study_instance_uid: study for study in result.studies}
    for tp in result.results[1:]:
        key = followup_keys.get(tp.study_instance_uid, tp.study_instance_uid)
        case_id = f"{patient.pseudonym}-{key}"
        study_truth = truth["studies"].get(key, {})
        true_state = study_truth.get("true_state")
        # a randomised course's follow-up has its own true state (a progression may start late)
        outcome = (
            true_state == "progression"
            if true_state is not None
            else SCENARIO_OUTCOME[patient.scenario]
        )
        row = case_row(tp.changes, outcome=outcome, case_id=case_id, data_origin="synthetic")
        row.update(patient=patient.pseudonym, scenario=patient.scenario, notes=notes)
        status["rows"].append(row)
        tumour = study_truth.get("tumour") or {}
        study = studies[tp.study_instance_uid]
        status["calls"].append(
            {
                "case_id": case_id,
                "days_since_treatment": tp.days_since_treatment,
                "rule_based": None if tp.response is None else tp.response.category.value,
                "leaning": None if tp.response is None else tp.response.leaning,
                "expected": study_truth.get("expected_response"),
                "true_state": true_state,
                "multipliers": study_truth.get("scenario_multipliers"),
                "volume_ml": tp.measurements.volume_ml,
                "true_volume_ml": tumour.get("volume_ml_voxels_t2w"),
                "true_volume_ml_continuous": tumour.get("volume_ml_continuous"),
                "baseline_volume_ml": baseline_volume,
                "true_baseline_volume_ml": truth["studies"]["baseline"]["tumour"].get(
                    "volume_ml_voxels_t2w"
                ),
                # the tumour's true ADC for each b-value range a fit may use, now and at baseline
                "true_adc_mm2_s": _true_adc(tumour),
                "true_baseline_adc_mm2_s": _true_adc(truth["studies"]["baseline"]["tumour"]),
                # how the lesion was delineated (refinement, adaptation, volume range): what a
                # volume error is read against, without re-running the patient
                "volume_range_ml": (study.lesion_delineation or {}).get("volume_range_ml"),
                "lesion_notes": list(study.lesion_notes),
                # what decided the call (codes of the fired criteria) and the epidural part the
                # epidural criteria read, against the phantom's true epidural volume
                "fired": (
                    [] if tp.response is None else [c.code for c in tp.response.criteria if c.fired]
                ),
                "epidural_volume_ml": tp.measurements.epidural_volume_ml,
                "true_epidural_volume_ml": tumour.get("epidural_volume_ml"),
            }
        )
    if status["rows"]:
        status["state"] = "analysed"
    else:
        status["reason"] = "no follow-up could be analysed: " + "; ".join(result.notes)


def _true_adc(tumour: dict[str, Any]) -> dict[str, float]:
    """The phantom tumour's true ADC by b-value range (``"b50-1000"`` -> mm²/s)."""
    return {key: fit["adc_mm2_s"] for key, fit in (tumour.get("adc_by_bvalues") or {}).items()}


def write_cases(rows: list[dict[str, str]], path: Path) -> list[str]:
    """Write the case rows as CSV (metadata columns first, then the union of the features,
    sorted; a feature a case lacks is an empty cell = missing). Returns the columns."""
    features = sorted({name for row in rows for name in row} - set(LEADING_COLUMNS))
    columns = [*LEADING_COLUMNS, *features]
    tmp = path.with_name(path.name + ".part")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return columns


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--patients", type=int, help="number of phantom patients")
    parser.add_argument(
        "--out",
        type=Path,
        help="output folder (created; must be empty if it exists)",
    )
    parser.add_argument(
        "--randomised",
        action="store_true",
        help="draw each patient's course from ranges by its seed (baseline 1-30 mL, 1-4 "
        "follow-ups at 4-60 weeks, growth, shrinkage, pseudoprogression, functional changes of "
        "both signs, eccentric and epidural growth) instead of the four fixed scenarios; "
        "--followups is then ignored",
    )
    parser.add_argument(
        "--report",
        type=Path,
        metavar="DIR",
        help="instead of running a cohort: print the validation report (confusion matrix, "
        "detection, volume errors) of the randomised cohort in DIR",
    )
    parser.add_argument(
        "--readme",
        type=Path,
        metavar="FILE",
        help="with --report: also write it into FILE between the cohort-report markers of the "
        "cohort's phantom size (<!-- cohort-report:start --> for small, "
        "<!-- cohort-report-full:start --> for full)",
    )
    parser.add_argument(
        "--size",
        choices=SIZES,
        default="small",
        help="phantom size (default small: minutes for a cohort of 40)",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="worker processes (default: the number of CPUs)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the first patient; patient i has seed + i (default 0)",
    )
    parser.add_argument(
        "--followups",
        type=int,
        default=1,
        help=f"follow-up studies per patient, one case each (default 1, max "
        f"{MAX_FOLLOWUPS}); the cases of one patient are not independent",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="node configuration whose [analysis] section the chain uses, so "
        "that the features match the node's (default: built-in settings)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the phantom DICOM files under OUT/phantoms/"
    )


def _init_worker(level: str, log_file: str | None, threads: int) -> None:
    """Worker process set-up: the node's logging, and ``threads`` threads for the numerical
    libraries (J workers each using every core would oversubscribe the CPUs). Runs in a fresh
    spawned process before numpy is imported, so the BLAS/OpenMP variables take effect."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    import SimpleITK as sitk

    from node.logs import configure_logging

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    configure_logging(level, log_file)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.1f} s"


def _line(done: int, total: int, status: dict[str, Any]) -> str:
    head = (
        f"[{done:>{len(str(total))}}/{total}] {status['patient']} {status['scenario']}/"
        f"{status['vendor']} seed {status['seed']}:"
    )
    times = status["times_s"]
    if status["state"] != "analysed":
        return f"{head} FAILED after {times.get('total', 0):.1f} s: {status['reason']}"
    calls = ", ".join(c["rule_based"] for c in status["calls"])
    return (
        f"{head} {len(status['rows'])} case(s), rule-based {calls}; chain "
        f"{times['chain']:.1f} s (phantom {times['phantom']:.1f} s, "
        f"read {times['read']:.1f} s)"
    )


def _run_report(args: argparse.Namespace) -> int:
    from node.commands import cohort_report

    try:
        figures = cohort_report.evaluate(cohort_report.load(args.report))
    except (OSError, ValueError) as err:
        print(f"spine-node cohort: cannot read the cohort in {args.report}: {err}", file=sys.stderr)
        return 2
    if not figures["patients"]:
        print(
            f"spine-node cohort: {args.report} holds no randomised patient "
            "(run spine-node cohort --randomised)",
            file=sys.stderr,
        )
        return 2
    text = cohort_report.markdown(figures)
    print(text, end="")
    (args.report / "report.md").write_text(text, encoding="utf-8")
    (args.report / "report.json").write_text(json.dumps(figures, indent=1) + "\n", "utf-8")
    if args.readme is not None:
        try:
            cohort_report.replace_section(args.readme, text, figures["size"])
        except (OSError, ValueError) as err:
            print(f"spine-node cohort: cannot update {args.readme}: {err}", file=sys.stderr)
            return 2
        print(f"written into {args.readme}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.report is not None:
        return _run_report(args)
    jobs = args.jobs if args.jobs is not None else (os.cpu_count() or 1)
    problems = []
    if args.patients is None or args.out is None:
        print(
            "spine-node cohort: --patients and --out are needed (or --report DIR)", file=sys.stderr
        )
        return 2
    if args.patients < 1:
        problems.append(f"--patients must be >= 1, got {args.patients}")
    if jobs < 1:
        problems.append(f"--jobs must be >= 1, got {jobs}")
    if not 1 <= args.followups <= MAX_FOLLOWUPS:
        problems.append(f"--followups must be between 1 and {MAX_FOLLOWUPS}, got {args.followups}")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        problems.append(f"output folder {args.out} exists and is not empty")
    if problems:
        for problem in problems:
            print(f"spine-node cohort: {problem}", file=sys.stderr)
        return 2
    try:
        from node.worker import chain_settings_from

        settings = chain_settings_from(args.config)
    except (OSError, ValueError) as err:
        print(
            f"spine-node cohort: cannot use the configuration {args.config}: {err}", file=sys.stderr
        )
        return 2
    plan = cohort_plan(args.patients, seed=args.seed, randomised=args.randomised)
    phantoms = args.out / "phantoms"
    phantoms.mkdir(parents=True)
    jobs = min(jobs, len(plan))
    mix = Counter(p.scenario for p in plan)
    print(
        f"cohort of {len(plan)} {args.size} phantom patients "
        f"({', '.join(f'{s} {mix[s]}' for s in SCENARIOS if mix[s])}), "
        + ("randomised courses" if args.randomised else f"{args.followups} follow-up(s) each")
        + f", {jobs} worker process(es)"
    )
    level, log_file = logging_target()
    statuses: dict[str, dict[str, Any]] = {}
    start = time.perf_counter()
    executor = concurrent.futures.ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(level, log_file, max(1, (os.cpu_count() or 1) // jobs)),
    )
    try:
        futures = {
            executor.submit(
                analyse_patient,
                p,
                phantoms / p.pseudonym,
                size=args.size,
                followups=args.followups,
                settings=settings,
                keep=args.keep,
            ): p
            for p in plan
        }
        for future in concurrent.futures.as_completed(futures):
            patient = futures[future]
            try:
                status = future.result()
            except BrokenProcessPool as err:
                # a worker died (killed, out of memory): its patient and the queued ones fail
                status = {
                    "patient": patient.pseudonym,
                    "scenario": patient.scenario,
                    "vendor": patient.vendor,
                    "seed": patient.seed,
                    "size": args.size,
                    "state": "failed",
                    "reason": f"worker process died: {err}",
                    "rows": [],
                    "calls": [],
                    "notes": [],
                    "times_s": {},
                    "chain_timings_s": {},
                }
            statuses[patient.pseudonym] = status
            print(_line(len(statuses), len(plan), status), flush=True)
    except KeyboardInterrupt:
        executor.shutdown(wait=False, cancel_futures=True)
        print("spine-node cohort: interrupted", file=sys.stderr)
        return 130
    finally:
        executor.shutdown(wait=True)
    wall = time.perf_counter() - start
    if not args.keep:
        shutil.rmtree(phantoms, ignore_errors=True)
    return _report(args, plan, statuses, wall, jobs)


def _report(
    args: argparse.Namespace,
    plan: list[CohortPatient],
    statuses: dict[str, dict[str, Any]],
    wall: float,
    jobs: int,
) -> int:
    ordered = [statuses[p.pseudonym] for p in plan]
    analysed = [s for s in ordered if s["state"] == "analysed"]
    failed = [s for s in ordered if s["state"] != "analysed"]
    rows = [row for s in analysed for row in s["rows"]]
    calls = [c for s in analysed for c in s["calls"]]
    chain = [s["times_s"]["chain"] for s in analysed]
    per_patient = [s["times_s"]["total"] for s in analysed]
    summary = {
        "patients": len(plan),
        "analysed": len(analysed),
        "failed": len(failed),
        "cases": len(rows),
        "local_progression_cases": sum(r["outcome"] == "local progression" for r in rows),
        "scenarios": dict(Counter(s["scenario"] for s in analysed)),
        "size": args.size,
        "followups": "randomised" if args.randomised else args.followups,
        "randomised": args.randomised,
        "first_seed": args.seed,
        "jobs": jobs,
        "wall_time_s": round(wall, 1),
        "chain_time_s": None
        if not chain
        else {"median": round(statistics.median(chain), 2), "min": min(chain), "max": max(chain)},
        "patient_time_s_median": None
        if not per_patient
        else round(statistics.median(per_patient), 2),
        "rule_based_agrees_with_expected": sum(c["rule_based"] == c["expected"] for c in calls),
        "data_origin": "synthetic",
    }
    report = {
        "summary": summary,
        "patients": [{k: v for k, v in s.items() if k != "rows"} for s in ordered],
    }
    cases_path = args.out / "cases.csv"
    status_path = args.out / "patients.json"
    try:
        if rows:
            columns = write_cases(rows, cases_path)
        status_path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    except OSError as err:
        print(f"spine-node cohort: cannot write the results: {err}", file=sys.stderr)
        return 1
    print(
        f"cohort: {len(analysed)} of {len(plan)} patients analysed, {len(failed)} failed; "
        f"wall time {_minutes(wall)} with {jobs} job(s)"
    )
    if chain:
        print(
            f"chain time per patient: median {statistics.median(chain):.1f} s "
            f"(range {min(chain):.1f}-{max(chain):.1f} s); whole patient (phantom, read, chain) "
            f"median {statistics.median(per_patient):.1f} s"
        )
    for s in failed:
        print(
            f"FAILED {s['patient']} ({s['scenario']}/{s['vendor']} seed {s['seed']}; "
            f"spine-node phantom --scenario {s['scenario']} --vendor {s['vendor']} "
            f"--seed {s['seed']} --size {s['size']} reproduces it): {s['reason']}"
        )
    if not rows:
        print("spine-node cohort: no case could be built; no cases.csv written", file=sys.stderr)
        print(f"status: {status_path}")
        return 1
    mix = ", ".join(f"{k} {v}" for k, v in sorted(summary["scenarios"].items()))
    agreement = (
        f"validation report: spine-node cohort --report {args.out}"
        if args.randomised
        else f"rule-based call as the phantom expects in "
        f"{summary['rule_based_agrees_with_expected']}/{len(calls)}"
    )
    print(
        f"{len(rows)} cases ({summary['local_progression_cases']} local progression; {mix}), "
        f"{len(columns) - len(LEADING_COLUMNS)} delta features; {agreement}"
    )
    print(f"cases: {cases_path}\nstatus: {status_path}")
    print(
        f"next: spine-node train --cases {cases_path} --out MODEL.joblib "
        "(synthetic cases: the model is NOT clinically meaningful)"
    )
    logger.info(
        "cohort written: %d cases from %d patients (%d failed)",
        len(rows),
        len(analysed),
        len(failed),
    )
    return 1 if failed else 0
