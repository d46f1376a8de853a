"""Benchmark: a phantom follow-up through the running node, last instance in to last output out.

A ``spine-node serve`` node (quiet period 2 s) receives a phantom patient (baseline, RT course and
follow-up) from dcmtk ``storescu`` and delivers its results to a dcmtk ``storescp``. Printed:

* the named baseline, measured in the same run: the time ``storescu`` needs to send the follow-up
  study alone to a second, analysis-free receiver (``storescp``) — the network/storage cost of the
  same data;
* the end-to-end time from the last follow-up instance acknowledged to the last output delivered
  (target <= 60 s on the 2-core machine for the full-size phantom), its ratio to the baseline and
  to the target;
* the chain's own stage times (from the ``summary.json`` the node writes) and the peak resident
  memory of the analysis (target <= 2 GB), measured by running the same chain in a child process;
* the SR stage (target <= 3 s): the chain's ``SR`` stage (building the TID 1500 report) plus
  its ``SR write`` (the node writing it to a file), against the named baseline of pydicom reading
  the delivered report back and parsing every element.

Run: ``.venv/bin/python -m tests.bench.bench_e2e [--size small|full|both] [--keep DIR]``
(default both: the small phantom, then the full-size one, the size the targets are for).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench import phantom_sizes

REPO = Path(__file__).resolve().parents[2]
TARGET_S = 60.0
TARGET_MEMORY_GB = 2.0
TARGET_SR_S = 3.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _storescp(folder: Path, port: int) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        ["storescp", "+uf", "-od", str(folder), "-aet", "RESULTS", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, TCP_NODELAY="1"),
    )


def _storescu(port: int, aec: str, *folders: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        [
            "storescu",
            "-aet",
            "STORESCU",
            "-aec",
            aec,
            "+sd",
            "+r",
            "127.0.0.1",
            str(port),
            *map(str, folders),
        ],
        check=True,
        capture_output=True,
        env=dict(os.environ, TCP_NODELAY="1"),
    )
    return time.perf_counter() - start


def _count(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="both", choices=["small", "full", "both"])
    parser.add_argument("--keep", type=Path, default=None, help="keep the work folder(s) here")
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            print(f"{tool} not installed (make bench installs dcmtk)")
            return 1
    for size, keep in phantom_sizes(args.size, args.keep):
        code = _run(size, keep)
        if code:
            return code
    return 0


def _run(size: str, keep: Path | None) -> int:
    """One phantom size through the node; prints its lines (see the module docstring)."""
    work = Path(keep or tempfile.mkdtemp(prefix="spine-bench-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    patient = work / "patient"
    if not patient.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "node.cli",
                "phantom",
                "--out",
                str(patient),
                "--size",
                size,
                "--seed",
                "11",
            ],
            check=True,
            capture_output=True,
        )

    # named baseline: the follow-up alone into an analysis-free receiver
    port = _free_port()
    plain = _storescp(work / "plain", port)
    time.sleep(0.5)
    try:
        baseline_s = _storescu(port, "RESULTS", patient / "followup1")
    finally:
        plain.terminate()
        plain.wait(timeout=10)

    results_port = _free_port()
    received = work / "received"
    receiver = _storescp(received, results_port)
    config = work / "node.toml"
    config.write_text(
        f"""
