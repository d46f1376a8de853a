"""Expected follow-up MRI windows after treatment: due, met or missed, with notifications.

After each analysis of a patient (:func:`FollowupTracker.update_patient`, fed the same
``ChainResult.summary()`` as :func:`node.timeline.record_analysis`), the configured windows are laid
out from the course's first treatment day, e.g. 6-12 weeks, then every 3 months in year 1
(SPINO: 6-12-weekly imaging in year 1; first post-SBRT MRI typically at about 2 months;
docs/science.md §1.10). When a follow-up is called *indeterminate - possible pseudoprogression*, a
confirmation scan is due within ``confirmation_days`` of that study (6-8 weeks,
docs/science.md §1.10/§1.11).

A window is *met* by any MR study of the patient dated inside it (a confirmation window: any MR
study after the triggering one, up to its end). When a window closes without one, the window
becomes *missed*: a ``followup_missed`` event is recorded in the index and a notification is sent
(webhook and/or e-mail, :mod:`node.notify`); a failed delivery is retried at the next check.

Persistence: the windows live in this module's own tables (``followup_schema_version``
migration). APScheduler 3 jobs (one ``date`` job per due window at its closing time plus an
``interval`` catch-up job that also runs at start-up) are re-created from the table when the node
starts, so nothing is lost across a restart and no SQLAlchemy job store is needed.

The clock is injectable (tests advance it instead of waiting).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from node.config import FollowupSection
from node.index import Index
from node.notify import Notification, Notifier
from processing.dates import dicom_date

if TYPE_CHECKING:
    from apscheduler.schedulers.base import BaseScheduler

logger = logging.getLogger(__name__)

Clock = Callable[[], dt.datetime]

FOLLOWUP_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE followup_windows (
        id INTEGER PRIMARY KEY,
        patient_row INTEGER NOT NULL,
        course_uid TEXT NOT NULL,
        kind TEXT NOT NULL,
        label TEXT NOT NULL,
        opens TEXT NOT NULL,
        closes TEXT NOT NULL,
        trigger_study_uid TEXT,
        state TEXT NOT NULL DEFAULT 'due',
        met_study_uid TEXT,
        resolved REAL,
        notified REAL,
        notify_detail TEXT,
        created REAL NOT NULL,
        UNIQUE (patient_row, course_uid, kind, label)
    );
    CREATE INDEX followup_windows_state ON followup_windows(state, closes);
    """,
)
FOLLOWUP_SCHEMA_VERSION = len(FOLLOWUP_MIGRATIONS)
#: Index objects whose tables are known to be current (reads then take no write lock)


def utc_now() -> dt.datetime:
    """The real clock (timezone-aware UTC)."""
    return dt.datetime.now(dt.timezone.utc)


def ensure_schema(index: Index) -> int:
    """Create or migrate the follow-up tables; return the schema version in place."""
    return index.ensure_extension_schema("followup", FOLLOWUP_MIGRATIONS)


@dataclass(frozen=True)
class FollowupWindow:
    """One expected follow-up window of one patient and course.

    ``kind`` is ``scheduled`` (from the configured windows) or ``confirmation`` (after a possible
    pseudoprogression); ``state`` is ``due``, ``met`` (``met_study_uid``) or ``missed``.
    ``opens``/``closes`` are inclusive dates.
    """

    id: int
    patient_row: int
    course_uid: str
    kind: str
    label: str
    opens: dt.date
    closes: dt.date
    trigger_study_uid: str | None
    state: str
    met_study_uid: str | None
    notified: float | None
    notify_detail: str | None


def windows(
    index: Index, patient_row: int | None = None, *, state: str | None = None
) -> list[FollowupWindow]:
    """Recorded windows, by patient and closing date."""
    ensure_schema(index)
    rows = index.select(
        "followup_windows", "patient_row, closes, id", patient_row=patient_row, state=state
    )
    return [
        FollowupWindow(
            id=r["id"],
            patient_row=r["patient_row"],
            course_uid=r["course_uid"],
            kind=r["kind"],
            label=r["label"],
            opens=dt.date.fromisoformat(r["opens"]),
            closes=dt.date.fromisoformat(r["closes"]),
            trigger_study_uid=r["trigger_study_uid"],
            state=r["state"],
            met_study_uid=r["met_study_uid"],
            notified=r["notified"],
            notify_detail=r["notify_detail"],
        )
        for r in rows
    ]


