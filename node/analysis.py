"""Reading a patient's instances from the node's store, and writing the chain's outputs.

Used by the one pipeline runner (:func:`node.pipeline.run_patient`), which the node (a stable
study makes its patient analysable), ``spine-node analyze`` and ``spine-node cohort`` share.
"""

from __future__ import annotations

import json
import logging
import re
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import KeyObjectSelectionDocumentStorage

from node.chain import ChainResult
from node.index import Index

logger = logging.getLogger(__name__)


def patients_in_index(index: Index) -> list[int]:
    """Row ids of the patients that have at least one stored instance."""
    rows = index.query(
        "SELECT DISTINCT s.patient_key FROM studies s JOIN instances i ON i.study_uid = s.study_uid"
        " WHERE s.patient_key IS NOT NULL ORDER BY s.patient_key"
    )
    return [int(r[0]) for r in rows]


def patient_of_study(index: Index, study_uid: str) -> int | None:
    rows = index.query("SELECT patient_key FROM studies WHERE study_uid=?", (study_uid,))
    return int(rows[0][0]) if rows and rows[0][0] is not None else None


def patient_datasets(index: Index, store_root: Path, patient_row: int) -> list[Dataset]:
    """Every stored instance of one patient, read from the store (with pixel data).

    Instances withdrawn by an IHE IOCM rejection note are left out (:mod:`node.rejection`), and
    so are key object selections (the notes themselves among them): the chain has no use for them.
    """
    rows = index.query(
        "SELECT i.path FROM instances i JOIN studies s ON i.study_uid = s.study_uid"
        " WHERE s.patient_key = ?"
        " AND i.sop_instance_uid NOT IN (SELECT sop_instance_uid FROM rejections)"
        " AND i.sop_class_uid != ?"
        " ORDER BY i.study_uid, i.series_uid, i.sop_instance_uid",
        (patient_row, KeyObjectSelectionDocumentStorage),
    )
    datasets = []
    with warnings.catch_warnings():
        # pydicom's validation warnings quote element values (possibly identifiers)
        warnings.simplefilter("ignore")
        for row in rows:
            datasets.append(dcmread(Path(store_root) / row[0]))
    return datasets


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40] or "object"


def write_outputs(result: ChainResult, out_dir: Path) -> list[Path]:
    """Write every produced DICOM object and ``summary.json``; return the object paths.

    File names come from the object kind, time point and description — never from patient data
    or raw UIDs.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    roles = {s.study_instance_uid: s.role for s in result.studies}
    paths: list[Path] = []
    for n, ds in enumerate(result.outputs, start=1):
        role = roles.get(str(ds.StudyInstanceUID), "study")
        name = f"{n:02d}-{ds.Modality}-{role}-{_slug(str(ds.get('SeriesDescription', '')))}.dcm"
        path = out_dir / name
        start = time.perf_counter()
        ds.save_as(path, enforce_file_format=True)
        if ds.Modality == "SR":  # the report's stage is its build (chain) and this write
            result.timings["SR write"] = result.timings.get("SR write", 0.0) + (
                time.perf_counter() - start
            )
        paths.append(path)
    summary = result.summary(files=[p.name for p in paths])
    (out_dir / "summary.json").write_text(
        json.dumps(summary, indent=2, default=str), encoding="utf-8"
    )
    return paths


def link_superseded_reports(
    paths: Sequence[Path], previous: dict[str, list[dict[str, str]]]
) -> int:
    """Name, in each new SR, the earlier SR of the same study that it replaces.

    A re-analysis (a corrected baseline, a reader's SEG, a late series) changes the numbers of a
    follow-up's report, so the report gets new UIDs; its Predecessor Documents Sequence
    (0040,A360; PS3.3 C.17.2, Hierarchical SOP Instance Reference Macro) points at the report it
    supersedes, so a viewer or the PACS can show that the earlier one was amended. A report whose
    UID did not change (same inputs, same numbers) is left as it is.

    Parameters
    ----------
    paths : sequence of Path
        The objects of the new analysis (only SR documents are changed, in place).
    previous : dict
        :func:`node.timeline.recorded_reports` of the patient, read before the new analysis is
        recorded.

    Returns
    -------
    int
        How many reports now name a predecessor.
    """
    linked = 0
    for path in paths:
        # most outputs are Parametric Maps and SEGs: look at their Modality only
        if (
            dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality")
            != "SR"
        ):
            continue
        ds = dcmread(path)
        study = str(ds.StudyInstanceUID)
        older = [
            r for r in previous.get(study, []) if r["sop_instance_uid"] != str(ds.SOPInstanceUID)
        ]
        if not older:
            continue
        item = Dataset()
        item.StudyInstanceUID = study
        item.ReferencedSeriesSequence = []
        for series_uid in dict.fromkeys(r["series_instance_uid"] for r in older):
            series = Dataset()
            series.SeriesInstanceUID = series_uid
            series.ReferencedSOPSequence = []
            for r in older:
                if r["series_instance_uid"] == series_uid:
                    ref = Dataset()
                    ref.ReferencedSOPClassUID = r["sop_class_uid"]
                    ref.ReferencedSOPInstanceUID = r["sop_instance_uid"]
                    series.ReferencedSOPSequence.append(ref)
            item.ReferencedSeriesSequence.append(series)
        ds.PredecessorDocumentsSequence = [item]
        ds.save_as(path, enforce_file_format=True)
        logger.info(
            "report %s supersedes %s",
            ds.SOPInstanceUID,
            ", ".join(r["sop_instance_uid"] for r in older),
        )
        linked += 1
    return linked


def _gy(value: float | None, digits: int) -> str:
    """A dose for the text summary; plans without a prescription leave it unknown."""
    return "unknown" if value is None else f"{value:.{digits}f} Gy"


def format_course(course: dict[str, Any]) -> str:
    """A treatment course (``summary.json``'s ``course``, :func:`node.chain.course_summary`) as
    a few lines of text, for ``analyze`` and the demo."""
    date = course.get("treatment_date")
    source = course.get("treatment_date_source")
    estimated = " (estimated)" if course.get("treatment_date_estimated") else ""
    lines = [
        f"  treated {date}{estimated} (date from {source}), machine "
        f"{course.get('machine') or 'unknown'}, {course.get('n_beams')} beams",
        f"  {course.get('fractions') or '?'} x {_gy(course.get('dose_per_fraction_gy'), 2)}"
        f" = {_gy(course.get('prescription_dose_gy'), 2)} prescribed; "
        f"BED10 {_gy(course.get('bed10_gy'), 1)}, EQD2 {_gy(course.get('eqd2_gy'), 1)}",
    ]
    if course.get("gtv"):
        gtv = f"  target {course['gtv']}"
        dose = course.get("gtv_dose") or {}
        parts = [
            f"{k.removesuffix('_gy')} {v:.2f} Gy"
            for k, v in dose.items()
            if k.endswith("_gy") and k != "alpha_beta_gy" and isinstance(v, (int, float))
        ]
        if isinstance(dose.get("volume_ml"), (int, float)):
            parts.insert(0, f"{dose['volume_ml']:.2f} mL")
        if parts:
            gtv += ": " + ", ".join(parts)
        lines.append(gtv)
    return "\n".join(lines)


def chain_datasets_summary(datasets: Sequence[Dataset]) -> str:
    studies = {str(ds.StudyInstanceUID) for ds in datasets}
    series = {str(ds.SeriesInstanceUID) for ds in datasets}
    return f"{len(datasets)} instances in {len(series)} series of {len(studies)} studies"
