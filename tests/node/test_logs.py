"""The command line's logging filter: third-party messages lose quoted values and patient
elements; Python warnings (pydicom's quote the offending value) are filtered too."""

from __future__ import annotations

import logging
import subprocess
import sys

from node.logs import PhiFilter
from tests.node.dicom_factory import BIRTH_DATE, PATIENT_ID, PATIENT_NAME
from tests.node.fixtures import REPO


def _filtered(name: str, message: str, level: int = logging.WARNING) -> str | None:
    record = logging.LogRecord(name, level, __file__, 1, message, None, None)
    return record.getMessage() if PhiFilter().filter(record) else None


def test_patient_elements_and_quoted_values_are_redacted():
    dump = (
        f"(0010,0010) Patient's Name PN: '{PATIENT_NAME}'\n"
        f"(0010,0020) Patient ID LO: {PATIENT_ID}\n(0008,0060) Modality CS: 'MR'"
    )
    out = _filtered("pynetdicom.dsutils", dump, logging.INFO)
    assert out is not None and PATIENT_NAME not in out and PATIENT_ID not in out
    out = _filtered("pydicom.valuerep", f"Invalid value for VR DA: '{BIRTH_DATE}X'")
    assert out == "Invalid value for VR DA: '<redacted>'"
    assert _filtered("pynetdicom.acse", "debug chatter", logging.DEBUG) is None
    assert _filtered("node.scp", "association 1 accepted") == "association 1 accepted"


def test_pydicom_warnings_reach_stderr_only_filtered(tmp_path):
    script = (
        "from node.logs import configure_logging; configure_logging('INFO', %r)\n"
        "from pydicom.dataset import Dataset\n"
        "ds = Dataset(); ds.PatientBirthDate = %r\n" % (str(tmp_path / "log"), BIRTH_DATE + "X")
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    both = run.stderr + (tmp_path / "log").read_text()
    assert "Invalid value for VR DA" in both  # the warning is still reported...
    assert BIRTH_DATE not in both  # ...without the value
