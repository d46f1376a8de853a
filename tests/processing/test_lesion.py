"""Baseline GTV propagated to a follow-up and refined on the follow-up images (synthetic scenes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from processing.lesion import (
    LesionError,
    RefinementSettings,
    lesion_tracking_uid,
    make_lesion,
    mask_volume_ml,
    propagate_mask,
    refine_lesion,
)
from processing.registration import transform_to_matrix
from processing.rtstruct import RoiInfo

SIZE = (64, 64, 24)
SPACING = (1.5, 1.5, 3.0)
TUMOUR_CENTRE = np.array([5.0, 0.0, 0.0])
#: tissue -> (T1w, T2w) signal
SIGNAL = {
    "soft": (400.0, 250.0),
    "marrow": (600.0, 300.0),
    "disc": (350.0, 600.0),
    "tumour": (300.0, 450.0),
}


def _grid(origin) -> sitk.Image:
    image = sitk.Image(SIZE, sitk.sitkFloat32)
    image.SetSpacing(SPACING)
    image.SetOrigin(origin)
    return image


def _adc(
    grid: sitk.Image, radius_mm: float, to_body: np.ndarray, tumour_adc: float, seed: int
) -> sitk.Image:
    """ADC-like channel (1e-6 mm2/s): tumour value changes with treatment, unlike T1w/T2w."""
    k, j, i = np.indices(SIZE[::-1]).astype(float)
    points = np.asarray(grid.GetOrigin()) + (np.stack([i, j, k], axis=-1) * np.asarray(SPACING))
    body = points @ to_body[:3, :3].T + to_body[:3, 3]
    x, y, z = body[..., 0], body[..., 1], body[..., 2]
    in_column = (x / 22.0) ** 2 + (y / 17.0) ** 2 < 1.0
    values = np.full(x.shape, 1400.0)
    values[in_column & (np.abs(z) < 12.5)] = 430.0
    values[in_column & (np.abs(z) >= 12.5) & (np.abs(z) < 20.5)] = 1700.0
    values[np.linalg.norm(body - TUMOUR_CENTRE, axis=-1) < radius_mm] = tumour_adc
    values += np.random.default_rng(seed).normal(0.0, 60.0, values.shape)
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.CopyInformation(grid)
    return image


def _scene(grid: sitk.Image, radius_mm: float, to_body: np.ndarray, seed: int, gain: float = 1.0):
    """(T1w, T2w, vertebra mask, tumour mask) sampled at the voxel centres of ``grid``.

    ``to_body`` maps grid (LPS) points to body coordinates (4x4), i.e. follow-up -> baseline.
    """
    k, j, i = np.indices(SIZE[::-1]).astype(float)
    index = np.stack([i, j, k], axis=-1) * np.asarray(SPACING)
    direction = np.asarray(grid.GetDirection()).reshape(3, 3)
    points = np.asarray(grid.GetOrigin()) + index @ direction.T
    body = points @ to_body[:3, :3].T + to_body[:3, 3]
    x, y, z = body[..., 0], body[..., 1], body[..., 2]
    in_column = (x / 22.0) ** 2 + (y / 17.0) ** 2 < 1.0
    vertebra = in_column & (np.abs(z) < 12.5)
    disc = in_column & ~vertebra & (np.abs(z) < 20.5)
    tumour = np.linalg.norm(body - TUMOUR_CENTRE, axis=-1) < radius_mm
    rng = np.random.default_rng(seed)
    channels = []
    for c in range(2):
        signal = np.full(x.shape, SIGNAL["soft"][c])
        signal[vertebra] = SIGNAL["marrow"][c]
        signal[disc] = SIGNAL["disc"][c]
        signal[tumour] = SIGNAL["tumour"][c]
        signal = gain * signal + rng.normal(0.0, 20.0, signal.shape)
        image = sitk.GetImageFromArray(signal.astype(np.float32))
        image.CopyInformation(grid)
        channels.append(image)
    vertebra_mask, tumour_mask = _masks(grid, vertebra, tumour)
    return channels[0], channels[1], vertebra_mask, tumour_mask


def _masks(grid: sitk.Image, *arrays: np.ndarray) -> list[sitk.Image]:
    """Boolean arrays as mask images on ``grid``."""
    masks = []
    for array in arrays:
        mask = sitk.GetImageFromArray(array.astype(np.uint8))
        mask.CopyInformation(grid)
        masks.append(mask)
    return masks


def _follow_up_to_baseline(angles_deg=(2.0, -3.0, 4.0), translation=(3.0, -2.0, 4.0)) -> np.ndarray:
    transform = sitk.Euler3DTransform()
    transform.SetRotation(*(math.radians(a) for a in angles_deg))
    transform.SetTranslation(translation)
    return transform_to_matrix(transform)


BASELINE_RADIUS = 9.0
BASELINE_ORIGIN = (-47.25, -47.25, -34.5)


@pytest.fixture(scope="module")
def baseline():
    t1, t2, vertebra, tumour = _scene(_grid(BASELINE_ORIGIN), BASELINE_RADIUS, np.eye(4), seed=1)
    return [t1, t2], tumour, vertebra


@pytest.mark.parametrize(("radius_mm", "gain"), [(6.0, 1.0), (9.0, 1.3), (11.5, 0.8)])
def test_refined_follow_up_volume_within_10_percent(baseline, radius_mm, gain) -> None:
    images, gtv, vertebra = baseline
    matrix = _follow_up_to_baseline()
    t1, t2, _, truth = _scene(_grid((-46.0, -48.0, -33.0)), radius_mm, matrix, seed=2, gain=gain)
    result = refine_lesion(images, gtv, [t1, t2], matrix, baseline_vertebra=vertebra)
    true_volume = 4.0 / 3.0 * math.pi * radius_mm**3 / 1000.0
    assert result.refined, result.notes
    assert result.training_dice is not None and result.training_dice > 0.9
    assert abs(result.volume_ml - true_volume) / true_volume < 0.10, (result.volume_ml, true_volume)
    # the propagated GTV keeps the baseline volume: only refinement measures the change
    baseline_volume = 4.0 / 3.0 * math.pi * BASELINE_RADIUS**3 / 1000.0
    assert abs(result.propagated_volume_ml - baseline_volume) / baseline_volume < 0.10
    overlap = np.logical_and(
        sitk.GetArrayViewFromImage(result.mask), sitk.GetArrayViewFromImage(truth)
    ).sum()
    dice = (
        2
        * overlap
        / (sitk.GetArrayViewFromImage(result.mask).sum() + sitk.GetArrayViewFromImage(truth).sum())
    )
    assert dice > 0.85, dice
    # the uncertainty: volumes at lesion probability 0.75 and 0.25 bracket the reported one
    low, high = result.volume_range_ml
    assert low <= result.volume_ml <= high and low < high
    assert high - low < 0.5 * result.volume_ml
    assert f"{low:.2f}-{high:.2f} mL at lesion probability 0.75/0.25" in result.notes[-1]
    assert result.outcome == result.notes[-1] and result.outcome.startswith("refined on")


def test_channel_changed_by_treatment_is_adapted_to(baseline) -> None:
    """ADC of the lesion rises by 35 % after treatment: the follow-up adaptation keeps the
    volume."""
    images, gtv, vertebra = baseline
    matrix = _follow_up_to_baseline()
    follow_grid = _grid((-46.0, -48.0, -33.0))
    t1, t2, _, _ = _scene(follow_grid, 7.0, matrix, seed=4)
    base_adc = _adc(images[0], BASELINE_RADIUS, np.eye(4), 850.0, seed=5)
    follow_adc = _adc(follow_grid, 7.0, matrix, 1150.0, seed=6)
    result = refine_lesion([*images, base_adc], gtv, [t1, t2, follow_adc], matrix)
    true_volume = 4.0 / 3.0 * math.pi * 7.0**3 / 1000.0
    assert result.refined and any("model adapted" in note for note in result.notes), result.notes
    assert abs(result.volume_ml - true_volume) / true_volume < 0.10, (result.volume_ml, true_volume)


def test_a_treated_lesion_the_baseline_model_hesitates_over_is_adapted_to(baseline) -> None:
    """Treatment moved the lesion's signal towards the background in every channel, each by less
    than the channel test drops (45 % of the contrast), and made it heterogeneous (necrosis): the
    baseline model finds half the lesion; the adapted model follows it and, on the baseline, calls
    nothing outside the GTV lesion, so it is taken."""
    images, gtv, vertebra = baseline
    matrix = _follow_up_to_baseline()
    follow_grid = _grid((-46.0, -48.0, -33.0))
    t1, t2, _, truth = _scene(follow_grid, BASELINE_RADIUS, matrix, seed=4)
    adc = _adc(follow_grid, BASELINE_RADIUS, matrix, 850.0, seed=6)
    inside = sitk.GetArrayViewFromImage(truth).astype(bool)
    rng = np.random.default_rng(9)
    treated = []
    # (image, spread inside the treated lesion, background value the lesion moved towards)
    for image, spread, towards in ((t1, 80.0, 417.0), (t2, 100.0, 300.0), (adc, 300.0, 1350.0)):
        array = sitk.GetArrayFromImage(image)
        array[inside] += 0.45 * (towards - array[inside].mean())
        array[inside] += rng.normal(0.0, spread, int(inside.sum()))
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        treated.append(out)
    base_adc = _adc(images[0], BASELINE_RADIUS, np.eye(4), 850.0, seed=5)
    result = refine_lesion([*images, base_adc], gtv, treated, matrix, baseline_vertebra=vertebra)
    true_volume = mask_volume_ml(truth)
    adapted = next(n for n in result.notes if n.startswith("model adapted"))
    assert "on the baseline it calls 0% of the GTV's volume outside the GTV lesion" in adapted
    assert abs(result.volume_ml - true_volume) / true_volume < 0.10, (result.volume_ml, true_volume)
    # the baseline model alone halves the lesion, and hesitates over it
    unadapted = refine_lesion(
        [*images, base_adc],
        gtv,
        treated,
        matrix,
        baseline_vertebra=vertebra,
        settings=RefinementSettings(adapt_iterations=0),
    )
    assert unadapted.volume_ml < 0.7 * true_volume
    assert unadapted.volume_range_ml[1] - unadapted.volume_range_ml[0] > unadapted.volume_ml


def test_an_adaptation_that_takes_in_tissue_present_at_baseline_is_refused(baseline) -> None:
    """After treatment the lesion looks like the neighbouring disc in both channels: adapted to
    the follow-up, the model takes the disc in, as it does on the baseline, where the disc was
    not lesion; the adaptation is refused and the baseline model's segmentation kept."""
    images, gtv, vertebra = baseline
    matrix = _follow_up_to_baseline()
    follow_grid = _grid((-46.0, -48.0, -33.0))
    t1, t2, _, truth = _scene(follow_grid, BASELINE_RADIUS, matrix, seed=4)
    inside = sitk.GetArrayViewFromImage(truth).astype(bool)
    treated = []
    for image, (tumour, disc) in zip(
        (t1, t2),
        ((SIGNAL["tumour"][0], SIGNAL["disc"][0]), (SIGNAL["tumour"][1], SIGNAL["disc"][1])),
    ):
        array = sitk.GetArrayFromImage(image)
        array[inside] += 0.6 * (disc - tumour)
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        treated.append(out)
    result = refine_lesion(images, gtv, treated, matrix, baseline_vertebra=vertebra)
    refused = next(n for n in result.notes if n.startswith("model adaptation to the follow-up"))
    assert "refused" in refused and "it takes in neighbouring tissue" in refused, result.notes
    # without the check the adapted model's lesion is the tumour and the disc next to it
    lenient = refine_lesion(
        images,
        gtv,
        treated,
        matrix,
        baseline_vertebra=vertebra,
        settings=RefinementSettings(max_baseline_false_positive=100.0),
    )
    true_volume = mask_volume_ml(truth)
    assert any(n.startswith("model adapted") for n in lenient.notes), lenient.notes
    assert lenient.volume_ml > 1.5 * true_volume
    assert result.volume_ml < true_volume < lenient.volume_ml


