"""Stable-study detection: a study is handed on after a quiet period without new instances.

Every newly stored instance moves its study's deadline (now + quiet period); an APScheduler
one-shot job keyed by the Study Instance UID fires at the deadline it was armed for and, when
instances arrived since, re-arms itself for the new deadline instead of rescheduling on every
instance (a reschedule wakes the scheduler's thread: ~5 % of the receive path's time with one
association). When the quiet period has really passed, the index marks the study ``stable`` (or
records it as ``amended`` when it had already been stable once) and the registered listeners are
called with ``(study_uid, amended)``.
Later parts of the node (the analysis) register a listener with
:meth:`StabilityMonitor.add_listener` instead of editing this module. Studies still ``receiving``
in the index at start-up are re-armed, so a restart loses no pending study.

References
----------
Orthanc ``StableAge`` / ``OnStableStudy``; dcmtk storescp ``--eostudy-timeout``; mercure's
series-complete trigger (``docs/peers.md``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.base import BaseScheduler

from node.index import Index

logger = logging.getLogger(__name__)

StableListener = Callable[[str, bool], None]


class StabilityMonitor:
    """Arms one one-shot job per receiving study; calls listeners when it becomes stable.

    Parameters
    ----------
    index : Index
        The node's index (study states, events).
    scheduler : apscheduler.schedulers.base.BaseScheduler
        A started (or to-be-started) scheduler; jobs run in its thread pool.
    quiet_period_s : float
        Seconds without a new instance after which a study is stable.
    on_stable : callable, optional
        A first listener ``on_stable(study_uid, amended)``.
    """

    def __init__(
        self,
        index: Index,
        scheduler: BaseScheduler,
        *,
        quiet_period_s: float,
        on_stable: StableListener | None = None,
    ) -> None:
        if quiet_period_s <= 0:
            raise ValueError(f"quiet_period_s must be > 0 s, got {quiet_period_s}")
        self.index = index
        self.scheduler = scheduler
        self.quiet_period_s = float(quiet_period_s)
        self._listeners: list[StableListener] = []
        self._lock = threading.Lock()
        #: per study: the deadline (UTC) set by the last instance, and the one its job is armed for
        self._deadline: dict[str, datetime] = {}
        self._armed: dict[str, datetime] = {}
        if on_stable is not None:
            self.add_listener(on_stable)

    def add_listener(self, listener: StableListener) -> None:
        """Register ``listener(study_uid, amended)``, called in a scheduler worker thread."""
        with self._lock:
            self._listeners.append(listener)

    @staticmethod
    def job_id(study_uid: str) -> str:
        """The scheduler job id of a study."""
        return f"stable:{study_uid}"

    def touch(self, study_uid: str, *, delay_s: float | None = None) -> None:
        """Move the study's quiet-period deadline to now + ``delay_s`` (default: the quiet period);
        called for every newly stored instance.

        The scheduler is only touched when no job is armed for the study or the new deadline is
        earlier than the armed one; a later deadline is picked up by the job when it fires.
        """
        delay = self.quiet_period_s if delay_s is None else max(0.0, delay_s)
        deadline = datetime.now(timezone.utc) + timedelta(seconds=delay)
        with self._lock:
            self._deadline[study_uid] = deadline
            armed = self._armed.get(study_uid)
            if armed is not None and armed <= deadline:
                return
            self._armed[study_uid] = deadline
        self._arm(study_uid, deadline)

    def _arm(self, study_uid: str, run_date: datetime) -> None:
        job_id = self.job_id(study_uid)
        try:
            self.scheduler.reschedule_job(job_id, trigger="date", run_date=run_date)
        except JobLookupError:
            self.scheduler.add_job(
                self._fire,
                "date",
                run_date=run_date,
                args=[study_uid],
                id=job_id,
                replace_existing=True,
                # 2: the job a firing one re-arms (or one armed by an instance arriving while the
                # listeners run) may come due before the running one has been counted out; with
                # 1 APScheduler would skip it, and the study would never be handed on
                max_instances=2,
                coalesce=True,
                misfire_grace_time=None,
            )

    def rearm_pending(self) -> int:
        """Re-arm every study the index still lists as receiving (start-up); returns the count.

        Each gets a full quiet period from now, since instances may still be on their way.
        """
        pending = self.index.receiving_studies()
        for study_uid, _last in pending:
            self.touch(study_uid)
        if pending:
            logger.info("re-armed %d study(ies) still receiving at start-up", len(pending))
        return len(pending)

    def _fire(self, study_uid: str) -> None:
        with self._lock:
            deadline = self._deadline.get(study_uid)
            if deadline is not None and deadline > datetime.now(timezone.utc):
                # instances arrived after the job was armed: wait for the new deadline (a new
                # job: this one is being run and ends with this call)
                self._armed[study_uid] = deadline
                rearm = True
            else:
                self._deadline.pop(study_uid, None)
                self._armed.pop(study_uid, None)
                rearm = False
        if rearm:
            assert deadline is not None
            self._arm(study_uid, deadline)
            return
        amended = self.index.mark_stable(study_uid)
        if amended is None:
            return
        logger.info("study %s is stable%s", study_uid, " (amended)" if amended else "")
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(study_uid, amended)
            except Exception:
                # one failing consumer must not stop the others; the study stays recorded stable
                logger.exception(
                    "stable-study listener %r failed for study %s",
                    getattr(listener, "__name__", listener),
                    study_uid,
                )
                self.index.add_event(
                    "listener_failed",
                    study_uid=study_uid,
                    detail=getattr(listener, "__name__", repr(listener)),
                )
