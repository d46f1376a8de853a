"""The phantom's real-scanner encodings (issue 13): two-point high-b DWI, the scanner's TRACEW and
ADC series, and CD-export non-image objects in the DWI series.

Each series is checked with the node's own reader/maps against numbers the phantom did not get from
the node: the analytic ADC truth of ground_truth.json (from the tissue parameters), ln(S0/Sb)/b of
the TRACEW series' own stored pixels, and dciodvfy.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from processing.classify import SeriesRole, classify_study
from processing.phantom import generate_patient, true_tumour_mask

SEED = 13


@pytest.fixture(scope="module")
def two_point(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Small standard-encoding phantom, baseline only: b 0 + b 1500, scanner maps, CD companions."""
    from node.commands.phantom import write_phantom

    out = tmp_path_factory.mktemp("phantom-two-point") / "patient"
    truth = write_phantom(
        out,
        seed=SEED,
        size="small",
        followups=0,
        diffusion_scheme="two-point",
        scanner_maps=True,
        non_image_objects=True,
    )
    return out, truth


def _maps(folder: Path, out: Path) -> dict:
    from node.cli import main

    assert main(["maps", str(folder), "--out", str(out)]) == 0
    return json.loads((out / "maps.json").read_text())


def _pm_volume(path: Path) -> np.ndarray:
    """A Parametric Map's values (mm²/s) as (k, j, i), frames sorted along the slice normal."""
    pm = pydicom.dcmread(path)
    frames = pm.PerFrameFunctionalGroupsSequence
    iop = np.asarray(
        pm.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient,
        dtype=float,
    )
    normal = np.cross(iop[:3], iop[3:])
    z = [float(np.dot(normal, f.PlanePositionSequence[0].ImagePositionPatient)) for f in frames]
    rwvm = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert rwvm.MeasurementUnitsCodeSequence[0].CodeValue == "um2/s"
    stored = pm.pixel_array.astype(np.float64)[np.argsort(z)]
    return (stored * float(rwvm.RealWorldValueSlope) + float(rwvm.RealWorldValueIntercept)) * 1e-6


