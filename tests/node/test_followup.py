"""Follow-up windows (issue 9, acceptance 2): a window passing without an MR study (the clock is
advanced, not waited for) records ``followup_missed`` and delivers the webhook and the e-mail to
local receivers; the schedule survives a restart of the node (new index connection, new
APScheduler scheduler re-created from the table)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from apscheduler.schedulers.background import BackgroundScheduler

from node.config import DEFAULT_WINDOWS, FollowupSection, NotifySettings
from node.followup import FollowupTracker, windows
from node.index import Index, NewInstance
from tests.node.dicom_factory import BIRTH_DATE, PATIENT_ID, PATIENT_NAME, PHI_TOKENS
from tests.node.test_notify import HttpReceiver, SmtpReceiver, http_receiver, smtp_receiver
from tests.node.test_timeline import STUDIES, TREATMENT, VALUES, build_summary

__all__ = ["http_receiver", "smtp_receiver"]  # fixtures used here


class FakeClock:
    """An injectable clock the test moves forward."""

    def __init__(self, start: dt.date) -> None:
        self.now = dt.datetime.combine(start, dt.time(9, 0), tzinfo=dt.timezone.utc)

    def __call__(self) -> dt.datetime:
        return self.now

    def set(self, day: dt.date) -> None:
        assert day >= self.now.date()
        self.now = dt.datetime.combine(day, dt.time(9, 0), tzinfo=dt.timezone.utc)


def add_mr_study(index: Index, study_uid: str, date: dt.date, *, modality: str = "MR") -> None:
    """Index one instance of an MR study of the test patient (patient row 1), who carries the
    suite's seeded identifiers (tests.node.dicom_factory.PHI_TOKENS, checked in every log)."""
    index.add_instance(
        NewInstance(
            sop_instance_uid=f"{study_uid}.1.1",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
            series_uid=f"{study_uid}.1",
            study_uid=study_uid,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            path=f"/nonexistent/{study_uid}.dcm",
            size=1,
            sha256="0",
            calling_ae="STORESCU",
            association_id=None,
            patient_id=PATIENT_ID,
            issuer_of_patient_id="",
            patient_name=PATIENT_NAME,
            birth_date=BIRTH_DATE,
            study_date=date.strftime("%Y%m%d"),
            accession_number="",
            modality=modality,
            series_number=1,
            series_description="T1",
        )
    )


@pytest.fixture
def scheduler() -> Iterator[BackgroundScheduler]:
    sched = BackgroundScheduler(timezone=dt.timezone.utc)
    sched.start()
    yield sched
    if sched.running:
        sched.shutdown(wait=True)


def _section(http: HttpReceiver, smtp_port: int) -> FollowupSection:
    return FollowupSection(
        notify=NotifySettings(
            webhook_url=http.url,
            smtp_host="127.0.0.1",
            smtp_port=smtp_port,
            mail_from="node@test",
            mail_to=("oncology@test",),
        )
    )


def _date(days: int) -> dt.date:
    return TREATMENT + dt.timedelta(days=days)


def test_windows_laid_out_from_treatment_and_met_by_studies(tmp_path: Path) -> None:
    index = Index(tmp_path / "index.sqlite3")
    for uid, days in STUDIES[:2]:
        add_mr_study(index, uid, _date(days))
    tracker = FollowupTracker(index, FollowupSection(), clock=FakeClock(_date(75)))
    tracker.update_patient(1, build_summary(VALUES[:2], STUDIES[:2]))
    by_label = {w.label: w for w in windows(index, 1)}
    for setting in DEFAULT_WINDOWS:
        window = by_label[setting.label]
        assert (window.opens, window.closes) == (_date(setting.start_days), _date(setting.end_days))
    # the day-70 study lies in 6-12 weeks (42..84 d)
    assert by_label["6-12 weeks"].state == "met"
    assert by_label["6-12 weeks"].met_study_uid == STUDIES[1][0]
    # the day-70 call is possible pseudoprogression: confirmation due within 56 days of it
    confirmation = by_label[f"confirmation after {_date(70).isoformat()}"]
    assert confirmation.kind == "confirmation" and confirmation.state == "due"
    assert (confirmation.opens, confirmation.closes) == (_date(71), _date(70 + 56))
    assert confirmation.trigger_study_uid == STUDIES[1][0]
    assert [e["kind"] for e in index.events("followup_confirmation_due")] == [
        "followup_confirmation_due"
    ]
    # a study inside the window (and a non-MR one) only the MR one meets it
    add_mr_study(index, "2.25.2001", _date(100), modality="CT")
    assert tracker.resolve_met(1) == 0
    add_mr_study(index, "2.25.2002", _date(110))
    assert tracker.resolve_met(1) == 1
    assert {w.label: w.state for w in windows(index, 1)}[confirmation.label] == "met"


