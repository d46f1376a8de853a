"""DCE-MRI pharmacokinetics: AIF, signal to concentration, Tofts models, semi-quantitative maps.

Pure array maths (no files, no sockets). Conventions: time in s, concentrations in mM, Ktrans and
kep in /min, ve and vp as fractions, the measurement (time) axis LAST.

The Tofts fits are vectorised over voxels: a log-spaced table over kep with the closed-form,
box-constrained linear least-squares solution for (Ktrans, vp) at every kep (variable projection),
searched coarse-to-fine and refined by parabolic interpolation, for all voxels at once. There is
no per-voxel Python loop. Optionally an arterial delay is fitted on a grid.

References
----------
.. [1] Tofts PS et al. Estimating kinetic parameters from dynamic contrast-enhanced T1-weighted
   MRI of a diffusable tracer: standardized quantities and symbols. JMRI 1999;10:223-232.
.. [2] Parker GJM et al. Experimentally-derived functional form for a population-averaged
   high-temporal-resolution arterial input function for dynamic contrast-enhanced MRI.
   MRM 2006;56:993-1000.
.. [3] Golub G, Pereyra V. Separable nonlinear least squares: the variable projection method and
   its applications. Inverse Problems 2003;19:R1-R26.
.. [4] Cheong LH, Koh TS, Hou Z. An automatic approach for estimating bolus arrival time in
   dynamic contrast MRI using piecewise continuous regression models. PMB 2003;48:N83-N88.
.. [5] OSIPI DCE-DSC-MRI CodeCollection, https://github.com/OSIPI/DCE-DSC-MRI_CodeCollection
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.signal import lfilter

logger = logging.getLogger(__name__)

__all__ = [
    "PARKER_PARAMETERS",
    "ArterialInputFunction",
    "SemiQuantitativeMaps",
    "ToftsFit",
    "ToftsModel",
    "bolus_arrival_time",
    "parker_aif",
    "semi_quantitative",
    "spgr_signal_to_concentration",
    "tofts_concentration",
]

#: Parker 2006 population AIF (whole blood, mM; time in minutes), Table 1 of [2].
PARKER_PARAMETERS: dict[str, float] = {
    "A1": 0.809,
    "A2": 0.330,  # mmol.min
    "T1": 0.17046,
    "T2": 0.365,  # min
    "sigma1": 0.0563,
    "sigma2": 0.132,  # min
    "alpha": 1.050,  # mmol
    "beta": 0.1685,  # /min
    "s": 38.078,  # /min
    "tau": 0.483,  # min
}

_FINE_STEP_S = 0.5  # s, internal integration step for analytic AIFs

# Basis of one delay: (E rows (n_k, n_t), Cp (n_t,), E.E or the Gram band, E.Cp, Cp.Cp)
_Basis: TypeAlias = tuple[
    NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], float
]


def parker_aif(time: ArrayLike, *, hematocrit: float, delay: float = 0.0) -> NDArray[np.float64]:
    """Parker population arterial input function.

    Parameters
    ----------
    time : array_like
        Time points (s) since the start of the acquisition.
    hematocrit : float
        Large-vessel haematocrit in [0, 1). ``0`` returns the whole-blood concentration Cb as
        published; otherwise the plasma concentration Cp = Cb / (1 - Hct) is returned. Required so
        that the blood/plasma choice is always explicit.
    delay : float, optional
        Bolus arrival delay (s); the curve is Cb(t - delay) for t >= delay and 0 before.

    Returns
    -------
    ndarray
        Concentration (mM), same shape as `time`.

    References
    ----------
    Parker et al. MRM 2006;56:993, eq. 1 and Table 1 ([2] in the module docstring).
    """
    if not 0.0 <= hematocrit < 1.0:
        raise ValueError(f"hematocrit must be in [0, 1), got {hematocrit}")
    t_s = np.asarray(time, dtype=float) - float(delay)
    t = t_s / 60.0
    p = PARKER_PARAMETERS
    cb = np.zeros_like(t)
    for a, tn, sn in ((p["A1"], p["T1"], p["sigma1"]), (p["A2"], p["T2"], p["sigma2"])):
        cb += a / (sn * np.sqrt(2.0 * np.pi)) * np.exp(-((t - tn) ** 2) / (2.0 * sn**2))
    cb += p["alpha"] * np.exp(-p["beta"] * t) / (1.0 + np.exp(-p["s"] * (t - p["tau"])))
    cb = np.where(t_s >= 0.0, cb, 0.0)
    return cb / (1.0 - hematocrit)


@dataclass(frozen=True)
class ArterialInputFunction:
    """A plasma arterial input function, sampled or analytic.

    Attributes
    ----------
    time : ndarray
        Sample times (s).
    plasma_concentration : ndarray
        Plasma concentration Cp (mM) at `time`.
    name : str
        ``"Parker population AIF"``, ``"measured"``, ...
    hematocrit : float | None
        Haematocrit used for blood -> plasma conversion (None when given as plasma).
    bolus_arrival_time : float
        Arrival time (s) of the bolus in this AIF.
    function : callable | None
        ``function(t_s) -> Cp`` when the AIF is analytic; then the Tofts fit integrates it on a
        fine internal grid instead of the acquisition grid.
    """

    time: NDArray[np.float64]
    plasma_concentration: NDArray[np.float64]
    name: str = "measured"
    hematocrit: float | None = None
    bolus_arrival_time: float = 0.0
    function: Callable[[NDArray[np.float64]], NDArray[np.float64]] | None = field(
        default=None, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        t = np.asarray(self.time, dtype=float)
        c = np.asarray(self.plasma_concentration, dtype=float)
        if t.ndim != 1 or t.shape != c.shape or t.size < 2:
            raise ValueError(
                "AIF time and concentration must be 1-D arrays of the same length >= 2"
            )
        if not np.all(np.isfinite(t)) or not np.all(np.isfinite(c)):
            raise ValueError("AIF contains non-finite values")
        if np.any(np.diff(t) <= 0):
            raise ValueError("AIF time points must be strictly increasing")
        object.__setattr__(self, "time", t)
        object.__setattr__(self, "plasma_concentration", c)

    @classmethod
    def parker(
        cls, time: ArrayLike, *, hematocrit: float = 0.42, bolus_arrival_time: float = 0.0
    ) -> ArterialInputFunction:
        """Parker population AIF converted to plasma, arriving at `bolus_arrival_time` (s)."""
        t = np.asarray(time, dtype=float)
        bat = float(bolus_arrival_time)

        def function(tt: NDArray[np.float64]) -> NDArray[np.float64]:
            return parker_aif(tt, hematocrit=hematocrit, delay=bat)

        return cls(
            t,
            function(t),
            name="Parker population AIF",
            hematocrit=hematocrit,
            bolus_arrival_time=bat,
            function=function,
        )

    def at(self, time: ArrayLike, *, delay: float = 0.0) -> NDArray[np.float64]:
        """Cp(t - delay) in mM at arbitrary times (s): analytic or linear interpolation."""
        t = np.asarray(time, dtype=float) - delay
        if self.function is not None:
            return np.asarray(self.function(t), dtype=float)
        c = self.plasma_concentration
        cp: NDArray[np.float64] = np.interp(t, self.time, c, left=c[0], right=c[-1])
        return cp

    @property
    def provenance(self) -> dict[str, Any]:
        return {
            "aif": self.name,
            "hematocrit": self.hematocrit,
            "aif_bolus_arrival_time_s": self.bolus_arrival_time,
        }


# --------------------------------------------------------------------------------------------
# Signal -> concentration
# --------------------------------------------------------------------------------------------


def spgr_signal_to_concentration(
    signal: ArrayLike,
    *,
    flip_angle: float,
    repetition_time: float,
    t10: ArrayLike,
    relaxivity: float,
    n_baseline: int,
    discard_first: int = 1,
) -> NDArray[np.float64]:
    """Convert SPGR signal to contrast-agent concentration.

    The equilibrium magnetisation is estimated from the pre-contrast signal and T10, then each
    signal is inverted through the SPGR equation to R1(t), and C(t) = (R1(t) - R10) / r1.

    Parameters
    ----------
    signal : array_like, shape (..., n_t)
        Signal intensities, time axis last.
    flip_angle : float
        Flip angle (degrees).
    repetition_time : float
        TR (s).
    t10 : array_like
        Pre-contrast T1 (s), scalar or broadcastable to ``signal.shape[:-1]``.
    relaxivity : float
        Longitudinal relaxivity r1 (/mM/s).
    n_baseline : int
        Number of pre-contrast time points.
    discard_first : int, optional
        Leading points excluded from the baseline (approach to steady state); the baseline is the
        mean of ``signal[..., discard_first:n_baseline]`` (OSIPI convention, default 1).

    Returns
    -------
    ndarray
        Concentration (mM), same shape as `signal`; NaN where the signal exceeds what the SPGR
        equation allows (R1 undefined) or inputs are not finite.

    Raises
    ------
    ValueError
        No baseline points, or non-physical acquisition parameters.

    References
    ----------
    Schabel MC, Parker DL. Uncertainty and bias in contrast concentration measurements using
    spoiled gradient echo pulse sequences. PMB 2008;53:2345. docs/science.md §3.4 (item 5).
    """
    s = np.asarray(signal, dtype=float)
    if s.ndim < 1 or s.shape[-1] < 2:
        raise ValueError("signal needs a time axis (last) with at least 2 points")
    if n_baseline - discard_first < 1 or n_baseline > s.shape[-1]:
        raise ValueError(
            f"DCE without baseline: n_baseline={n_baseline}, discard_first={discard_first} leave "
            f"no pre-contrast points among {s.shape[-1]}"
        )
    if not 0.0 < flip_angle < 180.0:
        raise ValueError(f"flip angle must be in (0, 180) degrees, got {flip_angle}")
    if repetition_time <= 0.0 or relaxivity <= 0.0:
        raise ValueError("repetition time and relaxivity must be positive")
    t10a = np.asarray(t10, dtype=float)
    if np.any(t10a[np.isfinite(t10a)] <= 0):
        raise ValueError("T10 must be positive")
    alpha = np.deg2rad(flip_angle)
    sin_a, cos_a = np.sin(alpha), np.cos(alpha)
    r10 = 1.0 / t10a
    e10 = np.exp(-repetition_time * r10)
    s_pre = s[..., discard_first:n_baseline].mean(axis=-1)
    m0 = s_pre * (1.0 - cos_a * e10) / (sin_a * (1.0 - e10))
    m0 = np.asarray(m0)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        arg = (m0 * sin_a - s) / (m0 * sin_a - s * cos_a)
        r1 = -np.log(arg) / repetition_time
    # S -> M0 sin(a) as R1 -> infinity: larger signals have no SPGR solution
    r1 = np.where((arg > 0) & (s < m0 * sin_a), r1, np.nan)
    return (r1 - np.asarray(r10)[..., None]) / relaxivity


# --------------------------------------------------------------------------------------------
# Convolution with an exponential (exact for piecewise-linear input)
# --------------------------------------------------------------------------------------------


def _exp_conv_coefficients(
    k: NDArray[np.float64], dt: NDArray[np.float64] | float
) -> tuple[NDArray[np.float64], ...]:
    """Recursion coefficients for E_{i+1} = e E_i + a Cp_{i+1} + b Cp_i (k in /s, dt in s)."""
    x = k * dt
    e = np.exp(-x)
    one_minus_e = -np.expm1(-x)
    with np.errstate(divide="ignore", invalid="ignore"):
        b = (one_minus_e - x * e) / (k * x)
        a = one_minus_e / k - b
    small = x < 1e-6
    if np.any(small):
        dtb = np.broadcast_to(dt, x.shape)
        a = np.where(small, dtb * (0.5 - x / 6.0), a)
        b = np.where(small, dtb * (0.5 - x / 3.0), b)
    return e, a, b


def _exp_convolve(
    cp: NDArray[np.float64], time: NDArray[np.float64], k: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Integral of Cp(tau) exp(-k (t - tau)) over [time[0], t] for each k.

    Exact when Cp is linear between samples. `k` (/s) has shape (m,); `cp` is (n,) shared or
    (m, n) per row. Returns (m, n), in mM.s. Vectorised over m; loops over the n time points.
    """
    k = np.asarray(k, dtype=float)
    n = time.size
    dt = np.diff(time)
    out = np.empty(k.shape + (n,))
    out[..., 0] = 0.0
    shared = cp.ndim == 1
    m = k.size
    uniform = bool(np.allclose(dt, dt[0], rtol=1e-9, atol=0.0))
    # a compiled IIR filter per k beats a Python loop over time when there are few k values
    if shared and uniform and m * (1.5e-5 + n * 4e-9) < n * (6e-6 + 6e-9 * m):
        e, a, b = _exp_conv_coefficients(k, dt[0])
        for j in range(m):
            out[j] = lfilter([a[j], b[j]], [1.0, -e[j]], cp, zi=[-a[j] * cp[0]])[0]
        return out
    for i in range(n - 1):
        e, a, b = _exp_conv_coefficients(k, dt[i])
        c0 = cp[i] if shared else cp[..., i]
        c1 = cp[i + 1] if shared else cp[..., i + 1]
        out[..., i + 1] = e * out[..., i] + a * c1 + b * c0
    return out