[node]
ae_title = "SPINENODE"
port = 0
storage = "{work / "storage"}"
quiet_period_s = 2
disk_low_water_mb = 0
result_destinations = ["RESULTS"]
[[peers]]
ae_title = "STORESCU"
[[peers]]
ae_title = "RESULTS"
port = {results_port}
may_send = false
may_receive = true
[dashboard]
port = 0
""",
        encoding="utf-8",
    )
    node = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "node.cli",
            "--log-file",
            str(work / "node.log"),
            "serve",
            "--config",
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
    )
    try:
        assert node.stdout is not None
        line = node.stdout.readline()
        node_port = int(line.strip().rsplit(":", 1)[1])
        _storescu(node_port, "SPINENODE", patient / "baseline", patient / "rt")
        # the baseline and RT studies are analysed first, as in a clinic where the follow-up
        # arrives weeks later
        baseline_uid = _study_uid(patient / "baseline")
        _wait_for_report(received, baseline_uid, timeout_s=900)
        follow_up_uid = _study_uid(patient / "followup1")
        _storescu(node_port, "SPINENODE", patient / "followup1")
        last_in = time.time()
        _wait_for_report(received, follow_up_uid, timeout_s=900)
        # the lesion-history PDF follows the report: wait until deliveries stop
        count = -1
        while count != _count(received):
            count = _count(received)
            time.sleep(3)
        last_out = max(p.stat().st_mtime for p in received.iterdir())
        end_to_end = last_out - last_in
    finally:
        node.terminate()
        node.wait(timeout=60)
        receiver.terminate()
        receiver.wait(timeout=10)
    summaries = sorted((work / "storage" / "results").rglob("summary.json"))
    timings = json.loads(summaries[-1].read_text())["timings_s"] if summaries else {}

    peak_gb = _chain_peak_memory_gb(patient)
    print(f"phantom size {size}; {_count(received)} result objects delivered")
    print(f"baseline 'storescu follow-up -> storescp': {baseline_s:.1f} s")
    print(
        f"end to end (last follow-up instance in -> last output out): {end_to_end:.1f} s "
        f"= {end_to_end / baseline_s:.1f} x baseline, {end_to_end / TARGET_S:.2f} x the "
        f"{TARGET_S:.0f} s target"
    )
    print("chain stages (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    print(
        f"peak resident memory of the chain: {peak_gb:.2f} GB "
        f"({peak_gb / TARGET_MEMORY_GB:.2f} x the {TARGET_MEMORY_GB:.0f} GB target)"
    )
    if "SR" in timings and "SR write" in timings:
        build_s, write_s = float(timings["SR"]), float(timings["SR write"])
        sr_s = build_s + write_s
        report = _report_of(received, follow_up_uid)
        read_s = _read_s(report) if report is not None else float("nan")
        print(
            f"SR stage: build {build_s:.2f} s + write {write_s:.2f} s = {sr_s:.2f} s "
            f"({sr_s / TARGET_SR_S:.2f} x the {TARGET_SR_S:.0f} s target); baseline 'pydicom "
            f"reads the report and every element in it': {read_s:.2f} s ({sr_s / read_s:.1f} x)"
        )
    if keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _study_uid(folder: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(next(folder.rglob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


def _wait_for_report(folder: Path, study_uid: str, *, timeout_s: float) -> None:
    """Wait until the TID 1500 report of ``study_uid`` has arrived."""
    from pydicom import dcmread

    seen: set[Path] = set()
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        for path in sorted(folder.iterdir()):
            if path in seen or not path.is_file():
                continue
            seen.add(path)
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except Exception:  # still being written by storescp: look again
                seen.discard(path)
                continue
            if ds.Modality == "SR" and ds.StudyInstanceUID == study_uid:
                return
        time.sleep(0.2)
    raise TimeoutError(f"no report for study {study_uid} within {timeout_s:.0f} s")


def _report_of(folder: Path, study_uid: str) -> Path | None:
    """The delivered TID 1500 report of ``study_uid`` (the latest written, if several)."""
    from pydicom import dcmread

    reports = [
        p
        for p in folder.iterdir()
        if p.is_file()
        and (
            ds := dcmread(
                p, stop_before_pixels=True, specific_tags=["Modality", "StudyInstanceUID"]
            )
        ).get("Modality")
        == "SR"
        and ds.StudyInstanceUID == study_uid
    ]
    return max(reports, key=lambda p: p.stat().st_mtime) if reports else None


def _read_s(report: Path) -> float:
    """Seconds for pydicom to read the report and parse every element of it."""
    from pydicom import dcmread

    start = time.perf_counter()
    for _ in dcmread(report).iterall():
        pass
    return time.perf_counter() - start


def _chain_peak_memory_gb(patient: Path) -> float:
    """Peak RSS of a child process that runs the whole chain on the patient."""
    code = (
        "import sys, resource; from node.cli import main; "
        "main(['--log-level', 'WARNING', 'analyze', sys.argv[1], '--out', sys.argv[2]]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    with tempfile.TemporaryDirectory() as out:
        run = subprocess.run(
            [sys.executable, "-c", code, str(patient), out],
            check=True,
            capture_output=True,
            text=True,
            cwd=REPO,
        )
    return int(run.stdout.strip().splitlines()[-1]) / 1024**2


if __name__ == "__main__":
    sys.exit(main())
