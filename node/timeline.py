"""Per-lesion follow-up timelines kept in the node's index database.

Every analysis of a patient (:func:`node.chain.run_chain`, whose :meth:`ChainResult.summary` the
worker writes to ``summary.json``) is recorded with :func:`record_analysis`: per patient, RT course
(RT Plan SOP Instance UID) and lesion (persistent Tracking UID, TID 1500), every time point with its
days since treatment, volume, map statistics, changes (from baseline and previous), response call
and the criteria behind it, comparability with the baseline, and the DICOM objects produced for
that time point. Whether those objects were sent is read from the index's outbox when the
timeline is queried.

The chain always re-analyses all of a patient's studies, so one chain run is authoritative for its
course: recording it replaces the course's time points. A corrected baseline (re-sent, amended
study) therefore gives new later deltas and calls, and :class:`RecordOutcome` says which time
points changed.

The tables belong to this module and have their own small versioned migration
(``timeline_schema_version``), independent of :data:`node.index.MIGRATIONS`.

No patient name, ID or birth date is stored here or logged; patients are referred to by the
index's patient row.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import NodeError
from node.index import Index
from processing.dates import dicom_date

logger = logging.getLogger(__name__)

#: Each entry migrates the timeline tables from version i to i+1. Append, never edit one.
TIMELINE_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE timeline_runs (
        id INTEGER PRIMARY KEY,
        patient_row INTEGER NOT NULL,
        course_uid TEXT NOT NULL,
        recorded REAL NOT NULL,
        algorithm_version TEXT,
        treatment_date TEXT,
        course_json TEXT NOT NULL,
        n_points INTEGER NOT NULL
    );
    CREATE INDEX timeline_runs_patient ON timeline_runs(patient_row, course_uid);
    CREATE TABLE timeline_points (
        id INTEGER PRIMARY KEY,
        run_id INTEGER NOT NULL REFERENCES timeline_runs(id),
        patient_row INTEGER NOT NULL,
        course_uid TEXT NOT NULL,
        tracking_uid TEXT NOT NULL,
        tracking_id TEXT,
        vertebral_level TEXT,
        study_instance_uid TEXT NOT NULL,
        study_date TEXT NOT NULL,
        role TEXT NOT NULL,
        days_since_treatment INTEGER,
        volume_ml REAL,
        measurements_json TEXT NOT NULL,
        units_json TEXT NOT NULL,
        changes_json TEXT NOT NULL,
        response_category TEXT,
        response_json TEXT,
        comparability TEXT,
        comparability_reasons_json TEXT NOT NULL,
        UNIQUE (patient_row, course_uid, tracking_uid, study_instance_uid)
    );
    CREATE INDEX timeline_points_patient ON timeline_points(patient_row, course_uid, tracking_uid);
    CREATE TABLE timeline_outputs (
        id INTEGER PRIMARY KEY,
        run_id INTEGER NOT NULL REFERENCES timeline_runs(id),
        patient_row INTEGER NOT NULL,
        course_uid TEXT NOT NULL,
        study_instance_uid TEXT NOT NULL,
        sop_instance_uid TEXT NOT NULL,
        sop_class_uid TEXT NOT NULL,
        series_instance_uid TEXT,
        modality TEXT,
        series_description TEXT
    );
    CREATE INDEX timeline_outputs_study ON timeline_outputs(patient_row, study_instance_uid);
    """,
)

TIMELINE_SCHEMA_VERSION = len(TIMELINE_MIGRATIONS)


class TimelineError(NodeError):
    """A summary cannot be recorded (missing course or time point fields); the message says why."""


def ensure_schema(index: Index) -> int:
    """Create or migrate the timeline tables; return the schema version now in place.

    Raises
    ------
    TimelineError
        When the database holds a newer timeline schema than this node knows.
    """
    from node.errors import IndexDatabaseError

    try:
        return index.ensure_extension_schema("timeline", TIMELINE_MIGRATIONS)
    except IndexDatabaseError as err:
        raise TimelineError(str(err)) from err