def tofts_concentration(
    time: ArrayLike,
    aif: ArterialInputFunction,
    *,
    ktrans: ArrayLike,
    ve: ArrayLike,
    vp: ArrayLike = 0.0,
    delay: float = 0.0,
) -> NDArray[np.float64]:
    """Forward (extended) Tofts model Ct(t) = vp Cp(t) + Ktrans int Cp(tau) e^{-kep(t-tau)} dtau.

    Parameters
    ----------
    time : array_like
        Sample times (s).
    aif : ArterialInputFunction
        Plasma input.
    ktrans : array_like
        Ktrans (/min).
    ve, vp : array_like
        Extravascular extracellular and plasma volume fractions (0-1). ``vp=0`` is standard Tofts.
    delay : float
        Arterial delay (s) applied to the AIF.

    Returns
    -------
    ndarray, shape (..., n_t)
        Tissue concentration (mM).

    References
    ----------
    Tofts 1999 ([1]); OSIPI CAPLEX M.IC1.004 / M.IC1.005.
    """
    t = np.asarray(time, dtype=float)
    kt = np.atleast_1d(np.asarray(ktrans, dtype=float))
    ve_a, vp_a = np.broadcast_arrays(kt, np.asarray(ve, dtype=float), np.asarray(vp, dtype=float))[
        1:
    ]
    grid = _FineGrid(t, aif, delay)
    kep = kt / np.maximum(ve_a, 1e-12)
    e = _exp_convolve(grid.cp, grid.time, kep.ravel() / 60.0)[:, grid.index] / 60.0
    ct = kt.reshape(-1, 1) * e + vp_a.reshape(-1, 1) * grid.cp[grid.index]
    shape = np.broadcast(np.asarray(ktrans), np.asarray(ve), np.asarray(vp)).shape
    return ct.reshape(shape + (t.size,))


