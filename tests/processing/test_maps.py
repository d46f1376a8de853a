"""compute_maps on the synthetic phantom (acceptance 5) and on degenerate study inputs.

Truths from ground_truth.json, tumour = the phantom's analytic tumour shape evaluated at the map's
voxel centres (follow-ups mapped through ``rigid_transform.followup_to_baseline``):
ADC within 3 % of ``adc_by_bvalues`` for the b-values used, MK within 5 % of
``kurtosis_by_bvalues`` for the shells of the tensor fit, Ktrans within 10 %, ve within 0.05 and
vp within 0.02 of the tumour means on the DCE grid.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from processing.errors import InputError
from processing.maps import MapSettings, QuantMap, compute_maps, map_statistics
from processing.phantom.anatomy import TumourShape
from processing.series import read_series


def _read_study(folder: Path) -> list:
    out = []
    for series_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        out.append(read_series([pydicom.dcmread(f) for f in sorted(series_dir.glob("*.dcm"))]))
    return out


def _tumour_mask(study_truth: dict, qmap: QuantMap) -> np.ndarray:
    shape = {k: v for k, v in study_truth["tumour"]["shape"].items() if k != "model"}
    tumour = TumourShape(
        centre=tuple(shape["centre"]),
        rotation=tuple(shape["rotation"]),
        radii=tuple(shape["radii"]),
        lobes=tuple(tuple(lb) for lb in shape["lobes"]),
        epidural_centre=tuple(shape["epidural_centre"]) if shape["epidural_centre"] else None,
        epidural_radii=tuple(shape["epidural_radii"]) if shape["epidural_radii"] else None,
    )
    g = qmap.geometry
    z, y, x = np.meshgrid(*[np.arange(n) for n in g.size[::-1]], indexing="ij")
    index = np.stack([x, y, z], axis=-1).reshape(-1, 3) * np.asarray(g.spacing)
    pts = np.asarray(g.origin) + index @ g.direction_matrix.T
    rigid = study_truth.get("rigid_transform") or {}
    if "followup_to_baseline" in rigid:
        m = np.asarray(rigid["followup_to_baseline"])
        pts = pts @ m[:3, :3].T + m[:3, 3]
    return tumour.contains(pts).reshape(z.shape)


def _check_study(root: Path, key: str) -> dict[str, float]:
    truth = json.loads((root / "ground_truth.json").read_text())["studies"][key]
    tumour = truth["tumour"]
    maps = compute_maps(_read_study(root / key))
    for q in ("ADC", "MK", "MD", "Ktrans", "ve", "vp", "kep", "T1", "IAUC60", "TTP"):
        assert q in maps, f"{q} missing from {sorted(maps)}"
    stats = {q: map_statistics(m, _tumour_mask(truth, m)) for q, m in maps.items()}
    for q in ("ADC", "MK", "Ktrans", "ve", "vp"):
        assert (
            stats[q]["n_voxels"] == tumour["voxel_counts"]["dwi" if q in ("ADC", "MK") else "dce"]
        )
    used = tuple(maps["ADC"].provenance["b_values"])
    adc_truth = next(
        v["adc_mm2_s"] for v in tumour["adc_by_bvalues"].values() if tuple(v["bvalues"]) == used
    )
    mk_shells = tuple(maps["MK"].provenance["b_values"])
    mk_truth = next(
        v["K"] for v in tumour["kurtosis_by_bvalues"].values() if tuple(v["bvalues"]) == mk_shells
    )
    dce_truth = tumour["means_by_series"]["dce"]
    errors = {
        "ADC_rel": stats["ADC"]["mean"] / adc_truth - 1.0,
        "MK_rel": stats["MK"]["mean"] / mk_truth - 1.0,
        "Ktrans_rel": stats["Ktrans"]["mean"] / dce_truth["Ktrans"] - 1.0,
        "ve_abs": stats["ve"]["mean"] - dce_truth["ve"],
        "vp_abs": stats["vp"]["mean"] - dce_truth["vp"],
    }
    assert abs(errors["ADC_rel"]) <= 0.03, errors
    assert abs(errors["MK_rel"]) <= 0.05, errors
    assert abs(errors["Ktrans_rel"]) <= 0.10, errors
    assert abs(errors["ve_abs"]) <= 0.05, errors
    assert abs(errors["vp_abs"]) <= 0.02, errors
    assert maps["Ktrans"].provenance["aif"] == "Parker population AIF"
    assert maps["Ktrans"].provenance["t1_method"] == "variable flip angle"
    assert maps["ADC"].unit == "mm2/s" and maps["Ktrans"].unit == "/min"
    return errors


@pytest.mark.slow
@pytest.mark.parametrize("vendor", ["standard", "siemens", "ge", "philips", "enhanced"])
def test_phantom_baseline_tumour_means_every_vendor(
    make_phantom: Callable[..., Path], vendor: str
) -> None:
    _check_study(make_phantom("responder", vendor, "small"), "baseline")


@pytest.mark.slow
def test_phantom_followup_tumour_means(phantom_small: Path) -> None:
    _check_study(phantom_small, "followup1")


def test_no_functional_series_gives_no_maps() -> None:
    assert compute_maps([]) == {}


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="hematocrit"):
        MapSettings(hematocrit=1.2)
    with pytest.raises(ValueError, match="b-range"):
        MapSettings(adc_min_b=1000.0, adc_max_b=800.0)


@pytest.mark.slow
def test_maps_command_writes_parametric_maps_and_json(phantom_small: Path, tmp_path: Path) -> None:
    from node.cli import main

    out = tmp_path / "maps"
    assert main(["maps", str(phantom_small / "followup1"), "--out", str(out)]) == 0
    report = json.loads((out / "maps.json").read_text())
    adc = report["maps"]["ADC"]
    assert adc["unit"] == "mm2/s" and adc["model"] == "mono-exponential"
    assert adc["provenance"]["b_values"] == [50.0, 100.0, 400.0, 800.0, 1000.0]
    assert report["maps"]["Ktrans"]["provenance"]["hematocrit"] == 0.42
    pm = pydicom.dcmread(out / adc["parametric_map"])
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    stored = pm.pixel_array.astype(float)  # um2/s, 0 where invalid
    assert np.nanmean(np.where(stored > 0, stored, np.nan)) * 1e-6 == pytest.approx(
        adc["statistics"]["mean"], rel=1e-4
    )


def test_maps_command_without_functional_series_fails_clearly(
    phantom_small: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from node.cli import main

    assert main(["maps", str(phantom_small / "rt"), "--out", str(tmp_path / "o")]) == 1
    assert "no quantitative map" in capsys.readouterr().out


@pytest.mark.slow
def test_dce_without_baseline_is_a_clear_error_and_other_maps_survive(phantom_small: Path) -> None:
    import dataclasses

    series = _read_study(phantom_small / "baseline")
    truth = json.loads((phantom_small / "ground_truth.json").read_text())
    dce_uid = truth["studies"]["baseline"]["series"]["dce"]["SeriesInstanceUID"]
    first = int(30.0 / 5.0)  # drop every frame before the bolus arrival (30 s, 5 s frames)
    cut = []
    for v in series:
        if v.series_instance_uid == dce_uid:
            v = dataclasses.replace(
                v,
                array=v.array[first:],
                volumes=v.volumes[first:],
                source_frames=v.source_frames[first:],
            )
        cut.append(v)
    with pytest.raises(InputError, match="DCE without baseline"):
        compute_maps(cut)
    skipped: list[str] = []
    maps = compute_maps(cut, skipped=skipped)
    assert len(skipped) == 1 and "without baseline" in skipped[0]
    assert "ADC" in maps and "Ktrans" not in maps
