"""Issue 17, transfer rows 2-9: PDUs declaring gigabytes before and after association
(``node.scp.limit_pdu_length``); a deflated dataset of 200 MB in 0.2 MB
(``node.store.inflate_bounded``); idle sockets and silent associations that used to lock every
peer out (``node.scp.StorageSCP._on_requested``); a C-STORE whose command set cannot be written
into a file meta, a peer that aborts mid-dataset, an instance larger than the free disk, and a
disk that fills with no low-water mark (``node/incoming.py``).

Each test runs a real ``spine-node serve`` and a scripted pynetdicom peer on 127.0.0.1 that sends
the DIMSE message's P-DATA PDUs itself, so that it can stop half-way or put a 200-character UID in
the command set (pynetdicom refuses to send one). After each fault: no partial file is left in
``storage/tmp/incoming``, a known peer's C-ECHO is answered within 2 s, and ``spine-node verify``
finds store and index consistent. The disk rows run on a 20 MB tmpfs (skipped where mounting is
not permitted).
"""

from __future__ import annotations

import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import MRImageStorage, Verification

from tests.node.dicom_factory import c_store_rq_message, write_mr_series
from tests.node.fixtures import REPO, write_config

pytestmark = pytest.mark.network

#: what a known peer's C-ECHO may take while the node is under a fault (s)
ECHO_WITHIN_S = 2.0


def _peer_ae(transfer_syntax: str = ImplicitVRLittleEndian, ae_title: str = "PYSCU") -> AE:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(MRImageStorage, transfer_syntax)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


def _echo_within(port: int, seconds: float = ECHO_WITHIN_S, ae_title: str = "PYSCU") -> None:
    start = time.monotonic()
    assoc = _peer_ae(ae_title=ae_title).associate("127.0.0.1", port, ae_title="SPINENODE")
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    assert status is not None and status.Status == 0x0000
    assert time.monotonic() - start < seconds


class EchoesThroughout:
    """A known peer (ECHOSCU) sending C-ECHO every 0.25 s from a thread while a fault runs.

    On leaving the block: at least one echo ran during it, every one was answered with Success,
    each within :data:`ECHO_WITHIN_S` (acceptance 1 of issue 17: "throughout rows 1-9").
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.times: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                _echo_within(self.port, seconds=60, ae_title="ECHOSCU")
            except (AssertionError, OSError, RuntimeError) as err:
                self.failures.append(f"{type(err).__name__}: {err}")
            self.times.append(time.monotonic() - start)
            self._stop.wait(0.25)

    def __enter__(self) -> EchoesThroughout:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.times:  # let one echo finish if the fault was quicker than one
            deadline = time.monotonic() + 10
            while not self.times and time.monotonic() < deadline:
                time.sleep(0.02)
        self._stop.set()
        self._thread.join(timeout=30)
        if exc[0] is not None:
            return
        assert self.times, "no echo during the fault"
        assert not self.failures, self.failures
        assert max(self.times) < ECHO_WITHIN_S, self.times
        print(
            f"{len(self.times)} echo(es) during the fault, slowest {max(self.times) * 1e3:.0f} ms"
        )


def _instance(folder: Path, *, side: int, seed: int = 0):
    """An MR instance of ``side`` x ``side`` 16-bit pixels (dataset, implicit VR LE bytes)."""
    (path,) = write_mr_series(folder, 1, rows=side, columns=side, seed=seed)
    ds = dcmread(path)
    return ds, encode(ds, True, True)


def _send_pdus(assoc, ds, payload: bytes, *, fraction: float = 1.0, uid: str | None = None):
    """Send the P-DATA PDUs of a C-STORE-RQ of ``ds`` (``payload``: its encoded dataset) on an
    established association: all of them, or the first ``fraction``; ``uid`` replaces the
    Affected SOP Instance UID of the command set without pynetdicom's check."""
    message = c_store_rq_message(ds, payload)
    if uid is not None:
        message.command_set.AffectedSOPInstanceUID = UID(uid)
    (context,) = [c for c in assoc.accepted_contexts if c.abstract_syntax == MRImageStorage]
    pdus = list(message.encode_msg(context.context_id, 16384))
    # pause the association's reactor, as pynetdicom's own requests do, so that the response
    # stays for dimse.get_msg (released again by assoc.release / abort)
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    for pdata in pdus[: max(1, int(len(pdus) * fraction))]:
        assoc.dul.send_pdu(pdata)
    return len(pdus)


