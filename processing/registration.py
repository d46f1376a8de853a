"""Rigid registration of a follow-up study to the baseline, and resampling between grids.

The follow-up anatomical reference (moving) is registered to the baseline one (fixed) with a rigid
(Euler 3-D) transform, Mattes mutual information and a multi-resolution regular-step gradient
descent (SimpleITK ``ImageRegistrationMethod``). The metric is evaluated only inside the treated
vertebral region of the baseline (a vertebra or GTV mask, or its bounding box enlarged by a margin),
so the rest of a flexible spine does not pull the solution away from the lesion.

Conventions
-----------
* SimpleITK's transform maps **fixed (baseline) points to moving (follow-up) points** (LPS, mm);
  that is what :func:`SimpleITK.Resample` needs to bring the follow-up onto the baseline grid.
* :attr:`RigidRegistration.matrix_moving_to_fixed` is the 4×4 homogeneous matrix mapping follow-up
  LPS coordinates (mm) to baseline LPS coordinates, i.e. the Frame of Reference Transformation
  Matrix (3006,00C6) of a DICOM Spatial Registration object whose registered frame is the baseline's
  (PS3.3 C.20.2.1.1; PS3.17 "Spatial Registration").

With thick slices the position along the slice normal is poorly determined; when series of
several orientations exist (axial and sagittal), :func:`register_rigid_multi` registers each pair
and fuses the translations by the in-plane/through-plane precision of each series.

Quality: the final Mattes mutual information (nats; larger is better) and, when vertebral-body masks
of both studies are given, their Dice overlap after registration (pass when ≥ ``min_dice``); without
masks, the overlap of Otsu foregrounds within the region is used as a proxy.

References
----------
.. [1] Mattes D. et al., "PET-CT image registration in the chest using free-form deformations",
   IEEE TMI 2003;22:120-128.
.. [2] Lowekamp B. et al., "The design of SimpleITK", Front. Neuroinform. 2013;7:45.
.. [3] DICOM PS3.3 C.20.2 Spatial Registration Module.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import SimpleITK as sitk

from processing.errors import FitError

logger = logging.getLogger(__name__)


class RegistrationError(FitError):
    """The registration could not be set up or did not converge to a usable transform."""


@dataclass(frozen=True)
class RegistrationSettings:
    """Settings of the rigid registration (all lengths in mm).

    Attributes
    ----------
    margin_mm : float
        Margin added around the bounding box of the region mask (mm).
    histogram_bins : int
        Mattes MI histogram bins.
    sampling_fraction : float
        Fraction of region voxels sampled per iteration (0 < f ≤ 1; random, fixed seed).
    max_samples : int
        Upper bound of the metric samples per iteration (the fraction is lowered for large
        regions; keeps fine-grid registrations to seconds).
    shrink_factors, smoothing_sigmas_mm :
        Multi-resolution pyramid (shrink factors and Gaussian sigmas in mm, coarse → fine).
    learning_rate_mm, min_step_mm, iterations :
        Regular-step gradient descent: initial step (mm of physical shift), minimum step, maximum
        iterations per level.
    min_dice : float
        Pass threshold of the vertebral-body overlap (Dice, 0-1).
    restart_offsets_mm : tuple of float
        When the first and the careful run both fail their check, careful runs from the initial
        position shifted by these distances along the fixed image's slice normal (mm); the
        passing one with the highest overlap is kept. (On the randomised phantom cohorts two
        follow-ups of 299 slid 11-28 mm along the spine, to a look-alike position, overlap
        0.43-0.72, where the true shift was 3-6 mm; both calls on them were wrong.)
    seed : int
        Seed of the metric sampling (determinism).
    """

    margin_mm: float = 40.0
    histogram_bins: int = 50
    sampling_fraction: float = 0.5
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas_mm: tuple[float, ...] = (2.0, 1.0, 0.0)
    learning_rate_mm: float = 2.0
    min_step_mm: float = 1e-3
    iterations: int = 300
    min_dice: float = 0.8
    restart_offsets_mm: tuple[float, ...] = (-10.0, 10.0, -20.0, 20.0)
    seed: int = 20240601
    max_samples: int = 40_000

    def __post_init__(self) -> None:
        if self.margin_mm < 0:
            raise ValueError(f"margin_mm must be >= 0, got {self.margin_mm}")
        if not 0 < self.sampling_fraction <= 1:
            raise ValueError(f"sampling_fraction must be in (0, 1], got {self.sampling_fraction}")
        if len(self.shrink_factors) != len(self.smoothing_sigmas_mm) or not self.shrink_factors:
            raise ValueError(
                "shrink_factors and smoothing_sigmas_mm must have the same, non-zero length"
            )
        if not 0 <= self.min_dice <= 1:
            raise ValueError(f"min_dice must be in [0, 1], got {self.min_dice}")
        if self.max_samples < 1000:
            raise ValueError(f"max_samples must be >= 1000, got {self.max_samples}")
        if self.histogram_bins < 8:
            raise ValueError(f"histogram_bins must be >= 8, got {self.histogram_bins}")


@dataclass(frozen=True)
class RigidRegistration:
    """Result of :func:`register_rigid`.

    Attributes
    ----------
    transform : SimpleITK.Euler3DTransform
        Fixed (baseline) → moving (follow-up) point mapping, LPS mm (SimpleITK convention).
    matrix_moving_to_fixed : numpy.ndarray
        4×4 matrix mapping follow-up LPS (mm) to baseline LPS (mm) (DICOM REG convention).
    translation_mm : tuple of float
        Translation of ``matrix_moving_to_fixed`` (mm, LPS).
    rotation_deg : tuple of float
        Euler angles about x, y, z (degrees) of the rotation of ``matrix_moving_to_fixed``
        (SimpleITK Euler3D convention, R = Rz·Rx·Ry).
    rotation_angle_deg : float
        Total rotation angle (degrees, axis-angle magnitude).
    initial_mutual_information, final_mutual_information : float
        Mattes MI (nats) at the initial and final transform, inside the region.
    dice : float | None
        Vertebral-body overlap after registration (0-1).
    dice_source : str
        ``"vertebral masks"`` or ``"otsu foreground in region"``.
    passed : bool
        Quality verdict.
    reasons : tuple of str
        Why it failed (empty when passed).
    stop_condition : str
        Optimizer's stop condition at the finest level.
    attempts : int
        1, or 2 when the first result failed its check and a careful second run
        (:func:`register_rigid`) was made, and more with the restarts along the slice normal
        when that failed too; the best is reported.
    """

    transform: sitk.Euler3DTransform
    matrix_moving_to_fixed: np.ndarray
    translation_mm: tuple[float, float, float]
    rotation_deg: tuple[float, float, float]
    rotation_angle_deg: float
    initial_mutual_information: float
    final_mutual_information: float
    dice: float | None
    dice_source: str
    passed: bool
    reasons: tuple[str, ...]
    stop_condition: str
    attempts: int = 1


def transform_to_matrix(transform: sitk.Transform) -> np.ndarray:
    """4×4 homogeneous matrix of an affine-family SimpleITK transform (its own direction).

    For an ITK matrix-offset transform ``T(x) = A·(x − c) + c + t`` the matrix is
    ``[[A, t + c − A·c], [0, 1]]``.
    """
    if type(transform) is sitk.Transform and transform.GetName() == "CompositeTransform":
        transform = sitk.CompositeTransform(transform)
    if isinstance(transform, sitk.CompositeTransform):
        matrix = np.eye(4)
        for i in range(transform.GetNumberOfTransforms()):
            # composite applies the last added transform first
            matrix = matrix @ transform_to_matrix(transform.GetNthTransform(i))
        return matrix
    dim = transform.GetDimension()
    if dim != 3:
        raise RegistrationError(f"expected a 3-D transform, got {dim}-D")
    name = transform.GetName()
    if name == "IdentityTransform":
        return np.eye(4)
    if name == "TranslationTransform":
        matrix = np.eye(4)
        matrix[:3, 3] = transform.GetParameters()
        return matrix
    specific: Any = transform.Downcast() if type(transform) is sitk.Transform else transform
    if not all(hasattr(specific, m) for m in ("GetMatrix", "GetCenter", "GetTranslation")):
        raise RegistrationError(f"{name} is not an affine-family transform")
    a = np.asarray(specific.GetMatrix(), dtype=float).reshape(3, 3)
    c = np.asarray(specific.GetCenter(), dtype=float)
    t = np.asarray(specific.GetTranslation(), dtype=float)
    matrix = np.eye(4)
    matrix[:3, :3] = a
    matrix[:3, 3] = t + c - a @ c
    return matrix


def matrix_to_transform(matrix: np.ndarray) -> sitk.Euler3DTransform:
    """Euler3DTransform with the rigid 4×4 ``matrix`` (same direction)."""
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (4, 4):
        raise RegistrationError(f"expected a 4x4 matrix, got {matrix.shape}")
    rotation = matrix[:3, :3]
    if not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-4):
        raise RegistrationError("matrix is not rigid (rotation part not orthonormal)")
    transform = sitk.Euler3DTransform()
    transform.SetMatrix(rotation.flatten().tolist())
    transform.SetTranslation(matrix[:3, 3].tolist())
    return transform


def rotation_angle_deg(matrix: np.ndarray) -> float:
    """Total rotation angle (degrees) of the 3×3 rotation part of ``matrix``."""
    rotation = np.asarray(matrix, dtype=float)[:3, :3]
    cos_angle = np.clip((np.trace(rotation) - 1.0) / 2.0, -1.0, 1.0)
    return math.degrees(math.acos(cos_angle))


def region_mask(mask: sitk.Image, *, margin_mm: float) -> sitk.Image:
    """Bounding box of a mask enlarged by ``margin_mm`` (mm), as a UInt8 mask on the same grid.

    Parameters
    ----------
    mask : SimpleITK.Image
        Non-zero voxels define the region (e.g. the treated vertebra or the GTV).
    margin_mm : float
        Margin added on every side (mm), clipped to the image.
    """
    array = sitk.GetArrayViewFromImage(mask) != 0
    if not array.any():
        raise RegistrationError("region mask is empty")
    spacing = np.asarray(mask.GetSpacing())[::-1]  # z, y, x
    out = np.zeros(array.shape, dtype=np.uint8)
    slices = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(array.any(axis=other))
        pad = int(math.ceil(margin_mm / spacing[axis]))
        slices.append(
            slice(max(present[0] - pad, 0), min(present[-1] + pad + 1, array.shape[axis]))
        )
    out[tuple(slices)] = 1
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(mask)
    return image


def dice(a: sitk.Image, b: sitk.Image) -> float:
    """Dice overlap (0-1) of two masks on the same grid."""
    x = sitk.GetArrayViewFromImage(a) != 0
    y = sitk.GetArrayViewFromImage(b) != 0
    if x.shape != y.shape:
        raise ValueError(f"masks have different sizes {x.shape} and {y.shape}")
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(x, y).sum()) / total


def resample_onto(
    image: sitk.Image,
    reference: sitk.Image,
    *,
    transform: sitk.Transform | None = None,
    interpolator: int = sitk.sitkLinear,
    default_value: float = 0.0,
) -> sitk.Image:
    """Resample ``image`` onto the grid of ``reference``.

    Parameters
    ----------
    image : SimpleITK.Image
        Image to resample (e.g. a DWI volume, a DCE phase, a follow-up anatomical series).
    reference : SimpleITK.Image
        Grid to resample onto (only its geometry is used).
    transform : SimpleITK.Transform, optional
        Reference → image point mapping (e.g. :attr:`RigidRegistration.transform` when bringing a
        follow-up image onto the baseline grid). Default: identity (same frame of reference).
    interpolator : int
        SimpleITK interpolator (``sitk.sitkLinear`` for intensities, ``sitk.sitkNearestNeighbor``
        for labels).
    default_value : float
        Value outside ``image``.

    Returns
    -------
    SimpleITK.Image
        Same pixel type as ``image`` except linear/B-spline interpolation, which returns Float32.
    """
    pixel = image.GetPixelID()
    if interpolator != sitk.sitkNearestNeighbor:
        pixel = sitk.sitkFloat32
        image = sitk.Cast(image, sitk.sitkFloat32)
    return sitk.Resample(
        image,
        reference,
        transform if transform is not None else sitk.Transform(),
        interpolator,
        default_value,
        pixel,
    )


def resample_series(
    volumes: Sequence[sitk.Image],
    reference: sitk.Image,
    *,
    transform: sitk.Transform | None = None,
    interpolator: int = sitk.sitkLinear,
) -> list[sitk.Image]:
    """Resample every volume of a series (b-values, time points, flip angles) onto ``reference``.

    Used to put the DWI/DCE series of a study on its anatomical reference grid (same frame of
    reference, identity transform) or a follow-up series on the baseline grid (with the registration
    transform).
    """
    return [
        resample_onto(v, reference, transform=transform, interpolator=interpolator) for v in volumes
    ]


def resample_mask(
    mask: sitk.Image,
    reference: sitk.Image,
    *,
    transform: sitk.Transform | None = None,
    threshold: float = 0.5,
) -> sitk.Image:
    """Resample a binary mask onto ``reference`` by linear interpolation and thresholding.

    Linear interpolation of the 0/1 mask followed by ``>= threshold`` keeps the volume unbiased when
    the grids differ (nearest neighbour shifts boundaries by up to half a voxel).
    """
    as_float = sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkFloat32)
    resampled = resample_onto(
        as_float, reference, transform=transform, interpolator=sitk.sitkLinear
    )
    binary: sitk.Image = sitk.Cast(sitk.GreaterEqual(resampled, threshold), sitk.sitkUInt8)
    return binary


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run ITK filters and metrics created inside on one thread.

    ITK 5.4 sums the Mattes joint histogram and its derivative over threads in an order that
    changes from run to run, so a multi-threaded registration of the same images differs in the last
    bits every time (15 runs, 15 distinct matrices; the method's own SetNumberOfThreads does not
    reach the metric) and a re-analysis of the same inputs would not reproduce its numbers or its
    output UIDs. ITK objects take the global default thread count when they are created, so it is
    set to one for the registration and restored after; the registration is a small part of an
    analysis (about 1 s of a small phantom's). The setting is process-wide: ITK work started by
    another thread meanwhile also gets one thread, and two registrations in threads of one process
    would race on the restore. The node runs one analysis at a time in its own process
    (node.worker), and the cohort one per process.
    """
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _registration_method(settings: RegistrationSettings) -> sitk.ImageRegistrationMethod:
    """A Mattes mutual-information registration method (run it inside :func:`_one_thread`)."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
    return method


def _mutual_information(
    fixed: sitk.Image,
    moving: sitk.Image,
    region: sitk.Image,
    transform: sitk.Transform,
    settings: RegistrationSettings,
) -> float:
    method = _registration_method(settings)
    method.SetMetricFixedMask(region)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetInitialTransform(transform, inPlace=False)
    with _one_thread():
        return -float(method.MetricEvaluate(fixed, moving))


def _otsu_overlap(fixed: sitk.Image, resampled_moving: sitk.Image, region: sitk.Image) -> float:
    region_array = sitk.GetArrayViewFromImage(region) != 0
    masks = []
    for image in (fixed, resampled_moving):
        values = sitk.GetArrayViewFromImage(image)[region_array]
        threshold = sitk.OtsuThresholdImageFilter()
        threshold.SetInsideValue(0)
        threshold.SetOutsideValue(1)
        threshold.SetMaskValue(1)
        threshold.Execute(image, region)
        level = threshold.GetThreshold()
        mask = np.zeros(region_array.shape, dtype=bool)
        mask[region_array] = values > level
        masks.append(mask)
    total = int(masks[0].sum() + masks[1].sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(*masks).sum()) / total


def register_rigid(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    region: sitk.Image | None = None,
    fixed_vertebra: sitk.Image | None = None,
    moving_vertebra: sitk.Image | None = None,
    initial_transform: sitk.Transform | None = None,
    settings: RegistrationSettings | None = None,
) -> RigidRegistration:
    """Rigidly register a follow-up image (moving) to the baseline (fixed) in the treated region.

    Parameters
    ----------
    fixed : SimpleITK.Image
        Baseline anatomical reference (e.g. sagittal T2w or T1w), LPS mm.
    moving : SimpleITK.Image
        Follow-up anatomical reference of the same contrast.
    region : SimpleITK.Image, optional
        Mask on the fixed grid of the treated vertebral region (the vertebra, or the GTV); its
        bounding box plus ``settings.margin_mm`` restricts the metric. Default: whole image.
    fixed_vertebra, moving_vertebra : SimpleITK.Image, optional
        Vertebral-body masks on each study's grid for the Dice quality check.
    initial_transform : SimpleITK.Transform, optional
        Starting fixed → moving transform. Default: identity (both studies in scanner coordinates of
        the same patient position), which is the right start for small inter-session displacements.
    settings : RegistrationSettings, optional

    Returns
    -------
    RigidRegistration

    Raises
    ------
    RegistrationError
        If the images are not 3-D or the region is empty.

    Notes
    -----
    A result that fails its check gets one careful second run from the same start: without the
    coarsest pyramid level and with a quarter of the step. Along the spine the coarse level can
    pull the optimiser one vertebral level away (a randomised phantom follow-up with a 2x
    eccentric growth was registered 24 mm off, overlap 0.43, where the true shift was 4.7 mm).
    The second result is kept when it passes, or when its overlap is higher. When it fails too,
    careful runs start from the initial position shifted along the slice normal
    (``settings.restart_offsets_mm``); a passing one with the highest overlap is kept (that
    follow-up: 4.7 mm, overlap 0.90).
    """
    settings = settings or RegistrationSettings()
    first = _register_once(
        fixed, moving, region, fixed_vertebra, moving_vertebra, initial_transform, settings
    )
    if first.passed:
        return first
    careful = replace(
        settings,
        shrink_factors=settings.shrink_factors[1:] or settings.shrink_factors,
        smoothing_sigmas_mm=settings.smoothing_sigmas_mm[1:] or settings.smoothing_sigmas_mm,
        learning_rate_mm=settings.learning_rate_mm / 4,
    )
    second = _register_once(
        fixed, moving, region, fixed_vertebra, moving_vertebra, initial_transform, careful
    )
    better = second if second.passed or (second.dice or 0.0) > (first.dice or 0.0) else first
    logger.info(
        "registration retried carefully: overlap %.3f -> %.3f; %s result kept",
        first.dice or 0.0,
        second.dice or 0.0,
        "the second" if better is second else "the first",
    )
    attempts = 2
    if not better.passed and settings.restart_offsets_mm:
        # slid along the spine to a neighbouring level's look-alike: start again from the
        # initial position shifted along the fixed image's slice normal, both ways
        axis = np.asarray(fixed.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
        base = transform_to_matrix(initial_transform or sitk.Euler3DTransform())
        for offset in settings.restart_offsets_mm:
            shifted = base.copy()
            shifted[:3, 3] += offset * axis
            result = _register_once(
                fixed,
                moving,
                region,
                fixed_vertebra,
                moving_vertebra,
                matrix_to_transform(shifted),
                careful,
            )
            attempts += 1
            if result.passed and (not better.passed or (result.dice or 0) > (better.dice or 0)):
                better = result
        logger.info(
            "registration restarted %d times along the slice normal: %s",
            len(settings.restart_offsets_mm),
            f"passed, overlap {better.dice:.3f}" if better.passed else "still failed",
        )
    return replace(better, attempts=attempts)


def _register_once(
    fixed: sitk.Image,
    moving: sitk.Image,
    region: sitk.Image | None,
    fixed_vertebra: sitk.Image | None,
    moving_vertebra: sitk.Image | None,
    initial_transform: sitk.Transform | None,
    settings: RegistrationSettings,
) -> RigidRegistration:
    """One run of :func:`register_rigid` with these settings."""
    if fixed.GetDimension() != 3 or moving.GetDimension() != 3:
        raise RegistrationError("registration needs 3-D fixed and moving images")
    fixed_f = sitk.Cast(fixed, sitk.sitkFloat32)
    moving_f = sitk.Cast(moving, sitk.sitkFloat32)
    metric_region = _metric_region(fixed, region, settings)

    start = sitk.Euler3DTransform()
    if initial_transform is not None:
        start = matrix_to_transform(transform_to_matrix(initial_transform))
    # rotate about the centre of the region: decouples rotation and translation
    region_array = sitk.GetArrayViewFromImage(metric_region)
    centre_index = np.argwhere(region_array != 0).mean(axis=0)[::-1]
    centre = fixed.TransformContinuousIndexToPhysicalPoint(centre_index.tolist())
    start_matrix = transform_to_matrix(start)
    start = sitk.Euler3DTransform()
    start.SetCenter(centre)
    start.SetMatrix(start_matrix[:3, :3].flatten().tolist())
    start.SetTranslation(
        (start_matrix[:3, 3] + start_matrix[:3, :3] @ centre - np.asarray(centre)).tolist()
    )

    initial_mi = _mutual_information(fixed_f, moving_f, metric_region, start, settings)

    method = _registration_method(settings)
    method.SetMetricFixedMask(metric_region)
    method.SetMetricSamplingStrategy(method.RANDOM)
    n_region = int(np.count_nonzero(region_array))
    fraction = min(settings.sampling_fraction, settings.max_samples / max(n_region, 1))
    method.SetMetricSamplingPercentage(fraction, settings.seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=settings.learning_rate_mm,
        minStep=settings.min_step_mm,
        numberOfIterations=settings.iterations,
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(settings.shrink_factors))
    method.SetSmoothingSigmasPerLevel(list(settings.smoothing_sigmas_mm))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(start, inPlace=False)
    try:
        with _one_thread():
            result = method.Execute(fixed_f, moving_f)
    except RuntimeError as err:
        raise RegistrationError(f"rigid registration failed: {err}") from err
    transform = sitk.Euler3DTransform(sitk.CompositeTransform(result).GetBackTransform())
    return _evaluate(
        fixed_f,
        moving_f,
        transform,
        metric_region,
        initial_mi,
        settings,
        fixed_vertebra=fixed_vertebra,
        moving_vertebra=moving_vertebra,
        stop_condition=method.GetOptimizerStopConditionDescription(),
    )


def _evaluate(
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: sitk.Euler3DTransform,
    metric_region: sitk.Image,
    initial_mi: float,
    settings: RegistrationSettings,
    *,
    fixed_vertebra: sitk.Image | None,
    moving_vertebra: sitk.Image | None,
    stop_condition: str,
    extra_reasons: Sequence[str] = (),
) -> RigidRegistration:
    """Quality metrics and the result object for a fixed → moving ``transform``."""
    final_mi = _mutual_information(fixed, moving, metric_region, transform, settings)
    fixed_to_moving = transform_to_matrix(transform)
    moving_to_fixed = np.linalg.inv(fixed_to_moving)
    inverse = matrix_to_transform(moving_to_fixed)
    angles = (
        math.degrees(inverse.GetAngleX()),
        math.degrees(inverse.GetAngleY()),
        math.degrees(inverse.GetAngleZ()),
    )
    tx, ty, tz = (float(v) for v in moving_to_fixed[:3, 3])

    reasons: list[str] = list(extra_reasons)
    if fixed_vertebra is not None and moving_vertebra is not None:
        warped = resample_mask(moving_vertebra, fixed, transform=transform)
        overlap = dice(sitk.NotEqual(fixed_vertebra, 0), warped)
        source = "vertebral masks"
    else:
        warped_image = resample_onto(moving, fixed, transform=transform)
        overlap = _otsu_overlap(fixed, warped_image, metric_region)
        source = "otsu foreground in region"
    if overlap < settings.min_dice:
        reasons.append(f"overlap ({source}) {overlap:.3f} < {settings.min_dice:.3f}")
    if final_mi < initial_mi - 1e-3:
        reasons.append(f"mutual information decreased ({initial_mi:.4f} -> {final_mi:.4f} nats)")
    registration = RigidRegistration(
        transform=transform,
        matrix_moving_to_fixed=moving_to_fixed,
        translation_mm=(tx, ty, tz),
        rotation_deg=angles,
        rotation_angle_deg=rotation_angle_deg(moving_to_fixed),
        initial_mutual_information=initial_mi,
        final_mutual_information=final_mi,
        dice=overlap,
        dice_source=source,
        passed=not reasons,
        reasons=tuple(reasons),
        stop_condition=stop_condition,
    )
    logger.info(
        "rigid registration: |t| %.2f mm, angle %.2f deg, MI %.4f -> %.4f, overlap %.3f (%s), %s",
        float(np.linalg.norm(registration.translation_mm)),
        registration.rotation_angle_deg,
        initial_mi,
        final_mi,
        overlap,
        source,
        "passed" if registration.passed else "FAILED",
    )
    return registration


def _metric_region(
    fixed: sitk.Image, region: sitk.Image | None, settings: RegistrationSettings
) -> sitk.Image:
    if region is not None:
        return region_mask(region, margin_mm=settings.margin_mm)
    whole: sitk.Image = sitk.Image(fixed.GetSize(), sitk.sitkUInt8) + 1
    whole.CopyInformation(fixed)
    return whole


def register_rigid_multi(
    pairs: Sequence[tuple[sitk.Image, sitk.Image]],
    *,
    region: sitk.Image | None = None,
    fixed_vertebra: sitk.Image | None = None,
    moving_vertebra: sitk.Image | None = None,
    settings: RegistrationSettings | None = None,
) -> RigidRegistration:
    """Register with several series of different slice orientations and fuse the translations.

    With thick slices the position along a series' slice normal is poorly determined (about half a
    slice when the object is sampled at slice centres), while in-plane it is resolved to a fraction
    of a pixel. Spine protocols acquire axial and sagittal series, so every axis is in-plane in at
    least one of them. The first pair (e.g. axial T2w baseline/follow-up) is registered as in
    :func:`register_rigid` and gives the rotation; every further pair (e.g. sagittal T2w) is
    registered from that start. At the centre ``p`` of the region, each registration i maps the
    follow-up point to ``q_i``; the fused position is the precision-weighted mean
    ``q = (Σ W_i)⁻¹ Σ W_i q_i`` with ``W_i = (D_i diag(s_i²) D_i^T)⁻¹`` (D_i the direction
    matrix and s_i the voxel size of fixed image i, i.e. uncertainty proportional to voxel extent
    along each axis). Registrations that fail their quality check are left out (noted).

    Parameters
    ----------
    pairs : sequence of (fixed, moving) SimpleITK.Image
        Baseline and follow-up images of the same series type, primary pair first; each pair on its
        own grids, all in the two studies' frames of reference.
    region : SimpleITK.Image, optional
        Treated-region mask on the grid of the first fixed image (resampled onto the others).
    fixed_vertebra, moving_vertebra : SimpleITK.Image, optional
        Vertebral-body masks for the quality check (on the first pair's grids).
    settings : RegistrationSettings, optional

    Returns
    -------
    RigidRegistration
        The fused transform, with quality metrics evaluated on the first pair.
    """
    if not pairs:
        raise RegistrationError("no image pairs to register")
    settings = settings or RegistrationSettings()
    primary_fixed, primary_moving = pairs[0]
    primary = register_rigid(
        primary_fixed,
        primary_moving,
        region=region,
        fixed_vertebra=fixed_vertebra,
        moving_vertebra=moving_vertebra,
        settings=settings,
    )
    if len(pairs) == 1:
        return primary
    metric_region = _metric_region(primary_fixed, region, settings)
    centre_index = np.argwhere(sitk.GetArrayViewFromImage(metric_region) != 0).mean(axis=0)[::-1]
    centre = np.asarray(
        primary_fixed.TransformContinuousIndexToPhysicalPoint(centre_index.tolist())
    )
    follow_point = (transform_to_matrix(primary.transform) @ np.append(centre, 1.0))[:3]

    def weight(fixed: sitk.Image) -> np.ndarray:
        direction = np.asarray(fixed.GetDirection(), dtype=float).reshape(3, 3)
        spacing = np.asarray(fixed.GetSpacing(), dtype=float)
        return np.linalg.inv(direction @ np.diag(spacing**2) @ direction.T)

    weights = [weight(primary_fixed)]
    positions = [(primary.matrix_moving_to_fixed @ np.append(follow_point, 1.0))[:3]]
    notes: list[str] = []
    for index, (fixed, moving) in enumerate(pairs[1:], start=1):
        own_region = resample_mask(region, fixed) if region is not None else None
        if own_region is not None and not sitk.GetArrayViewFromImage(own_region).any():
            notes.append(f"pair {index}: region outside its field of view, not used")
            continue
        result = register_rigid(
            fixed, moving, region=own_region, initial_transform=primary.transform, settings=settings
        )
        if not result.passed:
            notes.append(f"pair {index} not used: {'; '.join(result.reasons)}")
            continue
        weights.append(weight(fixed))
        positions.append((result.matrix_moving_to_fixed @ np.append(follow_point, 1.0))[:3])
    fused_position = np.linalg.solve(
        np.sum(weights, axis=0), np.sum([w @ q for w, q in zip(weights, positions)], axis=0)
    )
    rotation = primary.matrix_moving_to_fixed[:3, :3]
    moving_to_fixed = np.eye(4)
    moving_to_fixed[:3, :3] = rotation
    moving_to_fixed[:3, 3] = fused_position - rotation @ follow_point
    fused = matrix_to_transform(np.linalg.inv(moving_to_fixed))
    logger.info(
        "fused %d of %d registrations: position shifted %.2f mm from the primary one",
        len(weights),
        len(pairs),
        float(np.linalg.norm(fused_position - positions[0])),
    )
    fixed_f = sitk.Cast(primary_fixed, sitk.sitkFloat32)
    moving_f = sitk.Cast(primary_moving, sitk.sitkFloat32)
    return _evaluate(
        fixed_f,
        moving_f,
        fused,
        metric_region,
        primary.initial_mutual_information,
        settings,
        fixed_vertebra=fixed_vertebra,
        moving_vertebra=moving_vertebra,
        stop_condition=(
            f"fused {len(weights)} of {len(pairs)} registrations ({primary.stop_condition})"
            + ("; " + "; ".join(notes) if notes else "")
        ),
    )
