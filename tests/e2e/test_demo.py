"""``spine-node demo`` (issue 8, acceptance 2): a newcomer's first run, end to end.

The demo is run as ``make demo`` runs it (the ``spine-node`` command line, here with ``--out`` in
a temporary folder), once per suite. The printed summary is checked against the phantom's ground
truth and the node's ``summary.json``, and every object the node produced must have reached the
demo's result receiver. A second run in the same folder starts by emptying it (it is not
appended to): that is checked on the finished run's real folder (node storage, index, logs,
phantom, received objects), after which a second run is the first one again; a folder the demo
did not make is never emptied. ``make bench`` (``tests/bench/bench_demo.py``) runs the demo twice
in one folder, as a newcomer would, and times both runs against the acceptance's 5 minutes on an
otherwise idle machine.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from node.commands.demo import MARKER, DemoError, prepare_output

REPO = Path(__file__).resolve().parents[2]
#: a hung demo fails the test instead of the suite (the time limit is a benchmark's)
DEMO_TIMEOUT_S = 900


def _demo(out: Path) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "node.cli", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        cwd=REPO,
    )
    return run, time.monotonic() - t0


def _check_run(run: subprocess.CompletedProcess, out: Path) -> None:
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])
    truth = json.loads((out / "phantom" / "ground_truth.json").read_text())
    [summary_path] = (out / "storage" / "results").glob("patient-*/summary.json")
    summary = json.loads(summary_path.read_text())
    text = run.stdout

    # what was sent: both MR studies and the RT course, every instance accepted
    sent = {int(n) for n in re.findall(r"MRI: (\d+) instance\(s\)", text)}
    n_baseline = len(list((out / "phantom" / "baseline").rglob("*.dcm")))
    assert sent == {n_baseline}  # the phantom's baseline and follow-up have the same series
    assert "RT course (RTPLAN, RTSTRUCT, RTDOSE): 3 instance(s)" in text

    # the course found, as the ground truth wrote it
    course = truth["course"]
    assert (
        f"{course['fractions']} x {course['dose_per_fraction_gy']:.2f} Gy = "
        f"{course['total_dose_gy']:.2f} Gy prescribed"
    ) in text
    # the response call with its evidence: the phantom's expected call and fired criteria
    expected = truth["studies"]["followup1"]["expected_response"]
    assert f"RESPONSE: {expected} (" in text
    assert re.search(r"^\s+\[x\] ", text, re.M)
    assert "change of volume from baseline:" in text
    # the follow-up volume printed is the node's measurement
    follow_up = [tp for tp in summary["time_points"] if tp["role"] == "follow-up"][-1]
    assert f"volume {follow_up['measurements']['volume']:.2f} mL" in text

    # every object of the final analysis reached the receiver, as the node wrote it
    received = {p.stem: p for p in (out / "received").glob("*.dcm")}
    outputs = summary["outputs"]
    assert len(outputs) >= 30  # 2 SEG, ~30 parametric maps, SR, REG, PDF for 2 studies
    for output in outputs:
        ds = dcmread(received[output["sop_instance_uid"]], stop_before_pixels=True)
        assert ds.SOPClassUID == output["sop_class_uid"]
        assert ds.StudyInstanceUID == output["study_instance_uid"]
    classes = [o["sop_class_uid"] for o in outputs]
    assert classes.count("1.2.840.10008.5.1.4.1.1.66.4") == 2  # SEG baseline + follow-up
    assert classes.count("1.2.840.10008.5.1.4.1.1.88.34") == 1  # TID 1500 SR
    # where things are, and no patient identifier on the console
    assert str(out / "received") in text and "dashboard" in text
    for token in ("PHANTOM^", "PHID-"):
        assert token not in text and token not in run.stderr


@pytest.mark.slow
@pytest.mark.network
def test_demo_runs_and_its_folder_is_ready_for_a_second_run(tmp_path):
    out = tmp_path / "demo-output"
    run, seconds = _demo(out)
    _check_run(run, out)
    print(f"demo: {seconds:.0f} s")
    # what a second run does first: the whole folder of the finished run is emptied (one patient,
    # one set of results next time), the marker kept
    assert (out / "storage" / "index.sqlite3").is_file() and any((out / "received").iterdir())
    assert prepare_output(out) == out.resolve()
    assert sorted(p.name for p in out.iterdir()) == [MARKER]


def test_prepare_output_empties_only_a_demo_folder(tmp_path):
    fresh = prepare_output(tmp_path / "new")
    assert (fresh / MARKER).is_file()
    (fresh / "storage").mkdir()
    (fresh / "storage" / "index.sqlite3").write_bytes(b"x")
    again = prepare_output(fresh)
    assert sorted(p.name for p in again.iterdir()) == [MARKER]

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    with pytest.raises(DemoError, match="not made by spine-node demo"):
        prepare_output(foreign)
    assert (foreign / "thesis.tex").read_text() == "keep me"
