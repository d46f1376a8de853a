"""Signal equations of the phantom (docs/science.md §3.4, implemented exactly) and exact truths.

Every function is vectorised over voxels. Units: times in s unless the name says otherwise,
diffusivities in mm²/s, b in s/mm², Ktrans in /min, concentrations in mmol/L (mM), r1 in /mM/s.

References
----------
.. [1] Parker GJM et al. Experimentally-derived functional form for a population-averaged
   high-temporal-resolution arterial input function for dynamic contrast-enhanced MRI.
   Magn Reson Med 2006;56:993-1000.
.. [2] Tofts PS et al. Estimating kinetic parameters from dynamic contrast-enhanced T1-weighted
   MRI of a diffusable tracer: standardized quantities and symbols. JMRI 1999;10:223-232.
.. [3] Jensen JH, Helpern JA. MRI quantification of non-Gaussian water diffusion by kurtosis
   analysis. NMR Biomed 2010;23:698-710.
.. [4] Le Bihan D et al. Separation of diffusion and perfusion in intravoxel incoherent motion
   MR imaging. Radiology 1988;168:497-505.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

#: Parker 2006 population AIF parameters (whole blood, mM, time in minutes).
PARKER = {
    "A1": 0.809,
    "A2": 0.330,
    "T1": 0.17046,
    "T2": 0.365,
    "sigma1": 0.0563,
    "sigma2": 0.132,
    "alpha": 1.050,
    "beta": 0.1685,
    "s": 38.078,
    "tau": 0.483,
}


def parker_aif_blood(
    t_s: NDArray[np.floating[Any]], *, bolus_arrival_s: float
) -> NDArray[np.float64]:
    """Whole-blood Parker AIF Cb(t) in mM, ``t_s`` in s (Parker 2006 [1]_).

    The function is evaluated at ``(t - bolus_arrival_s) / 60`` minutes for every t (no clipping;
    before arrival it is < 1e-6 mM).
    """
    p = PARKER
    t = (np.asarray(t_s, dtype=np.float64) - bolus_arrival_s) / 60.0
    g1 = (
        p["A1"]
        / (p["sigma1"] * np.sqrt(2 * np.pi))
        * np.exp(-((t - p["T1"]) ** 2) / (2 * p["sigma1"] ** 2))
    )
    g2 = (
        p["A2"]
        / (p["sigma2"] * np.sqrt(2 * np.pi))
        * np.exp(-((t - p["T2"]) ** 2) / (2 * p["sigma2"] ** 2))
    )
    with np.errstate(over="ignore"):
        sig = p["alpha"] * np.exp(-p["beta"] * t) / (1.0 + np.exp(-p["s"] * (t - p["tau"])))
    aif: NDArray[np.float64] = g1 + g2 + sig
    return aif


def extended_tofts(
    t_s: NDArray[np.floating[Any]],
    ktrans_per_min: NDArray[np.float64],
    ve: NDArray[np.float64],
    vp: NDArray[np.float64],
    *,
    bolus_arrival_s: float,
    hct: float,
    n_nodes: int = 12,
) -> NDArray[np.float64]:
    """Tissue concentration (mM) of the extended Tofts model [2]_ on a uniform time grid.

    Ct(t) = vp·Cp(t) + Ktrans·∫₀ᵗ Cp(τ)·exp(−kep(t−τ)) dτ with Cp = Cb/(1 − Hct) and Cb the
    Parker AIF. The convolution is integrated exactly up to Gauss-Legendre quadrature of the
    analytic AIF inside each sampling interval (``n_nodes`` nodes; relative error < 1e-7 here).

    Parameters
    ----------
    t_s : (T,) uniform sample times in s, starting at or before 0 s relative to injection.
    ktrans_per_min, ve, vp : (N,) per-voxel parameters (/min, fractions).

    Returns
    -------
    (T, N) concentrations in mM.
    """
    t_s = np.asarray(t_s, dtype=np.float64)
    dt = float(t_s[1] - t_s[0])
    if not np.allclose(np.diff(t_s), dt):
        raise ValueError("extended_tofts needs uniformly sampled times")
    ktrans = np.asarray(ktrans_per_min, dtype=np.float64) / 60.0
    ve = np.asarray(ve, dtype=np.float64)
    vp = np.asarray(vp, dtype=np.float64)
    kep = np.divide(ktrans, ve, out=np.zeros_like(ktrans), where=ve > 0)

    def cp(t: NDArray[np.floating[Any]]) -> NDArray[np.float64]:
        return parker_aif_blood(t, bolus_arrival_s=bolus_arrival_s) / (1.0 - hct)

    x, w = np.polynomial.legendre.leggauss(n_nodes)
    offsets = (x + 1.0) / 2.0 * dt  # node position inside an interval, from its start
    weights = w / 2.0 * dt
    # integral over [t_n, t_n + dt] of Cp(τ)·exp(−kep(t_n + dt − τ))
    cp_nodes = cp(t_s[:-1, None] + offsets[None, :])  # (T-1, n_nodes)
    decay_nodes = np.exp(-np.outer(dt - offsets, kep)) * weights[:, None]  # (n_nodes, N)
    increments = cp_nodes @ decay_nodes  # (T-1, N)
    step = np.exp(-kep * dt)
    conv = np.zeros((t_s.size, ktrans.size))
    # contribution before the first sample (Cp ~ 0 well before the bolus)
    for n in range(1, t_s.size):
        conv[n] = conv[n - 1] * step + increments[n - 1]
    return vp[None, :] * cp(t_s)[:, None] + ktrans[None, :] * conv


def spgr_signal(
    m0: NDArray[np.floating[Any]],
    r1_per_s: NDArray[np.floating[Any]],
    *,
    flip_deg: float,
    tr_s: float,
) -> NDArray[np.floating[Any]]:
    """Spoiled gradient echo steady state S = M0·sinα·(1 − E1)/(1 − cosα·E1), E1 = exp(−TR·R1)."""
    a = np.deg2rad(flip_deg)
    e1 = np.exp(-tr_s * np.asarray(r1_per_s))
    signal: NDArray[np.floating[Any]] = (
        np.asarray(m0) * np.sin(a) * (1.0 - e1) / (1.0 - np.cos(a) * e1)
    )
    return signal


def diffusion_attenuation(
    b: float | NDArray[np.float64],
    d: NDArray[np.float64],
    k: NDArray[np.float64],
    f: float | NDArray[np.float64],
    dstar: float | NDArray[np.float64],
) -> NDArray[np.float64]:
    """IVIM-kurtosis attenuation S(b)/S0 = f·exp(−b·D*) + (1 − f)·exp(−b·D + b²·D²·K/6).

    Isotropic tissue, so it is also the direction-averaged signal. With f = 0 this is exactly the
    kurtosis model of docs/science.md §3.4 (item 3); with K = 0 the bi-exponential IVIM model [4]_.
    """
    b = np.asarray(b, dtype=np.float64)
    return f * np.exp(-b * dstar) + (1.0 - f) * np.exp(-b * d + (b * d) ** 2 * k / 6.0)


def loglinear_adc(
    bvalues: NDArray[np.float64], signals: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Ordinary least-squares log-linear ADC (mm²/s) per voxel; ``signals`` is (B, N)."""
    b = np.asarray(bvalues, dtype=np.float64)
    y = np.log(np.asarray(signals, dtype=np.float64))
    bc = b - b.mean()
    adc: NDArray[np.float64] = -(bc @ (y - y.mean(axis=0))) / float(bc @ bc)
    return adc


def kurtosis_ols(
    bvalues: NDArray[np.float64], signals: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """OLS fit of ln S = ln S0 − b·D + b²·D²·K/6 per voxel; returns (Dapp mm²/s, Kapp)."""
    b = np.asarray(bvalues, dtype=np.float64)
    design = np.stack([np.ones_like(b), -b, b**2 / 6.0], axis=1)
    coef, *_ = np.linalg.lstsq(design, np.log(signals), rcond=None)
    dapp = coef[1]
    kapp = coef[2] / dapp**2
    return dapp, kapp


def add_rician_noise(
    signal: NDArray[np.float64], sigma: float, rng: np.random.Generator
) -> NDArray[np.float64]:
    """Magnitude of the signal plus complex Gaussian noise of standard deviation ``sigma``
    (single precision: the result is stored as integers)."""
    re = rng.standard_normal(size=signal.shape, dtype=np.float32)
    re *= np.float32(sigma)
    re += signal.astype(np.float32)
    im = rng.standard_normal(size=signal.shape, dtype=np.float32)
    im *= np.float32(sigma)
    return np.hypot(re, im)
