"""The analysis chain: one patient's DICOM datasets in, results and DICOM outputs out.

Run through :func:`node.pipeline.run_patient` by the running node (when a study becomes
analysable), ``spine-node analyze`` (offline) and ``spine-node cohort``, so that all produce the
same numbers and the same UIDs. The image helpers it uses between the steps (grids, crops, masks)
are in :mod:`processing.imaging`; a reader's SEG is read by :func:`reporting.seg.read_segmentation`.

Steps (docs/architecture.md, Data flow 5, 7, 8):

1. check that every dataset belongs to one patient (PatientID + IssuerOfPatientID);
2. recognise the CyberKnife course from the RT objects (:mod:`processing.course`);
3. assign baseline and follow-ups among the MR studies (:mod:`node.roles`);
4. per MR study: classify the series from their physics, read the anatomical reference and compute
   every map the protocol allows (:mod:`processing.maps`);
5. baseline: the GTV from the RT Structure Set on the baseline anatomical reference;
   follow-up: rigid registration to the baseline, the GTV propagated and refined on the follow-up;
6. measurements, radiomics, changes, comparability, response (:mod:`processing.measure`,
   :mod:`processing.change`, :mod:`processing.comparability`, :mod:`processing.response`);
7. SEG per time point, one Parametric Map per quantity and study (on a derived 3-D companion
   series of its source series, written with it: :mod:`reporting.companion`), a Spatial
   Registration per follow-up and one longitudinal TID 1500 report (:mod:`reporting`).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from node import __version__
from node.config import AnalysisSection
from node.errors import NodeError
from node.roles import RoleAssignment, assign_roles, check_single_patient
from processing.course import RT_MODALITIES
from processing.dates import dicom_date
from processing.errors import ProcessingError
from processing.imaging import (
    crop_to_lesion,
    dilate_mm,
    fill_non_finite,
    grid_groups,
    is_sagittal,
    mask_intersection,
    on_grid,
)

logger = logging.getLogger(__name__)

ALGORITHM_VERSION = __version__
#: maps fed to the follow-up lesion refinement together with the anatomical reference
_REFINEMENT_CHANNELS = ("T1w", "STIR", "ADC")


def _as_sharp(image: sitk.Image, anatomy: sitk.Image) -> bool:
    """True when ``image`` was acquired with about the anatomy's in-plane resolution (voxels at
    most 25 % larger): sharp enough for the few-mm-thick epidural space."""
    return max(image.GetSpacing()[:2]) <= 1.25 * max(anatomy.GetSpacing()[:2])


class ChainError(NodeError):
    """Nothing can be analysed for these datasets; the message says why (no PHI)."""


#: the [analysis] table's defaults
_ANALYSIS = AnalysisSection()


@dataclass(frozen=True)
class ChainSettings:
    """The chain's configurable policy (a section of the node's settings)."""

    # the configurable fields take their defaults from the [analysis] table's model (one source)
    baseline_window_days: int = _ANALYSIS.baseline_window_days
    segment_type: str = _ANALYSIS.segment_type
    radiomics: bool = _ANALYSIS.radiomics
    radiomics_bin_count: int = _ANALYSIS.radiomics_bin_count
    radiomics_spacing_mm: float = _ANALYSIS.radiomics_spacing_mm
    radiomics_quantities: tuple[str, ...] = (
        "ADC",
        "MK",
        "Kapp",
        "Ktrans",
        "ve",
        "vp",
        "IAUC60",
        "T2w",
        "T1w",
    )
    alpha_beta_gy: float = _ANALYSIS.alpha_beta_gy
    model_path: Path | None = _ANALYSIS.model_path
    #: response rule set version (processing.response.RULE_SET_VERSIONS)
    rule_set: str = _ANALYSIS.rule_set
    #: per-case minimum detectable changes from perturbations of the baseline ROI; False: changes
    #: are flagged against the published MDCs only (``spine-node cohort``)
    repeatability: bool = True
    #: build the DICOM outputs (SEG, Parametric Maps, SR, registration, PDF); False: the
    #: measurements, changes and call only (``spine-node cohort``)
    outputs: bool = True
    #: site r1 (/mM/s) by contrast agent (generic or brand name); wins over the published table
    #: of processing.relaxivity
    relaxivity_per_mM_s: dict[str, float] = field(default_factory=dict)
    #: r1 (/mM/s) for a DCE series whose agent is undeclared or not in the table (flagged)
    default_relaxivity_per_mM_s: float = _ANALYSIS.default_relaxivity_per_mM_s

    def map_settings(self) -> Any:
        """The :class:`processing.maps.MapSettings` these settings imply."""
        from processing.maps import MapSettings

        return MapSettings(
            relaxivity=self.default_relaxivity_per_mM_s,
            relaxivity_by_agent=dict(self.relaxivity_per_mM_s),
        )


@dataclass
class StudyAnalysis:
    """What the chain computed for one MR study."""

    study_instance_uid: str
    study_date: dt.date
    role: str
    days_since_treatment: int
    inventory: Any
    anatomy: Any  # SeriesVolume of the anatomical reference
    anatomy_image: sitk.Image
    anatomy_datasets: list[Dataset]
    input_digest: str  # of every instance of the study (reporting.uids.digest_uids)
    #: a sagittal series of the anatomical reference's contrast, if any (registration along the
    #: axial series' slice direction)
    sagittal_image: sitk.Image | None = None
    sagittal_datasets: list[Dataset] = field(default_factory=list)
    #: the spinal canal around the cord (epidural space), on the anatomical grid, if the RT
    #: Structure Set has a spinal cord contour
    canal_mask: sitk.Image | None = None
    maps: dict[str, Any] = field(default_factory=dict)  # quantity -> StudyMap
    lesion_mask: sitk.Image | None = None
    registration: Any = None
    lesion_notes: tuple[str, ...] = ()
    #: how the follow-up lesion was delineated (:func:`_delineation`); None at baseline
    lesion_delineation: dict[str, Any] | None = None
    #: the scanner's own ADC series of the study (SeriesVolume), if any, and the node's ADC
    #: compared with it (processing.adc_qa: median differences in the tumour and whole tissue)
    scanner_adc: Any = None
    scanner_adc_dataset: Dataset | None = None  # a dataset of that series (its RWVM units)
    #: objects and derived volumes kept out of the analysis, with their reasons
    #: (processing.series.SetAside: presentation states, vendor private objects, scanner maps...)
    set_aside: tuple[Any, ...] = ()
    scanner_adc_qa: dict[str, Any] | None = None
    #: key of the study's maps in the map cache (covers the map inputs' contents), if one was used
    map_cache_key: str | None = None


@dataclass
class ChainResult:
    """Everything the chain produced for one patient."""

    course: Any
    roles: RoleAssignment
    lesion: Any
    studies: list[StudyAnalysis]
    results: list[Any]  # processing.results.TimePointResult
    outputs: list[Dataset]
    notes: list[str]
    timings: dict[str, float]

    def summary(self, files: Sequence[str] | None = None) -> dict[str, Any]:
        """JSON-able summary: the one place where ``summary.json``'s content is built.

        Parameters
        ----------
        files : sequence of str, optional
            The file names the outputs were written to (:func:`node.analysis.write_outputs`),
            recorded as ``files`` (last key) when given.
        """
        from reporting.summary import summary_records

        summary = {
            "algorithm_version": ALGORITHM_VERSION,
            "course": course_summary(self.course),
            "studies": [
                {
                    "study_instance_uid": s.study_instance_uid,
                    "study_date": s.study_date.isoformat(),
                    "role": s.role,
                    "days_since_treatment": s.days_since_treatment,
                    "maps": sorted(s.maps),
                    "analyses_possible": sorted(s.inventory.analyses),
                    "registration": None
                    if s.registration is None
                    else {
                        "matrix_followup_to_baseline": np.asarray(
                            s.registration.matrix_moving_to_fixed
                        ).tolist(),
                        "translation_mm": list(s.registration.translation_mm),
                        "rotation_deg": list(s.registration.rotation_deg),
                        "final_mutual_information": s.registration.final_mutual_information,
                        "dice": s.registration.dice,
                        "passed": s.registration.passed,
                        "reasons": list(s.registration.reasons),
                    },
                    "lesion_notes": list(s.lesion_notes),
                    "scanner_adc_qa": s.scanner_adc_qa,
                    "set_aside": [entry.as_dict() for entry in s.set_aside],
                }
                for s in self.studies
            ],
            "time_points": summary_records(self.results),
            # where the report's planar groups (reporting.sr_planar) draw each time point
            "planar_measurements": [
                {"tracking_uid": r.lesion.tracking_uid, **_asdict(r.planar)}
                for r in self.results
                if r.planar is not None
            ],
            "outputs": [
                {
                    "modality": str(ds.Modality),
                    "sop_class_uid": str(ds.SOPClassUID),
                    "sop_instance_uid": str(ds.SOPInstanceUID),
                    "series_instance_uid": str(ds.SeriesInstanceUID),
                    "study_instance_uid": str(ds.StudyInstanceUID),
                    "series_description": str(ds.get("SeriesDescription", "")),
                }
                for ds in self.outputs
            ],
            "notes": self.notes,
            "timings_s": {k: round(v, 2) for k, v in self.timings.items()},
        }
        if files is not None:
            summary["files"] = list(files)
        return summary


def course_summary(course: Any) -> dict[str, Any]:
    """JSON-able summary of a :class:`processing.course.TreatmentCourse`."""
    fx = course.fractionation
    return {
        "rtplan_sop_instance_uid": course.rtplan_sop_instance_uid,
        "machine": course.machine,
        "n_beams": course.n_beams,
        "treatment_date": course.treatment_date.date.isoformat(),
        "treatment_date_source": course.treatment_date.source,
        "treatment_date_estimated": course.treatment_date.estimated,
        "fractions": fx.fractions,
        "prescription_dose_gy": fx.prescription_dose_gy,
        "dose_per_fraction_gy": fx.dose_per_fraction_gy,
        "bed10_gy": fx.bed_gy,
        "eqd2_gy": fx.eqd2_gy,
        "gtv": None if course.gtv is None else course.gtv.name,
        "gtv_dose": None if course.gtv_dose is None else _asdict(course.gtv_dose),
    }


def _asdict(obj: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return {k: (v.isoformat() if isinstance(v, dt.date) else v) for k, v in asdict(obj).items()}


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = defaultdict(float)

    def __call__(self, stage: str) -> _Stage:
        return _Stage(self.timings, stage)


class _Stage:
    def __init__(self, timings: dict[str, float], stage: str) -> None:
        self.timings, self.stage = timings, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.stage] += time.perf_counter() - self.start


def split_studies(
    datasets: Iterable[Dataset],
) -> tuple[list[Dataset], dict[str, list[Dataset]], dict[str, list[Dataset]]]:
    """RT objects, MR images by Study Instance UID, and readers' SEGs by Study Instance UID.

    Parametric Maps (Modality MR, SOP class Parametric Map) and SEGs this node produced itself
    (a PACS may route them back) are not inputs and are left out.
    """
    from reporting.seg import MANUFACTURER

    rt: list[Dataset] = []
    studies: dict[str, list[Dataset]] = defaultdict(list)
    segs: dict[str, list[Dataset]] = defaultdict(list)
    for ds in datasets:
        modality = str(ds.get("Modality", ""))
        if modality in RT_MODALITIES:
            rt.append(ds)
        elif modality == "MR" and str(ds.get("SOPClassUID")) != _PARAMETRIC_MAP:
            studies[str(ds.StudyInstanceUID)].append(ds)
        elif modality == "SEG" and str(ds.get("Manufacturer", "")) != MANUFACTURER:
            segs[str(ds.StudyInstanceUID)].append(ds)
    return rt, dict(studies), dict(segs)


_PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"


def run_chain(
    datasets: Sequence[Dataset], *, settings: ChainSettings | None = None, map_cache: Any = None
) -> ChainResult:
    """Analyse one patient: see the module docstring.

    Parameters
    ----------
    datasets : sequence of Dataset
        Every instance of the patient.
    settings : ChainSettings, optional
    map_cache : node.map_cache.MapCache, optional
        When given, a study's maps are taken from it when the study's map inputs (instances and
        their content), the map settings and the algorithm version are those of a stored entry,
        and stored there after a fit otherwise; the results and output UIDs are the same as
        without it. Cached studies appear in the timings as ``maps cached: <Study Instance UID>``.

    Raises
    ------
    ChainError
        No CyberKnife course, no baseline, no usable anatomical series — anything that leaves
        nothing to analyse. Partial problems (a map that cannot be fitted, a failed registration
        check) are recorded in the notes and the results, not raised.
    node.roles.PatientMismatchError
        Datasets of more than one patient.
    """
    from processing.course import recognise_course

    settings = settings or ChainSettings()
    timer = _Timer()
    notes: list[str] = []
    check_single_patient(datasets)
    rt, mr_studies, reader_segs = split_studies(datasets)
    with timer("course"):
        course = recognise_course(rt, alpha_beta_gy=settings.alpha_beta_gy)
    if course is None:
        raise ChainError(
            "no CyberKnife treatment course among the datasets "
            "(an RT Plan from an Accuray/CyberKnife system is needed)"
        )
    if not mr_studies:
        raise ChainError("no MR study among the datasets")
    dates = {}
    for uid, study in mr_studies.items():
        date = dicom_date(study[0].get("StudyDate"))
        if date is None:
            notes.append(f"MR study {uid} has no valid StudyDate; ignored")
            continue
        dates[uid] = date
    roles = assign_roles(
        dates.items(),
        course.treatment_date.date,
        baseline_window_days=settings.baseline_window_days,
    )
    if roles.baseline is None:
        raise ChainError(
            f"no baseline MR study within {settings.baseline_window_days} days before the "
            f"treatment date {course.treatment_date.date.isoformat()}"
        )
    for other in roles.others:
        notes.append(f"MR study {other.study_instance_uid}: {other.reason}")

    baseline = _prepare_study(
        mr_studies[roles.baseline.study_instance_uid],
        roles.baseline,
        timer,
        notes,
        settings.map_settings(),
        map_cache,
    )
    rtstruct = _find_rtstruct(rt, course)
    lesion, gtv = _baseline_lesion(rtstruct, course, baseline)
    corrected = _reader_lesion(reader_segs.get(baseline.study_instance_uid, ()), baseline, notes)
    if corrected is not None:
        gtv = corrected
    baseline.lesion_mask = gtv
    baseline.canal_mask = _canal(rtstruct, baseline, notes)
    if course.gtv_dose is None and course.rtdose_sop_instance_uid is not None:
        course = _with_gtv_dose(rt, course, gtv, settings)
    follow_ups = []
    for role in roles.follow_ups:
        # one unusable follow-up (no anatomical series, lesion outside its field of view) must
        # not cost the patient the analysis of the others
        try:
            study = _prepare_study(
                mr_studies[role.study_instance_uid],
                role,
                timer,
                notes,
                settings.map_settings(),
                map_cache,
            )
            _follow_up_lesion(baseline, study, gtv, timer, map_cache)
        except ChainError as err:
            notes.append(f"follow-up {role.study_instance_uid} not analysed: {err}")
            continue
        follow_ups.append(study)
        corrected = _reader_lesion(reader_segs.get(study.study_instance_uid, ()), study, notes)
        if corrected is not None:
            study.lesion_mask = corrected
            study.lesion_notes += ("lesion from a reader's SEG (preferred over the refinement)",)
            study.lesion_delineation = {
                "method": "reader SEG",
                "volume_ml": None,
                "volume_range_ml": None,
                "summary": "from a reader's SEG (preferred over the refinement)",
                "not_delineated": None,
            }
    studies = [baseline, *follow_ups]
    for study in studies:
        _scanner_adc_qa(study, notes)
    results = _measure_and_assess(studies, lesion, course, settings, timer, notes, map_cache)
    outputs: list[Dataset] = []
    if settings.outputs:
        with timer("reporting"):
            segs, pmaps, regs, companions = _build_outputs(studies, lesion, settings, rt)
        with timer("SR"):  # a stage of its own: `make bench` holds it to a target of its own
            report = _build_report(results, segs, pmaps, settings)
        with timer("reporting"):
            history = _history_documents(studies, results, course)
        outputs = [*segs, *pmaps, *regs, report, *companions, *history]
    return ChainResult(course, roles, lesion, studies, results, outputs, notes, dict(timer.timings))


@dataclass
class StudyMap:
    """A map (or an anatomical image used like one) of a study, with what it was made from."""

    quantity: str
    image: sitk.Image
    unit: str
    provenance: dict[str, Any]
    source_volume: Any  # SeriesVolume
    source_datasets: list[Dataset]
    exported: bool = True  # False for anatomical images (no Parametric Map of a T2w)


#: series roles read by the chain (maps and anatomical channels)
_READ_ROLES = ("dwi", "dce", "vfa_t1", "t1w", "t2w", "stir")
_ANATOMICAL = {"t2w": "T2w", "t1w": "T1w", "stir": "STIR"}


def _prepare_study(
    datasets: Sequence[Dataset],
    role: Any,
    timer: _Timer,
    notes: list[str],
    map_settings: Any = None,
    map_cache: Any = None,
) -> StudyAnalysis:
    from processing.classify import classify_study
    from processing.maps import compute_maps
    from processing.series import group_by_series
    from reporting.uids import digest_uids

    assembled: dict[str, Any] = {}
    with timer("read+classify"):
        # classification assembles every image series; keep them rather than reading twice
        inventory = classify_study(datasets, volumes=assembled)
    if inventory.anatomy_reference is None:
        raise ChainError(
            f"study {role.study_instance_uid} has no anatomical series (T2w, T1w or "
            "STIR) to delineate the lesion on"
        )
    series = group_by_series(datasets, set_aside=[])  # classify_study listed what it set aside
    volumes: dict[str, Any] = {}
    roles: dict[str, str] = {}
    for cls in inventory.series:
        if cls.error is not None:
            notes.append(f"series {cls.series_instance_uid} not used: {cls.error}")
        elif cls.role.value in _READ_ROLES and cls.series_instance_uid in assembled:
            volumes[cls.series_instance_uid] = assembled[cls.series_instance_uid]
            roles[cls.series_instance_uid] = cls.role.value
    reference_uid = inventory.anatomy_reference
    if reference_uid in volumes and is_sagittal(volumes[reference_uid].geometry.direction):
        # lesions are delineated and measured on the axial series (the planning orientation);
        # a sagittal series of the same contrast only helps the registration
        reference_uid = next(
            (
                uid
                for uid, v in volumes.items()
                if roles[uid] == roles[reference_uid] and not is_sagittal(v.geometry.direction)
            ),
            reference_uid,
        )
    anatomy = volumes.get(reference_uid)
    if anatomy is None:
        raise ChainError(f"the anatomical series of study {role.study_instance_uid} cannot be read")
    maps: dict[str, StudyMap] = {}
    map_inputs = [uid for uid in volumes if roles[uid] in ("dwi", "dce", "vfa_t1")]
    quant = None
    cache_key = None
    if map_cache is not None and map_inputs:
        from node.map_cache import cache_key as map_cache_key

        stage = f"maps cached: {role.study_instance_uid}"
        with timer(stage):
            cache_key = map_cache_key(
                [ds for uid in map_inputs for ds in series[uid]], map_settings
            )
            quant = map_cache.get(cache_key)
        if quant is None:  # a miss: the key's time belongs to the fit
            timer.timings["maps"] += timer.timings.pop(stage)
        else:
            logger.info("maps of study %s taken from the cache", role.study_instance_uid)
    if quant is None:
        with timer("maps"):
            try:
                quant = compute_maps([volumes[uid] for uid in map_inputs], settings=map_settings)
            except ProcessingError as err:  # unusable DWI/DCE series or failed fit: a note
                notes.append(f"study {role.study_instance_uid}: maps not computed: {err}")
                quant = {}
            else:
                if cache_key is not None:
                    map_cache.put(cache_key, quant)
    for quantity, qmap in quant.items():
        uid = qmap.source_series_instance_uid
        maps[quantity] = StudyMap(
            quantity,
            qmap.image(),
            qmap.unit,
            dict(qmap.provenance),
            volumes[uid],
            list(series[uid]),
        )
    # anatomical channels: radiomics and the follow-up lesion refinement use them like maps
    for uid, role_name in roles.items():
        name = _ANATOMICAL.get(role_name)
        if (
            name is None
            or (name in maps and uid != reference_uid)
            or is_sagittal(volumes[uid].geometry.direction)
        ):
            continue
        volume = volumes[uid]
        maps[name] = StudyMap(
            name,
            volume.volume_image(0),
            "1",
            {"series": uid},
            volume,
            list(series[uid]),
            exported=False,
        )
    reference_role = roles[reference_uid]
    sagittal_uid = next(
        (
            uid
            for uid, v in volumes.items()
            if roles[uid] == reference_role
            and uid != reference_uid
            and is_sagittal(v.geometry.direction)
            and not is_sagittal(anatomy.geometry.direction)
        ),
        None,
    )
    sagittal = None if sagittal_uid is None else volumes[sagittal_uid]
    scanner_uid = next((uid for uid in inventory.adc_maps if uid in assembled), None)
    return StudyAnalysis(
        sagittal_image=None if sagittal is None else sagittal.volume_image(0),
        sagittal_datasets=[] if sagittal_uid is None else list(series[sagittal_uid]),
        study_instance_uid=role.study_instance_uid,
        study_date=role.study_date,
        role=role.role,
        days_since_treatment=role.days_since_treatment,
        inventory=inventory,
        anatomy=anatomy,
        anatomy_image=anatomy.volume_image(0),
        anatomy_datasets=list(series[reference_uid]),
        input_digest=digest_uids(datasets),
        map_cache_key=cache_key,
        maps=maps,
        scanner_adc=None if scanner_uid is None else assembled[scanner_uid],
        scanner_adc_dataset=None if scanner_uid is None else series[scanner_uid][0],
        set_aside=(
            *inventory.set_aside,
            *(entry for volume in volumes.values() for entry in volume.excluded),
        ),
    )


def _scanner_adc_qa(study: StudyAnalysis, notes: list[str]) -> None:
    """The node's ADC against the study's scanner ADC series, in the tumour and whole tissue."""
    from processing.adc_qa import scanner_adc_qa

    if study.scanner_adc is None:
        return
    adc = study.maps.get("ADC")
    study.scanner_adc_qa = scanner_adc_qa(
        None if adc is None else adc.image,
        study.scanner_adc,
        study.scanner_adc_dataset,
        tumour_mask=study.lesion_mask,
    )
    if "error" in study.scanner_adc_qa:
        notes.append(
            f"study {study.study_instance_uid}: ADC QA against the scanner ADC "
            f"impossible: {study.scanner_adc_qa['error']}"
        )


def _find_rtstruct(rt: Sequence[Dataset], course: Any) -> Dataset:
    for ds in rt:
        if str(ds.get("Modality")) == "RTSTRUCT" and (
            course.rtstruct_sop_instance_uid is None
            or str(ds.SOPInstanceUID) == course.rtstruct_sop_instance_uid
        ):
            return ds
    raise ChainError("the treatment course has no RT Structure Set with a GTV")


def _baseline_lesion(
    rtstruct: Dataset, course: Any, baseline: StudyAnalysis
) -> tuple[Any, sitk.Image]:
    from processing.lesion import make_lesion
    from processing.rtstruct import RTStructError, rtstruct_to_mask

    if course.gtv is None:
        raise ChainError("no GTV found in the RT Structure Set (by ROI interpreted type or name)")
    try:
        gtv = rtstruct_to_mask(
            rtstruct,
            course.gtv.number,
            baseline.anatomy_image,
            frame_of_reference_uid=baseline.anatomy.frame_of_reference_uid,
        )
    except RTStructError as err:
        raise ChainError(f"the GTV cannot be placed on the baseline MR: {err}") from err
    level = _vertebral_level(course.gtv.name)
    lesion = make_lesion(
        rtstruct_sop_instance_uid=str(rtstruct.SOPInstanceUID),
        roi=course.gtv,
        vertebral_level=level,
    )
    return lesion, gtv


#: how far the epidural space reaches beyond the cord contour (mm): the canal's CSF sleeve and
#: epidural fat, less than the cord-to-vertebral-body distance so the body is not counted
_CANAL_MARGIN_MM = 4.0


def _canal(rtstruct: Dataset, baseline: StudyAnalysis, notes: list[str]) -> sitk.Image | None:
    """The spinal canal (cord contour dilated by :data:`_CANAL_MARGIN_MM`) on the baseline grid.

    Lesion voxels inside it are the epidural component (SPINO: new or progressive epidural tumour
    is local progression). Without a cord contour the epidural component is not measurable.
    """
    from processing.rtstruct import RTStructError, list_rois, rtstruct_to_mask

    cord = next(
        (roi for roi in list_rois(rtstruct) if re.search(r"cord|myelon", roi.name, re.IGNORECASE)),
        None,
    )
    if cord is None:
        notes.append(
            "no spinal cord contour in the RT Structure Set: the epidural component is not measured"
        )
        return None
    try:
        mask = rtstruct_to_mask(
            rtstruct,
            cord.number,
            baseline.anatomy_image,
            frame_of_reference_uid=baseline.anatomy.frame_of_reference_uid,
        )
    except RTStructError as err:
        notes.append(f"spinal cord contour not usable ({err}): epidural component not measured")
        return None
    return dilate_mm(mask, _CANAL_MARGIN_MM)


def _reader_lesion(
    segs: Sequence[Dataset], study: StudyAnalysis, notes: list[str]
) -> sitk.Image | None:
    """The lesion from a reader's DICOM SEG of this study (a radiologist's correction), if any.

    The latest SEG (by Content Date/Time) that segments the study's anatomical reference series
    wins over the RT Structure Set GTV (baseline) or the refined lesion (follow-up); all its
    segments are combined. The SEG is read with :func:`reporting.seg.read_segmentation` and
    matched to the anatomical series (classic images, or frames of one multi-frame image) through
    its source references; a SEG drawn on another series, or one that cannot be read, is recorded
    in the notes and not used.
    """
    from reporting.seg import ReaderSegmentationError, read_segmentation

    if not segs:
        return None
    latest = max(
        segs,
        key=lambda ds: (
            str(ds.get("ContentDate", "")),
            str(ds.get("ContentTime", "")),
            str(ds.SOPInstanceUID),
        ),
    )
    frames = study.anatomy.source_frames[0]
    try:
        mask = read_segmentation(latest).mask_on(study.anatomy_image, source_frames=frames)
    except ReaderSegmentationError as err:
        notes.append(
            f"reader SEG {latest.SOPInstanceUID} not used: it does not segment the "
            f"anatomical series of study {study.study_instance_uid} ({err})"
        )
        return None
    if not sitk.GetArrayViewFromImage(mask).any():
        notes.append(
            f"reader SEG {latest.SOPInstanceUID} is empty on the anatomical series; not used"
        )
        return None
    notes.append(
        f"study {study.study_instance_uid}: lesion taken from reader SEG {latest.SOPInstanceUID}"
    )
    return mask


def _vertebral_level(name: str) -> str | None:
    match = re.search(r"\b([CTLS])\s?(\d{1,2})\b", name.upper())
    return f"{match.group(1)}{match.group(2)}" if match else None


def _with_gtv_dose(
    rt: Sequence[Dataset], course: Any, gtv: sitk.Image, settings: ChainSettings
) -> Any:
    import dataclasses

    from processing.course import CourseError, dose_statistics, rtdose_image

    for ds in rt:
        if str(ds.SOPInstanceUID) == course.rtdose_sop_instance_uid:
            try:
                dose = rtdose_image(ds, fractions=course.fractionation.fractions)
                stats = dose_statistics(
                    dose,
                    gtv,
                    fractions=course.fractionation.fractions,
                    alpha_beta_gy=settings.alpha_beta_gy,
                )
            except CourseError as err:
                logger.warning("GTV dose statistics not computed: %s", err)
                return course
            return dataclasses.replace(course, gtv_dose=stats)
    return course


def _follow_up_lesion(
    baseline: StudyAnalysis,
    study: StudyAnalysis,
    gtv: sitk.Image,
    timer: _Timer,
    map_cache: Any = None,
) -> None:
    """Register the follow-up to the baseline and find the lesion on it (propagated GTV refined
    on the follow-up images); sets the study's registration, lesion mask, canal, notes and
    delineation.

    With a map cache, the result is kept there under a key of everything it is computed from
    (:func:`_lesion_key`): a re-analysis with an unchanged baseline and follow-up (a later
    follow-up arrived) takes it from there, as ``lesion cached: <study>`` in the timings.
    """
    from processing.lesion import LesionError, propagate_mask, refine_lesion
    from processing.registration import register_rigid, register_rigid_multi

    key, restored = None, False
    if map_cache is not None:
        stage = f"lesion cached: {study.study_instance_uid}"
        with timer(stage):
            key = _lesion_key(baseline, study, gtv)
            restored = _restore_lesion(map_cache, key, study)
        if not restored:  # a miss: the key's time belongs to the computation
            timer.timings["registration+lesion"] += timer.timings.pop(stage)
    if not restored:
        with timer("registration+lesion"):
            if baseline.sagittal_image is not None and study.sagittal_image is not None:
                # thick axial slices leave the cranio-caudal position to a sagittal series
                registration = register_rigid_multi(
                    [
                        (baseline.anatomy_image, study.anatomy_image),
                        (baseline.sagittal_image, study.sagittal_image),
                    ],
                    region=gtv,
                )
            else:
                registration = register_rigid(
                    baseline.anatomy_image, study.anatomy_image, region=gtv
                )
            study.registration = registration
            base_channels = [baseline.anatomy_image]
            follow_channels = [study.anatomy_image]
            sharp = [0]  # channels as sharp as the anatomy, the ones used in the epidural space
            for name in _REFINEMENT_CHANNELS:
                if name in baseline.maps and name in study.maps:
                    if _as_sharp(baseline.maps[name].image, baseline.anatomy_image) and _as_sharp(
                        study.maps[name].image, study.anatomy_image
                    ):
                        sharp.append(len(base_channels))
                    base_channels.append(
                        fill_non_finite(on_grid(baseline.maps[name].image, baseline.anatomy_image))
                    )
                    follow_channels.append(
                        fill_non_finite(on_grid(study.maps[name].image, study.anatomy_image))
                    )
            try:
                lesion = refine_lesion(
                    base_channels,
                    gtv,
                    follow_channels,
                    registration.matrix_moving_to_fixed,
                    baseline_canal=baseline.canal_mask,
                    canal_channels=sharp,
                )
            except LesionError as err:
                raise ChainError(
                    f"the lesion cannot be placed on follow-up {study.study_instance_uid}: {err}"
                ) from err
            study.lesion_mask = lesion.mask
            study.lesion_notes = tuple(lesion.notes) + (
                ()
                if registration.passed
                else tuple(f"registration check failed: {r}" for r in registration.reasons)
            )
            study.lesion_delineation = _delineation(lesion, registration)
        if key is not None:
            _store_lesion(map_cache, key, study)
    assert study.registration is not None
    if baseline.canal_mask is not None:
        study.canal_mask = propagate_mask(
            baseline.canal_mask, study.anatomy_image, study.registration.matrix_moving_to_fixed
        )


#: the fields of processing.registration.RigidRegistration kept in the cache (its transform is
#: rebuilt from the matrix's parameters)
_REGISTRATION_FIELDS = (
    "matrix_moving_to_fixed",
    "translation_mm",
    "rotation_deg",
    "rotation_angle_deg",
    "initial_mutual_information",
    "final_mutual_information",
    "dice",
    "dice_source",
    "passed",
    "reasons",
    "stop_condition",
    "attempts",
)


def _lesion_key(baseline: StudyAnalysis, study: StudyAnalysis, gtv: sitk.Image) -> str:
    """Cache key of a follow-up's registration and lesion: the anatomical and sagittal series
    of both studies (content digests), the maps used as refinement channels (each study's map
    cache key covers their inputs), the GTV and the canal (voxels and geometry), the refinement
    and registration settings and the node version (:func:`node.map_cache.derived_key`)."""
    from node.map_cache import derived_key
    from processing.lesion import RefinementSettings

    datasets = [
        ds
        for s in (baseline, study)
        for m in s.maps.values()
        if not m.exported
        for ds in m.source_datasets
    ]
    datasets += [
        ds for s in (baseline, study) for ds in (*s.anatomy_datasets, *s.sagittal_datasets)
    ]
    parts: list[str | bytes] = [
        baseline.map_cache_key or "",
        study.map_cache_key or "",
        # which series was the axial reference and which the sagittal one, of each study
        repr(
            [
                (
                    sorted({str(ds.SeriesInstanceUID) for ds in s.anatomy_datasets}),
                    sorted({str(ds.SeriesInstanceUID) for ds in s.sagittal_datasets}),
                )
                for s in (baseline, study)
            ]
        ),
        *_mask_key_parts(gtv),
        repr(RefinementSettings()),
        repr(_REFINEMENT_CHANNELS),
    ]
    if baseline.canal_mask is not None:  # the epidural space the refinement searches
        parts += _mask_key_parts(baseline.canal_mask)
    return derived_key("followup_lesion", datasets, *parts)


def _mask_key_parts(mask: sitk.Image) -> list[str | bytes]:
    """A mask's voxels and geometry, as parts of a cache key."""
    return [
        sitk.GetArrayViewFromImage(mask).tobytes(),
        repr((mask.GetOrigin(), mask.GetSpacing(), mask.GetDirection(), mask.GetPixelIDValue())),
    ]


