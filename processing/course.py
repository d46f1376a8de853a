"""CyberKnife treatment courses from RT objects: recognition, date, fractionation, GTV and its dose.

Pure functions on pydicom Datasets (RT Plan, RT Structure Set, RT Dose, RT Beams Treatment Record)
and SimpleITK images; no network, no index (the node keeps the courses it builds from these).

* **Recognition** (docs/science.md §4.2): Manufacturer matching a configurable pattern (default
  ``accuray``) or TreatmentMachineName / ManufacturerModelName matching a configurable pattern
  (default ``cyber|\\bck|m6|s7|vsi|g4``); when only the model/machine matches, a plan with many
  beams (more than ``min_beams``, default 30: CyberKnife plans have ~100-150 non-isocentric beams,
  conventional linac plans a handful) breaks the tie.
* **Treatment date**, in priority order: RT Beams Treatment Record (first TreatmentDate,
  FirstTreatmentDate), the plan's ReviewDate when ApprovalStatus is APPROVED, the RTPlanDate, the RT
  Dose InstanceCreationDate; from the plan review on, the date is a lower bound and flagged
  ``estimated``.
* **Fractionation**: NumberOfFractionsPlanned (300A,0078); prescription TargetPrescriptionDose
  (300A,0026, Gy, total) of the target dose reference.
* **GTV**: RT ROI Interpreted Type GTV first, then TG-263-style names (``^gtv``), see
  :func:`select_gtv`.
* **GTV dose** from the RT Dose grid resampled (linear) onto the GTV mask grid: Dmin, D98, D95, D50,
  Dmean, D2, Dmax (Gy, plan total), with BED and EQD2 at α/β = 10 Gy (linear-quadratic model,
  BED = n·d·(1 + d/(α/β)), EQD2 = BED/(1 + 2/(α/β)); docs/science.md §3.4) keeping n and d.

References
----------
.. [1] DICOM PS3.3 C.8.8.14 (RT Plan), C.8.8.3 (RT Dose), C.8.8.21 (RT General Treatment Record).
.. [2] Fowler J.F., "The linear-quadratic formula and progress in fractionated radiotherapy",
   Br J Radiol 1989;62:679-694.
.. [3] Mayo C.S. et al., "AAPM TG-263: Standardizing nomenclatures in radiation oncology",
   IJROBP 2018;100:1057-1066.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from processing.dates import dicom_date
from processing.errors import InputError
from processing.rtstruct import RoiInfo, list_rois

logger = logging.getLogger(__name__)

#: modalities of the objects that describe a treatment course (plan, contours, dose, records)
RT_MODALITIES = frozenset({"RTPLAN", "RTSTRUCT", "RTDOSE", "RTRECORD"})
RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RT_TREATMENT_RECORDS = {
    "1.2.840.10008.5.1.4.1.1.481.4",  # RT Beams Treatment Record
    "1.2.840.10008.5.1.4.1.1.481.6",  # RT Brachy Treatment Record
    "1.2.840.10008.5.1.4.1.1.481.7",  # RT Treatment Summary Record
}

#: default α/β of tumour (Gy), docs/science.md §3.4
ALPHA_BETA_TUMOUR_GY = 10.0


class CourseError(InputError):
    """The RT objects do not describe a usable treatment course."""


@dataclass(frozen=True)
class CyberKnifePatterns:
    """Configurable recognition of CyberKnife RT objects (case-insensitive regular expressions).

    Attributes
    ----------
    manufacturer : str
        Pattern for Manufacturer (0008,0070).
    machine : str
        Pattern for TreatmentMachineName (300A,00B2) and ManufacturerModelName (0008,1090).
    min_beams : int
        A plan with more beams than this counts as CyberKnife-like (tie-breaker).
    gtv_names : tuple of str
        ROI name patterns for the GTV, in priority order (TG-263 style).
    """

    manufacturer: str = r"accuray"
    machine: str = r"cyber|\bck|m6|s7|vsi|g4"
    min_beams: int = 30
    gtv_names: tuple[str, ...] = (r"^gtv", r"\bgtv", r"tumou?r|lesion")

    def __post_init__(self) -> None:
        for pattern in (self.manufacturer, self.machine, *self.gtv_names):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"invalid pattern {pattern!r}: {err}") from err
        if self.min_beams < 1:
            raise ValueError(f"min_beams must be >= 1, got {self.min_beams}")


@dataclass(frozen=True)
class Recognition:
    """Whether an RT object comes from a CyberKnife, and why."""

    is_cyberknife: bool
    reasons: tuple[str, ...]
    n_beams: int | None = None
    machine: str | None = None


@dataclass(frozen=True)
class TreatmentDate:
    """Treatment date with where it came from.

    ``estimated`` is True unless a treatment record gave it: plan review/plan/dose dates only bound
    the first fraction from below.
    """

    date: dt.date
    source: str
    estimated: bool


@dataclass(frozen=True)
class Fractionation:
    """Fractionation and prescription of a plan (Gy)."""

    fractions: int | None
    prescription_dose_gy: float | None  # total
    dose_per_fraction_gy: float | None
    bed_gy: float | None  # BED of the prescription at alpha_beta_gy
    eqd2_gy: float | None
    alpha_beta_gy: float = ALPHA_BETA_TUMOUR_GY


@dataclass(frozen=True)
class DoseStatistics:
    """Dose to a structure from the RT Dose grid (Gy, plan total).

    ``D<x>`` is the minimum dose received by the hottest x % of the structure volume (the (100 − x)
    percentile of voxel doses). ``bed_gy``/``eqd2_gy`` convert each statistic with the plan's number
    of fractions (``fractions``) at ``alpha_beta_gy``; they are model values, the raw doses stay
    here.
    """

    volume_ml: float
    n_voxels: int
    dmin_gy: float
    d98_gy: float
    d95_gy: float
    d50_gy: float
    dmean_gy: float
    d2_gy: float
    dmax_gy: float
    fractions: int | None
    alpha_beta_gy: float
    bed_gy: dict[str, float] = field(default_factory=dict)
    eqd2_gy: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TreatmentCourse:
    """A recognised CyberKnife course (what the node stores per course)."""

    rtplan_sop_instance_uid: str
    study_instance_uid: str | None
    frame_of_reference_uid: str | None
    machine: str | None
    n_beams: int
    recognition_reasons: tuple[str, ...]
    treatment_date: TreatmentDate
    fractionation: Fractionation
    plan_label: str | None = None
    rtstruct_sop_instance_uid: str | None = None
    rtdose_sop_instance_uid: str | None = None
    gtv: RoiInfo | None = None
    gtv_dose: DoseStatistics | None = None


def bed(
    total_dose_gy: float, fractions: int, *, alpha_beta_gy: float = ALPHA_BETA_TUMOUR_GY
) -> float:
    """Biologically effective dose, BED = n·d·(1 + d/(α/β)) with d = D/n (Gy).

    Parameters
    ----------
    total_dose_gy : float
        Total physical dose D (Gy), ≥ 0.
    fractions : int
        Number of fractions n, ≥ 1.
    alpha_beta_gy : float
        α/β ratio (Gy), > 0; 10 Gy for tumour.
    """
    if fractions < 1:
        raise ValueError(f"fractions must be >= 1, got {fractions}")
    if alpha_beta_gy <= 0:
        raise ValueError(f"alpha_beta_gy must be > 0, got {alpha_beta_gy}")
    if total_dose_gy < 0:
        raise ValueError(f"total_dose_gy must be >= 0, got {total_dose_gy}")
    d = total_dose_gy / fractions
    return total_dose_gy * (1.0 + d / alpha_beta_gy)


def eqd2(
    total_dose_gy: float, fractions: int, *, alpha_beta_gy: float = ALPHA_BETA_TUMOUR_GY
) -> float:
    """Equivalent dose in 2-Gy fractions, EQD2 = BED/(1 + 2/(α/β)) (Gy)."""
    return bed(total_dose_gy, fractions, alpha_beta_gy=alpha_beta_gy) / (1.0 + 2.0 / alpha_beta_gy)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip() if value is not None else ""


def _machines(plan: Dataset) -> list[str]:
    names = []
    for beam in plan.get("BeamSequence", []):
        name = _text(beam, "TreatmentMachineName")
        if name and name not in names:
            names.append(name)
    top = _text(plan, "TreatmentMachineName")
    if top and top not in names:
        names.append(top)
    return names


def count_beams(plan: Dataset) -> int:
    """Number of treatment beams of an RT Plan (Beam Sequence items, else NumberOfBeams)."""
    beams = plan.get("BeamSequence")
    if beams is not None:
        return sum(1 for b in beams if _text(b, "TreatmentDeliveryType") in ("", "TREATMENT"))
    total = 0
    for group in plan.get("FractionGroupSequence", []):
        total += int(group.get("NumberOfBeams", 0) or 0)
    return total


def recognise(ds: Dataset, *, patterns: CyberKnifePatterns | None = None) -> Recognition:
    """Decide whether an RT Plan / Structure Set / Dose / treatment record comes from a CyberKnife.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        Any RT object. Beam counts only exist on plans.
    patterns : CyberKnifePatterns, optional
        Site configuration.

    Returns
    -------
    Recognition
        ``is_cyberknife`` with the reasons that decided it.
    """
    patterns = patterns or CyberKnifePatterns()
    reasons: list[str] = []
    manufacturer = _text(ds, "Manufacturer")
    model = _text(ds, "ManufacturerModelName")
    machines = _machines(ds)
    by_manufacturer = (
        bool(manufacturer) and re.search(patterns.manufacturer, manufacturer, re.I) is not None
    )
    machine_hits = [m for m in [model, *machines] if m and re.search(patterns.machine, m, re.I)]
    n_beams = count_beams(ds) if str(ds.get("SOPClassUID", "")) == RT_PLAN_STORAGE else None
    if by_manufacturer:
        reasons.append("manufacturer matches")
    if machine_hits:
        reasons.append("machine/model name matches")
    if n_beams is not None:
        reasons.append(
            f"{n_beams} beams ({'>' if n_beams > patterns.min_beams else '<='} "
            f"{patterns.min_beams})"
        )
    if by_manufacturer:
        # Accuray also builds TomoTherapy/Radixact: a plan with few beams and a non-CK machine
        # is not CK
        decided = not (n_beams is not None and n_beams <= patterns.min_beams and not machine_hits)
    elif machine_hits:
        # a name match alone ("CK" may be a site's linac name): the beam count breaks the tie
        # on plans
        decided = n_beams is None or n_beams > patterns.min_beams
    else:
        decided = False
    return Recognition(
        is_cyberknife=decided,
        reasons=tuple(reasons),
        n_beams=n_beams,
        machine=machines[0] if machines else (model or None),
    )


def _parse_date(value: object) -> dt.date | None:
    parsed = dicom_date(value)
    if parsed is None and str(value or "").strip():
        logger.warning("unparseable DICOM date ignored")
    return parsed


def treatment_date(
    plan: Dataset | None,
    *,
    records: Sequence[Dataset] = (),
    dose: Dataset | None = None,
) -> TreatmentDate:
    """Date of the first fraction, with its source and whether it is estimated (docs/science.md
    §4.3).

    Parameters
    ----------
    plan : pydicom.dataset.Dataset or None
        RT Plan.
    records : sequence of pydicom.dataset.Dataset
        RT (Beams) Treatment Records of the course, if the record-and-verify system exports them.
    dose : pydicom.dataset.Dataset, optional
        RT Dose, whose creation date is the last resort.

    Raises
    ------
    CourseError
        When no date can be found at all.
    """
    record_dates: list[tuple[dt.date, str]] = []
    for record in records:
        for keyword in ("TreatmentDate", "FirstTreatmentDate"):
            parsed = _parse_date(record.get(keyword))
            if parsed is not None:
                record_dates.append((parsed, f"treatment record {keyword}"))
        for session in record.get("TreatmentSessionBeamSequence", []):
            parsed = _parse_date(session.get("TreatmentDate"))
            if parsed is not None:
                record_dates.append((parsed, "treatment record TreatmentDate"))
    if record_dates:
        date, source = min(record_dates)
        return TreatmentDate(date, source, estimated=False)
    if plan is not None:
        if _text(plan, "ApprovalStatus").upper() == "APPROVED":
            parsed = _parse_date(plan.get("ReviewDate"))
            if parsed is not None:
                return TreatmentDate(parsed, "approved plan ReviewDate", estimated=True)
        parsed = _parse_date(plan.get("RTPlanDate"))
        if parsed is not None:
            return TreatmentDate(parsed, "RTPlanDate", estimated=True)
    if dose is not None:
        parsed = _parse_date(dose.get("InstanceCreationDate"))
        if parsed is not None:
            return TreatmentDate(parsed, "RT Dose InstanceCreationDate", estimated=True)
    raise CourseError("no treatment record, plan review, plan or dose date to date the course")


def fractionation(plan: Dataset, *, alpha_beta_gy: float = ALPHA_BETA_TUMOUR_GY) -> Fractionation:
    """Fractions and prescription of an RT Plan, with BED/EQD2 of the prescription.

    The prescription is the TargetPrescriptionDose (Gy, total) of the first Dose Reference of type
    TARGET (else any Dose Reference carrying one).
    """
    fractions = None
    for group in plan.get("FractionGroupSequence", []):
        value = group.get("NumberOfFractionsPlanned")
        if value not in (None, ""):
            fractions = int(value)
            break
    prescription = None
    references = list(plan.get("DoseReferenceSequence", []))
    references.sort(key=lambda r: _text(r, "DoseReferenceType") != "TARGET")
    for reference in references:
        value = reference.get("TargetPrescriptionDose")
        if value not in (None, ""):
            prescription = float(value)
            break
    per_fraction = prescription / fractions if prescription is not None and fractions else None
    bed_value = eqd2_value = None
    if prescription is not None and fractions:
        bed_value = bed(prescription, fractions, alpha_beta_gy=alpha_beta_gy)
        eqd2_value = eqd2(prescription, fractions, alpha_beta_gy=alpha_beta_gy)
    return Fractionation(
        fractions, prescription, per_fraction, bed_value, eqd2_value, alpha_beta_gy
    )


def select_gtv(rtstruct: Dataset, *, patterns: CyberKnifePatterns | None = None) -> RoiInfo:
    """Choose the GTV of a structure set.

    ROIs with RT ROI Interpreted Type GTV come first; among several (or none), ROI names are matched
    against ``patterns.gtv_names`` in order (TG-263: ``GTV``, ``GTV_L2``, ``GTVp``...). ROIs without
    contours are skipped. Ties are resolved by the lowest ROI number (logged).

    Raises
    ------
    CourseError
        When no ROI qualifies.
    """
    patterns = patterns or CyberKnifePatterns()
    rois = [r for r in list_rois(rtstruct) if r.n_contours > 0]
    typed = [r for r in rois if r.interpreted_type == "GTV"]
    candidates = typed or rois
    for pattern in patterns.gtv_names:
        named = [r for r in candidates if re.search(pattern, r.name, re.I)]
        if named:
            candidates = named
            break
    else:
        if not typed:
            raise CourseError(
                f"no GTV in structure set {rtstruct.get('SOPInstanceUID', '?')}: no ROI of type "
                f"GTV and no name matching {patterns.gtv_names}"
            )
    candidates = sorted(candidates, key=lambda r: r.number)
    if len(candidates) > 1:
        logger.warning(
            "structure set %s: %d GTV candidates, ROI %d chosen",
            rtstruct.get("SOPInstanceUID", "?"),
            len(candidates),
            candidates[0].number,
        )
    return candidates[0]


def rtdose_image(dose: Dataset, *, fractions: int | None = None) -> sitk.Image:
    """RT Dose grid as a SimpleITK image in Gy for the whole plan (LPS, mm).

    Pixel values × DoseGridScaling (3004,000E); frames placed at GridFrameOffsetVector (3004,000C)
    along the slice normal. A dose summed per FRACTION (DoseSummationType) is multiplied by
    ``fractions``.

    Raises
    ------
    CourseError
        RELATIVE dose units, a fraction dose without the number of fractions, irregular frame
        spacing.
    """
    if str(dose.get("SOPClassUID", "")) != RT_DOSE_STORAGE and dose.get("Modality") != "RTDOSE":
        raise CourseError("dataset is not an RT Dose")
    units = _text(dose, "DoseUnits").upper()
    if units != "GY":
        raise CourseError(f"RT Dose units {units or 'missing'} are not absolute (GY)")
    scaling = float(dose.get("DoseGridScaling", 1.0))
    array = np.asarray(dose.pixel_array, dtype=np.float64) * scaling
    if array.ndim == 2:
        array = array[np.newaxis]
    summation = _text(dose, "DoseSummationType").upper()
    if summation == "FRACTION":
        if not fractions:
            raise CourseError("RT Dose is per FRACTION; the number of fractions is needed")
        array = array * fractions
    offsets = np.asarray(dose.get("GridFrameOffsetVector") or [0.0] * array.shape[0], dtype=float)
    if offsets.size != array.shape[0]:
        raise CourseError(
            f"GridFrameOffsetVector has {offsets.size} values for {array.shape[0]} frames"
        )
    orientation = np.asarray(dose.ImageOrientationPatient, dtype=float)
    row, column = orientation[:3], orientation[3:]
    normal = np.cross(row, column)
    position = np.asarray(dose.ImagePositionPatient, dtype=float)
    if offsets[0] != 0 and np.allclose(normal, (0, 0, 1)) and abs(offsets[0] - position[2]) < 1e-3:
        # PS3.3 C.8.8.3.2: a first offset equal to the z of the position means absolute z values
        offsets = offsets - position[2]
    spacing_z = float(np.diff(offsets).mean()) if offsets.size > 1 else 1.0
    if offsets.size > 2 and not np.allclose(np.diff(offsets), spacing_z, atol=1e-3):
        raise CourseError("RT Dose frames are not equally spaced")
    origin = position + offsets[0] * normal
    direction = np.column_stack([row, column, normal])
    if spacing_z < 0:  # frames stored in decreasing order along the normal
        array = array[::-1]
        origin = origin + offsets[-1] * normal - offsets[0] * normal
        spacing_z = -spacing_z
    image = sitk.GetImageFromArray(array.astype(np.float32))
    pixel_spacing = [float(v) for v in dose.PixelSpacing]  # row spacing, column spacing
    image.SetSpacing((pixel_spacing[1], pixel_spacing[0], spacing_z))
    image.SetOrigin(origin.tolist())
    image.SetDirection(direction.flatten().tolist())
    return image


def dose_statistics(
    dose: sitk.Image,
    mask: sitk.Image,
    *,
    fractions: int | None,
    alpha_beta_gy: float = ALPHA_BETA_TUMOUR_GY,
) -> DoseStatistics:
    """Dose statistics of a structure: dose grid resampled (linear) onto the mask grid.

    Parameters
    ----------
    dose : SimpleITK.Image
        Plan dose (Gy), e.g. from :func:`rtdose_image`.
    mask : SimpleITK.Image
        Structure mask (non-zero inside), same frame of reference.
    fractions : int or None
        Number of fractions for BED/EQD2 (skipped when None).
    alpha_beta_gy : float
        α/β (Gy).

    Raises
    ------
    CourseError
        Empty mask, or mask voxels outside the dose grid.
    """
    inside = sitk.GetArrayFromImage(mask) != 0
    if not inside.any():
        raise CourseError("structure mask is empty")
    resampled = sitk.Resample(
        dose, mask, sitk.Transform(), sitk.sitkLinear, float("nan"), sitk.sitkFloat64
    )
    values = sitk.GetArrayFromImage(resampled)[inside]
    if np.isnan(values).any():
        raise CourseError(
            f"{int(np.isnan(values).sum())} structure voxels lie outside the RT Dose grid"
        )
    stats = {
        "Dmin": float(values.min()),
        "D98": float(np.percentile(values, 2)),
        "D95": float(np.percentile(values, 5)),
        "D50": float(np.percentile(values, 50)),
        "Dmean": float(values.mean()),
        "D2": float(np.percentile(values, 98)),
        "Dmax": float(values.max()),
    }
    bed_values: dict[str, float] = {}
    eqd2_values: dict[str, float] = {}
    if fractions:
        for key, value in stats.items():
            bed_values[key] = bed(max(value, 0.0), fractions, alpha_beta_gy=alpha_beta_gy)
            eqd2_values[key] = eqd2(max(value, 0.0), fractions, alpha_beta_gy=alpha_beta_gy)
    voxel_ml = float(np.prod(mask.GetSpacing())) / 1000.0
    return DoseStatistics(
        volume_ml=float(inside.sum()) * voxel_ml,
        n_voxels=int(inside.sum()),
        dmin_gy=stats["Dmin"],
        d98_gy=stats["D98"],
        d95_gy=stats["D95"],
        d50_gy=stats["D50"],
        dmean_gy=stats["Dmean"],
        d2_gy=stats["D2"],
        dmax_gy=stats["Dmax"],
        fractions=fractions,
        alpha_beta_gy=alpha_beta_gy,
        bed_gy=bed_values,
        eqd2_gy=eqd2_values,
    )


def _by_class(datasets: Sequence[Dataset], sop_class: str, modality: str) -> list[Dataset]:
    return [
        d
        for d in datasets
        if str(d.get("SOPClassUID", "")) == sop_class or d.get("Modality") == modality
    ]


def recognise_course(
    datasets: Sequence[Dataset],
    *,
    patterns: CyberKnifePatterns | None = None,
    alpha_beta_gy: float = ALPHA_BETA_TUMOUR_GY,
    gtv_mask: sitk.Image | None = None,
) -> TreatmentCourse | None:
    """Build a CyberKnife treatment course from the RT objects of one patient.

    Parameters
    ----------
    datasets : sequence of pydicom.dataset.Dataset
        RT Plan(s), Structure Set(s), Dose(s), treatment records of ONE patient (the caller checks
        PatientID + IssuerOfPatientID). Other objects are ignored.
    patterns : CyberKnifePatterns, optional
        Site recognition settings.
    alpha_beta_gy : float
        α/β for BED/EQD2 (Gy).
    gtv_mask : SimpleITK.Image, optional
        GTV mask in the plan's frame of reference (e.g. from
        :func:`processing.rtstruct.rtstruct_to_mask` on the planning grid); when given with an RT
        Dose, the GTV dose statistics are computed on it.

    Returns
    -------
    TreatmentCourse or None
        None when no CyberKnife plan is among the datasets. With several CyberKnife plans, the
        latest approved one (by treatment date) is used.
    """
    patterns = patterns or CyberKnifePatterns()
    plans = [
        p
        for p in _by_class(datasets, RT_PLAN_STORAGE, "RTPLAN")
        if recognise(p, patterns=patterns).is_cyberknife
    ]
    if not plans:
        return None
    records = [d for d in datasets if str(d.get("SOPClassUID", "")) in RT_TREATMENT_RECORDS]
    doses = _by_class(datasets, RT_DOSE_STORAGE, "RTDOSE")
    structures = _by_class(datasets, RT_STRUCTURE_SET_STORAGE, "RTSTRUCT")

    def linked_dose(plan: Dataset) -> Dataset | None:
        uid = str(plan.SOPInstanceUID)
        for d in doses:
            if any(
                str(r.get("ReferencedSOPInstanceUID", "")) == uid
                for r in d.get("ReferencedRTPlanSequence", [])
            ):
                return d
        return doses[0] if len(doses) == 1 else None

    def linked_records(plan: Dataset) -> list[Dataset]:
        uid = str(plan.SOPInstanceUID)
        linked = [
            r
            for r in records
            if any(
                str(x.get("ReferencedSOPInstanceUID", "")) == uid
                for x in r.get("ReferencedRTPlanSequence", [])
            )
        ]
        return linked or (records if len(plans) == 1 else [])

    dated = [(treatment_date(p, records=linked_records(p), dose=linked_dose(p)), p) for p in plans]
    dated.sort(
        key=lambda item: (_text(item[1], "ApprovalStatus").upper() == "APPROVED", item[0].date)
    )
    date, plan = dated[-1]
    recognition = recognise(plan, patterns=patterns)
    frac = fractionation(plan, alpha_beta_gy=alpha_beta_gy)

    structure = None
    referenced = {
        str(r.get("ReferencedSOPInstanceUID", ""))
        for r in plan.get("ReferencedStructureSetSequence", [])
    }
    for candidate in structures:
        if str(candidate.SOPInstanceUID) in referenced:
            structure = candidate
    if structure is None and len(structures) == 1:
        structure = structures[0]
    gtv = select_gtv(structure, patterns=patterns) if structure is not None else None

    dose = linked_dose(plan)
    gtv_dose = None
    if dose is not None and gtv_mask is not None:
        gtv_dose = dose_statistics(
            rtdose_image(dose, fractions=frac.fractions),
            gtv_mask,
            fractions=frac.fractions,
            alpha_beta_gy=alpha_beta_gy,
        )
    course = TreatmentCourse(
        rtplan_sop_instance_uid=str(plan.SOPInstanceUID),
        study_instance_uid=str(plan.get("StudyInstanceUID", "")) or None,
        frame_of_reference_uid=str(plan.get("FrameOfReferenceUID", "")) or None,
        machine=recognition.machine,
        n_beams=recognition.n_beams or 0,
        recognition_reasons=recognition.reasons,
        treatment_date=date,
        fractionation=frac,
        plan_label=_text(plan, "RTPlanLabel") or None,
        rtstruct_sop_instance_uid=str(structure.SOPInstanceUID) if structure is not None else None,
        rtdose_sop_instance_uid=str(dose.SOPInstanceUID) if dose is not None else None,
        gtv=gtv,
        gtv_dose=gtv_dose,
    )
    logger.info(
        "CyberKnife course from plan %s: %s (%s%s), %s fractions, %s Gy",
        course.rtplan_sop_instance_uid,
        date.date.isoformat(),
        date.source,
        ", estimated" if date.estimated else "",
        frac.fractions,
        frac.prescription_dose_gy,
    )
    return course
