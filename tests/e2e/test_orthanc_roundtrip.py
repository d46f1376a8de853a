"""A real PACS end to end (issue 8, acceptance 1): Orthanc routes, the node analyses, Orthanc
stores.

Orthanc (Debian package) runs with the deployed configuration ``deploy/orthanc/orthanc.json`` and
routing script ``deploy/orthanc/route-to-node.lua`` (loopback ports, temporary storage, no
authentication for the test). A small phantom patient (the progression scenario; the
responder's call is checked through the running node in ``test_node_roundtrip.py``, and every
scenario's call against its ground truth in ``test_analyze*.py``) is sent to Orthanc by dcmtk
``storescu`` as a modality would send it: first the baseline MRI with the
CyberKnife RT objects (one study), then, once the node's baseline results are back, the
follow-up MRI. On every stable study the Lua script routes the MR and RT series to the node
(``spine-node serve``, quiet period 2 s), whose analysis worker sends the DICOM SEG, Parametric
Maps and TID 1500 SR back to Orthanc. The test then asserts through Orthanc's REST API that each
produced object arrived, sent by the node, under the right patient and study, with the counts the
node's ``summary.json`` lists, and that the derived objects were never routed back to the node.

A fast test runs the routing script alone against a stand-in node: new MR series are routed once,
Parametric Maps (Modality MR), SEG and non-MR/RT series never.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.node.fixtures import free_port, write_config
from tests.orthanc_fixture import OrthancServer
from tests.phantom_fixtures import NO_RADIOMICS, shared_maps

pytestmark = pytest.mark.network

REPO = Path(__file__).resolve().parents[2]
LUA = REPO / "deploy" / "orthanc" / "route-to-node.lua"
DEPLOYED_CONFIG = REPO / "deploy" / "orthanc" / "orthanc.json"

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
PMAP = "1.2.840.10008.5.1.4.1.1.30"
SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"
#: node results must be delivered within this (s) per phase; the chain takes ~1 min per analysis
PHASE_TIMEOUT_S = 300


def _first_header(folder: Path) -> Any:
    return dcmread(next(iter(sorted(folder.rglob("*.dcm")))), stop_before_pixels=True)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.dcm"))


def _deployed_config_for_test() -> dict[str, Any]:
    """deploy/orthanc/orthanc.json minus what the test must set (ports, paths, modalities, auth)."""
    config = json.loads(DEPLOYED_CONFIG.read_text(encoding="utf-8"))
    for key in (
        "HttpPort",
        "DicomPort",
        "StorageDirectory",
        "IndexDirectory",
        "DicomModalities",
        "LuaScripts",
        "RemoteAccessAllowed",
        "AuthenticationEnabled",
        "RegisteredUsers",
        "StableAge",
        "SaveJobs",
    ):
        config.pop(key, None)
    return config


def _summaries(storage: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted((storage / "results").glob("patient-*/summary.json")):
        try:
            out.append(json.loads(path.read_text(encoding="utf-8")))
        except ValueError:
            continue  # being written
    return out


def _summary_with(storage: Path, study_uid: str, *, assessed: bool) -> dict[str, Any] | None:
    """The summary.json covering ``study_uid`` (with a response call there if ``assessed``)."""
    for summary in _summaries(storage):
        points = [
            tp for tp in summary.get("time_points") or [] if tp["study_instance_uid"] == study_uid
        ]
        if points and (not assessed or any(tp.get("response") for tp in points)):
            return summary
    return None


def _orthanc_sop_uids(pacs: OrthancServer) -> set[str]:
    return {i["MainDicomTags"].get("SOPInstanceUID", "") for i in pacs.instances()}


def _delivered(
    pacs: OrthancServer, storage: Path, study_uid: str, *, assessed: bool
) -> dict[str, Any] | None:
    summary = _summary_with(storage, study_uid, assessed=assessed)
    if summary is None:
        return None
    wanted = {o["sop_instance_uid"] for o in summary["outputs"]}
    return summary if wanted and wanted <= _orthanc_sop_uids(pacs) else None


def _wait_delivered(
    pacs: OrthancServer, storage: Path, study_uids: list[str], *, assessed: bool
) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}

    def all_there() -> bool:
        for uid in study_uids:
            if uid not in found:
                summary = _delivered(pacs, storage, uid, assessed=assessed)
                if summary is not None:
                    found[uid] = summary
        return len(found) == len(study_uids)

    pacs.wait_for(
        all_there,
        timeout_s=PHASE_TIMEOUT_S,
        interval_s=3,
        what=f"node results of studies {study_uids} in Orthanc",
    )
    return found


def _study_objects(pacs: OrthancServer, study_uid: str) -> tuple[dict[str, Any], list[dict]]:
    """Orthanc's study (expanded) and, for each instance, its tags + metadata (SOP class, AET)."""
    [study] = [s for s in pacs.studies() if s["MainDicomTags"].get("StudyInstanceUID") == study_uid]
    objects = []
    for instance in pacs.get(f"/studies/{study['ID']}/instances"):
        meta = pacs.instance_metadata(instance["ID"])
        objects.append(
            {
                "sop_instance_uid": instance["MainDicomTags"]["SOPInstanceUID"],
                "sop_class_uid": meta.get("SopClassUid", ""),
                "remote_aet": meta.get("RemoteAET", ""),
                "origin": meta.get("Origin", ""),
            }
        )
    return study, objects