def test_propagation_follows_the_registration(baseline) -> None:
    _, gtv, _ = baseline
    matrix = _follow_up_to_baseline()
    follow_grid = _grid((-46.0, -48.0, -33.0))
    _, _, _, truth = _scene(follow_grid, BASELINE_RADIUS, matrix, seed=3)
    propagated = propagate_mask(gtv, follow_grid, matrix)
    a = sitk.GetArrayViewFromImage(propagated).astype(bool)
    b = sitk.GetArrayViewFromImage(truth).astype(bool)
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9
    assert abs(mask_volume_ml(propagated) - mask_volume_ml(gtv)) / mask_volume_ml(gtv) < 0.08


def test_uninformative_channels_fall_back_to_the_propagated_gtv(baseline) -> None:
    images, gtv, _ = baseline
    noise = []
    for seed, image in enumerate(images * 2):
        array = np.random.default_rng(seed).normal(500.0, 20.0, SIZE[::-1]).astype(np.float32)
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(image)
        noise.append(out)
    result = refine_lesion(noise[:2], gtv, noise[2:], np.eye(4))
    assert not result.refined
    assert result.volume_ml == result.propagated_volume_ml
    assert any("not used" in note for note in result.notes)
    assert result.outcome.startswith("refinement not used: ")


def test_errors_and_settings_validation(baseline) -> None:
    images, gtv, _ = baseline
    with pytest.raises(LesionError, match="channels"):
        refine_lesion(images, gtv, images[:1], np.eye(4))
    with pytest.raises(LesionError, match="empty"):
        refine_lesion(images, gtv * 0, images, np.eye(4))
    far = np.eye(4)
    far[0, 3] = 500.0
    with pytest.raises(LesionError, match="field of view"):
        refine_lesion(images, gtv, images, far)
    with pytest.raises(ValueError, match="reference_shell_mm"):
        RefinementSettings(reference_shell_mm=(10.0, 5.0))
    with pytest.raises(ValueError, match="max_baseline_false_positive"):
        RefinementSettings(max_baseline_false_positive=-0.1)


