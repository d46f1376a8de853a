"""Baseline/follow-up assignment: independent of arrival order, never across patients."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest
from pydicom.dataset import Dataset

from node.roles import PatientMismatchError, assign_roles, check_single_patient

TREATMENT = dt.date(2026, 3, 10)
STUDIES = [
    ("1.2.3.1", dt.date(2025, 6, 1)),  # too old
    ("1.2.3.2", dt.date(2026, 2, 1)),  # earlier pre-treatment
    ("1.2.3.3", dt.date(2026, 3, 2)),  # baseline
    ("1.2.3.4", dt.date(2026, 5, 19)),  # follow-up 1 (70 days)
    ("1.2.3.5", dt.date(2026, 9, 10)),  # follow-up 2
]


@pytest.mark.parametrize("order", list(itertools.permutations(range(5)))[::17])
def test_assignment_does_not_depend_on_arrival_order(order):
    roles = assign_roles([STUDIES[i] for i in order], TREATMENT, baseline_window_days=90)
    assert roles.baseline.study_instance_uid == "1.2.3.3"
    assert roles.baseline.days_since_treatment == -8
    assert [f.study_instance_uid for f in roles.follow_ups] == ["1.2.3.4", "1.2.3.5"]
    assert roles.follow_ups[0].days_since_treatment == 70
    assert {o.study_instance_uid: o.role for o in roles.others} == {
        "1.2.3.1": "outside-window",
        "1.2.3.2": "earlier",
    }


def test_no_baseline_inside_window():
    roles = assign_roles(STUDIES[:1] + STUDIES[3:], TREATMENT, baseline_window_days=30)
    assert roles.baseline is None
    assert len(roles.follow_ups) == 2


def _ds(patient_id, issuer, study):
    ds = Dataset()
    ds.PatientID, ds.StudyInstanceUID = patient_id, study
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    return ds


def test_same_study_uid_with_two_patient_ids_is_refused():
    with pytest.raises(PatientMismatchError, match="two different patients"):
        check_single_patient([_ds("A1", "H", "1.2.9"), _ds("B2", "H", "1.2.9")])


def test_baseline_with_a_different_issuer_is_refused():
    with pytest.raises(PatientMismatchError, match="2 different patients"):
        check_single_patient([_ds("A1", "HOSP-A", "1.2.9"), _ds("A1", "HOSP-B", "1.2.10")])


def test_single_patient_key():
    assert check_single_patient([_ds("A1", None, "1.2.9"), _ds("A1", None, "1.2.10")]) == ("A1", "")