@dataclass(frozen=True)
class TimePoint:
    """One lesion at one MR study, as recorded in the timeline.

    Attributes
    ----------
    days_since_treatment : int or None
        Days from the first treatment day (negative for the baseline).
    volume_ml : float or None
        Lesion volume (mL).
    measurements : dict
        Dotted path (``volume``, ``ADC.mean``, ``Ktrans.median``...) -> value in the node's
        internal units (ADC in mm²/s, Ktrans in /min, vp as a fraction); ``units`` gives them.
    changes : list of dict
        :class:`processing.results.Change` records (``quantity``, ``reference``, ``relative`` as a
        fraction, ``repeatability``, ``beyond_repeatability``, ``comparable``...).
    response : dict or None
        The response call with its ``criteria`` (evidence) and ``recommendation``.
    outputs : list of dict
        DICOM objects produced for this study (``sop_instance_uid``, ``modality``,
        ``series_description``) with their outbox ``state`` per destination (``sent``, ``queued``,
        ``failed``; empty when not queued).
    """

    patient_row: int
    course_uid: str
    tracking_uid: str
    tracking_id: str | None
    vertebral_level: str | None
    study_instance_uid: str
    study_date: dt.date
    role: str
    days_since_treatment: int | None
    volume_ml: float | None
    measurements: dict[str, float]
    units: dict[str, str]
    changes: list[dict[str, Any]]
    response_category: str | None
    response: dict[str, Any] | None
    comparability: str | None
    comparability_reasons: list[str]
    outputs: list[dict[str, Any]] = field(default_factory=list)

    def change(self, quantity: str, reference: str = "baseline") -> dict[str, Any] | None:
        """The change record of ``quantity`` (dotted path) against ``reference``, if any."""
        for record in self.changes:
            if record.get("quantity") == quantity and record.get("reference") == reference:
                return record
        return None

    def as_record(self) -> dict[str, Any]:
        """The point in the shape of :func:`reporting.summary.summary_records` (for plots/PDF)."""
        return {
            "lesion": {
                "tracking_uid": self.tracking_uid,
                "tracking_id": self.tracking_id,
                "vertebral_level": self.vertebral_level,
            },
            "role": self.role,
            "study_instance_uid": self.study_instance_uid,
            "study_date": self.study_date.isoformat(),
            "days_since_treatment": self.days_since_treatment,
            "measurements": dict(self.measurements),
            "units": dict(self.units),
            "changes": list(self.changes),
            "response": self.response,
            "comparability": self.comparability,
            "comparability_reasons": list(self.comparability_reasons),
        }


@dataclass(frozen=True)
class RecordOutcome:
    """What :func:`record_analysis` did.

    ``changed_studies`` lists the studies whose recorded time point is new or whose volume,
    changes or response call differ from the previous run (e.g. every follow-up after a corrected
    baseline); ``removed_studies`` those no longer in the course's analysis.
    """

    run_id: int
    patient_row: int
    course_uid: str
    n_points: int
    changed_studies: tuple[str, ...]
    removed_studies: tuple[str, ...]


def _date(value: Any) -> dt.date:
    """A date from a ``datetime.date``, ISO ``YYYY-MM-DD`` or DICOM DA ``YYYYMMDD`` value."""
    parsed = dicom_date(value)
    if parsed is None:
        raise TimelineError(f"not a date: {value!r}")
    return parsed


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str, allow_nan=True)


def _fingerprint(point: Mapping[str, Any]) -> str:
    response = point.get("response") or {}
    return _json(
        [
            point.get("volume_ml"),
            point.get("changes"),
            response.get("category"),
            point.get("days_since_treatment"),
            point.get("comparability"),
        ]
    )


