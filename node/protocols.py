"""What the node's components need from each other, as :class:`typing.Protocol` types.

:class:`node.service.NodeService` is the composition root: it builds every component (index,
store, scheduler, stability monitor, outbox, dispatcher, listener, priors fetcher, follow-up
tracker, analysis worker, dashboard) once, owns it for the life of the process and hands each one
the collaborators it uses. There is no module-level registry: a component reaches another only
through what it was given.

Two kinds of protocol are defined here:

* *roles* — one capability a component offers another (:class:`ResultQueue` to send results,
  :class:`WaitingHook` to be told that an analysis waits, :class:`Analyser` to run one, and
  :class:`StudyToucher`/:class:`StableSource` for the stability monitor);
* *views of the node* — the few attributes of the running node a component reads
  (:class:`PriorsHost`, :class:`WorkerHost` — both a :class:`StoringNode` —, :class:`ReanalyseHost`,
  :class:`DashboardHost`).
  ``NodeService`` satisfies all of them; a test may pass any object with those attributes.

Members of the views are read-only properties, so a concrete attribute (e.g.
``NodeService.stability: StabilityMonitor``) satisfies a narrower role type.

The index, the store and the settings are concrete classes (:class:`node.index.Index`,
:class:`node.store.Store`, :class:`node.config.Settings`): every component uses the real ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from apscheduler.schedulers.base import BaseScheduler

    from node.config import Settings
    from node.dispatch import Outbox
    from node.followup import FollowupTracker
    from node.index import Index
    from node.store import Store

__all__ = [
    "Analyser",
    "DashboardHost",
    "PriorsHost",
    "ReanalyseHost",
    "ResultQueue",
    "StableSource",
    "StoringNode",
    "StudyToucher",
    "WaitingHook",
    "WorkerHost",
]


# -- roles --------------------------------------------------------------------------------------
class ResultQueue(Protocol):
    """Something that queues result files for a destination (:class:`node.dispatch.Outbox`)."""

    def enqueue(self, paths: Sequence[Path], destination: str, reason: str) -> list[int]:
        """Queue ``paths`` for ``destination``; return the queue item ids."""
        ...


class WaitingHook(Protocol):
    """Told when an analysis cannot run yet (:class:`node.priors.PriorsFetcher`)."""

    def on_analysis_waiting(self, patient_row: int, study_uid: str | None, reason: str) -> None:
        """React to a waiting analysis (e.g. fetch priors); must not raise into the caller."""
        ...


class Analyser(Protocol):
    """Runs the analysis of one patient (:class:`node.worker.AnalysisWorker`)."""

    def analyse(self, patient_row: int, *, study_uid: str | None = None) -> dict[str, Any]:
        """Run (or coalesce) the analysis; return its outcome (``state`` and details)."""
        ...


class StudyToucher(Protocol):
    """Re-arms a study's quiet period (:class:`node.stability.StabilityMonitor`)."""

    def touch(self, study_uid: str, *, delay_s: float | None = None) -> None:
        """An instance of ``study_uid`` was stored."""
        ...


class StableSource(Protocol):
    """Calls listeners when a study becomes stable (:class:`node.stability.StabilityMonitor`)."""

    def add_listener(self, listener: Callable[[str, bool], None]) -> None:
        """Register ``listener(study_uid, amended)``."""
        ...


# -- views of the running node ------------------------------------------------------------------
class StoringNode(Protocol):
    """The part of the node every analysing component reads: settings, index and store."""

    @property
    def settings(self) -> Settings: ...

    @property
    def index(self) -> Index: ...

    @property
    def store(self) -> Store: ...


class PriorsHost(StoringNode, Protocol):
    """What :class:`node.priors.PriorsFetcher` reads of the node."""

    @property
    def stability(self) -> StudyToucher: ...


class WorkerHost(StoringNode, Protocol):
    """What :class:`node.worker.AnalysisWorker` reads of the node."""

    @property
    def stability(self) -> StableSource: ...

    @property
    def outbox(self) -> ResultQueue: ...

    @property
    def followups(self) -> FollowupTracker | None: ...

    @property
    def priors(self) -> WaitingHook | None: ...


class ReanalyseHost(Protocol):
    """What the dashboard's re-analyse action reads of the node."""

    @property
    def index(self) -> Index: ...

    @property
    def scheduler(self) -> BaseScheduler: ...


class DashboardHost(Protocol):
    """What :func:`node.dashboard.start_dashboard` reads of the node."""

    @property
    def settings(self) -> Settings: ...

    @property
    def index(self) -> Index: ...

    @property
    def outbox(self) -> Outbox: ...
