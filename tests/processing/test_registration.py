"""Rigid follow-up → baseline registration on synthetic volumes with a known transform."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from processing.registration import (
    RegistrationError,
    RegistrationSettings,
    dice,
    matrix_to_transform,
    region_mask,
    register_rigid,
    resample_mask,
    resample_onto,
    resample_series,
    rotation_angle_deg,
    transform_to_matrix,
)

SIZE = (80, 80, 40)
SPACING = (1.5, 1.5, 2.5)


def _spine(size=SIZE, spacing=SPACING, origin=None) -> tuple[sitk.Image, sitk.Image]:
    """Three 'vertebral bodies', posterior elements, a cord and a lesion; returns (image, L2
    body)."""
    z, y, x = np.indices(size[::-1]).astype(float)
    xs = (x - size[0] / 2) * spacing[0]
    ys = (y - size[1] / 2) * spacing[1]
    zs = (z - size[2] / 2) * spacing[2]
    array = np.full(xs.shape, 50.0)
    middle_body = np.zeros(xs.shape, dtype=bool)
    for k, zc in enumerate((-30.0, 0.0, 30.0)):
        body = (xs / 18) ** 2 + ((ys - 5) / 14) ** 2 + ((zs - zc) / 11) ** 2 < 1
        array[body] = 300 + 40 * k
        array[(xs / 6) ** 2 + ((ys + 18) / 5) ** 2 + ((zs - zc) / 12) ** 2 < 1] = 600
        if zc == 0.0:
            middle_body = body
    array[(xs / 4) ** 2 + ((ys + 18) / 4) ** 2 < 1] = 900
    array[((xs - 8) / 6) ** 2 + ((ys - 3) / 6) ** 2 + (zs / 6) ** 2 < 1] = 150
    image = sitk.GetImageFromArray(array.astype(np.float32))
    image.SetSpacing(spacing)
    image.SetOrigin(origin or [-(n / 2) * s for n, s in zip(size, spacing)])
    body_mask = sitk.GetImageFromArray(middle_body.astype(np.uint8))
    body_mask.CopyInformation(image)
    return sitk.SmoothingRecursiveGaussian(image, 1.0), body_mask


def _known_rigid(angles_deg, translation_mm) -> sitk.Euler3DTransform:
    transform = sitk.Euler3DTransform()
    transform.SetRotation(*(math.radians(a) for a in angles_deg))
    transform.SetTranslation(translation_mm)
    return transform


def _follow_up(baseline: sitk.Image, moving_to_fixed: sitk.Transform, seed: int) -> sitk.Image:
    # follow-up grid: same size, shifted origin (another session, another frame of reference)
    grid = sitk.Image(baseline.GetSize(), sitk.sitkFloat32)
    grid.SetSpacing(baseline.GetSpacing())
    grid.SetOrigin([o + d for o, d in zip(baseline.GetOrigin(), (0.7, -1.1, 1.3))])
    # Resample maps output (follow-up) points through the transform into the baseline image
    moving = sitk.Resample(baseline, grid, moving_to_fixed, sitk.sitkLinear, 50.0, sitk.sitkFloat32)
    noisy = sitk.GetArrayFromImage(moving) + np.random.default_rng(seed).normal(
        0, 10, moving.GetSize()[::-1]
    )
    out = sitk.GetImageFromArray(noisy.astype(np.float32))
    out.CopyInformation(moving)
    return out


@pytest.fixture(scope="module")
def baseline() -> tuple[sitk.Image, sitk.Image]:
    return _spine()


@pytest.mark.parametrize(
    ("angles_deg", "translation_mm"),
    [((3.0, -2.0, 4.0), (3.0, -4.0, 2.5)), ((-4.0, 3.0, -2.0), (-5.0, 2.0, -3.0))],
)
def test_recovers_known_rigid_displacement_within_1mm_1deg(
    baseline, angles_deg, translation_mm
) -> None:
    fixed, body = baseline
    truth = _known_rigid(angles_deg, translation_mm)
    moving = _follow_up(fixed, truth, seed=7)
    moving_body = resample_mask(body, moving, transform=truth)
    result = register_rigid(
        fixed, moving, region=body, fixed_vertebra=body, moving_vertebra=moving_body
    )
    error = np.linalg.inv(transform_to_matrix(truth)) @ result.matrix_moving_to_fixed
    # error of the mapped position over the treated region (|R x + t - x| at the region's extent)
    corners = np.array(
        [[sx, sy, sz, 1.0] for sx in (-18, 18) for sy in (-9, 19) for sz in (-11, 11)]
    )
    displacement = np.linalg.norm((corners @ error.T)[:, :3] - corners[:, :3], axis=1).max()
    assert displacement < 1.0, displacement
    assert rotation_angle_deg(error) < 1.0
    assert result.passed, result.reasons
    assert result.dice is not None and result.dice > 0.9 and result.dice_source == "vertebral masks"
    assert result.final_mutual_information > result.initial_mutual_information
    assert np.allclose(result.translation_mm, translation_mm, atol=1.0)
    assert np.allclose(result.rotation_deg, angles_deg, atol=1.0)
    # the SimpleITK transform is the inverse of the DICOM REG matrix
    assert np.allclose(
        transform_to_matrix(result.transform) @ result.matrix_moving_to_fixed, np.eye(4), atol=1e-9
    )


def test_registration_is_bit_for_bit_repeatable_and_restores_the_thread_count(baseline) -> None:
    # a re-analysis of the same inputs must give the same matrix (and so the same REG UID); ITK's
    # multi-threaded Mattes metric does not, so the registration runs on one thread
    fixed, body = baseline
    moving = _follow_up(fixed, _known_rigid((2.0, -1.0, 1.5), (1.5, -2.0, 1.0)), seed=11)
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    matrices = {
        register_rigid(fixed, moving, region=body).matrix_moving_to_fixed.tobytes()
        for _ in range(3)
    }
    assert len(matrices) == 1
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == threads


def test_without_vertebral_masks_uses_foreground_overlap_and_flags_failure(baseline) -> None:
    fixed, body = baseline
    moving = _follow_up(fixed, _known_rigid((2.0, 0.0, -2.0), (2.0, 3.0, -1.0)), seed=3)
    good = register_rigid(fixed, moving, region=body)
    assert good.dice_source == "otsu foreground in region" and good.passed and good.dice > 0.8
    noise = sitk.GetImageFromArray(
        np.random.default_rng(5).normal(100, 30, fixed.GetSize()[::-1]).astype(np.float32)
    )
    noise.CopyInformation(fixed)
    bad = register_rigid(fixed, noise, region=body, settings=RegistrationSettings(iterations=20))
    assert not bad.passed and bad.reasons and bad.dice < 0.8
    # a failed check gets one careful second run, then the four restarts along the slice
    # normal, and the report says so
    assert good.attempts == 1 and bad.attempts == 6


def test_a_failed_check_is_retried_and_the_better_result_kept(baseline) -> None:
    fixed, body = baseline
    moving = _follow_up(fixed, _known_rigid((2.0, 0.0, -2.0), (2.0, 3.0, -1.0)), seed=3)
    first = register_rigid(fixed, moving, region=body)
    # a check no registration passes: both runs fail, the one with the higher overlap is kept
    # (the restarts along the slice normal have a test of their own)
    strict = register_rigid(
        fixed, moving, region=body, settings=RegistrationSettings(min_dice=1, restart_offsets_mm=())
    )
    assert strict.attempts == 2 and not strict.passed
    assert strict.dice >= first.dice - 0.02  # the careful run lands where the first one did
    np.testing.assert_allclose(
        strict.matrix_moving_to_fixed, first.matrix_moving_to_fixed, atol=0.5
    )


def test_a_registration_locked_on_the_next_vertebra_is_restarted_along_the_spine(
    baseline,
) -> None:
    """Started 25 mm off along the spine, the optimiser locks onto the neighbouring vertebra
    (30 mm off, its check fails, the careful run too); the restarts along the slice normal find
    the treated one, within 0.2 mm."""
    fixed, body = baseline
    truth = _known_rigid((2.0, 0.0, -2.0), (2.0, 3.0, -1.0))
    moving = _follow_up(fixed, truth, seed=3)
    start = sitk.Euler3DTransform()
    start.SetTranslation((0.0, 0.0, 25.0))
    no_restart = RegistrationSettings(restart_offsets_mm=())
    locked = register_rigid(
        fixed, moving, region=body, initial_transform=start, settings=no_restart
    )
    error = np.linalg.inv(transform_to_matrix(truth)) @ locked.matrix_moving_to_fixed
    assert not locked.passed and locked.attempts == 2
    assert abs(abs(error[2, 3]) - 30.0) < 1.0  # one vertebra (30 mm) away
    found = register_rigid(fixed, moving, region=body, initial_transform=start)
    error = np.linalg.inv(transform_to_matrix(truth)) @ found.matrix_moving_to_fixed
    assert found.passed and found.attempts == 6, found.reasons
    assert np.linalg.norm(error[:3, 3]) < 0.2 and rotation_angle_deg(error) < 0.5


def test_matrix_transform_round_trip_and_centre_convention() -> None:
    transform = _known_rigid((10.0, -5.0, 20.0), (1.0, 2.0, 3.0))
    transform.SetCenter((10.0, -20.0, 5.0))
    matrix = transform_to_matrix(transform)
    point = np.array([3.0, 4.0, -7.0])
    assert np.allclose(
        matrix[:3, :3] @ point + matrix[:3, 3], transform.TransformPoint(point.tolist())
    )
    back = matrix_to_transform(matrix)
    assert np.allclose(
        back.TransformPoint(point.tolist()), transform.TransformPoint(point.tolist())
    )
    assert rotation_angle_deg(np.eye(4)) == 0.0
    with pytest.raises(RegistrationError, match="not rigid"):
        matrix_to_transform(np.diag([2.0, 1.0, 1.0, 1.0]))


def test_region_mask_adds_margin_in_mm(baseline) -> None:
    fixed, body = baseline
    box = sitk.GetArrayFromImage(region_mask(body, margin_mm=5.0))
    body_array = sitk.GetArrayViewFromImage(body)
    for axis, spacing in zip((0, 1, 2), SPACING[::-1]):
        other = tuple(a for a in range(3) if a != axis)
        inside = np.flatnonzero(body_array.any(axis=other))
        extent = np.flatnonzero(box.any(axis=other))
        pad = math.ceil(5.0 / spacing)
        assert extent[0] == max(inside[0] - pad, 0) and extent[-1] == min(
            inside[-1] + pad, box.shape[axis] - 1
        )
    with pytest.raises(RegistrationError, match="empty"):
        region_mask(body * 0, margin_mm=5.0)


def test_resample_series_onto_anatomical_reference_same_frame(baseline) -> None:
    fixed, body = baseline
    # a coarser "DWI" grid of the same study: identity transform, physical positions preserved
    dwi_grid = sitk.Image([40, 40, 20], sitk.sitkFloat32)
    dwi_grid.SetSpacing((3.0, 3.0, 5.0))
    dwi_grid.SetOrigin(fixed.GetOrigin())
    volumes = [resample_onto(fixed, dwi_grid) * scale for scale in (1.0, 0.5)]
    back = resample_series(volumes, fixed)
    assert len(back) == 2 and back[0].GetSize() == fixed.GetSize()
    centre = fixed.TransformIndexToPhysicalPoint([40, 40, 20])
    assert back[1].GetPixel(fixed.TransformPhysicalPointToIndex(centre)) == pytest.approx(
        0.5 * back[0].GetPixel(fixed.TransformPhysicalPointToIndex(centre))
    )
    original = sitk.GetArrayViewFromImage(fixed)
    restored = sitk.GetArrayViewFromImage(back[0])
    # coarse-grid round trip loses detail but keeps the anatomy aligned (correlation)
    assert np.corrcoef(original.ravel(), restored.ravel())[0, 1] > 0.95
    mask_back = resample_mask(resample_mask(body, dwi_grid), fixed)
    assert dice(mask_back, body) > 0.9
    vol_body = float(sitk.GetArrayViewFromImage(body).sum()) * np.prod(SPACING)
    vol_dwi = float(sitk.GetArrayFromImage(resample_mask(body, dwi_grid)).sum()) * 45.0
    assert abs(vol_dwi - vol_body) / vol_body < 0.05


# --------------------------------------------------------------------------- phantom (acceptance 3)
PHANTOM_SCENARIOS = ("responder", "progression", "stable")


def _phantom_t2w(root, study: str, truth: dict) -> sitk.Image:
    import pydicom

    from processing.series import read_series

    folder = root / study / truth["studies"][study]["series"]["t2w"]["folder"]
    return read_series([pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]).volume_image(0)


@pytest.mark.parametrize("scenario", PHANTOM_SCENARIOS)
def test_phantom_registration_rotation_within_1deg_in_plane_within_1mm_z_within_half_slice(
    make_phantom, scenario
) -> None:
    """Acceptance 3 on the small phantom (seed 7), measured at the treated vertebra's centre.

    Rotation and in-plane translation meet 1 deg / 1 mm. Along z (the 5 mm slice axis) the phantom
    samples each slice at its centre without a slice profile, so nothing in the images fixes the
    position between slice centres better than about half a slice: z is held to that (2.5 mm)
    here; with a sagittal series as well, every axis is within 1 mm (next test).
    """
    import json

    import pydicom

    from processing.rtstruct import rtstruct_to_mask

    root = make_phantom(scenario, "standard", "small")
    truth = json.loads((root / "ground_truth.json").read_text())
    fixed = _phantom_t2w(root, "baseline", truth)
    moving = _phantom_t2w(root, "followup1", truth)
    gtv = rtstruct_to_mask(pydicom.dcmread(root / "rt" / "rtstruct.dcm"), "GTV", fixed)
    result = register_rigid(fixed, moving, region=gtv)
    rigid = truth["studies"]["followup1"]["rigid_transform"]
    error = np.linalg.inv(np.asarray(rigid["followup_to_baseline"])) @ result.matrix_moving_to_fixed
    centre = np.asarray(rigid["rotation_centre_mm"])
    displacement = error[:3, :3] @ centre + error[:3, 3] - centre
    assert rotation_angle_deg(error) < 1.0
    assert np.linalg.norm(displacement[:2]) < 1.0, displacement
    assert abs(displacement[2]) < 0.5 * fixed.GetSpacing()[2], displacement
    assert result.passed, result.reasons


@pytest.mark.slow
@pytest.mark.parametrize("scenario", PHANTOM_SCENARIOS)
def test_phantom_registration_with_sagittal_series_within_1mm_1deg(make_phantom, scenario) -> None:
    """Acceptance 3: axial and sagittal T2w registered and fused recover the displacement within
    1 mm (at the treated vertebra's centre, every axis) and 1 degree."""
    import json

    import pydicom

    from processing.registration import register_rigid_multi
    from processing.rtstruct import rtstruct_to_mask
    from processing.series import read_series

    root = make_phantom(scenario, "standard", "small", sagittal=True)
    truth = json.loads((root / "ground_truth.json").read_text())

    def image(study: str, key: str) -> sitk.Image:
        folder = root / study / truth["studies"][study]["series"][key]["folder"]
        return read_series([pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]).volume_image(
            0
        )

    axial = (image("baseline", "t2w"), image("followup1", "t2w"))
    sagittal = (image("baseline", "t2w_sag"), image("followup1", "t2w_sag"))
    gtv = rtstruct_to_mask(pydicom.dcmread(root / "rt" / "rtstruct.dcm"), "GTV", axial[0])
    result = register_rigid_multi([axial, sagittal], region=gtv)
    rigid = truth["studies"]["followup1"]["rigid_transform"]
    error = np.linalg.inv(np.asarray(rigid["followup_to_baseline"])) @ result.matrix_moving_to_fixed
    centre = np.asarray(rigid["rotation_centre_mm"])
    displacement = error[:3, :3] @ centre + error[:3, 3] - centre
    assert np.linalg.norm(displacement) < 1.0, displacement
    assert rotation_angle_deg(error) < 1.0
    assert result.passed, result.reasons
    assert result.stop_condition.startswith("fused 2 of 2")