class _FineGrid:
    """Internal integration grid containing the acquisition times (index maps back)."""

    def __init__(self, time: NDArray[np.float64], aif: ArterialInputFunction, delay: float):
        if aif.function is None:
            fine = time
            index = np.arange(time.size)
        else:
            dt = np.diff(time)
            n_sub = np.maximum(1, np.ceil(dt / _FINE_STEP_S - 1e-9)).astype(int)
            pieces = [time[i] + dt[i] * np.arange(n_sub[i]) / n_sub[i] for i in range(dt.size)]
            fine = np.concatenate(pieces + [time[-1:]])
            index = np.concatenate([[0], np.cumsum(n_sub)])
        self.time = fine
        self.index = index
        self.cp = aif.at(fine, delay=delay)


# --------------------------------------------------------------------------------------------
# Tofts fit
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToftsFit:
    """Result of a (extended) Tofts fit; arrays have the spatial shape of the input.

    Attributes
    ----------
    ktrans : ndarray
        Volume transfer constant (/min).
    ve : ndarray
        Extravascular extracellular volume fraction (0-1); NaN where Ktrans is 0 (undefined).
    kep : ndarray
        Rate constant Ktrans/ve (/min); NaN where Ktrans is 0.
    vp : ndarray | None
        Plasma volume fraction (0-1), extended model only.
    delay : ndarray
        Fitted (or fixed) arterial delay (s).
    sse, r2 : ndarray
        Residual sum of squares (mM^2) and coefficient of determination.
    valid : ndarray of bool
        Voxels with a finite curve, a signal and a successful fit.
    provenance : dict
        Model, AIF, bounds, grid, refinement.
    """

    ktrans: NDArray[np.float64]
    ve: NDArray[np.float64]
    kep: NDArray[np.float64]
    vp: NDArray[np.float64] | None
    delay: NDArray[np.float64]
    sse: NDArray[np.float64]
    r2: NDArray[np.float64]
    valid: NDArray[np.bool_]
    provenance: dict[str, Any]


