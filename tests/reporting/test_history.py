"""Lesion history (issue 9, acceptance 4): trend plots and the one-page Encapsulated PDF, which
passes dciodvfy, reads back byte-identical and has deterministic UIDs."""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pydicom
import pytest

from processing.change import VOLUME_MDC
from reporting.history import (
    ENCAPSULATED_PDF_STORAGE,
    build_encapsulated_pdf,
    history_pdf,
    lesion_history_documents,
    repeatability_band,
    trend_image,
)
from tests.node.dicom_factory import PATIENT_ID, mr_dataset
from tests.node.test_timeline import build_summary
from tests.reporting.tools import dciodvfy

SUMMARY = build_summary()
RECORDS = SUMMARY["time_points"]


def test_repeatability_band_around_baseline() -> None:
    low, high = repeatability_band(RECORDS, "ADC.mean")
    # the case's 12 % and the published bone-metastasis 12.9 %, in quadrature
    r = float(np.hypot(0.12, 0.129))
    assert (low, high) == pytest.approx((0.90e-3 * (1 - r), 0.90e-3 * (1 + r)))
    low, high = repeatability_band(RECORDS, "volume")
    assert (low, high) == pytest.approx((10.0 * (1 - VOLUME_MDC), 10.0 * (1 + VOLUME_MDC)))
    assert repeatability_band(RECORDS, "T1.mean") is None
    assert repeatability_band(RECORDS[:1], "ADC.mean") is None  # baseline only: no changes


def test_trend_image_renders(tmp_path: Path) -> None:
    png = trend_image(RECORDS, fmt="png", dpi=80)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    pixels = mpimg.imread(io.BytesIO(png), format="png")
    assert pixels.shape[:2] == (480, 640)  # 8 x 6 in at 80 dpi
    assert float(np.std(pixels[..., :3])) > 0.05  # not blank
    (tmp_path / "trend.png").write_bytes(png)
    svg = trend_image(RECORDS, fmt="svg")
    assert b"<svg" in svg and b"days since treatment" in svg
    assert b"PsP?" in svg and b"LC" in svg  # the calls are marked
    with pytest.raises(ValueError, match="one lesion"):
        trend_image(RECORDS + [{**RECORDS[0], "lesion": {"tracking_uid": "2.25.9"}}])


def test_history_pdf_is_one_deterministic_page() -> None:
    pdf = history_pdf(RECORDS, course=SUMMARY["course"], algorithm_version="test")
    assert pdf.startswith(b"%PDF-")
    assert len(re.findall(rb"/Type\s*/Page\b(?!s)", pdf)) == 1
    assert history_pdf(RECORDS, course=SUMMARY["course"], algorithm_version="test") == pdf
    assert b"CreationDate" not in pdf


def test_history_pdf_shows_the_rule_set_sources_and_repeatability(tmp_path: Path) -> None:
    """What a reader sees (poppler's pdftotext): the call's rule set, each fired criterion's
    source, where the evidence leans and the combined repeatability coefficients."""
    path = tmp_path / "history.pdf"
    path.write_bytes(history_pdf(RECORDS, course=SUMMARY["course"], algorithm_version="test"))
    text = subprocess.run(
        ["pdftotext", str(path), "-"], check=True, capture_output=True, text=True
    ).stdout
    flat = " ".join(text.split())
    assert "rule set spine-sbrt-response 2.0): local control" in flat
    assert "[Kumar 2017 (Technol Cancer Res Treat): vp cut-off -20 %]" in flat
    assert "[Messiou 2011 (Eur Radiol): ADC +25 %]" in flat
    assert "Functional evidence leans to: treatment effect." in flat
    # volume: the published MDD; the ADC median: published 12.9 % (no per-case value given); vp:
    # the published 38.5 % and the case's 30 % combined
    assert "Repeatability coefficients: volume ±10.9 %; ADC.median ±12.9 %;" in flat
    assert "vp.mean ±48.8 % (test-retest 38.5 %, segmentation 30.0 %)" in flat.replace(
        "testretest",
        "test-retest",  # pdftotext joins a hyphenated line break
    )


