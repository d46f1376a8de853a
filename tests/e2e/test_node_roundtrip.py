"""The node end to end: a phantom patient in by dcmtk ``storescu``, results out to ``storescp``.

Issue 7, acceptance 6: the running node analyses the patient once its studies are stable and
delivers the SEG, Parametric Maps and TID 1500 SR to the configured destination.

Issue 9, acceptance 1, through the running node: three time points (baseline, ~10 weeks, ~6
months) give a timeline in order with days since treatment and deltas; then the PACS corrects the
baseline the IHE IOCM way — a rejection note for the defective diffusion series and the corrected
series — and the node re-analyses the patient: every later delta is recomputed and superseding
reports (naming the ones they replace) reach the destination.

The node analyses without radiomics (:data:`tests.phantom_fixtures.NO_RADIOMICS`): this test
checks the flow, the timeline and the recomputed deltas, none of which depend on it; the node
analyses the patient several times, each in half the time.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from node.index import Index
from node.timeline import courses as timeline_courses
from node.timeline import timeline
from tests.node.dicom_factory import rejection_note
from tests.node.fixtures import free_port, require_tool, write_config
from tests.phantom_fixtures import NO_RADIOMICS, shared_maps
from tests.reporting.tools import dciodvfy

pytestmark = [pytest.mark.slow, pytest.mark.network]

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
PMAP = "1.2.840.10008.5.1.4.1.1.30"
SR_3D = "1.2.840.10008.5.1.4.1.1.88.34"
PDF = "1.2.840.10008.5.1.4.1.1.104.1"
#: the defective baseline diffusion series: each image darkened by exp(-b * shift), so its ADC is
#: too high by the shift (mm2/s) at every b-value range the fit uses
DEFECT_ADC_SHIFT = 0.25e-3


def _received(folder: Path) -> dict[str, object]:
    """Received objects by SOP Instance UID (a re-send under the same UID counts once)."""
    return {
        str(ds.SOPInstanceUID): ds
        for ds in (
            dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir()) if p.is_file()
        )
    }


def _storescu(port: int, *paths: Path) -> None:
    sent = subprocess.run(
        [
            "storescu",
            "-aet",
            "STORESCU",
            "-aec",
            "SPINENODE",
            "+sd",
            "+r",
            "127.0.0.1",
            str(port),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"TCP_NODELAY": "1"},
    )
    assert sent.returncode == 0, sent.stderr[-2000:]


def _diffusion_series(study: Path) -> Path:
    for series in sorted(p for p in study.iterdir() if p.is_dir()):
        if (
            dcmread(next(series.iterdir()), stop_before_pixels=True).get("DiffusionBValue")
            is not None
        ):
            return series
    raise AssertionError(f"no diffusion series in {study}")


def _defective_copy(series: Path, out: Path) -> list:
    """The diffusion series as a scanner might first have sent it: new UIDs, the signal of each
    image darkened by exp(-b * :data:`DEFECT_ADC_SHIFT`). Returns the datasets (headers)."""
    out.mkdir()
    series_uid = generate_uid(entropy_srcs=[str(series), "defective"])
    written = []
    for path in sorted(series.iterdir()):
        ds = dcmread(path)
        b = float(ds.DiffusionBValue)
        if b > 0:
            pixels = ds.pixel_array
            darker = pixels * np.exp(-b * DEFECT_ADC_SHIFT)
            ds.PixelData = np.round(darker).astype(pixels.dtype).tobytes()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), "defective"])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(out / path.name, enforce_file_format=True)
        del ds.PixelData
        written.append(ds)
    return written


def _maps_cached(storage: Path) -> set[str]:
    """Study Instance UIDs whose maps the node's latest analysis took from its map cache."""
    [summary] = (storage / "results").glob("patient-*/summary.json")
    timings = json.loads(summary.read_text())["timings_s"]
    return {k.removeprefix("maps cached: ") for k in timings if k.startswith("maps cached: ")}


def _settled(db: Path, analyses_before: int, timeout_s: float = 600) -> Index:
    """Wait until the node finished a new analysis and nothing is pending: every study stable,
    every started analysis ended."""
    index = Index(db)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        started = len(index.events("analysis_started"))
        ended = sum(
            len(index.events(k)) for k in ("analysis_done", "analysis_waiting", "analysis_failed")
        )
        receiving = index.query("SELECT count(*) FROM studies WHERE state='receiving'")[0][0]
        done = len(index.events("analysis_done"))
        if done > analyses_before and started == ended and receiving == 0:
            return index
        time.sleep(2)
    raise AssertionError(f"the node did not settle within {timeout_s} s")