def record_analysis(
    index: Index, patient_row: int, summary: Mapping[str, Any], *, now: float | None = None
) -> RecordOutcome:
    """Record one chain run of a patient (``ChainResult.summary()``) in the timeline.

    Parameters
    ----------
    index : Index
        The node's index (the timeline tables are created on first use).
    patient_row : int
        The patient's row in the index's ``patients`` table.
    summary : mapping
        The JSON summary of :class:`node.chain.ChainResult` (keys ``algorithm_version``,
        ``course``, ``time_points``, ``outputs``).
    now : float, optional
        Recording time (s since the epoch; default: now).

    Returns
    -------
    RecordOutcome

    Raises
    ------
    TimelineError
        When the summary has no course plan UID or a time point lacks its lesion or study.

    Notes
    -----
    The run replaces every time point previously recorded for this patient and course: the chain
    analyses all studies of the patient each time, so later deltas and calls always come from the
    newest run.
    """
    ensure_schema(index)
    now = time.time() if now is None else now
    course = summary.get("course") or {}
    course_uid = course.get("rtplan_sop_instance_uid")
    if not course_uid:
        raise TimelineError("summary has no course.rtplan_sop_instance_uid")
    rows: list[dict[str, Any]] = []
    for i, record in enumerate(summary.get("time_points") or []):
        lesion = record.get("lesion") or {}
        if not lesion.get("tracking_uid") or not record.get("study_instance_uid"):
            raise TimelineError(f"time point {i} has no lesion tracking_uid or study_instance_uid")
        measurements = {
            k: v for k, v in (record.get("measurements") or {}).items() if _finite(v) is not None
        }
        response = record.get("response")
        rows.append(
            {
                "tracking_uid": lesion["tracking_uid"],
                "tracking_id": lesion.get("tracking_id"),
                "vertebral_level": lesion.get("vertebral_level"),
                "study_instance_uid": record["study_instance_uid"],
                "study_date": _date(record.get("study_date")).isoformat(),
                "role": record.get("role") or "",
                "days_since_treatment": record.get("days_since_treatment"),
                "volume_ml": _finite(measurements.get("volume")),
                "measurements": measurements,
                "units": record.get("units") or {},
                "changes": record.get("changes") or [],
                "response": response,
                "comparability": record.get("comparability"),
                "comparability_reasons": record.get("comparability_reasons") or [],
            }
        )
    with index.transaction() as db:
        previous = {
            (r["tracking_uid"], r["study_instance_uid"]): _fingerprint(
                {
                    "volume_ml": r["volume_ml"],
                    "changes": json.loads(r["changes_json"]),
                    "response": json.loads(r["response_json"]) if r["response_json"] else None,
                    "days_since_treatment": r["days_since_treatment"],
                    "comparability": r["comparability"],
                }
            )
            for r in db.execute(
                "SELECT * FROM timeline_points WHERE patient_row=? AND course_uid=?",
                (patient_row, course_uid),
            ).fetchall()
        }
        cur = db.execute(
            "INSERT INTO timeline_runs (patient_row, course_uid, recorded, algorithm_version,"
            " treatment_date, course_json, n_points) VALUES (?,?,?,?,?,?,?)",
            (
                patient_row,
                course_uid,
                now,
                summary.get("algorithm_version"),
                course.get("treatment_date"),
                _json(course),
                len(rows),
            ),
        )
        run_id = int(cur.lastrowid or 0)
        db.execute(
            "DELETE FROM timeline_points WHERE patient_row=? AND course_uid=?",
            (patient_row, course_uid),
        )
        db.execute(
            "DELETE FROM timeline_outputs WHERE patient_row=? AND course_uid=?",
            (patient_row, course_uid),
        )
        changed: list[str] = []
        for row in rows:
            key = (row["tracking_uid"], row["study_instance_uid"])
            if previous.pop(key, None) != _fingerprint(row):
                changed.append(row["study_instance_uid"])
            db.execute(
                "INSERT INTO timeline_points (run_id, patient_row, course_uid, tracking_uid,"
                " tracking_id, vertebral_level, study_instance_uid, study_date, role,"
                " days_since_treatment, volume_ml, measurements_json, units_json, changes_json,"
                " response_category, response_json, comparability, comparability_reasons_json)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    run_id,
                    patient_row,
                    course_uid,
                    row["tracking_uid"],
                    row["tracking_id"],
                    row["vertebral_level"],
                    row["study_instance_uid"],
                    row["study_date"],
                    row["role"],
                    row["days_since_treatment"],
                    row["volume_ml"],
                    _json(row["measurements"]),
                    _json(row["units"]),
                    _json(row["changes"]),
                    (row["response"] or {}).get("category"),
                    _json(row["response"]) if row["response"] is not None else None,
                    row["comparability"],
                    _json(row["comparability_reasons"]),
                ),
            )
        for output in summary.get("outputs") or []:
            db.execute(
                "INSERT INTO timeline_outputs (run_id, patient_row, course_uid,"
                " study_instance_uid, sop_instance_uid, sop_class_uid, series_instance_uid,"
                " modality, series_description) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    run_id,
                    patient_row,
                    course_uid,
                    output["study_instance_uid"],
                    output["sop_instance_uid"],
                    output["sop_class_uid"],
                    output.get("series_instance_uid"),
                    output.get("modality"),
                    output.get("series_description"),
                ),
            )
    removed = tuple(sorted({study for _, study in previous}))
    outcome = RecordOutcome(
        run_id, patient_row, course_uid, len(rows), tuple(dict.fromkeys(changed)), removed
    )
    logger.info(
        "timeline of patient row %d, course %s: %d time points, %d changed, %d removed",
        patient_row,
        course_uid,
        len(rows),
        len(outcome.changed_studies),
        len(removed),
    )
    return outcome