def _box_lsq(
    p: NDArray[np.float64],
    q: NDArray[np.float64],
    cc: NDArray[np.float64],
    g11: NDArray[np.float64],
    g12: NDArray[np.float64],
    g22: NDArray[np.float64] | float,
    k_ub: NDArray[np.float64],
    vp_ub: float,
    extended: bool,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Minimise |C - x1 E - x2 Cp|^2 with 0<=x1<=k_ub, 0<=x2<=vp_ub, in closed form.

    p = E.C, q = Cp.C, cc = C.C, g = Gram matrix entries; all broadcastable. Exact for the
    two-variable box QP: the optimum is the interior solution when feasible, else lies on one of
    the four edges, each solved exactly by clipping the 1-D optimum (evaluated only where the
    interior solution is infeasible).
    """

    def sse(
        x1: NDArray[np.float64],
        x2: NDArray[np.float64],
        p: NDArray[np.float64],
        q: NDArray[np.float64],
        cc: NDArray[np.float64],
        g11: NDArray[np.float64],
        g12: NDArray[np.float64],
        g22: NDArray[np.float64] | float,
    ) -> NDArray[np.float64]:
        return cc - 2.0 * (x1 * p + x2 * q) + x1 * x1 * g11 + 2.0 * x1 * x2 * g12 + x2 * x2 * g22

    with np.errstate(divide="ignore", invalid="ignore"):
        if not extended:
            x1 = np.clip(p / g11, 0.0, k_ub)
            x1 = np.where(np.isfinite(x1), x1, 0.0)
            x2 = np.zeros_like(x1)
            return x1, x2, sse(x1, x2, p, q, cc, g11, g12, g22)
        shape = np.broadcast_shapes(
            np.shape(p),
            np.shape(q),
            np.shape(cc),
            np.shape(g11),
            np.shape(g12),
            np.shape(g22),
            np.shape(k_ub),
        )
        p, q, cc, g11, g12, g22, k_ub = (
            np.broadcast_to(np.asarray(a, dtype=float), shape)
            for a in (p, q, cc, g11, g12, g22, k_ub)
        )
        det = g11 * g22 - g12 * g12
        x1 = (p * g22 - q * g12) / det
        x2 = (q * g11 - p * g12) / det
        feasible = (det > 0) & (x1 >= 0) & (x1 <= k_ub) & (x2 >= 0) & (x2 <= vp_ub)
        best = sse(x1, x2, p, q, cc, g11, g12, g22)
        bad = ~feasible
        if not bad.any():
            return x1, x2, best
        # edges, only where the interior solution is infeasible
        pb, qb, ccb, g11b, g12b, g22b, kb = (a[bad] for a in (p, q, cc, g11, g12, g22, k_ub))
        bx1 = np.zeros(pb.shape)
        bx2 = np.zeros(pb.shape)
        bs = np.full(pb.shape, np.inf)
        candidates = []
        for x2_fix in (0.0, vp_ub):  # edges with vp fixed
            e1 = np.clip((pb - x2_fix * g12b) / g11b, 0.0, kb)
            candidates.append((np.where(np.isfinite(e1), e1, 0.0), np.full(pb.shape, x2_fix)))
        for x1_fix in (np.zeros(pb.shape), kb):  # edges with Ktrans fixed
            e2 = np.clip((qb - x1_fix * g12b) / g22b, 0.0, vp_ub)
            candidates.append((x1_fix, np.where(np.isfinite(e2), e2, 0.0)))
        for c1, c2 in candidates:
            cs = sse(c1, c2, pb, qb, ccb, g11b, g12b, g22b)
            better = cs < bs
            bs = np.where(better, cs, bs)
            bx1 = np.where(better, c1, bx1)
            bx2 = np.where(better, c2, bx2)
        x1 = x1.copy()
        x2 = x2.copy()
        best = best.copy()
        x1[bad], x2[bad], best[bad] = bx1, bx2, bs
    return x1, x2, best


class ToftsModel:
    """Standard or extended Tofts model fitted voxel-wise, vectorised.

    Parameters
    ----------
    time : array_like, shape (n_t,)
        Acquisition times (s), strictly increasing.
    aif : ArterialInputFunction
        Plasma arterial input function.
    extended : bool, optional
        Fit the extended model (with vp). Default False (standard Tofts, vp = 0).
    fit_delay : bool, optional
        Also fit an arterial delay on a grid (see `delay_bounds`, `delay_step`).
    delay : float, optional
        Fixed arterial delay (s) when `fit_delay` is False. Default 0.
    delay_bounds : (float, float), optional
        Delay search range (s), default (-10, 10) as in the OSIPI tests.
    delay_step : float, optional
        Delay grid step (s), default 0.25.
    max_ktrans : float, optional
        Upper bound of Ktrans (/min), default 5 (OSIPI).
    max_ve, max_vp : float, optional
        Upper bounds of ve and vp, default 1.
    kep_bounds : (float, float), optional
        Search range of kep (/min), default (1e-3, 50).
    n_table : int, optional
        Number of log-spaced kep values of the basis table, default 256 (4.3 % steps; cubic
        interpolation between rows is accurate to ~1e-6).
    coarse_stride : int, optional
        Every `coarse_stride`-th table row forms the coarse grid searched by matrix product
        (default 8, i.e. 33 kep values 40 % apart).
    chunk_size : int, optional
        Voxels per block (bounds memory), default 8192.

    Notes
    -----
    Variable projection [3]: for fixed kep (and delay) the model is linear in (Ktrans, vp). A
    table of convolution bases E_k(t) over a fine log grid of kep is computed once (it depends
    only on the AIF). For every voxel: (1) the box-constrained linear problem is solved in
    closed form at every coarse kep (one matrix product for all voxels); (2) a parabola in log
    kep through the coarse minimum and its neighbours; (3) three parabolic Newton steps with
    shrinking spacing, the bases interpolated from the table (cubic Lagrange in log kep). The best
    point ever evaluated is returned, so the result is never worse than the coarse grid. No
    per-voxel Python loop. The convolution is exact for a piecewise-linear AIF;
    analytic AIFs are integrated on a <= 0.5 s internal grid.
    """

    def __init__(
        self,
        time: ArrayLike,
        aif: ArterialInputFunction,
        *,
        extended: bool = False,
        fit_delay: bool = False,
        delay: float = 0.0,
        delay_bounds: tuple[float, float] = (-10.0, 10.0),
        delay_step: float = 0.25,
        max_ktrans: float = 5.0,
        max_ve: float = 1.0,
        max_vp: float = 1.0,
        kep_bounds: tuple[float, float] = (1e-3, 50.0),
        n_table: int = 256,
        coarse_stride: int = 8,
        chunk_size: int = 8192,
    ) -> None:
        t = np.asarray(time, dtype=float)
        if t.ndim != 1 or t.size < 4:
            raise ValueError(f"need at least 4 time points, got shape {t.shape}")
        if not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
            raise ValueError("time points must be finite and strictly increasing")
        if not (0 < kep_bounds[0] < kep_bounds[1]):
            raise ValueError(f"invalid kep bounds {kep_bounds}")
        if max_ktrans <= 0 or max_ve <= 0 or max_vp <= 0:
            raise ValueError("upper bounds must be positive")
        if fit_delay and not (delay_bounds[0] <= 0.0 <= delay_bounds[1] and delay_step > 0):
            raise ValueError(f"invalid delay grid {delay_bounds} step {delay_step}")
        if n_table < 16 or coarse_stride < 1:
            raise ValueError("n_table must be >= 16 and coarse_stride >= 1")
        self.time = t
        self.aif = aif
        self.extended = extended
        self.fit_delay = fit_delay
        self.max_ktrans = float(max_ktrans)
        self.max_ve = float(max_ve)
        self.max_vp = float(max_vp)
        self.chunk_size = int(chunk_size)
        self.kep_table = np.geomspace(kep_bounds[0], kep_bounds[1], int(n_table))
        self._log_step = float(np.log(self.kep_table[1] / self.kep_table[0]))
        stride = int(coarse_stride)
        self._coarse = np.unique(np.r_[np.arange(0, n_table, stride), n_table - 1])
        if fit_delay:
            lo = np.ceil(delay_bounds[0] / delay_step - 1e-9)
            hi = np.floor(delay_bounds[1] / delay_step + 1e-9)
            self.delays = np.arange(lo, hi + 1) * delay_step
        else:
            self.delays = np.array([float(delay)])
        self._grids = [_FineGrid(t, aif, float(d)) for d in self.delays]
        self._coarse_basis = [
            self._gram(self._convolve(g, self.kep_table[self._coarse]), g) for g in self._grids
        ]
        self._tables: dict[int, _Basis] = {}

    @staticmethod
    def _convolve(grid: _FineGrid, kep: NDArray[np.float64]) -> NDArray[np.float64]:
        """Basis rows E_k at the acquisition times (mM.min) for kep (/min)."""
        return _exp_convolve(grid.cp, grid.time, kep / 60.0)[:, grid.index] / 60.0

    @staticmethod
    def _gram(e: NDArray[np.float64], grid: _FineGrid) -> _Basis:
        cp = grid.cp[grid.index]
        return e, cp, np.einsum("kt,kt->k", e, e), e @ cp, float(cp @ cp)

    def _table(self, j: int) -> _Basis:
        """(table (n_table, n_t), Cp, band of the Gram matrix, table·Cp, Cp·Cp) for delay j.

        ``band[i, d] = T[i]·T[i + d]`` for d = 0..3: all that cubic interpolation needs.
        """
        if j not in self._tables:
            e, cp, _, ecp, g22 = self._gram(
                self._convolve(self._grids[j], self.kep_table), self._grids[j]
            )
            band = np.zeros((e.shape[0], 4))
            for d in range(4):
                band[: e.shape[0] - d, d] = np.einsum("kt,kt->k", e[: e.shape[0] - d], e[d:])
            self._tables[j] = (e, cp, band, ecp, g22)
        return self._tables[j]

    @property
    def provenance(self) -> dict[str, Any]:
        prov: dict[str, Any] = {
            "model": "extended Tofts" if self.extended else "standard Tofts",
            "fit": "variable projection: log kep table search + parabolic refinement",
            "kep_table_per_min": [
                float(self.kep_table[0]),
                float(self.kep_table[-1]),
                int(self.kep_table.size),
            ],
            "bounds": {
                "ktrans_per_min": [0.0, self.max_ktrans],
                "ve": [0.0, self.max_ve],
                "vp": [0.0, self.max_vp if self.extended else 0.0],
            },
            "time_points_s": [float(self.time[0]), float(self.time[-1]), int(self.time.size)],
            "delay_s": (
                "fitted on grid " + f"[{self.delays[0]}, {self.delays[-1]}]"
                if self.fit_delay
                else float(self.delays[0])
            ),
        }
        prov.update(self.aif.provenance)
        return prov

    def fit(self, concentration: ArrayLike, mask: ArrayLike | None = None) -> ToftsFit:
        """Fit every voxel.

        Parameters
        ----------
        concentration : array_like, shape (..., n_t)
            Tissue concentration (mM), time axis last.
        mask : array_like of bool, shape (...), optional
            Voxels to fit; others are NaN and invalid.

        Returns
        -------
        ToftsFit
        """
        c = np.asarray(concentration, dtype=float)
        if c.shape[-1] != self.time.size:
            raise ValueError(
                f"concentration has {c.shape[-1]} time points, model has {self.time.size}"
            )
        spatial = c.shape[:-1]
        flat = c.reshape(-1, self.time.size)
        use = np.all(np.isfinite(flat), axis=1)
        if mask is not None:
            m = np.asarray(mask, dtype=bool)
            if m.shape != spatial:
                raise ValueError(f"mask shape {m.shape} does not match {spatial}")
            use &= m.ravel()
        n_vox = flat.shape[0]
        out = {k: np.full(n_vox, np.nan) for k in ("ktrans", "vp", "kep", "delay", "sse", "r2")}
        idx = np.flatnonzero(use)
        for start in range(0, idx.size, self.chunk_size):
            sel = idx[start : start + self.chunk_size]
            res = self._fit_chunk(flat[sel])
            for key, val in res.items():
                out[key][sel] = val
        ktrans, kep, vp = out["ktrans"], out["kep"], out["vp"]
        css = np.full(n_vox, np.nan)
        css[idx] = np.sum((flat[idx] - flat[idx].mean(axis=1, keepdims=True)) ** 2, axis=1)
        energy = np.full(n_vox, np.nan)
        energy[idx] = np.sum(flat[idx] ** 2, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out["r2"] = np.where(css > 0, 1.0 - out["sse"] / css, np.nan)
            zero_k = ktrans <= 0
            kep = np.where(zero_k, np.nan, kep)
            ve = np.where(zero_k, np.nan, ktrans / kep)
        valid = use & (energy > 0) & np.isfinite(ktrans)
        for arr in (ktrans, kep, ve, vp, out["delay"], out["sse"], out["r2"]):
            arr[~valid] = np.nan
        n_invalid = int(np.count_nonzero(use & ~valid))
        if n_invalid:
            logger.info(
                "Tofts fit: %d of %d voxels without signal marked invalid", n_invalid, idx.size
            )
        return ToftsFit(
            ktrans=ktrans.reshape(spatial),
            ve=ve.reshape(spatial),
            kep=kep.reshape(spatial),
            vp=vp.reshape(spatial) if self.extended else None,
            delay=out["delay"].reshape(spatial),
            sse=out["sse"].reshape(spatial),
            r2=out["r2"].reshape(spatial),
            valid=valid.reshape(spatial),
            provenance=self.provenance,
        )

    def _coarse_sse(
        self, c: NDArray[np.float64], cc: NDArray[np.float64], j: int
    ) -> NDArray[np.float64]:
        """SSE (n_coarse, m) on the coarse kep grid for delay index j: one matrix product."""
        e, cp, g11, g12, g22 = self._coarse_basis[j]
        k_ub = np.minimum(self.max_ktrans, self.max_ve * self.kep_table[self._coarse])[:, None]
        return _box_lsq(
            e @ c.T,
            (c @ cp)[None, :],
            cc[None, :],
            g11[:, None],
            g12[:, None],
            g22,
            k_ub,
            self.max_vp,
            self.extended,
        )[2]

    def _refine(
        self, c: NDArray[np.float64], cc: NDArray[np.float64], j: int
    ) -> tuple[NDArray[np.float64], ...]:
        """Best (Ktrans, vp, kep, SSE) at delay index j for voxels c (m, n_t)."""
        m = c.shape[0]
        rows = np.arange(m)
        table, cp, band, tcp, g22 = self._table(j)
        q = c @ cp
        # the interpolated basis is sum_j w_j T[i+j], so its products with the data, itself and
        # Cp follow from T C^T (one matrix product), the table's Gram band and T Cp: every
        # evaluation after this product costs O(voxels), not O(voxels x time points)
        proj = table @ c.T  # (n_table, m)
        co = self._coarse
        k_ub_c = np.minimum(self.max_ktrans, self.max_ve * self.kep_table[co])[:, None]
        sse = _box_lsq(
            proj[co],
            q[None, :],
            cc[None, :],
            band[co, 0][:, None],
            tcp[co][:, None],
            g22,
            k_ub_c,
            self.max_vp,
            self.extended,
        )[2]
        n_c = co.size
        k_idx = np.argmin(sse, axis=0)
        fb = sse[k_idx, rows]
        f_lo = sse[np.maximum(k_idx - 1, 0), rows]
        f_hi = sse[np.minimum(k_idx + 1, n_c - 1), rows]
        # parabola through the coarse minimum and its neighbours (positions in table rows)
        xb = co[k_idx].astype(float)
        step = float(np.max(np.diff(co)))
        interior = (k_idx > 0) & (k_idx < n_c - 1)
        x_max = float(self.kep_table.size - 1)
        xs = np.clip(
            xb + np.where(interior, step * _parabola_shift(f_lo, fb, f_hi), 0.0), 0.0, x_max
        )

        def solve(
            xx: NDArray[np.float64],
        ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
            i, w = _lagrange_weights(xx, table.shape[0])
            idx = i[:, None] + np.arange(4)[None, :]  # (m, 4)
            p = np.einsum("mj,mj->m", w, proj[idx, rows[:, None]])
            g12 = np.einsum("mj,mj->m", w, tcp[idx])
            gram = band[i[:, None, None] + _BAND_ROW[None], _BAND_COL[None]]  # (m, 4, 4)
            g11 = np.einsum("mj,mjk,mk->m", w, gram, w)
            k = self.kep_table[0] * np.exp(self._log_step * xx)
            k_ub = np.minimum(self.max_ktrans, self.max_ve * k)
            return _box_lsq(p, q, cc, g11, g12, g22, k_ub, self.max_vp, self.extended)

        # parabolic Newton steps on interpolated bases with shrinking spacing; the best point
        # ever evaluated is kept (never worse than the coarse grid point)
        for h in (step / 4.0, step / 16.0, step / 64.0):
            xm, xp = np.clip(xs - h, 0.0, x_max), np.clip(xs + h, 0.0, x_max)
            fm, f0, fp = solve(xm)[2], solve(xs)[2], solve(xp)[2]
            for xx, ff in ((xm, fm), (xs, f0), (xp, fp)):
                better = ff < fb
                xb = np.where(better, xx, xb)
                fb = np.where(better, ff, fb)
            centred = (xm < xs) & (xs < xp)
            xs = np.clip(
                np.where(centred, xs + h * _parabola_shift(fm, f0, fp, limit=2.0), xb), 0.0, x_max
            )
        f = solve(xs)[2]
        xb = np.where(f < fb, xs, xb)
        kt, v, f = solve(xb)
        return kt, v, self.kep_table[0] * np.exp(self._log_step * xb), f

    def _fit_chunk(self, c: NDArray[np.float64]) -> dict[str, NDArray[np.float64]]:
        m = c.shape[0]
        cc = np.einsum("mt,mt->m", c, c)
        if self.delays.size == 1:
            kt, v, k, f = self._refine(c, cc, 0)
            best_d = np.zeros(m, dtype=int)
        else:
            # delay: rank delays on the coarse kep grid, then refine kep at the delays around the
            # best coarse one (the coarse kep spacing alone biases the delay by seconds)
            coarse = np.stack(
                [self._coarse_sse(c, cc, j).min(axis=0) for j in range(self.delays.size)]
            )
            centre = np.argmin(coarse, axis=0)
            step = float(self.delays[1] - self.delays[0])
            width = int(np.ceil(2.0 / step))
            kt, v, k = np.zeros(m), np.zeros(m), np.zeros(m)
            f = np.full(m, np.inf)
            best_d = centre.copy()
            for off in range(-width, width + 1):
                jj = np.clip(centre + off, 0, self.delays.size - 1)
                for j in np.unique(jj):
                    sel = np.flatnonzero(jj == j)
                    r = self._refine(c[sel], cc[sel], int(j))
                    better = r[3] < f[sel]
                    b_sel = sel[better]
                    kt[b_sel], v[b_sel], k[b_sel], f[b_sel] = (x[better] for x in r)
                    best_d[b_sel] = j
        return {
            "ktrans": kt,
            "vp": v if self.extended else np.zeros(m),
            "kep": k,
            "delay": self.delays[best_d],
            "sse": f,
        }


def _parabola_shift(
    fm: NDArray[np.float64], f0: NDArray[np.float64], fp: NDArray[np.float64], *, limit: float = 1.0
) -> NDArray[np.float64]:
    """Vertex offset of the parabola through (-1, fm), (0, f0), (1, fp).

    The offset is in units of the spacing.
    """
    curv = fm - 2.0 * f0 + fp
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(curv > 0, 0.5 * (fm - fp) / curv, np.sign(fm - fp) * limit)
    clipped: NDArray[np.float64] = np.clip(np.nan_to_num(shift), -limit, limit)
    return clipped


_BAND_ROW = np.minimum.outer(np.arange(4), np.arange(4))
_BAND_COL = np.abs(np.subtract.outer(np.arange(4), np.arange(4)))


def _lagrange_weights(
    x: NDArray[np.float64], n: int
) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    """First row index and the 4 cubic Lagrange weights for fractional row positions x (m,)."""
    i = np.clip(np.floor(x).astype(int) - 1, 0, n - 4)
    u = (x - i)[:, None]  # position relative to row i, in [1, 2] away from the edges
    w = np.concatenate(
        [
            -(u - 1) * (u - 2) * (u - 3) / 6.0,
            u * (u - 2) * (u - 3) / 2.0,
            -u * (u - 1) * (u - 3) / 2.0,
            u * (u - 1) * (u - 2) / 6.0,
        ],
        axis=1,
    )
    return i, w


# --------------------------------------------------------------------------------------------
# Bolus arrival and semi-quantitative parameters
# --------------------------------------------------------------------------------------------


def bolus_arrival_time(
    time: ArrayLike, concentration: ArrayLike, *, min_baseline: int = 2
) -> NDArray[np.float64]:
    """Bolus arrival time by a piecewise (constant, then quadratic) regression up to the peak.

    For every candidate arrival sample j the curve before j is modelled by its mean and the
    curve from j to the peak by a quadratic continuous at (t_j, baseline); the j with the smallest
    residual is the arrival. The fit window ends where the curve first reaches half its peak
    enhancement. Vectorised over voxels.

    Parameters
    ----------
    time : array_like, shape (n_t,)
        Times (s).
    concentration : array_like, shape (..., n_t)
        Concentration or enhancement curves, time last.
    min_baseline : int
        Minimum number of samples before the arrival.

    Returns
    -------
    ndarray, shape (...)
        Arrival time (s); NaN for curves with non-finite values or whose peak lies within the
        first `min_baseline` samples (no baseline).

    References
    ----------
    Cheong, Koh and Hou, PMB 2003 ([4]): the linear-quadratic model.
    """
    t = np.asarray(time, dtype=float)
    c = np.asarray(concentration, dtype=float)
    flat = c.reshape(-1, t.size)
    n_vox = flat.shape[0]
    peak = np.argmax(np.where(np.isfinite(flat), flat, -np.inf), axis=1)
    # upslope window ends where the curve first reaches half its peak enhancement, so that slow
    # (concave) curves do not pull the fit towards an early arrival
    base0 = flat[:, :min_baseline].mean(axis=1)
    half = base0 + 0.5 * (flat[np.arange(flat.shape[0]), peak] - base0)
    reached = (flat >= half[:, None]) & (np.arange(t.size)[None, :] >= min_baseline)
    peak = np.where(reached.any(axis=1), np.argmax(reached, axis=1), peak)
    best = np.full(n_vox, np.inf)
    bat = np.full(n_vox, np.nan)
    csum = np.cumsum(flat, axis=1)
    csum2 = np.cumsum(flat**2, axis=1)
    idx = np.arange(t.size)
    for j in range(min_baseline, t.size - 1):
        before = j
        base = csum[:, j - 1] / before
        ss_before = csum2[:, j - 1] - before * base**2
        after = (idx[None, :] >= j) & (idx[None, :] <= peak[:, None])
        u = np.where(after, t[None, :] - t[j], 0.0)
        y = np.where(after, flat - base[:, None], 0.0)
        # least squares y = a u + b u^2 (continuous at t_j), 2x2 normal equations per voxel
        s11, s12, s22 = (np.sum(u**2, axis=1), np.sum(u**3, axis=1), np.sum(u**4, axis=1))
        r1_, r2_ = np.sum(u * y, axis=1), np.sum(u**2 * y, axis=1)
        det = s11 * s22 - s12**2
        with np.errstate(divide="ignore", invalid="ignore"):
            a = np.where(det > 0, (r1_ * s22 - r2_ * s12) / det, np.where(s11 > 0, r1_ / s11, 0.0))
            b = np.where(det > 0, (r2_ * s11 - r1_ * s12) / det, 0.0)
        ss_after = np.sum(
            np.where(after, (y - a[:, None] * u - b[:, None] * u**2) ** 2, 0.0), axis=1
        )
        total = ss_before + ss_after
        ok = (peak > j) & (total < best)
        best = np.where(ok, total, best)
        bat = np.where(ok, t[j], bat)
    bat[~np.all(np.isfinite(flat), axis=1)] = np.nan
    return bat.reshape(c.shape[:-1])


def _integral_at(
    t: NDArray[np.float64], c: NDArray[np.float64], x: NDArray[np.float64]
) -> NDArray[np.float64]:
    """Integral of the piecewise-linear curves c (m, n) from t[0] to per-row x (clipped)."""
    dt = np.diff(t)
    cum = np.concatenate(
        [np.zeros((c.shape[0], 1)), np.cumsum(0.5 * (c[:, 1:] + c[:, :-1]) * dt, axis=1)], axis=1
    )
    xs = np.clip(np.where(np.isfinite(x), x, t[0]), t[0], t[-1])
    i = np.clip(np.searchsorted(t, xs, side="right") - 1, 0, t.size - 2)
    rows = np.arange(c.shape[0])
    u = xs - t[i]
    slope = (c[rows, i + 1] - c[rows, i]) / dt[i]
    out = cum[rows, i] + c[rows, i] * u + 0.5 * slope * u * u
    return np.where(np.isfinite(x), out, np.nan)


@dataclass(frozen=True)
class SemiQuantitativeMaps:
    """Model-free curve features; arrays of the spatial shape.

    Attributes
    ----------
    bolus_arrival_time : ndarray
        Arrival time (s).
    time_to_peak : ndarray
        Peak time minus arrival time (s).
    peak_concentration : ndarray
        Maximum concentration (mM).
    iauc60 : ndarray
        Initial area under the curve, integral of C over 60 s after arrival (mM.s).
    max_slope : ndarray
        Maximum wash-in slope between consecutive samples (mM/s).
    washout_slope : ndarray
        Least-squares slope from peak to end (mM/s, negative when washing out).
    valid : ndarray of bool
    provenance : dict
    """

    bolus_arrival_time: NDArray[np.float64]
    time_to_peak: NDArray[np.float64]
    peak_concentration: NDArray[np.float64]
    iauc60: NDArray[np.float64]
    max_slope: NDArray[np.float64]
    washout_slope: NDArray[np.float64]
    valid: NDArray[np.bool_]
    provenance: dict[str, Any]


#: voxels whose curves are summarised at once by :func:`semi_quantitative`
SQ_BLOCK_VOXELS = 16384


def _semi_quantitative_block(
    t: NDArray[np.float64],
    flat: NDArray[np.float64],
    bat: NDArray[np.float64] | None,
    iauc_window: float,
) -> list[NDArray[np.float64]]:
    """:func:`semi_quantitative` of the curves ``flat`` (voxels, n_t): BAT, TTP, peak, IAUC,
    maximum slope, wash-out slope, and validity (as 0/1)."""
    finite = np.all(np.isfinite(flat), axis=1)
    if bat is None:
        bat = bolus_arrival_time(t, flat).ravel()
    safe = np.where(finite[:, None], flat, 0.0)
    peak_idx = np.argmax(safe, axis=1)
    peak = safe[np.arange(flat.shape[0]), peak_idx]
    ttp = t[peak_idx] - bat
    iauc = _integral_at(t, safe, bat + iauc_window) - _integral_at(t, safe, bat)
    max_slope = np.max(np.diff(safe, axis=1) / np.diff(t)[None, :], axis=1)
    after = np.arange(t.size)[None, :] >= peak_idx[:, None]
    n_after = after.sum(axis=1)
    tm = np.where(after, t[None, :], 0.0)
    t_mean = tm.sum(axis=1) / n_after
    c_mean = np.where(after, safe, 0.0).sum(axis=1) / n_after
    dtm = np.where(after, t[None, :] - t_mean[:, None], 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        washout = np.sum(dtm * (safe - c_mean[:, None]), axis=1) / np.sum(dtm**2, axis=1)
    washout = np.where(n_after >= 3, washout, np.nan)
    valid = finite & np.isfinite(bat) & (peak > 0)
    results = [bat, ttp, peak, iauc, max_slope, washout]
    for r in results:
        r[~valid] = np.nan
    return [*results, valid.astype(np.float64)]


def semi_quantitative(
    time: ArrayLike,
    concentration: ArrayLike,
    *,
    bolus_arrival: ArrayLike | None = None,
    iauc_window: float = 60.0,
) -> SemiQuantitativeMaps:
    """Semi-quantitative DCE parameters (BAT, TTP, IAUC60, maximum slope, wash-out slope).

    Parameters
    ----------
    time : array_like, shape (n_t,)
        Times (s).
    concentration : array_like, shape (..., n_t)
        Concentration (mM), time last.
    bolus_arrival : array_like, optional
        Arrival time (s), scalar (e.g. from the AIF or a region curve, recommended so the method
        stays fixed across time points) or per voxel; detected per voxel when None.
    iauc_window : float
        Integration window after arrival (s), default 60 (IAUC60).

    Returns
    -------
    SemiQuantitativeMaps
    """
    t = np.asarray(time, dtype=float)
    c = np.asarray(concentration, dtype=float)
    if c.shape[-1] != t.size or t.size < 3:
        raise ValueError("concentration must have the time axis last matching `time` (>= 3)")
    spatial = c.shape[:-1]
    flat = c.reshape(-1, t.size)
    if bolus_arrival is None:
        given = None
        method = "per-voxel linear-quadratic regression (Cheong 2003)"
    else:
        given = np.broadcast_to(np.asarray(bolus_arrival, dtype=float), spatial).ravel()
        method = "given"
    # in blocks of voxels (each is independent): the curves' temporaries are several copies of
    # the series otherwise
    blocks = [
        _semi_quantitative_block(
            t,
            flat[i : i + SQ_BLOCK_VOXELS],
            None if given is None else given[i : i + SQ_BLOCK_VOXELS].copy(),
            iauc_window,
        )
        for i in range(0, max(flat.shape[0], 1), SQ_BLOCK_VOXELS)
    ]
    results = [np.concatenate([b[k] for b in blocks]) for k in range(7)]
    valid = results.pop().astype(bool)
    bat_map, ttp_map, peak_map, iauc_map, slope_map, washout_map = (
        r.reshape(spatial) for r in results
    )
    return SemiQuantitativeMaps(
        bat_map,
        ttp_map,
        peak_map,
        iauc_map,
        slope_map,
        washout_map,
        valid=valid.reshape(spatial),
        provenance={
            "bolus_arrival": method,
            "iauc_window_s": iauc_window,
            "time_points_s": [float(t[0]), float(t[-1]), int(t.size)],
        },
    )
