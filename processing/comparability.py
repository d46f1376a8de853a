"""Can a follow-up acquisition be compared with the baseline one? Per quantity, with reasons.

Functional MRI numbers depend on how they were acquired: ADC on the b-values, Ktrans on the field
strength (T10, r1), the temporal resolution and the contrast injection, texture on the voxel size
(docs/science.md §2.5: protocol-identity flags with every delta). :func:`assess_comparability`
compares two :class:`AcquisitionProtocol` summaries and returns, for every quantity of the node
(``ADC``, ``MK``, ``Ktrans``..., ``volume``, ``radiomics``), whether its change is
:attr:`~processing.results.Comparability.COMPARABLE`, to be read with ``CAUTION`` or
``NOT_COMPARABLE`` (then the delta is flagged, not reported as a finding), plus the reasons.

Rules (thresholds are keyword arguments of :func:`assess_comparability`):

=================  ======================================================  ========================
difference          affected quantities                                     verdict
=================  ======================================================  ========================
field strength      DCE (T10, r1 depend on B0), T1/T2 intensities,          not comparable
(> 0.1 T)           radiomics; diffusion, kep                               caution
b-values            diffusion (ADC, IVIM, DKI): same b_max (±10 %)          caution
                    b_max differs more / DWI missing in one study           not comparable
DCE temporal        Ktrans, ve, vp, kep, IAUC60, TTP: ratio > 1.2           caution
resolution          ratio > 2, or either > 10 s, or DCE missing             not comparable
voxel size          volume and diameters: any axis differs > 25 %           caution
                    radiomics: > 25 %: caution; voxel volume ratio > 3      not comparable
                    diffusion (DWI voxels differ > 25 %)                    caution
fat suppression     diffusion (DWI technique differs), DCE (SPGR            caution
                    technique differs; up to 35 % T1 bias)
contrast timing     agent differs: DCE caution; injection rate differs      caution
                    > 30 %, or injection delay after DCE start differs
                    > 15 s: Ktrans, vp, IAUC60, TTP
=================  ======================================================  ========================

References
----------
.. [1] QIBA Profile: Diffusion-Weighted Magnetic Resonance Imaging (DWI), RSNA QIBA 2019:
   ADC depends on the b-values used and must be acquired with one protocol for change measurement.
.. [2] Yankeelov T.E., Gore J.C., "Dynamic contrast enhanced magnetic resonance imaging in
   oncology: theory, data acquisition, analysis, and examples", Curr Med Imaging Rev 2009;3:91-107:
   temporal resolution, T10 and the arterial input function drive Ktrans and ve.
.. [3] Zwanenburg A. et al., "The Image Biomarker Standardization Initiative", Radiology 2020;
   295:328-338: texture features depend on voxel size and resampling.
.. [4] docs/science.md §2.5 and §3.3 (protocol-identity flags with every delta; fat saturation
   biases SPGR T1 by up to 35 %).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from processing.results import Comparability
from processing.series import SeriesVolume

logger = logging.getLogger(__name__)

DIFFUSION_QUANTITIES = ("ADC", "MD", "MK", "Kapp", "Dapp", "IVIM_D", "IVIM_f", "IVIM_Dstar")
DCE_QUANTITIES = ("Ktrans", "ve", "vp", "kep", "T1", "IAUC60", "TTP")
ANATOMICAL_QUANTITIES = ("volume", "diameter", "T2w", "T1w")
ALL_QUANTITIES = (*DIFFUSION_QUANTITIES, *DCE_QUANTITIES, *ANATOMICAL_QUANTITIES, "radiomics")

_RANK = {Comparability.COMPARABLE: 0, Comparability.CAUTION: 1, Comparability.NOT_COMPARABLE: 2}


@dataclass(frozen=True)
class AcquisitionProtocol:
    """What matters for comparability of one study's acquisitions.

    Attributes
    ----------
    field_strength_t : float | None
        Magnetic field strength (T), (0018,0087).
    dwi_b_values : tuple of float
        Distinct b-values of the DWI series (s/mm²); empty when there is no DWI.
    dwi_voxel_mm, anatomical_voxel_mm, dce_voxel_mm : tuple of 3 floats | None
        Voxel sizes (mm; x, y, z) of the DWI, the anatomical reference and the DCE series.
    dwi_fat_suppression, dce_fat_suppression : str | None
        Fat suppression technique (``STIR``, ``SPAIR``, ``SPIR``, ``FAT_SAT``, ``WATER_EXCITATION``,
        ``DIXON``, ``NONE``); None when unknown.
    dce_temporal_resolution_s : float | None
        Time between DCE phases (s); None when there is no DCE.
    contrast_agent : str | None
        Contrast/bolus agent (0018,0010).
    contrast_flow_rate_ml_s : float | None
        Injection rate (mL/s), (0018,1046).
    contrast_injection_delay_s : float | None
        Injection start after the first DCE phase (s): the pre-contrast baseline length.
    """

    field_strength_t: float | None = None
    dwi_b_values: tuple[float, ...] = ()
    dwi_voxel_mm: tuple[float, float, float] | None = None
    anatomical_voxel_mm: tuple[float, float, float] | None = None
    dce_voxel_mm: tuple[float, float, float] | None = None
    dwi_fat_suppression: str | None = None
    dce_fat_suppression: str | None = None
    dce_temporal_resolution_s: float | None = None
    contrast_agent: str | None = None
    contrast_flow_rate_ml_s: float | None = None
    contrast_injection_delay_s: float | None = None

    def __post_init__(self) -> None:
        if self.field_strength_t is not None and not 0 < self.field_strength_t <= 20:
            raise ValueError(f"field_strength_t must be in (0, 20] T, got {self.field_strength_t}")
        if any(b < 0 for b in self.dwi_b_values):
            raise ValueError(f"b-values must be >= 0 s/mm2, got {self.dwi_b_values}")
        if self.dce_temporal_resolution_s is not None and self.dce_temporal_resolution_s <= 0:
            raise ValueError(
                f"dce_temporal_resolution_s must be > 0 s, got {self.dce_temporal_resolution_s}"
            )
        for name in ("dwi_voxel_mm", "anatomical_voxel_mm", "dce_voxel_mm"):
            value = getattr(self, name)
            if value is not None and (len(value) != 3 or any(v <= 0 for v in value)):
                raise ValueError(f"{name} must be three positive sizes in mm, got {value}")


@dataclass(frozen=True)
class ComparabilityAssessment:
    """Verdict per quantity, overall verdict and the reasons.

    ``overall`` is the worst verdict over the quantities measurable in both studies; quantities that
    one study cannot provide (series missing) are ``NOT_COMPARABLE`` in ``per_quantity`` and listed
    in ``reasons`` but do not make the whole time point non-comparable.
    """

    overall: Comparability
    reasons: tuple[str, ...]
    per_quantity: Mapping[str, Comparability] = field(default_factory=dict)

    def of(self, quantity: str) -> Comparability:
        """Verdict for a quantity name or dotted change path.

        ``ADC.mean`` → ``ADC``; ``radiomics.ADC.original_glcm_Contrast`` → worst of ``radiomics``
        and ``ADC``; ``max_axial_diameter_mm`` and other diameters → ``diameter``; unknown names are
        comparable.
        """
        parts = quantity.split(".")
        names = [parts[0]]
        if parts[0] == "radiomics" and len(parts) > 1:
            names.append(parts[1])
        if "diameter" in parts[0] or "extent" in parts[0]:
            names = ["diameter"]
        if parts[0].startswith("volume") or parts[0].endswith("volume_ml"):
            names = ["volume"]
        verdicts = [self.per_quantity.get(n, Comparability.COMPARABLE) for n in names]
        return max(verdicts, key=_RANK.__getitem__)

    def is_comparable(self, quantity: str) -> bool:
        """False when the change of ``quantity`` must be flagged (``Change.comparable``)."""
        return self.of(quantity) is not Comparability.NOT_COMPARABLE

    @property
    def affected(self) -> tuple[str, ...]:
        """Quantities with CAUTION or NOT_COMPARABLE."""
        return tuple(q for q, v in self.per_quantity.items() if v is not Comparability.COMPARABLE)


class _Verdicts:
    def __init__(self) -> None:
        self.per_quantity: dict[str, Comparability] = {
            q: Comparability.COMPARABLE for q in ALL_QUANTITIES
        }
        self.reasons: list[str] = []
        self.missing: set[str] = set()

    def flag(self, quantities: Sequence[str], verdict: Comparability, reason: str) -> None:
        for q in quantities:
            if _RANK[verdict] > _RANK[self.per_quantity[q]]:
                self.per_quantity[q] = verdict
        self.reasons.append(f"{reason} -> {verdict.value}: {', '.join(quantities)}")


def _relative_difference(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b)) if max(abs(a), abs(b)) > 0 else 0.0


def _voxel_differences(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, float]:
    """(largest relative per-axis difference, voxel volume ratio ≥ 1)."""
    axis = max(_relative_difference(x, y) for x, y in zip(a, b))
    va, vb = a[0] * a[1] * a[2], b[0] * b[1] * b[2]
    return axis, max(va, vb) / min(va, vb)


def _norm(text: str | None) -> str | None:
    return text.strip().upper() if text else None


def assess_comparability(
    baseline: AcquisitionProtocol,
    follow_up: AcquisitionProtocol,
    *,
    field_strength_tolerance_t: float = 0.1,
    b_max_tolerance: float = 0.10,
    temporal_resolution_caution_ratio: float = 1.2,
    temporal_resolution_limit_ratio: float = 2.0,
    max_temporal_resolution_s: float = 10.0,
    voxel_axis_tolerance: float = 0.25,
    voxel_volume_limit_ratio: float = 3.0,
    flow_rate_tolerance: float = 0.30,
    injection_delay_tolerance_s: float = 15.0,
) -> ComparabilityAssessment:
    """Compare the baseline and follow-up acquisitions quantity by quantity.

    Parameters
    ----------
    baseline, follow_up : AcquisitionProtocol
        Acquisition summaries of the two studies.
    field_strength_tolerance_t : float
        Largest B0 difference (T) still considered the same field strength.
    b_max_tolerance : float
        Relative difference of the largest b-value below which differing b-value sets only call for
        caution.
    temporal_resolution_caution_ratio, temporal_resolution_limit_ratio : float
        Ratios (slower/faster, ≥ 1) of DCE temporal resolutions from which DCE quantities get
        ``CAUTION`` / ``NOT_COMPARABLE``.
    max_temporal_resolution_s : float
        A DCE slower than this (s) in either study is not comparable.
    voxel_axis_tolerance : float
        Relative per-axis voxel size difference above which volumes and radiomics get ``CAUTION``.
    voxel_volume_limit_ratio : float
        Voxel volume ratio above which radiomics are ``NOT_COMPARABLE``.
    flow_rate_tolerance : float
        Relative injection-rate difference above which bolus-shape quantities get ``CAUTION``.
    injection_delay_tolerance_s : float
        Difference (s) of injection delay after DCE start above which they get ``CAUTION``.

    Returns
    -------
    ComparabilityAssessment
    """
    v = _Verdicts()
    caution, not_comparable = Comparability.CAUTION, Comparability.NOT_COMPARABLE

    # field strength
    b0, b1 = baseline.field_strength_t, follow_up.field_strength_t
    if b0 is not None and b1 is not None and abs(b0 - b1) > field_strength_tolerance_t:
        text = f"field strength {b0:g} T vs {b1:g} T"
        v.flag(
            ("Ktrans", "ve", "vp", "T1", "IAUC60", "T2w", "T1w", "radiomics"), not_comparable, text
        )
        v.flag((*DIFFUSION_QUANTITIES, "kep"), caution, text)
    elif b0 is None or b1 is None:
        v.reasons.append("field strength unknown in one study: not checked")

    # diffusion weighting
    bv0, bv1 = sorted(set(baseline.dwi_b_values)), sorted(set(follow_up.dwi_b_values))
    if not bv0 or not bv1:
        v.flag(
            DIFFUSION_QUANTITIES,
            not_comparable,
            f"DWI missing at {'baseline' if not bv0 else 'follow-up'}",
        )
        v.missing.update(DIFFUSION_QUANTITIES)
    elif len(bv0) != len(bv1) or any(
        abs(x - y) > max(1.0, 0.01 * max(x, y)) for x, y in zip(bv0, bv1)
    ):
        text = f"b-values {bv0} vs {bv1} s/mm2"
        if _relative_difference(max(bv0), max(bv1)) <= b_max_tolerance:
            v.flag(DIFFUSION_QUANTITIES, caution, text)
        else:
            v.flag(DIFFUSION_QUANTITIES, not_comparable, text + " (different b_max)")

    # DCE timing
    dce_timing = ("Ktrans", "ve", "vp", "kep", "IAUC60", "TTP")
    t0, t1 = baseline.dce_temporal_resolution_s, follow_up.dce_temporal_resolution_s
    if t0 is None or t1 is None:
        v.flag(
            DCE_QUANTITIES,
            not_comparable,
            f"DCE missing at {'baseline' if t0 is None else 'follow-up'}",
        )
        v.missing.update(DCE_QUANTITIES)
    else:
        ratio = max(t0, t1) / min(t0, t1)
        text = f"DCE temporal resolution {t0:.1f} s vs {t1:.1f} s"
        if ratio > temporal_resolution_limit_ratio or max(t0, t1) > max_temporal_resolution_s:
            v.flag(dce_timing, not_comparable, text)
        elif ratio > temporal_resolution_caution_ratio:
            v.flag(dce_timing, caution, text)

    # voxel sizes
    if baseline.anatomical_voxel_mm and follow_up.anatomical_voxel_mm:
        axis, ratio = _voxel_differences(
            baseline.anatomical_voxel_mm, follow_up.anatomical_voxel_mm
        )
        text = (
            f"anatomical voxel {baseline.anatomical_voxel_mm} vs {follow_up.anatomical_voxel_mm} mm"
        )
        if ratio > voxel_volume_limit_ratio:
            v.flag(("radiomics",), not_comparable, text)
            v.flag(("volume", "diameter"), caution, text)
        elif axis > voxel_axis_tolerance:
            v.flag(("volume", "diameter", "radiomics"), caution, text)
    if baseline.dwi_voxel_mm and follow_up.dwi_voxel_mm:
        axis, _ = _voxel_differences(baseline.dwi_voxel_mm, follow_up.dwi_voxel_mm)
        if axis > voxel_axis_tolerance:
            v.flag(
                DIFFUSION_QUANTITIES,
                caution,
                f"DWI voxel {baseline.dwi_voxel_mm} vs {follow_up.dwi_voxel_mm} mm",
            )
    if baseline.dce_voxel_mm and follow_up.dce_voxel_mm:
        axis, _ = _voxel_differences(baseline.dce_voxel_mm, follow_up.dce_voxel_mm)
        if axis > voxel_axis_tolerance:
            v.flag(
                DCE_QUANTITIES,
                caution,
                f"DCE voxel {baseline.dce_voxel_mm} vs {follow_up.dce_voxel_mm} mm",
            )

    # fat suppression
    f0, f1 = _norm(baseline.dwi_fat_suppression), _norm(follow_up.dwi_fat_suppression)
    if f0 and f1 and f0 != f1:
        v.flag(DIFFUSION_QUANTITIES, caution, f"DWI fat suppression {f0} vs {f1}")
    f0, f1 = _norm(baseline.dce_fat_suppression), _norm(follow_up.dce_fat_suppression)
    if f0 and f1 and f0 != f1:
        v.flag(DCE_QUANTITIES, caution, f"DCE fat suppression {f0} vs {f1}")

    # contrast injection
    if t0 is not None and t1 is not None:
        a0, a1 = _norm(baseline.contrast_agent), _norm(follow_up.contrast_agent)
        if a0 and a1 and a0 != a1:
            v.flag(DCE_QUANTITIES, caution, f"contrast agent {a0} vs {a1}")
        r0, r1 = baseline.contrast_flow_rate_ml_s, follow_up.contrast_flow_rate_ml_s
        bolus = ("Ktrans", "vp", "IAUC60", "TTP")
        if r0 and r1 and _relative_difference(r0, r1) > flow_rate_tolerance:
            v.flag(bolus, caution, f"injection rate {r0:g} vs {r1:g} mL/s")
        d0, d1 = baseline.contrast_injection_delay_s, follow_up.contrast_injection_delay_s
        if d0 is not None and d1 is not None and abs(d0 - d1) > injection_delay_tolerance_s:
            v.flag(bolus, caution, f"injection {d0:.0f} s vs {d1:.0f} s after DCE start")

    measured = [q for q in ALL_QUANTITIES if q not in v.missing]
    overall = max(
        (v.per_quantity[q] for q in measured),
        key=_RANK.__getitem__,
        default=Comparability.COMPARABLE,
    )
    assessment = ComparabilityAssessment(
        overall=overall, reasons=tuple(v.reasons), per_quantity=dict(v.per_quantity)
    )
    logger.info("comparability %s (%d reasons)", overall.value, len(v.reasons))
    return assessment


def fat_suppression(ds: Dataset) -> str | None:
    """Fat suppression technique of an MR acquisition from standard attributes (best effort).

    Enhanced MR: SpectrallySelectedSuppression (0018,9025) ``FAT``/``WATER_FAT``; classic:
    ScanOptions (0018,0022) ``FS``/``SFS`` (spectral fat sat), ``WE`` (water excitation), and an
    inversion recovery (ScanningSequence ``IR``) with TI < 250 ms at ≤ 3 T is taken as STIR.
    Returns None when nothing is recorded.
    """
    selected = str(ds.get("SpectrallySelectedSuppression", "") or "").upper()
    if selected in ("FAT", "WATER_FAT", "FAT_AND_WATER"):
        return "FAT_SAT"
    scanning = ds.get("ScanningSequence", "")
    scanning = [
        str(s).upper()
        for s in (scanning if isinstance(scanning, (MultiValue, list)) else [scanning])
    ]
    ti = ds.get("InversionTime")
    if "IR" in scanning and ti not in (None, "") and float(ti) < 250.0:
        return "STIR"
    options = ds.get("ScanOptions", "")
    options = {
        str(s).upper() for s in (options if isinstance(options, (MultiValue, list)) else [options])
    }
    if options & {"FS", "SFS", "FAT_SAT"}:
        return "FAT_SAT"
    if "WE" in options:
        return "WATER_EXCITATION"
    if selected == "NONE" or "ScanOptions" in ds:
        return "NONE"
    return None


def voxel_size_mm(ds: Dataset) -> tuple[float, float, float] | None:
    """Voxel size (mm; column spacing, row spacing, slice) from PixelSpacing and
    SpacingBetweenSlices (else SliceThickness); None when absent."""
    spacing = ds.get("PixelSpacing")
    thickness = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness")
    if not spacing or not thickness:
        return None
    return float(spacing[1]), float(spacing[0]), float(thickness)


def protocol_from_datasets(
    *,
    anatomical: Dataset | None = None,
    dwi: Dataset | None = None,
    dce: Dataset | None = None,
    dwi_b_values: Sequence[float] = (),
    dce_temporal_resolution_s: float | None = None,
    contrast_injection_delay_s: float | None = None,
) -> AcquisitionProtocol:
    """Build an :class:`AcquisitionProtocol` from one representative dataset per series.

    b-values and DCE timing come from the series reader (they need all instances and vendor
    private tags); this function only reads what one header carries (field strength, voxel size,
    fat suppression, contrast agent and rate). Where DCE timing is not given, TemporalResolution
    (0020,0110, ms) of the DCE header is used if present.
    """
    headers = [d for d in (anatomical, dwi, dce) if d is not None]
    field_strength = None
    for header in headers:
        value = header.get("MagneticFieldStrength")
        if value not in (None, ""):
            field_strength = float(value)
            break
    if dce is not None and dce_temporal_resolution_s is None:
        value = dce.get("TemporalResolution")
        if value not in (None, ""):
            dce_temporal_resolution_s = float(value) / 1000.0
    agent = rate = None
    if dce is not None:
        agent = str(dce.get("ContrastBolusAgent", "") or "").strip() or None
        value = dce.get("ContrastFlowRate")
        if value not in (None, ""):
            rate = float(value[0] if isinstance(value, MultiValue) else value)
    return AcquisitionProtocol(
        field_strength_t=field_strength,
        dwi_b_values=tuple(float(b) for b in dwi_b_values),
        dwi_voxel_mm=voxel_size_mm(dwi) if dwi is not None else None,
        anatomical_voxel_mm=voxel_size_mm(anatomical) if anatomical is not None else None,
        dce_voxel_mm=voxel_size_mm(dce) if dce is not None else None,
        dwi_fat_suppression=fat_suppression(dwi) if dwi is not None else None,
        dce_fat_suppression=fat_suppression(dce) if dce is not None else None,
        dce_temporal_resolution_s=dce_temporal_resolution_s,
        contrast_agent=agent,
        contrast_flow_rate_ml_s=rate,
        contrast_injection_delay_s=contrast_injection_delay_s,
    )


_FAT_SUPPRESSION_FROM_SERIES = {"spectral": "FAT_SAT", "inversion": "STIR"}


def protocol_from_series(
    *,
    anatomical: SeriesVolume | None = None,
    dwi: SeriesVolume | None = None,
    dce: SeriesVolume | None = None,
    contrast_flow_rate_ml_s: float | None = None,
    contrast_injection_delay_s: float | None = None,
) -> AcquisitionProtocol:
    """Build an :class:`AcquisitionProtocol` from series read
    by :func:`processing.series.read_series`.

    b-values: the distinct b-values of the DWI volumes (s/mm², rounded to 1); DCE temporal
    resolution: the median interval between consecutive volume times (s); voxel sizes from the
    series geometry; fat suppression from the acquisition physics (``spectral`` → ``FAT_SAT``,
    ``inversion`` → ``STIR``, none recorded → ``NONE``).
    """
    series = [s for s in (anatomical, dwi, dce) if s is not None]
    field_strength = next(
        (s.physics.field_strength for s in series if s.physics.field_strength), None
    )

    def fat(s: SeriesVolume | None) -> str | None:
        if s is None:
            return None
        return _FAT_SUPPRESSION_FROM_SERIES.get(s.physics.fat_suppression or "", "NONE")

    def voxel(s: SeriesVolume | None) -> tuple[float, float, float] | None:
        if s is None:
            return None
        sx, sy, sz = s.geometry.spacing
        return float(sx), float(sy), float(sz)

    b_values: tuple[float, ...] = ()
    if dwi is not None:
        finite = [round(float(b)) for b in dwi.b_values if np.isfinite(b)]
        b_values = tuple(float(b) for b in sorted(set(finite)))
    temporal_resolution = None
    if dce is not None:
        times = np.array([v.time for v in dce.volumes if v.time is not None], dtype=float)
        if times.size >= 2:
            temporal_resolution = float(np.median(np.diff(np.sort(times))))
    return AcquisitionProtocol(
        field_strength_t=field_strength,
        dwi_b_values=b_values,
        dwi_voxel_mm=voxel(dwi),
        anatomical_voxel_mm=voxel(anatomical),
        dce_voxel_mm=voxel(dce),
        dwi_fat_suppression=fat(dwi),
        dce_fat_suppression=fat(dce),
        dce_temporal_resolution_s=temporal_resolution,
        contrast_agent=dce.physics.contrast_agent if dce is not None else None,
        contrast_flow_rate_ml_s=contrast_flow_rate_ml_s,
        contrast_injection_delay_s=contrast_injection_delay_s,
    )
