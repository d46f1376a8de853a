"""Result types shared by the analysis chain and the reporting package.

Plain frozen dataclasses: ``processing`` fills them, ``reporting`` turns them into DICOM objects and
``node`` stores them in the timeline. Units are part of each field's name or docstring; internal
conventions follow docs/architecture.md, Conventions (ADC/MD in mm²/s, Ktrans/kep in /min, ve/vp as
fractions, volumes in mL, times in s).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

#: UCUM unit of every quantity the node computes or measures, in its internal convention
#: (docs/architecture.md, Conventions). One table for the maps, the measurements and the reports.
QUANTITY_UNITS: dict[str, str] = {
    "ADC": "mm2/s",
    "MD": "mm2/s",
    "Dapp": "mm2/s",
    "IVIM_D": "mm2/s",
    "IVIM_Dstar": "mm2/s",
    "MK": "1",
    "AK": "1",
    "RK": "1",
    "FA": "1",
    "Kapp": "1",
    "IVIM_f": "1",
    "Ktrans": "/min",
    "kep": "/min",
    "ve": "1",
    "vp": "1",
    "T1": "s",
    "IAUC60": "mmol/L.s",
    "TTP": "s",
    "T2w": "1",
    "T1w": "1",
}


class TimePointRole(str, enum.Enum):
    """Role of an MR study relative to the treatment course (TID 1502 time point type)."""

    BASELINE = "baseline"
    FOLLOW_UP = "follow-up"


class ResponseCategory(str, enum.Enum):
    """Response call for one treated lesion at one follow-up (rule set in processing.response)."""

    LOCAL_CONTROL = "local control"
    LOCAL_PROGRESSION = "local progression"
    INDETERMINATE = "indeterminate - possible pseudoprogression"
    NOT_ASSESSABLE = "not assessable"


class Comparability(str, enum.Enum):
    """How far a follow-up acquisition can be compared with the baseline one."""

    COMPARABLE = "comparable"
    CAUTION = "caution"
    NOT_COMPARABLE = "not comparable"


@dataclass(frozen=True)
class MapStatistics:
    """Statistics of one quantitative map inside one lesion ROI.

    Attributes
    ----------
    quantity : str
        Short quantity name as used across the node: ``ADC``, ``MD``, ``MK``, ``Kapp``, ``Dapp``,
        ``IVIM_D``, ``IVIM_f``, ``IVIM_Dstar``, ``Ktrans``, ``ve``, ``vp``, ``kep``, ``T1``,
        ``IAUC60``, ``TTP``, ``T2w``, ``T1w``.
    unit : str
        UCUM unit of the values (``mm2/s``, ``/min``, ``1``, ``s``, ``mmol/L.s``...).
    n_voxels : int
        Valid (finite, fit-accepted) voxels inside the ROI that entered the statistics.
    peak, peak_definition :
        The peak statistic where meaningful (e.g. mean of the lowest 10 % ADC, mean of the hottest
        1 cm³ Ktrans) and a sentence saying how it was computed.
    """

    quantity: str
    unit: str
    n_voxels: int
    mean: float
    median: float
    sd: float
    p10: float
    p90: float
    peak: float | None = None
    peak_definition: str | None = None


#: A point in patient coordinates (DICOM LPS, mm).
Point3D = tuple[float, float, float]
#: A point in DICOM image coordinates: (column, row), (0, 0) = top-left corner of the top-left
#: pixel, pixel centres at +0.5.
ImagePoint = tuple[float, float]


@dataclass(frozen=True)
class AxialSection:
    """Where a lesion's maximum axial diameter was measured (:func:`processing.measure`).

    Only recorded when the measured mask needed no resampling, i.e. when one of its image axes lies
    within 8° of the patient S axis: the section is then one plane of voxels of the mask.

    Attributes
    ----------
    slice_axis : int
        SimpleITK index axis (0 = x, 1 = y, 2 = z) closest to the patient S axis; the section is
        the plane of the mask's voxels at ``slice_index`` along it.
    slice_index : int
        Index of the section along ``slice_axis``, in the measured (cropped) mask's grid.
    diameter_mm : float
        The maximum axial diameter (equal to ``LesionMeasurements.max_axial_diameter_mm``).
    diameter_end_points_index : tuple of two (x, y, z)
        The two voxel corners whose axial distance is the diameter, as continuous SimpleITK indices
        of the measured mask (integer = voxel centre).
    diameter_end_points : tuple of two Point3D
        The same points in patient coordinates (LPS, mm).
    outline_index : tuple of (x, y, z)
        The lesion's outline in the section (its largest contour at level 0.5 of the mask), a
        closed polygon (last point = first point), continuous SimpleITK indices of the mask.
    outline : tuple of Point3D
        The same polygon in patient coordinates (LPS, mm).
    area_mm2 : float
        Area enclosed by the outline polygon, mm².
    """

    slice_axis: int
    slice_index: int
    diameter_mm: float
    diameter_end_points_index: tuple[Point3D, Point3D]
    diameter_end_points: tuple[Point3D, Point3D]
    outline_index: tuple[Point3D, ...]
    outline: tuple[Point3D, ...]
    area_mm2: float


@dataclass(frozen=True)
class LesionMeasurements:
    """Everything measured on one lesion at one time point.

    ``axial_section`` says where the maximum axial diameter was measured (None when unknown, e.g.
    measured on a resampled mask, or for parts measured on other grids).
    """

    volume_ml: float
    max_axial_diameter_mm: float | None = None
    max_craniocaudal_extent_mm: float | None = None
    max_3d_diameter_mm: float | None = None
    epidural_volume_ml: float | None = None
    map_statistics: dict[str, MapStatistics] = field(default_factory=dict)
    #: per map quantity: pyradiomics feature name (e.g. ``original_glcm_Contrast``) -> value
    radiomics: dict[str, dict[str, float]] = field(default_factory=dict)
    #: reasons for features left out, documented deviations from IBSI, settings used
    radiomics_notes: tuple[str, ...] = ()
    axial_section: AxialSection | None = None


@dataclass(frozen=True)
class Change:
    """Change of one quantity between a reference time point and the current one.

    ``quantity`` is a dotted path: ``volume``, ``ADC.mean``, ``Ktrans.median``,
    ``radiomics.ADC.original_glcm_Contrast``. ``relative`` is a fraction (0.10 = +10 %).
    ``repeatability`` is the repeatability coefficient used (relative, as a fraction): the
    published test-retest coefficient and the per-case segmentation coefficient combined
    (:mod:`processing.repeatability`), given separately as ``repeatability_test_retest`` and
    ``repeatability_segmentation`` (``None`` where there is none); ``beyond_repeatability`` is
    whether |relative| exceeds it. ``comparable`` is False when the two acquisitions are not
    comparable for this quantity: then the change is flagged, not trusted.
    """

    quantity: str
    reference: str  # "baseline" or "previous"
    reference_value: float
    value: float
    absolute: float
    relative: float | None
    repeatability: float | None
    beyond_repeatability: bool | None
    comparable: bool = True
    repeatability_test_retest: float | None = None
    repeatability_segmentation: float | None = None


@dataclass(frozen=True)
class Criterion:
    """One rule of the response rule set, with the values that decided it."""

    code: str  # stable identifier, e.g. "volume-increase", "perfusion-decrease"
    description: str
    fired: bool
    value: float | None = None
    threshold: float | None = None
    unit: str | None = None
    source: str | None = None  # the literature (or "node design") behind the rule


@dataclass(frozen=True)
class ResponseAssessment:
    """The response call for a lesion at one follow-up, and the evidence behind it."""

    category: ResponseCategory
    criteria: tuple[Criterion, ...]
    rule_set: str  # name and version of the documented rule set
    recommendation: str | None = None  # e.g. "confirmation MRI in 6-8 weeks"
    epidural_progression: bool | None = None
    compression_fracture: str | None = None  # "new", "progressive", "none" or None (not measurable)
    model_probability: float | None = None  # site model's probability of progression, if configured
    model_top_features: tuple[tuple[str, float], ...] = ()
    model_name: str | None = None
    #: rule set 2.0: where the functional evidence leans ("progression", "treatment effect",
    #: "mixed" or "none"), for an indeterminate call also what would settle it (recommendation)
    leaning: str | None = None


@dataclass(frozen=True)
class Lesion:
    """A treated lesion, tracked over time by a persistent identifier (TID 1500 tracking)."""

    tracking_id: str  # human-readable, e.g. "GTV L2"
    tracking_uid: str
    vertebral_level: str | None = None  # e.g. "L2"


@dataclass(frozen=True)
class PlanarMeasurement:
    """The lesion's maximum axial diameter and outline on one anatomical source image.

    What a viewer draws (TID 1410 image region in the report): the :class:`AxialSection` of the
    anatomical grid's measurement, located on the source image holding that section.

    Attributes
    ----------
    study_instance_uid, series_instance_uid, sop_class_uid, sop_instance_uid : str
        The source image.
    frame_number : int or None
        1-based frame of a multi-frame source image; None for single-frame images.
    diameter_mm : float
        The maximum axial diameter (the value of the lesion's volumetric measurement).
    diameter_end_points : tuple of two ImagePoint
        End points of the diameter in image coordinates (column, row).
    outline : tuple of ImagePoint
        The lesion outline on that image, closed polygon (last point = first point).
    area_mm2 : float or None
        Area enclosed by the outline, mm².
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None
    diameter_mm: float
    diameter_end_points: tuple[ImagePoint, ImagePoint]
    outline: tuple[ImagePoint, ...]
    area_mm2: float | None = None


@dataclass(frozen=True)
class TimePointResult:
    """One lesion at one time point: what was measured, how it changed, and the call."""

    lesion: Lesion
    role: TimePointRole
    study_instance_uid: str
    study_date: str  # YYYYMMDD
    days_since_treatment: int | None
    measurements: LesionMeasurements
    changes: tuple[Change, ...] = ()
    response: ResponseAssessment | None = None
    comparability: Comparability | None = None
    comparability_reasons: tuple[str, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)
    #: the lesion's axial section on its anatomical source image, if it could be located
    planar: PlanarMeasurement | None = None
