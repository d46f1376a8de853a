"""Priors from the PACS: when a follow-up cannot be analysed, query and retrieve what is missing.

When the analysis of a stable study waits because the patient's CyberKnife course or baseline MR
is not on the node (:class:`node.chain.ChainError`), :class:`PriorsFetcher` asks the configured
PACS for the patient's earlier studies and retrieves what is needed:

1. C-FIND at STUDY level (Study Root) by PatientID + IssuerOfPatientID; a response whose
   PatientID or IssuerOfPatientID differs from ours is refused (recorded, never retrieved);
2. C-FIND at SERIES level in every study dated on or before the waiting study;
3. selection: without a course on the node, every RT series (RTPLAN, RTSTRUCT, RTDOSE, RTRECORD)
   the node does not hold; without a baseline on the node, the MR (and SEG) series of the latest
   MR study in the baseline window before the treatment date (the course's date when the node
   holds it, else the date of the latest PACS study holding an RT Plan — a second round, once the
   course has arrived, uses the exact date);
4. C-MOVE of each series to the node's own AE title (the PACS must know it) or C-GET on the same
   association, with retries and back-off.

Retrieved instances arrive through the normal storage path (the SCP for C-MOVE; the store for
C-GET), their study becomes stable and the analysis runs again. Throttling: at most
``max_concurrent`` patients retrieve at a time, and queries of one patient are at least
``min_interval_s`` apart (a request inside the interval is deferred, not dropped; requests of a
patient already waiting are coalesced). Every step is an event in the index (``priors_query``,
``priors_refused``, ``priors_retrieve``, ``priors_retrieved``, ``priors_none``, ``priors_failed``,
``priors_deferred``) with UIDs and counts only. Before any query the patient's instances on the node
are checked for a patient mismatch (a study UID carrying two patient keys): a mismatch is recorded
as ``patient_mismatch`` and nothing is fetched (issue 5, acceptance 6).

Patient identifiers go on the wire only: pynetdicom's identifier logging is switched off and
its logger stays above DEBUG (:mod:`node.logs`); this module logs UIDs and index row ids.

Configuration: the ``[courses]`` table (:class:`CoursesSection`).

References
----------
DICOM PS3.4 Annex C (Query/Retrieve Service Class: C.4.1 C-FIND, C.4.2 C-MOVE, C.4.3 C-GET,
C.6.2 Study Root information model); PS3.7 9.1.2-9.1.4 (DIMSE C-FIND/C-GET/C-MOVE);
PS3.3 C.7.1.1 (IssuerOfPatientID).
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import functools
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.audit import (
    MINOR_FAILURE,
    QUERY,
    ROLE_DESTINATION,
    ROLE_SOURCE,
    SUCCESS,
    AuditTrail,
    NoAudit,
    Participant,
    query_object,
)
from node.config import CoursesSection, Peer, Settings
from node.errors import ConfigError, NodeError, PeerError, StoreOutcome, store_status
from node.roles import PatientMismatchError, check_single_patient
from node.scp import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, set_tcp_nodelay, store_event
from node.scu import _pause_reactor, peer_address
from processing.course import RT_MODALITIES
from processing.dates import dicom_date

if TYPE_CHECKING:
    from node.protocols import PriorsHost

logger = logging.getLogger(__name__)

# the C-FIND/C-MOVE identifiers hold PatientID: never let pynetdicom log them
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

#: series modalities retrieved from a baseline study
BASELINE_MODALITIES = frozenset({"MR", "SEG"})
_PENDING = (0xFF00, 0xFF01)
_T = TypeVar("_T")


def pacs_peer(settings: Settings, section: CoursesSection) -> Peer | None:
    """The configured PACS peer, checked against the method; ``None`` when none is configured.

    Raises
    ------
    ConfigError
        Unknown peer, or a peer without the rights the method needs.
    """
    if not section.pacs:
        return None
    try:
        peer = settings.peer(section.pacs)
    except KeyError as err:
        raise ConfigError(f"courses.pacs: no peer named {section.pacs!r}") from err
    if not peer.may_receive:
        raise ConfigError(
            f"courses.pacs: peer {peer.name!r} needs may_receive = true "
            "(the node associates with it to query and retrieve)"
        )
    if section.method == "move" and not peer.may_send:
        raise ConfigError(
            f"courses.pacs: peer {peer.name!r} needs may_send = true for "
            "method 'move' (it sends the retrieved instances to our listener)"
        )
    return peer


class RetrieveError(PeerError):
    """A query or retrieval did not complete (refused association, failure status, failed
    sub-operations)."""


@dataclass(frozen=True)
class RemoteSeries:
    """One series as the PACS reported it."""

    series_uid: str
    modality: str
    n_instances: int | None


@dataclass
class RemoteStudy:
    """One study as the PACS reported it (series filled by the series-level query)."""

    study_uid: str
    study_date: dt.date | None
    modalities: tuple[str, ...]
    series: list[RemoteSeries] = field(default_factory=list)


@dataclass
class FetchReport:
    """What one fetch asked and what came.

    Attributes
    ----------
    state : str
        ``"retrieved"``, ``"none"`` (nothing needed was found), ``"failed"``, ``"mismatch"``,
        ``"disabled"``.
    studies_found : int
        Studies the PACS reported for the patient (after refusals).
    refused : list of str
        Study UIDs refused for a different PatientID/IssuerOfPatientID.
    requested : list of str
        Series UIDs asked for.
    completed, failed, warning : int
        Sub-operations the PACS reported (instances sent to us).
    attempts : int
        DIMSE operations attempted, retries included.
    detail : str
        A one-line summary (UIDs and counts only).
    """

    state: str = "none"
    studies_found: int = 0
    refused: list[str] = field(default_factory=list)
    requested: list[str] = field(default_factory=list)
    completed: int = 0
    failed: int = 0
    warning: int = 0
    attempts: int = 0
    detail: str = ""


def _status(rsp: Dataset | None) -> int | None:
    return int(rsp.Status) if rsp is not None and "Status" in rsp else None


class PriorsFetcher:
    """Query/retrieve SCU for missing courses and baselines of one running node.

    :class:`node.service.NodeService` builds one (``service.priors``) and stops it with the node.

    Parameters
    ----------
    service : node.protocols.PriorsHost
        The running node: its settings, index, store and stability monitor (a retrieved
        instance re-arms its study's quiet period).

    Notes
    -----
    :meth:`on_analysis_waiting` is the analysis worker's hook (:class:`node.protocols.WaitingHook`)
    and :meth:`request` the asynchronous entry behind it; :meth:`fetch` does one query/retrieve
    round synchronously.
    """

    def __init__(self, service: PriorsHost, *, audit: AuditTrail | None = None) -> None:
        self.service = service
        self.audit = audit or NoAudit()
        settings = service.settings
        self.config_error: str | None = None
        self.section = settings.courses
        self.pacs: Peer | None = None
        try:
            self.pacs = pacs_peer(settings, self.section)
        except ConfigError as err:
            self.config_error = str(err)
            logger.error("priors from the PACS are off: %s", err)
        self.calling_ae = self.section.calling_ae_title or settings.node.ae_title
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.section.max_concurrent, thread_name_prefix="priors"
        )
        self._lock = threading.Lock()
        #: files stored by the C-STORE sub-operations of each running C-GET (by association)
        self._retrieved: dict[int, list[Path]] = {}
        self._pending: set[int] = set()
        self._last_query: dict[int, float] = {}
        self._timers: list[threading.Timer] = []
        self._stopping = threading.Event()

    # -- scheduling -----------------------------------------------------------------------------
    def on_analysis_waiting(self, patient_row: int, study_uid: str | None, reason: str) -> None:
        """Hook of :class:`node.worker.AnalysisWorker`: an analysis waits for something missing.

        Schedules the patient-mismatch check and, when configured, the priors fetch; never raises
        into the worker (a failure is an event).
        """
        try:
            self.request(patient_row, study_uid, reason)
        except RuntimeError as err:  # executor shut down with the node
            logger.warning("priors for study %s not requested: %s", study_uid, err)

    @property
    def active(self) -> bool:
        """True when priors are fetched (enabled, a PACS configured, no configuration error)."""
        return self.section.enabled and self.pacs is not None and self.config_error is None

    def request(
        self, patient_row: int, study_uid: str | None, reason: str = ""
    ) -> concurrent.futures.Future[FetchReport] | None:
        """Fetch the priors of a patient in the background (throttled, coalesced).

        Parameters
        ----------
        patient_row : int
            The patient's row in the index.
        study_uid : str, optional
            The study whose analysis waits (its date bounds the priors).
        reason : str
            Why the analysis waits (logged; UIDs only).

        Returns
        -------
        concurrent.futures.Future or None
            The scheduled fetch; ``None`` when coalesced into a pending one or deferred by the
            minimum interval (it then runs later by itself).
        """
        if self._stopping.is_set():
            return None
        with self._lock:
            if patient_row in self._pending:
                logger.info("priors for study %s coalesced with a pending request", study_uid)
                return None
            self._pending.add(patient_row)
            last = self._last_query.get(patient_row)
            delay = 0.0 if last is None else last + self.section.min_interval_s - time.monotonic()
        logger.info(
            "priors requested for study %s (patient row %d): %s", study_uid, patient_row, reason
        )
        if self.active and delay > 0:
            self.service.index.add_event(
                "priors_deferred",
                study_uid=study_uid,
                detail=f"patient row {patient_row}: next query in {delay:.1f} s (min_interval_s)",
            )
            timer = threading.Timer(delay, self._submit, args=(patient_row, study_uid))
            timer.daemon = True
            with self._lock:
                self._timers = [t for t in self._timers if t.is_alive()] + [timer]
            timer.start()
            return None
        return self._submit(patient_row, study_uid)

    def _submit(
        self, patient_row: int, study_uid: str | None
    ) -> concurrent.futures.Future[FetchReport] | None:
        if self._stopping.is_set():
            return None
        return self._executor.submit(self._run, patient_row, study_uid)

    def _run(self, patient_row: int, study_uid: str | None) -> FetchReport:
        with self._lock:
            self._pending.discard(patient_row)
        try:
            return self.fetch(patient_row, study_uid)
        except (NodeError, OSError, ValueError) as err:
            logger.error("priors for study %s failed: %s", study_uid, err)
            self.service.index.add_event(
                "priors_failed",
                study_uid=study_uid,
                detail=f"{type(err).__name__}: {str(err)[:300]}",
            )
            return FetchReport(state="failed", detail=str(err))
        except Exception as err:  # last resort of a background thread: record, never lose it
            logger.exception("priors for study %s failed unexpectedly", study_uid)
            self.service.index.add_event(
                "priors_failed",
                study_uid=study_uid,
                detail=f"{type(err).__name__}: unexpected error",
            )
            return FetchReport(state="failed", detail=f"{type(err).__name__}")

    def stop(self) -> None:
        """Cancel deferred requests and wait for running fetches (no new retries start)."""
        self._stopping.set()
        with self._lock:
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)

    # -- one round ------------------------------------------------------------------------------
    def fetch(self, patient_row: int, study_uid: str | None) -> FetchReport:
        """Check, query and retrieve the missing priors of one patient (blocking).

        Raises
        ------
        RetrieveError
            The PACS could not be queried after the configured retries.
        """
        index = self.service.index
        try:
            self.check_patient(patient_row)
        except PatientMismatchError as err:
            logger.warning("patient row %d: %s", patient_row, err)
            index.add_event("patient_mismatch", study_uid=study_uid, detail=str(err))
            return FetchReport(state="mismatch", detail=str(err))
        if not self.active:
            detail = self.config_error or "no [courses] pacs configured or fetching disabled"
            return FetchReport(state="disabled", detail=detail)
        assert self.pacs is not None
        with self._lock:
            self._last_query[patient_row] = time.monotonic()
        report = FetchReport()
        rows = index.query("SELECT patient_id, issuer FROM patients WHERE id=?", (patient_row,))
        if not rows:
            raise ValueError(f"no patient row {patient_row} in the index")
        patient_id, issuer = str(rows[0][0]), str(rows[0][1])
        trigger_date = self._study_date(study_uid)
        held = self._held_series(patient_row)
        course_date = self._course_date(patient_row)

        studies = self._with_retries(
            report,
            "C-FIND study level",
            functools.partial(self._find_studies, patient_id, issuer, report),
        )
        priors = [
            s
            for s in studies
            if s.study_uid != study_uid
            and s.study_date is not None
            and (trigger_date is None or s.study_date <= trigger_date)
        ]
        report.studies_found = len(studies)
        for study in priors:
            study.series = self._with_retries(
                report, "C-FIND series level", functools.partial(self._find_series, study.study_uid)
            )
        wanted, why = self._select(priors, held, course_date, patient_row)
        n_series = sum(len(s.series) for s in priors)
        index.add_event(
            "priors_query",
            study_uid=study_uid,
            detail=(
                f"{self.pacs.name}: {len(studies)} studies, {len(priors)} prior, {n_series} "
                f"series; course on node: {'yes' if course_date else 'no'}; "
                f"{len(wanted)} series to retrieve ({why})"
            ),
        )
        if not wanted:
            report.state = "none"
            report.detail = why
            index.add_event("priors_none", study_uid=study_uid, detail=why)
            logger.info("priors for study %s: nothing to retrieve (%s)", study_uid, why)
            return report
        method = f"C-{self.section.method.upper()}"
        for study, series_list in self._retrievals(wanted):
            report.requested.extend(se.series_uid for se in series_list)
            if series_list == study.series:
                # the whole study is missing: one STUDY-level retrieval, one stream of C-STOREs
                series_uid, what = None, f"study level ({len(series_list)} series)"
            else:
                series_uid = series_list[0].series_uid
                what = f"series {series_uid}"
            kinds = ", ".join(sorted({se.modality for se in series_list}))
            n = sum(se.n_instances or 0 for se in series_list)
            index.add_event(
                "priors_retrieve",
                study_uid=study.study_uid,
                detail=f"{what}: {kinds}, {n} instances by {method}",
            )
            try:
                completed, failed, warning = self._with_retries(
                    report, method, functools.partial(self._retrieve, study.study_uid, series_uid)
                )
            except RetrieveError as err:
                report.failed += 1
                index.add_event(
                    "priors_failed", study_uid=study.study_uid, detail=f"{what}: {str(err)[:300]}"
                )
                continue
            report.completed += completed
            report.failed += failed
            report.warning += warning
            index.add_event(
                "priors_retrieved",
                study_uid=study.study_uid,
                detail=f"{what}: {completed} completed, {failed} failed, {warning} warning",
            )
        report.state = "retrieved" if report.completed else "failed"
        report.detail = (
            f"{len(report.requested)} series asked, {report.completed} instances "
            f"came, {report.failed} failed"
        )
        logger.info("priors for study %s: %s", study_uid, report.detail)
        return report

    @staticmethod
    def _retrievals(
        wanted: list[tuple[RemoteStudy, RemoteSeries]],
    ) -> list[tuple[RemoteStudy, list[RemoteSeries]]]:
        """Group the wanted series: a whole study in one item, else one item per series."""
        by_study: dict[str, tuple[RemoteStudy, list[RemoteSeries]]] = {}
        for study, series in wanted:
            by_study.setdefault(study.study_uid, (study, []))[1].append(series)
        out: list[tuple[RemoteStudy, list[RemoteSeries]]] = []
        for study, series_list in by_study.values():
            series_list.sort(key=lambda se: se.series_uid)
            if series_list == study.series:
                out.append((study, series_list))
            else:
                out.extend((study, [se]) for se in series_list)
        return out

    # -- what the node holds --------------------------------------------------------------------
    def _study_date(self, study_uid: str | None) -> dt.date | None:
        if study_uid is None:
            return None
        rows = self.service.index.query(
            "SELECT study_date FROM studies WHERE study_uid=?", (study_uid,)
        )
        return dicom_date(rows[0][0]) if rows else None

    def _held_series(self, patient_row: int) -> dict[str, int]:
        rows = self.service.index.query(
            "SELECT i.series_uid, COUNT(*) FROM instances i JOIN studies s"
            " ON i.study_uid = s.study_uid WHERE s.patient_key=? GROUP BY i.series_uid",
            (patient_row,),
        )
        return {str(r[0]): int(r[1]) for r in rows}

    def _headers(
        self,
        patient_row: int,
        modalities: tuple[str, ...] | None = None,
        tags: list[str] | None = None,
    ) -> Iterator[Dataset]:
        sql = (
            "SELECT i.path FROM instances i JOIN studies s ON i.study_uid = s.study_uid"
            " JOIN series r ON r.series_uid = i.series_uid WHERE s.patient_key = ?"
        )
        params: list[Any] = [patient_row]
        if modalities:
            sql += f" AND r.modality IN ({','.join('?' * len(modalities))})"
            params.extend(modalities)
        root = Path(self.service.store.root)
        for row in self.service.index.query(sql, params):
            with warnings.catch_warnings():
                # pydicom's validation warnings quote element values (possibly identifiers)
                warnings.simplefilter("ignore")
                try:
                    yield dcmread(root / row[0], stop_before_pixels=True, specific_tags=tags)
                except (InvalidDicomError, OSError) as err:
                    logger.warning("stored instance %s unreadable: %s", row[0], type(err).__name__)

    def check_patient(self, patient_row: int) -> None:
        """Refuse a patient whose stored instances carry more than one patient key.

        Raises
        ------
        PatientMismatchError
            A study UID of the patient holds instances of two patients (PatientID +
            IssuerOfPatientID); the message names the study UID only.
        """
        headers = list(
            self._headers(patient_row, tags=["PatientID", "IssuerOfPatientID", "StudyInstanceUID"])
        )
        if headers:
            check_single_patient(headers)

    def _course_date(self, patient_row: int) -> dt.date | None:
        """Treatment date of the CyberKnife course the node holds, or None."""
        from processing.course import recognise_course

        rt = list(self._headers(patient_row, modalities=("RTPLAN", "RTRECORD")))
        if not rt:
            return None
        course = recognise_course(rt)
        return None if course is None else course.treatment_date.date

    def _baseline_held(self, patient_row: int, treatment_date: dt.date) -> bool:
        rows = self.service.index.query(
            "SELECT DISTINCT s.study_uid, s.study_date FROM studies s JOIN series r"
            " ON r.study_uid = s.study_uid WHERE s.patient_key=? AND r.modality='MR'",
            (patient_row,),
        )
        window = self.section.baseline_window_days
        for row in rows:
            date = dicom_date(row[1])
            if date is not None and 0 <= (treatment_date - date).days <= window:
                return True
        return False

    def _select(
        self,
        priors: list[RemoteStudy],
        held: dict[str, int],
        course_date: dt.date | None,
        patient_row: int,
    ) -> tuple[list[tuple[RemoteStudy, RemoteSeries]], str]:
        """The (study, series) pairs to retrieve and a one-line reason."""

        def missing(series: RemoteSeries) -> bool:
            return held.get(series.series_uid, 0) < (series.n_instances or 1)

        wanted: list[tuple[RemoteStudy, RemoteSeries]] = []
        notes: list[str] = []
        reference = course_date
        if course_date is None:
            rt = [(st, se) for st in priors for se in st.series if se.modality in RT_MODALITIES]
            wanted.extend((st, se) for st, se in rt if missing(se))
            plan_dates = [
                st.study_date
                for st, se in rt
                if se.modality == "RTPLAN" and st.study_date is not None
            ]
            reference = max(plan_dates) if plan_dates else None
            notes.append(f"{len(rt)} RT series on the PACS" if rt else "no RT series on the PACS")
        if reference is None:
            notes.append("no treatment date: baseline not searched")
        elif self._baseline_held(patient_row, reference):
            notes.append("baseline on the node")
        else:
            window = self.section.baseline_window_days
            candidates = [
                st
                for st in priors
                if st.study_date is not None
                and 0 <= (reference - st.study_date).days <= window
                and any(se.modality == "MR" for se in st.series)
            ]
            if candidates:
                baseline = max(candidates, key=lambda s: (s.study_date, s.study_uid))
                wanted.extend(
                    (baseline, se)
                    for se in baseline.series
                    if se.modality in BASELINE_MODALITIES
                    and missing(se)
                    and (baseline, se) not in wanted
                )
                notes.append(f"baseline {baseline.study_uid}")
            else:
                notes.append(
                    f"no MR study on the PACS within {window} days before {reference.isoformat()}"
                )
        return wanted, "; ".join(notes)

    # -- DIMSE ----------------------------------------------------------------------------------
    def _with_retries(self, report: FetchReport, what: str, operation: Callable[[], _T]) -> _T:
        delay = self.section.retry_delay_s
        for attempt in range(self.section.retries + 1):
            report.attempts += 1
            try:
                return operation()
            except RetrieveError as err:
                if attempt == self.section.retries or self._stopping.is_set():
                    raise
                logger.warning(
                    "%s with %s failed (attempt %d of %d): %s; retrying in %.1f s",
                    what,
                    self.pacs.name if self.pacs else "?",
                    attempt + 1,
                    self.section.retries + 1,
                    err,
                    delay,
                )
                self._stopping.wait(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae)
        t = self.section.timeout_s
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = t
        ae.maximum_pdu_size = self.service.settings.node.maximum_pdu_size
        return ae

    def _associate(self, ae: AE, **kwargs: Any) -> Association:
        assert self.pacs is not None
        handlers = [(evt.EVT_CONN_OPEN, set_tcp_nodelay), *kwargs.pop("evt_handlers", [])]
        address = peer_address(self.pacs, self.service.settings)
        assoc = ae.associate(
            address.host,
            address.port,
            ae_title=address.ae_title,
            evt_handlers=handlers,
            tls_args=address.tls_args,
            **kwargs,
        )
        if not assoc.is_established:
            raise RetrieveError(
                f"association with {self.pacs.name} at {self.pacs.host}:{self.pacs.port} not "
                f"established ({'rejected' if assoc.is_rejected else 'no answer or aborted'})"
            )
        return assoc

    def _find(self, identifier: Dataset) -> list[Dataset]:
        final: int | None = None
        try:
            found, final = self._find_at_pacs(identifier)
        finally:
            self._audit_query(identifier, final)
        if final != 0x0000:
            raise RetrieveError(
                f"C-FIND at {identifier.QueryRetrieveLevel} level ended with status "
                f"{'none' if final is None else f'0x{final:04X}'}"
            )
        return found

    def _audit_query(self, identifier: Dataset, final: int | None) -> None:
        """A Query audit message (the node asked the PACS; the identifier, encoded)."""
        assert self.pacs is not None
        outcome = SUCCESS if final == 0x0000 else MINOR_FAILURE
        self.audit.event(
            QUERY,
            outcome=outcome,
            action="E",
            description=None
            if outcome == SUCCESS
            else "no answer from the PACS"
            if final is None
            else f"C-FIND ended with status 0x{final:04X}",
            participants=(
                self.audit.node(ROLE_SOURCE, requestor=True),
                Participant(
                    self.pacs.ae_title, requestor=False, role=ROLE_DESTINATION, host=self.pacs.host
                ),
            ),
            objects=[
                query_object(
                    str(StudyRootQueryRetrieveInformationModelFind),
                    encode(identifier, True, True) or b"",
                )
            ],
        )

    def _find_at_pacs(self, identifier: Dataset) -> tuple[list[Dataset], int | None]:
        """C-FIND ``identifier`` at the PACS: the matches and the final status."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self._associate(ae)
        found: list[Dataset] = []
        try:
            _pause_reactor(assoc)
            final: int | None = None
            for status, match in assoc.send_c_find(
                identifier, StudyRootQueryRetrieveInformationModelFind
            ):
                final = _status(status)
                if final in _PENDING and match is not None:
                    found.append(match)
        finally:
            if assoc.is_established:
                assoc.release()
        return found, final

    def _find_studies(self, patient_id: str, issuer: str, report: FetchReport) -> list[RemoteStudy]:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = patient_id
        query.IssuerOfPatientID = issuer
        query.StudyInstanceUID = ""
        query.StudyDate = ""
        query.ModalitiesInStudy = ""
        query.NumberOfStudyRelatedInstances = ""
        studies: dict[str, RemoteStudy] = {}
        refused: list[str] = []
        for match in self._find(query):
            uid = str(match.get("StudyInstanceUID", "") or "")
            if not uid:
                continue
            their_id = str(match.get("PatientID", "") or "")
            their_issuer = str(match.get("IssuerOfPatientID", "") or "")
            # a PACS that ignores the issuer key (or matches loosely) must not mix patients:
            # a different issuer, or a different PatientID, is refused and recorded
            if their_id != patient_id or (their_issuer and their_issuer != issuer):
                if uid not in refused:
                    refused.append(uid)
                continue
            modalities = match.get("ModalitiesInStudy", [])
            if isinstance(modalities, str):
                modalities = [modalities] if modalities else []
            studies[uid] = RemoteStudy(
                uid, dicom_date(match.get("StudyDate")), tuple(str(m) for m in modalities)
            )
        for uid in refused:
            if uid not in report.refused:
                report.refused.append(uid)
                logger.warning(
                    "PACS study %s belongs to another patient key "
                    "(PatientID/IssuerOfPatientID); refused",
                    uid,
                )
                self.service.index.add_event(
                    "priors_refused",
                    study_uid=uid,
                    detail="the PACS study has a different PatientID or IssuerOfPatientID; "
                    "not retrieved, never combined",
                )
        return sorted(studies.values(), key=lambda s: (s.study_date or dt.date.min, s.study_uid))

    def _find_series(self, study_uid: str) -> list[RemoteSeries]:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = ""
        query.Modality = ""
        query.NumberOfSeriesRelatedInstances = ""
        out: list[RemoteSeries] = []
        for match in self._find(query):
            uid = str(match.get("SeriesInstanceUID", "") or "")
            if not uid or str(match.get("StudyInstanceUID", study_uid)) != study_uid:
                continue
            n = match.get("NumberOfSeriesRelatedInstances")
            try:
                count = int(n) if n not in (None, "") else None
            except (TypeError, ValueError):
                count = None
            out.append(RemoteSeries(uid, str(match.get("Modality", "") or "").upper(), count))
        return sorted(out, key=lambda s: s.series_uid)

    def _retrieve(self, study_uid: str, series_uid: str | None) -> tuple[int, int, int]:
        """C-MOVE or C-GET one series (or the whole study when ``series_uid`` is None).

        Returns
        -------
        tuple of int
            (completed, failed, warning) sub-operations of the final response.
        """
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY" if series_uid is None else "SERIES"
        identifier.StudyInstanceUID = study_uid
        if series_uid is not None:
            identifier.SeriesInstanceUID = series_uid
        what = f"study {study_uid}" if series_uid is None else f"series {series_uid}"
        ae = self._ae()
        responses: Callable[[], Iterator[tuple[Dataset, Dataset | None]]]
        if self.section.method == "move":
            model = StudyRootQueryRetrieveInformationModelMove
            ae.add_requested_context(model)
            assoc = self._associate(ae)
            responses = functools.partial(
                assoc.send_c_move, identifier, self.service.settings.node.ae_title, model
            )
        else:
            model = StudyRootQueryRetrieveInformationModelGet
            ae.add_requested_context(model)
            for sop_class in STORAGE_SOP_CLASSES:
                ae.add_requested_context(sop_class, list(TRANSFER_SYNTAXES))
            roles = [build_role(sop_class, scp_role=True) for sop_class in STORAGE_SOP_CLASSES]
            assoc = self._associate(
                ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, self._on_get_store)]
            )
            responses = functools.partial(assoc.send_c_get, identifier, model)
        final: int | None = None
        last: Dataset | None = None
        try:
            _pause_reactor(assoc)
            for status, _ in responses():
                final = _status(status)
                last = status
        finally:
            if assoc.is_established:
                assoc.release()
            with self._lock:
                retrieved = self._retrieved.pop(id(assoc), [])
            self._audit_retrieved(retrieved)
        counts = tuple(
            int(last.get(k, 0) or 0) if last is not None else 0
            for k in (
                "NumberOfCompletedSuboperations",
                "NumberOfFailedSuboperations",
                "NumberOfWarningSuboperations",
            )
        )
        completed, failed, warning = counts
        if final is None or (final not in (0x0000, 0xB000) and final & 0xF000 != 0xB000):
            raise RetrieveError(
                f"C-{self.section.method.upper()} of {what} ended with status "
                f"{'none' if final is None else f'0x{final:04X}'}"
            )
        if failed:
            raise RetrieveError(
                f"C-{self.section.method.upper()} of {what}: "
                f"{failed} sub-operations failed, {completed} completed"
            )
        return completed, failed, warning

    def _audit_retrieved(self, paths: list[Path]) -> None:
        """DICOM Instances Transferred (action C) for what a C-GET brought in (C-MOVE's instances
        arrive on the listener, which records them)."""
        if not paths or self.pacs is None:
            return
        try:
            self.audit.files_transferred(
                paths,
                {str(p) for p in paths},
                source=Participant(
                    self.pacs.ae_title, requestor=False, role=ROLE_SOURCE, host=self.pacs.host
                ),
                destination=self.audit.node(ROLE_DESTINATION, requestor=True),
                action="C",
            )
        except Exception as err:  # the audit trail must not stop a retrieval
            logger.error("audit: C-GET from %s not recorded: %s", self.pacs.ae_title, err)

    def _on_get_store(self, event: evt.Event) -> int:
        """C-STORE sub-operation of a C-GET: store through the node's store, like the SCP."""
        request = cast(C_STORE, event.request)  # an EVT_C_STORE handler gets C-STORE requests
        calling_ae = self.pacs.ae_title if self.pacs else None
        try:
            result = store_event(
                self.service.store, event, calling_ae=calling_ae, association_id=None
            )
        except NodeError as err:
            logger.warning(
                "C-GET sub-operation for %s refused: %s", request.AffectedSOPInstanceUID, err
            )
            return store_status(err)
        if result.outcome is StoreOutcome.STORED:
            self.service.stability.touch(result.study_uid)
        with self._lock:
            # (an instance already held has its index path, relative to the store)
            stored = self.service.store.root / result.path
            self._retrieved.setdefault(id(event.assoc), []).append(stored)
        return store_status(result.outcome)