def on_analysis_done(
    index: Index, patient_row: int, summary: Mapping[str, Any] | Path, *, followups: Any = None
) -> RecordOutcome:
    """What the node does after each successful analysis of a patient.

    Records the run in the timeline and, given a :class:`node.followup.FollowupTracker`, lays out
    the patient's follow-up windows (including a confirmation scan after a possible
    pseudoprogression).

    Parameters
    ----------
    index : Index
    patient_row : int
    summary : mapping or Path
        ``ChainResult.summary()``, or the ``summary.json`` the worker wrote
        (``<storage>/results/patient-<row>/summary.json``).
    followups : FollowupTracker, optional
    """
    if isinstance(summary, Path):
        try:
            summary = json.loads(summary.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise TimelineError(f"cannot read analysis summary {summary}: {err}") from err
    if not isinstance(summary, Mapping):
        raise TimelineError(f"analysis summary must be a JSON object, not {type(summary).__name__}")
    outcome = record_analysis(index, patient_row, summary)
    if followups is not None:
        followups.update_patient(patient_row, summary)
    return outcome


def _outputs(index: Index, patient_row: int, course_uid: str) -> dict[str, list[dict[str, Any]]]:
    rows = index.query(
        "SELECT o.study_instance_uid, o.sop_instance_uid, o.sop_class_uid, o.modality,"
        " o.series_description, x.destination, x.state, x.tries, x.last_error"
        " FROM timeline_outputs o LEFT JOIN outbox x ON x.sop_instance_uid=o.sop_instance_uid"
        " WHERE o.patient_row=? AND o.course_uid=? ORDER BY o.id, x.id",
        (patient_row, course_uid),
    )
    by_study: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_study.setdefault(r["study_instance_uid"], []).append(dict(r))
    return by_study


def recorded_reports(index: Index, patient_row: int) -> dict[str, list[dict[str, str]]]:
    """The structured reports the last recorded analysis of a patient produced, by study.

    Read before a new analysis is recorded, so that its reports can name the ones they
    supersede (:func:`node.analysis.link_superseded_reports`).

    Returns
    -------
    dict
        Study Instance UID -> list of ``{"sop_class_uid", "sop_instance_uid",
        "series_instance_uid"}`` of the SR documents recorded for that study.
    """
    ensure_schema(index)
    rows = index.query(
        "SELECT study_instance_uid, sop_class_uid, sop_instance_uid, series_instance_uid"
        " FROM timeline_outputs WHERE patient_row=? AND modality='SR' ORDER BY id",
        (patient_row,),
    )
    reports: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        reports.setdefault(r["study_instance_uid"], []).append(
            {k: r[k] for k in ("sop_class_uid", "sop_instance_uid", "series_instance_uid")}
        )
    return reports


def timeline(
    index: Index, patient_row: int | None = None, *, tracking_uid: str | None = None
) -> list[TimePoint]:
    """Recorded time points, ordered by patient, course, lesion and study date.

    Parameters
    ----------
    index : Index
    patient_row : int, optional
        Only this patient (default: all).
    tracking_uid : str, optional
        Only this lesion.
    """
    ensure_schema(index)
    rows = index.select(
        "timeline_points",
        "patient_row, course_uid, tracking_uid, study_date, study_instance_uid",
        patient_row=patient_row,
        tracking_uid=tracking_uid,
    )
    outputs_cache: dict[tuple[int, str], dict[str, list[dict[str, Any]]]] = {}
    points = []
    for r in rows:
        key = (r["patient_row"], r["course_uid"])
        if key not in outputs_cache:
            outputs_cache[key] = _outputs(index, *key)
        points.append(
            TimePoint(
                patient_row=r["patient_row"],
                course_uid=r["course_uid"],
                tracking_uid=r["tracking_uid"],
                tracking_id=r["tracking_id"],
                vertebral_level=r["vertebral_level"],
                study_instance_uid=r["study_instance_uid"],
                study_date=dt.date.fromisoformat(r["study_date"]),
                role=r["role"],
                days_since_treatment=r["days_since_treatment"],
                volume_ml=r["volume_ml"],
                measurements=json.loads(r["measurements_json"]),
                units=json.loads(r["units_json"]),
                changes=json.loads(r["changes_json"]),
                response_category=r["response_category"],
                response=json.loads(r["response_json"]) if r["response_json"] else None,
                comparability=r["comparability"],
                comparability_reasons=json.loads(r["comparability_reasons_json"]),
                outputs=outputs_cache[key].get(r["study_instance_uid"], []),
            )
        )
    return points


def courses(index: Index, patient_row: int | None = None) -> list[dict[str, Any]]:
    """Latest recorded run per patient and course: ``patient_row``, ``course_uid``,
    ``treatment_date`` (ISO date), ``course`` (the summary's course dict), ``recorded`` (s)."""
    ensure_schema(index)
    sql = (
        "SELECT r.* FROM timeline_runs r JOIN (SELECT patient_row, course_uid, MAX(id) AS id"
        " FROM timeline_runs GROUP BY patient_row, course_uid) m ON m.id=r.id"
    )
    params: tuple[Any, ...] = ()
    if patient_row is not None:
        sql += " WHERE r.patient_row=?"
        params = (patient_row,)
    return [
        {
            "patient_row": r["patient_row"],
            "course_uid": r["course_uid"],
            "treatment_date": r["treatment_date"],
            "course": json.loads(r["course_json"]),
            "recorded": r["recorded"],
            "algorithm_version": r["algorithm_version"],
        }
        for r in index.query(sql + " ORDER BY r.patient_row, r.course_uid", params)
    ]


_TEXT_QUANTITIES = (
    ("ADC.mean", "ADC", 1e3, "e-3 mm²/s"),
    ("Ktrans.mean", "Ktrans", 1.0, "/min"),
    ("vp.mean", "vp", 1.0, ""),
)


def _percent(change: Mapping[str, Any] | None) -> str:
    if change is None or change.get("relative") is None:
        return ""
    flag = "*" if change.get("beyond_repeatability") else ""
    flag += "!" if change.get("comparable") is False else ""
    return f" ({change['relative'] * 100:+.0f} %{flag})"


def timeline_text(
    index: Index, patient_row: int | None = None, *, points: Sequence[TimePoint] | None = None
) -> str:
    """The timeline as plain text, one block per patient, course and lesion (no patient data).

    For ``spine-node status``. Changes are relative to the baseline; ``*`` marks a change beyond
    the repeatability, ``!`` a change between acquisitions that are not comparable.
    """
    points = timeline(index, patient_row) if points is None else list(points)
    if not points:
        return "No lesion timeline recorded."
    lines: list[str] = []
    last_key: tuple[int, str, str] | None = None
    for p in points:
        key = (p.patient_row, p.course_uid, p.tracking_uid)
        if key != last_key:
            level = f" ({p.vertebral_level})" if p.vertebral_level else ""
            lines.append(f"patient row {p.patient_row}, course {p.course_uid}")
            lines.append(f"  lesion {p.tracking_id or p.tracking_uid}{level}")
            last_key = key
        days = f"day {p.days_since_treatment:+d}" if p.days_since_treatment is not None else "day ?"
        volume = f"{p.volume_ml:.2f} mL" if p.volume_ml is not None else "n/a"
        parts = [
            f"    {p.study_date.isoformat()} {days:>9} {p.role:<9} volume {volume}"
            f"{_percent(p.change('volume'))}"
        ]
        for path, label, scale, unit in _TEXT_QUANTITIES:
            if path in p.measurements:
                parts.append(
                    f"{label} {p.measurements[path] * scale:.3g}{unit}{_percent(p.change(path))}"
                )
        line = "; ".join(parts)
        if p.response_category:
            line += f"; RESPONSE {p.response_category}"
        if p.comparability and p.comparability != "comparable":
            line += f"; comparability {p.comparability}"
        sent = sum(1 for o in p.outputs if o.get("state") == "sent")
        if p.outputs:
            n_objects = len({o["sop_instance_uid"] for o in p.outputs})
            line += f"; {n_objects} objects ({sent} sent)"
        lines.append(line)
    return "\n".join(lines)
