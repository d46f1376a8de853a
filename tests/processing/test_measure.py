"""processing.measure: volumes, diameters and map statistics against geometric known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from processing.errors import InputError
from processing.measure import (
    hottest_sphere_mean,
    lesion_diameters,
    lesion_volume_ml,
    lowest_fraction_mean,
    map_statistics,
    measure_lesion,
)
from processing.radiomics import RadiomicsCache, RadiomicsSettings, default_course_settings


def _image(array: np.ndarray, spacing=(1.0, 1.0, 1.0), direction=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    if direction is not None:
        image.SetDirection(direction)
    return image


def _box(shape=(40, 50, 60), z=(5, 35), y=(10, 30), x=(20, 30)) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    a[z[0] : z[1], y[0] : y[1], x[0] : x[1]] = 1
    return a


def test_box_volume_and_diameters_axial_grid():
    # 10 x 20 x 30 voxels of 1 x 1 x 2 mm: 10 x 20 x 60 mm
    mask = _image(_box(), spacing=(1.0, 1.0, 2.0))
    assert lesion_volume_ml(mask) == pytest.approx(10 * 20 * 60 / 1000)
    axial, craniocaudal, d3 = lesion_diameters(mask)
    assert axial == pytest.approx(math.hypot(10, 20))
    assert craniocaudal == pytest.approx(60.0)
    assert d3 == pytest.approx(math.sqrt(10**2 + 20**2 + 60**2))


def test_box_on_a_sagittal_grid_measures_patient_axes():
    # sagittal: columns along A (patient y), rows along -S (z), slices along L (x)
    direction = (0, 0, 1, 1, 0, 0, 0, -1, 0)
    mask = _image(_box(), spacing=(0.8, 1.5, 3.0), direction=direction)
    axial, craniocaudal, d3 = lesion_diameters(mask)
    a_p, s_i, l_r = 10 * 0.8, 20 * 1.5, 30 * 3.0
    assert craniocaudal == pytest.approx(s_i)
    assert axial == pytest.approx(math.hypot(a_p, l_r))
    assert d3 == pytest.approx(math.sqrt(a_p**2 + s_i**2 + l_r**2))


def test_oblique_sphere_diameters_within_one_voxel():
    zz, yy, xx = np.mgrid[:48, :48, :48]
    sphere = (((zz - 24) ** 2 + (yy - 24) ** 2 + (xx - 24) ** 2) <= 12**2).astype(np.uint8)
    angle = math.radians(25)
    c, s = math.cos(angle), math.sin(angle)
    direction = (1, 0, 0, 0, c, -s, 0, s, c)  # rotated 25 degrees about x: no axis near S
    mask = _image(sphere, direction=direction)
    axial, craniocaudal, d3 = lesion_diameters(mask)
    # true diameter 24 mm; the voxelised sphere spans 25 voxels along the grid axes
    assert 24.0 <= axial <= 26.5
    assert 24.0 <= craniocaudal <= 26.5
    assert 24.5 <= d3 <= 26.8
    assert lesion_volume_ml(mask) == pytest.approx(4 / 3 * math.pi * 12**3 / 1000, rel=0.03)


def test_map_statistics_known_values_and_failed_fits_excluded():
    mask_arr = _box(shape=(20, 20, 20), z=(5, 15), y=(5, 15), x=(5, 15))  # 1000 voxels
    rng = np.random.default_rng(0)
    adc = np.full(mask_arr.shape, np.nan)
    values = rng.permutation(np.arange(1, 1001) * 1.0e-6)  # 1..1000 x 1e-6 mm2/s
    adc[mask_arr == 1] = values
    adc.flat[np.flatnonzero(mask_arr)[:10]] = np.nan  # ten failed fits
    mask, image = _image(mask_arr), _image(adc)
    stats = map_statistics(image, mask, "ADC")
    kept = np.sort(values[10:])
    assert stats.n_voxels == 990
    assert stats.unit == "mm2/s"
    assert stats.mean == pytest.approx(kept.mean())
    assert stats.median == pytest.approx(np.median(kept))
    assert stats.sd == pytest.approx(kept.std())
    assert stats.p10 == pytest.approx(np.percentile(kept, 10))
    assert stats.p90 == pytest.approx(np.percentile(kept, 90))
    assert stats.peak == pytest.approx(kept[:99].mean())  # lowest 10 % of 990 voxels
    assert "lowest 10 %" in stats.peak_definition


def test_a_map_without_a_finite_value_in_the_lesion_is_left_out_not_fatal():
    """A map whose fit failed everywhere in the lesion (a real cohort case: IAUC60) leaves the
    lesion and the other maps measured, with a note; an InputError from map_statistics."""
    mask_arr = _box(shape=(20, 20, 20), z=(5, 15), y=(5, 15), x=(5, 15))
    mask = _image(mask_arr)
    adc = _image(np.full(mask_arr.shape, 1.0e-3))
    iauc = _image(np.full(mask_arr.shape, np.nan))
    with pytest.raises(InputError, match="no finite IAUC60 value inside the lesion"):
        map_statistics(iauc, mask, "IAUC60")
    settings = {"ADC": RadiomicsSettings(bin_count=8), "IAUC60": RadiomicsSettings(bin_count=8)}
    measured = measure_lesion(mask, {"ADC": adc, "IAUC60": iauc}, radiomics_settings=settings)
    assert measured.volume_ml == pytest.approx(1.0)
    assert set(measured.map_statistics) == {"ADC"} and set(measured.radiomics) == {"ADC"}
    assert "IAUC60: not measured: no finite IAUC60 value inside the lesion" in (
        measured.radiomics_notes
    )


def test_lowest_fraction_mean():
    assert lowest_fraction_mean(np.arange(1.0, 101.0)) == pytest.approx(5.5)
    assert lowest_fraction_mean(np.array([3.0, 1.0])) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        lowest_fraction_mean(np.array([1.0]), fraction=0.0)


def test_hottest_1cm3_sphere_finds_the_hot_spot_not_the_neighbouring_vessel():
    shape = (50, 50, 50)
    zz, yy, xx = np.mgrid[:50, :50, :50]
    lesion = (((zz - 25) ** 2 + (yy - 25) ** 2 + (xx - 25) ** 2) <= 15**2).astype(np.uint8)
    ktrans = np.full(shape, 0.10)
    radius = (3 * 1000 / (4 * math.pi)) ** (1 / 3)  # 6.2 mm
    hot = ((zz - 25) ** 2 + (yy - 25) ** 2 + (xx - 32) ** 2) <= radius**2
    ktrans[hot] = 0.50
    ktrans[lesion == 0] = 2.0  # a vessel outside the lesion must not count
    mask, image = _image(lesion), _image(ktrans)
    assert hottest_sphere_mean(image, mask) == pytest.approx(0.50)
    stats = map_statistics(image, mask, "Ktrans")
    assert stats.peak == pytest.approx(0.50)
    assert stats.unit == "/min"
    assert stats.p90 < 0.5 and stats.mean == pytest.approx(ktrans[lesion == 1].mean())


def test_measure_lesion_fills_lesion_measurements_with_radiomics_and_small_lesion_reason():
    mask_arr = _box(shape=(20, 20, 20), z=(5, 11), y=(5, 11), x=(5, 11))
    rng = np.random.default_rng(1)
    adc = rng.normal(1.0e-3, 2.0e-4, size=mask_arr.shape)
    tiny = np.zeros_like(mask_arr)
    tiny[10, 10, 10:13] = 1  # 3 voxels
    epidural = np.zeros_like(mask_arr)
    epidural[12:14, 5:8, 5:8] = 1
    settings = {"ADC": RadiomicsSettings(bin_count=16)}
    m = measure_lesion(
        _image(mask_arr),
        {"ADC": _image(adc)},
        radiomics_settings=settings,
        epidural_mask=_image(epidural),
    )
    assert m.volume_ml == pytest.approx(0.216)
    assert m.epidural_volume_ml == pytest.approx(0.018)
    assert m.max_craniocaudal_extent_mm == pytest.approx(6.0)
    assert m.map_statistics["ADC"].n_voxels == 216
    assert "original_glcm_Contrast" in m.radiomics["ADC"]
    small = measure_lesion(_image(tiny), {"ADC": _image(adc)}, radiomics_settings=settings)
    assert "original_glcm_Contrast" not in small.radiomics["ADC"]
    assert "original_firstorder_Mean" in small.radiomics["ADC"]
    assert any("texture features not computed" in n for n in small.radiomics_notes)
    with pytest.raises(ValueError, match="no voxel"):
        measure_lesion(_image(np.zeros_like(mask_arr)))


def test_measure_lesion_radiomics_are_identical_with_a_shared_cache():
    mask_arr = _box(shape=(14, 24, 24), z=(4, 10), y=(6, 17), x=(5, 16))
    rng = np.random.default_rng(4)
    adc = rng.normal(1.0e-3, 2.0e-4, size=mask_arr.shape)
    adc[6, 8:10, 8:10] = np.nan  # failed fits
    mk = rng.normal(1.0, 0.2, size=mask_arr.shape)
    maps = {"ADC": _image(adc, spacing=(1.5, 1.5, 3.0)), "MK": _image(mk, spacing=(1.5, 1.5, 3.0))}
    mask = _image(mask_arr, spacing=(1.5, 1.5, 3.0))
    settings = default_course_settings(["ADC", "MK"], spacing_mm=1.0, bin_count=16)
    alone = {q: measure_lesion(mask, {q: maps[q]}, radiomics_settings=settings) for q in maps}
    cache = RadiomicsCache()
    for _ in range(2):  # the second round is served by the cache
        shared = measure_lesion(mask, maps, radiomics_settings=settings, radiomics_cache=cache)
        for q in maps:
            assert shared.radiomics[q] == alone[q].radiomics[q]
            assert shared.map_statistics[q] == alone[q].map_statistics[q]
        assert shared.radiomics_notes == alone["ADC"].radiomics_notes + alone["MK"].radiomics_notes


# --- where the maximum axial diameter was measured (processing.results.AxialSection) ---------


def _rectangle_section(spacing=(0.8, 1.2, 3.0)) -> sitk.Image:
    # one axial slice (z = 4) holds a 10 (x) x 6 (y) voxel rectangle; slice 3 a smaller one
    a = np.zeros((8, 30, 28), np.uint8)
    a[4, 10:16, 5:15] = 1
    a[3, 11:14, 7:12] = 1
    image = _image(a, spacing=spacing)
    image.SetOrigin((-12.0, 30.0, 100.0))
    return image


def test_axial_section_of_a_rectangle_known_corners_and_outline():
    from processing.measure import axial_section

    spacing = (0.8, 1.2, 3.0)
    mask = _rectangle_section(spacing)
    section = axial_section(mask)
    assert section is not None
    assert (section.slice_axis, section.slice_index) == (2, 4)
    # the diagonal of the voxelised rectangle: 10 x 0.8 mm by 6 x 1.2 mm
    assert section.diameter_mm == lesion_diameters(mask)[0]
    assert section.diameter_mm == pytest.approx(math.hypot(8.0, 7.2))
    ends = sorted(section.diameter_end_points_index)
    diagonals = ([(4.5, 9.5, 4.0), (14.5, 15.5, 4.0)], [(4.5, 15.5, 4.0), (14.5, 9.5, 4.0)])
    assert ends in diagonals
    physical = [mask.TransformContinuousIndexToPhysicalPoint(p) for p in ends]
    assert np.allclose(physical, sorted(section.diameter_end_points))
    # outline: the level-0.5 contour through the edge midpoints, corners cut by half a voxel
    outline = np.asarray(section.outline_index)
    assert np.array_equal(outline[0], outline[-1])  # closed
    assert set(outline[:, 2]) == {4.0}
    assert outline[:, 0].min() == 4.5 and outline[:, 0].max() == 14.5
    assert outline[:, 1].min() == 9.5 and outline[:, 1].max() == 15.5
    assert section.area_mm2 == pytest.approx((60 - 4 * 0.125) * 0.8 * 1.2)
    assert len(section.outline) == len(section.outline_index)
    first = mask.TransformContinuousIndexToPhysicalPoint(section.outline_index[0])
    assert section.outline[0] == pytest.approx(first)


def test_axial_section_of_an_ellipse_lies_along_its_major_axis():
    from processing.measure import axial_section

    zz, yy, xx = np.mgrid[0:5, 0:40, 0:40]
    a = (((xx - 20) / 12.0) ** 2 + ((yy - 18) / 5.0) ** 2 <= 1.0) & (zz == 2)
    mask = _image(a.astype(np.uint8), spacing=(1.0, 1.0, 4.0))
    section = axial_section(mask)
    assert section is not None and section.slice_index == 2
    (x0, y0, z0), (x1, y1, z1) = section.diameter_end_points_index
    assert z0 == z1 == 2.0
    # voxel corners (half-integer indices) at the ends of the major (x) axis
    assert {x0 % 1, y0 % 1, x1 % 1, y1 % 1} == {0.5}
    assert sorted([x0, x1]) == [7.5, 32.5]
    assert math.hypot(x1 - x0, y1 - y0) == pytest.approx(section.diameter_mm)
    # the outline encloses about the voxel count (corners cut), every point on the slice
    outline = np.asarray(section.outline_index)
    assert np.array_equal(outline[0], outline[-1])
    assert section.area_mm2 == pytest.approx(a.sum(), rel=0.05)
    assert (outline[:, 0] >= 7.5).all() and (outline[:, 0] <= 32.5).all()


def test_axial_section_largest_contour_and_measure_lesion_carries_it():
    a = np.zeros((3, 30, 30), np.uint8)
    a[1, 2:6, 2:6] = 1  # small component
    a[1, 10:25, 12:20] = 1  # large one
    mask = _image(a)
    result = measure_lesion(mask)
    section = result.axial_section
    assert section is not None and section.diameter_mm == result.max_axial_diameter_mm
    outline = np.asarray(section.outline_index)
    assert outline[:, 0].min() == 11.5 and outline[:, 1].min() == 9.5  # the large component
    # the diameter spans both components (corners of the whole section)
    assert result.max_axial_diameter_mm == pytest.approx(math.hypot(18.0, 23.0))


def test_axial_section_is_none_when_the_mask_is_resampled():
    from processing.measure import axial_section

    angle = math.radians(30.0)  # no image axis within 8 degrees of S
    c, s = math.cos(angle), math.sin(angle)
    mask = _image(_box(), spacing=(1.0, 1.0, 2.0), direction=(1, 0, 0, 0, c, -s, 0, s, c))
    assert axial_section(mask) is None
    assert measure_lesion(mask).axial_section is None
    assert axial_section(_image(np.zeros((3, 4, 5), np.uint8))) is None


def test_axial_section_on_a_slightly_tilted_axial_grid():
    from processing.measure import axial_section

    angle = math.radians(5.0)  # within 8 degrees: no resampling, sections are the mask's slices
    c, s = math.cos(angle), math.sin(angle)
    mask = _rectangle_section()
    mask.SetDirection((1, 0, 0, 0, c, -s, 0, s, c))
    section = axial_section(mask)
    assert section is not None and (section.slice_axis, section.slice_index) == (2, 4)
    assert section.diameter_mm == lesion_diameters(mask)[0]
