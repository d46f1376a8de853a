"""DCE pharmacokinetics against the OSIPI DCE-DSC-MRI CodeCollection reference data.

Tolerances (issue 4 / shared/data/README.md): Ktrans 0.005/min + 10 %, ve 0.05, vp 0.025,
fitted delay +/- 1 s; Parker AIF 1e-4 mM + 1 % (delayed variants 0.1 + 10 %); SI -> concentration
1e-5 + 1e-5.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from processing.dce import (
    ArterialInputFunction,
    ToftsModel,
    bolus_arrival_time,
    parker_aif,
    semi_quantitative,
    spgr_signal_to_concentration,
    tofts_concentration,
)

OSIPI = Path("osipi_dce") / "test"


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        return list(csv.DictReader(fh))


def _arr(cell: str) -> np.ndarray:
    return np.array(cell.split(), dtype=float)


def _dro_groups(shared_data: Path, name: str, shift_s: float) -> list[tuple]:
    """DRO curves grouped by their AIF (one fit call per group), optionally delayed by shift_s."""
    groups: dict[bytes, list] = defaultdict(list)
    for row in _rows(shared_data / OSIPI / "DCEmodels" / "data" / name):
        t, c, ca = _arr(row["t"]), _arr(row["C"]), _arr(row["ca"])
        n_shift = int(round(shift_s / (t[1] - t[0])))
        if n_shift:  # delay the tissue curve as OSIPI's delay=True variant does
            c = np.concatenate([np.zeros(n_shift), c[:-n_shift]])
        groups[ca.tobytes()].append((row, t, c, ca))
    return list(groups.values())


def _check_dro(shared_data: Path, name: str, *, extended: bool, shift_s: float) -> int:
    n_pass = 0
    failures = []
    for group in _dro_groups(shared_data, name, shift_s):
        t, ca = group[0][1], group[0][3]
        model = ToftsModel(
            t, ArterialInputFunction(t, ca), extended=extended, fit_delay=shift_s != 0.0
        )
        fit = model.fit(np.stack([g[2] for g in group]))
        assert fit.valid.all()
        for i, (row, *_rest) in enumerate(group):
            kt, ve = float(row["Ktrans"]), float(row["ve"])
            ok = abs(fit.ktrans[i] - kt) <= 0.005 + 0.10 * kt and abs(fit.ve[i] - ve) <= 0.05
            if extended:
                ok &= abs(fit.vp[i] - float(row["vp"])) <= 0.025
            if shift_s:
                ok &= abs(fit.delay[i] - shift_s) <= 1.0
            n_pass += bool(ok)
            if not ok:
                failures.append((row["label"], fit.ktrans[i], kt, fit.ve[i], ve, fit.delay[i]))
    assert not failures, failures
    return n_pass


def test_tofts_dro_25_of_25(shared_data: Path) -> None:
    assert _check_dro(shared_data, "dce_DRO_data_tofts.csv", extended=False, shift_s=0.0) == 25


def test_extended_tofts_dro_15_of_15(shared_data: Path) -> None:
    assert (
        _check_dro(shared_data, "dce_DRO_data_extended_tofts.csv", extended=True, shift_s=0.0) == 15
    )


def test_tofts_dro_delayed_5s_delay_fitted(shared_data: Path) -> None:
    assert _check_dro(shared_data, "dce_DRO_data_tofts.csv", extended=False, shift_s=5.0) == 25


def test_extended_tofts_dro_delayed_5s_delay_fitted(shared_data: Path) -> None:
    assert (
        _check_dro(shared_data, "dce_DRO_data_extended_tofts.csv", extended=True, shift_s=5.0) == 15
    )


def test_tofts_dro_high_snr_meets_osipi_strict_tolerance(shared_data: Path) -> None:
    """Noise-free curves: within the strict OSIPI tolerance (Ktrans 0.005 + 1 %)."""
    for name, ext in (("dce_DRO_data_tofts.csv", False), ("dce_DRO_data_extended_tofts.csv", True)):
        for group in _dro_groups(shared_data, name, 0.0):
            rows = [g for g in group if g[0]["label"].endswith("highSNR")]
            if not rows:
                continue
            t, ca = rows[0][1], rows[0][3]
            fit = ToftsModel(t, ArterialInputFunction(t, ca), extended=ext).fit(
                np.stack([g[2] for g in rows])
            )
            kt = np.array([float(g[0]["Ktrans"]) for g in rows])
            np.testing.assert_allclose(fit.ktrans, kt, rtol=0.01, atol=0.005)
            np.testing.assert_allclose(fit.ve, [float(g[0]["ve"]) for g in rows], atol=0.01)
            if ext:
                np.testing.assert_allclose(fit.vp, [float(g[0]["vp"]) for g in rows], atol=0.0025)


def test_parker_aif_reference(shared_data: Path) -> None:
    rows = _rows(shared_data / OSIPI / "PopulationAIF_DCE" / "data" / "ParkerAIF_ref.csv")
    t_min = np.array([float(r["time"]) for r in rows])
    ref = np.array([float(r["Cb"]) for r in rows])
    got = parker_aif(t_min * 60.0, hematocrit=0.0)
    assert len(rows) == 1931
    np.testing.assert_allclose(got, ref, rtol=0.01, atol=1e-4)


def test_parker_aif_delayed_reference(shared_data: Path) -> None:
    rows = _rows(
        shared_data / OSIPI / "PopulationAIF_DCE" / "data" / "ParkerAIF_ref_with_delay.csv"
    )
    assert len(rows) == 1800
    for delay in sorted({float(r["delay"]) for r in rows}):
        sel = [r for r in rows if float(r["delay"]) == delay]
        t_min = np.array([float(r["time"]) for r in sel])
        ref = np.array([float(r["Cb"]) for r in sel])
        got = parker_aif(t_min * 60.0, hematocrit=0.0, delay=delay)
        np.testing.assert_allclose(got, ref, rtol=0.1, atol=0.1)


def test_parker_plasma_uses_hematocrit() -> None:
    t = np.linspace(0, 300, 61)
    np.testing.assert_allclose(parker_aif(t, hematocrit=0.45), parker_aif(t, hematocrit=0.0) / 0.55)
    with pytest.raises(ValueError, match="hematocrit"):
        parker_aif(t, hematocrit=1.0)


def test_signal_to_concentration_5_of_5(shared_data: Path) -> None:
    rows = _rows(shared_data / OSIPI / "SI_to_Conc" / "data" / "SI2Conc_data.csv")
    assert len(rows) == 5
    for r in rows:
        conc = spgr_signal_to_concentration(
            _arr(r["s"]),
            flip_angle=float(r["FA"]),
            repetition_time=float(r["TR"]),
            t10=float(r["T1base"]),
            relaxivity=float(r["r1"]),
            n_baseline=int(r["numbaselinepts"]),
        )
        # OSIPI does not assess the first point (excluded from the baseline)
        np.testing.assert_allclose(conc[1:], _arr(r["conc"])[1:], rtol=1e-5, atol=1e-5)


def test_signal_to_concentration_without_baseline_raises() -> None:
    with pytest.raises(ValueError, match="without baseline"):
        spgr_signal_to_concentration(
            np.ones((3, 10)),
            flip_angle=15,
            repetition_time=0.005,
            t10=1.0,
            relaxivity=4.5,
            n_baseline=1,
        )


def test_signal_above_spgr_maximum_is_nan_not_garbage() -> None:
    s = np.array([100.0, 100.0, 100.0, 1e6, 150.0])
    c = spgr_signal_to_concentration(
        s, flip_angle=15, repetition_time=0.005, t10=1.0, relaxivity=4.5, n_baseline=3
    )
    assert np.isnan(c[3]) and np.isfinite(c[4]) and c[4] > 0


def _synthetic_volume(rng: np.random.Generator, n: int, extended: bool, noise: float):
    t = np.arange(0.0, 300.0, 3.0)
    aif = ArterialInputFunction.parker(t, hematocrit=0.42, bolus_arrival_time=30.0)
    kt = rng.uniform(0.02, 0.5, n)
    ve = rng.uniform(0.1, 0.6, n)
    vp = rng.uniform(0.0, 0.1, n) if extended else np.zeros(n)
    c = tofts_concentration(t, aif, ktrans=kt, ve=ve, vp=vp)
    return t, aif, kt, ve, vp, c + rng.normal(0.0, noise, c.shape)


def test_extended_tofts_vectorised_recovers_synthetic_parker_volume() -> None:
    rng = np.random.default_rng(4)
    t, aif, kt, ve, vp, c = _synthetic_volume(rng, 400, True, 0.0)
    fit = ToftsModel(t, aif, extended=True).fit(c.reshape(20, 20, -1))
    assert fit.ktrans.shape == (20, 20) and fit.valid.all()
    np.testing.assert_allclose(fit.ktrans.ravel(), kt, rtol=2e-3)
    np.testing.assert_allclose(fit.ve.ravel(), ve, rtol=2e-3)
    np.testing.assert_allclose(fit.vp.ravel(), vp, atol=1e-4)
    assert np.nanmin(fit.r2) > 0.9999
    assert fit.provenance["model"] == "extended Tofts"
    assert fit.provenance["aif"] == "Parker population AIF" and fit.provenance["hematocrit"] == 0.42


def test_degenerate_voxels_are_masked() -> None:
    rng = np.random.default_rng(5)
    t, aif, kt, ve, vp, c = _synthetic_volume(rng, 4, True, 0.0)
    c[1] = 0.0  # all-zero voxel
    c[2, 10] = np.nan  # NaN in the curve
    mask = np.array([True, True, True, False])
    fit = ToftsModel(t, aif, extended=True).fit(c, mask=mask)
    assert fit.valid.tolist() == [True, False, False, False]
    assert np.isnan(fit.ktrans[1:]).all() and np.isnan(fit.ve[1:]).all()
    np.testing.assert_allclose(fit.ktrans[0], kt[0], rtol=2e-3)


def test_degenerate_inputs_raise_clear_errors() -> None:
    t = np.arange(0.0, 30.0, 3.0)
    aif = ArterialInputFunction.parker(t, hematocrit=0.42)
    with pytest.raises(ValueError, match="time points"):
        ToftsModel(t[:3], aif)
    with pytest.raises(ValueError, match="increasing"):
        ToftsModel(t[::-1], aif)
    with pytest.raises(ValueError, match="time points"):
        ToftsModel(t, aif).fit(np.zeros((2, 5)))


def test_bolus_arrival_and_semi_quantitative() -> None:
    t = np.arange(0.0, 300.0, 2.0)
    aif = ArterialInputFunction.parker(t, hematocrit=0.42, bolus_arrival_time=40.0)
    c = tofts_concentration(
        t, aif, ktrans=np.array([0.3, 0.1]), ve=np.array([0.3, 0.4]), vp=np.array([0.05, 0.0])
    )
    bat = bolus_arrival_time(t, c)
    np.testing.assert_allclose(bat, 40.0, atol=4.0)  # within two samples (2 s sampling)
    sq = semi_quantitative(t, c, bolus_arrival=40.0)
    # IAUC60 against direct trapezoidal integration of a finely sampled model curve
    tf = np.arange(40.0, 100.0 + 1e-9, 0.05)
    cf = tofts_concentration(
        tf, aif, ktrans=np.array([0.3, 0.1]), ve=np.array([0.3, 0.4]), vp=np.array([0.05, 0.0])
    )
    np.testing.assert_allclose(sq.iauc60, np.trapezoid(cf, tf, axis=-1), rtol=0.02)
    assert np.all(sq.time_to_peak > 0)
    assert sq.washout_slope[0] < 0  # high kep + vp: wash-out
    assert np.all(sq.max_slope > 0) and sq.valid.all()
    # a flat curve has no arrival and no peak: masked
    flat = semi_quantitative(t, np.zeros((1, t.size)))
    assert not flat.valid.any() and np.isnan(flat.iauc60).all()
