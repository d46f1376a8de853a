"""Worklist state of each study, derived from the index's studies, events and outbox.

States (issue 9): ``receiving``, ``stable`` (not analysed yet), ``analysing``,
``waiting for baseline`` / ``waiting`` (nothing to analyse yet: no baseline, or e.g. no RT
course; the reason says which),
``analysed`` (no result destination configured), ``sending`` (results queued or being retried),
``sent`` and ``failed`` (analysis failed, or sending failed after the last retry; with the reason).

The worker records ``analysis_started/done/waiting/failed`` events with the study UID and
enqueues a study's outputs with the reason ``"analysis of study <uid>"`` (node.worker); both are
read here, nothing is written.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass

from node.index import Index

logger = logging.getLogger(__name__)

ANALYSIS_EVENTS = (
    "analysis_started",
    "analysis_done",
    "analysis_waiting",
    "analysis_failed",
    "analysis_requeued",
    "analysis_coalesced",
)
_PENDING = ("analysis_started", "analysis_requeued", "analysis_coalesced")
_OUTCOMES = ("analysis_done", "analysis_waiting", "analysis_failed")


@dataclass(frozen=True)
class StudyState:
    """One worklist row (no patient name, ID or birth date: ``patient_row`` only)."""

    study_uid: str
    patient_row: int | None
    study_date: str | None
    modalities: str
    n_instances: int
    state: str
    reason: str
    outbox: dict[str, int]
    last_received: float
    can_requeue: bool
    can_reanalyse: bool


def outbox_reason(study_uid: str) -> str:
    """The outbox ``reason`` the worker gives the outputs of an analysis of ``study_uid``."""
    return f"analysis of study {study_uid}"


def study_states(index: Index, *, limit: int = 500) -> list[StudyState]:
    """The worklist: studies, newest first, with their state and the reason for it."""
    studies = index.query(
        "SELECT s.study_uid, s.patient_key, s.study_date, s.state, s.last_received,"
        " (SELECT GROUP_CONCAT(DISTINCT modality) FROM series se WHERE se.study_uid=s.study_uid)"
        "  AS modalities,"
        " (SELECT COUNT(*) FROM instances i WHERE i.study_uid=s.study_uid) AS n_instances"
        " FROM studies s ORDER BY s.last_received DESC LIMIT ?",
        (limit,),
    )
    placeholders = ",".join("?" * len(ANALYSIS_EVENTS))
    latest: dict[str, sqlite3.Row] = {}
    #: latest outcome of any analysis run of each patient (a run covers all its studies)
    patient_outcome: dict[int, sqlite3.Row] = {}
    for r in index.query(
        "SELECT e.id, e.study_uid, e.kind, e.detail, s.patient_key FROM events e"
        f" JOIN studies s ON s.study_uid=e.study_uid WHERE e.kind IN ({placeholders})"
        " ORDER BY e.id",
        ANALYSIS_EVENTS,
    ):
        latest[r["study_uid"]] = r
        if r["kind"] in _OUTCOMES:
            patient_outcome[r["patient_key"]] = r
    out = []
    for s in studies:
        uid = s["study_uid"]
        boxes = index.query(
            "SELECT state, COUNT(*) AS n, MAX(last_error) AS error, MAX(tries) AS tries"
            " FROM outbox WHERE reason=? GROUP BY state",
            (outbox_reason(uid),),
        )
        counts = {b["state"]: int(b["n"]) for b in boxes}
        event = latest.get(uid)
        later = patient_outcome.get(s["patient_key"])
        if (
            event is not None
            and event["kind"] in _PENDING
            and later is not None
            and later["id"] > event["id"]
        ):
            event = later  # a request coalesced into a run triggered by another study
        reason = ""
        if s["state"] == "receiving":
            state = "receiving"
        elif event is None:
            state = "stable"
        elif event["kind"] in _PENDING:
            state = "analysing"
        elif event["kind"] == "analysis_failed":
            state, reason = "failed", f"analysis failed: {event['detail'] or ''}"
        elif event["kind"] == "analysis_waiting":
            reason = event["detail"] or ""
            state = "waiting for baseline" if "baseline" in reason.lower() else "waiting"
        elif counts.get("failed"):
            errors = [b["error"] for b in boxes if b["state"] == "failed" and b["error"]]
            state = "failed"
            reason = (
                f"sending failed: {counts['failed']} object(s) after "
                f"{max(b['tries'] for b in boxes if b['state'] == 'failed')} tries"
                + (f"; last error: {errors[0]}" if errors else "")
            )
        elif counts.get("queued") or counts.get("sending"):
            state = "sending"
            reason = f"{counts.get('queued', 0) + counts.get('sending', 0)} object(s) to send"
        elif counts.get("sent"):
            state = "sent"
        else:
            state = "analysed"
            reason = event["detail"] or ""
        out.append(
            StudyState(
                study_uid=uid,
                patient_row=s["patient_key"],
                study_date=s["study_date"],
                modalities=s["modalities"] or "",
                n_instances=int(s["n_instances"]),
                state=state,
                reason=reason,
                outbox=counts,
                last_received=float(s["last_received"]),
                can_requeue=state == "failed" and bool(counts.get("failed")),
                can_reanalyse=state not in ("receiving", "analysing"),
            )
        )
    return out


def worklist_text(index: Index, *, limit: int = 50) -> str:
    """The dashboard's worklist as plain text for ``spine-node status`` (UIDs only, no patient
    name, ID or birth date; the patient is the index's row number)."""
    states = study_states(index, limit=limit)
    if not states:
        return "No study received yet."
    lines = [f"{'study date':<10}  {'patient':>7}  {'state':<20}  study UID / reason"]
    for s in states:
        date = s.study_date or ""
        lines.append(
            f"{date:<10}  {'#' + str(s.patient_row) if s.patient_row else '':>7}  "
            f"{s.state:<20}  {s.study_uid}"
        )
        if s.reason:
            lines.append(f"{'':<43}{s.reason}")
    return "\n".join(lines)
