"""Longitudinal TID 1500 Measurement Report (Comprehensive 3D SR), built with highdicom.

One SR holds, for every lesion and time point handed in, a TID 1411 volumetric measurement group
(docs/conformance.md §4): the baseline and follow-up groups of a lesion share its Tracking
UID and differ by their TID 1502 Time Point Context; the follow-up groups add the changes from
baseline and the response call. The document belongs to the study of the latest time point;
instances of earlier studies (the baseline SEG, maps, images) are recorded as other-study evidence
(Pertinent Other Evidence Sequence) by highdicom.

Content of each measurement group (TID 1411)
--------------------------------------------
* Tracking Identifier / Tracking Unique Identifier: the persisted lesion identifiers.
* Time Point Context (TID 1502): Time Point ``"<role> <YYYYMMDD>"``, Time Point Type Baseline
  (C1442488, UMLS) or Post-radiation (264908009, SCT), Time Point Order (1 = earliest), and the
  Longitudinal Temporal Offset from Event in days with event type (SBRTSTART, 99SPINESBRT) —
  CID 280 has no treatment-start event (negative for a pre-treatment baseline).
* Referenced Segment (the SEG of this lesion at this time point, found by Study Instance UID and
  Tracking UID) with its source series; Finding = the segment type; Finding Site = the vertebra.
  A time point without a SEG (e.g. the lesion could not be delineated: "not assessable") gets a
  TID 1501 measurement group (no ROI) with the same content otherwise.
* Measurement Method: the response rule set (private ``RSET-``) when a response was assessed.
* Measurements (NUM):

  - Volume (118565006, SCT) in cm3; maximum axial diameter, craniocaudal extent and 3-D diameter
    (private AXDIAM, CCEXT, MAX3D) in mm; epidural volume (private EPIVOL) in cm3;
  - per map statistic: concept = the map's quantity code, Derivation = Mean / Median / Standard
    Deviation / Peak Value Within ROI / private P10, P90; unit = the Parametric Map's unit; each
    references its Parametric Map as (121112, DCM, "Source of Measurement") IMAGE when the map of
    that quantity and study is in ``parametric_maps``. (126100, DCM, "Real World Value Map used
    for measurement") is not used: it references a stand-alone Real World Value Mapping object
    (SOP Class 1.2.840.10008.5.1.4.1.1.67), not a Parametric Map, and dciodvfy rejects the
    latter. Signal statistics of the anatomical images (T1w, T2w, STIR) use (110804, DCM,
    "T1 Weighted MR Signal Intensity"), (110805, DCM, "T2 Weighted MR Signal Intensity") and
    (110852, DCM, "MR signal intensity") with unit ``1`` (scanner units) and ``image=<name>`` in
    the measurement's algorithm parameters;
  - radiomics: IBSI code (from :data:`processing.radiomics.IBSI_FEATURES`) for ``original_``
    features; values are converted to the IBSI definition where ``processing.radiomics`` documents
    a difference (``firstorder_Kurtosis`` - 3); PCA axis lengths, whose correction needs the voxel
    count, and every other feature keep the pyradiomics value under a ``99PYRADIOMICS`` code. Shape
    features carry real units (mm, mm2, mm3, /mm); first-order intensity features of a map
    (mean, percentiles, range, deviations…, computed on the map in the node's internal unit) are
    converted to the map's output unit; the rest have unit ``1``. The image the feature was computed
    on is named in the measurement's algorithm parameters (``image=ADC``) and its Parametric Map is
    referenced (Source of Measurement) when present;
  - criterion values (private ``CR-`` concepts) and the site model's probability of progression.
* Changes go into further TID 1411 groups of the same lesion and time point (same tracking
  identifiers, segment and time point context), one per kind of change, whose group-level
  Measurement Method is private CHGREL (relative change from baseline, %), CHGABS (absolute change
  from baseline, quantity unit) or CHGRELP/CHGABSP (from the previous time point). Each NUM has
  the concept and derivation of the quantity that changed. (dcmqi reads a Measurement Method only
  at group level, hence groups rather than per-NUM methods.)
* Qualitative evaluations (CODE): Response Evaluation (112020, DCM) = private response category;
  per criterion Present/Absent (fired or not); Epidural progression Present/Absent; Vertebral
  compression fracture = new / progressive / none; Acquisition comparability.
* Algorithm identification (TID 4019): name, version and the settings (``algorithm_parameters``).

Before these groups, the time points whose lesion section is located on an anatomical image
(``TimePointResult.planar``) get planar groups a viewer can draw, current time point first: the
outline (TID 1410) and the maximum axial diameter's end points (TID 1501) on that image, see
:mod:`reporting.sr_planar`; the images are recorded as evidence.

The private codes are documented in :mod:`reporting.codes`.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar, cast

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID

from processing.change import flatten_measurements
from processing.radiomics import IBSI_FEATURES
from processing.response_model import SYNTHETIC_STATEMENT
from processing.results import (
    LesionMeasurements,
    TimePointResult,
    TimePointRole,
)
from reporting import codes as rcodes
from reporting.pmap import map_quantity
from reporting.seg import DEVICE_SERIAL_NUMBER, MANUFACTURER, MODEL_NAME
from reporting.sr_planar import planar_evidence, planar_groups
from reporting.uids import deterministic_uid, digest_text, digest_uids

logger = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9200
ALGORITHM_NAME = "spine-node response assessment"
DEVICE_OBSERVER_NAME = "Spine Response Node"
PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
#: algorithm parameter of a radiomics group naming the Parametric Map its features were computed
#: on (``Parametric Map=<SOP Instance UID>``): once per group, not as each feature's Source of
#: Measurement (about 1,200 IMAGE items of a two-time-point report)
RADIOMICS_MAP_PARAMETER = "Parametric Map"

#: pyradiomics first-order features that carry the unit of the image intensities.
_INTENSITY_FEATURES = frozenset(
    {
        "Mean",
        "Median",
        "Minimum",
        "Maximum",
        "10Percentile",
        "90Percentile",
        "Range",
        "InterquartileRange",
        "MeanAbsoluteDeviation",
        "RobustMeanAbsoluteDeviation",
        "RootMeanSquared",
        "StandardDeviation",
    }
)
_SHAPE_UNITS = {
    "MeshVolume": "mm3",
    "VoxelVolume": "mm3",
    "SurfaceArea": "mm2",
    "SurfaceVolumeRatio": "/mm",
    "Maximum3DDiameter": "mm",
    "Maximum2DDiameterSlice": "mm",
    "Maximum2DDiameterColumn": "mm",
    "Maximum2DDiameterRow": "mm",
    "MajorAxisLength": "mm",
    "MinorAxisLength": "mm",
    "LeastAxisLength": "mm",
}
#: IBSI value = pyradiomics value + offset (processing.radiomics.IBSI_CORRECTIONS).
_IBSI_OFFSETS = {"firstorder_Kurtosis": -3.0}
#: mapped features whose IBSI correction needs data the SR writer does not have.
_IBSI_NEEDS_VOXEL_COUNT = frozenset(
    {"shape_MajorAxisLength", "shape_MinorAxisLength", "shape_LeastAxisLength"}
)


@dataclass(frozen=True)
class _Concept:
    """How one dotted quantity path is written as a NUM."""

    name: CodedConcept
    derivation: CodedConcept | None
    unit: str
    scale: float  # from the internal value to ``unit``
    offset: float = 0.0  # added after scaling (IBSI corrections)
    image: str | None = None  # quantity of the image/map the value was computed on
    #: a radiomics feature: written in its image's group of features (one algorithm for all)
    feature: bool = False


_PER_MM = CodedConcept("/mm", "UCUM", "/mm")


def _unit_with_extras(unit: str) -> CodedConcept:
    if unit == "/mm":
        return _PER_MM
    return rcodes.unit_code(unit)


def _radiomics_concept(
    quantity: str,
    feature: str,
    ibsi_codes: Mapping[str, str] | None,
) -> _Concept:
    image_type, _, rest = feature.partition("_")
    cls, _, name = rest.partition("_")
    key = f"{cls}_{name}"
    scale = 1.0
    if cls == "shape":
        unit = _SHAPE_UNITS.get(name, "1")
    elif cls == "firstorder" and name in _INTENSITY_FEATURES and quantity in rcodes.QUANTITIES:
        unit = rcodes.QUANTITIES[quantity].unit
        scale = rcodes.QUANTITIES[quantity].scale  # these features scale with the intensities
    else:
        unit = "1"
    code: CodedConcept | None = None
    offset = 0.0
    if image_type == "original" and key not in _IBSI_NEEDS_VOXEL_COUNT:
        meaning = IBSI_FEATURES[key].name if key in IBSI_FEATURES else None
        ibsi = (
            ibsi_codes.get(key)
            if ibsi_codes is not None
            else (IBSI_FEATURES[key].code if key in IBSI_FEATURES else None)
        )
        if ibsi is not None:
            code = rcodes.ibsi_code(ibsi, meaning)
            offset = _IBSI_OFFSETS.get(key, 0.0)
    if code is None:
        code = rcodes.pyradiomics_private_code(feature)
    return _Concept(code, None, unit, scale, offset, image=quantity, feature=True)


def _concept_for_path(
    path: str,
    measurements: LesionMeasurements,
    ibsi_codes: Mapping[str, str] | None,
) -> _Concept | None:
    """Concept, derivation and unit of a dotted path (``volume``, ``ADC.mean``, ``radiomics.…``).

    Returns None for paths that are not written (quantities without a code).
    """
    fixed = {
        "volume": _Concept(rcodes.VOLUME, None, "cm3", 1.0),
        "max_axial_diameter": _Concept(rcodes.MAX_AXIAL_DIAMETER, None, "mm", 1.0),
        "max_craniocaudal_extent": _Concept(rcodes.MAX_CRANIOCAUDAL_EXTENT, None, "mm", 1.0),
        "max_3d_diameter": _Concept(rcodes.MAX_3D_DIAMETER, None, "mm", 1.0),
        "epidural_volume": _Concept(rcodes.EPIDURAL_VOLUME, None, "cm3", 1.0),
    }
    if path in fixed:
        return fixed[path]
    if path.startswith("radiomics."):
        _, quantity, feature = path.split(".", 2)
        return _radiomics_concept(quantity, feature, ibsi_codes)
    quantity, _, stat = path.partition(".")
    if quantity in rcodes.SIGNAL_QUANTITIES and stat in rcodes.STATISTIC_DERIVATIONS:
        return _Concept(
            rcodes.SIGNAL_QUANTITIES[quantity],
            rcodes.STATISTIC_DERIVATIONS[stat],
            "1",
            1.0,
            image=quantity,
        )
    if quantity not in rcodes.QUANTITIES or stat not in rcodes.STATISTIC_DERIVATIONS:
        logger.debug("no coded concept for %s: not written to the SR", path)
        return None
    spec = rcodes.QUANTITIES[quantity]
    stats = measurements.map_statistics.get(quantity)
    unit = stats.unit if stats is not None else spec.internal_unit
    return _Concept(
        spec.quantity,
        rcodes.STATISTIC_DERIVATIONS[stat],
        spec.unit,
        rcodes.conversion_factor(unit, spec.unit),
        image=quantity,
    )


def reported_value(
    path: str,
    value: float,
    measurements: LesionMeasurements,
    ibsi_codes: Mapping[str, str] | None = None,
) -> tuple[float, str] | None:
    """The value and UCUM unit written to the SR for an internal value at ``path``.

    Useful to compare what dcmqi reads back with ``summary.json``. None if not written.
    """
    concept = _concept_for_path(path, measurements, ibsi_codes)
    if concept is None:
        return None
    return value * concept.scale + concept.offset, concept.unit


def _relaxivity_parameters(result: TimePointResult) -> list[str]:
    """The contrast-agent r1 behind the time point's DCE maps (value, source, agent, field,
    warnings), if any: once when every map used the same (one dynamic series), else per map
    (``Ktrans: r1=…``)."""
    maps = (result.provenance or {}).get("maps") or {}
    per_map: dict[str, list[str]] = {}
    for quantity, prov in sorted(maps.items()):
        if not prov or "relaxivity_per_mM_s" not in prov:
            continue
        agent = prov.get("contrast_agent") or prov.get("contrast_agent_declared") or "not recorded"
        per_map[quantity] = [
            (
                f"r1={prov['relaxivity_per_mM_s']} /mM/s ({prov.get('relaxivity_source', '?')}: "
                f"{prov.get('relaxivity_reference', '')})"
            ),
            f"contrast agent={agent}",
            f"field strength={prov.get('field_strength_T')} T",
            *(f"warning={w}" for w in prov.get("relaxivity_warnings", [])),
        ]
    distinct = {tuple(v) for v in per_map.values()}
    if len(distinct) <= 1:
        return list(next(iter(distinct), ()))
    return [f"{quantity}: {p}" for quantity, params in per_map.items() for p in params]


class _SharedContent:
    """Concepts and content items of one report, built once and shared by its measurements.

    A report repeats the same few hundred concepts, algorithm identifications and map references
    in thousands of NUMs; highdicom puts the objects it is given into the content tree as they
    are, so equal content can be the same object. Identical content, far fewer objects to build,
    and highdicom's copy of the tree (``Comprehensive3DSR``) copies each shared object once. A
    concept name is one object per code (a radiomics feature's code is that of each image's
    path). The built tree is therefore not to be modified in place (nothing does: it is written
    as built).
    """

    def __init__(
        self,
        *,
        algorithm_name: str,
        algorithm_version: str,
        ibsi_codes: Mapping[str, str] | None,
    ) -> None:
        self.algorithm_name = algorithm_name
        self.algorithm_version = algorithm_version
        self.ibsi_codes = ibsi_codes
        self._concepts: dict[tuple[str, str | None], _Concept | None] = {}
        self._names: dict[tuple[str, str, str, str | None], CodedConcept] = {}
        self._algorithms: dict[tuple[str, ...], hd.sr.AlgorithmIdentification] = {}
        self._sources: dict[str, list[hd.sr.SourceImageForMeasurement]] = {}

    def concept(self, path: str, measurements: LesionMeasurements) -> _Concept | None:
        """:func:`_concept_for_path` of ``path``, built once per path and map unit."""
        stats = measurements.map_statistics.get(path.partition(".")[0])
        key = (path, stats.unit if stats is not None else None)
        if key not in self._concepts:
            concept = _concept_for_path(path, measurements, self.ibsi_codes)
            if concept is not None:
                concept = dataclasses.replace(concept, name=self._name(concept.name))
            self._concepts[key] = concept
        return self._concepts[key]

    def _name(self, name: CodedConcept) -> CodedConcept:
        """One object per code: a radiomics feature has its code under each image's path."""
        key = (name.value, name.scheme_designator, name.meaning, name.scheme_version)
        return self._names.setdefault(key, name)

    def algorithm(self, parameters: Sequence[str]) -> hd.sr.AlgorithmIdentification:
        """The report's algorithm (name, version) with these parameters."""
        key = tuple(parameters)
        if key not in self._algorithms:
            self._algorithms[key] = hd.sr.AlgorithmIdentification(
                name=self.algorithm_name, version=self.algorithm_version, parameters=key or None
            )
        return self._algorithms[key]

    def source_map(self, sop_instance_uid: str) -> list[hd.sr.SourceImageForMeasurement]:
        """Source of Measurement reference to a Parametric Map."""
        if sop_instance_uid not in self._sources:
            self._sources[sop_instance_uid] = [
                hd.sr.SourceImageForMeasurement(PARAMETRIC_MAP_STORAGE, sop_instance_uid)
            ]
        return self._sources[sop_instance_uid]


