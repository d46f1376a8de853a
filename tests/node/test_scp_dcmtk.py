"""Acceptance 1-4 of issue 2 against a real ``spine-node serve`` subprocess and dcmtk tools."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from node.scu import PeerAddress, echo, send_files
from node.store import uid_hash
from tests.node.dicom_factory import dataset_bytes, mr_dataset, write_mr_series
from tests.node.fixtures import require_tool, write_config

pytestmark = pytest.mark.network

DCMTK_ENV = dict(os.environ, TCP_NODELAY="1")


def _db(storage: Path) -> sqlite3.Connection:
    return sqlite3.connect(storage / "index.sqlite3")


def _indexed(storage: Path) -> dict[str, tuple[str, str]]:
    with _db(storage) as db:
        rows = db.execute("SELECT sop_instance_uid, path, sha256 FROM instances").fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


@pytest.fixture(scope="module")
def mr_folder(tmp_path_factory) -> list[Path]:
    return write_mr_series(tmp_path_factory.mktemp("mr200"), 200)


def test_echoscu_and_storescu_folder_are_stored_byte_identical(tmp_path, node_factory, mr_folder):
    require_tool("storescu")
    storage = tmp_path / "storage"
    node = node_factory(write_config(tmp_path / "node.toml", storage=storage))
    port = node.start()
    echo_run = subprocess.run(
        ["echoscu", "-aet", "ECHOSCU", "-aec", "SPINENODE", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
    )
    assert echo_run.returncode == 0, echo_run.stderr
    t0 = time.perf_counter()
    store_run = subprocess.run(
        [
            "storescu",
            "-aet",
            "STORESCU",
            "-aec",
            "SPINENODE",
            "+sd",
            "127.0.0.1",
            str(port),
            str(mr_folder[0].parent),
        ],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
    )
    elapsed = time.perf_counter() - t0
    assert store_run.returncode == 0, store_run.stderr
    indexed = _indexed(storage)
    assert len(indexed) == 200
    for path in mr_folder:
        uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        rel, _sha = indexed[uid]
        stored = storage / rel
        assert dataset_bytes(stored) == dataset_bytes(path)  # the bytes sent over the wire
    print(f"storescu 200 x 64x64 MR: {200 / elapsed:.0f} images/s")
    assert node.stop() == 0
    assert not [p for p in (storage / "tmp").rglob("*") if p.is_file()]


def test_unknown_calling_ae_is_rejected_and_known_accepted(tmp_path, node_factory):
    require_tool("echoscu")
    storage = tmp_path / "storage"
    port = node_factory(write_config(tmp_path / "node.toml", storage=storage)).start()
    bad = subprocess.run(
        ["echoscu", "-aet", "INTRUDER", "-aec", "SPINENODE", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
    )
    assert bad.returncode != 0
    assert "Rejected" in bad.stdout + bad.stderr
    wrong_called = subprocess.run(
        ["echoscu", "-aet", "ECHOSCU", "-aec", "NOTUS", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
    )
    assert wrong_called.returncode != 0
    good = subprocess.run(
        ["echoscu", "-aet", "ECHOSCU", "-aec", "SPINENODE", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
    )
    assert good.returncode == 0, good.stderr
    with _db(storage) as db:
        outcomes = [
            r[0] for r in db.execute("SELECT outcome FROM associations ORDER BY id").fetchall()
        ]
        rejected = db.execute(
            "SELECT COUNT(*) FROM events WHERE kind='association_rejected'"
        ).fetchone()[0]
    assert outcomes[:2] == ["rejected", "rejected"] and outcomes[2] in ("released", "closed")
    assert rejected == 2


def test_sigkill_during_storescu_loses_no_acknowledged_instance(tmp_path, node_factory):
    require_tool("storescu")
    files = write_mr_series(tmp_path / "mr", 400, rows=128, columns=128)
    uid_of = {str(p): dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}
    storage = tmp_path / "storage"
    node = node_factory(write_config(tmp_path / "node.toml", storage=storage))
    port = node.start()
    sender = subprocess.Popen(
        [
            "storescu",
            "-v",
            "-aet",
            "STORESCU",
            "-aec",
            "SPINENODE",
            "+sd",
            "127.0.0.1",
            str(port),
            str(tmp_path / "mr"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=DCMTK_ENV,
    )
    acknowledged: list[str] = []
    current = None
    killed = False
    assert sender.stdout is not None
    for line in sender.stdout:
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current:
            acknowledged.append(current)
            if len(acknowledged) == 150 and not killed:
                node.kill()
                killed = True
    sender.wait(timeout=60)
    assert killed and 150 <= len(acknowledged) < len(files)
    node.start()  # restart on the same storage: recovery runs at start-up
    indexed = _indexed(storage)
    for path in acknowledged:
        rel, _sha = indexed[uid_of[path]]
        assert dataset_bytes(storage / rel) == dataset_bytes(Path(path))
    # no temporary file of ours or of pynetdicom's (tmp/incoming) survives the restart
    assert not [p for p in (storage / "tmp").rglob("*") if p.is_file()]
    # nothing half-written is indexed: every indexed file exists with its recorded size
    with _db(storage) as db:
        for rel, size in db.execute("SELECT path, size FROM instances"):
            assert (storage / rel).stat().st_size == size
    assert node.stop() == 0


def _write(ds, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _change_meta_sop_instance_uid(path: Path) -> None:
    """Change the last digit of (0002,0003) only; pydicom itself would keep them in step."""
    data = bytearray(path.read_bytes())
    uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID).encode()
    meta_end = 144 + int.from_bytes(data[140:144], "little")
    at = data.index(uid, 132, meta_end)
    last = at + len(uid) - 1
    data[last] = ord("1") if data[last] != ord("1") else ord("2")
    path.write_bytes(bytes(data))


def test_bad_inputs_get_their_status_and_the_node_keeps_serving(tmp_path, node_factory):
    storage = tmp_path / "storage"
    port = node_factory(write_config(tmp_path / "node.toml", storage=storage)).start()
    peer = PeerAddress("SPINENODE", "127.0.0.1", port)
    study = generate_uid()

    def new(i: int):
        return mr_dataset(
            study_uid=study, series_uid=generate_uid(), instance_number=i, rows=32, columns=32
        )

    truncated = _write(new(1), tmp_path / "truncated.dcm")
    truncated.write_bytes(truncated.read_bytes()[:-300])
    mismatch = _write(new(2), tmp_path / "mismatch.dcm")
    _change_meta_sop_instance_uid(mismatch)  # the request's UID (from the meta) != dataset's
    traversal_ds = new(3)
    traversal_ds.SOPInstanceUID = "../../x"
    traversal_ds.file_meta.MediaStorageSOPInstanceUID = "../../x"
    traversal = _write(traversal_ds, tmp_path / "traversal.dcm")
    good = _write(new(4), tmp_path / "good.dcm")

    expected = {truncated: 0xC210, mismatch: 0xA900, traversal: 0xC210}
    for path, status in expected.items():
        # each on its own association, each followed by a normal one
        [result] = send_files([path], peer, calling_ae="PYSCU", timeout_s=20)
        assert result.status == status, (path.name, result)
        assert echo(peer, calling_ae="ECHOSCU", timeout_s=20) == 0
    [ok] = send_files([good], peer, calling_ae="PYSCU", timeout_s=20)
    assert ok.status == 0x0000
    indexed = _indexed(storage)
    assert set(indexed) == {str(dcmread(good).SOPInstanceUID)}
    reasons = sorted(p.read_text() for p in (storage / "quarantine").glob("*.error"))
    assert len(reasons) == 2
    assert any("cannot be parsed" in r for r in reasons)
    assert any("SOP Instance UID" in r for r in reasons)
    # nothing was written outside the hashed folders
    assert not (storage.parent.parent / "x").exists() and not (storage.parent / "x").exists()
    names = {p.name for p in (storage / "instances").rglob("*.dcm")}
    assert names == {uid_hash(str(dcmread(good).SOPInstanceUID)) + ".dcm"}


def test_rt_beams_treatment_record_is_stored(tmp_path, node_factory):
    """A CyberKnife RT Beams Treatment Record (the delivered fractions, which date the course) is
    accepted from storescu and indexed; it used to be refused (no presentation context)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian

    require_tool("storescu")
    record = Dataset()
    record.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.4"
    record.SOPInstanceUID = generate_uid()
    record.StudyInstanceUID = generate_uid()
    record.SeriesInstanceUID = generate_uid()
    record.PatientName, record.PatientID = "Record^Patient", "REC-0001"
    record.Modality = "RTRECORD"
    record.Manufacturer = "Accuray Inc."
    record.TreatmentDate, record.TreatmentTime = "20260105", "093000"
    record.InstanceNumber = 1
    record.file_meta = Dataset()
    record.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = _write(record, tmp_path / "record.dcm")
    storage = tmp_path / "storage"
    node = node_factory(write_config(tmp_path / "node.toml", storage=storage))
    port = node.start()
    run = subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "SPINENODE", "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
    )
    assert run.returncode == 0, run.stderr
    indexed = _indexed(storage)
    assert str(record.SOPInstanceUID) in indexed
    rel, _sha = indexed[str(record.SOPInstanceUID)]
    assert dataset_bytes(storage / rel) == dataset_bytes(path)
    with _db(storage) as db:
        modality = db.execute("SELECT modality FROM series").fetchone()
    assert modality == ("RTRECORD",)
    assert node.stop() == 0
