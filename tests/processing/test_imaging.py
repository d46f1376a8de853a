"""Image helpers of the analysis (processing.imaging) on small synthetic images."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from processing.imaging import (
    crop_to_lesion,
    dilate_mm,
    fill_non_finite,
    grid_groups,
    grid_key,
    is_sagittal,
    mask_intersection,
    on_grid,
    same_grid,
)


def _image(
    array: np.ndarray,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _cube_mask(shape=(20, 30, 40), lo=(8, 10, 15), hi=(12, 16, 25)) -> sitk.Image:
    array = np.zeros(shape, np.uint8)
    array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1
    return _image(array)


def test_grid_key_and_same_grid_tolerate_rounding_only():
    a = _image(np.zeros((4, 5, 6), np.float32), origin=(1.0, 2.0, 3.0))
    b = _image(np.ones((4, 5, 6), np.float32), origin=(1.0002, 2.0, 3.0))
    c = _image(np.zeros((4, 5, 6), np.float32), origin=(1.5, 2.0, 3.0))
    assert grid_key(a) == grid_key(b) and hash(grid_key(a)) == hash(grid_key(b))
    assert same_grid(a, b)
    assert grid_key(a) != grid_key(c) and not same_grid(a, c)
    assert not same_grid(a, _image(np.zeros((4, 5, 7), np.float32)))
    assert grid_key(a)[0] == (6, 5, 4)  # SimpleITK order (x, y, z)


def test_on_grid_casts_on_the_same_grid_and_resamples_otherwise():
    values = np.arange(4 * 6 * 6, dtype=np.float64).reshape(4, 6, 6)
    same = on_grid(_image(values), _image(np.zeros((4, 6, 6))))
    assert same.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(same), values.astype(np.float32))
    # a coarser map onto a finer reference: linear values inside, NaN outside its field of view
    coarse = _image(np.full((2, 3, 3), 7.0), spacing=(2.0, 2.0, 2.0))
    fine = on_grid(coarse, _image(np.zeros((8, 8, 8)), origin=(0.0, 0.0, 0.0)))
    out = sitk.GetArrayFromImage(fine)
    assert out.shape == (8, 8, 8)
    assert np.all(out[:3, :3, :3] == 7.0)
    assert np.isnan(out[-1, -1, -1])


def test_fill_non_finite_uses_the_median_of_finite_voxels():
    array = np.array([[[1.0, 2.0, np.nan], [4.0, np.inf, 6.0]]], dtype=np.float32)
    filled = sitk.GetArrayFromImage(fill_non_finite(_image(array, origin=(3.0, 0.0, 0.0))))
    np.testing.assert_array_equal(filled, [[[1.0, 2.0, 3.0], [4.0, 3.0, 6.0]]])  # median 3
    finite = _image(np.ones((2, 2, 2), np.float32))
    assert fill_non_finite(finite) is finite  # nothing to fill: the same image
    nothing = sitk.GetArrayFromImage(fill_non_finite(_image(np.full((1, 2, 2), np.nan))))
    assert np.all(nothing == 0.0)


def test_crop_to_lesion_keeps_the_margin_and_clips_at_the_border():
    mask = _cube_mask()
    cropped = crop_to_lesion(mask, mask, margin_mm=3.0)
    # x: 15..25 (+-3) -> 12..28, y: 10..16 -> 7..19, z: 8..12 -> 5..15
    assert cropped.GetSize() == (16, 12, 10)
    assert cropped.GetOrigin() == (12.0, 7.0, 5.0)
    assert sitk.GetArrayViewFromImage(cropped).sum() == sitk.GetArrayViewFromImage(mask).sum()
    # the default margin (20 mm) reaches every border of this small image: nothing is cut
    assert crop_to_lesion(mask, mask).GetSize() == mask.GetSize()
    empty = _image(np.zeros((4, 4, 4), np.uint8))
    assert crop_to_lesion(empty, empty) is empty


def test_grid_groups_measure_each_map_on_its_own_grid():
    mask = _cube_mask()
    anatomy = _image(np.zeros((20, 30, 40), np.float32))
    same_grid_map = _image(np.ones((20, 30, 40), np.float32))
    coarse = _image(np.full((10, 15, 20), 2.0, np.float32), spacing=(2.0, 2.0, 2.0))
    # a map whose grid holds no lesion voxel falls back to the anatomical grid
    elsewhere = _image(np.full((4, 4, 4), 3.0, np.float32), origin=(-100.0, -100.0, -100.0))
    groups = grid_groups(anatomy, mask, {"T2w": same_grid_map, "ADC": coarse, "MK": elsewhere})
    assert len(groups) == 2
    (anat_mask, anat_maps), (coarse_mask, coarse_maps) = groups
    assert sorted(anat_maps) == ["MK", "T2w"] and sorted(coarse_maps) == ["ADC"]
    assert anat_mask.GetSize() == anat_maps["T2w"].GetSize() == anat_maps["MK"].GetSize()
    assert coarse_mask.GetSpacing() == (2.0, 2.0, 2.0)
    assert coarse_mask.GetSize() == coarse_maps["ADC"].GetSize()
    assert sitk.GetArrayViewFromImage(coarse_mask).any()
    assert np.all(np.isnan(sitk.GetArrayViewFromImage(anat_maps["MK"])))  # outside its view


def test_masks_intersection_and_dilation():
    mask = _cube_mask()
    other = _cube_mask(lo=(10, 10, 15), hi=(20, 30, 40))
    both = mask_intersection(mask, other)
    assert both.GetPixelID() == sitk.sitkUInt8
    assert int(sitk.GetArrayViewFromImage(both).sum()) == 2 * 6 * 10
    point = np.zeros((9, 9, 9), np.uint8)
    point[4, 4, 4] = 1
    dilated = sitk.GetArrayFromImage(dilate_mm(_image(point, spacing=(1.0, 1.0, 2.0)), 2.0))
    # radius 2 voxels in x and y, 1 in z (2 mm / 2 mm); at least one voxel on every axis
    assert dilated[4, 4, 2] and dilated[4, 2, 4] and not dilated[4, 4, 1]
    assert dilated[3, 4, 4] and not dilated[2, 4, 4]


def test_is_sagittal_reads_the_slice_normal():
    axial = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    # sagittal: rows along y, columns along -z, slices along x
    sagittal = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)
    assert not is_sagittal(axial)
    assert is_sagittal(sagittal)