def _store_lesion(map_cache: Any, key: str, study: StudyAnalysis) -> None:
    registration = study.registration
    mask = study.lesion_mask
    assert registration is not None and mask is not None
    description = {
        "registration": {name: getattr(registration, name) for name in _REGISTRATION_FIELDS},
        "transform": (
            tuple(registration.transform.GetParameters()),
            tuple(registration.transform.GetFixedParameters()),
        ),
        "mask_pixel_id": mask.GetPixelIDValue(),
        "lesion_notes": study.lesion_notes,
        "lesion_delineation": study.lesion_delineation,
    }
    map_cache.put_entry("followup_lesion", key, description, {"mask": sitk.GetArrayFromImage(mask)})


def _restore_lesion(map_cache: Any, key: str, study: StudyAnalysis) -> bool:
    """Set the study's registration and lesion from the cache entry ``key``; False on a miss."""
    from processing.registration import RigidRegistration

    entry = map_cache.get_entry("followup_lesion", key)
    if entry is None:
        return False
    description, arrays = entry
    try:
        mask_array = arrays["mask"]
        if mask_array.shape != tuple(reversed(study.anatomy_image.GetSize())):
            raise ValueError("lesion mask of another grid")
        mask = sitk.GetImageFromArray(mask_array)
        if mask.GetPixelIDValue() != description["mask_pixel_id"]:
            raise ValueError("lesion mask of another pixel type")
        mask.CopyInformation(study.anatomy_image)
        transform = sitk.Euler3DTransform()
        parameters, fixed = description["transform"]
        transform.SetFixedParameters(fixed)
        transform.SetParameters(parameters)
        registration = RigidRegistration(transform=transform, **description["registration"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        logger.warning("cached lesion %s unusable (%s); recomputed", key[:16], err)
        return False
    study.registration = registration
    study.lesion_mask = mask
    study.lesion_notes = description["lesion_notes"]
    study.lesion_delineation = description["lesion_delineation"]
    logger.info("registration and lesion of study %s cached", study.study_instance_uid)
    return True


def _delineation(lesion: Any, registration: Any) -> dict[str, Any]:
    """How a follow-up lesion was delineated, for the summary, the response and the reports.

    ``method``: ``refined`` (on the follow-up images; ``volume_range_ml`` its uncertainty) or
    ``propagated`` (the baseline GTV carried over: no size change measured); ``not_delineated``:
    why the lesion's size on the follow-up is unknown (refinement not used, or a failed
    registration check, which puts even a refined lesion in doubt), else None.
    """
    reasons = []
    if not lesion.refined:
        reasons.append("refinement not used")
    if not registration.passed:
        reasons.append("registration check failed: " + "; ".join(registration.reasons))
    return {
        "method": "refined" if lesion.refined else "propagated",
        "volume_ml": round(float(lesion.volume_ml), 3),
        "volume_range_ml": None
        if lesion.volume_range_ml is None
        else [round(float(v), 3) for v in lesion.volume_range_ml],
        "summary": lesion.outcome or None,
        "not_delineated": "; ".join(reasons) or None,
    }


def _grid_groups(study: StudyAnalysis) -> list[tuple[sitk.Image, dict[str, sitk.Image]]]:
    """(lesion mask, maps) per acquisition grid (:func:`processing.imaging.grid_groups`)."""
    return grid_groups(
        study.anatomy_image, study.lesion_mask, {q: m.image for q, m in study.maps.items()}
    )


def _epidural(study: StudyAnalysis) -> sitk.Image | None:
    """The lesion's part inside the spinal canal, cropped like the anatomical group."""
    if study.canal_mask is None:
        return None
    inside = mask_intersection(study.lesion_mask, study.canal_mask)
    return crop_to_lesion(inside, study.lesion_mask)


def _subset(settings: Mapping[str, Any] | None, maps: Mapping[str, Any]) -> dict[str, Any] | None:
    if settings is None:
        return None
    return {q: v for q, v in settings.items() if q in maps}


def _merge_measurements(parts: Sequence[Any]) -> Any:
    """One LesionMeasurements from the anatomical grid's (first) and the other grids' parts."""
    import dataclasses

    first = parts[0]
    statistics = dict(first.map_statistics)
    radiomics = dict(first.radiomics)
    notes = list(first.radiomics_notes)
    for part in parts[1:]:
        statistics.update(part.map_statistics)
        radiomics.update(part.radiomics)
        notes.extend(part.radiomics_notes)
    return dataclasses.replace(
        first, map_statistics=statistics, radiomics=radiomics, radiomics_notes=tuple(notes)
    )


def _planar_measurement(study: StudyAnalysis, measurements: Any, notes: list[str]) -> Any:
    """The lesion's axial section (maximum axial diameter, outline) on its anatomical source image.

    Returns a :class:`processing.results.PlanarMeasurement` for the report's TID 1410 group, or
    None with a note when the section is no single image of the anatomical series (diameter
    measured on a resampled mask, non-axial images, mosaic images).
    """
    from reporting.seg import source_alignment
    from reporting.sr_planar import locate_section

    section = measurements.axial_section
    what = f"{study.role} {study.study_date.isoformat()}: no planar measurement in the report"
    if section is None:
        notes.append(
            f"{what}: the maximum axial diameter was measured on an axially resampled mask (no "
            "axis of the anatomical images within 8 degrees of the patient S axis)"
        )
        return None
    by_uid = {str(ds.SOPInstanceUID): ds for ds in study.anatomy_datasets}
    sources, frames, grid = source_alignment(study.anatomy, by_uid)
    if grid is not None:
        notes.append(f"{what}: the anatomical images are mosaic or tiled images")
        return None
    try:
        return locate_section(section, study.anatomy_image, sources, frames)
    except ValueError as err:
        notes.append(f"{what}: {err}")
        return None


def _baseline_repeatability(
    study: StudyAnalysis,
    groups: list[tuple[sitk.Image, dict[str, sitk.Image]]],
    caches: list[Any],
    radiomics_settings: Mapping[str, Any] | None,
    timer: _Timer,
    map_cache: Any = None,
) -> dict[str, float]:
    """Per-case minimum detectable change from small perturbations of the baseline ROI
    (:func:`processing.change.perturbation_repeatability`, once per acquisition grid).

    With a map cache, the result is kept there under a key of the baseline's instances (content
    digests), its lesion mask and the radiomics settings: a re-analysis with the same baseline (a
    new follow-up) takes it from there, as ``repeatability cached`` in the timings.
    """
    from processing.change import perturbation_repeatability

    key = None
    if map_cache is not None:
        from node.map_cache import derived_key

        with timer("repeatability cached"):
            mask = study.lesion_mask
            assert mask is not None  # the baseline GTV is set before measurement
            geometry = repr((mask.GetOrigin(), mask.GetSpacing(), mask.GetDirection()))
            # the fitted maps' inputs are covered by the study's map cache key (their contents
            # were hashed for it): only the anatomical series are hashed here
            key = derived_key(
                "repeatability",
                [
                    ds
                    for m in study.maps.values()
                    if study.map_cache_key is None or not m.exported
                    for ds in m.source_datasets
                ],
                study.map_cache_key or "",
                sitk.GetArrayViewFromImage(mask).tobytes(),
                geometry,
                repr(sorted((q, s.digest()) for q, s in (radiomics_settings or {}).items())),
            )
            cached = map_cache.get_values("repeatability", key)
        if cached is not None:
            logger.info("baseline repeatability of study %s cached", study.study_instance_uid)
            return cached
        timer.timings["repeatability"] += timer.timings.pop("repeatability cached")
    repeatability: dict[str, float] = {}
    with timer("repeatability"):
        # the anatomical grid's volume MDC wins
        for (mask_image, maps), cache in reversed(list(zip(groups, caches, strict=True))):
            repeatability.update(
                perturbation_repeatability(
                    mask_image,
                    maps,
                    radiomics_settings=_subset(radiomics_settings, maps),
                    radiomics_cache=cache,
                )
            )
    if key is not None:
        map_cache.put_values("repeatability", key, repeatability)
    return repeatability


def _measure_and_assess(
    studies: list[StudyAnalysis],
    lesion: Any,
    course: Any,
    settings: ChainSettings,
    timer: _Timer,
    notes: list[str],
    map_cache: Any = None,
) -> list[Any]:
    from processing.change import compute_changes
    from processing.comparability import assess_comparability
    from processing.measure import measure_lesion
    from processing.radiomics import RadiomicsCache, default_course_settings
    from processing.response import assess_response
    from processing.results import TimePointResult, TimePointRole

    common = set(studies[0].maps)
    for study in studies[1:]:
        common &= set(study.maps)
    radiomics_settings = None
    if settings.radiomics:
        quantities = [q for q in settings.radiomics_quantities if q in common]
        radiomics_settings = default_course_settings(
            quantities,
            spacing_mm=settings.radiomics_spacing_mm,
            bin_count=settings.radiomics_bin_count,
        )
    measurements = []
    repeatability: dict[str, float] = {}
    for index, study in enumerate(studies):
        groups = _grid_groups(study)
        epidural = _epidural(study)
        # one radiomics cache per grid: the baseline's repeatability reuses the preprocessing and
        # the features of the original ROI measured here (identical results, done once)
        caches = [RadiomicsCache() for _ in groups]
        with timer("measure+radiomics"):
            measurements.append(
                _merge_measurements(
                    [
                        measure_lesion(
                            mask,
                            maps,
                            radiomics_settings=_subset(radiomics_settings, maps),
                            epidural_mask=epidural if n == 0 else None,
                            radiomics_cache=caches[n],
                        )
                        for n, (mask, maps) in enumerate(groups)
                    ]
                )
            )
        if index == 0 and len(studies) > 1 and settings.repeatability:
            repeatability = _baseline_repeatability(
                study, groups, caches, radiomics_settings, timer, map_cache
            )
    baseline_protocol = _protocol(studies[0])
    results = []
    previous_category = None
    for index, (study, current) in enumerate(zip(studies, measurements)):
        planar = _planar_measurement(study, current, notes)
        provenance = {
            "maps": {q: m.provenance for q, m in study.maps.items()},
            "lesion_notes": list(study.lesion_notes),
            "algorithm_version": ALGORITHM_VERSION,
        }
        if study.lesion_delineation is not None:
            provenance["lesion_delineation"] = study.lesion_delineation
        if study.scanner_adc_qa is not None:
            provenance["scanner_adc_qa"] = study.scanner_adc_qa
        if index == 0:
            results.append(
                TimePointResult(
                    lesion=lesion,
                    role=TimePointRole.BASELINE,
                    study_instance_uid=study.study_instance_uid,
                    study_date=study.study_date.strftime("%Y%m%d"),
                    days_since_treatment=study.days_since_treatment,
                    measurements=current,
                    provenance=provenance,
                    planar=planar,
                )
            )
            continue
        comparability = assess_comparability(baseline_protocol, _protocol(study))
        not_comparable = [
            q
            for q, verdict in comparability.per_quantity.items()
            if verdict.value == "not comparable"
        ]
        previous = measurements[index - 1] if index > 1 else None
        changes = compute_changes(
            current,
            measurements[0],
            previous,
            repeatability=repeatability,
            not_comparable=not_comparable,
            # rule set 1.0 was recorded with the per-case coefficients alone
            published_repeatability=settings.rule_set != "1.0",
        )
        response = assess_response(
            changes,
            days_since_treatment=study.days_since_treatment,
            previous_category=previous_category,
            rule_set=settings.rule_set,
            lesion_not_delineated=(study.lesion_delineation or {}).get("not_delineated"),
        )
        response = _with_site_model(response, changes, settings, notes)
        previous_category = response.category
        results.append(
            TimePointResult(
                lesion=lesion,
                role=TimePointRole.FOLLOW_UP,
                study_instance_uid=study.study_instance_uid,
                study_date=study.study_date.strftime("%Y%m%d"),
                days_since_treatment=study.days_since_treatment,
                measurements=current,
                changes=changes,
                response=response,
                comparability=comparability.overall,
                comparability_reasons=tuple(comparability.reasons),
                provenance=provenance,
                planar=planar,
            )
        )
    return results


def _with_site_model(response: Any, changes: Any, settings: ChainSettings, notes: list[str]) -> Any:
    if settings.model_path is None:
        return response
    from processing.response_model import ResponseModel, attach_model_prediction

    model = ResponseModel.load(settings.model_path)
    return attach_model_prediction(response, model, changes)


def _protocol(study: StudyAnalysis) -> Any:
    from processing.comparability import protocol_from_datasets

    inv = study.inventory
    dwi = study.maps.get("ADC")
    dce = study.maps.get("Ktrans")
    return protocol_from_datasets(
        anatomical=study.anatomy_datasets[0],
        dwi=None if dwi is None else dwi.source_datasets[0],
        dce=None if dce is None else dce.source_datasets[0],
        dwi_b_values=()
        if dwi is None
        else tuple(sorted({round(float(b)) for b in dwi.source_volume.b_values if np.isfinite(b)})),
        dce_temporal_resolution_s=next(
            (s.temporal_resolution for s in inv.series if s.series_instance_uid == inv.dce), None
        ),
    )


def _build_outputs(
    studies: list[StudyAnalysis],
    lesion: Any,
    settings: ChainSettings,
    rt: Sequence[Dataset],
) -> tuple[list[Dataset], list[Dataset], list[Dataset], list[Dataset]]:
    """SEG per time point, Parametric Maps, Spatial Registrations and map companion series (the
    TID 1500 report that references them: :func:`_build_report`).

    Every source series of the exported maps gets a derived 3-D companion series on the maps' grid
    (:mod:`reporting.companion`) and its maps are built on it, one companion image per map frame,
    so that viewers that need a 3-D referenced series (OHIF) can load them.

    Output UIDs derive from the inputs' instance UIDs and the settings (never from computed
    values, so a re-run on the same inputs replaces the objects in the PACS): a SEG, companion or
    map changes UID only when an instance it depends on, the settings or the algorithm version
    change.
    """
    import json
    from dataclasses import asdict

    from reporting.pmap import build_parametric_map
    from reporting.seg import build_segmentation, source_alignment
    from reporting.uids import digest_text, digest_uids

    settings_text = json.dumps(asdict(settings), sort_keys=True, default=str)
    rt_digest = digest_uids(rt)
    baseline_digest = studies[0].input_digest

    segs: list[Dataset] = []
    companions: list[Dataset] = []
    pmaps: list[Dataset] = []
    regs: list[Dataset] = []
    for study in studies:
        by_uid = {str(ds.SOPInstanceUID): ds for ds in study.anatomy_datasets}
        sources, frames, grid = source_alignment(study.anatomy, by_uid)
        mask = sitk.GetArrayFromImage(study.lesion_mask).astype(bool)
        seg_digest = digest_text(study.input_digest, baseline_digest, rt_digest, settings_text)
        segs.append(
            build_segmentation(
                sources,
                mask,
                lesion,
                segment_type=settings.segment_type,
                algorithm_version=ALGORITHM_VERSION,
                source_frames=frames,
                input_digest=seg_digest,
                grid=grid,
            )
        )
        exported = [(q, m) for q, m in sorted(study.maps.items()) if m.exported]
        series_companions = _companion_series(exported, study.input_digest, settings_text)
        for series_companion in series_companions.values():
            companions.extend(series_companion)
        for quantity, qmap in exported:
            values = sitk.GetArrayFromImage(qmap.image).astype(np.float32)
            companion = series_companions.get(qmap.source_volume.series_instance_uid)
            if companion is not None:
                sources, frames, grid = companion, None, None
            else:  # no companion (logged): the map references its acquisition, as before
                by_uid = {str(ds.SOPInstanceUID): ds for ds in qmap.source_datasets}
                sources, frames, grid = source_alignment(qmap.source_volume, by_uid)
            pmaps.append(
                build_parametric_map(
                    sources,
                    values,
                    quantity,
                    provenance=qmap.provenance,
                    algorithm_version=ALGORITHM_VERSION,
                    source_frames=frames,
                    grid=grid,
                    vertebral_level=lesion.vertebral_level,
                    input_digest=digest_text(study.input_digest, quantity, settings_text),
                )
            )
        if study.registration is not None:
            regs.append(_registration_object(studies[0], study))
    return segs, pmaps, regs, companions


def _build_report(
    results: list[Any], segs: list[Dataset], pmaps: list[Dataset], settings: ChainSettings
) -> Dataset:
    """The TID 1500 report of ``results``, referencing the time points' SEGs and maps."""
    from reporting.sr import build_measurement_report

    return build_measurement_report(
        results,
        segmentations=segs,
        parametric_maps=pmaps,
        algorithm_version=ALGORITHM_VERSION,
        algorithm_parameters=_algorithm_parameters(settings),
        criterion_sources=_criterion_sources(settings),
        segment_type=settings.segment_type,
    )


def _companion_series(
    exported: Sequence[tuple[str, StudyMap]], study_digest: str, settings_text: str
) -> dict[str, list[Dataset]]:
    """The companion series (:mod:`reporting.companion`) of each source series of ``exported``.

    Keyed by the source's Series Instance UID, numbered from
    :data:`reporting.companion.COMPANION_SERIES_NUMBER_BASE` in the order of the maps. A dynamic
    series' pre-contrast frames are the DCE fit's ``n_baseline_frames`` (any map of the series
    that records it). UIDs derive from the study's instances, the source series and the settings.
    """
    from reporting.companion import (
        COMPANION_SERIES_NUMBER_BASE,
        CompanionError,
        build_companion_series,
    )
    from reporting.uids import digest_text

    sources: dict[str, StudyMap] = {}
    pre_contrast: dict[str, int] = {}
    for _, qmap in exported:
        uid = qmap.source_volume.series_instance_uid
        sources.setdefault(uid, qmap)
        n_baseline = qmap.provenance.get("n_baseline_frames")
        if n_baseline is not None and uid not in pre_contrast:
            pre_contrast[uid] = int(n_baseline)
    out: dict[str, list[Dataset]] = {}
    for number, (uid, qmap) in enumerate(sources.items()):
        try:
            out[uid] = build_companion_series(
                qmap.source_volume,
                {str(ds.SOPInstanceUID): ds for ds in qmap.source_datasets},
                algorithm_version=ALGORITHM_VERSION,
                pre_contrast_frames=pre_contrast.get(uid),
                series_number=COMPANION_SERIES_NUMBER_BASE + number,
                input_digest=digest_text(study_digest, "map companion", uid, settings_text),
            )
        except CompanionError as err:
            # the maps are still written, on their acquisition (viewers that need a 3-D
            # referenced series, such as OHIF, will not overlay them)
            logger.warning("no companion series for the maps of series %s: %s", uid, err)
    return out


def _algorithm_parameters(settings: ChainSettings) -> dict[str, str]:
    """The settings behind the numbers, written in the SR's algorithm identification."""
    from dataclasses import asdict

    from processing.response import RULE_SET_NAME

    parameters = {
        "response rule set": f"{RULE_SET_NAME} {settings.rule_set}",
        "radiomics": (
            f"IBSI preprocessing, {settings.radiomics_spacing_mm} mm isotropic, "
            f"{settings.radiomics_bin_count} fixed bins"
        )
        if settings.radiomics
        else "off",
        "baseline window (days)": str(settings.baseline_window_days),
        "alpha/beta (Gy)": str(settings.alpha_beta_gy),
        "DCE arterial input function": "Parker 2006 population AIF",
    }
    parameters.update({f"maps {k}": str(v) for k, v in asdict(settings.map_settings()).items()})
    return parameters


def _criterion_sources(settings: ChainSettings) -> dict[str, str]:
    """Each response criterion's source, for the SR (a criterion there is a coded concept, with
    no room for it); none under rule set 1.0, which recorded none."""
    from processing.response import SOURCES

    return {} if settings.rule_set == "1.0" else dict(SOURCES)


def _history_documents(
    studies: list[StudyAnalysis], results: list[Any], course: Any
) -> list[Dataset]:
    """The lesion's history (trend plot and table) as an Encapsulated PDF in each follow-up."""
    from reporting.history import lesion_history_documents
    from reporting.summary import summary_records

    follow_up_images = {s.study_instance_uid: s.anatomy_datasets[0] for s in studies[1:]}
    if not follow_up_images:
        return []
    return lesion_history_documents(
        summary_records(results),
        follow_up_images=follow_up_images,
        algorithm_version=ALGORITHM_VERSION,
        course=course_summary(course),
    )


def _registration_object(baseline: StudyAnalysis, study: StudyAnalysis) -> Dataset:
    from reporting.registration import build_spatial_registration

    return build_spatial_registration(
        baseline.anatomy_datasets,
        study.anatomy_datasets,
        study.registration.matrix_moving_to_fixed,
        algorithm_version=ALGORITHM_VERSION,
    )
