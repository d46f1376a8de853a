"""Image helpers of the analysis: grids, crops, masks and non-finite voxels (SimpleITK images).

These are the small geometric operations the analysis chain (:mod:`node.chain`) performs between
the science steps: deciding whether two images share an acquisition grid, bringing a map onto the
anatomical grid, cropping around the lesion before measurements and radiomics, grouping maps by
the grid they were fitted on, and the masks derived from RT contours (a dilated cord contour, the
lesion's part inside it). They hold no DICOM and no policy beyond the tolerances documented here.

Tolerances: two grids are the same when their sizes are equal and their origins (mm), spacings
(mm) and direction cosines agree to 1e-3, 1e-4 and 1e-5 — well below a voxel and below the
rounding of the values DICOM writers store (see docs/architecture.md, "Science conventions").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from processing.registration import resample_mask, resample_onto

__all__ = [
    "CROP_MARGIN_MM",
    "GridKey",
    "crop_to_lesion",
    "dilate_mm",
    "fill_non_finite",
    "grid_groups",
    "grid_key",
    "is_sagittal",
    "mask_intersection",
    "on_grid",
    "same_grid",
]

#: margin kept around the lesion for measurements and radiomics (mm): beyond the 1 cm³ peak
#: sphere, the perturbation shifts and the resampling kernel
CROP_MARGIN_MM = 20.0

#: an image's grid, rounded so that grids equal up to the tolerances compare equal:
#: (size, origin, spacing, direction)
GridKey = tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...], tuple[float, ...]]

#: (lesion mask, {quantity: map}) on one acquisition grid
GridGroup = tuple[sitk.Image, dict[str, sitk.Image]]


def _rounded(values: Sequence[float], decimals: int) -> tuple[float, ...]:
    return tuple(float(v) for v in np.round(np.asarray(values, dtype=np.float64), decimals))


def grid_key(image: sitk.Image) -> GridKey:
    """A hashable key of ``image``'s grid: size, and origin / spacing / direction rounded.

    Parameters
    ----------
    image : SimpleITK.Image

    Returns
    -------
    GridKey
        ``(size, origin rounded to 1e-3 mm, spacing rounded to 1e-4 mm, direction rounded to
        1e-5)``; images on the same grid have equal keys.
    """
    return (
        tuple(int(n) for n in image.GetSize()),
        _rounded(image.GetOrigin(), 3),
        _rounded(image.GetSpacing(), 4),
        _rounded(image.GetDirection(), 5),
    )


def same_grid(
    image: sitk.Image,
    reference: sitk.Image,
    *,
    origin_mm: float = 1e-3,
    spacing_mm: float = 1e-4,
    direction: float = 1e-5,
) -> bool:
    """``image`` and ``reference`` have the same size, origin, spacing and direction.

    Compared with absolute tolerances: origins to ``origin_mm`` (default 1e-3 mm), spacings to
    ``spacing_mm`` (1e-4 mm), direction cosines to ``direction`` (1e-5).
    """
    return bool(
        image.GetSize() == reference.GetSize()
        and np.allclose(image.GetOrigin(), reference.GetOrigin(), atol=origin_mm)
        and np.allclose(image.GetSpacing(), reference.GetSpacing(), atol=spacing_mm)
        and np.allclose(image.GetDirection(), reference.GetDirection(), atol=direction)
    )


def on_grid(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """``image`` as 32-bit float on ``reference``'s grid.

    An image already on the grid (:func:`same_grid`) is only cast; otherwise it is resampled
    (linear interpolation, identity transform) and voxels outside its field of view are NaN.
    """
    if same_grid(image, reference):
        cast: sitk.Image = sitk.Cast(image, sitk.sitkFloat32)
        return cast
    return resample_onto(sitk.Cast(image, sitk.sitkFloat32), reference, default_value=float("nan"))


def fill_non_finite(image: sitk.Image) -> sitk.Image:
    """``image`` with its non-finite voxels (failed fits, outside the field of view) set to the
    median of its finite voxels (0 when none is finite); the image itself when all are finite.
    """
    values = sitk.GetArrayFromImage(image)
    bad = ~np.isfinite(values)
    if not bad.any():
        return image
    values = values.copy()
    values[bad] = float(np.median(values[~bad])) if (~bad).any() else 0.0
    out = sitk.GetImageFromArray(values)
    out.CopyInformation(image)
    return out


def crop_to_lesion(
    image: sitk.Image, mask: sitk.Image, *, margin_mm: float = CROP_MARGIN_MM
) -> sitk.Image:
    """``image`` (on the mask's grid) cropped to the lesion's bounding box plus a margin.

    Radiomics resample to a fine isotropic grid; doing that on the whole field of view costs
    minutes per map for nothing.

    Parameters
    ----------
    image : SimpleITK.Image
        On the grid of ``mask``.
    mask : SimpleITK.Image
        The lesion: voxels > 0.
    margin_mm : float
        Kept on every side of the bounding box, in mm (rounded up to whole voxels per axis and
        clipped at the image border).

    Returns
    -------
    SimpleITK.Image
        The cropped region (its origin moves with it); ``image`` itself when the mask is empty.
    """
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    if not stats.HasLabel(1):
        return image
    box = stats.GetBoundingBox(1)
    dim = mask.GetDimension()
    start = [int(v) for v in box[:dim]]
    size = [int(v) for v in box[dim:]]
    for axis in range(dim):
        pad = int(np.ceil(margin_mm / mask.GetSpacing()[axis]))
        lo = max(0, start[axis] - pad)
        hi = min(int(mask.GetSize()[axis]), start[axis] + size[axis] + pad)
        start[axis], size[axis] = lo, hi - lo
    cropped: sitk.Image = sitk.RegionOfInterest(image, size, start)
    return cropped


def grid_groups(
    anatomy: sitk.Image, lesion_mask: sitk.Image, maps: Mapping[str, sitk.Image]
) -> list[GridGroup]:
    """(lesion mask, maps) per acquisition grid, each cropped around the lesion.

    Quantitative maps are measured on the grid they were fitted on (the lesion mask resampled onto
    it, linear interpolation >= 0.5), not interpolated onto the anatomical grid: interpolating a
    map mixes tumour and marrow values at the lesion's edge. A map whose grid holds no lesion voxel
    (a lesion smaller than its voxels) falls back to the anatomical grid (:func:`on_grid`).

    Parameters
    ----------
    anatomy : SimpleITK.Image
        The anatomical reference image (the lesion mask's grid).
    lesion_mask : SimpleITK.Image
        The lesion on the anatomical grid.
    maps : mapping of str to SimpleITK.Image
        Quantity -> map, each on its own grid.

    Returns
    -------
    list of (SimpleITK.Image, dict)
        The anatomical grid's group first (volume and diameters come from it), then one group per
        other grid in the order the maps first name it; masks and maps cropped with
        :func:`crop_to_lesion`.
    """
    anatomy_key = grid_key(anatomy)
    by_grid: dict[GridKey, dict[str, sitk.Image]] = {anatomy_key: {}}
    references = {anatomy_key: anatomy}
    for quantity, image in maps.items():
        key = grid_key(image)
        references.setdefault(key, image)
        by_grid.setdefault(key, {})[quantity] = image
    groups: list[GridGroup] = []
    anatomy_maps: dict[str, sitk.Image] = {}
    for key, grid_maps in by_grid.items():
        if key == anatomy_key:
            anatomy_maps.update(grid_maps)
            continue
        mask = resample_mask(lesion_mask, references[key])
        if not sitk.GetArrayViewFromImage(mask).any():
            anatomy_maps.update({q: on_grid(m, anatomy) for q, m in grid_maps.items()})
            continue
        groups.append(
            (crop_to_lesion(mask, mask), {q: crop_to_lesion(m, mask) for q, m in grid_maps.items()})
        )
    first: GridGroup = (
        crop_to_lesion(lesion_mask, lesion_mask),
        {q: crop_to_lesion(m, lesion_mask) for q, m in anatomy_maps.items()},
    )
    return [first, *groups]


def mask_intersection(mask: sitk.Image, other: sitk.Image) -> sitk.Image:
    """The voxels > 0 in both masks (same grid), as an 8-bit 0/1 image."""
    both: sitk.Image = sitk.And(
        sitk.Cast(mask > 0, sitk.sitkUInt8), sitk.Cast(other > 0, sitk.sitkUInt8)
    )
    return both


def dilate_mm(mask: sitk.Image, margin_mm: float) -> sitk.Image:
    """A 0/1 mask dilated by about ``margin_mm`` (a ball of at least one voxel per axis).

    The radius per axis is ``margin_mm`` divided by the spacing, rounded, and at least 1 voxel.
    """
    radius = [max(1, int(round(margin_mm / sp))) for sp in mask.GetSpacing()]
    dilated: sitk.Image = sitk.BinaryDilate(mask, radius, sitk.sitkBall, 0, 1)
    return dilated


def is_sagittal(direction: Sequence[float]) -> bool:
    """The slice normal of a grid with this direction (9 cosines, row-major) runs left-right.

    Parameters
    ----------
    direction : sequence of float
        The 3x3 direction matrix, row-major (SimpleITK / :class:`processing.series.Geometry`
        order): its third column is the slice normal.
    """
    normal = np.asarray(direction, dtype=np.float64).reshape(3, 3)[:, 2]
    return bool(abs(normal[0]) > 0.8)