class _GroupBuilder:
    """Collects the content of one TID 1411 group."""

    def __init__(
        self,
        result: TimePointResult,
        *,
        shared: _SharedContent,
        maps: Mapping[str, str],
    ) -> None:
        self.result = result
        self.shared = shared
        self.algorithm_version = shared.algorithm_version
        self.maps = maps  # quantity -> PM SOP Instance UID of this study
        self.measurements: list[hd.sr.Measurement] = []
        self.evaluations: list[hd.sr.QualitativeEvaluation] = []
        #: radiomics features by the image (quantity) they were computed on
        self.features: dict[str, list[hd.sr.Measurement]] = {}

    def _source_map(self, quantity: str | None) -> list[hd.sr.SourceImageForMeasurement] | None:
        uid = self.maps.get(quantity) if quantity else None
        if uid is None:
            return None
        return self.shared.source_map(uid)

    def _image_algorithm(self, concept: _Concept) -> hd.sr.AlgorithmIdentification | None:
        if (
            concept.image is None
            or concept.image in rcodes.QUANTITIES
            and (concept.name.scheme_designator == "DCM")
        ):
            # map statistics are named by their quantity code already (the contrast-agent r1 of
            # the DCE ones is in the time point's settings: _relaxivity_parameters)
            return None
        return self.shared.algorithm([f"image={concept.image}"])

    def add(self, path: str, value: float, *, change: bool = False, relative: bool = False) -> None:
        """Add the NUM of ``path``; ``change``: ``value`` is a difference (no IBSI offset)."""
        concept = self.shared.concept(path, self.result.measurements)
        if concept is None:
            return
        if relative:
            number, unit = value * 100.0, "%"
        elif change:
            number, unit = value * concept.scale, concept.unit
        else:
            number, unit = value * concept.scale + concept.offset, concept.unit
        if not math.isfinite(number):
            logger.warning(
                "non-finite value for %s at study %s not written",
                path,
                self.result.study_instance_uid,
            )
            return
        feature = concept.feature and not (change or relative)
        measurement = hd.sr.Measurement(
            name=concept.name,
            value=number,
            unit=_unit_with_extras(unit),
            derivation=concept.derivation,
            # a feature's image (and its map) is named once, by the algorithm of its group
            referenced_images=None if feature else self._source_map(concept.image),
            algorithm_id=None if feature else self._image_algorithm(concept),
        )
        if feature:
            self.features.setdefault(cast(str, concept.image), []).append(measurement)
        else:
            self.measurements.append(measurement)

    def add_response(self) -> None:
        response = self.result.response
        if response is None:
            return
        self.evaluations.append(
            hd.sr.QualitativeEvaluation(
                rcodes.RESPONSE_EVALUATION, rcodes.RESPONSE_CATEGORIES[response.category]
            )
        )
        for criterion in response.criteria:
            name = rcodes.criterion_code(criterion.code, criterion.description)
            self.evaluations.append(
                hd.sr.QualitativeEvaluation(
                    name, rcodes.PRESENT if criterion.fired else rcodes.ABSENT
                )
            )
            if criterion.value is not None and math.isfinite(criterion.value):
                try:
                    unit = rcodes.unit_code(criterion.unit or "1")
                except ValueError:
                    # the Present/Absent evaluation is still written; a value with a wrong
                    # unit would be worse than none
                    logger.warning(
                        "criterion %s: unit %r has no UCUM code; value not written",
                        criterion.code,
                        criterion.unit,
                    )
                    continue
                self.measurements.append(
                    hd.sr.Measurement(name=name, value=float(criterion.value), unit=unit)
                )
        if response.epidural_progression is not None:
            self.evaluations.append(
                hd.sr.QualitativeEvaluation(
                    rcodes.EPIDURAL_PROGRESSION,
                    rcodes.PRESENT if response.epidural_progression else rcodes.ABSENT,
                )
            )
        if response.compression_fracture is not None:
            self.evaluations.append(
                hd.sr.QualitativeEvaluation(
                    rcodes.VCF_EVALUATION, rcodes.VCF_VALUES[response.compression_fracture]
                )
            )
        if response.model_probability is not None:
            self.measurements.append(
                hd.sr.Measurement(
                    name=rcodes.PROGRESSION_PROBABILITY,
                    value=float(response.model_probability),
                    unit=rcodes.unit_code("1"),
                    algorithm_id=hd.sr.AlgorithmIdentification(
                        name=model_algorithm_name(response.model_name),
                        version=self.algorithm_version,
                        parameters=[
                            response.model_name or "site response model",
                            *(
                                f"{name}={weight:.4g}"
                                for name, weight in response.model_top_features
                            ),
                        ],
                    ),
                )
            )