def test_tracking_uid_is_persistent_and_distinct() -> None:
    uid = lesion_tracking_uid(rtstruct_sop_instance_uid="1.2.3.4", roi_number=2)
    assert uid == lesion_tracking_uid(rtstruct_sop_instance_uid="1.2.3.4", roi_number=2)
    assert uid != lesion_tracking_uid(rtstruct_sop_instance_uid="1.2.3.4", roi_number=3)
    assert uid.startswith("2.25.") and len(uid) <= 64 and all(p.isdigit() for p in uid.split("."))
    roi = RoiInfo(
        number=2, name="GTV", interpreted_type="GTV", n_contours=5, frame_of_reference_uid="1.2"
    )
    lesion = make_lesion(rtstruct_sop_instance_uid="1.2.3.4", roi=roi, vertebral_level="L2")
    assert (
        lesion.tracking_id == "GTV L2"
        and lesion.tracking_uid == uid
        and lesion.vertebral_level == "L2"
    )


# --------------------------------------------------------------------------- phantom (acceptance 4)
def _phantom_images(
    root, study: str, truth: dict, roles=("t1w", "t2w", "stir")
) -> list[sitk.Image]:
    import pydicom

    from processing.series import read_series

    images = []
    for role in roles:
        folder = root / study / truth["studies"][study]["series"][role]["folder"]
        images.append(
            read_series([pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]).volume_image(0)
        )
    return images