def _series_pixels(folder: Path) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """Classic series: pixels (volume, slice, row, column); files are volume-major."""
    files = sorted(folder.glob("0*.dcm"))
    dss = [pydicom.dcmread(f) for f in files]
    nz = len({tuple(ds.ImagePositionPatient) for ds in dss})
    pixels = np.stack([ds.pixel_array for ds in dss]).astype(np.float64)
    return pixels.reshape(len(dss) // nz, nz, *pixels.shape[1:]), dss


def test_two_point_adc_from_maps_is_the_b0_b1500_truth(two_point, tmp_path: Path) -> None:
    patient, truth = two_point
    st = truth["studies"]["baseline"]
    dwi = st["series"]["dwi"]
    assert dwi["acquisition"]["shells"] == [[0.0, 1], [1500.0, 3]]
    report = _maps(patient / "baseline" / dwi["folder"], tmp_path / "maps")
    adc = report["maps"]["ADC"]
    assert adc["provenance"]["b_values_used"] == [0.0, 1500.0]
    values = _pm_volume(tmp_path / "maps" / adc["parametric_map"])
    mask = true_tumour_mask(truth, "baseline", dwi["geometry"])
    tumour = values[mask & np.isfinite(values) & (values > 0)]
    assert tumour.size >= 0.95 * mask.sum()
    expected = st["tumour"]["adc_by_bvalues"]["b0,1500"]["adc_mm2_s"]
    assert float(np.mean(tumour)) == pytest.approx(expected, rel=0.01)
    # the CD-export companions in the DWI folder are set aside, not read as images
    assert sorted(e["file"] for e in report["set_aside"]) == ["PS_0001.dcm", "XX_0001.dcm"]
    reasons = " ".join(e["reason"] for e in report["set_aside"])
    assert "Presentation State" in reasons and "Philips private" in reasons


def test_tracew_series_gives_ln_s0_over_sb_of_its_own_pixels(two_point, tmp_path: Path) -> None:
    patient, truth = two_point
    trace = truth["studies"]["baseline"]["series"]["dwi_trace"]
    assert trace["role"] == "trace" and trace["bvalues"] == [0.0, 1500.0]
    folder = patient / "baseline" / trace["folder"]
    pixels, dss = _series_pixels(folder)
    assert [str(v) for v in dss[0].ImageType] == ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"]
    report = _maps(folder, tmp_path / "maps")
    adc = report["maps"]["ADC"]
    assert adc["provenance"]["b_values_used"] == [0.0, 1500.0]
    node = _pm_volume(tmp_path / "maps" / adc["parametric_map"])
    s0, sb = pixels[0], pixels[1]
    with np.errstate(divide="ignore", invalid="ignore"):
        reference = np.log(s0 / sb) / 1500.0
    ok = np.isfinite(node) & (node > 0) & (s0 > 0) & (sb > 0) & (reference > 0)
    assert ok.sum() > 0.5 * np.count_nonzero(s0 > 50)
    diff = np.abs(node[ok] - reference[ok])
    assert float(np.max(diff)) < 1e-7  # float32 storage of the map
    # the high-b trace is the geometric mean of the three stored b 1500 directional images
    dwi, _ = _series_pixels(
        patient / "baseline" / truth["studies"]["baseline"]["series"]["dwi"]["folder"]
    )
    with np.errstate(divide="ignore"):
        geo = np.exp(np.mean(np.log(dwi[1:4]), axis=0))
    body = np.all(dwi[1:4] > 0, axis=0)
    assert np.max(np.abs(sb[body] - np.rint(geo[body]))) == 0


def test_scanner_adc_series_is_an_adc_map_with_the_truth_values(two_point) -> None:
    patient, truth = two_point
    st = truth["studies"]["baseline"]
    series = st["series"]["adc_scanner"]
    assert series["role"] == "adc_map" and series["bvalues_used"] == [0.0, 1500.0]
    pixels, dss = _series_pixels(patient / "baseline" / series["folder"])
    assert [str(v) for v in dss[0].ImageType] == ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
    assert dss[0].PixelRepresentation == 0  # unsigned integers, 1e-6 mm²/s
    inventory = classify_study(dss)
    assert [c.role for c in inventory.series] == [SeriesRole.ADC_MAP]
    values = pixels[0] * 1e-6
    mask = true_tumour_mask(truth, "baseline", series["geometry"]) & (values > 0)
    expected = st["tumour"]["scanner_adc"]
    assert expected["bvalues_used"] == [0.0, 1500.0]
    assert float(values[mask].mean()) == pytest.approx(expected["tumour_mean_mm2_s"], abs=1e-12)
    assert float(np.median(values[values > 0])) == pytest.approx(
        expected["tissue_median_mm2_s"], abs=1e-12
    )
    # independent of how the map was built: the analytic noiseless b0/b1500 ADC of the tumour
    # (tissue parameters), up to the integer storage (0.5e-6 mm²/s)
    analytic = st["tumour"]["adc_by_bvalues"]["b0,1500"]["adc_mm2_s"]
    assert float(values[mask].mean()) == pytest.approx(analytic, abs=1e-6)


@pytest.mark.parametrize("vendor", ["standard", "siemens", "ge", "philips", "enhanced"])
def test_derived_series_classified_and_no_new_dciodvfy_errors(vendor: str, tmp_path: Path) -> None:
    """TRACEW (role trace) and scanner ADC (role adc_map) in every vendor variant; dciodvfy finds
    no error in them that the variant's acquired DWI series does not have."""
    from processing.phantom import mr

    ph = generate_patient(seed=SEED, vendor=vendor, size="small", followups=0, scanner_maps=True)
    study = ph.studies[0]
    by_folder = {s.folder: s for s in study.series}
    roles = {}
    for folder in ("series005", "series051", "series052"):
        datasets = [ds for _, ds in mr.series_datasets(ph, study, by_folder[folder])]
        roles[folder] = [c.role for c in classify_study(datasets).series]
        path = tmp_path / f"{folder}.dcm"
        datasets[0].save_as(path, enforce_file_format=True)
    assert roles == {
        "series005": [SeriesRole.DWI],
        "series051": [SeriesRole.TRACE],
        "series052": [SeriesRole.ADC_MAP],
    }

    def errors(path: Path) -> set[str]:
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, check=False)
        return {line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")}

    acquired = errors(tmp_path / "series005.dcm")
    assert errors(tmp_path / "series051.dcm") <= acquired
    assert errors(tmp_path / "series052.dcm") <= acquired


def test_defaults_unchanged_and_options_are_other_patients() -> None:
    """The options leave the default phantom alone and make distinct UIDs (they can coexist)."""
    plain = generate_patient(seed=SEED, size="small", followups=0)
    scheme = generate_patient(seed=SEED, size="small", followups=0, diffusion_scheme="two-point")
    assert [s.folder for s in plain.studies[0].series] == [
        "series002",
        "series003",
        "series004",
        "series005",
        "series006",
        "series007",
    ]
    assert "scanner_adc" not in plain.ground_truth["studies"]["baseline"]["tumour"]
    assert plain.studies[0].study_uid != scheme.studies[0].study_uid
    from node.commands import phantom as command
    from processing.phantom import protocol

    assert command.DIFFUSION_SCHEMES == tuple(protocol.DIFFUSION_SCHEMES)
    with pytest.raises(ValueError, match="diffusion scheme"):
        generate_patient(seed=SEED, size="small", followups=0, diffusion_scheme="three-point")