#: (region, key of the region's dict, private code value, meaning, unit, scale) of the ADC QA
#: against the scanner's ADC (processing.adc_qa) written in the time point's group
_ADC_QA_ITEMS = (
    (
        "tumour",
        "median_relative_difference",
        "ADCQA-TUM-REL",
        "Median ADC difference to scanner ADC, tumour (relative)",
        "%",
        100.0,
    ),
    (
        "tumour",
        "median_difference_mm2_s",
        "ADCQA-TUM-ABS",
        "Median ADC difference to scanner ADC, tumour",
        "um2/s",
        1e6,
    ),
    (
        "tissue",
        "median_relative_difference",
        "ADCQA-TIS-REL",
        "Median ADC difference to scanner ADC, whole tissue (relative)",
        "%",
        100.0,
    ),
    (
        "tissue",
        "median_difference_mm2_s",
        "ADCQA-TIS-ABS",
        "Median ADC difference to scanner ADC, whole tissue",
        "um2/s",
        1e6,
    ),
)


def _add_scanner_adc_qa(builder: _GroupBuilder) -> None:
    """QA measurements: the node's ADC against the scanner's ADC series (when the study has one)."""
    qa = (builder.result.provenance or {}).get("scanner_adc_qa")
    if not qa or qa.get("error"):
        return
    algorithm = builder.shared.algorithm(
        [f"scanner ADC series {qa.get('scanner_series_instance_uid', '')}"]
    )
    for region, key, code, meaning, unit, scale in _ADC_QA_ITEMS:
        value = (qa.get(region) or {}).get(key)
        if value is None or not math.isfinite(float(value)):
            continue
        builder.measurements.append(
            hd.sr.Measurement(
                name=rcodes.private_code(code, meaning),
                value=float(value) * scale,
                unit=rcodes.unit_code(unit),
                algorithm_id=algorithm,
            )
        )