def test_encapsulated_pdf_passes_dciodvfy_and_reads_back(tmp_path: Path) -> None:
    source = mr_dataset(study_uid="2.25.1003", series_uid="2.25.1003.1", instance_number=1)
    pdf = history_pdf(RECORDS, course=SUMMARY["course"], algorithm_version="test")
    ds = build_encapsulated_pdf(pdf, source, tracking_uid="2.25.222", algorithm_version="test")
    path = tmp_path / "history.dcm"
    ds.save_as(path, enforce_file_format=True)
    dciodvfy(path)
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == ENCAPSULATED_PDF_STORAGE
    assert back.Modality == "DOC" and back.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert back.StudyInstanceUID == "2.25.1003" and back.PatientID == PATIENT_ID
    assert back.EncapsulatedDocumentLength == len(pdf)
    assert back.EncapsulatedDocument[: len(pdf)] == pdf
    assert back.SourceInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    # deterministic UIDs: same inputs, same UIDs; a new document supersedes in the same series
    again = build_encapsulated_pdf(pdf, source, tracking_uid="2.25.222", algorithm_version="test")
    assert again.SOPInstanceUID == ds.SOPInstanceUID
    newer = build_encapsulated_pdf(
        history_pdf(RECORDS[:2], algorithm_version="test"),
        source,
        tracking_uid="2.25.222",
        algorithm_version="test",
    )
    assert newer.SOPInstanceUID != ds.SOPInstanceUID
    assert newer.SeriesInstanceUID == ds.SeriesInstanceUID
    with pytest.raises(ValueError, match="PDF header"):
        build_encapsulated_pdf(
            b"not a pdf", source, tracking_uid="2.25.222", algorithm_version="test"
        )


def test_lesion_history_documents_per_follow_up() -> None:
    images = {
        uid: mr_dataset(study_uid=uid, series_uid=f"{uid}.1", instance_number=1)
        for uid in ("2.25.1001", "2.25.1002", "2.25.1003")
    }
    documents = lesion_history_documents(
        RECORDS, follow_up_images=images, algorithm_version="test", course=SUMMARY["course"]
    )
    # one per follow-up (the baseline gets none), each in its follow-up's study
    assert [d.StudyInstanceUID for d in documents] == ["2.25.1002", "2.25.1003"]
    assert len({d.SOPInstanceUID for d in documents}) == 2
    assert all(d.EncapsulatedDocument.startswith(b"%PDF-") for d in documents)


@pytest.mark.network
def test_history_pdf_arrives_at_the_destination_with_other_outputs(tmp_path: Path) -> None:
    """The node's real outbox and dispatcher deliver the PDF with a SEG-like companion output to
    dcmtk's storescp."""
    import os
    import subprocess
    import time

    from node.config import settings_from_mapping
    from node.dispatch import Dispatcher, Outbox
    from node.index import Index
    from node.store import Store
    from tests.node.conftest import free_port, require_tool
    from tests.node.dicom_factory import write_mr_series

    require_tool("storescp")
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    storage = tmp_path / "storage"
    settings = settings_from_mapping(
        {
            "node": {"storage": str(storage), "dimse_timeout_s": 10},
            "peers": [{"ae_title": "STORESCP", "port": port, "may_receive": True}],
            # storescp may still be starting at the first try
            "dispatch": {"backoff_initial_s": 0.2, "backoff_max_s": 0.5},
        }
    )
    source = mr_dataset(study_uid="2.25.1003", series_uid="2.25.1003.1", instance_number=1)
    pdf_ds = build_encapsulated_pdf(
        history_pdf(RECORDS, algorithm_version="test"),
        source,
        tracking_uid="2.25.222",
        algorithm_version="test",
    )
    outputs = tmp_path / "outputs"
    companions = write_mr_series(outputs, 1, study_uid="2.25.1003", rows=8, columns=8)
    pdf_path = outputs / "history.dcm"
    pdf_ds.save_as(pdf_path, enforce_file_format=True)
    pacs = subprocess.Popen(
        ["storescp", "+uf", "-od", str(received), "-aet", "STORESCP", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    index = Index(settings.node.database_path)
    try:
        outbox = Outbox(index, Store(storage, index), settings)
        outbox.enqueue([*companions, pdf_path], "STORESCP", "analysis of study 2.25.1003")
        deadline = time.monotonic() + 20
        while outbox.counts() != {"sent": 2}:
            assert time.monotonic() < deadline, f"not delivered: {outbox.counts()}"
            Dispatcher(outbox, settings).run_once()
            time.sleep(0.2)
    finally:
        index.close()
        pacs.terminate()
        pacs.wait(10)
    got = {pydicom.dcmread(p).SOPClassUID: pydicom.dcmread(p) for p in received.iterdir()}
    assert set(got) == {ENCAPSULATED_PDF_STORAGE, "1.2.840.10008.5.1.4.1.1.4"}
    arrived = got[ENCAPSULATED_PDF_STORAGE]
    assert arrived.SOPInstanceUID == pdf_ds.SOPInstanceUID
    assert arrived.EncapsulatedDocument == pdf_ds.EncapsulatedDocument
    assert os.path.getsize(next(received.iterdir())) > 0
