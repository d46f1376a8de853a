"""Issue 5, acceptance 2: priors from a real PACS (Debian Orthanc on loopback).

Orthanc holds the phantom's baseline study (MR series and the CyberKnife RT Structure Set, Plan and
Dose, which the phantom files under the planning study). The node (``spine-node serve``) receives
only the follow-up by dcmtk ``storescu``; its analysis waits (no course), it queries Orthanc
(C-FIND study then series level), retrieves the baseline study by C-MOVE to its own AE title, the
retrieved study becomes stable and the analysis completes with a response call.

Orthanc runs through :func:`tests.orthanc_fixture.orthanc_factory`.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from tests.node.fixtures import free_port, require_tool, write_config
from tests.phantom_fixtures import NO_RADIOMICS, shared_maps


def _events(db: Path) -> list[tuple[str, str | None, str | None]]:
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return [
            (r[0], r[1], r[2])
            for r in con.execute("SELECT kind, study_uid, detail FROM events ORDER BY id")
        ]
    except sqlite3.OperationalError:  # schema not created yet
        return []
    finally:
        con.close()


@pytest.mark.slow
def test_follow_up_alone_makes_the_node_fetch_course_and_baseline_from_orthanc(
    tmp_path, make_phantom, node_factory, orthanc_factory, shared_map_cache
):
    storescu = require_tool("storescu")
    phantom = make_phantom("responder", "standard", "small")
    truth = json.loads((phantom / "ground_truth.json").read_text(encoding="utf-8"))
    baseline_uid = truth["studies"]["baseline"]["StudyInstanceUID"]
    expected = truth["studies"]["followup1"]["expected_response"]
    node_port = free_port()
    storage = tmp_path / "node"
    # Orthanc knows the node (the C-MOVE destination) and lets it query and retrieve
    server = orthanc_factory(
        modalities={
            "node": {
                "AET": "SPINENODE",
                "Host": "127.0.0.1",
                "Port": node_port,
                "AllowEcho": True,
                "AllowFind": True,
                "AllowMove": True,
                "AllowGet": True,
                "AllowStore": False,
            }
        }
    )
    prior_files = sorted(
        p for sub in ("baseline", "rt") for p in (phantom / sub).rglob("*") if p.is_file()
    )
    server.upload(prior_files)
    stats = server.get("/statistics")
    assert stats["CountInstances"] == len(prior_files)
    assert stats["CountStudies"] == 1  # the phantom files its RT objects under the planning study

    config = write_config(
        tmp_path / "node.toml",
        storage=storage,
        port=node_port,
        quiet_period_s=1.5,
        extra=f"""
[[peers]]
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {server.dicom_port}
may_send = true
may_receive = true

[courses]
pacs = "ORTHANC"
method = "move"
max_concurrent = 1
min_interval_s = 10
retries = 2
retry_delay_s = 2
timeout_s = 60

