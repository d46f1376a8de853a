"""The running node: index, store, scheduler, stability monitor, outbox dispatcher and listener.

:class:`NodeService` is the composition root: it builds every component from one
:class:`~node.config.Settings` object, owns it (starts and stops it) and hands each component
the collaborators it uses, typed by the protocols of :mod:`node.protocols`. No component is
found through a module-level registry. Components plug into each other through these
attributes, e.g. ``service.stability.add_listener(on_stable)`` for the analysis,
``service.outbox.enqueue(paths, destination, reason)`` to send results and
``service.priors.on_analysis_waiting(...)`` when an analysis waits for priors.
"""

from __future__ import annotations

import getpass
import logging
import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from node.audit import (
    APPLICATION_ACTIVITY,
    APPLICATION_START,
    APPLICATION_STOP,
    ROLE_APPLICATION_LAUNCHER,
    Code,
    Participant,
    open_audit_trail,
)
from node.config import Settings
from node.dashboard import DashboardServer, reanalyse_action, start_dashboard
from node.dispatch import Dispatcher, Outbox
from node.errors import IndexDatabaseError
from node.followup import FollowupTracker
from node.index import Index, damaged_message, recovery_hint
from node.priors import PriorsFetcher, pacs_peer
from node.scp import StorageSCP
from node.stability import StabilityMonitor
from node.store import Store, StoreResult
from node.worker import AnalysisWorker

logger = logging.getLogger(__name__)


def _holds_files(folder: Path) -> bool:
    """Whether ``folder`` (``instances/`` of a store) holds at least one file (stops at the
    first one found)."""
    if not folder.is_dir():
        return False
    for _dirpath, _dirnames, filenames in os.walk(folder):
        if filenames:
            return True
    return False


def open_checked_index(database_path: Path, storage: Path) -> Index:
    """Open the index for ``serve``, refusing a damaged or missing one (issue 17).

    - instances are stored but the index file is missing, or has no instance at all: the
      node would start empty and orphan them, so it refuses;
    - ``PRAGMA quick_check`` finds the file damaged: it refuses (a damaged index acknowledges
      stores it may not keep).

    Each refusal is an :class:`~node.errors.IndexDatabaseError` whose one-line message names
    the file and the recovery command (``spine-node rebuild-index``).

    Raises
    ------
    IndexDatabaseError
    """
    database_path = Path(database_path)
    stored = _holds_files(Path(storage) / "instances")
    recovery = recovery_hint(Path(storage))
    if stored and not database_path.exists():
        raise IndexDatabaseError(
            f"index {database_path} is missing but {Path(storage) / 'instances'} holds stored"
            f" files: the node will not start empty and orphan them. {recovery}"
        )
    try:
        index = Index(database_path)
    except IndexDatabaseError as err:
        cause = err.__cause__
        if isinstance(cause, sqlite3.DatabaseError) and " is damaged (" in str(err):
            # a file SQLite cannot read: the same refusal, naming this storage folder
            raise IndexDatabaseError(damaged_message(database_path, str(cause), storage)) from err
        raise
    try:
        problems = index.check_integrity(full=False, max_errors=1)
        if problems:
            raise IndexDatabaseError(damaged_message(database_path, problems[0], storage))
        if stored and not index.query("SELECT 1 FROM instances LIMIT 1"):
            raise IndexDatabaseError(
                f"index {database_path} records no instance but {Path(storage) / 'instances'}"
                f" holds stored files (was the index deleted?): the node will not orphan"
                f" them. {recovery}"
            )
    except sqlite3.DatabaseError as err:
        index.close()
        raise IndexDatabaseError(damaged_message(database_path, str(err), storage)) from err
    except BaseException:
        index.close()
        raise
    return index


def _account() -> str:
    """The user account running the node (its uid when it has no name)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


class NodeService:
    """Everything ``spine-node serve`` runs, in one process.

    Parameters
    ----------
    settings : Settings
        The validated configuration.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        node = settings.node
        self.index = open_checked_index(node.database_path, node.storage)
        self.store = Store(
            node.storage,
            self.index,
            low_water_bytes=int(node.disk_low_water_mb * 1e6),
            max_inflated_bytes=int(node.max_inflated_mb * 1e6),
        )
        self.scheduler = BackgroundScheduler(
            timezone=timezone.utc,
            executors={"default": ThreadPoolExecutor(4)},
            job_defaults={"coalesce": True, "max_instances": 1},
        )
        self.stability = StabilityMonitor(
            self.index, self.scheduler, quiet_period_s=node.quiet_period_s
        )
        #: the audit trail (DICOM audit messages: node.audit), closed by :meth:`stop`
        self.audit = open_audit_trail(settings)
        self.outbox = Outbox(self.index, self.store, settings)
        self.dispatcher = Dispatcher(self.outbox, settings, audit=self.audit)
        self.scp = StorageSCP(
            settings, self.store, self.index, on_stored=self._on_stored, audit=self.audit
        )
        # a misconfigured PACS for priors must stop the start-up, not the first analysis
        pacs_peer(settings, settings.courses)
        #: queries/retrieves missing priors when an analysis waits (stopped by :meth:`stop`)
        self.priors = PriorsFetcher(self, audit=self.audit)
        self.followups = FollowupTracker(self.index, settings.followup, self.scheduler)
        # built last: it uses the outbox, the follow-up tracker and the priors fetcher
        self.analysis = AnalysisWorker(self)
        self.dashboard: DashboardServer | None = None
        self.address: tuple[str, int] | None = None

    def _on_stored(self, result: StoreResult) -> None:
        self.stability.touch(result.study_uid)

    def start(self) -> tuple[str, int]:
        """Recover from an interrupted run, start the scheduler and the listener.

        Returns
        -------
        tuple of (str, int)
            The listener's bound address.
        """
        self.store.remove_stale_temporaries()
        self.outbox.recover_claims()
        self.scheduler.start()
        self.analysis.start()
        self.followups.start()
        try:
            self.dashboard = start_dashboard(
                self, reanalyse=reanalyse_action(self, self.analysis), audit=self.audit
            )
        except OSError as err:
            # the DICOM service matters more than its dashboard: keep receiving, say why
            logger.error("dashboard not started: %s", err)
            self.index.add_event("dashboard_failed", detail=str(err)[:300])
        self.stability.rearm_pending()
        self.scheduler.add_job(
            self.dispatcher.run_once,
            "interval",
            id="dispatch",
            seconds=self.settings.dispatch.poll_interval_s,
            next_run_time=datetime.now(timezone.utc),
        )
        self.address = self.scp.start()
        self.index.add_event("node_started", detail=f"{self.address[0]}:{self.address[1]}")
        self._audit_activity(APPLICATION_START)
        return self.address

    def _audit_activity(self, what: Code) -> None:
        """Application Activity (start or stop): the node, and the user account running it."""
        self.audit.event(
            APPLICATION_ACTIVITY,
            action="E",
            event_types=(what,),
            participants=(
                self.audit.node(),
                Participant(_account(), requestor=True, role=ROLE_APPLICATION_LAUNCHER),
            ),
        )

    def stop(self) -> None:
        """Stop listening, finish running jobs, close the index."""
        self.scp.stop()
        if self.dashboard is not None:
            self.dashboard.stop()
        self.scheduler.shutdown(wait=True)
        self.priors.stop()
        self.analysis.stop()
        self.index.add_event("node_stopped")
        self._audit_activity(APPLICATION_STOP)
        self.audit.close()
        self.index.close()