@pytest.mark.parametrize("scenario", ["responder", "progression", "stable"])
def test_phantom_follow_up_tumour_volume_within_10_percent(make_phantom, scenario) -> None:
    """Acceptance 4: RTSTRUCT GTV on the baseline, registration, refinement on T1w/T2w/STIR."""
    import json

    import pydicom

    from processing.registration import register_rigid
    from processing.rtstruct import rtstruct_to_mask

    root = make_phantom(scenario, "standard", "small")
    truth = json.loads((root / "ground_truth.json").read_text())
    baseline = _phantom_images(root, "baseline", truth)
    follow_up = _phantom_images(root, "followup1", truth)
    gtv = rtstruct_to_mask(pydicom.dcmread(root / "rt" / "rtstruct.dcm"), "GTV", baseline[1])
    registration = register_rigid(baseline[1], follow_up[1], region=gtv)
    result = refine_lesion(baseline, gtv, follow_up, registration.matrix_moving_to_fixed)
    tumour = truth["studies"]["followup1"]["tumour"]
    assert result.refined, result.notes
    for true_volume in (tumour["volume_ml_continuous"], tumour["volume_ml_voxels_t2w"]):
        assert abs(result.volume_ml - true_volume) / true_volume < 0.10, (
            result.volume_ml,
            true_volume,
        )
    # the change is measured, not carried over from the baseline
    true_change = (
        tumour["volume_ml_voxels_t2w"]
        / truth["studies"]["baseline"]["tumour"]["volume_ml_voxels_t2w"]
    )
    measured_change = result.volume_ml / result.baseline_volume_ml
    assert abs(measured_change - true_change) < 0.10, (measured_change, true_change)