def test_missed_window_recorded_notified_and_survives_restart(
    tmp_path: Path,
    http_receiver: HttpReceiver,
    smtp_receiver: tuple[SmtpReceiver, int],
    scheduler: BackgroundScheduler,
) -> None:
    smtp, smtp_port = smtp_receiver
    path = tmp_path / "index.sqlite3"
    index = Index(path)
    for uid, days in STUDIES[:2]:
        add_mr_study(index, uid, _date(days))
    clock = FakeClock(_date(72))
    section = _section(http_receiver, smtp_port)
    tracker = FollowupTracker(index, section, scheduler, clock=clock)
    tracker.start()
    tracker.update_patient(1, build_summary(VALUES[:2], STUDIES[:2]))
    # the confirmation scan due is announced at once
    assert http_receiver.requests[-1]["json"]["kind"] == "followup_confirmation_due"
    assert smtp.messages[-1]["message"]["X-Spine-Node-Kind"] == "followup_confirmation_due"
    # one APScheduler job per due window, plus the catch-up check
    due = windows(index, state="due")
    assert {j.id for j in scheduler.get_jobs()} == {"followup-check"} | {
        f"followup-window-{w.id}" for w in due
    }
    n_http, n_mail = len(http_receiver.requests), len(smtp.messages)

    # nothing missed yet
    assert tracker.check_due() == []
    # advance past the confirmation window (day 126, + 1 day): no MR study since day 70
    clock.set(_date(127))
    missed = tracker.check_due()
    assert [w.kind for w in missed] == ["confirmation"]
    events = index.events("followup_missed")
    assert len(events) == 1 and events[0]["study_uid"] == STUDIES[1][0]
    assert "passed without an MR study" in events[0]["detail"]
    hook = http_receiver.requests[n_http]["json"]
    assert hook["kind"] == "followup_missed" and hook["window_kind"] == "confirmation"
    assert hook["closes"] == _date(126).isoformat() and hook["patient_row"] == 1
    mail = smtp.messages[n_mail]["message"]
    assert mail["Subject"].startswith("Missed follow-up MRI: patient row 1")
    assert smtp.messages[n_mail]["to"] == ["oncology@test"]
    # no patient identifier leaves the node in a notification
    for text in (str(hook), mail.as_string()):
        assert not [token for token in PHI_TOKENS if token in text]
    assert windows(index, state="missed")[0].notified is not None
    # a second check does not notify twice
    assert tracker.check_due() == []
    assert len(http_receiver.requests) == n_http + 1 and len(smtp.messages) == n_mail + 1

    # node stops; the 6-months window (days 152..213) passes while it is down
    scheduler.shutdown(wait=True)
    index.close()
    clock.set(_date(215))
    http_receiver.received.clear()
    smtp.received.clear()
    index = Index(path)
    restarted = BackgroundScheduler(timezone=dt.timezone.utc)
    restarted.start()
    try:
        tracker = FollowupTracker(index, section, restarted, clock=clock)
        tracker.start()  # jobs re-created from the table; the catch-up check runs now
        assert http_receiver.received.wait(15) and smtp.received.wait(15)
        labels = {w.label: w.state for w in windows(index, 1)}
        assert labels["6 months"] == "missed"
        assert labels["9 months"] == "due" and labels["12 months"] == "due"
        assert len(index.events("followup_missed")) == 2
        assert http_receiver.requests[-1]["json"]["window"] == "6 months"
        assert {f"followup-window-{w.id}" for w in windows(index, state="due")} <= {
            j.id for j in restarted.get_jobs()
        }
    finally:
        restarted.shutdown(wait=True)


