"""A treated lesion's history: trend plots and a one-page DICOM Encapsulated PDF.

Input is the lesion's time points in the shape of :func:`reporting.summary.summary_records`
(``ChainResult.summary()["time_points"]`` or ``node.timeline.TimePoint.as_record()``): days since
treatment, measurements in the node's internal units (volume mL, ADC mm²/s, Ktrans /min, vp as a
fraction), changes with their repeatability (relative, a fraction) and the response call.

* :func:`trend_figure` / :func:`trend_image`: volume, ADC, Ktrans and vp against days since
  treatment, the response calls marked, and the repeatability band (baseline value ± the minimum
  detectable change the chain used for that quantity) shaded. Rendered server-side with
  matplotlib's object-oriented API (no pyplot state: safe in the dashboard's threads).
* :func:`history_pdf`: one A4 page (table of time points + trend plots), written by matplotlib;
  its metadata carry no creation date, so equal inputs give equal bytes.
* :func:`build_encapsulated_pdf`: the page as an Encapsulated PDF instance (PS3.3 A.45.1) in the
  follow-up study, so any PACS viewer shows the history. highdicom (0.28) has no Encapsulated
  Document IOD, so it is written with pydicom module by module and checked with dciodvfy in the
  tests; UIDs are deterministic (:mod:`reporting.uids`).

No patient name, ID or birth date is drawn into the PDF (the DICOM header carries the patient's
identification, copied from the follow-up images).

References
----------
DICOM PS3.3 A.45.1 Encapsulated PDF IOD; C.24.1 Encapsulated Document Series module; C.24.2
Encapsulated Document module; C.8.6.1 SC Equipment module.
"""

from __future__ import annotations

import hashlib
import io
import logging
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from reporting.header import derived_dataset
from reporting.seg import DEVICE_SERIAL_NUMBER, MANUFACTURER, MODEL_NAME, sanitized_source
from reporting.uids import deterministic_uid, digest_text

logger = logging.getLogger(__name__)

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
HISTORY_SERIES_NUMBER = 9400

#: (dotted path, panel title, display scale, display unit)
TREND_QUANTITIES: tuple[tuple[str, str, float, str], ...] = (
    ("volume", "Volume", 1.0, "mL"),
    ("ADC.mean", "ADC (mean)", 1e3, "10⁻³ mm²/s"),
    ("Ktrans.mean", "Ktrans (mean)", 1.0, "/min"),
    ("vp.mean", "vp (mean)", 100.0, "%"),
)

#: response category -> marker colour
_CALL_COLOURS = {
    "local control": "tab:green",
    "local progression": "tab:red",
    "indeterminate - possible pseudoprogression": "tab:orange",
    "not assessable": "tab:gray",
}
_CALL_SHORT = {
    "local control": "LC",
    "local progression": "PD",
    "indeterminate - possible pseudoprogression": "PsP?",
    "not assessable": "NA",
}

#: response category -> table text
_TABLE_CALLS = {"indeterminate - possible pseudoprogression": "indeterminate (PsP?)"}