def test_phantom_responder_with_adc_channel_volume_within_10_percent(make_phantom) -> None:
    """Regression: the responder's tumour ADC rises ~35 % after treatment; with ADC among the
    channels, the baseline-only model shaved the lesion (-13.5 %); the follow-up adaptation keeps
    the volume within 10 %."""
    import json

    import pydicom

    from processing.dwi import AdcModel
    from processing.registration import register_rigid, resample_onto
    from processing.rtstruct import rtstruct_to_mask
    from processing.series import read_series

    root = make_phantom("responder", "standard", "small")
    truth = json.loads((root / "ground_truth.json").read_text())

    def channels(study: str) -> list[sitk.Image]:
        anatomy = _phantom_images(root, study, truth, roles=("t2w", "t1w", "stir"))
        folder = root / study / truth["studies"][study]["series"]["dwi"]["folder"]
        dwi = read_series([pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))])
        fit = AdcModel(dwi.b_values, max_b=1000.0).fit(np.moveaxis(dwi.array, 0, -1))
        adc = sitk.GetImageFromArray(np.nan_to_num(fit.adc * 1e6).astype(np.float32))  # um2/s
        adc.CopyInformation(dwi.volume_image(0))
        on_anatomy = resample_onto(adc, anatomy[0])
        return [*anatomy, on_anatomy]

    baseline, follow_up = channels("baseline"), channels("followup1")
    gtv = rtstruct_to_mask(pydicom.dcmread(root / "rt" / "rtstruct.dcm"), "GTV", baseline[0])
    registration = register_rigid(baseline[0], follow_up[0], region=gtv)
    result = refine_lesion(baseline, gtv, follow_up, registration.matrix_moving_to_fixed)
    true_volume = truth["studies"]["followup1"]["tumour"]["volume_ml_voxels_t2w"]
    assert result.refined, result.notes
    assert abs(result.volume_ml - true_volume) / true_volume < 0.10, (result.volume_ml, true_volume)


#: spinal canal behind the column (body coordinates): centre (x, y), radius (mm), and its
#: CSF-like (T1w, T2w) signal
CANAL = (0.0, 25.0, 6.0)
CSF = (200.0, 900.0)