[dashboard]
enabled = false
"""
        # the assignment does not depend on radiomics (half the analysis time)
        + NO_RADIOMICS
        + shared_maps(shared_map_cache),
    )
    node = node_factory(config)
    assert node.start() == node_port
    followup = phantom / "followup1"
    n_followup = sum(1 for p in followup.rglob("*") if p.is_file())
    start = time.monotonic()
    sent = subprocess.run(
        [
            storescu,
            "-aet",
            "STORESCU",
            "-aec",
            "SPINENODE",
            "+sd",
            "+r",
            "127.0.0.1",
            str(node_port),
            str(followup),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert sent.returncode == 0, sent.stderr[-2000:]

    db = storage / "index.sqlite3"
    events: list[tuple[str, str | None, str | None]] = []
    while time.monotonic() < start + 240:
        events = _events(db)
        kinds = [e[0] for e in events]
        if "analysis_done" in kinds:
            break
        assert "analysis_failed" not in kinds, events
        time.sleep(1.0)
    elapsed = time.monotonic() - start
    kinds = [e[0] for e in events]
    print(
        f"follow-up sent -> analysis done in {elapsed:.0f} s; "
        f"{[k for k in kinds if k.startswith(('priors', 'analysis'))]}"
    )
    assert "analysis_done" in kinds, f"no analysis_done within 240 s: {kinds}"
    # what was asked and what came is in the index
    query = [e for e in events if e[0] == "priors_query"]
    assert len(query) == 1 and "1 studies, 1 prior" in query[0][2], query  # baseline only
    assert "course on node: no" in query[0][2]
    retrieved = [e for e in events if e[0] == "priors_retrieved"]
    assert [e[1] for e in retrieved] == [baseline_uid]
    assert f"{len(prior_files)} completed, 0 failed" in retrieved[0][2]
    # everything came: the node holds the follow-up plus every prior instance
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        n_node = con.execute("SELECT COUNT(*) FROM instances").fetchone()[0]
        n_patients = con.execute("SELECT COUNT(*) FROM patients").fetchone()[0]
    finally:
        con.close()
    assert (n_node, n_patients) == (n_followup + len(prior_files), 1)
    # the assignment completed: the follow-up was assessed against the retrieved baseline
    detail = [e for e in events if e[0] == "analysis_done"][-1][2]
    assert "response:" in detail and "baseline only" not in detail
    print(f"analysis_done: {detail}; phantom truth: {expected}")
    assert expected in detail
    assert node.stop() == 0


@pytest.mark.parametrize("method", ["get", "move"])
def test_orthanc_query_retrieve_and_other_issuer_never_combined(tmp_path, orthanc_factory, method):
    """Both retrieve methods against Orthanc on small synthetic studies, with a same-PatientID
    study under another IssuerOfPatientID on the PACS (acceptance 6: never retrieved into this
    patient, whether Orthanc filters it out or the node refuses it)."""
    import datetime as dt

    from node.config import settings_from_mapping
    from node.ingest import import_files
    from node.priors import PriorsFetcher
    from node.service import NodeService
    from tests.node.test_priors import D0, _mr_series, _rtplan

    node_port = free_port()
    server = orthanc_factory(
        modalities={
            "node": {
                "AET": "SPINENODE",
                "Host": "127.0.0.1",
                "Port": node_port,
                "AllowFind": True,
                "AllowMove": True,
                "AllowGet": True,
                "AllowStore": False,
            }
        }
    )
    base_uid, other_uid, fu_uid = (generate_uid() for _ in range(3))
    baseline = _mr_series(base_uid, D0, 3, seed=1) + [_rtplan(base_uid, D0)]
    other = _mr_series(other_uid, D0 - dt.timedelta(days=3), 2, issuer="HOSPITAL-B", seed=2)
    follow_up = _mr_series(fu_uid, D0 + dt.timedelta(days=90), 2, seed=3)
    folder = tmp_path / "files"
    folder.mkdir()
    paths = {}
    for ds in baseline + other + follow_up:
        paths[ds.SOPInstanceUID] = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(paths[ds.SOPInstanceUID], enforce_file_format=True)
    server.upload(paths[ds.SOPInstanceUID] for ds in baseline + other)
    settings = settings_from_mapping(
        {
            "node": {
                "ae_title": "SPINENODE",
                "port": node_port,
                "storage": str(tmp_path / "node"),
                "quiet_period_s": 30,
                "disk_low_water_mb": 0,
            },
            "peers": [
                {
                    "ae_title": "ORTHANC",
                    "port": server.dicom_port,
                    "may_send": True,
                    "may_receive": True,
                }
            ],
            "analysis": {"enabled": False},
            "dashboard": {"enabled": False},
            "courses": {
                "pacs": "ORTHANC",
                "method": method,
                "retries": 1,
                "retry_delay_s": 0.5,
                "min_interval_s": 0,
                "timeout_s": 30,
            },
        }
    )
    service = NodeService(settings)
    service.start()
    try:
        stored = import_files(service.store, [paths[ds.SOPInstanceUID] for ds in follow_up])
        assert len(stored.stored) == 2
        row = int(
            service.index.query("SELECT patient_key FROM studies WHERE study_uid=?", (fu_uid,))[0][
                0
            ]
        )
        report = PriorsFetcher(service).fetch(row, fu_uid)
        assert report.state == "retrieved", report
        assert (report.completed, report.failed) == (4, 0)
        held = {
            r[0]: r[1] for r in service.index.query("SELECT study_uid, patient_key FROM studies")
        }
        assert held == {fu_uid: row, base_uid: row}  # the other issuer's study never came
        refused = [e["study_uid"] for e in service.index.events("priors_refused")]
        print(
            f"C-{method.upper()}: {report.completed} instances; other issuer "
            f"{'refused by the node' if refused else 'filtered out by Orthanc'}"
        )
        assert refused in ([], [other_uid])
    finally:
        service.stop()
