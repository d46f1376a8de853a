"""Issue 5 (node side): priors from the PACS — query/retrieve, throttling, retries, refusals.

The PACS is a pynetdicom Query/Retrieve SCP in this process (real DIMSE on loopback): C-FIND at
study and series level, C-MOVE (it opens its own association to the node's listener and
C-STOREs) and C-GET. The node is an in-process :class:`~node.service.NodeService`. Its STUDY-level
matching deliberately ignores IssuerOfPatientID, like a PACS that does not index it, so that the
node's own refusal of another issuer's study is what is tested (acceptance 6).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RTPlanStorage, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    MRImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.sop_class import (
    RTPlanStorage as RTPlanSOP,
)

from node.config import AnalysisSection, settings_from_mapping
from node.errors import ConfigError
from node.ingest import import_files
from node.priors import CoursesSection, PriorsFetcher, pacs_peer
from node.service import NodeService
from tests.node.dicom_factory import PATIENT_ID, mr_dataset

ISSUER = "HOSPITAL-A"
D0 = dt.date(2026, 3, 2)  # baseline and planning study date


def _mr_series(
    study_uid: str,
    date: dt.date,
    count: int,
    *,
    patient_id: str = PATIENT_ID,
    issuer: str = ISSUER,
    seed: int = 0,
) -> list[Dataset]:
    series_uid = generate_uid()
    out = []
    for i in range(1, count + 1):
        ds = mr_dataset(
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=i,
            rows=8,
            columns=8,
            patient_id=patient_id,
            seed=seed,
        )
        ds.IssuerOfPatientID = issuer
        ds.StudyDate = date.strftime("%Y%m%d")
        out.append(ds)
    return out


def _rtplan(study_uid: str, date: dt.date, *, issuer: str = ISSUER) -> Dataset:
    """A minimal (non-CyberKnife) RT Plan: enough for the store and the index."""
    ds = Dataset()
    ds.SOPClassUID = RTPlanStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = PATIENT_ID
    ds.IssuerOfPatientID = issuer
    ds.PatientName = "DOE^JOHN"
    ds.StudyDate = date.strftime("%Y%m%d")
    ds.Modality = "RTPLAN"
    ds.Manufacturer = "SYNTHETIC"
    ds.RTPlanLabel = "PLAN"
    ds.RTPlanDate = date.strftime("%Y%m%d")
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


class FakePacs:
    """A Study Root Q/R SCP over a list of datasets, with fault injection and bookkeeping."""

    def __init__(self, datasets: list[Dataset]) -> None:
        self.datasets = datasets
        self.destination: tuple[str, int] | None = None
        self.fail_retrieves = 0
        self.retrieve_delay_s = 0.0
        self.find_log: list[tuple[str, float, str]] = []  # (level, time, patient id or study)
        self.retrieve_log: list[str] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        self.ae = AE(ae_title="FAKEPACS")
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        self.ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        for sop in (MRImageStorage, RTPlanSOP):
            self.ae.add_requested_context(sop, ExplicitVRLittleEndian)  # C-MOVE sub-operations
            self.ae.add_supported_context(sop, ExplicitVRLittleEndian, scu_role=True, scp_role=True)
        handlers = [
            (evt.EVT_C_FIND, self._find),
            (evt.EVT_C_MOVE, self._move),
            (evt.EVT_C_GET, self._get),
        ]
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = int(self.server.socket.getsockname()[1])

    def close(self) -> None:
        self.server.shutdown()

    def _find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        level = str(query.QueryRetrieveLevel)
        if level == "STUDY":
            self.find_log.append((level, time.monotonic(), str(query.PatientID)))
            studies: dict[str, list[Dataset]] = {}
            for ds in self.datasets:
                if ds.PatientID == query.PatientID:  # issuer ignored on purpose
                    studies.setdefault(ds.StudyInstanceUID, []).append(ds)
            for uid, members in studies.items():
                first = members[0]
                rsp = Dataset()
                rsp.QueryRetrieveLevel = "STUDY"
                rsp.PatientID = first.PatientID
                rsp.IssuerOfPatientID = first.IssuerOfPatientID
                rsp.StudyInstanceUID = uid
                rsp.StudyDate = first.StudyDate
                rsp.ModalitiesInStudy = sorted({str(d.Modality) for d in members})
                rsp.NumberOfStudyRelatedInstances = len(members)
                yield 0xFF00, rsp
        elif level == "SERIES":
            self.find_log.append((level, time.monotonic(), str(query.StudyInstanceUID)))
            series: dict[str, list[Dataset]] = {}
            for ds in self.datasets:
                if ds.StudyInstanceUID == query.StudyInstanceUID:
                    series.setdefault(ds.SeriesInstanceUID, []).append(ds)
            for uid, members in series.items():
                rsp = Dataset()
                rsp.QueryRetrieveLevel = "SERIES"
                rsp.StudyInstanceUID = query.StudyInstanceUID
                rsp.SeriesInstanceUID = uid
                rsp.Modality = members[0].Modality
                rsp.NumberOfSeriesRelatedInstances = len(members)
                yield 0xFF00, rsp
        else:
            yield 0xC000, None
            return
        yield 0x0000, None

    def _matches(self, identifier: Dataset) -> list[Dataset]:
        if identifier.QueryRetrieveLevel == "STUDY":
            return [
                ds for ds in self.datasets if ds.StudyInstanceUID == identifier.StudyInstanceUID
            ]
        return [ds for ds in self.datasets if ds.SeriesInstanceUID == identifier.SeriesInstanceUID]

    def _enter(self, identifier: Dataset) -> bool:
        with self._lock:
            self.retrieve_log.append(
                f"STUDY {identifier.StudyInstanceUID}"
                if identifier.QueryRetrieveLevel == "STUDY"
                else f"SERIES {identifier.SeriesInstanceUID}"
            )
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            if self.fail_retrieves > 0:
                self.fail_retrieves -= 1
                return False
        time.sleep(self.retrieve_delay_s)
        return True

    def _leave(self) -> None:
        with self._lock:
            self.active -= 1

    def _move(self, event: evt.Event) -> Iterator[Any]:
        assert self.destination is not None and event.move_destination.strip() == "SPINENODE"
        ok = self._enter(event.identifier)
        try:
            yield self.destination
            if not ok:
                yield 1
                yield 0xA702, None  # refused: out of resources (sub-operations)
                return
            matches = self._matches(event.identifier)
            yield len(matches)
            for ds in matches:
                yield 0xFF00, ds
        finally:
            self._leave()

    def _get(self, event: evt.Event) -> Iterator[Any]:
        ok = self._enter(event.identifier)
        try:
            if not ok:
                yield 1
                yield 0xA702, None
                return
            matches = self._matches(event.identifier)
            yield len(matches)
            for ds in matches:
                yield 0xFF00, ds
        finally:
            self._leave()


def _settings(storage: Path, pacs_port: int, **courses: Any) -> Any:
    section = {
        "pacs": "FAKEPACS",
        "min_interval_s": 0,
        "retries": 2,
        "retry_delay_s": 0.05,
        "timeout_s": 10,
        **courses,
    }
    return settings_from_mapping(
        {
            "node": {
                "ae_title": "SPINENODE",
                "port": 0,
                "storage": str(storage),
                "quiet_period_s": 30,
                "disk_low_water_mb": 0,
            },
            "peers": [
                {"ae_title": "FAKEPACS", "port": pacs_port, "may_send": True, "may_receive": True}
            ],
            "analysis": {"enabled": False},
            "dashboard": {"enabled": False},
            "courses": section,
        }
    )


@pytest.fixture
def pacs_data() -> dict[str, Any]:
    """Baseline + planning study, an old MR study, another issuer's study, the follow-up."""
    base_uid, old_uid, other_uid, fu_uid = (generate_uid() for _ in range(4))
    baseline_mr = _mr_series(base_uid, D0, 3, seed=1)
    plan = _rtplan(base_uid, D0)
    old = _mr_series(old_uid, D0 - dt.timedelta(days=200), 2, seed=2)
    other = _mr_series(other_uid, D0 - dt.timedelta(days=5), 2, issuer="HOSPITAL-B", seed=3)
    follow_up = _mr_series(fu_uid, D0 + dt.timedelta(days=90), 2, seed=4)
    return {
        "baseline": baseline_mr,
        "plan": plan,
        "old": old,
        "other": other,
        "follow_up": follow_up,
        "uids": {"baseline": base_uid, "old": old_uid, "other": other_uid, "follow_up": fu_uid},
    }


