"""DKI: dipy tensor fit and apparent kurtosis on noiseless signals with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.core.sphere import HemiSphere, disperse_charges
from dipy.reconst import dki as dipy_dki
from dipy.sims.voxel import multi_tensor_dki

from processing.dki import (
    ApparentKurtosisModel,
    TensorDkiModel,
    protocol_allows_tensor_dki,
    tensor_dki_volumes,
)


def _protocol(n_dirs: int = 30) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    hemi = HemiSphere(theta=np.pi * rng.random(n_dirs), phi=2 * np.pi * rng.random(n_dirs))
    hemi, _ = disperse_charges(hemi, 2000)
    bvals = np.concatenate([[0.0, 0.0], np.full(n_dirs, 1000.0), np.full(n_dirs, 2000.0)])
    bvecs = np.concatenate([np.zeros((2, 3)), hemi.vertices, hemi.vertices])
    return bvals, bvecs


@pytest.mark.parametrize("d, k", [(1.0e-3, 0.8), (0.45e-3, 1.2), (2.0e-3, 0.3)])
def test_isotropic_d_and_k_recovered(d: float, k: float) -> None:
    bvals, bvecs = _protocol()
    s = 800.0 * np.exp(-bvals * d + bvals**2 * d**2 * k / 6.0)
    fit = TensorDkiModel(bvals, bvecs).fit(np.stack([s, s]))
    for q in (fit.mk, fit.ak, fit.rk):
        np.testing.assert_allclose(q, k, rtol=1e-3)
    np.testing.assert_allclose(fit.md, d, rtol=1e-3)
    np.testing.assert_allclose(fit.fa, 0.0, atol=1e-3)
    kapp = ApparentKurtosisModel(bvals).fit(s)
    np.testing.assert_allclose(kapp.kapp, k, rtol=1e-3)
    np.testing.assert_allclose(kapp.dapp, d, rtol=1e-3)


def test_dipy_multi_tensor_simulation_recovered() -> None:
    bvals, bvecs = _protocol()
    gtab = gradient_table(bvals, bvecs=bvecs)
    mevals = np.array([[0.99e-3, 0.2e-3, 0.2e-3], [2.26e-3, 0.87e-3, 0.87e-3]])
    signal, dt, kt = multi_tensor_dki(
        gtab, mevals, S0=100, angles=[(80, 10), (80, 10)], fractions=[50, 50], snr=None
    )
    evals, evecs = dipy_dki.decompose_tensor(dipy_dki.from_lower_triangular(dt))
    params = np.concatenate([evals, evecs.ravel(), kt])
    fit = TensorDkiModel(bvals, bvecs).fit(signal[None])
    np.testing.assert_allclose(fit.mk[0], dipy_dki.mean_kurtosis(params), rtol=1e-3)
    np.testing.assert_allclose(fit.ak[0], dipy_dki.axial_kurtosis(params), rtol=1e-3)
    np.testing.assert_allclose(fit.rk[0], dipy_dki.radial_kurtosis(params), rtol=1e-3)
    np.testing.assert_allclose(fit.md[0], evals.mean(), rtol=1e-3)
    md = evals.mean()
    fa = np.sqrt(1.5 * np.sum((evals - md) ** 2) / np.sum(evals**2))
    np.testing.assert_allclose(fit.fa[0], fa, rtol=1e-3)
    assert fit.provenance["model"] == "diffusion kurtosis tensor"


def test_protocol_decision() -> None:
    bvals, bvecs = _protocol()
    assert protocol_allows_tensor_dki(bvals, bvecs)[0]
    few_b, few_g = _protocol(10)
    ok, reason = protocol_allows_tensor_dki(few_b, few_g)
    assert not ok and "non-collinear" in reason
    # 3-direction shells (IVIM part of a protocol) are left out, not disqualifying
    b_mixed = np.concatenate([few_b[:2], np.full(3, 100.0), _protocol()[0][2:]])
    g_mixed = np.concatenate([few_g[:2], np.eye(3), _protocol()[1][2:]])
    selection, _ = tensor_dki_volumes(b_mixed, g_mixed)
    assert selection is not None and not selection[2:5].any() and selection[5:].all()
    ok, reason = protocol_allows_tensor_dki([0, 1000, 1000], np.eye(3)[[0, 0, 1]])
    assert not ok and "two non-zero shells" in reason
    assert not protocol_allows_tensor_dki(bvals, None)[0]
    with pytest.raises(ValueError, match="does not support tensor DKI"):
        TensorDkiModel(few_b, few_g)


def test_apparent_kurtosis_trace_protocol_and_degenerate() -> None:
    b = np.array([0.0, 500.0, 1000.0, 1500.0, 2000.0])
    d = np.array([0.6e-3, 1.1e-3])
    k = np.array([1.1, 0.5])
    s = 1000.0 * np.exp(-b * d[:, None] + b**2 * d[:, None] ** 2 * k[:, None] / 6.0)
    s = np.concatenate([s, np.zeros((1, 5)), np.full((1, 5), np.nan)])
    fit = ApparentKurtosisModel(b).fit(s)
    np.testing.assert_allclose(fit.kapp[:2], k, rtol=1e-6)
    np.testing.assert_allclose(fit.dapp[:2], d, rtol=1e-6)
    assert fit.valid.tolist() == [True, True, False, False]
    assert np.isnan(fit.kapp[2:]).all()
    with pytest.raises(ValueError, match="at least 3 b-values"):
        ApparentKurtosisModel([0.0, 1000.0])
    with pytest.raises(ValueError, match="b up to >= 1000"):
        ApparentKurtosisModel([0.0, 100.0, 500.0])


def test_kurtosis_bounds_clip_like_dipy() -> None:
    b = np.array([0.0, 1000.0, 2000.0])
    d, k = 1e-3, 20.0  # non-physical kurtosis
    s = np.exp(-b * d + b**2 * d**2 * k / 6.0)
    fit = ApparentKurtosisModel(b, max_kurtosis=3.0).fit(s)
    assert fit.kapp == pytest.approx(3.0)


@pytest.mark.parametrize("method", ["WLS", "OLS"])
def test_batched_fit_equals_dipy_model_fit(method: str) -> None:
    """The batched solve reproduces dipy's own (per-voxel) DiffusionKurtosisModel fit."""
    bvals, bvecs = _protocol()
    rng = np.random.default_rng(3)
    gtab = gradient_table(bvals, bvecs=bvecs)
    signals = []
    for _ in range(40):
        ev = np.sort(rng.uniform(0.2e-3, 2.0e-3, 3))[::-1]
        sig, _, _ = multi_tensor_dki(
            gtab,
            np.array([ev, ev[::-1] * 1.1]),
            S0=200,
            angles=[tuple(rng.uniform(0, 90, 2)), (0, 0)],
            fractions=[60, 40],
            snr=None,
        )
        signals.append(sig * (1 + 0.01 * rng.standard_normal(sig.size)))
    signals = np.array(signals)
    ours = TensorDkiModel(bvals, bvecs, fit_method=method).fit(signals)
    ref = dipy_dki.DiffusionKurtosisModel(gtab, fit_method=method).fit(signals)
    np.testing.assert_allclose(ours.mk, ref.mk(), rtol=1e-6)
    np.testing.assert_allclose(ours.ak, ref.ak(), rtol=1e-6)
    np.testing.assert_allclose(ours.rk, ref.rk(), rtol=1e-6)
    np.testing.assert_allclose(ours.md, ref.md, rtol=1e-8)
    np.testing.assert_allclose(ours.fa, ref.fa, rtol=1e-6, atol=1e-9)