def _with_canal(t1, t2, to_body: np.ndarray, epidural: bool, seed: int, through_wall=False):
    """The scene's T1w/T2w with a canal (CSF), and in it, when ``epidural``, tumour in its outer
    2 mm on the vertebral body's side over 15 mm of its length: an epidural extension 10-22 mm
    behind the baseline lesion's edge; ``through_wall``: also in the 2 mm of bone outside the
    canal there (where it broke through). Returns (T1w, T2w, canal mask, epidural mask)."""
    grid = t1
    k, j, i = np.indices(SIZE[::-1]).astype(float)
    index = np.stack([i, j, k], axis=-1) * np.asarray(SPACING)
    points = np.asarray(grid.GetOrigin()) + index @ np.asarray(grid.GetDirection()).reshape(3, 3).T
    body = points @ to_body[:3, :3].T + to_body[:3, 3]
    x, y, z = body[..., 0], body[..., 1], body[..., 2]
    canal = (x - CANAL[0]) ** 2 + (y - CANAL[1]) ** 2 < CANAL[2] ** 2
    # epidural: in the canal's outer 2 mm (outside the dura), on the side of the vertebral body
    rho = np.hypot(x - CANAL[0], y - CANAL[1])
    extension = canal & (rho >= CANAL[2] - 2.0) & (y < CANAL[1]) & (np.abs(z) < 7.5) & epidural
    if through_wall:
        extension |= (rho >= CANAL[2]) & (rho < CANAL[2] + 2.0) & (y < CANAL[1]) & (np.abs(z) < 7.5)
    rng = np.random.default_rng(seed)
    out = []
    for c, image in enumerate((t1, t2)):
        array = sitk.GetArrayFromImage(image)
        array[canal] = CSF[c] + rng.normal(0.0, 20.0, int(canal.sum()))
        array[extension] = SIGNAL["tumour"][c] + rng.normal(0.0, 20.0, int(extension.sum()))
        new = sitk.GetImageFromArray(array)
        new.CopyInformation(image)
        out.append(new)
    canal_mask, extension_mask = _masks(grid, canal, extension)
    return out[0], out[1], canal_mask, extension_mask


def test_an_epidural_extension_beyond_the_search_margin_is_found_in_the_canal(baseline) -> None:
    """A new epidural component lies in the canal 10-22 mm behind the lesion's edge, mostly
    beyond the 10 mm search margin: without the canal it is not measured; with the canal (the
    cord contour's epidural space) the search reaches into it and the volume is the lesion plus
    the extension.
    A canal without tumour adds nothing (its CSF is background the model learnt)."""
    images, gtv, _ = baseline
    base_t1, base_t2, canal, _ = _with_canal(*images, np.eye(4), epidural=False, seed=11)
    matrix = _follow_up_to_baseline()
    follow_grid = _grid((-46.0, -48.0, -33.0))
    t1, t2, _, truth = _scene(follow_grid, BASELINE_RADIUS, matrix, seed=12)
    f1, f2, _, extension = _with_canal(t1, t2, matrix, epidural=True, seed=13)
    lesion_ml, extension_ml = mask_volume_ml(truth), mask_volume_ml(extension)
    assert extension_ml > 0.4
    without = refine_lesion([base_t1, base_t2], gtv, [f1, f2], matrix)
    assert abs(without.volume_ml - lesion_ml) / lesion_ml < 0.10, without.notes
    found = refine_lesion([base_t1, base_t2], gtv, [f1, f2], matrix, baseline_canal=canal)
    expected = lesion_ml + extension_ml
    assert abs(found.volume_ml - expected) / expected < 0.10, (found.volume_ml, expected)
    # found where it lies, 10-22 mm away (reach 20 mm; on 1.5 mm voxels the 2 mm sleeve keeps
    # about two thirds of a 2 mm thick extension's voxels, the volume is still within 10 %)
    assert mask_volume_ml(sitk.And(found.mask, extension)) > 0.6 * extension_ml
    g1, g2, _, _ = _with_canal(t1, t2, matrix, epidural=False, seed=13)
    control = refine_lesion([base_t1, base_t2], gtv, [g1, g2], matrix, baseline_canal=canal)
    assert abs(control.volume_ml - lesion_ml) / lesion_ml < 0.10, control.notes