def reported_as_change(quantity: str) -> bool:
    """Whether the change of ``quantity`` gets a NUM in the report's change groups.

    Volume, diameters and map statistics do. Radiomics features are reported at each time point
    only: their changes (about 100 features on each of eight maps, four kinds of change) would
    make a report of thousands of items that no viewer shows usefully and that took highdicom
    ~15 s to build; they are in ``summary.json``, the lesion timeline and the site model.
    """
    return not quantity.startswith("radiomics.")


#: Algorithm Name is LO (64 characters); what a synthetic-data model's name must keep
_SYNTHETIC_MARK = " [SYNTHETIC DATA: NOT CLINICAL]"


def model_algorithm_name(model_name: str | None) -> str:
    """The site model's name as an Algorithm Name (0066,0036; LO, at most 64 characters).

    A model trained on synthetic data carries :data:`SYNTHETIC_STATEMENT` in its name; when the
    name is too long, the model's own name is shortened, never that warning (a cut "... data:
    NOT" would read as the opposite). The full name is the first Algorithm Parameter.
    """
    name = model_name or "site response model"
    if len(name) <= 64:
        return name
    if SYNTHETIC_STATEMENT in name:
        base = name.replace(f" [{SYNTHETIC_STATEMENT}]", "").replace(SYNTHETIC_STATEMENT, "")
        return base.strip()[: 64 - len(_SYNTHETIC_MARK)].rstrip() + _SYNTHETIC_MARK
    return name[:61].rstrip() + "..."