@pytest.mark.slow
def test_orthanc_routes_to_node_and_stores_results(
    make_phantom, node_factory, orthanc_factory, tmp_path, shared_map_cache
):
    patients = {"progression": make_phantom("progression", "standard", "small")}
    orthanc_port = free_port()
    storage = tmp_path / "storage"
    config = write_config(
        tmp_path / "node.toml",
        storage=storage,
        quiet_period_s=2,
        node_extra='result_destinations = ["ORTHANC"]',
        extra=f'[[peers]]\nae_title = "ORTHANC"\nport = {orthanc_port}\n'
        "may_send = true\nmay_receive = true\n" + NO_RADIOMICS + shared_maps(shared_map_cache),
        # the routing and the results' place in the PACS do not depend on radiomics (half the time)
    )
    node = node_factory(config)
    node_port = node.start()
    pacs = orthanc_factory(
        dicom_port=orthanc_port,
        lua_scripts=[LUA],
        stable_age_s=2,
        modalities={"spinenode": ["SPINENODE", "127.0.0.1", node_port]},
        extra_config=_deployed_config_for_test(),
    )
    assert pacs.get("/modalities") == ["spinenode"]

    uids = {
        name: {
            "patient_id": str(_first_header(p / "baseline").PatientID),
            "baseline": str(_first_header(p / "baseline").StudyInstanceUID),
            "follow_up": str(_first_header(p / "followup1").StudyInstanceUID),
            "rt": str(_first_header(p / "rt").StudyInstanceUID),
        }
        for name, p in patients.items()
    }
    input_counts = {
        name: {
            "baseline": len(_files(p / "baseline")) + len(_files(p / "rt")),
            "follow_up": len(_files(p / "followup1")),
        }
        for name, p in patients.items()
    }
    assert all(u["rt"] == u["baseline"] for u in uids.values())  # phantom: RT in the MR study

    t0 = time.monotonic()
    # phase 1: baseline MRI + RT course -> routed -> baseline-only analyses
    for p in patients.values():
        pacs.store(_files(p / "baseline") + _files(p / "rt"))
    _wait_delivered(pacs, storage, [u["baseline"] for u in uids.values()], assessed=False)
    t1 = time.monotonic()
    # phase 2: the follow-ups -> routed -> full analyses with the response calls
    for p in patients.values():
        pacs.store(_files(p / "followup1"))
    summaries = _wait_delivered(
        pacs, storage, [u["follow_up"] for u in uids.values()], assessed=True
    )
    t2 = time.monotonic()
    print(f"phase 1 (baselines) {t1 - t0:.0f} s, phase 2 (follow-ups) {t2 - t1:.0f} s")
    assert node.stop() == 0

    # the call itself is tested against ground truth in tests/e2e/test_analyze*.py; here: the
    # call made at the follow-up reached the PACS
    allowed_calls = {"progression": {"local progression"}}
    orthanc_patients = {p["MainDicomTags"]["PatientID"]: p for p in pacs.patients()}
    assert len(orthanc_patients) == len(patients)
    for name, u in uids.items():
        summary = summaries[u["follow_up"]]
        # the response call the node reported for this phantom
        [follow_up_point] = [
            tp for tp in summary["time_points"] if tp["study_instance_uid"] == u["follow_up"]
        ]
        assert follow_up_point["response"]["category"] in allowed_calls[name]

        # every result sits under the patient and in the studies that were sent: no new study
        patient = orthanc_patients[u["patient_id"]]
        studies = {
            s["MainDicomTags"]["StudyInstanceUID"]
            for s in pacs.studies()
            if s["ParentPatient"] == patient["ID"]
        }
        assert studies == {u["baseline"], u["follow_up"]}

        produced = Counter(
            (o["study_instance_uid"], o["sop_class_uid"]) for o in summary["outputs"]
        )
        for role in ("baseline", "follow_up"):
            study_uid = u[role]
            _, objects = _study_objects(pacs, study_uid)
            from_node = [o for o in objects if o["remote_aet"] == "SPINENODE"]
            uploaded = [o for o in objects if o["remote_aet"] == "MODALITY"]
            # inputs are untouched, and everything else came from the node over DICOM
            assert len(uploaded) == input_counts[name][role]
            assert len(from_node) + len(uploaded) == len(objects)
            in_orthanc = Counter((study_uid, o["sop_class_uid"]) for o in from_node)
            for (study, sop_class), n in produced.items():
                if study == study_uid:
                    assert in_orthanc[(study, sop_class)] >= n, (name, role, sop_class)
            if role == "follow_up":
                # the final run's objects of the follow-up study, exactly
                assert in_orthanc == Counter(
                    {k: n for k, n in produced.items() if k[0] == study_uid}
                )
                assert in_orthanc[(study_uid, SEG)] == 1
                assert in_orthanc[(study_uid, SR_3D)] == 1
                assert in_orthanc[(study_uid, PMAP)] >= 10
            else:
                assert in_orthanc[(study_uid, SEG)] == 1
                assert in_orthanc[(study_uid, PMAP)] >= 10

    # the Lua script routed each input series once and never a derived object back to the node
    node_received = _node_instances(storage)
    assert not {row["sop_class_uid"] for row in node_received} & {SEG, PMAP, SR_3D}
    assert {row["calling_ae"] for row in node_received} == {"ORTHANC"}
    total_inputs = sum(c["baseline"] + c["follow_up"] for c in input_counts.values())
    assert len(node_received) == total_inputs
    assert "series sent to modality spinenode" in pacs.log_text()