def _ordered(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    if not records:
        raise ValueError("no time points: a history needs at least one")
    lesions = {(r.get("lesion") or {}).get("tracking_uid") for r in records}
    if len(lesions) != 1:
        raise ValueError(f"time points of {len(lesions)} lesions given; plot one lesion at a time")
    for r in records:
        if r.get("days_since_treatment") is None:
            raise ValueError(
                f"time point {r.get('study_instance_uid')} has no days since treatment"
            )
    return sorted(records, key=lambda r: (r["days_since_treatment"], str(r.get("study_date"))))


def repeatability_band(
    records: Sequence[Mapping[str, Any]], quantity: str
) -> tuple[float, float] | None:
    """Band of no detectable change around the baseline value of ``quantity``.

    Returns
    -------
    tuple of float or None
        ``(low, high)`` = baseline × (1 ∓ r) in internal units, where r is the largest relative
        repeatability (minimum detectable change, a fraction) of the follow-ups' changes of this
        quantity from baseline; ``None`` without a baseline value or a repeatability.
    """
    baseline = [
        r
        for r in records
        if r.get("role") == "baseline" and quantity in (r.get("measurements") or {})
    ]
    limits = [
        c["repeatability"]
        for r in records
        for c in (r.get("changes") or [])
        if c.get("quantity") == quantity
        and c.get("reference") == "baseline"
        and c.get("repeatability") is not None
    ]
    if not baseline or not limits:
        return None
    value = float(baseline[0]["measurements"][quantity])
    r = max(float(x) for x in limits)
    low, high = value * (1.0 - r), value * (1.0 + r)
    return (min(low, high), max(low, high))


def trend_figure(
    records: Sequence[Mapping[str, Any]],
    *,
    title: str | None = None,
    figsize: tuple[float, float] = (8.0, 6.0),
) -> Figure:
    """Four trend panels (volume, ADC, Ktrans, vp) of one lesion against days since treatment.

    Parameters
    ----------
    records : sequence of mapping
        One lesion's time points (``summary_records`` shape).
    title : str, optional
        Figure title (default: the lesion's tracking identifier and level).
    figsize : tuple of float
        Inches.

    Returns
    -------
    matplotlib.figure.Figure
        Panels without data say so; follow-ups carry their response call (LC, PD, PsP?, NA);
        the grey band is the repeatability band of :func:`repeatability_band`.
    """
    points = _ordered(records)
    lesion = points[0].get("lesion") or {}
    fig = Figure(figsize=figsize, layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    days = [int(p["days_since_treatment"]) for p in points]
    for ax, (path, label, scale, unit) in zip(axes, TREND_QUANTITIES):
        xs = [d for d, p in zip(days, points) if path in (p.get("measurements") or {})]
        ys = [
            float(p["measurements"][path]) * scale
            for p in points
            if path in (p.get("measurements") or {})
        ]
        ax.set_title(f"{label} [{unit}]", fontsize=9)
        ax.axvline(0, color="black", lw=0.8, ls=":")
        ax.grid(True, lw=0.3)
        if not xs:
            ax.text(
                0.5,
                0.5,
                "not measured",
                transform=ax.transAxes,
                ha="center",
                va="center",
                color="gray",
            )
            continue
        band = repeatability_band(points, path)
        if band is not None:
            ax.axhspan(
                band[0] * scale, band[1] * scale, color="0.85", zorder=0, label="repeatability"
            )
        ax.plot(xs, ys, "-o", color="tab:blue", ms=4, zorder=2)
        for p, d in zip(points, days):
            category = (p.get("response") or {}).get("category")
            if category is None or path not in (p.get("measurements") or {}):
                continue
            y = float(p["measurements"][path]) * scale
            ax.plot(
                [d],
                [y],
                "s",
                ms=8,
                mfc="none",
                mec=_CALL_COLOURS.get(category, "k"),
                mew=1.5,
                zorder=3,
            )
            ax.annotate(
                _CALL_SHORT.get(category, category),
                (d, y),
                textcoords="offset points",
                xytext=(4, 6),
                fontsize=7,
                color=_CALL_COLOURS.get(category, "k"),
            )
    for ax in axes[2:]:
        ax.set_xlabel("days since treatment")
    level = f" ({lesion['vertebral_level']})" if lesion.get("vertebral_level") else ""
    fig.suptitle(
        title or f"Lesion {lesion.get('tracking_id') or lesion.get('tracking_uid')}{level}",
        fontsize=11,
    )
    return fig


def trend_image(
    records: Sequence[Mapping[str, Any]],
    *,
    fmt: str = "png",
    dpi: int = 100,
    title: str | None = None,
) -> bytes:
    """:func:`trend_figure` rendered as PNG or SVG bytes."""
    if fmt not in ("png", "svg"):
        raise ValueError(f"fmt must be 'png' or 'svg', not {fmt!r}")
    buffer = io.BytesIO()
    metadata = {"Software": None} if fmt == "png" else {"Date": None}
    trend_figure(records, title=title).savefig(buffer, format=fmt, dpi=dpi, metadata=metadata)
    return buffer.getvalue()


def _fmt(value: Any, scale: float = 1.0, digits: int = 3) -> str:
    return "" if value is None else f"{float(value) * scale:.{digits}g}"


def _relative(record: Mapping[str, Any], quantity: str) -> str:
    for change in record.get("changes") or []:
        if change.get("quantity") == quantity and change.get("reference") == "baseline":
            if change.get("relative") is None:
                return ""
            mark = "*" if change.get("beyond_repeatability") else ""
            return f" ({change['relative'] * 100:+.0f}%{mark})"
    return ""


#: quantities whose repeatability coefficients the PDF lists (those the rule set weighs)
_NOTE_QUANTITIES = ("volume", "ADC.median", "Ktrans.mean", "vp.mean", "IAUC60.mean")


def _repeatability_note(record: Mapping[str, Any]) -> str:
    """The repeatability coefficients of the record's changes from baseline, with their parts."""
    parts = []
    changes = {
        c.get("quantity"): c
        for c in record.get("changes") or []
        if c.get("reference") == "baseline" and c.get("repeatability") is not None
    }
    for change in (changes[q] for q in _NOTE_QUANTITIES if q in changes):
        detail = [
            f"{label} {change[key] * 100:.1f} %"
            for key, label in (
                ("repeatability_test_retest", "test-retest"),
                ("repeatability_segmentation", "segmentation"),
            )
            if change.get(key) is not None
        ]
        extra = f" ({', '.join(detail)})" if len(detail) > 1 else ""
        parts.append(f"{change['quantity']} ±{change['repeatability'] * 100:.1f} %{extra}")
    return f"Repeatability coefficients: {'; '.join(parts)}." if parts else ""


def history_pdf(
    records: Sequence[Mapping[str, Any]],
    *,
    course: Mapping[str, Any] | None = None,
    algorithm_version: str = "",
) -> bytes:
    """One A4 page summarising the lesion's history, as PDF bytes (deterministic).

    Parameters
    ----------
    records : sequence of mapping
        One lesion's time points (``summary_records`` shape).
    course : mapping, optional
        ``ChainResult.summary()["course"]`` (treatment date, fractionation, BED).
    algorithm_version : str
        Printed in the footer.
    """
    points = _ordered(records)
    lesion = points[0].get("lesion") or {}
    fig = Figure(figsize=(8.27, 11.69))  # A4 portrait, inches
    level = f", {lesion['vertebral_level']}" if lesion.get("vertebral_level") else ""
    fig.text(
        0.06,
        0.965,
        f"Lesion history: {lesion.get('tracking_id') or ''}{level}",
        fontsize=15,
        weight="bold",
    )
    lines = [f"Tracking UID {lesion.get('tracking_uid')}"]
    if course:
        lines.append(
            f"CyberKnife course: first treatment day {course.get('treatment_date')}"
            f"{' (estimated)' if course.get('treatment_date_estimated') else ''}, "
            f"{course.get('fractions')} fractions, {_fmt(course.get('prescription_dose_gy'))} Gy, "
            f"BED10 {_fmt(course.get('bed10_gy'))} Gy"
        )
    fig.text(0.06, 0.94, "\n".join(lines), fontsize=8, va="top")
    header = [
        "date",
        "day",
        "role",
        "volume mL",
        "ADC 10⁻³mm²/s",
        "Ktrans /min",
        "vp %",
        "response",
    ]
    rows = []
    for p in points:
        m = p.get("measurements") or {}
        rows.append(
            [
                str(p.get("study_date")),
                f"{int(p['days_since_treatment']):+d}",
                str(p.get("role")),
                _fmt(m.get("volume")) + _relative(p, "volume"),
                _fmt(m.get("ADC.mean"), 1e3) + _relative(p, "ADC.mean"),
                _fmt(m.get("Ktrans.mean")) + _relative(p, "Ktrans.mean"),
                _fmt(m.get("vp.mean"), 100) + _relative(p, "vp.mean"),
                _TABLE_CALLS.get(
                    (p.get("response") or {}).get("category") or "",
                    (p.get("response") or {}).get("category") or "",
                ),
            ]
        )
    table_ax = fig.add_axes((0.04, 0.70, 0.92, 0.2))
    table_ax.axis("off")
    table = table_ax.table(
        cellText=rows,
        colLabels=header,
        loc="upper center",
        cellLoc="center",
        colWidths=[0.12, 0.06, 0.09, 0.13, 0.15, 0.13, 0.11, 0.21],
    )
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.scale(1.0, 1.3)
    notes = [
        "Changes in brackets are relative to the baseline; * = beyond the repeatability "
        "coefficient (published test-retest and this case's segmentation, combined)."
    ]
    last = points[-1]
    response = last.get("response") or {}
    if response:
        fired = [
            c.get("description", "") + (f" [{c['source']}]" if c.get("source") else "")
            for c in response.get("criteria") or []
            if c.get("fired")
        ]
        notes.append(
            f"Latest call ({last.get('study_date')}, rule set {response.get('rule_set')}): "
            f"{response.get('category')}" + (f" — {'; '.join(fired)}" if fired else "")
        )
        if response.get("leaning"):
            notes.append(f"Functional evidence leans to: {response['leaning']}.")
        if response.get("recommendation"):
            notes.append(f"Recommendation: {response['recommendation']}")
    coefficients = _repeatability_note(last)
    if coefficients:
        notes.append(coefficients)
    if last.get("comparability") and last.get("comparability") != "comparable":
        notes.append(
            f"Comparability with baseline: {last['comparability']} "
            f"({'; '.join(last.get('comparability_reasons') or [])})"
        )
    wrapped = [line for note in notes for line in textwrap.wrap(note, 135)]
    fig.text(0.06, 0.69, "\n".join(wrapped[:15]), fontsize=6.5, va="top")
    trend = trend_figure(points, figsize=(7.5, 5.6), title="Trends")
    buffer = io.BytesIO()
    trend.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    buffer.seek(0)
    import matplotlib.image as mpimg

    image_ax = fig.add_axes((0.04, 0.05, 0.92, 0.50))
    image_ax.imshow(mpimg.imread(buffer, format="png"))
    image_ax.axis("off")
    fig.text(
        0.06,
        0.025,
        f"Spine Response Node {algorithm_version} — research use; the "
        "radiologist's report is authoritative.",
        fontsize=7,
        color="0.3",
    )
    out = io.BytesIO()
    fig.savefig(
        out,
        format="pdf",
        metadata={
            "CreationDate": None,
            "Producer": None,
            "Creator": f"Spine Response Node {algorithm_version}".strip(),
        },
    )
    return out.getvalue()


def build_encapsulated_pdf(
    pdf: bytes,
    follow_up_image: Dataset,
    *,
    tracking_uid: str,
    algorithm_version: str,
    document_title: str = "Treated lesion history",
    series_number: int = HISTORY_SERIES_NUMBER,
) -> Dataset:
    """Wrap the history PDF as an Encapsulated PDF instance in the follow-up's study.

    Parameters
    ----------
    pdf : bytes
        The document (:func:`history_pdf`).
    follow_up_image : pydicom.Dataset
        An image of the follow-up study (patient and study attributes are copied from it,
        invalid values neutralised as for the SEG).
    tracking_uid : str
        The lesion's Tracking UID (part of the deterministic UIDs).
    algorithm_version : str
        Software Versions; part of the UIDs.
    document_title : str
        Document Title (0042,0010).
    series_number : int

    Returns
    -------
    pydicom.Dataset
        Encapsulated PDF Storage instance with file meta information, ready to save.
    """
    if not pdf.startswith(b"%PDF-"):
        raise ValueError("pdf does not start with a PDF header (%PDF-)")
    if not algorithm_version:
        raise ValueError("algorithm_version must be given")
    source = sanitized_source(follow_up_image)
    digest = digest_text(tracking_uid, str(source.SOPInstanceUID), hashlib.sha256(pdf).hexdigest())
    uid_args = dict(
        source_study_uid=str(source.StudyInstanceUID),
        tracking_uid=tracking_uid,
        algorithm_version=algorithm_version,
    )
    sop_instance_uid = deterministic_uid(
        kind="history-pdf/instance", input_digest=digest, **uid_args
    )
    # the series UID does not depend on the document, so a new version lands in the same series
    series_uid = deterministic_uid(
        kind="history-pdf/series", input_digest="lesion-history", **uid_args
    )

    ds = derived_dataset(ENCAPSULATED_PDF_STORAGE, sop_instance_uid, source)
    # Encapsulated Document Series
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "Lesion history (Spine Response Node)"
    # General Equipment + SC Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.DeviceSerialNumber = DEVICE_SERIAL_NUMBER
    ds.SoftwareVersions = algorithm_version
    ds.ConversionType = "SYN"
    # Encapsulated Document
    ds.InstanceNumber = 1
    ds.ContentDate = ds.InstanceCreationDate
    ds.ContentTime = ds.InstanceCreationTime
    ds.AcquisitionDateTime = ""
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ds.SourceInstanceSequence = DicomSequence([ref])
    ds.DocumentTitle = document_title[:64]
    ds.ConceptNameCodeSequence = DicomSequence([])
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")
    logger.info(
        "history PDF %s for lesion %s in study %s (%d bytes)",
        sop_instance_uid,
        tracking_uid,
        source.StudyInstanceUID,
        len(pdf),
    )
    return ds


def lesion_history_documents(
    time_points: Sequence[Mapping[str, Any]],
    *,
    follow_up_images: Mapping[str, Dataset],
    algorithm_version: str,
    course: Mapping[str, Any] | None = None,
) -> list[Dataset]:
    """One Encapsulated PDF per lesion and follow-up study: the history up to that study.

    Parameters
    ----------
    time_points : sequence of mapping
        All time points of the analysis (``ChainResult.summary()["time_points"]``, any lesions).
    follow_up_images : mapping of str to pydicom.Dataset
        Study Instance UID -> one image of that follow-up study (e.g. its anatomical reference);
        follow-ups without an image get no document.
    algorithm_version : str
    course : mapping, optional
        ``ChainResult.summary()["course"]``.

    Returns
    -------
    list of pydicom.Dataset
        Encapsulated PDF instances, to be sent with the other outputs. A re-analysis that changes
        the history gives new SOP Instance UIDs in the same series (see
        :func:`build_encapsulated_pdf`).
    """
    by_lesion: dict[str, list[Mapping[str, Any]]] = {}
    for record in time_points:
        by_lesion.setdefault((record.get("lesion") or {}).get("tracking_uid") or "", []).append(
            record
        )
    documents = []
    for tracking_uid, records in sorted(by_lesion.items()):
        if not tracking_uid:
            raise ValueError("a time point has no lesion tracking_uid")
        points = _ordered(records)
        for i, record in enumerate(points):
            image = follow_up_images.get(str(record.get("study_instance_uid")))
            if record.get("role") != "follow-up" or image is None:
                continue
            pdf = history_pdf(points[: i + 1], course=course, algorithm_version=algorithm_version)
            documents.append(
                build_encapsulated_pdf(
                    pdf, image, tracking_uid=tracking_uid, algorithm_version=algorithm_version
                )
            )
    return documents