def _time_point_context(result: TimePointResult, order: int) -> hd.sr.TimePointContext:
    offset = None
    if result.days_since_treatment is not None:
        offset = hd.sr.LongitudinalTemporalOffsetFromEvent(
            value=float(result.days_since_treatment),
            unit=rcodes.UNITS["d"],
            event_type=rcodes.EVENT_SBRT_START,
        )
    baseline = result.role == TimePointRole.BASELINE
    return hd.sr.TimePointContext(
        time_point=f"{result.role.value} {result.study_date}",
        time_point_type=(
            rcodes.TIME_POINT_BASELINE if baseline else rcodes.TIME_POINT_POST_RADIATION
        ),
        time_point_order=order,
        temporal_offset_from_event=offset,
    )


def _segment_for(
    result: TimePointResult, segmentations: Sequence[Dataset]
) -> tuple[Dataset, int] | None:
    for seg in segmentations:
        if str(seg.StudyInstanceUID) != result.study_instance_uid:
            continue
        for item in seg.SegmentSequence:
            if str(item.get("TrackingUID", "")) == result.lesion.tracking_uid:
                return seg, int(item.SegmentNumber)
    return None


def _referenced_segment(seg: Dataset, segment_number: int) -> hd.sr.ReferencedSegment:
    """Whole segment of a SEG with its source series.

    Built directly rather than with ``ReferencedSegment.from_segmentation``, which expects a
    per-frame Segment Identification that highdicom itself shares when a SEG has one segment.
    """
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=segment_number,
        source_series=hd.sr.SourceSeriesForSegmentation(
            str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID)
        ),
    )


