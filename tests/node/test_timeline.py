"""Timeline (issue 9, acceptance 1): three time points in order with days since treatment and
deltas; a corrected baseline recomputes every later delta and call.

These tests record summaries built from :class:`processing.results.TimePointResult` objects whose
changes and calls come from the real ``processing.change.compute_changes`` and
``processing.response.assess_response``, summarised by the real
``reporting.summary.summary_records`` exactly as ``ChainResult.summary()`` does, so that every case
(a changed value, a replaced study, outbox states, schema versions) is quick to set up. The same
acceptance through the running node and the real chain on a three-time-point phantom, with the
baseline corrected by an IHE IOCM rejection note, is ``tests/e2e/test_node_roundtrip.py``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from node.index import Index
from node.timeline import (
    TIMELINE_SCHEMA_VERSION,
    TimelineError,
    courses,
    ensure_schema,
    record_analysis,
    timeline,
    timeline_text,
)
from processing.change import compute_changes
from processing.response import assess_response
from processing.results import (
    Lesion,
    LesionMeasurements,
    MapStatistics,
    TimePointResult,
    TimePointRole,
)
from reporting.summary import summary_records

TREATMENT = dt.date(2025, 2, 6)
COURSE_UID = "2.25.111"
TRACKING_UID = "2.25.222"
#: baseline 5 days before treatment, ~10 weeks and ~6 months after
STUDIES = (("2.25.1001", -5), ("2.25.1002", 70), ("2.25.1003", 182))
#: (volume mL, ADC mm²/s, Ktrans /min, vp) per time point: a responder
VALUES = (
    (10.0, 0.90e-3, 0.120, 0.080),
    (11.5, 1.10e-3, 0.060, 0.030),
    (8.0, 1.25e-3, 0.050, 0.025),
)


def _stats(quantity: str, unit: str, value: float) -> MapStatistics:
    return MapStatistics(
        quantity=quantity,
        unit=unit,
        n_voxels=500,
        mean=value,
        median=value,
        sd=0.1 * value,
        p10=0.9 * value,
        p90=1.1 * value,
    )


def _measurements(volume: float, adc: float, ktrans: float, vp: float) -> LesionMeasurements:
    return LesionMeasurements(
        volume_ml=volume,
        max_axial_diameter_mm=20.0,
        map_statistics={
            "ADC": _stats("ADC", "mm2/s", adc),
            "Ktrans": _stats("Ktrans", "/min", ktrans),
            "vp": _stats("vp", "1", vp),
        },
    )


def build_summary(
    values: tuple[tuple[float, float, float, float], ...] = VALUES,
    studies: tuple[tuple[str, int], ...] = STUDIES,
) -> dict[str, Any]:
    """A ``ChainResult.summary()``-shaped dict for one lesion over ``studies``."""
    lesion = Lesion(tracking_id="GTV L2", tracking_uid=TRACKING_UID, vertebral_level="L2")
    repeatability = {"ADC.mean": 0.12, "Ktrans.mean": 0.25, "vp.mean": 0.30}
    measurements = [_measurements(*v) for v in values]
    results = []
    previous_call = None
    for i, ((study_uid, days), m) in enumerate(zip(studies, measurements)):
        date = (TREATMENT + dt.timedelta(days=days)).strftime("%Y%m%d")
        if i == 0:
            results.append(
                TimePointResult(lesion, TimePointRole.BASELINE, study_uid, date, days, m)
            )
            continue
        changes = compute_changes(
            m, measurements[0], measurements[i - 1] if i > 1 else None, repeatability=repeatability
        )
        response = assess_response(
            changes, days_since_treatment=days, previous_category=previous_call
        )
        previous_call = response.category
        results.append(
            TimePointResult(
                lesion,
                TimePointRole.FOLLOW_UP,
                study_uid,
                date,
                days,
                m,
                changes=changes,
                response=response,
            )
        )
    outputs = [
        {
            "modality": modality,
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.66.4",
            "sop_instance_uid": f"{study_uid}.9{k}",
            "series_instance_uid": f"{study_uid}.8",
            "study_instance_uid": study_uid,
            "series_description": modality,
        }
        for study_uid, _ in studies
        for k, modality in enumerate(("SEG", "SR"))
    ]
    return {
        "algorithm_version": "test",
        "course": {
            "rtplan_sop_instance_uid": COURSE_UID,
            "treatment_date": TREATMENT.isoformat(),
            "treatment_date_estimated": False,
            "fractions": 3,
            "prescription_dose_gy": 27.0,
            "bed10_gy": 51.3,
        },
        "time_points": summary_records(results),
        "outputs": outputs,
    }


def test_three_time_points_in_order_with_days_and_deltas(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    outcome = record_analysis(index, 1, build_summary())
    assert outcome.n_points == 3
    assert outcome.changed_studies == tuple(uid for uid, _ in STUDIES)
    points = timeline(index, 1)
    assert [p.study_instance_uid for p in points] == [uid for uid, _ in STUDIES]
    assert [p.days_since_treatment for p in points] == [-5, 70, 182]
    assert [p.study_date for p in points] == [TREATMENT + dt.timedelta(days=d) for _, d in STUDIES]
    assert [p.role for p in points] == ["baseline", "follow-up", "follow-up"]
    assert [p.volume_ml for p in points] == [10.0, 11.5, 8.0]
    assert points[0].change("volume") is None
    assert points[1].change("volume")["relative"] == pytest.approx(0.15)
    assert points[2].change("volume")["relative"] == pytest.approx(-0.20)
    assert points[2].change("volume", "previous")["relative"] == pytest.approx(8.0 / 11.5 - 1)
    assert points[2].change("vp.mean")["relative"] == pytest.approx(0.025 / 0.080 - 1)
    assert points[2].change("vp.mean")["beyond_repeatability"] is True
    assert points[0].response_category is None
    # +15 % within the pseudoprogression window with perfusion falling: indeterminate
    assert points[1].response_category == "indeterminate - possible pseudoprogression"
    assert points[2].response_category == "local control"
    assert [len(p.outputs) for p in points] == [2, 2, 2]
    assert all(o["state"] is None for p in points for o in p.outputs)  # not queued
    assert courses(index)[0]["treatment_date"] == TREATMENT.isoformat()
    text = timeline_text(index, 1)
    assert "day +70 follow-up volume 11.50 mL (+15 %*)" in text
    assert "day +182 follow-up volume 8.00 mL (-20 %*)" in text
    assert "GTV L2 (L2)" in text


def test_corrected_baseline_recomputes_later_deltas(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    record_analysis(index, 1, build_summary())
    corrected = ((12.0, 0.90e-3, 0.120, 0.080),) + VALUES[1:]
    outcome = record_analysis(index, 1, build_summary(corrected))
    # the baseline's own values and both follow-ups' deltas changed; nothing removed
    assert set(outcome.changed_studies) == {uid for uid, _ in STUDIES}
    assert outcome.removed_studies == ()
    points = timeline(index, 1)
    assert len(points) == 3
    assert points[0].volume_ml == 12.0
    assert points[1].change("volume")["relative"] == pytest.approx(11.5 / 12.0 - 1)
    assert points[2].change("volume")["relative"] == pytest.approx(8.0 / 12.0 - 1)
    assert points[2].change("volume", "previous")["relative"] == pytest.approx(8.0 / 11.5 - 1)
    # the same run again changes nothing
    assert record_analysis(index, 1, build_summary(corrected)).changed_studies == ()


def test_replaced_baseline_study_drops_the_old_time_point(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    record_analysis(index, 1, build_summary())
    studies = (("2.25.1009", -3),) + STUDIES[1:]
    outcome = record_analysis(index, 1, build_summary(studies=studies))
    assert outcome.removed_studies == ("2.25.1001",)
    assert [p.study_instance_uid for p in timeline(index, 1)] == [
        "2.25.1009",
        "2.25.1002",
        "2.25.1003",
    ]


def test_outputs_show_their_outbox_state(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    record_analysis(index, 1, build_summary())
    with index.transaction() as db:
        db.execute(
            "INSERT INTO outbox (path, sop_instance_uid, sop_class_uid, destination,"
            " reason, state, tries, next_attempt, created, updated)"
            " VALUES ('x', '2.25.1003.90', '1.2', 'PACS', 'r', 'sent', 1, 0, 0, 0)"
        )
    last = timeline(index, 1)[-1]
    states = {o["sop_instance_uid"]: o["state"] for o in last.outputs}
    assert states == {"2.25.1003.90": "sent", "2.25.1003.91": None}
    assert "2 objects (1 sent)" in timeline_text(index, 1)


def test_schema_is_versioned_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    index = Index(path)
    assert ensure_schema(index) == TIMELINE_SCHEMA_VERSION
    record_analysis(index, 1, build_summary())
    index.close()
    index = Index(path)
    assert ensure_schema(index) == TIMELINE_SCHEMA_VERSION
    assert (
        index.query("SELECT version FROM timeline_schema_version")[0][0] == TIMELINE_SCHEMA_VERSION
    )
    assert len(timeline(index)) == 3
    with index.transaction() as db:
        db.execute("UPDATE timeline_schema_version SET version=99")
    index.close()
    with pytest.raises(TimelineError, match="newer than this node"):
        ensure_schema(Index(path))


def test_summary_without_course_is_refused(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    summary = build_summary()
    summary["course"] = {}
    with pytest.raises(TimelineError, match="rtplan_sop_instance_uid"):
        record_analysis(index, 1, summary)


def test_on_analysis_done_reads_summary_json_and_lays_out_followups(tmp_path: Path) -> None:
    import json

    from node.followup import FollowupSection, FollowupTracker, windows
    from node.timeline import on_analysis_done

    index = Index(tmp_path / "index.sqlite3")
    path = tmp_path / "results" / "patient-1" / "summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(build_summary()), encoding="utf-8")
    tracker = FollowupTracker(
        index, FollowupSection(), clock=lambda: dt.datetime(2025, 8, 10, tzinfo=dt.timezone.utc)
    )
    outcome = on_analysis_done(index, 1, path, followups=tracker)
    assert outcome.n_points == 3 and len(timeline(index, 1)) == 3
    assert {w.label for w in windows(index, 1)} >= {
        "6-12 weeks",
        "6 months",
        "confirmation after 2025-04-17",
    }
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TimelineError, match="JSON object"):
        on_analysis_done(index, 1, path)