def test_window_job_fires_on_the_scheduler(
    tmp_path: Path,
    http_receiver: HttpReceiver,
    smtp_receiver: tuple[SmtpReceiver, int],
    scheduler: BackgroundScheduler,
) -> None:
    """The per-window date job runs when (injected) time reaches the window's end."""
    _, smtp_port = smtp_receiver
    index = Index(tmp_path / "index.sqlite3")
    add_mr_study(index, STUDIES[0][0], _date(-5))
    summary = build_summary(VALUES[:1], STUDIES[:1])
    # the 6-12 weeks window is missed from day 85 on; the clock stands 3 s before that moment
    clock = FakeClock(_date(84))
    clock.now = dt.datetime.combine(
        _date(85), dt.time(0, 5), tzinfo=dt.timezone.utc
    ) - dt.timedelta(seconds=3)
    tracker = FollowupTracker(index, _section(http_receiver, smtp_port), scheduler, clock=clock)
    tracker.update_patient(1, summary)
    (first,) = [w for w in windows(index) if w.label == "6-12 weeks"]
    job = scheduler.get_job(f"followup-window-{first.id}")
    lead = (job.next_run_time - dt.datetime.now(dt.timezone.utc)).total_seconds()
    assert 0 < lead <= 3.5
    clock.now += dt.timedelta(seconds=4)  # what the job sees when it fires
    assert http_receiver.received.wait(15)
    assert http_receiver.requests[-1]["json"]["window"] == "6-12 weeks"
    assert {w.label: w.state for w in windows(index)}["6-12 weeks"] == "missed"


def test_failed_notification_is_retried(tmp_path: Path, http_receiver: HttpReceiver) -> None:
    index = Index(tmp_path / "index.sqlite3")
    add_mr_study(index, STUDIES[0][0], _date(-5))
    clock = FakeClock(_date(0))
    section = FollowupSection(notify=NotifySettings(webhook_url=http_receiver.url))
    tracker = FollowupTracker(index, section, clock=clock)
    tracker.update_patient(1, build_summary(VALUES[:1], STUDIES[:1]))
    http_receiver.status = 500
    clock.set(_date(90))
    assert len(tracker.check_due()) == 1
    (window,) = windows(index, state="missed")
    assert window.notified is None and "HTTP 500" in (window.notify_detail or "")
    assert len(index.events("notification_failed")) == 1
    http_receiver.status = 200
    assert tracker.check_due() == []
    (window,) = windows(index, state="missed")
    assert window.notified is not None
    assert [r["json"]["window"] for r in http_receiver.requests] == ["6-12 weeks"] * 2


def test_section_validation() -> None:
    with pytest.raises(ValueError, match="end_days"):
        FollowupSection(windows=[{"label": "x", "start_days": 10, "end_days": 5}])
    with pytest.raises(ValueError, match="unique"):
        FollowupSection(windows=[{"label": "x", "start_days": 1, "end_days": 5}] * 2)


def test_reanalysis_that_changes_the_call_drops_the_confirmation_window(
    tmp_path: Path, scheduler: BackgroundScheduler
) -> None:
    index = Index(tmp_path / "index.sqlite3")
    for uid, days in STUDIES[:2]:
        add_mr_study(index, uid, _date(days))
    tracker = FollowupTracker(index, FollowupSection(), scheduler, clock=FakeClock(_date(75)))
    tracker.update_patient(1, build_summary(VALUES[:2], STUDIES[:2]))
    (confirmation,) = [w for w in windows(index) if w.kind == "confirmation"]
    assert scheduler.get_job(f"followup-window-{confirmation.id}") is not None
    # a corrected baseline makes the day-70 growth small: no pseudoprogression call any more
    corrected = ((11.4, 0.90e-3, 0.120, 0.080), VALUES[1])
    summary = build_summary(corrected, STUDIES[:2])
    assert summary["time_points"][1]["response"]["category"] == "local control"
    tracker.update_patient(1, summary)
    assert [w.kind for w in windows(index)] == ["scheduled"] * len(DEFAULT_WINDOWS)
    assert scheduler.get_job(f"followup-window-{confirmation.id}") is None


def test_followup_section_from_the_node_configuration(tmp_path: Path) -> None:
    from node.config import ConfigError, load_settings

    config = tmp_path / "node.toml"
    config.write_text(f"""
[node]
storage = "{tmp_path / "storage"}"

[followup]
confirmation_days = 42
grace_days = 7

[[followup.windows]]
label = "8 weeks"
start_days = 42
end_days = 70

[[followup.windows]]
label = "3 months"
start_days = 80
end_days = 110

[followup.notify]
webhook_url = "http://127.0.0.1:9/hook"
smtp_host = "127.0.0.1"
mail_to = ["oncology@example.org"]
""")
    section = load_settings(config).followup
    assert [w.label for w in section.windows] == ["8 weeks", "3 months"]
    assert section.confirmation_days == 42 and section.grace_days == 7
    assert section.notify.mail_to == ("oncology@example.org",)
    config.write_text(config.read_text().replace("end_days = 110", "end_days = 10"))
    with pytest.raises(ConfigError, match="end_days"):
        load_settings(config)
