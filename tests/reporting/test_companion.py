"""Map companion series (reporting.companion): one 3-D MR image per map frame, maps built on it.

Checked on every phantom vendor (classic standard/Siemens/GE/Philips, Enhanced MR), on the real
Siemens mosaic and United Imaging tiled DWI series, and on the chain's own outputs: companion
images and maps pass dciodvfy with 0 errors, dcmqi's ``paramap2itkimage`` reads the maps with
their values unchanged, every map frame derives from exactly one companion image at its position,
and the node sets its companion images aside when they come back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import dcmread
from pydicom.dataset import Dataset

from processing import classify
from processing.classify import classify_study, companion_set_aside_reason
from processing.series import (
    Geometry,
    SeriesVolume,
    SourceFrame,
    VolumeMetadata,
    read_series,
)
from reporting import companion as rc
from reporting import seg as rseg
from reporting.companion import CompanionError, build_companion_series, select_volumes
from reporting.pmap import build_parametric_map
from tests.reporting.tools import dciodvfy, dcmqi

PARAMETRIC_MAP = "1.2.840.10008.5.1.4.1.1.30"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
VENDORS = ["standard", "siemens", "ge", "philips", "enhanced"]


# ------------------------------------------------------------------------------ selection rules


def _volume(volumes: list[VolumeMetadata], values: list[float]) -> SeriesVolume:
    """A 2-slice, 3x2 synthetic series: volume v has the constant value values[v]."""
    n = len(volumes)
    array = np.stack([np.full((2, 3, 2), v, dtype=np.float32) for v in values])
    frames = tuple(
        tuple(SourceFrame(MR_IMAGE, f"1.2.3.{v}.{k}") for k in range(2)) for v in range(n)
    )
    return SeriesVolume(
        series_instance_uid="1.2.3",
        study_instance_uid="1.2",
        frame_of_reference_uid="1.2.9",
        modality="MR",
        sop_class_uid=MR_IMAGE,
        series_number=5,
        series_description="test",
        array=array,
        geometry=Geometry((0.0, 0.0, 0.0), (1.0, 1.0, 4.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (2, 3, 2)),
        volumes=tuple(volumes),
        source_frames=frames,
    )


def _all(volume: SeriesVolume) -> dict[str, Dataset]:
    return {f.sop_instance_uid: Dataset() for frames in volume.source_frames for f in frames}


def test_diffusion_uses_the_mean_of_the_b0_volumes() -> None:
    volume = _volume(
        [VolumeMetadata(b_value=b) for b in (0.0, 800.0, 0.002, 50.0)], [100, 20, 120, 90]
    )
    selection = select_volumes(volume, _all(volume))
    assert selection.volumes == (0, 2) and selection.combine == "mean"
    assert selection.label == "b=0"
    assert float(rc._combined(volume, selection).max()) == pytest.approx(110.0)


def test_diffusion_without_b0_uses_the_trace_of_the_lowest_shell() -> None:
    volume = _volume([VolumeMetadata(b_value=b) for b in (50.0, 60.0, 50.0, 800.0)], [8, 2, 4, 1])
    selection = select_volumes(volume, _all(volume))
    assert selection.volumes == (0, 1, 2) and selection.combine == "geometric mean"
    assert float(rc._combined(volume, selection).max()) == pytest.approx(4.0)  # (8*2*4)^(1/3)


def test_dynamic_series_uses_the_pre_contrast_frames() -> None:
    # Philips writes b = 0 in every image: a dynamic series, not a diffusion series
    volume = _volume(
        [VolumeMetadata(b_value=0.0, flip_angle=15.0, time=5.0 * t) for t in range(6)],
        [10, 12, 14, 90, 80, 70],
    )
    selection = select_volumes(volume, _all(volume), pre_contrast_frames=3)
    assert selection.volumes == (0, 1, 2) and selection.label == "pre-contrast mean"
    assert select_volumes(volume, _all(volume)).volumes == (0,)
    with pytest.raises(CompanionError):
        select_volumes(volume, _all(volume), pre_contrast_frames=0)


def test_vfa_series_uses_its_largest_flip_angle_among_its_own_images() -> None:
    volume = _volume([VolumeMetadata(flip_angle=f) for f in (2.0, 15.0, 10.0)], [1, 2, 3])
    assert select_volumes(volume, _all(volume)).volumes == (1,)
    # one series per flip angle: only the volumes of the referenced series count
    own = {uid: ds for uid, ds in _all(volume).items() if uid.startswith("1.2.3.0.")}
    assert select_volumes(volume, own).volumes == (0,)
    with pytest.raises(CompanionError):
        select_volumes(volume, {})


def test_node_constants_agree_between_processing_and_reporting() -> None:
    assert classify.NODE_MANUFACTURER == rseg.MANUFACTURER
    assert classify.NODE_MODEL_NAME == rseg.MODEL_NAME
    code = rc.EXTRACTED_CODE
    assert classify.COMPANION_DERIVATION_CODE == (code.value, code.scheme_designator)


# ------------------------------------------------------------------------------ shared checks


def _position(ds: Dataset) -> np.ndarray:
    return np.asarray(ds.ImagePositionPatient, dtype=float)


def check_companion(
    images: list[Dataset], volume: SeriesVolume, folder: Path, *, no_warnings: bool = True
) -> None:
    """Images on the series grid, in slice order, valid (dciodvfy on first and last: 0 errors,
    and no warning unless ``no_warnings`` is False — real exports carry values dciodvfy warns
    about, e.g. a Patient's Name without a caret, that the companion copies)."""
    geometry = volume.geometry
    size_x, size_y, size_z = geometry.size
    assert len(images) == size_z
    direction = geometry.direction_matrix
    for k, ds in enumerate(images):
        assert str(ds.SOPClassUID) == MR_IMAGE
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert (ds.Rows, ds.Columns) == (size_y, size_x)
        np.testing.assert_allclose(_position(ds), geometry.index_to_lps((0, 0, k)), atol=1e-3)
        np.testing.assert_allclose(
            np.asarray(ds.ImageOrientationPatient, float),
            np.concatenate([direction[:, 0], direction[:, 1]]),
            atol=1e-6,
        )
        np.testing.assert_allclose(
            np.asarray(ds.PixelSpacing, float), [geometry.spacing[1], geometry.spacing[0]]
        )
        assert ds.FrameOfReferenceUID == volume.frame_of_reference_uid
        assert ds.StudyInstanceUID == volume.study_instance_uid
        assert ds.SeriesInstanceUID == images[0].SeriesInstanceUID
        assert ds.SeriesInstanceUID != volume.series_instance_uid
        assert ds.DerivationCodeSequence[0].CodeValue == "113091"
        refs = ds.SourceImageSequence
        assert refs and all(
            r.ReferencedSOPInstanceUID
            in {f.sop_instance_uid for v in volume.source_frames for f in v}
            for r in refs
        )
        if volume.source_frames[0][0].frame_number is not None:
            assert all("ReferencedFrameNumber" in r for r in refs)
        assert companion_set_aside_reason(ds) is not None
    for k in sorted({0, len(images) - 1}):
        path = folder / f"companion-{k}.dcm"
        images[k].save_as(path, enforce_file_format=True)
        found = dciodvfy(path)
        assert not (no_warnings and found), found


def check_map_on_companion(
    images: list[Dataset], values: np.ndarray, folder: Path, prefix: str
) -> None:
    """Build an ADC map on the companion; one derivation item per frame at the same position,
    values unchanged through highdicom and dcmqi, 0 dciodvfy errors."""
    pmap = build_parametric_map(
        images, values, "ADC", provenance={"b_values": [0, 1000]}, algorithm_version="0.1.0"
    )
    path = folder / f"{prefix}-pm.dcm"
    pmap.save_as(path)
    dciodvfy(path)
    back = dcmread(path)
    assert [str(s.SeriesInstanceUID) for s in back.ReferencedSeriesSequence] == [
        str(images[0].SeriesInstanceUID)
    ]
    by_uid = {str(ds.SOPInstanceUID): (k, ds) for k, ds in enumerate(images)}
    stored = back.pixel_array.astype(np.float64)
    expected = np.where(np.isfinite(values), values.astype(np.float64) * 1e6, 0.0)
    seen = set()
    for i, item in enumerate(back.PerFrameFunctionalGroupsSequence):
        sources = [s for d in item.DerivationImageSequence for s in d.SourceImageSequence]
        assert len(sources) == 1
        k, ds = by_uid[str(sources[0].ReferencedSOPInstanceUID)]
        seen.add(k)
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        np.testing.assert_allclose(position, _position(ds), atol=1e-4)
        np.testing.assert_allclose(stored[i], expected[k], rtol=1e-6)
    assert seen == set(range(len(images)))
    dcmqi(
        "paramap2itkimage",
        "--inputDICOM",
        str(path),
        "--outputDirectory",
        str(folder),
        "--prefix",
        prefix,
    )
    image = sitk.ReadImage(str(folder / f"{prefix}-pmap.nrrd"))
    read = sitk.GetArrayFromImage(image).astype(np.float64)
    for k, ds in enumerate(images):
        index = image.TransformPhysicalPointToIndex(tuple(float(v) for v in _position(ds)))
        np.testing.assert_allclose(read[index[2]], expected[k], rtol=1e-6)


def _values(volume: SeriesVolume) -> np.ndarray:
    size_x, size_y, size_z = volume.geometry.size
    ramp = np.linspace(0.5e-3, 1.5e-3, size_x, dtype=np.float64)[None, None, :]
    slices = np.linspace(0.9, 1.1, size_z)[:, None, None]
    values = (ramp * slices * np.ones((size_z, size_y, size_x))).astype(np.float32)
    values[0, 0, 0] = np.nan
    return values


# ------------------------------------------------------------------------------ phantom vendors


@pytest.mark.slow
@pytest.mark.parametrize("vendor", VENDORS)
def test_companions_and_maps_on_phantom_series(
    vendor: str, make_phantom: Callable[..., Path], tmp_path: Path
) -> None:
    folder = make_phantom("responder", vendor, "small")
    truth = json.loads((folder / "ground_truth.json").read_text())
    series = truth["studies"]["baseline"]["series"]
    study: list[Dataset] = []
    built: list[Dataset] = []
    for role, pre in (("dwi", None), ("dce", 3), ("vfa_t1", None)):
        datasets = [
            dcmread(f) for f in sorted((folder / "baseline" / series[role]["folder"]).glob("*.dcm"))
        ]
        study.extend(datasets)
        volume = read_series(datasets)
        by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
        images = build_companion_series(
            volume, by_uid, algorithm_version="0.1.0", pre_contrast_frames=pre
        )
        work = tmp_path / role
        work.mkdir()
        check_companion(images, volume, work)
        again = build_companion_series(
            volume, by_uid, algorithm_version="0.1.0", pre_contrast_frames=pre
        )
        assert [d.SOPInstanceUID for d in again] == [d.SOPInstanceUID for d in images]
        assert all(a.PixelData == b.PixelData for a, b in zip(again, images))
        built.extend(images)
        if role == "dwi":
            check_map_on_companion(images, _values(volume), work, "adc")
            # the b = 0 volume, rounded (phantom values are integers)
            b0 = int(np.flatnonzero(volume.b_values < 5.0)[0])
            k = len(images) // 2
            np.testing.assert_array_equal(
                images[k].pixel_array, np.rint(volume.array[b0, k]).astype(np.uint16)
            )
            assert images[0].SeriesDescription.endswith("b=0, map reference")
        if role == "dce":
            assert "pre-contrast mean" in images[0].SeriesDescription
            assert len(images[0].SourceImageSequence) == 3
    # the node's own companion images coming back are set aside, roles unchanged
    plain = classify_study(study)
    with_companions = classify_study([*study, *built])
    assert {s.series_instance_uid: s.role for s in with_companions.series} == {
        s.series_instance_uid: s.role for s in plain.series
    }
    reasons = {e.sop_instance_uid: e.reason for e in with_companions.set_aside}
    for ds in built:
        assert "map companion" in reasons[str(ds.SOPInstanceUID)]


# ------------------------------------------------------------------------------ real mosaic / tiled


@pytest.mark.slow
@pytest.mark.parametrize("name", ["siemens_mosaic", "uih_dti16"])
def test_companions_of_mosaic_and_tiled_series(name: str, tmp_path: Path) -> None:
    from tests.real_data import real_data_root, real_series_dir

    real_data_root()
    folder = real_series_dir(name)
    datasets = [dcmread(f) for f in sorted(p for p in folder.rglob("*") if p.is_file())]
    datasets = [ds for ds in datasets if "PixelData" in ds]
    volume = read_series(datasets)
    assert any(f.mosaic_tile is not None for f in volume.source_frames[0])
    by_uid = {str(ds.SOPInstanceUID): ds for ds in datasets}
    images = build_companion_series(volume, by_uid, algorithm_version="0.1.0")
    check_companion(images, volume, tmp_path, no_warnings=False)
    # a companion image names the stored mosaic/tiled image(s) it was cut from
    tiles = {f.sop_instance_uid for f in volume.source_frames[0]}
    assert {r.ReferencedSOPInstanceUID for r in images[0].SourceImageSequence} <= tiles | {
        f.sop_instance_uid for v in volume.source_frames for f in v
    }
    check_map_on_companion(images, _values(volume), tmp_path, name)


# ------------------------------------------------------------------------------ the chain's outputs


@pytest.mark.slow
def test_chain_maps_reference_their_companion_series(
    analyzed_phantom: Callable[..., tuple[Path, Path]], tmp_path: Path
) -> None:
    _, out = analyzed_phantom("responder", "standard", "small")
    summary = json.loads((out / "summary.json").read_text())
    objects = {name: dcmread(out / name) for name in summary["files"]}
    companions = {
        str(ds.SOPInstanceUID): (name, ds)
        for name, ds in objects.items()
        if str(ds.SOPClassUID) == MR_IMAGE
    }
    listed = {o["sop_instance_uid"] for o in summary["outputs"]}
    assert set(companions) <= listed and companions
    descriptions = {ds.SeriesDescription for _, ds in companions.values()}
    assert any(d.endswith("b=0, map reference") for d in descriptions)
    assert any("pre-contrast mean, map reference" in d for d in descriptions)
    maps = [ds for ds in objects.values() if str(ds.SOPClassUID) == PARAMETRIC_MAP]
    assert len(maps) >= 20
    for pmap in maps:
        series = {str(s.SeriesInstanceUID) for s in pmap.ReferencedSeriesSequence}
        used = set()
        for item in pmap.PerFrameFunctionalGroupsSequence:
            sources = [s for d in item.DerivationImageSequence for s in d.SourceImageSequence]
            assert len(sources) == 1
            _, image = companions[str(sources[0].ReferencedSOPInstanceUID)]
            used.add(str(image.SOPInstanceUID))
            assert series == {str(image.SeriesInstanceUID)}
            np.testing.assert_allclose(
                np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float),
                _position(image),
                atol=1e-4,
            )
            assert (image.Rows, image.Columns) == (pmap.Rows, pmap.Columns)
        assert len(used) == int(pmap.NumberOfFrames)
        window = pmap.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
        assert float(window.WindowWidth) > 0
    # every companion image is valid (one per companion series is enough for the whole check)
    first_of_series: dict[str, str] = {}
    for name, ds in sorted(companions.values(), key=lambda item: item[0]):
        first_of_series.setdefault(str(ds.SeriesInstanceUID), name)
    for name in first_of_series.values():
        assert dciodvfy(out / name) == []
    adc = next(p for p in summary["files"] if "ADC-map" in p)
    dciodvfy(out / adc)
    dcmqi(
        "paramap2itkimage",
        "--inputDICOM",
        str(out / adc),
        "--outputDirectory",
        str(tmp_path),
        "--prefix",
        "adc",
    )