def _coarse_adc(grid: sitk.Image, to_body: np.ndarray, extension: sitk.Image, seed: int):
    """An ADC-like channel (1e-6 mm2/s) acquired coarser than the anatomy: tissue values
    (tumour 700, marrow 430, disc 1700, soft tissue 1400, canal CSF 3000, the extension tumour)
    blurred by a 2.5 mm Gaussian, as a 3 mm diffusion grid resampled onto the anatomy's is."""
    values = sitk.GetArrayFromImage(_adc(grid, BASELINE_RADIUS, to_body, 700.0, seed=seed))
    k, j, i = np.indices(SIZE[::-1]).astype(float)
    index = np.stack([i, j, k], axis=-1) * np.asarray(SPACING)
    points = np.asarray(grid.GetOrigin()) + index @ np.asarray(grid.GetDirection()).reshape(3, 3).T
    body = points @ to_body[:3, :3].T + to_body[:3, 3]
    canal = (body[..., 0] - CANAL[0]) ** 2 + (body[..., 1] - CANAL[1]) ** 2 < CANAL[2] ** 2
    values[canal] = 3000.0
    values[sitk.GetArrayFromImage(extension) > 0] = 700.0
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.CopyInformation(grid)
    return sitk.SmoothingRecursiveGaussian(image, 2.5)


def test_in_the_epidural_space_only_the_sharp_channels_tell_the_lesion(baseline) -> None:
    """A 2 mm thick epidural extension beside the CSF: a diffusion-like channel on a coarser grid
    mixes the CSF into it, and the full model rejects most of it; told by the anatomical
    channels alone there (``canal_channels``), it is found and the volume is right."""
    images, gtv, _ = baseline
    base_t1, base_t2, canal, no_extension = _with_canal(*images, np.eye(4), epidural=False, seed=11)
    base_adc = _coarse_adc(base_t1, np.eye(4), no_extension, seed=21)
    matrix = _follow_up_to_baseline()
    t1, t2, _, truth = _scene(_grid((-46.0, -48.0, -33.0)), BASELINE_RADIUS, matrix, seed=12)
    f1, f2, _, extension = _with_canal(t1, t2, matrix, epidural=True, seed=13)
    f_adc = _coarse_adc(f1, matrix, extension, seed=22)
    expected = mask_volume_ml(truth) + mask_volume_ml(extension)
    args = ([base_t1, base_t2, base_adc], gtv, [f1, f2, f_adc], matrix)
    blurred = refine_lesion(*args, baseline_canal=canal)
    sharp = refine_lesion(*args, baseline_canal=canal, canal_channels=[0, 1])
    found_blurred = mask_volume_ml(sitk.And(blurred.mask, extension))
    found_sharp = mask_volume_ml(sitk.And(sharp.mask, extension))
    assert found_blurred < 0.5 * mask_volume_ml(extension), blurred.notes
    assert found_sharp > 0.6 * mask_volume_ml(extension), sharp.notes
    assert abs(sharp.volume_ml - expected) / expected < 0.10, (sharp.volume_ml, expected)
    assert any("told by 2 of the 3 channels" in n for n in sharp.notes)


