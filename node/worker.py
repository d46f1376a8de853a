"""The node's analysis worker: a stable study makes its patient's chain run, off the SCP's threads.

When the stability monitor reports a study stable (or amended), the worker finds the study's
patient and runs :func:`node.chain.run_chain` on everything the node holds for that patient, in a
separate process (the C-STORE handler never waits for analysis; numerical libraries never share the
listener's process). Outputs are written under ``<storage>/results/`` and queued in the durable
outbox for every configured result destination. Each outcome is an event in the index:

* ``analysis_started`` / ``analysis_done`` (with the number of objects and the response call),
* ``analysis_waiting`` — nothing to analyse yet, with the reason (e.g. no course, no baseline);
  a later study of the same patient re-triggers the analysis,
* ``analysis_failed`` — an unexpected error (the study can be re-queued with
  ``spine-node reprocess``).

Deterministic output UIDs make a re-run replace, not duplicate, the results in the PACS.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import threading
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.analysis import link_superseded_reports
from node.chain import ChainSettings
from node.logs import logging_target
from node.timeline import TimelineError, on_analysis_done, recorded_reports

if TYPE_CHECKING:  # the worker's view of the node (NodeService satisfies it)
    from node.protocols import WorkerHost

logger = logging.getLogger(__name__)


def chain_settings_from(config: Path | None) -> ChainSettings:
    """The chain's settings from the ``[analysis]`` table of a configuration file (defaults
    without one): what ``analyze``, ``maps`` and ``cohort`` run with."""
    if config is None:
        return ChainSettings()
    from node.config import load_settings

    return load_settings(config).analysis.chain_settings()


def _analyse_patient(
    db_path: str,
    store_root: str,
    patient_row: int,
    chain_settings: dict,
    out_dir: str,
    log_level: str,
    log_file: str | None,
    map_cache_mb: int = 0,
    map_cache_dir: str | None = None,
) -> dict[str, Any]:
    """Child-process entry: run the chain for one patient; return what the parent records."""
    from node.logs import configure_logging

    # the child logs like the node: same file, same patient-identifier filter
    configure_logging(log_level, log_file)
    from node.chain import ChainSettings
    from node.map_cache import MapCache
    from node.pipeline import StorePatient, run_patient

    # a re-analysis (new follow-up, corrected study) refits only the studies whose map inputs
    # changed; the cache lives beside the results, under the storage folder, unless configured
    folder = Path(map_cache_dir) if map_cache_dir else Path(store_root) / "cache" / "maps"
    cache = MapCache(folder) if map_cache_mb > 0 else None
    outcome = run_patient(
        StorePatient(Path(db_path), Path(store_root), patient_row),
        ChainSettings(**chain_settings),
        Path(out_dir),
        map_cache=cache,
    )
    if outcome.state == "waiting" or outcome.result is None:
        return {"state": "waiting", "reason": outcome.reason}
    if cache is not None:
        try:
            cache.prune(map_cache_mb * 2**20)
        except OSError as err:  # a full or read-only cache folder costs refits, not the analysis
            logger.warning("map cache not pruned: %s", err)
    return {
        "state": "done",
        "paths": [str(p) for p in outcome.paths],
        "calls": outcome.calls,
        "timings": outcome.result.timings,
    }


def _end_with_parent() -> None:
    """Analysis child initializer: end with the node, even when the node is killed (SIGKILL).

    Linux's PR_SET_PDEATHSIG; elsewhere the child ends when its task queue closes.
    """
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


class AnalysisWorker:
    """Runs the chain for patients whose studies became stable; see the module docstring.

    Parameters
    ----------
    service : node.protocols.WorkerHost
        The running node (:class:`node.service.NodeService` builds the worker and owns it): its
        settings, index, store, stability monitor (stable studies), outbox (results), follow-up
        tracker and priors fetcher (told when an analysis waits), the last two optional.
    """

    def __init__(self, service: WorkerHost) -> None:
        self.service = service
        self.section = service.settings.analysis
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        #: one analysis at a time (2 cores); patients waiting for their turn
        self._run_lock = threading.Lock()
        self._queued: set[int] = set()

    def start(self) -> None:
        if self.section.enabled:
            self.service.stability.add_listener(self.on_stable)

    def stop(self) -> None:
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None

    def _pool(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                # spawn: the node's process holds threads (listener, scheduler); never fork them
                self._executor = concurrent.futures.ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_end_with_parent,
                )
            return self._executor

    def on_stable(self, study_uid: str, amended: bool) -> None:
        """Stability listener (runs in a scheduler thread): analyse the study's patient."""
        from node.analysis import patient_of_study

        index = self.service.index
        patient = patient_of_study(index, study_uid)
        if patient is None:
            return
        # a patient's history often arrives in one go (baseline, RT objects, follow-ups): while
        # another of its studies is still receiving, that study's own stability will start the
        # analysis, which then sees everything, instead of one run (and one set of results)
        # per study
        pending = index.query(
            "SELECT count(*) FROM studies WHERE patient_key=? AND state='receiving'"
            " AND study_uid != ?",
            (patient, study_uid),
        )[0][0]
        if pending:
            logger.info(
                "study %s: analysis deferred, %d other stud%s of the patient still receiving",
                study_uid,
                pending,
                "y" if pending == 1 else "ies",
            )
            index.add_event(
                "analysis_deferred",
                study_uid=study_uid,
                detail=f"{pending} other studies of the patient still receiving",
            )
            return
        self.analyse(patient, study_uid=study_uid)

    def analyse(self, patient_row: int, *, study_uid: str | None = None) -> dict[str, Any]:
        """Run the chain for one patient (blocking the calling thread, not the listener).

        Several studies of a patient usually become stable within minutes of each other (baseline,
        RT objects, follow-up sent together): a run that is still waiting for its turn already
        covers them, so further requests for the same patient are coalesced into it.
        """
        with self._lock:
            if patient_row in self._queued:
                logger.info("analysis for study %s coalesced with a queued run", study_uid)
                return {"state": "coalesced"}
            self._queued.add(patient_row)
        with self._run_lock:
            with self._lock:
                self._queued.discard(patient_row)
            return self._analyse(patient_row, study_uid=study_uid)

    def _analyse(self, patient_row: int, *, study_uid: str | None) -> dict[str, Any]:
        index = self.service.index
        store = self.service.store
        out_dir = store.root / "results" / f"patient-{patient_row}"
        index.add_event("analysis_started", study_uid=study_uid)
        try:
            outcome = (
                self._pool()
                .submit(
                    _analyse_patient,
                    str(index.path),
                    str(store.root),
                    patient_row,
                    asdict(self.section.chain_settings()),
                    str(out_dir),
                    *logging_target(),
                    self.section.map_cache_mb,
                    None if self.section.map_cache_dir is None else str(self.section.map_cache_dir),
                )
                .result()
            )
        except Exception as err:  # the child's failure must not take the node down
            logger.exception("analysis of study %s failed", study_uid)
            index.add_event(
                "analysis_failed",
                study_uid=study_uid,
                detail=f"{type(err).__name__}: {str(err)[:300]}",
            )
            return {"state": "failed", "reason": f"{type(err).__name__}: {err}"}
        if outcome["state"] == "waiting":
            logger.info("study %s: not analysable yet: %s", study_uid, outcome["reason"])
            index.add_event("analysis_waiting", study_uid=study_uid, detail=outcome["reason"])
            # what is missing may be on the PACS (issue 5): check the patient, fetch priors
            priors = self.service.priors
            if priors is not None:
                priors.on_analysis_waiting(patient_row, study_uid, outcome["reason"])
            return outcome
        paths = [Path(p) for p in outcome["paths"]]
        link_superseded_reports(paths, recorded_reports(index, patient_row))
        for destination in self.service.settings.node.result_destinations:
            self.service.outbox.enqueue(paths, destination, f"analysis of study {study_uid}")
        detail = f"{len(paths)} objects; response: {', '.join(outcome['calls']) or 'baseline only'}"
        followups = self.service.followups
        # the timeline and follow-up windows are recorded before ``analysis_done``: whoever sees
        # that event (an operator, the dashboard, a test) then also sees the time points
        try:
            on_analysis_done(index, patient_row, out_dir / "summary.json", followups=followups)
        except TimelineError as err:  # the outputs are on their way; say what was not recorded
            logger.error("study %s: timeline not recorded: %s", study_uid, err)
            detail += f"; timeline not recorded: {err}"
        index.add_event("analysis_done", study_uid=study_uid, detail=detail)
        logger.info("study %s analysed: %s", study_uid, detail)
        return outcome
