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


@dataclass(frozen=True)
class LesionMeasurements:
    """Everything measured on one lesion at one time point."""

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


@dataclass(frozen=True)
class Change:
    """Change of one quantity between a reference time point and the current one.

    ``quantity`` is a dotted path: ``volume``, ``ADC.mean``, ``Ktrans.median``,
    ``radiomics.ADC.original_glcm_Contrast``. ``relative`` is a fraction (0.10 = +10 %).
    ``repeatability`` is the minimum detectable change used (relative, as a fraction) and
    ``beyond_repeatability`` whether |relative| exceeds it. ``comparable`` is False when the two
    acquisitions are not comparable for this quantity: then the change is flagged, not trusted.
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


@dataclass(frozen=True)
class Criterion:
    """One rule of the response rule set, with the values that decided it."""

    code: str  # stable identifier, e.g. "volume-increase", "perfusion-decrease"
    description: str
    fired: bool
    value: float | None = None
    threshold: float | None = None
    unit: str | None = None


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


@dataclass(frozen=True)
class Lesion:
    """A treated lesion, tracked over time by a persistent identifier (TID 1500 tracking)."""

    tracking_id: str  # human-readable, e.g. "GTV L2"
    tracking_uid: str
    vertebral_level: str | None = None  # e.g. "L2"


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
