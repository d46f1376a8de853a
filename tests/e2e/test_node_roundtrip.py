"""The node end to end: a phantom patient in by dcmtk ``storescu``, results out to ``storescp``.

Issue 7, acceptance 6: the running node analyses the patient once its studies are stable and
delivers the SEG, Parametric Maps and TID 1500 SR to the configured destination.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.node.fixtures import free_port, require_tool, write_config

pytestmark = [pytest.mark.slow, pytest.mark.network]

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
PMAP = "1.2.840.10008.5.1.4.1.1.30"
SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"


def _received(folder: Path) -> list:
    return [dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir()) if p.is_file()]


def test_phantom_patient_in_results_out(make_phantom, node_factory, tmp_path):
    require_tool("storescu")
    require_tool("storescp")
    patient = make_phantom("responder", "standard", "small")
    received = tmp_path / "received"
    received.mkdir()
    results_port = free_port()
    receiver = subprocess.Popen(
        ["storescp", "+uf", "-od", str(received), "-aet", "RESULTS", str(results_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"TCP_NODELAY": "1"})
    try:
        config = write_config(
            tmp_path / "node.toml", storage=tmp_path / "storage", quiet_period_s=5,
            node_extra='result_destinations = ["RESULTS"]',
            extra=f'[[peers]]\nae_title = "RESULTS"\nport = {results_port}\n'
                  'may_send = false\nmay_receive = true\n')
        node = node_factory(config)
        port = node.start()
        sent = subprocess.run(
            ["storescu", "-aet", "STORESCU", "-aec", "SPINENODE", "+sd", "+r", "127.0.0.1",
             str(port), str(patient / "baseline"), str(patient / "rt"),
             str(patient / "followup1")],
            capture_output=True, text=True, timeout=300, env={"TCP_NODELAY": "1"})
        assert sent.returncode == 0, sent.stderr[-2000:]
        follow_up_uid = str(dcmread(next((patient / "followup1").rglob("*.dcm")),
                                    stop_before_pixels=True).StudyInstanceUID)
        # on a loaded machine a study can look stable before its last series arrived: the node
        # then analyses it again when it is amended. Wait for the complete set.
        deadline = time.monotonic() + 600
        classes: list = []
        while time.monotonic() < deadline:
            # a re-analysis resends objects under the same UIDs: count instances, not files
            classes = list({ds.SOPInstanceUID: ds.SOPClassUID for ds in _received(received)
                            if ds.StudyInstanceUID == follow_up_uid}.values())
            if classes.count(SEG) and classes.count(SR_3D) and classes.count(PMAP) >= 10:
                break
            time.sleep(2)
        assert classes.count(SEG) == 1, classes
        assert classes.count(PMAP) >= 10, classes
        assert classes.count(SR_3D) == 1, classes
        assert node.stop() == 0
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
