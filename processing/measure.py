"""Lesion measurements at one time point: volume, diameters, per-map statistics and peak values.

Everything is computed from a binary lesion mask (SimpleITK image, any orientation) and maps on the
same grid. Distances are measured on the voxelised lesion in patient coordinates (mm):

* **volume** = voxel count × voxel volume (mL);
* **maximum 3-D diameter** = largest distance between the corners of ROI voxels (the exact maximum
  extent of the voxelised object);
* **craniocaudal extent** = extent of the voxelised object along the patient S axis;
* **maximum axial diameter** = largest in-plane extent within one axial section. When no image
  axis lies within 8° of the patient S axis (oblique acquisitions), the mask is first resampled
  (nearest neighbour) onto an axial grid at the finest in-plane spacing.

Without resampling, where the maximum axial diameter was measured is recorded
(:class:`processing.results.AxialSection`): the section, the two voxel corners and the lesion's
outline in that section (largest contour of the mask at level 0.5, computed with contourpy), so
that a report can draw them on the source image.

Per-map statistics follow the units of docs/architecture.md, Conventions, and exclude voxels whose
map value is not finite (failed fits). Peak statistics follow the PERCIST idea transferred to MRI
(docs/science.md §1.6): mean of the lowest 10 % for diffusion maps (ADC, MD, IVIM D), and mean of
the hottest 1 cm³ sphere for perfusion maps (Ktrans, vp, IAUC60); the sphere is restricted to lesion
voxels so that neighbouring vessels (aorta, epidural venous plexus) cannot raise a lesion's peak.

References
----------
.. [1] Wahl RL, Jacene H, Kasamon Y, Lodge MA. From RECIST to PERCIST. J Nucl Med 2009;50:122S.
.. [2] Thibault I, et al. Response assessment after SBRT for spinal metastasis (SPINO).
   Lancet Oncol 2015;16:e595-603.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import cast

import contourpy
import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from processing.errors import InputError
from processing.imaging import same_grid
from processing.radiomics import (
    RadiomicsCache,
    RadiomicsError,
    RadiomicsSettings,
    extract_features,
)
from processing.results import QUANTITY_UNITS, AxialSection, LesionMeasurements, MapStatistics

logger = logging.getLogger(__name__)

#: UCUM units of the node's quantities (one table: :data:`processing.results.QUANTITY_UNITS`).
DEFAULT_UNITS: dict[str, str] = QUANTITY_UNITS

#: Maps whose peak is the mean of the lowest fraction of values (low diffusivity = cellular tumour).
LOW_PEAK_QUANTITIES = frozenset({"ADC", "MD", "IVIM_D", "Dapp"})
#: Maps whose peak is the mean of the hottest 1 cm³ sphere (PERCIST SULpeak analogue).
HOT_PEAK_QUANTITIES = frozenset({"Ktrans", "vp", "IAUC60"})

_AXIAL_TOLERANCE_COS = math.cos(math.radians(8.0))


def _roi_array(mask: sitk.Image, label: int) -> np.ndarray:
    if mask.GetDimension() != 3:
        raise ValueError(f"lesion mask must be 3-D, got {mask.GetDimension()}-D")
    roi: np.ndarray = sitk.GetArrayFromImage(mask) == label
    return roi


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return same_grid(a, b, origin_mm=1e-3, spacing_mm=1e-4, direction=1e-4)


def _index_to_physical_matrix(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(M, origin) with physical = origin + M @ [i, j, k] (SimpleITK x, y, z index order)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    return direction @ np.diag(image.GetSpacing()), np.asarray(image.GetOrigin(), dtype=float)


def _voxel_corners(ijk: np.ndarray) -> np.ndarray:
    """Unique corner points (index units, x-y-z order) of the given voxels (N, 3)."""
    offsets = np.array(
        [[dx, dy, dz] for dx in (-0.5, 0.5) for dy in (-0.5, 0.5) for dz in (-0.5, 0.5)]
    )
    corners = (ijk[:, None, :] + offsets[None, :, :]).reshape(-1, 3)
    return np.unique(corners, axis=0)


def _max_distance(points: np.ndarray) -> float:
    """Largest pairwise Euclidean distance (points (N, d)), via the convex hull when possible."""
    return _farthest_pair(points)[0]


def _farthest_pair(points: np.ndarray) -> tuple[float, int, int]:
    """Largest pairwise Euclidean distance of ``points`` (N, d) and the indices of one such pair.

    Via the convex hull when possible; the first pair reaching the maximum (hull order) is
    returned, (0.0, 0, 0) for fewer than two points.
    """
    if len(points) < 2:
        return 0.0, 0, 0
    try:
        vertices = ConvexHull(points).vertices
    except (QhullError, ValueError):  # degenerate (collinear/coplanar) point sets
        vertices = np.arange(len(points))
    hull = points[vertices]
    best, pair = 0.0, (0, 0)
    for start in range(0, len(hull), 512):  # chunks keep memory at 512 x N distances
        diff = hull[start : start + 512, None, :] - hull[None, :, :]
        distances = np.sqrt((diff**2).sum(-1))
        flat = int(distances.argmax())
        value = float(distances.flat[flat])
        if value > best:
            row, column = divmod(flat, len(hull))
            best, pair = value, (int(vertices[start + row]), int(vertices[column]))
    return best, pair[0], pair[1]


def lesion_volume_ml(mask: sitk.Image, *, label: int = 1) -> float:
    """Lesion volume, mL: voxel count × voxel volume (mm³) / 1000."""
    roi = _roi_array(mask, label)
    return float(roi.sum() * np.prod(mask.GetSpacing()) / 1000.0)


def lesion_diameters(mask: sitk.Image, *, label: int = 1) -> tuple[float, float, float]:
    """Maximum axial diameter, craniocaudal extent and maximum 3-D diameter of a lesion, mm.

    Parameters
    ----------
    mask : SimpleITK.Image
        3-D label image; voxels equal to ``label`` are the lesion.
    label : int
        Lesion label.

    Returns
    -------
    max_axial_diameter_mm, craniocaudal_extent_mm, max_3d_diameter_mm : float
        See the module docstring for the definitions. All 0.0 for an empty mask.
    """
    axial, craniocaudal, max_3d, _ = _diameters(mask, label)
    return axial, craniocaudal, max_3d


def _diameters(mask: sitk.Image, label: int) -> tuple[float, float, float, AxialSection | None]:
    """:func:`lesion_diameters` and :func:`axial_section` in one pass."""
    roi = _roi_array(mask, label)
    if not roi.any():
        return 0.0, 0.0, 0.0, None
    matrix, origin = _index_to_physical_matrix(mask)
    # boundary voxels carry every extreme corner
    boundary = roi & ~ndimage.binary_erosion(roi)
    ijk = np.argwhere(boundary)[:, ::-1].astype(float)  # (z, y, x) -> (x, y, z)
    corners = _voxel_corners(ijk) @ matrix.T + origin
    max_3d = _max_distance(corners)
    craniocaudal = float(corners[:, 2].max() - corners[:, 2].min())
    axial, section = _axial_diameter_and_section(mask, roi)
    return axial, craniocaudal, max_3d, section


def axial_section(mask: sitk.Image, *, label: int = 1) -> AxialSection | None:
    """Where the maximum axial diameter of a lesion was measured (see the module docstring).

    Parameters
    ----------
    mask : SimpleITK.Image
        3-D label image; voxels equal to ``label`` are the lesion.
    label : int
        Lesion label.

    Returns
    -------
    processing.results.AxialSection or None
        None for an empty mask, or when no image axis lies within 8° of the patient S axis (the
        diameter is then measured on a resampled mask, whose sections are no image's).
    """
    roi = _roi_array(mask, label)
    if not roi.any():
        return None
    return _axial_diameter_and_section(mask, roi)[1]


def _axial_diameter_and_section(
    mask: sitk.Image, roi: np.ndarray
) -> tuple[float, AxialSection | None]:
    """The maximum axial diameter (mm) and, without resampling, where it was measured."""
    direction = np.asarray(mask.GetDirection(), dtype=float).reshape(3, 3)
    s_components = np.abs(direction[2, :])  # patient S component of each image axis
    axis = int(np.argmax(s_components))
    resampled = False
    if s_components[axis] < _AXIAL_TOLERANCE_COS:
        mask, roi = _resample_axial(mask, roi)
        axis = 2
        resampled = True
    matrix, origin = _index_to_physical_matrix(mask)
    # in-plane boundary: erosion with a structuring element flat along the slice axis
    structure = np.zeros((3, 3, 3), dtype=bool)
    centre: list[slice | int] = [slice(None)] * 3
    centre[2 - axis] = 1  # array axes are (z, y, x)
    structure[tuple(centre)] = ndimage.generate_binary_structure(2, 1)
    boundary = roi & ~ndimage.binary_erosion(roi, structure=structure)
    ijk_all = np.argwhere(boundary)[:, ::-1].astype(float)
    in_plane = [a for a in range(3) if a != axis]
    offsets = np.zeros((4, 3))
    offsets[:, in_plane] = [[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]]
    best = 0.0
    where: tuple[int, np.ndarray, np.ndarray] | None = None
    for level in np.unique(ijk_all[:, axis]):
        in_slice = ijk_all[ijk_all[:, axis] == level]
        corners = np.unique((in_slice[:, None, :] + offsets[None]).reshape(-1, 3), axis=0)
        physical = corners @ matrix.T + origin
        distance, first, second = _farthest_pair(physical[:, :2])
        if distance > best:  # the first section reaching the maximum
            where = (int(level), corners[first], corners[second])
        best = max(best, distance)
    if resampled or where is None:
        return best, None
    level, start, end = where
    outline, area_index = _section_outline(roi, axis, level)
    spacing = mask.GetSpacing()
    area = area_index * float(np.prod([spacing[a] for a in in_plane]))

    def to_patient(points: np.ndarray) -> tuple[tuple[float, float, float], ...]:
        return tuple(_point(p) for p in points @ matrix.T + origin)

    ends_patient = to_patient(np.stack([start, end]))
    return best, AxialSection(
        slice_axis=axis,
        slice_index=level,
        diameter_mm=best,
        diameter_end_points_index=(_point(start), _point(end)),
        diameter_end_points=(ends_patient[0], ends_patient[1]),
        outline_index=tuple(_point(p) for p in outline),
        outline=to_patient(outline),
        area_mm2=area,
    )


def _point(values: np.ndarray) -> tuple[float, float, float]:
    return float(values[0]), float(values[1]), float(values[2])


def _section_outline(roi: np.ndarray, axis: int, level: int) -> tuple[np.ndarray, float]:
    """Largest contour (level 0.5) of the ROI in one section, and its area in index units.

    Parameters
    ----------
    roi : numpy.ndarray
        Boolean ROI, array order (z, y, x).
    axis : int
        SimpleITK index axis normal to the section.
    level : int
        Index of the section along ``axis``.

    Returns
    -------
    outline : numpy.ndarray
        (N, 3) closed polygon (last point = first point) in continuous SimpleITK indices
        (x, y, z), on the ROI voxels' centres' grid (a boundary between an inside and an outside
        voxel lies half-way between their centres).
    area : float
        Area enclosed by the polygon, in (index units)².
    """
    section = np.take(roi, level, axis=2 - axis).astype(float)
    # the 2-D array's columns run along the lower in-plane SimpleITK axis, its rows the higher
    in_plane = [a for a in range(3) if a != axis]
    padded = np.pad(section, 1)  # every contour closes inside the padded section
    generator = contourpy.contour_generator(z=padded, line_type=contourpy.LineType.Separate)
    lines = cast(list[np.ndarray], generator.lines(0.5))
    best_line: np.ndarray | None = None
    best_area = -1.0
    for line in lines:
        xy = np.asarray(line, dtype=float) - 1.0  # undo the padding
        if len(xy) < 3:
            continue
        if not np.array_equal(xy[0], xy[-1]):
            xy = np.vstack([xy, xy[:1]])
        x, y = xy[:, 0], xy[:, 1]
        area = 0.5 * abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])))
        if area > best_area:
            best_line, best_area = xy, area
    if best_line is None:  # pragma: no cover - a non-empty section always has a contour
        raise ValueError(f"no outline in section {level} along axis {axis}")
    points = np.zeros((len(best_line), 3))
    points[:, in_plane[0]] = best_line[:, 0]
    points[:, in_plane[1]] = best_line[:, 1]
    points[:, axis] = level
    return points, best_area


def _resample_axial(mask: sitk.Image, roi: np.ndarray) -> tuple[sitk.Image, np.ndarray]:
    """Nearest-neighbour resampling of the ROI onto an identity-direction (axial) grid."""
    roi_image = sitk.GetImageFromArray(roi.astype(np.uint8))
    roi_image.CopyInformation(mask)
    matrix, origin = _index_to_physical_matrix(mask)
    size = np.asarray(mask.GetSize(), dtype=float)
    corners = (
        np.array(
            [
                [i, j, k]
                for i in (-0.5, size[0] - 0.5)
                for j in (-0.5, size[1] - 0.5)
                for k in (-0.5, size[2] - 0.5)
            ]
        )
        @ matrix.T
        + origin
    )
    spacing = float(min(mask.GetSpacing()))
    low, high = corners.min(0), corners.max(0)
    new_size = [int(math.ceil((h - lo) / spacing)) for lo, h in zip(low, high)]
    out = sitk.Resample(
        roi_image,
        new_size,
        sitk.Transform(),
        sitk.sitkNearestNeighbor,
        tuple(low + spacing / 2),
        (spacing,) * 3,
        (1, 0, 0, 0, 1, 0, 0, 0, 1),
        0,
        sitk.sitkUInt8,
    )
    return out, sitk.GetArrayFromImage(out) > 0


def lowest_fraction_mean(values: np.ndarray, *, fraction: float = 0.10) -> float:
    """Mean of the lowest ``fraction`` of values (at least one value), map units."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    values = np.sort(np.asarray(values, dtype=float).ravel())
    if values.size == 0:
        raise ValueError("no values")
    n = max(1, int(math.ceil(fraction * values.size)))
    return float(values[:n].mean())


def hottest_sphere_mean(
    image: sitk.Image, mask: sitk.Image, *, volume_ml: float = 1.0, label: int = 1
) -> float:
    """Mean value in the hottest sphere of ``volume_ml`` centred on a lesion voxel, map units.

    The sphere (1 cm³: radius 6.20 mm) is intersected with the lesion and with finite map values.
    Centres whose sphere holds fewer than half the sphere's voxels are not considered unless no
    centre reaches that, in which case those with the most voxels are (lesions below ~0.5 cm³
    then yield their best-covered sphere, which approaches the lesion mean).
    """
    if volume_ml <= 0:
        raise ValueError(f"volume_ml must be > 0, got {volume_ml}")
    if not _same_grid(image, mask):
        raise ValueError("map and mask must be on the same grid")
    roi = _roi_array(mask, label)
    values = sitk.GetArrayFromImage(image).astype(float)
    valid = roi & np.isfinite(values)
    if not valid.any():
        raise ValueError("no finite map value inside the lesion")
    radius = (3.0 * volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)  # mm
    sx, sy, sz = mask.GetSpacing()
    rz, ry, rx = (int(math.ceil(radius / s)) for s in (sz, sy, sx))
    zz, yy, xx = np.mgrid[-rz : rz + 1, -ry : ry + 1, -rx : rx + 1]
    kernel = ((zz * sz) ** 2 + (yy * sy) ** 2 + (xx * sx) ** 2 <= radius**2).astype(float)
    # crop to the lesion's bounding box plus the kernel radius
    idx = np.argwhere(valid)
    lo = np.maximum(idx.min(0) - (rz, ry, rx), 0)
    hi = np.minimum(idx.max(0) + (rz, ry, rx) + 1, valid.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    v = np.where(valid[box], values[box], 0.0)
    w = valid[box].astype(float)
    total = ndimage.convolve(v, kernel, mode="constant", cval=0.0)
    count = ndimage.convolve(w, kernel, mode="constant", cval=0.0)
    centres = roi[box] & (count > 0)
    needed = min(0.5 * kernel.sum(), count[centres].max())
    candidates = centres & (count >= needed - 1e-9)
    return float((total[candidates] / count[candidates]).max())


def map_statistics(
    image: sitk.Image, mask: sitk.Image, quantity: str, *, unit: str | None = None, label: int = 1
) -> MapStatistics:
    """Mean, median, SD (population), 10th/90th percentiles and the peak of a map in a lesion.

    Parameters
    ----------
    image : SimpleITK.Image
        The quantitative map, on the mask's grid, in the units of docs/architecture.md, Conventions;
        non-finite values are excluded (failed fits).
    mask : SimpleITK.Image
        Lesion label image.
    quantity : str
        Quantity name (``ADC``, ``Ktrans``...); decides the peak statistic.
    unit : str, optional
        UCUM unit; default from :data:`DEFAULT_UNITS`.

    Raises
    ------
    ValueError
        Different grids.
    InputError
        No finite value in the lesion (e.g. a map whose fit failed there).
    """
    if not _same_grid(image, mask):
        raise ValueError(f"{quantity} map and lesion mask are not on the same grid")
    roi = _roi_array(mask, label)
    values = sitk.GetArrayFromImage(image).astype(float)[roi]
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise InputError(f"no finite {quantity} value inside the lesion")
    peak: float | None = None
    definition: str | None = None
    if quantity in LOW_PEAK_QUANTITIES:
        peak = lowest_fraction_mean(values, fraction=0.10)
        definition = "mean of the lowest 10 % of lesion voxels"
    elif quantity in HOT_PEAK_QUANTITIES:
        peak = hottest_sphere_mean(image, mask, volume_ml=1.0, label=label)
        definition = (
            "mean of the hottest 1 cm3 sphere (radius 6.2 mm) centred in the lesion, "
            "restricted to lesion voxels"
        )
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return MapStatistics(
        quantity=quantity,
        unit=unit or DEFAULT_UNITS.get(quantity, "1"),
        n_voxels=int(values.size),
        mean=float(values.mean()),
        median=float(median),
        sd=float(values.std()),
        p10=float(p10),
        p90=float(p90),
        peak=peak,
        peak_definition=definition,
    )


def measure_lesion(
    mask: sitk.Image,
    maps: Mapping[str, sitk.Image] | None = None,
    *,
    label: int = 1,
    units: Mapping[str, str] | None = None,
    epidural_mask: sitk.Image | None = None,
    radiomics_settings: Mapping[str, RadiomicsSettings] | None = None,
    radiomics_cache: RadiomicsCache | None = None,
) -> LesionMeasurements:
    """Everything measured on one lesion at one time point.

    Parameters
    ----------
    mask : SimpleITK.Image
        Lesion label image.
    maps : mapping of str to SimpleITK.Image, optional
        Quantity name -> map on the mask's grid.
    units : mapping, optional
        Overrides of :data:`DEFAULT_UNITS`.
    epidural_mask : SimpleITK.Image, optional
        Label image of the epidural component (same label); its volume is reported.
    radiomics_settings : mapping of str to RadiomicsSettings, optional
        The course's radiomics settings per quantity; quantities without settings get no
        radiomics. Failures are recorded in ``radiomics_notes``, not raised; so is a map with no
        finite value inside the lesion (its statistics and radiomics are left out).
    radiomics_cache : RadiomicsCache, optional
        Preprocessing shared with other measurements of the same maps (e.g. of perturbed ROIs,
        see :func:`processing.change.perturbation_repeatability`); by default one cache serves
        the maps of this call. Results are identical with or without it.

    Returns
    -------
    LesionMeasurements
    """
    maps = dict(maps or {})
    units = dict(units or {})
    volume = lesion_volume_ml(mask, label=label)
    if volume == 0.0:
        raise ValueError(f"lesion mask has no voxel with label {label}")
    axial, craniocaudal, max_3d, section = _diameters(mask, label)
    stats = {}
    notes: list[str] = []
    for q, img in sorted(maps.items()):
        try:
            stats[q] = map_statistics(img, mask, q, unit=units.get(q), label=label)
        except InputError as err:
            # one map without a usable value in the lesion (its fit failed there) leaves the
            # others measured; the quantity is reported as not measured
            notes.append(f"{q}: not measured: {err}")
            logger.warning("%s not measured: %s", q, err)
    radiomics: dict[str, dict[str, float]] = {}
    cache = radiomics_cache or RadiomicsCache()
    for quantity, settings in sorted((radiomics_settings or {}).items()):
        if quantity not in stats:
            continue
        try:
            result = extract_features(maps[quantity], mask, settings, label=label, cache=cache)
        except RadiomicsError as err:
            notes.append(f"{quantity}: radiomics not computed: {err}")
            logger.warning("radiomics for %s not computed: %s", quantity, err)
            continue
        radiomics[quantity] = dict(result.features)
        notes.extend(f"{quantity}: {n}" for n in result.notes)
    epidural = None
    if epidural_mask is not None:
        epidural = lesion_volume_ml(epidural_mask, label=label)
    return LesionMeasurements(
        volume_ml=volume,
        max_axial_diameter_mm=axial,
        max_craniocaudal_extent_mm=craniocaudal,
        max_3d_diameter_mm=max_3d,
        epidural_volume_ml=epidural,
        map_statistics=stats,
        radiomics=radiomics,
        radiomics_notes=tuple(notes),
        axial_section=section,
    )