def test_an_epidural_extension_through_the_canal_wall_is_found_there(baseline) -> None:
    """The extension also fills the 2 mm of bone outside the canal where it broke through,
    beyond the search margin: the final model searches ``canal_wall_mm`` around the canal near
    the lesion and finds it; with the wall search off, that part is missed."""
    images, gtv, _ = baseline
    base_t1, base_t2, canal, _ = _with_canal(*images, np.eye(4), epidural=False, seed=11)
    matrix = _follow_up_to_baseline()
    t1, t2, _, truth = _scene(_grid((-46.0, -48.0, -33.0)), BASELINE_RADIUS, matrix, seed=12)
    f1, f2, _, extension = _with_canal(t1, t2, matrix, epidural=True, seed=13, through_wall=True)
    lesion = sitk.Or(truth, extension)
    expected = mask_volume_ml(lesion)
    args = ([base_t1, base_t2], gtv, [f1, f2], matrix)
    off = refine_lesion(*args, baseline_canal=canal, settings=RefinementSettings(canal_wall_mm=0))
    on = refine_lesion(*args, baseline_canal=canal)
    missed_off = expected - mask_volume_ml(sitk.And(off.mask, lesion))
    missed_on = expected - mask_volume_ml(sitk.And(on.mask, lesion))
    assert missed_off > 0.15 * mask_volume_ml(extension), off.notes
    assert missed_on < 0.5 * missed_off, (missed_on, missed_off)
    assert abs(on.volume_ml - expected) / expected < 0.10, (on.volume_ml, expected)
    assert any("mm of bone around the canal" in n for n in on.notes)


def _three_tissue_scene(grid: sitk.Image, seed: int) -> tuple[list[sitk.Image], sitk.Image]:
    """Two channels: tissue A on one side, B on the other, a slab of tissue C below the lesion
    (a disc). C equals the lesion in the first channel and lies 2.5 noise standard deviations
    from it in the second, between A and B: one Gaussian over A, B and C is too wide to hold C
    apart from the lesion, a mixture with a component for C does."""
    k, j, i = np.indices(SIZE[::-1]).astype(float)
    points = np.asarray(grid.GetOrigin()) + np.stack([i, j, k], axis=-1) * np.asarray(SPACING)
    x, z = points[..., 0], points[..., 2]
    tumour = np.linalg.norm(points - TUMOUR_CENTRE, axis=-1) < BASELINE_RADIUS
    slab = (z < -BASELINE_RADIUS) & (z > -BASELINE_RADIUS - 9.0) & ~tumour
    rng = np.random.default_rng(seed)
    channels = []
    for a, b, c, lesion in ((500.0, 500.0, 300.0, 300.0), (100.0, 500.0, 400.0, 300.0)):
        signal = np.where(x < TUMOUR_CENTRE[0], a, b)
        signal[slab] = c
        signal[tumour] = lesion
        signal = signal + rng.normal(0.0, 40.0, signal.shape)
        image = sitk.GetImageFromArray(signal.astype(np.float32))
        image.CopyInformation(grid)
        channels.append(image)
    (mask,) = _masks(grid, tumour)
    return channels, mask


def test_background_tissue_one_mixture_component_misses_gets_more_components() -> None:
    """The baseline model that calls background tissue lesion on the baseline, where the
    lesion is known, is fitted again with more background components (a disc beside a large
    lesion, which four components left out on the full-size phantoms)."""
    grid = _grid(BASELINE_ORIGIN)
    images, gtv = _three_tissue_scene(grid, seed=11)
    follow, truth = _three_tissue_scene(grid, seed=12)
    true_volume = mask_volume_ml(truth)
    one = refine_lesion(
        images,
        gtv,
        follow,
        np.eye(4),
        settings=RefinementSettings(background_components=1, max_background_components=1),
    )
    more = refine_lesion(
        images, gtv, follow, np.eye(4), settings=RefinementSettings(background_components=1)
    )
    assert one.training_dice < 0.9 and _dice(one.mask, truth) < 0.9, one.notes
    assert one.volume_ml > 1.3 * true_volume
    chosen = next(n for n in more.notes if n.startswith("intensity model"))
    assert "3 background components; background components tried on the baseline: 1:" in chosen
    assert more.training_dice > 0.95 and _dice(more.mask, truth) > 0.95, more.notes
    assert more.volume_ml == pytest.approx(true_volume, rel=0.05)


def _dice(a: sitk.Image, b: sitk.Image) -> float:
    x, y = (sitk.GetArrayViewFromImage(m).astype(bool) for m in (a, b))
    return 2.0 * np.count_nonzero(x & y) / (np.count_nonzero(x) + np.count_nonzero(y))