def _mr_studies(index: Index, patient_row: int) -> list[tuple[str, dt.date]]:
    rows = index.query(
        "SELECT s.study_uid, s.study_date FROM studies s WHERE s.patient_key=?"
        " AND s.study_date IS NOT NULL AND EXISTS (SELECT 1 FROM series se"
        " WHERE se.study_uid=s.study_uid AND se.modality='MR')",
        (patient_row,),
    )
    out = []
    for r in rows:
        date = dicom_date(r["study_date"])
        if date is None:
            logger.warning("study %s: unreadable study date; ignored for follow-up", r["study_uid"])
        else:
            out.append((r["study_uid"], date))
    return out


class FollowupTracker:
    """Lays out, checks and notifies the follow-up windows; see the module docstring.

    Parameters
    ----------
    index : Index
        The node's index (the tables are created on first use).
    section : FollowupSection
        Windows, grace, notification channels.
    scheduler : apscheduler.schedulers.base.BaseScheduler, optional
        The node's scheduler (``NodeService.scheduler``); without one, call :meth:`check_due`
        yourself.
    clock : callable, optional
        Returns the current time as an aware :class:`datetime.datetime` (default: UTC now).
    notifier : Notifier, optional
        Default: built from ``section.notify``.
    """

    def __init__(
        self,
        index: Index,
        section: FollowupSection,
        scheduler: BaseScheduler | None = None,
        *,
        clock: Clock = utc_now,
        notifier: Notifier | None = None,
    ) -> None:
        self.index = index
        self.section = section
        self.scheduler = scheduler
        self.clock = clock
        self.notifier = notifier if notifier is not None else Notifier(section.notify)
        self._lock = threading.Lock()
        # one check at a time (the catch-up and a window's job may fire together)
        self._check_lock = threading.Lock()
        ensure_schema(index)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Re-create the scheduler jobs from the table (and run a catch-up check now)."""
        if self.scheduler is None or not self.section.enabled:
            return
        self.scheduler.add_job(
            self.check_due,
            "interval",
            id="followup-check",
            replace_existing=True,
            seconds=self.section.check_interval_s,
            next_run_time=dt.datetime.now(dt.timezone.utc),
            misfire_grace_time=None,
            coalesce=True,
            max_instances=1,
        )
        for window in windows(self.index, state="due"):
            self._schedule(window)

    def _schedule(self, window: FollowupWindow) -> None:
        if self.scheduler is None:
            return
        missed_from = dt.datetime.combine(
            window.closes + dt.timedelta(days=self.section.grace_days + 1),
            dt.time(0, 5),
            tzinfo=dt.timezone.utc,
        )
        # the job runs on the real clock; an injected clock is mapped by its offset
        run_at = dt.datetime.now(dt.timezone.utc) + max(missed_from - self.clock(), dt.timedelta(0))
        self.scheduler.add_job(
            self.check_due,
            "date",
            id=f"followup-window-{window.id}",
            replace_existing=True,
            run_date=run_at,
            misfire_grace_time=None,
        )

    # -- laying out windows ---------------------------------------------------------------------
    def update_patient(self, patient_row: int, summary: Mapping[str, Any]) -> list[FollowupWindow]:
        """Lay out (or update) the windows of a patient after an analysis.

        Parameters
        ----------
        patient_row : int
            The patient's row in the index.
        summary : mapping
            ``ChainResult.summary()`` (its ``course.treatment_date`` and ``time_points``).

        Returns
        -------
        list of FollowupWindow
            The patient's windows after the update.
        """
        if not self.section.enabled:
            return []
        course = summary.get("course") or {}
        course_uid = course.get("rtplan_sop_instance_uid")
        treatment = course.get("treatment_date")
        if not course_uid or not treatment:
            raise ValueError("summary has no course.rtplan_sop_instance_uid or treatment_date")
        first_day = dt.date.fromisoformat(str(treatment))
        wanted: list[tuple[str, str, dt.date, dt.date, str | None]] = [
            (
                "scheduled",
                w.label,
                first_day + dt.timedelta(days=w.start_days),
                first_day + dt.timedelta(days=w.end_days),
                None,
            )
            for w in self.section.windows
        ]
        for record in summary.get("time_points") or []:
            category = (record.get("response") or {}).get("category") or ""
            if category.startswith("indeterminate"):
                study_date = dt.date.fromisoformat(str(record["study_date"]))
                wanted.append(
                    (
                        "confirmation",
                        f"confirmation after {study_date.isoformat()}",
                        study_date + dt.timedelta(days=1),
                        study_date + dt.timedelta(days=self.section.confirmation_days),
                        record["study_instance_uid"],
                    )
                )
        created: list[int] = []
        dropped: list[int] = []
        now = self.clock().timestamp()
        with self._lock, self.index.transaction() as db:
            for kind, label, opens, closes, trigger in wanted:
                row = db.execute(
                    "SELECT id, state FROM followup_windows WHERE patient_row=? AND course_uid=?"
                    " AND kind=? AND label=?",
                    (patient_row, course_uid, kind, label),
                ).fetchone()
                if row is None:
                    cur = db.execute(
                        "INSERT INTO followup_windows (patient_row, course_uid, kind, label,"
                        " opens, closes, trigger_study_uid, created) VALUES (?,?,?,?,?,?,?,?)",
                        (
                            patient_row,
                            course_uid,
                            kind,
                            label,
                            opens.isoformat(),
                            closes.isoformat(),
                            trigger,
                            now,
                        ),
                    )
                    if kind == "confirmation":
                        created.append(int(cur.lastrowid or 0))
                elif row["state"] == "due":  # a re-estimated treatment date moves due windows
                    db.execute(
                        "UPDATE followup_windows SET opens=?, closes=? WHERE id=?",
                        (opens.isoformat(), closes.isoformat(), row["id"]),
                    )
            # due windows no longer expected (a re-analysis changed the call, or the configured
            # windows changed) are dropped; met and missed ones are history and stay
            labels = {(kind, label) for kind, label, *_ in wanted}
            for row in db.execute(
                "SELECT id, kind, label FROM followup_windows WHERE"
                " patient_row=? AND course_uid=? AND state='due'",
                (patient_row, course_uid),
            ).fetchall():
                if (row["kind"], row["label"]) not in labels:
                    db.execute("DELETE FROM followup_windows WHERE id=?", (row["id"],))
                    dropped.append(int(row["id"]))
        for window_id in dropped:
            logger.info(
                "follow-up window %d of patient row %d no longer expected: dropped",
                window_id,
                patient_row,
            )
            if (
                self.scheduler is not None
                and self.scheduler.get_job(f"followup-window-{window_id}") is not None
            ):
                self.scheduler.remove_job(f"followup-window-{window_id}")
        self.resolve_met(patient_row)
        current = windows(self.index, patient_row)
        for window in current:
            if window.state == "due":
                self._schedule(window)
            if window.id in created:
                self.index.add_event(
                    "followup_confirmation_due",
                    study_uid=window.trigger_study_uid,
                    detail=f"patient row {patient_row}: confirmation MRI due by "
                    f"{window.closes.isoformat()}",
                )
                self._notify(window, "followup_confirmation_due")
        return current

    def resolve_met(self, patient_row: int) -> int:
        """Mark due windows met by an MR study of the patient dated inside them; return how many."""
        studies = _mr_studies(self.index, patient_row)
        n = 0
        now = self.clock().timestamp()
        with self._lock, self.index.transaction() as db:
            for r in db.execute(
                "SELECT * FROM followup_windows WHERE patient_row=? AND state='due'", (patient_row,)
            ).fetchall():
                opens = dt.date.fromisoformat(r["opens"])
                closes = dt.date.fromisoformat(r["closes"]) + dt.timedelta(
                    days=self.section.grace_days
                )
                hits = sorted(
                    (d, uid)
                    for uid, d in studies
                    if opens <= d <= closes and uid != r["trigger_study_uid"]
                )
                if hits:
                    db.execute(
                        "UPDATE followup_windows SET state='met', met_study_uid=?,"
                        " resolved=? WHERE id=?",
                        (hits[0][1], now, r["id"]),
                    )
                    n += 1
        return n

    # -- checking -------------------------------------------------------------------------------
    def check_due(self) -> list[FollowupWindow]:
        """Turn windows that closed without an MR study into missed ones and notify.

        This is the scheduler jobs' function. Notifications that failed earlier are retried.

        Returns
        -------
        list of FollowupWindow
            The windows newly found missed.
        """
        with self._check_lock:
            return self._check_due()

    def _check_due(self) -> list[FollowupWindow]:
        today = self.clock().date()
        limit = (today - dt.timedelta(days=self.section.grace_days + 1)).isoformat()
        due = self.index.query(
            "SELECT DISTINCT patient_row FROM followup_windows WHERE state='due' AND closes<=?",
            (limit,),
        )
        for r in due:
            self.resolve_met(r["patient_row"])
        missed: list[FollowupWindow] = []
        now = self.clock().timestamp()
        with self._lock, self.index.transaction() as db:
            ids = [
                r["id"]
                for r in db.execute(
                    "SELECT id FROM followup_windows WHERE state='due' AND closes<=?", (limit,)
                )
            ]
            for window_id in ids:
                db.execute(
                    "UPDATE followup_windows SET state='missed', resolved=? WHERE id=?",
                    (now, window_id),
                )
        by_id = {w.id: w for w in windows(self.index)}
        for window_id in ids:
            window = by_id[window_id]
            missed.append(window)
            logger.info(
                "follow-up window %s of patient row %d (course %s) missed",
                window.label,
                window.patient_row,
                window.course_uid,
            )
            self.index.add_event(
                "followup_missed",
                study_uid=window.trigger_study_uid,
                detail=f"patient row {window.patient_row}, course {window.course_uid}: "
                f"{window.kind} window '{window.label}' {window.opens.isoformat()}.."
                f"{window.closes.isoformat()} passed without an MR study",
            )
        for window in windows(self.index, state="missed"):
            if window.notified is None:
                self._notify(window, "followup_missed")
        return missed

    def _notify(self, window: FollowupWindow, kind: str) -> None:
        if not self.notifier.channels:
            return
        if kind == "followup_missed":
            subject = f"Missed follow-up MRI: patient row {window.patient_row}, {window.label}"
            text = (
                f"The expected follow-up MRI window '{window.label}' "
                f"({window.opens.isoformat()} to {window.closes.isoformat()}) passed without "
                "an MR study."
            )
        else:
            subject = (
                f"Confirmation MRI due by {window.closes.isoformat()}: patient row "
                f"{window.patient_row}"
            )
            text = (
                "A follow-up was called indeterminate (possible pseudoprogression); a "
                f"confirmation MRI is due by {window.closes.isoformat()}."
            )
        body = (
            f"{text}\n\nPatient row: {window.patient_row} (see the node's dashboard)\n"
            f"RT course plan UID: {window.course_uid}\n"
            + (
                f"Triggering study UID: {window.trigger_study_uid}\n"
                if window.trigger_study_uid
                else ""
            )
        )
        notification = Notification(
            kind=kind,
            subject=subject,
            body=body,
            data={
                "patient_row": window.patient_row,
                "course_uid": window.course_uid,
                "window": window.label,
                "window_kind": window.kind,
                "opens": window.opens.isoformat(),
                "closes": window.closes.isoformat(),
                "trigger_study_uid": window.trigger_study_uid,
            },
        )
        deliveries = self.notifier.send(notification)
        detail = "; ".join(f"{d.channel}: {'ok' if d.ok else d.detail}" for d in deliveries)
        ok = all(d.ok for d in deliveries)
        if kind == "followup_missed":
            with self._lock, self.index.transaction() as db:
                db.execute(
                    "UPDATE followup_windows SET notified=?, notify_detail=? WHERE id=?",
                    (self.clock().timestamp() if ok else None, detail, window.id),
                )
        self.index.add_event(
            "notification_sent" if ok else "notification_failed",
            study_uid=window.trigger_study_uid,
            detail=f"{kind}: {detail}",
        )
