"""A large multi-frame instance is received through a temporary file and a memory map: the
node's peak memory does not grow with the object's size, and the stored file is the bytes sent."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from node.scu import PeerAddress, send_files
from tests.node.dicom_factory import dataset_bytes, mr_dataset
from tests.node.fixtures import write_config

pytestmark = pytest.mark.network

FRAMES, SIZE = 48, 1024  # 48 x 1024 x 1024 x 16 bit = 100 MB of pixel data


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def test_100_mb_instance_does_not_grow_the_node_memory(tmp_path, node_factory):
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc to read the node's peak memory")
    ds = mr_dataset(
        study_uid=generate_uid(), series_uid=generate_uid(), instance_number=1, rows=8, columns=8
    )
    ds.Rows = ds.Columns = SIZE
    ds.NumberOfFrames = FRAMES
    frame = np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE)
    ds.PixelData = np.broadcast_to(frame, (FRAMES, SIZE, SIZE)).tobytes()
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    size_mb = big.stat().st_size / 1e6
    del ds, frame
    storage = tmp_path / "storage"
    node = node_factory(write_config(tmp_path / "node.toml", storage=storage))
    port = node.start()
    before = _peak_rss_mb(node.proc.pid)
    [result] = send_files(
        [big], PeerAddress("SPINENODE", "127.0.0.1", port), calling_ae="PYSCU", timeout_s=120
    )
    assert result.status == 0
    growth = _peak_rss_mb(node.proc.pid) - before
    print(f"{size_mb:.0f} MB instance: node peak memory grew by {growth:.0f} MB")
    assert growth < 0.3 * size_mb
    [stored] = list((storage / "instances").rglob("*.dcm"))
    assert (
        hashlib.sha256(dataset_bytes(stored)).digest()
        == hashlib.sha256(dataset_bytes(big)).digest()
    )
    assert node.stop() == 0
