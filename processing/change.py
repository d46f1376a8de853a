"""Change of each measured quantity from the baseline and from the previous time point.

Every change is flagged as beyond or within measurement repeatability, a relative repeatability
coefficient (RC, 95 %) that combines two independent sources (:mod:`processing.repeatability`,
docs/science.md §2.6):

* the **published test-retest** coefficient of the quantity, where one exists
  (:data:`processing.repeatability.PUBLISHED`: GTV volume 10.9 %, ADC 12.9 %, Ktrans and the
  other DCE parameters 38.5 %);
* the **per-case segmentation** coefficient: the spread of the quantity under small perturbations
  of the ROI, computed from the images of the case by :func:`perturbation_repeatability` (erosion
  and dilation by one voxel, shifts by one voxel along each image axis), turned into a coefficient
  as for test-retest data: ``RC = 1.96 * sqrt(2) * SD / |value|`` (Bland-Altman; QIBA, Raunig et
  al. 2015), SD over the original and perturbed ROIs, and never less than the largest relative
  deviation a single perturbation produced (a one-voxel misplacement of the ROI is within
  registration error, so a change of that size is not called real).

``RC = sqrt(RC_test_retest² + RC_segmentation²)``; either part alone when the other is missing.

Quantities are addressed by dotted paths (see :class:`processing.results.Change`): ``volume``,
``max_axial_diameter``, ``max_craniocaudal_extent``, ``max_3d_diameter``, ``epidural_volume``,
``ADC.mean``, ``Ktrans.peak``, ``radiomics.ADC.original_glcm_Contrast``.

References
----------
.. [1] Raunig DL, et al. Quantitative imaging biomarkers: a review of statistical methods for
   technical performance assessment. Stat Methods Med Res 2015;24:27-67.
.. [2] Initial step towards a quantitative MRI-based framework for response assessment of spinal
   metastases after SBRT. Neurosurgery 2021 (PMID 34392364): GTV volume MDD 10.9 %.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from processing.measure import measure_lesion
from processing.radiomics import RadiomicsCache, RadiomicsSettings
from processing.repeatability import PUBLISHED, RC_FACTOR, Repeatability, repeatability_of
from processing.results import Change, LesionMeasurements

logger = logging.getLogger(__name__)

#: Minimum detectable difference of GTV volume after spine SBRT (relative), docs/science.md §1.3.
VOLUME_MDC = PUBLISHED["volume"].coefficient


#: Statistics of each map that enter the change table.
MAP_STATISTICS = ("mean", "median", "sd", "p10", "p90", "peak")


def flatten_measurements(
    measurements: LesionMeasurements, *, include_radiomics: bool = True
) -> dict[str, float]:
    """Dotted-path view of every scalar in a :class:`LesionMeasurements` (``None`` left out)."""
    out: dict[str, float] = {"volume": measurements.volume_ml}
    for name in ("max_axial_diameter", "max_craniocaudal_extent", "max_3d_diameter"):
        value = getattr(measurements, f"{name}_mm")
        if value is not None:
            out[name] = float(value)
    if measurements.epidural_volume_ml is not None:
        out["epidural_volume"] = float(measurements.epidural_volume_ml)
    for quantity, stats in measurements.map_statistics.items():
        for stat in MAP_STATISTICS:
            value = getattr(stats, stat)
            if value is not None:
                out[f"{quantity}.{stat}"] = float(value)
    if include_radiomics:
        for quantity, features in measurements.radiomics.items():
            for feature, value in features.items():
                out[f"radiomics.{quantity}.{feature}"] = float(value)
    return out


def quantity_change(
    quantity: str,
    reference: str,
    reference_value: float,
    value: float,
    *,
    repeatability: float | Repeatability | None,
    comparable: bool = True,
) -> Change:
    """One :class:`Change`; ``relative`` is ``None`` when the reference value is 0.

    Parameters
    ----------
    quantity : str
        Dotted path of the quantity.
    reference : {"baseline", "previous"}
        Which time point the change is taken from.
    reference_value, value : float
        The quantity at the reference and current time points (same units).
    repeatability : float, Repeatability or None
        Relative repeatability coefficient (fraction), or the combined coefficient with its
        parts (:func:`processing.repeatability.repeatability_of`); ``None`` if unknown.
    comparable : bool
        False when the acquisitions are not comparable for this quantity.
    """
    if reference not in ("baseline", "previous"):
        raise ValueError(f"reference must be 'baseline' or 'previous', got {reference!r}")
    parts = (
        repeatability
        if isinstance(repeatability, Repeatability)
        else Repeatability(repeatability, None, None)
    )
    absolute = value - reference_value
    relative = absolute / abs(reference_value) if reference_value != 0 else None
    beyond = None
    if parts.combined is not None and relative is not None:
        beyond = bool(abs(relative) > parts.combined)
    return Change(
        quantity=quantity,
        reference=reference,
        reference_value=float(reference_value),
        value=float(value),
        absolute=float(absolute),
        relative=relative,
        repeatability=parts.combined,
        beyond_repeatability=beyond,
        comparable=comparable,
        repeatability_test_retest=parts.test_retest,
        repeatability_segmentation=parts.segmentation,
    )


def compute_changes(
    current: LesionMeasurements,
    baseline: LesionMeasurements | None,
    previous: LesionMeasurements | None = None,
    *,
    repeatability: Mapping[str, float] | None = None,
    not_comparable: Iterable[str] = (),
    include_radiomics: bool = True,
    published_repeatability: bool = True,
) -> tuple[Change, ...]:
    """Changes of every quantity present at both time points, from baseline and from previous.

    Parameters
    ----------
    current, baseline, previous : LesionMeasurements
        Measurements at the current, baseline and previous time points; ``previous`` is omitted
        when it is the baseline itself.
    repeatability : mapping of str to float, optional
        Per-case segmentation coefficient per dotted quantity (from
        :func:`perturbation_repeatability`); combined with the published test-retest coefficient
        of each quantity (:func:`processing.repeatability.repeatability_of`). Volume and
        epidural volume use the published :data:`VOLUME_MDC` alone.
    published_repeatability : bool
        False: leave the published test-retest coefficients out (but the volumes'), as response
        rule set 1.0 was recorded.
    not_comparable : iterable of str
        Quantities (dotted paths, or map names such as ``ADC`` for all its statistics and
        features) whose acquisitions are not comparable; their changes carry ``comparable=False``.
    """
    segmentation = dict(repeatability or {})
    blocked = set(not_comparable)

    def is_comparable(path: str) -> bool:
        parts = path.split(".")
        names = {path, parts[0], parts[1] if parts[0] == "radiomics" and len(parts) > 1 else ""}
        return not (names & blocked)

    now = flatten_measurements(current, include_radiomics=include_radiomics)
    changes: list[Change] = []
    for label, ref in (("baseline", baseline), ("previous", previous)):
        if ref is None:
            continue
        before = flatten_measurements(ref, include_radiomics=include_radiomics)
        for path in sorted(set(now) & set(before)):
            changes.append(
                quantity_change(
                    path,
                    label,
                    before[path],
                    now[path],
                    repeatability=repeatability_of(
                        path, segmentation, published=published_repeatability
                    ),
                    comparable=is_comparable(path),
                )
            )
    return tuple(changes)


def _perturbed_masks(roi: np.ndarray, shift_voxels: int) -> list[tuple[str, np.ndarray]]:
    out = [("erode", ndimage.binary_erosion(roi)), ("dilate", ndimage.binary_dilation(roi))]
    for axis, name in ((2, "x"), (1, "y"), (0, "z")):
        for sign in (-1, 1):
            shifted = np.roll(roi, sign * shift_voxels, axis=axis)
            edge = [slice(None)] * 3
            edge[axis] = slice(0, shift_voxels) if sign > 0 else slice(-shift_voxels, None)
            shifted[tuple(edge)] = False  # np.roll wraps; drop what wrapped round
            out.append((f"shift {'+' if sign > 0 else '-'}{shift_voxels} {name}", shifted))
    return [(name, m) for name, m in out if m.any()]


def perturbation_repeatability(
    mask: sitk.Image,
    maps: Mapping[str, sitk.Image] | None = None,
    *,
    label: int = 1,
    radiomics_settings: Mapping[str, RadiomicsSettings] | None = None,
    shift_voxels: int = 1,
    measure: Callable[..., LesionMeasurements] = measure_lesion,
    radiomics_cache: RadiomicsCache | None = None,
) -> dict[str, float]:
    """Per-case relative MDC of every quantity, from the spread under small ROI perturbations.

    The lesion is measured on the original ROI and on 8 perturbed ROIs (erosion and dilation by
    one voxel with a 6-connected element; shifts by ``shift_voxels`` along ±x, ±y, ±z), with the
    same maps and radiomics settings. For each quantity, ``MDC = max(1.96·√2·SD, max |v_p - v|)
    / |v|`` with SD over the 9 values and ``v_p`` the perturbed values (see module docstring).
    Volume gets the published :data:`VOLUME_MDC` instead (erosion/dilation would dominate it).

    ``measure`` is called as ``measure(mask, maps, label=..., radiomics_settings=...,
    radiomics_cache=...)``; one :class:`processing.radiomics.RadiomicsCache` serves the 9
    measurements, so that each map is cast and interpolated once (once per fill value of its
    undefined voxels) and each ROI is interpolated once per grid. Pass the cache that served
    the measurement of the original ROI (``measure_lesion(..., radiomics_cache=...)`` with the
    same mask, maps and settings objects) as ``radiomics_cache`` to reuse its radiomics.

    Returns
    -------
    dict
        Dotted quantity path -> relative MDC (fraction). Quantities whose original value is 0 are
        left out.
    """
    if shift_voxels < 1:
        raise ValueError(f"shift_voxels must be >= 1, got {shift_voxels}")
    roi = sitk.GetArrayFromImage(mask) == label
    if not roi.any():
        raise ValueError(f"lesion mask has no voxel with label {label}")
    cache = radiomics_cache or RadiomicsCache()
    original = flatten_measurements(
        measure(
            mask, maps, label=label, radiomics_settings=radiomics_settings, radiomics_cache=cache
        )
    )
    samples: dict[str, list[float]] = {k: [v] for k, v in original.items()}
    for name, perturbed in _perturbed_masks(roi, shift_voxels):
        image = sitk.GetImageFromArray(perturbed.astype(np.uint8))
        image.CopyInformation(mask)
        try:
            flat = flatten_measurements(
                measure(
                    image,
                    maps,
                    label=1,
                    radiomics_settings=radiomics_settings,
                    radiomics_cache=cache,
                )
            )
        except ValueError as err:  # e.g. a perturbation that empties the ROI
            logger.info("ROI perturbation %s not measurable: %s", name, err)
            continue
        for key, value in flat.items():
            if key in samples:
                samples[key].append(value)
    out: dict[str, float] = {}
    for key, values in samples.items():
        ref = original[key]
        if ref == 0 or len(values) < 3 or not np.all(np.isfinite(values)):
            continue
        spread = RC_FACTOR * np.std(values, ddof=1)
        largest = np.max(np.abs(np.asarray(values) - ref))
        out[key] = float(max(spread, largest) / abs(ref))
    out["volume"] = VOLUME_MDC
    return out
