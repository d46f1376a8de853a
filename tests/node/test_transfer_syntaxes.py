"""Compressed and uncompressed transfer syntaxes are accepted and stored exactly as received.

dcmtk converts the same synthetic MR image into each syntax (``dcmconv``, ``dcmcrle``,
``dcmcjpeg``, ``dcmcjpls``); ``storescu`` proposes each file's own syntax, so the node receives
the bytes in that syntax and must store them unchanged (and parse them: encapsulated pixel data,
deflate, big endian, implicit VR all go through the completeness check).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.node.dicom_factory import dataset_bytes, mr_dataset
from tests.node.fixtures import require_tool, write_config

pytestmark = pytest.mark.network

DEFLATED = "1.2.840.10008.1.2.1.99"
#: transfer syntax -> (dcmtk conversion command, storescu option proposing that syntax)
CONVERSIONS = {
    "1.2.840.10008.1.2": (["dcmconv", "+ti"], "-xi"),
    "1.2.840.10008.1.2.1.99": (["dcmconv", "+td"], "-xd"),
    "1.2.840.10008.1.2.2": (["dcmconv", "+tb"], "-xb"),
    "1.2.840.10008.1.2.5": (["dcmcrle"], "-xr"),
    "1.2.840.10008.1.2.4.70": (["dcmcjpeg"], "-xs"),  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.80": (["dcmcjpls"], "-xt"),  # JPEG-LS lossless
}


def test_each_transfer_syntax_is_stored_as_received(tmp_path, node_factory):
    for tool in ("storescu", "dcmconv", "dcmcrle", "dcmcjpeg", "dcmcjpls"):
        require_tool(tool)
    study = generate_uid()
    source = tmp_path / "source.dcm"
    folder = tmp_path / "converted"
    folder.mkdir()
    sent = {}
    for i, (ts, (command, _option)) in enumerate(CONVERSIONS.items(), start=1):
        ds = mr_dataset(
            study_uid=study, series_uid=generate_uid(), instance_number=i, rows=64, columns=64
        )
        ds.save_as(source, enforce_file_format=True)
        target = folder / f"{i}.dcm"
        subprocess.run([*command, str(source), str(target)], check=True, capture_output=True)
        assert str(dcmread(target, stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts
        sent[str(ds.SOPInstanceUID)] = (ts, target)
    storage = tmp_path / "storage"
    port = node_factory(write_config(tmp_path / "node.toml", storage=storage)).start()
    for ts, path in sent.values():
        # one association per file, proposing the file's own syntax (-R: only that context)
        run = subprocess.run(
            [
                "storescu",
                "-R",
                CONVERSIONS[ts][1],
                "-aet",
                "STORESCU",
                "-aec",
                "SPINENODE",
                "127.0.0.1",
                str(port),
                str(path),
            ],
            capture_output=True,
            text=True,
            env=dict(os.environ, TCP_NODELAY="1"),
        )
        assert run.returncode == 0, run.stdout + run.stderr
    with sqlite3.connect(storage / "index.sqlite3") as db:
        rows = {
            r[0]: (r[1], r[2])
            for r in db.execute("SELECT sop_instance_uid, transfer_syntax_uid, path FROM instances")
        }
    assert set(rows) == set(sent)
    for uid, (ts, path) in sent.items():
        stored_ts, rel = rows[uid]
        assert stored_ts == ts
        received, original = dataset_bytes(storage / rel), dataset_bytes(path)
        if ts == DEFLATED and len(original) % 2:
            # PS3.5 A.5: an odd-length deflated stream is sent with one trailing null byte
            original += b"\x00"
        assert received == original, ts