def _node_instances(storage: Path) -> list[dict[str, str]]:
    """SOP class and calling AE title of every instance the node stored (from its index)."""
    db = sqlite3.connect(f"file:{storage / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        return [
            {"sop_class_uid": r[0], "calling_ae": r[1]}
            for r in db.execute("SELECT sop_class_uid, calling_ae FROM instances")
        ]
    finally:
        db.close()


def _mr_copy(
    source: Path,
    out: Path,
    *,
    series: str,
    sop: str,
    sop_class: str | None = None,
    modality: str | None = None,
) -> Path:
    ds = dcmread(source)
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    if sop_class is not None:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    if modality is not None:
        ds.Modality = modality
    ds.save_as(out)
    return out


def test_lua_routes_new_mr_series_once_and_never_derived_objects(orthanc_factory, tmp_path):
    """The routing script alone (seconds): a stand-in node receives what Orthanc routes."""
    from pydicom.data import get_testdata_file

    from node.commands.demo import ResultReceiver

    receiver = ResultReceiver(tmp_path / "node", ae_title="SPINENODE")
    port = receiver.start()
    try:
        pacs = orthanc_factory(
            lua_scripts=[LUA],
            stable_age_s=1,
            modalities={"spinenode": ["SPINENODE", "127.0.0.1", port]},
            extra_config=_deployed_config_for_test(),
        )
        mr = Path(get_testdata_file("MR_small.dcm"))
        pacs.upload(
            [
                _mr_copy(mr, tmp_path / "a.dcm", series="1.2.3.1", sop="1.2.3.1.1"),
                _mr_copy(mr, tmp_path / "b.dcm", series="1.2.3.1", sop="1.2.3.1.2"),
                # a Parametric Map (Modality MR!) and a SEG in the same study: never routed
                _mr_copy(
                    mr, tmp_path / "pm.dcm", series="1.2.3.2", sop="1.2.3.2.1", sop_class=PMAP
                ),
                _mr_copy(
                    mr,
                    tmp_path / "seg.dcm",
                    series="1.2.3.3",
                    sop="1.2.3.3.1",
                    sop_class=SEG,
                    modality="SEG",
                ),
                # not an MR or RT series
                _mr_copy(mr, tmp_path / "ct.dcm", series="1.2.3.4", sop="1.2.3.4.1", modality="CT"),
            ]
        )
        pacs.wait_for(
            lambda: len(receiver.snapshot()) >= 2,
            timeout_s=60,
            what="the MR series at the stand-in node",
        )
        time.sleep(3)  # a second stable event or a stray job would show up by now
        assert sorted(receiver.snapshot()) == ["1.2.3.1.1", "1.2.3.1.2"]
        # the study changes again (a new MR series): only the new series goes
        pacs.upload([_mr_copy(mr, tmp_path / "c.dcm", series="1.2.3.5", sop="1.2.3.5.1")])
        pacs.wait_for(
            lambda: "1.2.3.5.1" in receiver.snapshot(),
            timeout_s=60,
            what="the new MR series at the stand-in node",
        )
        time.sleep(3)
        assert sorted(receiver.snapshot()) == ["1.2.3.1.1", "1.2.3.1.2", "1.2.3.5.1"]
        routed = [
            s["MainDicomTags"]["SeriesInstanceUID"]
            for s in pacs.series()
            if "SpineNodeRouted" in pacs.get(f"/series/{s['ID']}/metadata")
        ]
        assert sorted(routed) == ["1.2.3.1", "1.2.3.5"]
        # what arrived is the uploaded instance, pixel data included
        got = dcmread(receiver.snapshot()["1.2.3.5.1"].path)
        assert got.SeriesInstanceUID == "1.2.3.5" and got.pixel_array.shape == (64, 64)
    finally:
        receiver.stop()
