"""Acceptance 8 of issue 2: no seeded patient name, ID or birth date in any log of the suite.

The test runs its own scenario, so it proves something alone and in any order: seeded
identifiers (one with a malformed birth date, which makes pydicom quote the value in a warning),
rejected associations, a truncated file and a conflicting duplicate, sent to a node; then it
searches every file of the session log folder written so far. The logs of the tests that run
after it (or on the other xdist worker) are searched by the suite-wide check at the end of each
worker's session (``tests/node/fixtures._suite_log_capture``): no test depends on running last.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from node.scu import PeerAddress, send_files
from tests.node.dicom_factory import BIRTH_DATE, PHI_TOKENS, mr_dataset
from tests.node.fixtures import require_tool, write_config

pytestmark = pytest.mark.network


def _scenario(tmp_path: Path, node_factory) -> None:
    require_tool("storescu")
    storage = tmp_path / "storage"
    node = node_factory(write_config(tmp_path / "node.toml", storage=storage))
    port = node.start()
    study = generate_uid()
    folder = tmp_path / "seeded"
    folder.mkdir()
    paths = []
    for i in range(1, 6):
        ds = mr_dataset(
            study_uid=study, series_uid=generate_uid(), instance_number=i, rows=16, columns=16
        )
        if i == 2:
            ds.PatientBirthDate = BIRTH_DATE + "X"  # invalid DA: pydicom warns quoting it
        if i == 3:
            ds.PatientName = "DOE^JOHN^Jürgen"  # non-ASCII
            ds.SpecificCharacterSet = "ISO_IR 192"
        path = folder / f"{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    env = dict(os.environ, TCP_NODELAY="1")
    subprocess.run(
        [
            "storescu",
            "-aet",
            "STORESCU",
            "-aec",
            "SPINENODE",
            "+sd",
            "127.0.0.1",
            str(port),
            str(folder),
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    subprocess.run(
        ["echoscu", "-aet", "INTRUDER", "-aec", "SPINENODE", "127.0.0.1", str(port)],
        capture_output=True,
        env=env,
    )
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(paths[0].read_bytes()[:-50])
    conflict = mr_dataset(
        study_uid=study, series_uid=generate_uid(), instance_number=9, rows=16, columns=16
    )
    from pydicom import dcmread

    conflict.SOPInstanceUID = dcmread(paths[3]).SOPInstanceUID
    conflict.file_meta.MediaStorageSOPInstanceUID = conflict.SOPInstanceUID
    conflict_path = tmp_path / "conflict.dcm"
    conflict.save_as(conflict_path, enforce_file_format=True)
    peer = PeerAddress("SPINENODE", "127.0.0.1", port)
    statuses = [r.status for r in send_files([truncated, conflict_path], peer, calling_ae="PYSCU")]
    assert statuses == [0xC210, 0xB006]
    assert node.stop() == 0


def test_no_seeded_identifier_in_any_log(tmp_path, node_factory, node_log_dir):
    _scenario(tmp_path, node_factory)
    logs = sorted(p for p in node_log_dir.iterdir() if p.is_file())
    text = {p.name: p.read_text(encoding="utf-8", errors="replace") for p in logs}
    # the logs are not empty: they do narrate associations, refusals and conflicts
    joined = "\n".join(text.values())
    for expected in ("association", "refused (0xC210)", "different content"):
        assert expected in joined, expected
    leaks = [(name, token) for name, body in text.items() for token in PHI_TOKENS if token in body]
    assert not leaks, leaks
    print(f"checked {len(logs)} log files, {len(joined):,} characters")