def _wait_for(predicate, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(2)
    raise AssertionError("timed out")


def test_three_time_points_in_results_out_and_a_corrected_baseline_recomputes_later_deltas(
    make_phantom, analyzed_phantom, node_factory, tmp_path, shared_map_cache
):
    require_tool("storescu")
    require_tool("storescp")
    patient = make_phantom("responder", "standard", "small", followups=2)
    # the shared analyze run of the one-follow-up phantom (same baseline and follow-up 1 files)
    # filled the shared map cache the node uses: the node, keying the files it received by
    # C-STORE, must find the maps of the studies whose instances it received unchanged
    analyzed_phantom("responder", "standard", "small")
    good_dwi = _diffusion_series(patient / "baseline")
    defective = _defective_copy(good_dwi, tmp_path / "defective")
    received = tmp_path / "received"
    received.mkdir()
    results_port = free_port()
    receiver = subprocess.Popen(
        ["storescp", "+uf", "-od", str(received), "-aet", "RESULTS", str(results_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={"TCP_NODELAY": "1"},
    )
    try:
        config = write_config(
            tmp_path / "node.toml",
            storage=tmp_path / "storage",
            quiet_period_s=5,
            node_extra='result_destinations = ["RESULTS"]',
            extra=f'[[peers]]\nae_title = "RESULTS"\nport = {results_port}\n'
            "may_send = false\nmay_receive = true\n" + NO_RADIOMICS + shared_maps(shared_map_cache),
        )
        node = node_factory(config)
        port = node.start()
        db = tmp_path / "storage" / "index.sqlite3"
        baseline_series = [
            p for p in sorted((patient / "baseline").iterdir()) if p.is_dir() and p != good_dwi
        ]
        _storescu(
            port,
            *baseline_series,
            tmp_path / "defective",
            patient / "rt",
            patient / "followup1",
            patient / "followup2",
        )

        # -- three time points, in order, with days since treatment and deltas ----------------
        # on a loaded machine a study can look stable before its last series arrived: the node
        # then analyses again when it is amended. Wait until nothing is pending.
        index = _settled(db, 0)
        points = timeline(index)
        truth = json.loads((patient / "ground_truth.json").read_text())["studies"]
        keys = ("baseline", "followup1", "followup2")
        assert [p.study_instance_uid for p in points] == [
            truth[k]["StudyInstanceUID"] for k in keys
        ]
        assert [p.role for p in points] == ["baseline", "follow-up", "follow-up"]
        assert [p.study_date.strftime("%Y%m%d") for p in points] == [
            truth[k]["StudyDate"] for k in keys
        ]
        treatment = dt.date.fromisoformat(timeline_courses(index)[0]["treatment_date"])
        days = [p.days_since_treatment for p in points]
        assert days == [(p.study_date - treatment).days for p in points]
        assert days[0] <= 0 and 56 <= days[1] <= 84 and 160 <= days[2] <= 200  # ~10 wk, ~6 mo
        volumes = [p.volume_ml for p in points]
        assert points[2].change("volume", "previous")["relative"] == pytest.approx(
            volumes[2] / volumes[1] - 1
        )
        assert points[2].response_category == "local control"  # the responder scenario
        follow_ups = [p.study_instance_uid for p in points[1:]]
        latest = follow_ups[-1]

        def report_and_histories():
            r = _received(received)
            wanted = {(latest, SR_3D)} | {(uid, PDF) for uid in follow_ups}
            return (
                r
                if wanted <= {(ds.StudyInstanceUID, ds.SOPClassUID) for ds in r.values()}
                else None
            )

        # one TID 1500 report (in the latest study, covering every time point); a SEG, the
        # parametric maps and the lesion-history PDF in each follow-up
        objects = _wait_for(report_and_histories)
        for uid in follow_ups:
            classes = [ds.SOPClassUID for ds in objects.values() if ds.StudyInstanceUID == uid]
            assert classes.count(SEG) >= 1 and classes.count(PMAP) >= 10, classes
            assert classes.count(PDF) >= 1, classes
        adc = [p.measurements["ADC.mean"] for p in points]
        for p in points[1:]:
            assert p.change("ADC.mean")["relative"] == pytest.approx(
                p.measurements["ADC.mean"] / adc[0] - 1, rel=1e-6
            )
        for path in received.iterdir():  # the lesion-history documents are valid DICOM
            if dcmread(path, stop_before_pixels=True).SOPClassUID == PDF:
                dciodvfy(path)
        truth_uid = {k: truth[k]["StudyInstanceUID"] for k in keys}
        cached = _maps_cached(tmp_path / "storage")
        # follow-up 1 as sent by storescu; not the baseline (its diffusion series is the
        # defective copy) nor follow-up 2 (in no earlier analysis)
        assert truth_uid["followup1"] in cached and truth_uid["followup2"] not in cached
        assert not (tmp_path / "storage" / "cache" / "maps").exists()  # the configured folder
        first_report = {k for k, ds in objects.items() if ds.SOPClassUID == SR_3D}
        first_pdfs = {k for k, ds in objects.items() if ds.SOPClassUID == PDF}
        analyses = len(index.events("analysis_done"))

        # -- the PACS corrects the baseline: rejection note + the corrected series -------------
        note = rejection_note(defective)
        note_path = tmp_path / "correction" / "note.dcm"
        note_path.parent.mkdir()
        note.save_as(note_path, enforce_file_format=True)
        _storescu(port, note_path, good_dwi)
        index = _settled(db, analyses)
        # the corrected baseline holds the instances the shared analysis read: its maps too
        assert truth_uid["baseline"] in _maps_cached(tmp_path / "storage")
        [event] = index.events("instances_rejected")
        assert event["detail"].startswith(f"{len(defective)} instance(s)")
        corrected = timeline(index)
        assert [p.study_instance_uid for p in corrected] == [p.study_instance_uid for p in points]
        new_adc = [p.measurements["ADC.mean"] for p in corrected]
        # the corrected baseline ADC is lower by the defect (the defective one was too high); the
        # follow-ups' own values are unchanged, their deltas recomputed against the new baseline
        assert adc[0] - new_adc[0] == pytest.approx(DEFECT_ADC_SHIFT, rel=0.15)
        assert new_adc[1:] == pytest.approx(adc[1:], rel=1e-6)
        for p, old in zip(corrected[1:], points[1:]):
            relative = p.change("ADC.mean")["relative"]
            assert relative == pytest.approx(p.measurements["ADC.mean"] / new_adc[0] - 1, rel=1e-6)
            assert relative > old.change("ADC.mean")["relative"] + 0.05
        for p, old in zip(corrected, points):  # shown with pytest -s
            print(
                f"{p.role} day {p.days_since_treatment:+d}: ADC {old.measurements['ADC.mean']:.3e}"
                f" -> {p.measurements['ADC.mean']:.3e} mm2/s; change from baseline "
                f"{(old.change('ADC.mean') or {}).get('relative')} -> "
                f"{(p.change('ADC.mean') or {}).get('relative')}; {p.response_category}"
            )
        previous = corrected[2].change("ADC.mean", "previous")["relative"]
        assert previous == pytest.approx(new_adc[2] / new_adc[1] - 1, rel=1e-6)

        # a superseding report reaches the destination and names the report it replaces; each
        # follow-up's history document is re-issued (new instance in the same series)
        def new_objects():
            r = _received(received)
            reports = [
                ds for k, ds in r.items() if ds.SOPClassUID == SR_3D and k not in first_report
            ]
            pdfs = {
                ds.StudyInstanceUID
                for k, ds in r.items()
                if ds.SOPClassUID == PDF and k not in first_pdfs
            }
            return reports if reports and pdfs == set(follow_ups) else None

        [report] = _wait_for(new_objects)
        assert report.StudyInstanceUID == latest
        [item] = report.PredecessorDocumentsSequence
        named = {
            ref.ReferencedSOPInstanceUID
            for series in item.ReferencedSeriesSequence
            for ref in series.ReferencedSOPSequence
        }
        # the report of the analysis before the correction (an earlier, partial one may exist
        # when a study looked stable before the next one arrived)
        assert len(named) == 1 and named <= first_report
        assert node.stop() == 0
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)
