"""Parametric Maps: codes/units per quantity, values back through highdicom and dcmqi, UIDs."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import dcmread

from reporting.codes import QUANTITIES
from reporting.pmap import DISPLAY_RANGES, build_parametric_map, display_range, map_quantity
from tests.reporting.sources import b0_frames, canon_enhanced, classic_mr_series
from tests.reporting.test_seg import _itk_slices_by_position
from tests.reporting.tools import dciodvfy, dcmqi

#: quantity -> (typical internal value, expected code value, UCUM unit, scale to that unit,
#:              model/method code or None); codes from dcmqi's pm-dwi/pm-dce context files.
EXPECTED = {
    "ADC": (1.1e-3, "113041", "um2/s", 1e6, "113250"),
    "MD": (1.2e-3, "113202", "um2/s", 1e6, "113252"),
    "Dapp": (1.3e-3, "113294", "um2/s", 1e6, "113252"),
    "MK": (0.9, "113205", "1", 1.0, "113252"),
    "Kapp": (1.1, "113206", "1", 1.0, "113252"),
    "AK": (1.2, "113208", "1", 1.0, "113252"),
    "RK": (0.8, "113207", "1", 1.0, "113252"),
    "FA": (0.3, "110808", "{0:1}", 1.0, "113252"),
    "IVIM_D": (0.43e-3, "113291", "um2/s", 1e6, "113251"),
    "IVIM_Dstar": (50e-3, "113292", "um2/s", 1e6, "113251"),
    "IVIM_f": (0.145, "113293", "{0:1}", 1.0, "113251"),
    "Ktrans": (0.12, "126312", "/min", 1.0, "126341"),
    "kep": (0.5, "126313", "/min", 1.0, "126341"),
    "ve": (0.24, "126314", "{ratio}", 1.0, "126341"),
    "vp": (0.03, "126331", "{ratio}", 1.0, "126341"),
    "T1": (1.2, "113063", "ms", 1e3, "126350"),
    "IAUC60": (8.5, "126321", "mmol/l.s", 1.0, None),
    "TTP": (95.0, "113069", "s", 1.0, None),
}


def _map(value: float, shape: tuple[int, int, int]) -> np.ndarray:
    """A map with a gradient (so orientation errors show) and one failed-fit voxel."""
    ramp = np.linspace(0.5, 1.5, shape[2], dtype=np.float64)
    slices = np.linspace(0.9, 1.1, shape[0])[:, None, None]
    values = (value * ramp[None, None, :] * slices * np.ones(shape)).astype(np.float32)
    values[0, 0, 0] = np.nan
    return values


def _frames_in_source_order(pmap: hd.pm.ParametricMap, positions: list) -> np.ndarray:
    """Stored frames re-arranged to the order of the given source positions."""
    stored = {
        tuple(round(float(v), 3) for v in f.PlanePositionSequence[0].ImagePositionPatient): i
        for i, f in enumerate(pmap.PerFrameFunctionalGroupsSequence)
    }
    pixels = pmap.pixel_array.astype(np.float64)
    return np.stack([pixels[stored[tuple(round(float(v), 3) for v in ipp)]] for ipp in positions])


def test_every_quantity_is_covered() -> None:
    assert set(EXPECTED) == set(QUANTITIES)


@pytest.mark.parametrize("quantity", sorted(EXPECTED))
def test_parametric_map_codes_units_and_values(tmp_path: Path, quantity: str) -> None:
    value, code, unit, scale, method = EXPECTED[quantity]
    sources = classic_mr_series()
    values = _map(value, (len(sources), 24, 20))
    provenance = {"model": "extended_tofts", "b_values": [0, 50, 800]}
    pmap = build_parametric_map(
        sources,
        values,
        quantity,
        provenance=provenance,
        algorithm_version="0.1.0",
        vertebral_level="T11",
    )
    path = tmp_path / f"{quantity}.dcm"
    pmap.save_as(path)
    dciodvfy(path)

    ds = dcmread(path)
    back = hd.pm.ParametricMap.from_dataset(ds)
    rwvm = back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert rwvm.MeasurementUnitsCodeSequence[0].CodeValue == unit
    assert rwvm.MeasurementUnitsCodeSequence[0].CodingSchemeDesignator == "UCUM"
    definitions = {
        d.ConceptNameCodeSequence[0].CodeValue: d.ConceptCodeSequence[0].CodeValue
        for d in rwvm.QuantityDefinitionSequence
    }
    assert definitions["246205007"] == code
    assert definitions.get("370129005") == method
    assert (float(rwvm.RealWorldValueSlope), float(rwvm.RealWorldValueIntercept)) == (1.0, 0.0)
    assert map_quantity(ds) == quantity
    anatomy = back.SharedFunctionalGroupsSequence[0].FrameAnatomySequence[0]
    assert anatomy.AnatomicRegionSequence[0].CodeValue == "12989004"  # T11 vertebra
    expected = np.where(np.isfinite(values), values.astype(np.float64) * scale, 0.0)
    stored = _frames_in_source_order(back, [s.ImagePositionPatient for s in sources])
    np.testing.assert_allclose(stored, expected, rtol=1e-6)
    # stored frames ascend along the slice normal (what dcmqi's reader assumes)
    normal = np.cross([0.0, 1.0, 0.0], [0.0, 0.0, -1.0])
    steps = np.diff(
        [
            np.dot(normal, [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient])
            for f in back.PerFrameFunctionalGroupsSequence
        ]
    )
    assert (steps > 0).all()
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    flavor = QUANTITIES[quantity].image_flavor
    assert list(ds.ImageType) == ["DERIVED", "PRIMARY", flavor, "QUANTITY"]
    # the display window: the quantity's range, else the data range (never empty)
    voi = back.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    low, high = DISPLAY_RANGES.get(quantity, (float(expected.min()), float(expected.max())))
    assert float(voi.WindowWidth) == pytest.approx(high - low, rel=1e-6)
    assert float(voi.WindowCenter) == pytest.approx((low + high) / 2.0, rel=1e-6)
    assert voi.VOILUTFunction == "LINEAR_EXACT"


def test_display_ranges() -> None:
    assert DISPLAY_RANGES["ADC"] == (0.0, 3000.0)  # um2/s
    assert DISPLAY_RANGES["Ktrans"] == (0.0, 0.5)  # /min
    for fraction in ("ve", "IVIM_f", "FA"):
        assert DISPLAY_RANGES[fraction] == (0.0, 1.0)
    assert set(DISPLAY_RANGES) <= set(QUANTITIES)
    assert display_range("ADC", 5.0, 9.0) == (0.0, 3000.0)
    assert display_range("TTP", 12.0, 240.0) == (12.0, 240.0)  # no table entry: data range
    assert display_range("TTP", 7.0, 7.0) == (7.0, 8.0)  # a constant map keeps a valid window


@pytest.mark.parametrize(
    "quantity,reverse", [("ADC", False), ("ADC", True), ("Ktrans", False), ("T1", False)]
)
def test_dcmqi_reads_parametric_map_values(tmp_path: Path, quantity: str, reverse: bool) -> None:
    """Values at every voxel position read back by dcmqi, for either source slice order."""
    value, code, unit, scale, _ = EXPECTED[quantity]
    sources = classic_mr_series()[::-1] if reverse else classic_mr_series()
    values = _map(value, (len(sources), 24, 20))
    path = tmp_path / f"{quantity}.dcm"
    build_parametric_map(
        sources, values, quantity, provenance={}, algorithm_version="0.1.0"
    ).save_as(path)
    dcmqi(
        "paramap2itkimage",
        "--inputDICOM",
        str(path),
        "--outputDirectory",
        str(tmp_path),
        "--prefix",
        quantity,
    )
    meta = json.loads((tmp_path / f"{quantity}-meta.json").read_text())
    assert meta["QuantityValueCode"]["CodeValue"] == code
    assert meta["MeasurementUnitsCode"]["CodeValue"] == unit
    image = sitk.ReadImage(str(tmp_path / f"{quantity}-pmap.nrrd"))
    slices = _itk_slices_by_position(image, [ds.ImagePositionPatient for ds in sources])
    expected = np.where(np.isfinite(values), values.astype(np.float64) * scale, 0.0)
    np.testing.assert_allclose(slices.astype(np.float64), expected, rtol=1e-6)


def test_parametric_map_uids_are_deterministic() -> None:
    sources = classic_mr_series()
    values = _map(1e-3, (len(sources), 24, 20))
    build = lambda v, version: build_parametric_map(  # noqa: E731
        sources, v, "ADC", provenance={"b_values": [0, 800]}, algorithm_version=version
    )
    first, again, newer = build(values, "0.1.0"), build(values, "0.1.0"), build(values, "0.2.0")
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        again.SeriesInstanceUID,
        again.SOPInstanceUID,
    )
    assert first.SOPInstanceUID != newer.SOPInstanceUID
    assert first.SeriesInstanceUID != newer.SeriesInstanceUID
    assert build(values * 1.01, "0.1.0").SOPInstanceUID != first.SOPInstanceUID


def test_parametric_map_rejects_bad_input() -> None:
    sources = classic_mr_series()
    with pytest.raises(ValueError, match="unknown quantity"):
        build_parametric_map(
            sources, np.ones((6, 24, 20), np.float32), "RA", provenance={}, algorithm_version="1"
        )
    with pytest.raises(ValueError, match="floating point"):
        build_parametric_map(
            sources, np.ones((6, 24, 20), np.int16), "ADC", provenance={}, algorithm_version="1"
        )
    with pytest.raises(ValueError, match="standard Tofts"):
        build_parametric_map(
            sources,
            np.ones((6, 24, 20), np.float32),
            "vp",
            provenance={"model": "tofts"},
            algorithm_version="1",
        )


@pytest.mark.parametrize("per_frame_geometry", [False, True], ids=["shared", "per-frame"])
def test_enhanced_mr_parametric_map(
    tmp_path: Path, shared_data: Path, per_frame_geometry: bool
) -> None:
    source = canon_enhanced(shared_data, per_frame_geometry=per_frame_geometry)
    frames = b0_frames(source)
    values = _map(1.0e-3, (40, 80, 80))
    pmap = build_parametric_map(
        [source],
        values,
        "ADC",
        provenance={"b_values": [0, 1500]},
        algorithm_version="0.1.0",
        source_frames=frames,
    )
    path = tmp_path / "adc_enh.dcm"
    pmap.save_as(path)
    dciodvfy(path)
    back = hd.pm.ParametricMap.from_dataset(dcmread(path))
    assert back.NumberOfFrames == 40
    for item in back.PerFrameFunctionalGroupsSequence:
        refs = item.DerivationImageSequence[0].SourceImageSequence
        assert {r.ReferencedSOPInstanceUID for r in refs} == {source.SOPInstanceUID}
        assert len(refs) == 13  # b0 + 12 x b1500 at this position
    ipps = [
        source.PerFrameFunctionalGroupsSequence[f - 1].PlanePositionSequence[0].ImagePositionPatient
        for f in frames
    ]
    expected = np.where(np.isfinite(values), values.astype(np.float64) * 1e6, 0.0)
    np.testing.assert_allclose(_frames_in_source_order(back, ipps), expected, rtol=1e-6)
    dcmqi(
        "paramap2itkimage",
        "--inputDICOM",
        str(path),
        "--outputDirectory",
        str(tmp_path),
        "--prefix",
        "enh",
    )
    image = sitk.ReadImage(str(tmp_path / "enh-pmap.nrrd"))
    np.testing.assert_allclose(_itk_slices_by_position(image, ipps), expected, rtol=1e-6)
