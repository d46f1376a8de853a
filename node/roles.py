"""Roles of a patient's MR studies relative to a treatment course (baseline, follow-up).

Pure decisions on dates, kept in ``node`` because they are the node's policy (configurable window),
not science. The same inputs give the same assignment whatever order the studies arrived in.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.dataset import Dataset

from node.errors import NodeError


class PatientMismatchError(NodeError):
    """Datasets of different patients (PatientID + IssuerOfPatientID) were offered together."""


def patient_key(ds: Dataset) -> tuple[str, str]:
    """(PatientID, IssuerOfPatientID) — the identity the node never combines across."""
    return (str(ds.get("PatientID", "") or ""), str(ds.get("IssuerOfPatientID", "") or ""))


def check_single_patient(datasets: Iterable[Dataset]) -> tuple[str, str]:
    """The one patient key of ``datasets``.

    Raises
    ------
    PatientMismatchError
        When the datasets belong to more than one patient, or one Study Instance UID carries two
        patient keys (a known PACS inconsistency that must never be merged). The message names UIDs
        only, never patient identifiers.
    """
    keys: set[tuple[str, str]] = set()
    study_keys: dict[str, tuple[str, str]] = {}
    for ds in datasets:
        key = patient_key(ds)
        keys.add(key)
        study_uid = str(ds.get("StudyInstanceUID", ""))
        if study_uid in study_keys and study_keys[study_uid] != key:
            raise PatientMismatchError(
                f"study {study_uid} holds instances of two different patients; refused"
            )
        study_keys.setdefault(study_uid, key)
    if len(keys) != 1:
        raise PatientMismatchError(
            f"the datasets belong to {len(keys)} different patients (PatientID + "
            "IssuerOfPatientID); analyse one patient at a time"
        )
    return keys.pop()


@dataclass(frozen=True)
class StudyRole:
    """Where one MR study stands relative to the treatment."""

    study_instance_uid: str
    study_date: dt.date
    #: "baseline", "follow-up", "earlier" (pre-treatment, not the baseline), "outside-window"
    role: str
    days_since_treatment: int
    reason: str


@dataclass(frozen=True)
class RoleAssignment:
    baseline: StudyRole | None
    follow_ups: tuple[StudyRole, ...]
    others: tuple[StudyRole, ...]


def assign_roles(
    studies: Iterable[tuple[str, dt.date]],
    treatment_date: dt.date,
    *,
    baseline_window_days: int = 90,
) -> RoleAssignment:
    """Assign baseline and follow-ups among a patient's MR studies.

    The baseline is the latest study dated before the treatment date and not earlier than
    ``baseline_window_days`` before it (docs/science.md §4.3: ideally ≤ 4–6 weeks); studies after
    the treatment date are follow-ups, ordered by date. A study on the treatment day itself is taken
    as pre-treatment (planning MR is acquired before the first fraction). Ties are broken by UID so
    the result never depends on arrival order.
    """
    if baseline_window_days < 0:
        raise ValueError("baseline_window_days must be >= 0")
    ordered = sorted(set(studies), key=lambda s: (s[1], s[0]))
    before = [s for s in ordered if s[1] <= treatment_date]
    after = [s for s in ordered if s[1] > treatment_date]
    baseline = None
    others: list[StudyRole] = []
    in_window = [s for s in before if (treatment_date - s[1]).days <= baseline_window_days]
    if in_window:
        uid, date = in_window[-1]
        baseline = StudyRole(
            uid,
            date,
            "baseline",
            (date - treatment_date).days,
            f"latest MR study within {baseline_window_days} days before treatment",
        )
    for uid, date in before:
        if baseline is not None and uid == baseline.study_instance_uid:
            continue
        days = (date - treatment_date).days
        if -days > baseline_window_days:
            others.append(
                StudyRole(
                    uid,
                    date,
                    "outside-window",
                    days,
                    f"{-days} days before treatment, outside the "
                    f"{baseline_window_days}-day baseline window",
                )
            )
        else:
            others.append(
                StudyRole(uid, date, "earlier", days, "a later pre-treatment study exists")
            )
    follow_ups = tuple(
        StudyRole(uid, date, "follow-up", (date - treatment_date).days, "after treatment")
        for uid, date in after
    )
    return RoleAssignment(baseline, follow_ups, tuple(others))