def _node(tmp_path: Path, pacs: FakePacs, follow_up: list[Dataset], **courses: Any) -> NodeService:
    service = NodeService(_settings(tmp_path / "storage", pacs.port, **courses))
    host, port = service.start()
    pacs.destination = (host, port)
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    paths = []
    for ds in follow_up:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    assert len(import_files(service.store, paths).stored) == len(follow_up)
    return service


def _patient_row(service: NodeService, study_uid: str) -> int:
    return int(
        service.index.query("SELECT patient_key FROM studies WHERE study_uid=?", (study_uid,))[0][0]
    )


def _kinds(service: NodeService) -> dict[str, int]:
    rows = service.index.query(
        "SELECT kind, COUNT(*) FROM events WHERE kind LIKE 'priors_%' OR kind='patient_mismatch'"
        " GROUP BY kind"
    )
    return {str(r[0]): int(r[1]) for r in rows}


def _audit_log(service: NodeService) -> bytes:
    path = service.settings.node.storage / "audit" / "audit.log"
    return path.read_bytes() if path.is_file() else b""


def _wait(predicate: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _held(service: NodeService, study_uid: str) -> int:
    return len(service.index.study_instances(study_uid))


@pytest.mark.parametrize("method", ["move", "get"])
def test_fetch_retrieves_course_and_baseline_and_refuses_other_issuer(tmp_path, pacs_data, method):
    pacs = FakePacs(
        pacs_data["baseline"]
        + [pacs_data["plan"]]
        + pacs_data["old"]
        + pacs_data["other"]
        + pacs_data["follow_up"]
    )
    uids = pacs_data["uids"]
    service = _node(tmp_path, pacs, pacs_data["follow_up"], method=method)
    try:
        row = _patient_row(service, uids["follow_up"])
        fetcher = PriorsFetcher(service, audit=service.audit)
        report = fetcher.fetch(row, uids["follow_up"])
        # the audit trail: the C-FINDs, and the 4 instances that came (through the listener for
        # C-MOVE, on the node's own association for C-GET), from FAKEPACS
        _wait(lambda: b'EventActionCode="C"' in _audit_log(service), 10)
        log = _audit_log(service).splitlines()
        assert sum(b'csd-code="110112"' in m for m in log) == len(pacs.find_log)  # one per C-FIND
        [received] = [m for m in log if b'csd-code="110104"' in m]
        assert b'UserID="FAKEPACS"' in received and b'NumberOfInstances="3"' in received
        assert b'NumberOfInstances="1"' in received  # the RT Plan
        # 3 baseline MR + 1 RT Plan came; the old study (200 d before) and the other issuer's
        # study (same PatientID, HOSPITAL-B) did not
        assert report.state == "retrieved"
        assert (report.completed, report.failed) == (4, 0)
        assert report.studies_found == 3  # baseline, old, follow-up (other issuer refused)
        assert report.refused == [uids["other"]]
        assert sorted(report.requested) == sorted(
            {pacs_data["baseline"][0].SeriesInstanceUID, pacs_data["plan"].SeriesInstanceUID}
        )
        assert _held(service, uids["baseline"]) == 4
        assert _held(service, uids["old"]) == 0 and _held(service, uids["other"]) == 0
        # what came is the same patient row: never another patient's
        assert _patient_row(service, uids["baseline"]) == row
        # the whole baseline study was missing: one STUDY-level retrieval
        assert pacs.retrieve_log == [f"STUDY {uids['baseline']}"]
        assert _kinds(service) == {
            "priors_query": 1,
            "priors_refused": 1,
            "priors_retrieve": 1,
            "priors_retrieved": 1,
        }
        detail = service.index.events("priors_query")[0]["detail"]
        assert "3 studies, 2 prior" in detail and PATIENT_ID not in detail
        # a second round finds everything on the node: nothing is asked again
        again = fetcher.fetch(row, uids["follow_up"])
        assert again.state == "none" and again.requested == []
        assert len(pacs.retrieve_log) == 1
        assert _kinds(service)["priors_none"] == 1
    finally:
        service.stop()
        pacs.close()


def test_retries_then_success_and_retries_exhausted(tmp_path, pacs_data):
    pacs = FakePacs(pacs_data["baseline"] + [pacs_data["plan"]] + pacs_data["follow_up"])
    uids = pacs_data["uids"]
    service = _node(tmp_path, pacs, pacs_data["follow_up"], retries=2, retry_delay_s=0.05)
    try:
        row = _patient_row(service, uids["follow_up"])
        fetcher = PriorsFetcher(service)
        pacs.fail_retrieves = 2  # the retrieval fails twice, succeeds on the 3rd attempt
        report = fetcher.fetch(row, uids["follow_up"])
        assert report.state == "retrieved" and report.completed == 4
        # 2 C-FIND (study level, series level of the one prior study) + 3 retrievals
        assert len(pacs.retrieve_log) == 3
        assert report.attempts == 2 + 3
        assert _held(service, uids["baseline"]) == 4
    finally:
        service.stop()
        pacs.close()

    pacs = FakePacs(pacs_data["baseline"] + [pacs_data["plan"]] + pacs_data["follow_up"])
    service = _node(
        tmp_path / "second", pacs, pacs_data["follow_up"], retries=1, retry_delay_s=0.05
    )
    try:
        row = _patient_row(service, uids["follow_up"])
        pacs.fail_retrieves = 10  # never succeeds: 2 attempts, then recorded
        report = PriorsFetcher(service).fetch(row, uids["follow_up"])
        assert report.state == "failed" and report.completed == 0
        assert len(pacs.retrieve_log) == 2
        failed = service.index.events("priors_failed")
        assert len(failed) == 1 and "0xA702" in failed[0]["detail"]
        assert _held(service, uids["baseline"]) == 0
    finally:
        service.stop()
        pacs.close()


def test_series_level_retrieval_of_the_missing_part_only(tmp_path, pacs_data):
    """The node holds the planning study's RT Plan: only the baseline MR series is asked for."""
    pacs = FakePacs(pacs_data["baseline"] + [pacs_data["plan"]] + pacs_data["follow_up"])
    uids = pacs_data["uids"]
    service = _node(tmp_path, pacs, pacs_data["follow_up"] + [pacs_data["plan"]])
    try:
        row = _patient_row(service, uids["follow_up"])
        report = PriorsFetcher(service).fetch(row, uids["follow_up"])
        assert report.requested == [pacs_data["baseline"][0].SeriesInstanceUID]
        assert pacs.retrieve_log == [f"SERIES {pacs_data['baseline'][0].SeriesInstanceUID}"]
        assert (report.completed, report.failed) == (3, 0)
        assert _held(service, uids["baseline"]) == 4
    finally:
        service.stop()
        pacs.close()


@pytest.mark.parametrize("max_concurrent", [1, 2])
def test_at_most_max_concurrent_retrievals(tmp_path, max_concurrent):
    """Two patients waiting at once: their retrievals overlap only up to ``max_concurrent``."""
    data: list[Dataset] = []
    follow_ups: list[list[Dataset]] = []
    for k, pid in enumerate(("PID-123", "PID-123-B")):
        base, fu = generate_uid(), generate_uid()
        data += _mr_series(base, D0, 2, patient_id=pid, seed=10 + k)
        plan = _rtplan(base, D0)
        plan.PatientID = pid
        data.append(plan)
        follow_ups.append(_mr_series(fu, D0 + dt.timedelta(days=60), 1, patient_id=pid))
    pacs = FakePacs(data)
    pacs.retrieve_delay_s = 0.4
    service = _node(tmp_path, pacs, follow_ups[0] + follow_ups[1], max_concurrent=max_concurrent)
    try:
        fetcher = PriorsFetcher(service)
        futures = [
            fetcher.request(
                _patient_row(service, fu[0].StudyInstanceUID), fu[0].StudyInstanceUID, "test"
            )
            for fu in follow_ups
        ]
        reports = [f.result(timeout=60) for f in futures if f is not None]
        assert [r.completed for r in reports] == [3, 3]
        assert pacs.max_active == max_concurrent
    finally:
        service.stop()
        pacs.close()


def test_min_interval_defers_and_coalesces_queries_of_a_patient(tmp_path, pacs_data):
    pacs = FakePacs(pacs_data["baseline"] + [pacs_data["plan"]] + pacs_data["follow_up"])
    uids = pacs_data["uids"]
    interval = 1.5
    service = _node(tmp_path, pacs, pacs_data["follow_up"], min_interval_s=interval)
    try:
        row = _patient_row(service, uids["follow_up"])
        fetcher = PriorsFetcher(service)
        first = fetcher.request(row, uids["follow_up"], "no baseline")
        assert first is not None and first.result(timeout=30).completed == 4
        assert fetcher.request(row, uids["follow_up"], "again") is None  # deferred
        assert fetcher.request(row, uids["follow_up"], "and again") is None  # coalesced
        deadline = time.monotonic() + 20
        while sum(1 for f in pacs.find_log if f[0] == "STUDY") < 2:
            assert time.monotonic() < deadline, "the deferred query never ran"
            time.sleep(0.05)
        study_queries = [t for level, t, _ in pacs.find_log if level == "STUDY"]
        gap = study_queries[1] - study_queries[0]
        assert interval - 0.05 <= gap < interval + 3.0
        time.sleep(0.5)
        assert len(study_queries) == 2 == sum(1 for f in pacs.find_log if f[0] == "STUDY")
        assert _kinds(service)["priors_deferred"] == 1
    finally:
        service.stop()
        pacs.close()


def test_courses_section_validation():
    base = {
        "node": {"port": 0},
        "peers": [
            {"ae_title": "PACS", "may_send": False, "may_receive": True},
            {"ae_title": "NOQR", "may_send": True, "may_receive": False},
        ],
    }
    with pytest.raises(ConfigError, match="courses.method"):
        settings_from_mapping({**base, "courses": {"pacs": "PACS", "method": "push"}})
    with pytest.raises(ConfigError, match="courses.max_concurrent"):
        settings_from_mapping({**base, "courses": {"max_concurrent": 0}})
    settings = settings_from_mapping({**base, "courses": {"pacs": "PACS", "method": "get"}})
    section = settings.courses
    assert isinstance(section, CoursesSection) and section.method == "get"
    assert pacs_peer(settings, section).ae_title == "PACS"
    # C-MOVE needs the PACS to be allowed to send to us; a peer we cannot query is refused
    move = settings_from_mapping({**base, "courses": {"pacs": "PACS"}})
    with pytest.raises(ConfigError, match="may_send"):
        pacs_peer(move, move.courses)
    noqr = settings_from_mapping({**base, "courses": {"pacs": "NOQR"}})
    with pytest.raises(ConfigError, match="may_receive"):
        pacs_peer(noqr, noqr.courses)
    unknown = settings_from_mapping({**base, "courses": {"pacs": "NOBODY"}})
    with pytest.raises(ConfigError, match="no peer"):
        pacs_peer(unknown, unknown.courses)


def _wait_for_event(service: NodeService, kind: str, timeout_s: float = 60.0) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    while not service.index.events(kind):
        assert time.monotonic() < deadline, f"no {kind} event within {timeout_s} s"
        time.sleep(0.05)
    return service.index.events(kind)


def test_patient_mismatch_is_refused_and_recorded_by_the_worker(tmp_path):
    """Acceptance 6 on the node path: the analysis worker runs the chain (child process), which
    refuses; the worker's hook records it; nothing is combined and the PACS is not asked."""
    fu_uid = generate_uid()
    intruder = _mr_series(fu_uid, D0 + dt.timedelta(days=90), 1, patient_id="PID-999", seed=5)
    follow_up = _mr_series(fu_uid, D0 + dt.timedelta(days=90), 2, seed=4) + intruder
    # a baseline (with a CyberKnife-less plan) under another issuer, same PatientID
    other_base = generate_uid()
    other_issuer = _mr_series(other_base, D0, 2, patient_id="PID-456", issuer="HOSPITAL-B")
    fu2_uid = generate_uid()
    follow_up2 = _mr_series(fu2_uid, D0 + dt.timedelta(days=90), 2, patient_id="PID-456")
    pacs = FakePacs(other_issuer)  # the PACS only has the other issuer's baseline
    settings = _settings(tmp_path / "storage", pacs.port)
    settings = settings.model_copy(update={"analysis": AnalysisSection(enabled=True)})
    service = NodeService(settings)
    service.start()
    try:
        folder = tmp_path / "in"
        folder.mkdir()
        paths = []
        for ds in follow_up + other_issuer + follow_up2:
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        assert len(import_files(service.store, paths).stored) == 7
        # 1) one study UID, two PatientIDs: the study belongs to the first patient's row
        row = _patient_row(service, fu_uid)
        outcome = service.analysis.analyse(row, study_uid=fu_uid)
        assert outcome["state"] == "waiting" and "two different patients" in outcome["reason"]
        mismatch = _wait_for_event(service, "patient_mismatch")
        assert len(mismatch) == 1 and mismatch[0]["study_uid"] == fu_uid
        assert "PID-999" not in mismatch[0]["detail"] and PATIENT_ID not in mismatch[0]["detail"]
        assert pacs.find_log == []  # a mismatched patient is never queried for
        # 2) a baseline with a different issuer is another patient: never in this analysis
        row2 = _patient_row(service, fu2_uid)
        assert row2 != _patient_row(service, other_base)
        outcome = service.analysis.analyse(row2, study_uid=fu2_uid)
        assert outcome["state"] == "waiting" and "no CyberKnife" in outcome["reason"]
        _wait_for_event(service, "priors_none")
        refused = service.index.events("priors_refused")
        assert [r["study_uid"] for r in refused] == [other_base]
        assert pacs.retrieve_log == []
        assert not service.index.events("analysis_done")
        assert len(service.index.events("patient_mismatch")) == 1
    finally:
        service.stop()  # stops the priors fetcher it owns
        pacs.close()


def test_with_the_course_on_the_node_the_baseline_window_uses_its_treatment_date(
    tmp_path, make_phantom
):
    """The node holds the phantom's CyberKnife RT Plan (treatment date T from processing.course):
    of the PACS's MR studies only the latest one within ``baseline_window_days`` before T is
    asked for — not one after T, not one outside the window."""
    import json

    from pydicom import dcmread

    phantom = make_phantom("responder", "standard", "small")
    truth = json.loads((phantom / "ground_truth.json").read_text(encoding="utf-8"))
    treatment = dt.datetime.strptime(truth["course"]["treatment_date"], "%Y%m%d").date()
    pid = truth["patient"]["PatientID"]
    issuer = truth["patient"]["IssuerOfPatientID"]
    plan = dcmread(phantom / "rt" / "rtplan.dcm")
    studies = {name: generate_uid() for name in ("in_window", "earlier", "outside", "after")}
    dates = {
        "in_window": treatment - dt.timedelta(days=6),
        "earlier": treatment - dt.timedelta(days=30),
        "outside": treatment - dt.timedelta(days=40),
        "after": treatment + dt.timedelta(days=10),
    }
    pacs_sets = []
    for k, name in enumerate(studies):
        pacs_sets += _mr_series(
            studies[name], dates[name], 2, patient_id=pid, issuer=issuer, seed=20 + k
        )
    fu_uid = generate_uid()
    follow_up = _mr_series(
        fu_uid, treatment + dt.timedelta(days=90), 1, patient_id=pid, issuer=issuer
    )
    pacs = FakePacs(pacs_sets + follow_up)
    service = _node(tmp_path, pacs, follow_up + [plan], baseline_window_days=35)
    try:
        row = _patient_row(service, fu_uid)
        report = PriorsFetcher(service).fetch(row, fu_uid)
        assert "course on node: yes" in service.index.events("priors_query")[0]["detail"]
        assert pacs.retrieve_log == [f"STUDY {studies['in_window']}"]
        assert report.completed == 2
        held = {r[0] for r in service.index.query("SELECT study_uid FROM studies")}
        assert held == {fu_uid, plan.StudyInstanceUID, studies["in_window"]}
    finally:
        service.stop()
        pacs.close()
