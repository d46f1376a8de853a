"""Quality check of the node's ADC against the scanner's own ADC map of the same study.

When a study holds a scanner-computed ADC series (:attr:`processing.classify.SeriesRole.ADC_MAP`,
Image Type ``ADC``), :func:`compare_with_scanner_adc` resamples it onto the grid of the node's ADC
(SimpleITK, linear) and reports the median difference, absolute (mm²/s) and relative, over the
whole tissue (the node's valid ADC voxels where the scanner map has a positive value) and in the
tumour (the lesion mask, when given). The scanner's values are brought to mm²/s by
:func:`scanner_adc_mm2_s` (its Real World Value Mapping, else the vendors' 10^-6 mm²/s
convention), and the result says how. A difference reflects different b-values, estimator,
noise handling or registration between series, not necessarily an error: the result is information
for the reader, not a gate.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from processing.classify import SeriesRole, classify_volume
from processing.errors import InputError
from processing.series import Geometry, SeriesVolume

logger = logging.getLogger(__name__)

__all__ = [
    "AdcQaError",
    "AdcQaRegion",
    "AdcQaResult",
    "compare_images",
    "compare_with_scanner_adc",
    "find_scanner_adc",
    "scanner_adc_image",
    "scanner_adc_mm2_s",
    "scanner_adc_qa",
]

#: UCUM units of a scanner ADC map -> factor to mm²/s (Real World Value Mapping units).
_ADC_UNIT_FACTORS = {
    "mm2/s": 1.0,
    "um2/s": 1e-6,
    "10-6.mm2/s": 1e-6,
    "10^-6.mm2/s": 1e-6,
    "10-3.mm2/s": 1e-3,
    "10^-3.mm2/s": 1e-3,
    "m2/s": 1e6,
}


def scanner_adc_mm2_s(volume: SeriesVolume, first: Dataset | None = None) -> tuple[np.ndarray, str]:
    """Values of a scanner ADC series (role ``ADC_MAP``) in mm²/s, and how they were scaled.

    ``volume.array`` already holds modality values (Rescale Slope/Intercept applied). Their unit:

    1. Real World Value Mapping of ``first`` (or of its first frame's functional groups): the
       mapping (slope/intercept on stored values) and its Measurement Units (UCUM ``mm2/s``,
       ``um2/s``, ``10-6.mm2/s``, ``10-3.mm2/s``) are used when present;
    2. otherwise the vendors' common convention: Siemens, GE, Philips, Canon and UIH store ADC
       maps as integers in 10⁻⁶ mm²/s (e.g. 800 for 0.8·10⁻³ mm²/s), so values are multiplied
       by 10⁻⁶ — unless the tissue values are already below 0.01 (a float map in mm²/s), left as
       they are.

    Returns
    -------
    values : numpy.ndarray
        float64 array shaped like ``volume.array[0]`` (first volume) in mm²/s.
    note : str
        One line saying which rule was applied (for provenance).
    """
    data = np.asarray(volume.array[0], dtype=np.float64)
    rwvm = None
    if first is not None:
        rwvm = first.get("RealWorldValueMappingSequence")
        if not rwvm:
            for key in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
                groups = first.get(key)
                if groups and groups[0].get("RealWorldValueMappingSequence"):
                    rwvm = groups[0].RealWorldValueMappingSequence
                    break
    if rwvm:
        assert first is not None  # rwvm is only ever read from `first`
        item = rwvm[0]
        units = item.get("MeasurementUnitsCodeSequence")
        code = str(units[0].get("CodeValue", "")) if units else ""
        factor = _ADC_UNIT_FACTORS.get(code.replace("²", "2").replace("μ", "u"))
        slope = item.get("RealWorldValueSlope")
        if factor is not None and slope is not None:
            stored = data
            rescale_slope = float(first.get("RescaleSlope", 1.0) or 1.0)
            rescale_intercept = float(first.get("RescaleIntercept", 0.0) or 0.0)
            stored = (data - rescale_intercept) / rescale_slope
            real = stored * float(slope) + float(item.get("RealWorldValueIntercept", 0.0) or 0.0)
            return real * factor, f"Real World Value Mapping, unit {code} (x{factor:g} to mm2/s)"
    positive = data[data > 0]
    if positive.size and float(np.median(positive)) < 0.01:
        return data, "values already in mm2/s (median below 0.01)"
    return data * 1e-6, (
        "no Real World Value Mapping: vendor convention, stored in 1e-6 mm2/s "
        f"({volume.physics.manufacturer or 'unknown manufacturer'})"
    )


class AdcQaError(InputError):
    """The scanner ADC cannot be compared (no overlap, empty map, wrong shape)."""


@dataclass(frozen=True)
class AdcQaRegion:
    """Agreement in one region.

    Attributes
    ----------
    n_voxels : int
        Voxels compared (node ADC valid, scanner ADC > 0 after resampling).
    median_node, median_scanner : float
        Median ADC (mm²/s) of each map over those voxels.
    median_difference : float
        Median of node - scanner (mm²/s).
    median_relative_difference : float
        Median of (node - scanner) / scanner.
    """

    n_voxels: int
    median_node: float
    median_scanner: float
    median_difference: float
    median_relative_difference: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_voxels": self.n_voxels,
            "median_node_mm2_s": self.median_node,
            "median_scanner_mm2_s": self.median_scanner,
            "median_difference_mm2_s": self.median_difference,
            "median_relative_difference": self.median_relative_difference,
        }


@dataclass(frozen=True)
class AdcQaResult:
    """The node's ADC against the scanner's ADC.

    Attributes
    ----------
    scanner_series_instance_uid : str
    scanner_scaling : str
        How the scanner's stored values were brought to mm²/s (:func:`scanner_adc_mm2_s`).
    tissue : AdcQaRegion
        Whole tissue: every valid voxel of the node's ADC the scanner map covers.
    tumour : AdcQaRegion or None
        Inside the lesion mask (None without a mask or without overlap).
    method : str
    """

    scanner_series_instance_uid: str
    scanner_scaling: str
    tissue: AdcQaRegion
    tumour: AdcQaRegion | None
    method: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "scanner_series_instance_uid": self.scanner_series_instance_uid,
            "scanner_scaling": self.scanner_scaling,
            "method": self.method,
            "tissue": self.tissue.to_dict(),
            "tumour": None if self.tumour is None else self.tumour.to_dict(),
        }


def find_scanner_adc(volumes: Iterable[SeriesVolume]) -> SeriesVolume | None:
    """The first scanner ADC series (role ``ADC_MAP``, Image Type ``ADC``) of a study, if any."""
    for volume in volumes:
        if classify_volume(volume).role is SeriesRole.ADC_MAP:
            return volume
    return None


def scanner_adc_image(volume: SeriesVolume, first: Dataset | None = None) -> tuple[sitk.Image, str]:
    """The scanner ADC series as a SimpleITK image in mm²/s, and how it was scaled.

    ``first`` is a dataset of the series (its Real World Value Mapping gives the unit; see
    :func:`scanner_adc_mm2_s`).
    """
    values, scaling = scanner_adc_mm2_s(volume, first)
    return volume.geometry.image(np.asarray(values, dtype=np.float64)), scaling


def _region(
    node: NDArray[np.float64], scanner: NDArray[np.float64], sel: NDArray[np.bool_]
) -> AdcQaRegion | None:
    if not sel.any():
        return None
    a, s = node[sel], scanner[sel]
    return AdcQaRegion(
        n_voxels=int(sel.sum()),
        median_node=float(np.median(a)),
        median_scanner=float(np.median(s)),
        median_difference=float(np.median(a - s)),
        median_relative_difference=float(np.median((a - s) / s)),
    )


def compare_with_scanner_adc(
    node_adc: NDArray[np.floating[Any]],
    node_valid: NDArray[np.bool_],
    node_geometry: Geometry,
    scanner: sitk.Image,
    *,
    scanner_scaling: str = "values in mm2/s",
    tumour_mask: NDArray[np.bool_] | None = None,
    scanner_series_instance_uid: str = "",
) -> AdcQaResult:
    """Median difference between the node's ADC and a scanner ADC map, in tissue and tumour.

    Parameters
    ----------
    node_adc : ndarray, shape (z, y, x)
        The node's ADC (mm²/s) on `node_geometry`.
    node_valid : ndarray of bool, shape (z, y, x)
        Valid voxels of the node's ADC.
    node_geometry : Geometry
    scanner : SimpleITK.Image
        The scanner's ADC map in mm²/s (:func:`scanner_adc_image`), any grid.
    scanner_scaling : str, optional
        How its stored values were brought to mm²/s (recorded in the result).
    tumour_mask : ndarray of bool, shape (z, y, x), optional
        Lesion mask on `node_geometry`.
    scanner_series_instance_uid : str, optional

    Returns
    -------
    AdcQaResult

    Raises
    ------
    AdcQaError
        Shapes disagree, the scanner map has no positive value, or the maps do not overlap.
    """
    node = np.asarray(node_adc, dtype=np.float64)
    valid = np.asarray(node_valid, dtype=bool) & np.isfinite(node)
    if node.shape != tuple(reversed(node_geometry.size)) or valid.shape != node.shape:
        raise AdcQaError(
            f"node ADC shape {node.shape} does not match its grid "
            f"{tuple(reversed(node_geometry.size))}"
        )
    scaled = sitk.Cast(scanner, sitk.sitkFloat64)
    values = sitk.GetArrayViewFromImage(scaled)
    if not np.any(np.isfinite(values) & (values > 0)):
        raise AdcQaError("the scanner ADC map has no positive value")
    reference = node_geometry.image(node)
    on_grid = sitk.GetArrayFromImage(
        sitk.Resample(
            scaled, reference, sitk.Transform(), sitk.sitkLinear, float("nan"), sitk.sitkFloat64
        )
    )
    covered = valid & np.isfinite(on_grid) & (on_grid > 0)
    tissue = _region(node, on_grid, covered)
    if tissue is None:
        raise AdcQaError("the scanner ADC map does not overlap the node's valid ADC voxels")
    tumour = None
    if tumour_mask is not None:
        mask = np.asarray(tumour_mask, dtype=bool)
        if mask.shape != node.shape:
            raise AdcQaError(f"tumour mask shape {mask.shape} differs from the ADC {node.shape}")
        tumour = _region(node, on_grid, covered & mask)
    method = (
        "scanner ADC resampled onto the node's ADC grid "
        "(SimpleITK linear, physical coordinates); medians over the node's valid voxels "
        "with a positive scanner value (tissue) and inside the lesion mask (tumour)"
    )
    logger.info(
        "ADC QA vs scanner series %s: tissue median relative difference %+.1f %% over %d voxels",
        scanner_series_instance_uid,
        100 * tissue.median_relative_difference,
        tissue.n_voxels,
    )
    return AdcQaResult(
        scanner_series_instance_uid=scanner_series_instance_uid,
        scanner_scaling=scanner_scaling,
        tissue=tissue,
        tumour=tumour,
        method=method,
    )


def compare_images(
    node_adc: sitk.Image,
    scanner: sitk.Image,
    *,
    scanner_scaling: str = "values in mm2/s",
    tumour_mask: sitk.Image | None = None,
    scanner_series_instance_uid: str = "",
) -> AdcQaResult:
    """:func:`compare_with_scanner_adc` for SimpleITK images (the analysis chain's form).

    Parameters
    ----------
    node_adc : SimpleITK.Image
        The node's ADC (mm²/s); non-finite voxels are invalid.
    scanner : SimpleITK.Image
        The scanner's ADC in mm²/s (:func:`scanner_adc_image`).
    scanner_scaling : str, optional
        How its stored values were brought to mm²/s.
    tumour_mask : SimpleITK.Image, optional
        Lesion mask on any grid; resampled onto the ADC grid by nearest neighbour.
    scanner_series_instance_uid : str, optional
    """
    values = sitk.GetArrayFromImage(node_adc).astype(np.float64)
    geometry = Geometry(
        origin=tuple(node_adc.GetOrigin()),
        spacing=tuple(node_adc.GetSpacing()),
        direction=tuple(node_adc.GetDirection()),
        size=cast("tuple[int, int, int]", tuple(int(s) for s in node_adc.GetSize())),
    )
    mask = None
    if tumour_mask is not None:
        on_grid = sitk.Resample(
            sitk.Cast(tumour_mask > 0, sitk.sitkUInt8),
            node_adc,
            sitk.Transform(),
            sitk.sitkNearestNeighbor,
            0,
            sitk.sitkUInt8,
        )
        mask = sitk.GetArrayFromImage(on_grid).astype(bool)
    return compare_with_scanner_adc(
        values,
        np.isfinite(values),
        geometry,
        scanner,
        scanner_scaling=scanner_scaling,
        tumour_mask=mask,
        scanner_series_instance_uid=scanner_series_instance_uid,
    )


def scanner_adc_qa(
    node_adc: sitk.Image | None,
    scanner: SeriesVolume,
    first: Dataset | None = None,
    *,
    tumour_mask: sitk.Image | None = None,
) -> dict[str, Any]:
    """The QA result of a study as a JSON-ready dict (``spine-node maps`` and the chain).

    Parameters
    ----------
    node_adc : SimpleITK.Image or None
        The node's ADC (mm²/s; non-finite voxels invalid); None when it computed none.
    scanner : SeriesVolume
        The study's scanner ADC series (:func:`find_scanner_adc`).
    first : pydicom Dataset, optional
        A dataset of that series (its Real World Value Mapping gives the unit).
    tumour_mask : SimpleITK.Image, optional
        Lesion mask on any grid.

    Returns
    -------
    dict
        :meth:`AdcQaResult.to_dict`, or ``{"scanner_series_instance_uid", "error"}`` when the
        comparison is impossible (no node ADC, no overlap...).
    """
    uid = scanner.series_instance_uid
    if node_adc is None:
        return {"scanner_series_instance_uid": uid, "error": "the node computed no ADC"}
    try:
        image, scaling = scanner_adc_image(scanner, first)
        return compare_images(
            node_adc,
            image,
            scanner_scaling=scaling,
            tumour_mask=tumour_mask,
            scanner_series_instance_uid=uid,
        ).to_dict()
    except AdcQaError as err:
        logger.warning("ADC QA vs scanner series %s impossible: %s", uid, err)
        return {"scanner_series_instance_uid": uid, "error": str(err)}
