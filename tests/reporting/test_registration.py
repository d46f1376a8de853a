"""Spatial Registration object: dciodvfy, matrix read back, references, deterministic UIDs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from reporting.registration import build_spatial_registration, registration_matrix
from tests.reporting.sources import FOLLOW_UP_STUDY_UID, STUDY_UID, classic_mr_series
from tests.reporting.tools import dciodvfy

FOLLOW_UP_FOR = "1.2.826.0.1.3680043.8.498.10004"


def _rigid(angle_deg: float, translation: tuple[float, float, float]) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    matrix = np.eye(4)
    matrix[:3, :3] = [[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0, 0, 1.0]]
    matrix[:3, 3] = translation
    return matrix


def _series() -> tuple[list, list]:
    baseline = classic_mr_series(study_uid=STUDY_UID, series_uid="1.2.826.0.1.3680043.8.498.40001")
    follow_up = classic_mr_series(
        study_uid=FOLLOW_UP_STUDY_UID,
        series_uid="1.2.826.0.1.3680043.8.498.40002",
        study_date="20260420",
        frame_of_reference_uid=FOLLOW_UP_FOR,
    )
    return baseline, follow_up


def test_spatial_registration_round_trip(tmp_path: Path) -> None:
    baseline, follow_up = _series()
    matrix = _rigid(3.5, (2.25, -1.5, 4.0))
    reg = build_spatial_registration(baseline, follow_up, matrix, algorithm_version="0.1.0")
    path = tmp_path / "reg.dcm"
    reg.save_as(path, enforce_file_format=True)
    dciodvfy(path)

    back = dcmread(path)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.1"
    assert back.Modality == "REG"
    assert back.StudyInstanceUID == FOLLOW_UP_STUDY_UID
    assert back.FrameOfReferenceUID == baseline[0].FrameOfReferenceUID
    np.testing.assert_allclose(registration_matrix(back, FOLLOW_UP_FOR), matrix, atol=1e-9)
    np.testing.assert_allclose(
        registration_matrix(back, baseline[0].FrameOfReferenceUID), np.eye(4)
    )
    refs = {
        r.ReferencedSOPInstanceUID
        for item in back.RegistrationSequence
        for r in item.ReferencedImageSequence
    }
    assert refs == {ds.SOPInstanceUID for ds in baseline + follow_up}
    other = back.StudiesContainingOtherReferencedInstancesSequence[0]
    assert other.StudyInstanceUID == STUDY_UID


def test_spatial_registration_uids_and_validation() -> None:
    baseline, follow_up = _series()
    matrix = _rigid(1.0, (0.5, 0.0, 0.0))
    first = build_spatial_registration(baseline, follow_up, matrix, algorithm_version="0.1.0")
    again = build_spatial_registration(baseline, follow_up, matrix, algorithm_version="0.1.0")
    newer = build_spatial_registration(baseline, follow_up, matrix, algorithm_version="0.2.0")
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    assert newer.SOPInstanceUID != first.SOPInstanceUID
    scaled = matrix.copy()
    scaled[:3, :3] *= 1.1
    with pytest.raises(ValueError, match="not rigid"):
        build_spatial_registration(baseline, follow_up, scaled, algorithm_version="0.1.0")
    with pytest.raises(ValueError, match="share one Frame of Reference"):
        build_spatial_registration(baseline, baseline, matrix, algorithm_version="0.1.0")