_P = ParamSpec("_P")
_R = TypeVar("_R")
_gc_lock = threading.Lock()
_gc_pauses = 0  # builds running with the cyclic garbage collector paused
_gc_was_enabled = False


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector (reference counting still frees memory).

    A report allocates some 10**5 pydicom/highdicom objects, which triggers hundreds of
    collections; the full ones traverse every object of the process (1.6 million in the analysis
    chain: 0.6 s of a 2.7 s build). A build leaves no cyclic garbage (a collection right after
    one finds none), so the pause frees nothing later than it would have been freed.
    Nestable and thread-safe: the collector is enabled again, if it was, when the last paused
    build ends.
    """
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


def _without_collection(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """``function`` run with the garbage collector paused (:func:`_collector_paused`)."""

    @functools.wraps(function)
    def paused(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with _collector_paused():
            return function(*args, **kwargs)

    return paused


def _mark_content_encoding(sr: Dataset) -> None:
    """Mark the content items of ``sr`` as encoded in its transfer syntax, for a faster write.

    pydicom's writer re-runs its ambiguous-VR correction (:func:`pydicom.filewriter.
    correct_ambiguous_vr`, recursive) on every sequence item that was not read in the encoding
    it is written in, so each element of the content tree was corrected once per ancestor (about
    5 times; a quarter of the write). Marked items skip their own pass; the document itself is
    not marked, so its pass over the whole tree (the one that matters) still runs at each write,
    also for items added later. Marked with the document's explicit/implicit VR and endianness
    only (a write in another transfer syntax corrects each item as before); an item holding a raw
    (undecoded) element is left unmarked. The bytes written are the same.
    """
    syntax = UID(sr.file_meta.TransferSyntaxUID)
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    seen: set[int] = set()  # items shared by several NUMs (algorithm, map reference) once

    def mark(items: Sequence[Dataset]) -> None:
        for item in items:
            if id(item) in seen:
                continue
            seen.add(id(item))
            elements = list(item.values())
            if all(isinstance(elem, DataElement) for elem in elements):
                item.set_original_encoding(implicit, little, item._character_set)
            for elem in elements:
                if elem.VR == "SQ" and isinstance(elem, DataElement):
                    mark(elem.value)

    mark(sr.ContentSequence)


#: top-level content items of TID 1500 that hold the bulk of the tree: the Image Library
#: (111028) and the Imaging Measurements (126010)
_BULK_CONTENT = frozenset({"111028", "126010"})


class LongitudinalReport(hd.sr.Comprehensive3DSR):
    """The TID 1500 report as built here: a highdicom Comprehensive 3D SR whose :attr:`content`
    (highdicom's view of the content tree) is parsed from the document when first asked for.

    highdicom's constructor deep-copies the content tree and parses the copy into its content
    item classes, and searches the tree twice for references, converting each item again; for a
    report of a baseline and two follow-ups (~6,300 items) that was ~4.4 s of a 6 s build, while
    the written document does not use either result. :func:`_document` builds it without them.
    """

    @property
    def content(self) -> hd.sr.ContentSequence:
        parsed = self.__dict__.get("_parsed_content")
        if parsed is None:
            parsed = hd.sr.Comprehensive3DSR.from_dataset(self, copy=True).content
            object.__setattr__(self, "_parsed_content", parsed)
        return cast(hd.sr.ContentSequence, parsed)


def _document(
    *, evidence: Sequence[Dataset], report: hd.sr.MeasurementReport, **kwargs: Any
) -> LongitudinalReport:
    """The SR document of ``report`` (highdicom's constructor, ``kwargs`` passed on), built on
    the report's root with its bulk subtrees (:data:`_BULK_CONTENT`) set aside, which are then
    put back in place: the same document, without highdicom's copy and parse of them
    (:class:`LongitudinalReport`).

    The evidence sequences do not depend on the content (highdicom records every instance of
    ``evidence``); its check that each instance the content references is in ``evidence`` is
    made here over the whole tree.
    """
    root = report[0]
    items = root.ContentSequence
    missing = _referenced_instances(items) - {str(ds.SOPInstanceUID) for ds in evidence}
    if missing:
        raise ValueError(
            "no evidence was given for instances the report references: "
            + ", ".join(sorted(missing))
        )
    root.ContentSequence = [
        item for item in items if item.ConceptNameCodeSequence[0].CodeValue not in _BULK_CONTENT
    ]
    try:
        sr = LongitudinalReport(evidence=evidence, content=report, **kwargs)
    finally:
        root.ContentSequence = items
    sr.ContentSequence = items
    return sr


def _referenced_instances(items: Sequence[Dataset]) -> set[str]:
    """SOP Instance UIDs referenced by the IMAGE and COMPOSITE items of a content tree."""
    found: set[str] = set()
    stack = list(items)
    while stack:
        item = stack.pop()
        if item.get("ValueType") in ("IMAGE", "COMPOSITE") and "ReferencedSOPSequence" in item:
            found.add(str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID))
        stack.extend(item.get("ContentSequence", ()))
    return found


@_without_collection
def build_measurement_report(
    results: Sequence[TimePointResult],
    *,
    segmentations: Sequence[Dataset],
    parametric_maps: Sequence[Dataset] = (),
    source_images: Sequence[Dataset] = (),
    algorithm_version: str,
    algorithm_parameters: Mapping[str, str] | None = None,
    criterion_sources: Mapping[str, str] | None = None,
    segment_type: str = "metastasis",
    ibsi_codes: Mapping[str, str] | None = None,
    device_observer_uid: str | None = None,
    series_number: int = SR_SERIES_NUMBER,
) -> LongitudinalReport:
    """Build the longitudinal TID 1500 report of the lesions' time points.

    Parameters
    ----------
    results : Sequence[processing.results.TimePointResult]
        Every lesion at every time point to report (typically baseline and follow-ups).
    segmentations : Sequence[pydicom.Dataset]
        The SEGs built by :func:`reporting.seg.build_segmentation`; a result is tied to the SEG of
        its study holding a segment of its Tracking UID (TID 1411), or reported without ROI
        (TID 1501) when there is none.
    parametric_maps : Sequence[pydicom.Dataset]
        The Parametric Maps of the studies; map statistics reference the map of their quantity and
        study.
    source_images : Sequence[pydicom.Dataset]
        Optional further evidence (source image headers); the source series are referenced through
        the SEGs in any case.
    algorithm_version : str
        Version written in the algorithm identification and part of the UIDs.
    algorithm_parameters : Mapping[str, str], optional
        Settings used (rule set, bin width, resampling, AIF, model…), written as Algorithm
        Parameters of each time point's measurement group (once per lesion and time point: the
        other groups of the time point name the algorithm and its version, and a radiomics group
        its image).
    criterion_sources : Mapping[str, str], optional
        Response criterion code -> its source (literature), written as ``source of
        <code>=<source>`` parameters of the groups that carry a response assessment.
    segment_type : str
        Finding type (same names as :func:`reporting.seg.build_segmentation`).
    ibsi_codes : Mapping[str, str], optional
        pyradiomics ``class_Feature`` -> IBSI code; default
        :data:`processing.radiomics.IBSI_FEATURES`.
    device_observer_uid : str, optional
        Device Observer UID; default derived from the manufacturer and model name.
    series_number : int
        Series Number of the SR.

    Returns
    -------
    LongitudinalReport
        The report (a highdicom Comprehensive 3D SR), in the study of the latest time point;
        UIDs deterministic from the studies, lesions, algorithm version and the reported content.

    References
    ----------
    DICOM PS3.16 TID 1500, 1411, 1502, 4019; PS3.3 A.35.13 Comprehensive 3D SR IOD.
    """
    if not results:
        raise ValueError("results is empty: nothing to report")
    if not algorithm_version:
        raise ValueError("algorithm_version must be given")
    parameters = [f"{k}={v}" for k, v in sorted((algorithm_parameters or {}).items())]
    sources = [f"source of {k}={v}" for k, v in sorted((criterion_sources or {}).items())]
    shared = _SharedContent(
        algorithm_name=ALGORITHM_NAME, algorithm_version=algorithm_version, ibsi_codes=ibsi_codes
    )
    # the settings once per lesion and time point (its measurement group), the criteria's
    # sources with each response; the time point's other groups name algorithm and version
    algorithm = shared.algorithm(())
    maps: dict[tuple[str, str], str] = {
        (str(pm.StudyInstanceUID), map_quantity(pm)): str(pm.SOPInstanceUID)
        for pm in parametric_maps
    }
    ordered = sorted(results, key=lambda r: (r.lesion.tracking_uid, r.study_date))
    current = max(results, key=lambda r: r.study_date)
    groups = []
    order_by_lesion: dict[str, int] = {}
    for result in ordered:
        order = order_by_lesion.get(result.lesion.tracking_uid, 0) + 1
        order_by_lesion[result.lesion.tracking_uid] = order
        segment = _segment_for(result, segmentations)
        study_maps = {
            q: uid for (study, q), uid in maps.items() if study == result.study_instance_uid
        }
        builder = _GroupBuilder(result, shared=shared, maps=study_maps)
        for path, value in flatten_measurements(result.measurements).items():
            builder.add(path, value)
        builder.add_response()
        _add_scanner_adc_qa(builder)
        if result.comparability is not None:
            builder.evaluations.append(
                hd.sr.QualitativeEvaluation(
                    rcodes.COMPARABILITY, rcodes.COMPARABILITY_VALUES[result.comparability]
                )
            )
        response = result.response
        common: dict[str, Any] = dict(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=result.lesion.tracking_uid, identifier=result.lesion.tracking_id
            ),
            time_point_context=_time_point_context(result, order),
            finding_type=rcodes.segment_type(segment_type),
            finding_sites=[hd.sr.FindingSite(rcodes.vertebra_code(result.lesion.vertebral_level))],
            algorithm_id=algorithm,
        )
        if segment is not None:
            common["referenced_segment"] = _referenced_segment(*segment)
            group_class: type = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        else:
            logger.warning(
                "no SEG of study %s for lesion %s: TID 1501 group without ROI",
                result.study_instance_uid,
                result.lesion.tracking_uid,
            )
            group_class = hd.sr.MeasurementsAndQualitativeEvaluations
        # the settings with the r1 of this time point's DCE maps (once, not under each statistic)
        relaxivity = _relaxivity_parameters(result)
        primary = dict(
            common,
            algorithm_id=shared.algorithm(
                [*parameters, *relaxivity, *(sources if response is not None else ())]
            ),
        )
        groups.append(
            group_class(
                method=rcodes.rule_set_code(response.rule_set) if response is not None else None,
                measurements=builder.measurements,
                qualitative_evaluations=builder.evaluations or None,
                **primary,
            )
        )
        # one group of radiomics features per image: its algorithm names the image once (a
        # feature's own algorithm item would repeat it in each of the ~100 NUMs of the image)
        for image, features in builder.features.items():
            named = [f"image={image}"]
            if image in study_maps:
                named.append(f"{RADIOMICS_MAP_PARAMETER}={study_maps[image]}")
            groups.append(
                group_class(
                    method=rcodes.RADIOMICS_METHOD,
                    measurements=features,
                    **{**common, "algorithm_id": shared.algorithm(named)},
                )
            )
        for (reference, relative), method in rcodes.CHANGE_METHODS.items():
            changes = [
                c
                for c in result.changes
                if c.reference == reference
                and (c.relative is not None or not relative)
                and reported_as_change(c.quantity)
            ]
            if not changes:
                continue
            change_builder = _GroupBuilder(result, shared=shared, maps=study_maps)
            for change in changes:
                change_builder.add(
                    change.quantity,
                    # `relative` changes were filtered to those with a value
                    cast(float, change.relative) if relative else change.absolute,
                    change=True,
                    relative=relative,
                )
            if change_builder.measurements:
                groups.append(
                    group_class(method=method, measurements=change_builder.measurements, **common)
                )

    # planar groups (reporting.sr_planar: what a viewer draws) first, current time point first
    groups[:0] = planar_groups(
        results,
        time_point_context=_time_point_context,
        finding_type=rcodes.segment_type(segment_type),
        algorithm_id=algorithm,
    )
    observer_uid = device_observer_uid or deterministic_uid(
        source_study_uid="device",
        tracking_uid=None,
        kind="device-observer",
        algorithm_version=MODEL_NAME,
        input_digest=MANUFACTURER,
    )
    observation_context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=observer_uid,
                name=DEVICE_OBSERVER_NAME,
                manufacturer_name=MANUFACTURER,
                model_name=MODEL_NAME,
                serial_number=DEVICE_SERIAL_NUMBER,
            ),
        )
    )
    evidence_all = [*segmentations, *parametric_maps, *source_images, *planar_evidence(results)]
    current_study = current.study_instance_uid
    evidence = sorted(evidence_all, key=lambda ds: str(ds.StudyInstanceUID) != current_study)
    if not evidence or str(evidence[0].StudyInstanceUID) != current_study:
        raise ValueError(f"no evidence of the latest study {current_study} was given")
    image_library = list(source_images)
    report = hd.sr.MeasurementReport(
        observation_context=observation_context,
        procedure_reported=rcodes.PROCEDURE_REPORTED,
        imaging_measurements=groups,
        referenced_images=image_library or None,
    )
    content_digest = digest_text(
        digest_uids(evidence_all),
        repr(
            [
                (
                    r.lesion.tracking_uid,
                    r.study_instance_uid,
                    r.role.value,
                    r.measurements,
                    r.changes,
                    r.response,
                    r.comparability,
                )
                for r in ordered
            ]
        ),
        repr((parameters, sources)),
        segment_type,
    )
    uid_args = dict(
        source_study_uid=current_study,
        tracking_uid="+".join(sorted(order_by_lesion)),
        algorithm_version=algorithm_version,
        input_digest=content_digest,
    )
    sr = _document(
        evidence=evidence,
        report=report,
        series_instance_uid=deterministic_uid(kind="sr/series", **uid_args),
        series_number=series_number,
        sop_instance_uid=deterministic_uid(kind="sr/instance", **uid_args),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    sr.SeriesDescription = "Spine SBRT response report"
    sr.CodingSchemeIdentificationSequence = rcodes.coding_scheme_identification()
    _mark_content_encoding(sr)
    logger.info(
        "built TID 1500 SR %s: %d groups for %d lesion(s), study %s",
        sr.SOPInstanceUID,
        len(groups),
        len(order_by_lesion),
        current_study,
    )
    return sr