def _incoming(storage: Path) -> list[Path]:
    folder = storage / "tmp" / "incoming"
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def _wait_until(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _verify(config: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", "verify", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _start(node_factory, tmp_path: Path, storage: Path, *, low_water_mb: float = 0) -> tuple:
    config = write_config(tmp_path / "node.toml", storage=storage)
    text = config.read_text(encoding="utf-8")
    config.write_text(
        text.replace("disk_low_water_mb = 0", f"disk_low_water_mb = {low_water_mb}"),
        encoding="utf-8",
    )
    node = node_factory(config)
    return node, node.start(), config


#: resident memory the node may reach under rows 2-4 (MB)
MAX_RSS_MB = 400


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def _flood(sock: socket.socket, header: bytes, total_mb: int = 300) -> int:
    """Send ``header`` then up to ``total_mb`` MB of zeros; the MB sent before the node hung up."""
    chunk = b"\x00" * (1024 * 1024)
    sent = 0
    try:
        sock.sendall(header)
        for sent in range(total_mb):
            sock.sendall(chunk)
    except OSError:  # broken pipe / reset: the node closed the connection
        return sent
    return total_mb


@pytest.mark.parametrize("after_association", [False, True], ids=["row2-associate", "row3-pdata"])
def test_rows2_3_a_pdu_declaring_gigabytes_is_not_buffered(
    tmp_path, node_factory, after_association
):
    storage = tmp_path / "storage"
    node, port, config = _start(node_factory, tmp_path, storage)
    assoc = None
    if after_association:  # a P-DATA-TF PDU declaring 2 GB on an established association
        assoc = _peer_ae().associate("127.0.0.1", port, ae_title="SPINENODE")
        assert assoc.is_established
        sock = assoc.dul.socket.socket
        header = b"\x04\x00" + struct.pack(">L", 2**31)
    else:  # an A-ASSOCIATE-RQ declaring 4 GB, before any AE title is known
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        header = b"\x01\x00" + struct.pack(">L", 0xFFFFFFF0)
    try:
        with EchoesThroughout(port):
            sent_mb = _flood(sock, header)
    finally:
        if assoc is not None:
            assoc.abort()
        else:
            sock.close()
    assert sent_mb < 300  # the node hung up instead of reading on
    assert _peak_rss_mb(node.proc.pid) <= MAX_RSS_MB
    _echo_within(port)
    _verify(config)


def test_row4_a_deflate_bomb_is_refused_without_being_inflated(tmp_path, node_factory):
    storage = tmp_path / "storage"
    node, port, config = _start(node_factory, tmp_path, storage)
    ds, _ = _instance(tmp_path / "in", side=64)
    # 10240 x 10240 16-bit zeros: 200 MiB of pixel data, deflated here chunk by chunk
    del ds.PixelData
    ds.Rows = ds.Columns = 10240
    pixels = 10240 * 10240 * 2
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    payload = deflate.compress(encode(ds, False, True))
    payload += deflate.compress(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixels))
    zeros = bytes(1024 * 1024)
    for _ in range(pixels // len(zeros)):
        payload += deflate.compress(zeros)
    payload += deflate.flush()
    assert len(payload) < 300_000  # about 0.2 MB on the wire
    assoc = _peer_ae(DeflatedExplicitVRLittleEndian).associate(
        "127.0.0.1", port, ae_title="SPINENODE"
    )
    assert assoc.is_established
    with EchoesThroughout(port):
        _send_pdus(assoc, ds, payload)
        _, response = assoc.dimse.get_msg(block=True)
    assoc.release()
    assert response is not None and response.Status == 0xA700
    assert _peak_rss_mb(node.proc.pid) <= MAX_RSS_MB
    assert not list((storage / "instances").rglob("*.dcm"))
    assert _wait_until(lambda: not _incoming(storage)), _incoming(storage)
    _echo_within(port)
    _verify(config)


def test_row5_idle_sockets_and_silent_associations_lock_no_known_peer_out(tmp_path, node_factory):
    storage = tmp_path / "storage"
    node, port, config = _start(node_factory, tmp_path, storage)  # max_associations 10
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(12)]
    silent = []
    try:
        time.sleep(0.5)
        _echo_within(port, ae_title="ECHOSCU")
        # ten associations of one peer that say nothing: six are accepted (per-peer limit)
        silent = [_peer_ae().associate("127.0.0.1", port, ae_title="SPINENODE") for _ in range(10)]
        assert sum(a.is_established for a in silent) == 6
        assert all(a.is_rejected for a in silent if not a.is_established)
        _echo_within(port, ae_title="ECHOSCU")
        _echo_within(port, ae_title="STORESCU")
    finally:
        for assoc in silent:
            if assoc.is_established:
                assoc.abort()
        for sock in idle:
            sock.close()
    _verify(config)


def test_pdus_that_kill_pynetdicoms_network_thread_leave_no_slot_file_or_open_row(
    tmp_path, node_factory
):
    """Found by the fuzz run of ``make bench`` (tests/bench/bench_fuzz.py, case 43): an A-ABORT
    PDU with an invalid source (0xBF) mid-dataset makes pynetdicom's network thread raise; the
    association ends without an end event. Twelve of them (six per calling AE title) must not
    use up the node's ten association slots, leave their partial files, or leave the index's
    association rows open."""
    storage = tmp_path / "storage"
    node, port, config = _start(node_factory, tmp_path, storage)  # max_associations 10
    ds, payload = _instance(tmp_path / "in", side=256)
    invalid_abort = b"\x07\x00" + struct.pack(">L", 4) + b"\x00\x00\xbf\x00"
    for ae_title in ["PYSCU"] * 6 + ["STORESCU"] * 6:
        assoc = _peer_ae(ae_title=ae_title).associate("127.0.0.1", port, ae_title="SPINENODE")
        assert assoc.is_established, ae_title
        _send_pdus(assoc, ds, payload, fraction=0.5)
        assert _wait_until(lambda: bool(_incoming(storage)))
        assoc.dul.socket.socket.sendall(invalid_abort)
        time.sleep(0.2)
        assoc.abort()
    _echo_within(port, ae_title="ECHOSCU")
    _echo_within(port, ae_title="PYSCU")
    assert _wait_until(lambda: not _incoming(storage)), _incoming(storage)
    _verify(config)

    def open_rows() -> int:
        with sqlite3.connect(storage / "index.sqlite3") as db:
            return int(
                db.execute("SELECT COUNT(*) FROM associations WHERE ended IS NULL").fetchone()[0]
            )

    assert _wait_until(lambda: open_rows() == 0), open_rows()


def test_row6_a_200_character_uid_leaves_no_file_and_the_node_serving(tmp_path, node_factory):
    storage = tmp_path / "storage"
    node, port, config = _start(node_factory, tmp_path, storage)
    ds, payload = _instance(tmp_path / "in", side=64)
    for _ in range(3):
        assoc = _peer_ae().associate("127.0.0.1", port, ae_title="SPINENODE")
        assert assoc.is_established
        with EchoesThroughout(port):
            _send_pdus(assoc, ds, payload, uid="1." + "2" * 198)
        # the node answers with a failure status or ends the association; never Success
        response = assoc.dimse.get_msg(block=True)[1] if assoc.is_established else None
        if response is not None:
            assert response.Status != 0x0000
        if assoc.is_established:
            assoc.abort()
        assert _wait_until(lambda: not _incoming(storage)), _incoming(storage)
        _echo_within(port)
    _verify(config)  # exit 0: store and index consistent


def test_row7_transfers_aborted_mid_dataset_leave_no_partial_file(tmp_path, node_factory):
    storage = tmp_path / "storage"
    node, port, config = _start(node_factory, tmp_path, storage)
    ds, payload = _instance(tmp_path / "in", side=1024)  # 2 MB of pixels
    for _ in range(6):
        assoc = _peer_ae().associate("127.0.0.1", port, ae_title="SPINENODE")
        assert assoc.is_established
        with EchoesThroughout(port):
            _send_pdus(assoc, ds, payload, fraction=0.5)
            assert _wait_until(lambda: any(p.stat().st_size > 0 for p in _incoming(storage)))
            assoc.abort()
        assert _wait_until(lambda: not _incoming(storage)), _incoming(storage)
        _echo_within(port)
    # nothing was acknowledged, nothing is stored, and the node still stores
    small, _ = _instance(tmp_path / "small", side=64, seed=1)
    assoc = _peer_ae().associate("127.0.0.1", port, ae_title="SPINENODE")
    assert assoc.send_c_store(small).Status == 0x0000
    assoc.release()
    _verify(config)  # exit 0: store and index consistent


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 20 MB tmpfs (the node's storage), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize(
    "low_water_mb", [0, 4], ids=["row9-no-low-water-disk-fills", "row8-low-water"]
)
def test_rows8_9_an_instance_larger_than_the_free_disk_is_refused_0xA700(
    tmp_path, node_factory, small_disk, low_water_mb
):
    storage = small_disk / "storage"
    node, port, config = _start(node_factory, tmp_path, storage, low_water_mb=low_water_mb)
    big, _ = _instance(tmp_path / "big", side=3500)  # 24.5 MB of pixels on a 20 MB disk
    small, _ = _instance(tmp_path / "small", side=64, seed=1)
    for _ in range(2):  # and again: the node recovers by itself
        assoc = _peer_ae().associate("127.0.0.1", port, ae_title="SPINENODE")
        assert assoc.is_established
        with EchoesThroughout(port):
            status = assoc.send_c_store(big)
        assert status is not None and status.Status == 0xA700
        # the association goes on: the next instance on it is stored
        assert assoc.send_c_store(small).Status == 0x0000
        assoc.release()
        assert _wait_until(lambda: not _incoming(storage)), _incoming(storage)
        _echo_within(port)
        free = subprocess.run(
            ["df", "--output=avail", "-B1", str(small_disk)], capture_output=True, text=True
        )
        assert int(free.stdout.split()[-1]) > 15e6  # the space came back
    _verify(config)  # exit 0: store and index consistent
