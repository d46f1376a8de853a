"""Acceptance 5 and 6 of issue 2 on an in-process :class:`~node.service.NodeService`:
duplicates over the network, stable/amended studies (also across a restart), TCP_NODELAY."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from node.config import AnalysisSection, settings_from_mapping
from node.scu import PeerAddress, send_files
from node.service import NodeService
from tests.node.dicom_factory import mr_dataset, write_mr_series
from tests.node.fixtures import free_port, require_tool

pytestmark = pytest.mark.network

QUIET_S = 3.0  # seconds; margin for a loaded machine (the suite runs on 2 workers)


def _settings(storage: Path, quiet_period_s: float = QUIET_S):
    return settings_from_mapping(
        {
            "node": {
                "port": 0,
                "storage": str(storage),
                "quiet_period_s": quiet_period_s,
                "disk_low_water_mb": 0,
            },
            "peers": [{"ae_title": "PYSCU"}],
        }
    )


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.event = threading.Event()

    def __call__(self, study_uid: str, amended: bool) -> None:
        self.calls.append((study_uid, amended))
        self.event.set()

    def wait(self, timeout: float) -> None:
        assert self.event.wait(timeout), "no stable-study call"
        self.event.clear()


@pytest.fixture
def service(tmp_path):
    svc = NodeService(_settings(tmp_path / "storage"))
    svc.start()
    yield svc
    svc.stop()


def _peer(svc: NodeService) -> PeerAddress:
    return PeerAddress("SPINENODE", "127.0.0.1", svc.address[1])


def test_duplicate_sop_instance_uid_over_the_network(service, tmp_path):
    ds = mr_dataset(
        study_uid=generate_uid(), series_uid=generate_uid(), instance_number=1, rows=32, columns=32
    )
    first = tmp_path / "first.dcm"
    ds.save_as(first, enforce_file_format=True)
    ds.PixelData = bytes(len(ds.PixelData))  # same SOP Instance UID, different content
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed, enforce_file_format=True)
    peer = _peer(service)
    statuses = [r.status for r in send_files([first, first, changed], peer, calling_ae="PYSCU")]
    assert statuses == [0x0000, 0x0000, 0xB006]
    rows = service.index.query("SELECT path, sha256 FROM instances")
    assert len(rows) == 1
    stored = service.store.root / rows[0]["path"]
    assert (
        stored.read_bytes()[-len(ds.PixelData) :] == Path(first).read_bytes()[-len(ds.PixelData) :]
    )
    conflicts = service.index.events("duplicate_conflict")
    assert len(conflicts) == 1 and conflicts[0]["sop_instance_uid"] == ds.SOPInstanceUID
    counts = service.index.query(
        "SELECT n_ok, n_warning, n_failed FROM associations WHERE direction='in'"
    )
    assert tuple(counts[0]) == (2, 1, 0)


def test_split_associations_give_one_stable_then_one_amended_event(service, tmp_path):
    recorder = Recorder()
    service.stability.add_listener(recorder)
    study = generate_uid()
    part1 = write_mr_series(tmp_path / "s1", 3, study_uid=study, rows=16, columns=16)
    part2 = write_mr_series(tmp_path / "s2", 3, study_uid=study, rows=16, columns=16, seed=7)
    late = write_mr_series(tmp_path / "s3", 1, study_uid=study, rows=16, columns=16, seed=9)
    peer = _peer(service)
    t0 = time.monotonic()
    assert all(r.status == 0 for r in send_files(part1, peer, calling_ae="PYSCU"))
    time.sleep(QUIET_S / 2)  # a pause shorter than the quiet period, then a new association
    assert all(r.status == 0 for r in send_files(part2, peer, calling_ae="PYSCU"))
    recorder.wait(QUIET_S * 4)
    stable_after = time.monotonic() - t0
    assert stable_after >= QUIET_S * 1.5 - 0.1  # armed by the second association
    time.sleep(QUIET_S / 2)
    assert recorder.calls == [(study, False)]
    assert [e["study_uid"] for e in service.index.events("study_stable")] == [study]
    assert send_files(late, peer, calling_ae="PYSCU")[0].status == 0
    recorder.wait(QUIET_S * 4)
    assert recorder.calls == [(study, False), (study, True)]
    assert len(service.index.events("study_stable")) == 1
    assert [e["study_uid"] for e in service.index.events("study_amended")] == [study]
    assert len(service.index.study_instances(study)) == 7


def test_receiving_study_is_rearmed_after_restart(tmp_path):
    storage = tmp_path / "storage"
    svc = NodeService(_settings(storage, quiet_period_s=30))
    svc.start()
    study = generate_uid()
    files = write_mr_series(tmp_path / "s", 2, study_uid=study, rows=16, columns=16)
    assert all(r.status == 0 for r in send_files(files, _peer(svc), calling_ae="PYSCU"))
    svc.stop()  # before the 30 s quiet period ended
    restarted = NodeService(_settings(storage, quiet_period_s=QUIET_S))
    recorder = Recorder()
    restarted.stability.add_listener(recorder)
    restarted.start()
    try:
        recorder.wait(QUIET_S * 4)
        assert recorder.calls == [(study, False)]
    finally:
        restarted.stop()


def test_tcp_nodelay_on_accepted_sockets(service):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", service.address[1], ae_title="SPINENODE")
    try:
        assert assoc.is_established
        [server_side] = service.scp.server.active_associations
        sock = server_side.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()


def test_sending_sets_tcp_nodelay_on_the_scu_socket(tmp_path, monkeypatch):
    """Our SCU disables Nagle's algorithm on its socket: without it pynetdicom -> storescp stalls
    on delayed ACKs (~40 images/s). Delivery time is measured by ``make bench`` (the end-to-end
    benchmark's "last output delivered", tests/bench/bench_e2e.py), not here: this checks the
    option on every connection the SCU opens."""
    import node.scu

    require_tool("storescp")
    seen: list[int] = []
    real = node.scu.set_tcp_nodelay

    def spy(event):
        real(event)
        sock = event.assoc.dul.socket.socket
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    monkeypatch.setattr(node.scu, "set_tcp_nodelay", spy)
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    receiver = subprocess.Popen(
        ["storescp", "-od", str(out), "-aet", "STORESCP", str(port)],
        env=dict(os.environ, TCP_NODELAY="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        files = write_mr_series(tmp_path / "mr", 20, rows=32, columns=32)
        peer = PeerAddress("STORESCP", "127.0.0.1", port)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "storescp did not start"
                time.sleep(0.05)
        results = send_files(files, peer, calling_ae="SPINENODE")
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
    assert all(r.status == 0 for r in results)
    assert len(list(out.iterdir())) == len(files)
    assert seen and all(seen), seen


def test_patient_analysed_once_when_its_last_receiving_study_is_stable(tmp_path):
    """Two studies of one patient: the first becomes stable while the second is still arriving;
    its analysis is deferred, and the second's stability starts one analysis that sees both."""
    settings = _settings(tmp_path / "storage").model_copy(
        update={"analysis": AnalysisSection(enabled=True)}
    )
    service = NodeService(settings)
    service.start()
    try:
        first, second = generate_uid(), generate_uid()
        peer = _peer(service)
        early = write_mr_series(tmp_path / "a", 2, study_uid=first, rows=16, columns=16)
        assert all(r.status == 0 for r in send_files(early, peer, calling_ae="PYSCU"))
        # the second study keeps arriving for longer than the first study's quiet period
        for n in range(4):
            part = write_mr_series(
                tmp_path / f"b{n}", 1, study_uid=second, rows=16, columns=16, seed=n + 3
            )
            assert send_files(part, peer, calling_ae="PYSCU")[0].status == 0
            time.sleep(QUIET_S * 0.6)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not service.index.events("analysis_waiting"):
            time.sleep(0.2)
        [deferred] = service.index.events("analysis_deferred")
        assert deferred["study_uid"] == first
        # one run, for the study that was stable last; it found no RT course and waits
        assert [e["study_uid"] for e in service.index.events("analysis_started")] == [second]
        [waiting] = service.index.events("analysis_waiting")
        assert "no CyberKnife" in waiting["detail"]
    finally:
        service.stop()
