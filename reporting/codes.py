"""Coded concepts used by the node's DICOM outputs (SEG, Parametric Map, TID 1500 SR).

Every code is either a standard code (DCM, SCT, UCUM, UMLS, IBSI) checked against pydicom's
PS3.16 concept dictionary (``pydicom.sr._concepts_dict``) and dcmqi's Parametric Map context files
(``pm-dwi-context.json``, ``pm-dce-context.json``), or a code of the node's documented private
coding scheme where DICOM has none.

Conformance notes (private coding scheme)
-----------------------------------------
Coding Scheme Designator ``99SPINESBRT`` (version ``1``), defined by this node. It is used only
where PS3.16 offers no concept:

===========  ==========================================================================
Code value   Code meaning
===========  ==========================================================================
LC           Local control
LP           Local progression
INDPP        Indeterminate - possible pseudoprogression
NA           Not assessable
VCFNEW       New vertebral compression fracture
VCFPROG      Progressive vertebral compression fracture
VCFNONE      No new or progressive vertebral compression fracture
EPIPROG      Epidural progression
VCF          Vertebral compression fracture (concept name of the VCF evaluation)
SBRTSTART    Start of stereotactic body radiotherapy (longitudinal temporal event type)
CMPOK        Comparable acquisition
CMPCAUT      Acquisition comparable with caution
CMPNOT       Acquisition not comparable
CMPAB        Acquisition comparability (concept name)
CHGREL       Relative change from baseline (measurement method; unit %)
CHGABS       Absolute change from baseline (measurement method; unit of the quantity)
CHGRELP      Relative change from previous time point
CHGABSP      Absolute change from previous time point
RADIOMX      Radiomics features of one image (measurement method; the group's algorithm
             parameters name the image)
RSET-<hash>  Response rule set, meaning = rule set name and version (measurement method)
CR-<code>    Response criterion (concept name of a qualitative evaluation; value Present
             when the criterion fired, Absent otherwise), meaning = its description
PPROB        Probability of local progression (site response model), unit 1
AXDIAM       Maximum axial diameter (mm)
CCEXT        Maximum craniocaudal extent (mm)
MAX3D        Maximum 3D diameter (mm)
EPIVOL       Epidural tumour volume (cm3)
P10 / P90    10th / 90th percentile within ROI (derivation of a map statistic)
===========  ==========================================================================

Criterion codes longer than 13 characters are replaced by ``CR-`` + 13 characters of the base-32
SHA-1 of the criterion identifier so the code value stays within the 16-character SH limit.

Radiomics features without an IBSI code use the private scheme ``99PYRADIOMICS`` of
pyradiomics-dcm: code value = first 6 characters of base64(SHA-1(feature name)), meaning = the
pyradiomics feature name. Response categories for RECIST-based calls keep the DCM codes of CID 6144.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr._concepts_dict import concepts as _concepts
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from processing.results import Comparability, ResponseCategory

logger = logging.getLogger(__name__)

PRIVATE_SCHEME = "99SPINESBRT"
PRIVATE_SCHEME_VERSION = "1"
PYRADIOMICS_SCHEME = "99PYRADIOMICS"


def private_code(value: str, meaning: str) -> CodedConcept:
    """Return a concept of the node's private coding scheme ``99SPINESBRT``.

    Parameters
    ----------
    value : str
        Code value (at most 16 characters, SH).
    meaning : str
        Code meaning; truncated to the 64 characters allowed for LO.
    """
    if not value or len(value) > 16:
        raise ValueError(f"private code value must have 1-16 characters, got {value!r}")
    return CodedConcept(
        value=value,
        scheme_designator=PRIVATE_SCHEME,
        meaning=meaning[:64],
        scheme_version=PRIVATE_SCHEME_VERSION,
    )


def coding_scheme_identification() -> list[Dataset]:
    """Coding Scheme Identification Sequence items declaring the private schemes (PS3.3 C.12.1)."""
    items = []
    for designator, name, responsible in (
        (PRIVATE_SCHEME, "Spine Response Node private codes", "Spine Response Node"),
        (
            PYRADIOMICS_SCHEME,
            "pyradiomics features without IBSI code (pyradiomics-dcm)",
            "pyradiomics",
        ),
    ):
        item = Dataset()
        item.CodingSchemeDesignator = designator
        item.CodingSchemeName = name
        item.CodingSchemeResponsibleOrganization = responsible
        if designator == PRIVATE_SCHEME:
            item.CodingSchemeVersion = PRIVATE_SCHEME_VERSION
        items.append(item)
    return items


def _hash_code(text: str, length: int) -> str:
    return base64.b32encode(hashlib.sha1(text.encode("utf-8")).digest()).decode("ascii")[:length]


# --------------------------------------------------------------------------------------------
# Units (UCUM) and unit conversion from the node's internal conventions
# (docs/architecture.md, Conventions)
# --------------------------------------------------------------------------------------------

UNITS: dict[str, CodedConcept] = {
    "mm2/s": CodedConcept("mm2/s", "UCUM", "mm2/s"),
    "um2/s": CodedConcept("um2/s", "UCUM", "um2/s"),
    "/min": CodedConcept("/min", "UCUM", "/min"),
    "/s": CodedConcept("/s", "UCUM", "/s"),
    "s": CodedConcept("s", "UCUM", "s"),
    "ms": CodedConcept("ms", "UCUM", "ms"),
    "1": CodedConcept("1", "UCUM", "no units"),
    "{ratio}": CodedConcept("{ratio}", "UCUM", "ratio"),
    "{0:1}": CodedConcept("{0:1}", "UCUM", "range 0:1"),
    "mmol/l.s": CodedConcept("mmol/l.s", "UCUM", "mmol/l.s"),
    "mm": CodedConcept("mm", "UCUM", "mm"),
    "mm2": CodedConcept("mm2", "UCUM", "mm2"),
    "cm3": CodedConcept("cm3", "UCUM", "cm3"),
    "mm3": CodedConcept("mm3", "UCUM", "mm3"),
    "%": CodedConcept("%", "UCUM", "%"),
    "d": CodedConcept("d", "UCUM", "day"),
    "wk": CodedConcept("wk", "UCUM", "week"),
    "mo": CodedConcept("mo", "UCUM", "month"),
    "Gy": CodedConcept("Gy", "UCUM", "Gy"),
    "mmol/l": CodedConcept("mmol/l", "UCUM", "mmol/l"),
}

#: Spellings met in result objects -> UCUM code used in ``UNITS``.
_UNIT_ALIASES: dict[str, str] = {
    "mm^2/s": "mm2/s",
    "mm²/s": "mm2/s",
    "um^2/s": "um2/s",
    "µm²/s": "um2/s",
    "µm2/s": "um2/s",
    "1/min": "/min",
    "min-1": "/min",
    "1/s": "/s",
    "mmol/L.s": "mmol/l.s",
    "mM.s": "mmol/l.s",
    "mmol/L": "mmol/l",
    "mM": "mmol/l",
    "mL": "cm3",
    "ml": "cm3",
    "fraction": "1",
    "ratio": "{ratio}",
    "": "1",
    "days": "d",
    "day": "d",
    "weeks": "wk",
    "week": "wk",
    "months": "mo",
    "month": "mo",
}

#: (from, to) -> multiplicative factor.
_CONVERSIONS: dict[tuple[str, str], float] = {
    ("mm2/s", "um2/s"): 1e6,
    ("um2/s", "mm2/s"): 1e-6,
    ("s", "ms"): 1e3,
    ("ms", "s"): 1e-3,
    ("cm3", "mm3"): 1e3,
    ("/s", "/min"): 60.0,
    ("/min", "/s"): 1.0 / 60.0,
    # dimensionless spellings are interchangeable
    ("1", "{ratio}"): 1.0,
    ("{ratio}", "1"): 1.0,
    ("1", "{0:1}"): 1.0,
    ("{0:1}", "1"): 1.0,
    ("{ratio}", "{0:1}"): 1.0,
    ("{0:1}", "{ratio}"): 1.0,
}


def normalize_unit(unit: str) -> str:
    """Return the UCUM code for a unit spelling used in result objects (``mL`` -> ``cm3``)."""
    unit = unit.strip()
    code = _UNIT_ALIASES.get(unit, unit)
    if code not in UNITS:
        raise ValueError(f"unit {unit!r} has no UCUM code in reporting.codes.UNITS")
    return code


def unit_code(unit: str) -> CodedConcept:
    """Return the UCUM concept of a unit (aliases as in :func:`normalize_unit`)."""
    return UNITS[normalize_unit(unit)]


def conversion_factor(from_unit: str, to_unit: str) -> float:
    """Factor converting values in ``from_unit`` into ``to_unit`` (both UCUM or known aliases).

    Raises
    ------
    ValueError
        If no conversion is known (the caller must not guess a scale).
    """
    src, dst = normalize_unit(from_unit), normalize_unit(to_unit)
    if src == dst:
        return 1.0
    try:
        return _CONVERSIONS[(src, dst)]
    except KeyError as err:
        raise ValueError(f"no conversion from {from_unit!r} to {to_unit!r}") from err


# --------------------------------------------------------------------------------------------
# Parametric Map quantities (docs/conformance.md §2; dcmqi pm-dwi/pm-dce contexts)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantitySpec:
    """How one map quantity is encoded in a Parametric Map and in TID 1500 measurements.

    Attributes
    ----------
    name : str
        Node quantity name (``MapStatistics.quantity``).
    quantity : CodedConcept
        Value of (246205007, SCT, "Quantity") in the Quantity Definition Sequence and concept
        name of the SR measurements.
    unit : str
        UCUM code of the stored values (PM pixels after the Real World Value Mapping and SR NUMs).
    internal_unit : str
        Unit of the values handed in by ``processing`` (docs/architecture.md, Conventions).
    method : CodedConcept or None
        Model / method code (370129005, SCT, "Measurement Method") — CID 7273, 4101, 4100.
    image_flavor : str
        Third value of Image Type (highdicom ``ImageFlavorValues``).
    """

    name: str
    quantity: CodedConcept
    unit: str
    internal_unit: str
    method: CodedConcept | None
    image_flavor: str

    @property
    def scale(self) -> float:
        """Factor from ``internal_unit`` to ``unit``."""
        return conversion_factor(self.internal_unit, self.unit)


def _c(code: Code) -> CodedConcept:
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


_DCM = codes.DCM
MONO_EXP = _c(_DCM.MonoExponentialDiffusionModel)
KURTOSIS_MODEL = _c(_DCM.KurtosisDiffusionModel)
IVIM_MODEL = _c(_DCM.BiExponentialIVIMDiffusionModel)
STANDARD_TOFTS = _c(_DCM.StandardToftsModel)
EXTENDED_TOFTS = _c(_DCM.ExtendedToftsModel)
T1_VFA = _c(_DCM.T1ByMultipleFlipAngles)

QUANTITIES: dict[str, QuantitySpec] = {
    spec.name: spec
    for spec in (
        QuantitySpec(
            "ADC", _c(_DCM.ApparentDiffusionCoefficient), "um2/s", "mm2/s", MONO_EXP, "DIFFUSION"
        ),
        QuantitySpec("MD", _c(_DCM.MeanDiffusivity), "um2/s", "mm2/s", KURTOSIS_MODEL, "DIFFUSION"),
        QuantitySpec(
            "Dapp",
            _c(_DCM.KurtosisDiffusionCoefficient),
            "um2/s",
            "mm2/s",
            KURTOSIS_MODEL,
            "DIFFUSION",
        ),
        QuantitySpec("MK", _c(_DCM.MeanKurtosis), "1", "1", KURTOSIS_MODEL, "DIFFUSION"),
        QuantitySpec(
            "Kapp", _c(_DCM.ApparentKurtosisCoefficient), "1", "1", KURTOSIS_MODEL, "DIFFUSION"
        ),
        QuantitySpec("AK", _c(_DCM.AxialKurtosis), "1", "1", KURTOSIS_MODEL, "DIFFUSION"),
        QuantitySpec("RK", _c(_DCM.RadialKurtosis), "1", "1", KURTOSIS_MODEL, "DIFFUSION"),
        QuantitySpec(
            "FA", _c(_DCM.FractionalAnisotropy), "{0:1}", "1", KURTOSIS_MODEL, "DIFFUSION"
        ),
        QuantitySpec(
            "IVIM_D", _c(_DCM.SlowDiffusionCoefficient), "um2/s", "mm2/s", IVIM_MODEL, "DIFFUSION"
        ),
        QuantitySpec(
            "IVIM_Dstar",
            _c(_DCM.FastDiffusionCoefficient),
            "um2/s",
            "mm2/s",
            IVIM_MODEL,
            "DIFFUSION",
        ),
        QuantitySpec(
            "IVIM_f",
            _c(_DCM.FastDiffusionCoefficientFraction),
            "{0:1}",
            "1",
            IVIM_MODEL,
            "DIFFUSION",
        ),
        QuantitySpec("Ktrans", _c(_DCM.Ktrans), "/min", "/min", STANDARD_TOFTS, "PERFUSION"),
        QuantitySpec("kep", _c(_DCM.Kep), "/min", "/min", STANDARD_TOFTS, "PERFUSION"),
        QuantitySpec("ve", _c(_DCM.Ve), "{ratio}", "1", STANDARD_TOFTS, "PERFUSION"),
        QuantitySpec("vp", _c(_DCM.Vp), "{ratio}", "1", EXTENDED_TOFTS, "PERFUSION"),
        QuantitySpec("T1", _c(_DCM.T1), "ms", "s", T1_VFA, "T1"),
        QuantitySpec("IAUC60", _c(_DCM.IAUC60), "mmol/l.s", "mmol/l.s", None, "PERFUSION"),
        QuantitySpec("TTP", _c(_DCM.TimeToPeak), "s", "s", None, "PERFUSION"),
    )
}


#: Anatomical images whose ROI signal statistics are reported (arbitrary units, written as "1").
SIGNAL_QUANTITIES: dict[str, CodedConcept] = {
    "T1w": _c(_DCM.T1WeightedMRSignalIntensity),
    "T2w": _c(_DCM.T2WeightedMRSignalIntensity),
    "STIR": _c(_DCM.MRSignalIntensity),
}


def quantity_spec(name: str, *, model: str | None = None) -> QuantitySpec:
    """Return the encoding of quantity ``name``, with the DCE model taken from provenance.

    Parameters
    ----------
    name : str
        Quantity name (see ``QUANTITIES``).
    model : str, optional
        ``"extended_tofts"``/``"extended tofts"`` or ``"tofts"``/``"standard_tofts"`` for the
        Tofts parameters (Ktrans, kep, ve); ignored for other quantities.
    """
    try:
        spec = QUANTITIES[name]
    except KeyError as err:
        raise ValueError(
            f"unknown quantity {name!r}; expected one of {sorted(QUANTITIES)}"
        ) from err
    if model is not None and spec.method in (STANDARD_TOFTS, EXTENDED_TOFTS):
        key = model.lower().replace("-", "_").replace(" ", "_")
        if key in ("extended_tofts", "etofts", "extended"):
            spec = QuantitySpec(
                spec.name,
                spec.quantity,
                spec.unit,
                spec.internal_unit,
                EXTENDED_TOFTS,
                spec.image_flavor,
            )
        elif key in ("tofts", "standard_tofts"):
            if spec.name == "vp":
                raise ValueError("vp is not a parameter of the standard Tofts model")
            spec = QuantitySpec(
                spec.name,
                spec.quantity,
                spec.unit,
                spec.internal_unit,
                STANDARD_TOFTS,
                spec.image_flavor,
            )
        else:
            raise ValueError(f"unknown DCE model {model!r}")
    return spec


def quantity_from_code(code: CodedConcept | Code) -> str:
    """Return the node quantity name whose quantity code equals ``code`` (first match)."""
    for spec in QUANTITIES.values():
        if (spec.quantity.value, spec.quantity.scheme_designator) == (
            code.value,
            code.scheme_designator,
        ):
            return spec.name
    raise ValueError(f"no node quantity for code {code.value} ({code.scheme_designator})")


# --------------------------------------------------------------------------------------------
# Segmentation: category, type, anatomy (docs/conformance.md §3)
# --------------------------------------------------------------------------------------------

SEGMENT_CATEGORY = _c(codes.SCT.MorphologicallyAbnormalStructure)
SEGMENT_TYPES: dict[str, CodedConcept] = {
    "metastasis": _c(codes.SCT.NeoplasmSecondary),
    "neoplasm": _c(codes.SCT.Neoplasm),
    "primary": CodedConcept("372087000", "SCT", "Neoplasm, Primary"),
    "gtv": _c(codes.SCT.GTV),
}
ANATOMIC_STRUCTURE = _c(codes.SCT.AnatomicalStructure)
VERTEBRA = _c(codes.SCT.Vertebra)
SPINE = _c(codes.SCT.Spine)
SACRUM = _c(codes.SCT.Sacrum)


def segment_type(name: str) -> CodedConcept:
    """Segmented property type for a configured segment type name (CID 7159 / 9534)."""
    try:
        return SEGMENT_TYPES[name.lower()]
    except KeyError as err:
        raise ValueError(
            f"unknown segment type {name!r}; expected one of {sorted(SEGMENT_TYPES)}"
        ) from err


def vertebra_code(level: str | None) -> CodedConcept:
    """SNOMED CT code of a vertebral level (``"C1"``..``"C7"``, ``"T1"``..``"T12"``,
    ``"L1"``..``"L5"``, ``"S"``/``"S1"`` -> Sacrum); generic Vertebra when unknown or None.

    Codes are looked up in pydicom's PS3.16 dictionary (CID 7151/9514 members, e.g.
    L2 vertebra = 14293000).
    """
    if not level:
        return VERTEBRA
    key = level.strip().upper()
    if key.startswith("S"):
        return SACRUM
    try:
        return _c(getattr(codes.SCT, f"{key}Vertebra"))
    except AttributeError:
        logger.warning("vertebral level %r has no SNOMED CT code; using Vertebra", level)
        return VERTEBRA


# --------------------------------------------------------------------------------------------
# SR concepts (TID 1500 / 1411 / 1502)
# --------------------------------------------------------------------------------------------

PROCEDURE_REPORTED = _c(_DCM.MultiparametricMRI)  # CID 100
VOLUME = _c(codes.SCT.Volume)
MEAN = _c(codes.SCT.Mean)
MEDIAN = _c(codes.SCT.Median)
STANDARD_DEVIATION = _c(codes.SCT.StandardDeviation)
PEAK = _c(_DCM.PeakValueWithinROI)
P10 = private_code("P10", "10th percentile within ROI")
P90 = private_code("P90", "90th percentile within ROI")
STATISTIC_DERIVATIONS: dict[str, CodedConcept] = {
    "mean": MEAN,
    "median": MEDIAN,
    "sd": STANDARD_DEVIATION,
    "p10": P10,
    "p90": P90,
    "peak": PEAK,
}
MAX_AXIAL_DIAMETER = private_code("AXDIAM", "Maximum axial diameter")
MAX_CRANIOCAUDAL_EXTENT = private_code("CCEXT", "Maximum craniocaudal extent")
MAX_3D_DIAMETER = private_code("MAX3D", "Maximum 3D diameter")
EPIDURAL_VOLUME = private_code("EPIVOL", "Epidural tumour volume")

TIME_POINT_BASELINE = CodedConcept("C1442488", "UMLS", "Baseline")  # CID 6146
TIME_POINT_POST_RADIATION = _c(codes.SCT.PostRadiation)  # CID 6146
EVENT_SBRT_START = private_code("SBRTSTART", "Start of stereotactic body radiotherapy")

RESPONSE_EVALUATION = _c(_DCM.ResponseEvaluation)  # (112020, DCM) - in no CID, TID 1411 extensible
RESPONSE_CATEGORIES: dict[ResponseCategory, CodedConcept] = {
    ResponseCategory.LOCAL_CONTROL: private_code("LC", "Local control"),
    ResponseCategory.LOCAL_PROGRESSION: private_code("LP", "Local progression"),
    ResponseCategory.INDETERMINATE: private_code(
        "INDPP", "Indeterminate - possible pseudoprogression"
    ),
    ResponseCategory.NOT_ASSESSABLE: private_code("NA", "Not assessable"),
}
VCF_EVALUATION = private_code("VCF", "Vertebral compression fracture")
VCF_VALUES: dict[str, CodedConcept] = {
    "new": private_code("VCFNEW", "New vertebral compression fracture"),
    "progressive": private_code("VCFPROG", "Progressive vertebral compression fracture"),
    "none": private_code("VCFNONE", "No new or progressive vertebral compression fracture"),
}
EPIDURAL_PROGRESSION = private_code("EPIPROG", "Epidural progression")
PRESENT = _c(codes.SCT.Present)
ABSENT = _c(codes.SCT.Absent)
COMPARABILITY = private_code("CMPAB", "Acquisition comparability")
COMPARABILITY_VALUES: dict[Comparability, CodedConcept] = {
    Comparability.COMPARABLE: private_code("CMPOK", "Comparable acquisition"),
    Comparability.CAUTION: private_code("CMPCAUT", "Acquisition comparable with caution"),
    Comparability.NOT_COMPARABLE: private_code("CMPNOT", "Acquisition not comparable"),
}
PROGRESSION_PROBABILITY = private_code("PPROB", "Probability of local progression")
CHANGE_METHODS: dict[tuple[str, bool], CodedConcept] = {
    ("baseline", True): private_code("CHGREL", "Relative change from baseline"),
    ("baseline", False): private_code("CHGABS", "Absolute change from baseline"),
    ("previous", True): private_code("CHGRELP", "Relative change from previous time point"),
    ("previous", False): private_code("CHGABSP", "Absolute change from previous time point"),
}
#: measurement method of a group of radiomics features of one image
RADIOMICS_METHOD = private_code("RADIOMX", "Radiomics features of one image")


def criterion_code(code: str, description: str) -> CodedConcept:
    """Private concept naming one response criterion (``Criterion.code``)."""
    value = f"CR-{code}" if len(code) <= 13 else f"CR-{_hash_code(code, 13)}"
    return private_code(value, description or code)


def rule_set_code(rule_set: str) -> CodedConcept:
    """Private concept naming a response rule set (used as the group's Measurement Method)."""
    return private_code(f"RSET-{_hash_code(rule_set, 11)}", rule_set)


# --------------------------------------------------------------------------------------------
# Radiomics (IBSI codes where they exist; 99PYRADIOMICS otherwise, as pyradiomics-dcm does)
# --------------------------------------------------------------------------------------------

_IBSI_BY_CODE: dict[str, str] = {
    code: meaning
    for entry in cast(
        "dict[str, dict[str, tuple[str, list[int]]]]", _concepts.get("IBSI", {})
    ).values()
    for code, (meaning, _cids) in entry.items()
}


def ibsi_code(code_value: str, meaning: str | None = None) -> CodedConcept:
    """IBSI concept with its PS3.16 code meaning (e.g. ``RNU0`` -> "Volume of Mesh").

    Codes of the IBSI reference manual that PS3.16 does not list yet (e.g. ``IPH6`` kurtosis)
    take ``meaning`` (the IBSI feature name); without it they are refused.
    """
    if code_value in _IBSI_BY_CODE:
        return CodedConcept(code_value, "IBSI", _IBSI_BY_CODE[code_value])
    if meaning:
        return CodedConcept(code_value, "IBSI", meaning[:64])
    raise ValueError(f"{code_value!r} is not an IBSI code in PS3.16 and no meaning was given")


def pyradiomics_private_code(feature: str) -> CodedConcept:
    """pyradiomics-dcm's private code for a feature without an IBSI code."""
    digest = base64.b64encode(hashlib.sha1(feature.encode("utf-8")).digest()).decode("ascii")
    return CodedConcept(digest[:6], PYRADIOMICS_SCHEME, feature[:64])


def radiomics_feature_code(
    feature: str,
    ibsi_map: Mapping[str, str | Code | CodedConcept] | None = None,
) -> CodedConcept:
    """Concept for a pyradiomics feature name (``original_glcm_Contrast``).

    Parameters
    ----------
    feature : str
        Full pyradiomics feature name (image type prefix, class, feature).
    ibsi_map : Mapping, optional
        pyradiomics name -> IBSI code value (``"ACUI"``) or concept. Keys may be the full name
        or ``class_Feature`` without the image type prefix.
    """
    short = feature.split("_", 1)[1] if feature.startswith("original_") else feature
    if ibsi_map:
        hit = ibsi_map.get(feature, ibsi_map.get(short))
        if isinstance(hit, str):
            return ibsi_code(hit)
        if hit is not None:
            return CodedConcept(hit.value, hit.scheme_designator, hit.meaning)
    return pyradiomics_private_code(feature)
