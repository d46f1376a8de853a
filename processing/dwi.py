"""Diffusion-weighted imaging: direction averaging, mono-exponential ADC, segmented IVIM.

Models follow dipy's ``reconst`` pattern: a model object holds the acquisition (b-values) and the
bounds, ``fit(signals, mask=None)`` returns a fit object with maps of the spatial shape, a validity
mask and a provenance dict. Signals have the diffusion-weighting axis LAST. Units: b in s/mm²,
ADC / D / D* in mm²/s, f as a fraction.

References
----------
.. [1] Le Bihan D et al. Separation of diffusion and perfusion in intravoxel incoherent motion MR
   imaging. Radiology 1988;168:497-505 (IVIM model).
.. [2] Veraart J et al. Weighted linear least squares estimation of diffusion MRI parameters:
   strengths, limitations, and pitfalls. NeuroImage 2013;81:335-346 (weights S² for log fits).
.. [3] Gurney-Champion OJ et al. Comparison of six fit algorithms for the intra-voxel incoherent
   motion model of diffusion-weighted magnetic resonance imaging data of pancreatic cancer
   patients. PLoS One 2018;13:e0194590 (segmented fit).
.. [4] Padhani AR et al. Diffusion-weighted magnetic resonance imaging as a cancer biomarker:
   consensus and recommendations. Neoplasia 2009;11:102-125 (b >= 50-100 s/mm² for ADC).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

logger = logging.getLogger(__name__)

__all__ = [
    "AdcFit",
    "AdcModel",
    "IvimFit",
    "IvimModel",
    "direction_average",
    "group_shells",
    "ivim_signal",
    "select_adc_shells",
]

#: b-values below this (s/mm²) are treated as b = 0 (Philips stores b0 as 0.001-0.004).
B0_THRESHOLD = 5.0


def group_shells(
    bvalues: NDArray[np.float64], b0_threshold: float, shell_tolerance: float
) -> tuple[NDArray[np.float64], NDArray[np.intp]]:
    """Group b-values into shells; returns shell b-values (mean) and the shell index per volume.

    A volume joins the current shell when its b-value is within max(0.5, shell_tolerance x b) of
    the shell's lowest b-value (relative tolerance, so 50 and 75 stay apart but 995 and 1005 merge).
    """
    b = np.where(bvalues < b0_threshold, 0.0, bvalues)
    order = np.argsort(b, kind="stable")
    labels = np.empty(b.size, dtype=np.intp)
    shells: list[list[float]] = []
    for i in order:
        if shells and abs(b[i] - shells[-1][0]) <= max(0.5, shell_tolerance * shells[-1][0]):
            shells[-1].append(b[i])
        else:
            shells.append([b[i]])
        labels[i] = len(shells) - 1
    return np.array([np.mean(s) for s in shells]), labels


def direction_average(
    signals: ArrayLike,
    bvalues: ArrayLike,
    *,
    b0_threshold: float = B0_THRESHOLD,
    shell_tolerance: float = 0.02,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Geometric mean of the signals of each b-value shell (trace-weighted signal).

    Parameters
    ----------
    signals : array_like, shape (..., n_volumes)
        Diffusion-weighted signals, volume axis last.
    bvalues : array_like, shape (n_volumes,)
        b-values (s/mm²); values below `b0_threshold` count as b = 0.
    shell_tolerance : float
        Relative tolerance for b-values of the same shell (default 2 %, at least 0.5 s/mm²).

    Returns
    -------
    averaged : ndarray, shape (..., n_shells)
        Geometric mean per shell (NaN where any contributing signal is <= 0 or not finite).
    shells : ndarray, shape (n_shells,)
        Shell b-values (s/mm²), ascending.
    """
    s = np.asarray(signals, dtype=float)
    b = np.asarray(bvalues, dtype=float)
    if b.ndim != 1 or s.shape[-1] != b.size:
        raise ValueError(f"signals have {s.shape[-1]} volumes but {b.size} b-values were given")
    shells, labels = group_shells(b, b0_threshold, shell_tolerance)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(s > 0, np.log(np.where(s > 0, s, 1.0)), np.nan)
    out = np.stack(
        [np.exp(logs[..., labels == k].mean(axis=-1)) for k in range(shells.size)], axis=-1
    )
    return out, shells


def select_adc_shells(
    shells: NDArray[np.float64], *, min_b: float, max_b: float | None
) -> tuple[NDArray[np.float64], str]:
    """The b-value shells of a mono-exponential ADC fit, and why (plain language).

    1. At least two shells in [`min_b`, `max_b`]: those (b = 0 left out, limiting perfusion [4]).
    2. Otherwise every shell <= `max_b` when there are at least two (e.g. b0/b800, or b0/b500 of
       a b0/500/1500 scheme: the shells above `max_b` stay out, kurtosis bends the curve there).
    3. Otherwise (two-point high-b protocols such as b0 + b1500/2000/2500): the shells <= `max_b`
       and the lowest shell above it, so that the fit has two points.

    Parameters
    ----------
    shells : ndarray
        Shell b-values (s/mm²), ascending (:func:`group_shells`); b = 0 as 0.
    min_b, max_b : float
        Preferred b-range (s/mm²); `max_b` None means no upper limit.

    Returns
    -------
    used : ndarray
        Shell b-values of the fit, ascending.
    reason : str

    Raises
    ------
    ValueError
        Fewer than two distinct shells.
    """
    shells = np.asarray(shells, dtype=float)
    if shells.size < 2:
        raise ValueError(f"ADC needs at least two distinct b-values, got {shells.tolist()}")
    top = "" if max_b is None else f"-{max_b:g}"
    candidates = shells if max_b is None else shells[shells <= max_b]
    high = candidates[candidates >= min_b]
    if high.size >= 2:
        return high, (
            f"the shells in the preferred range {min_b:g}{top} s/mm²; b = 0 left out "
            "to limit the perfusion contribution"
        )
    if candidates.size >= 2:
        above = (
            ""
            if max_b is None or candidates.size == shells.size
            else (
                f"; shells above {max_b:g} s/mm² ({shells[shells > max_b].tolist()}) left out "
                "(kurtosis bends the signal there)"
            )
        )
        return candidates, (
            f"fewer than two shells in {min_b:g}{top} s/mm², so b = 0 is included{above}"
        )
    # here max_b is set (else candidates == shells, which has >= 2 shells)
    added = shells[candidates.size : 2]
    used = shells[:2]
    below = f"only b = {candidates[0]:g}" if candidates.size else "no shell"
    return used, (
        f"two-point scheme: {below} at or below {max_b:g} s/mm², so ADC uses the "
        f"lowest shell(s) above it (b = {', '.join(f'{x:g}' for x in added)}); in "
        f"tissue with kurtosis a high-b ADC is lower than one over b <= {max_b:g}"
    )


def _weighted_loglinear(
    b: NDArray[np.float64], s: NDArray[np.float64], *, weighting: str = "S2"
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Log-linear fit ln S = ln S0 - b D per row of s (m, n), weights S² or none; returns D, S0."""
    y = np.log(s)
    w = s * s if weighting == "S2" else np.ones_like(s)
    sw = w.sum(axis=1)
    bm = (w * b).sum(axis=1) / sw
    ym = (w * y).sum(axis=1) / sw
    db = b[None, :] - bm[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (w * db * (y - ym[:, None])).sum(axis=1) / (w * db * db).sum(axis=1)
    return -slope, np.exp(ym - slope * bm)


@dataclass(frozen=True)
class AdcFit:
    """Mono-exponential ADC fit.

    Attributes
    ----------
    adc : ndarray
        Apparent diffusion coefficient (mm²/s); NaN where invalid.
    s0 : ndarray
        Extrapolated b = 0 signal.
    r2 : ndarray
        Coefficient of determination of the signal fit over the b-values used.
    valid : ndarray of bool
        Finite positive signals and ADC within the bounds.
    b_values_used : tuple of float
        Shell b-values (s/mm²) entering the fit.
    provenance : dict
    """

    adc: NDArray[np.float64]
    s0: NDArray[np.float64]
    r2: NDArray[np.float64]
    valid: NDArray[np.bool_]
    b_values_used: tuple[float, ...]
    provenance: dict[str, Any]


class AdcModel:
    """Mono-exponential ADC, S(b) = S0 exp(-b ADC), log-linear least squares.

    Parameters
    ----------
    bvalues : array_like, shape (n_volumes,)
        b-value of every volume (s/mm²). Several volumes per b-value (directions) are
        direction-averaged by geometric mean first.
    min_b : float, optional
        Lowest b-value used when at least two shells have b >= min_b (default 50 s/mm², which
        keeps most of the perfusion contribution out [4]); otherwise all shells including b = 0
        are used so that the common two-point b0/b800-1000 protocol works.
    max_b : float, optional
        Highest b-value used (default None: all). Kurtosis bends the curve beyond ~1000-1500.
        When no shell but b = 0 lies at or below it (b0 + b1500/2000/2500 protocols), the
        lowest shell above it is used instead: see :func:`select_adc_shells` and the
        ``b_selection_reason`` of the provenance.
    min_adc, max_adc : float, optional
        Physical bounds (mm²/s), default 0 and 5e-3 (free water at 37 °C is 3.0e-3).
    weighting : {"S2", "none"}, optional
        ``"S2"`` (default): weighted log-linear least squares with weights S² [2] (lower variance
        at low SNR); ``"none"``: ordinary least squares, the definition of scanner ADC maps.
        Both estimate the same ADC for a mono-exponential signal; for a curved signal (IVIM,
        kurtosis) they differ by up to a few per cent, so compare like with like.
    """

    def __init__(
        self,
        bvalues: ArrayLike,
        *,
        min_b: float = 50.0,
        max_b: float | None = None,
        min_adc: float = 0.0,
        max_adc: float = 5e-3,
        weighting: str = "S2",
        b0_threshold: float = B0_THRESHOLD,
        shell_tolerance: float = 0.02,
    ) -> None:
        b = np.asarray(bvalues, dtype=float)
        if b.ndim != 1 or not np.all(np.isfinite(b)) or np.any(b < 0):
            raise ValueError("b-values must be a 1-D array of finite non-negative numbers")
        if weighting not in ("S2", "none"):
            raise ValueError(f"weighting must be 'S2' or 'none', got {weighting!r}")
        self.weighting = weighting
        shells, _ = group_shells(b, b0_threshold, shell_tolerance)
        self.used, self.b_selection_reason = select_adc_shells(shells, min_b=min_b, max_b=max_b)
        self.bvalues = b
        self.shells = shells
        self.min_b, self.max_b = float(min_b), max_b
        self.min_adc, self.max_adc = float(min_adc), float(max_adc)
        self.b0_threshold, self.shell_tolerance = b0_threshold, shell_tolerance
        if self.used[0] == 0.0:
            logger.info("ADC from b = %s s/mm²: %s", self.used.tolist(), self.b_selection_reason)

    @property
    def provenance(self) -> dict[str, Any]:
        fit = (
            "weighted log-linear least squares (w = S^2)"
            if self.weighting == "S2"
            else "ordinary log-linear least squares"
        )
        return {
            "model": "mono-exponential",
            "fit": fit,
            "b_values_used": self.used.tolist(),
            "b_selection_reason": self.b_selection_reason,
            "min_b": self.min_b,
            "max_b": self.max_b,
            "direction_average": "geometric mean per shell",
            "bounds_mm2_s": [self.min_adc, self.max_adc],
        }

    def fit(self, signals: ArrayLike, mask: ArrayLike | None = None) -> AdcFit:
        """Fit ADC voxel-wise.

        Parameters
        ----------
        signals : array_like, shape (..., n_volumes)
            Signals of every volume, volume axis last.
        mask : array_like of bool, shape (...), optional

        Returns
        -------
        AdcFit
        """
        avg, shells = direction_average(
            signals,
            self.bvalues,
            b0_threshold=self.b0_threshold,
            shell_tolerance=self.shell_tolerance,
        )
        cols = [int(np.argmin(np.abs(shells - u))) for u in self.used]
        spatial = avg.shape[:-1]
        s = avg[..., cols].reshape(-1, len(cols))
        use = np.all(np.isfinite(s) & (s > 0), axis=1)
        if mask is not None:
            use &= np.asarray(mask, dtype=bool).reshape(-1)
        n = s.shape[0]
        adc = np.full(n, np.nan)
        s0 = np.full(n, np.nan)
        r2 = np.full(n, np.nan)
        if use.any():
            d, a = _weighted_loglinear(self.used, s[use], weighting=self.weighting)
            adc[use], s0[use] = d, a
            pred = a[:, None] * np.exp(-d[:, None] * self.used[None, :])
            sv = s[use]
            ss_tot = np.sum((sv - sv.mean(axis=1, keepdims=True)) ** 2, axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                r2[use] = np.where(
                    ss_tot > 0, 1 - np.sum((sv - pred) ** 2, axis=1) / ss_tot, np.nan
                )
        valid = use & np.isfinite(adc) & (adc >= self.min_adc) & (adc <= self.max_adc)
        for arr in (adc, s0, r2):
            arr[~valid] = np.nan
        return AdcFit(
            adc=adc.reshape(spatial),
            s0=s0.reshape(spatial),
            r2=r2.reshape(spatial),
            valid=valid.reshape(spatial),
            b_values_used=tuple(self.used.tolist()),
            provenance=self.provenance,
        )


def ivim_signal(
    bvalues: ArrayLike, *, s0: ArrayLike = 1.0, d: ArrayLike, f: ArrayLike, d_star: ArrayLike
) -> NDArray[np.float64]:
    """IVIM signal S0 ((1 - f) exp(-b D) + f exp(-b D*)); b in s/mm², D and D* in mm²/s [1]."""
    b = np.asarray(bvalues, dtype=float)
    d, f, d_star, s0 = (np.asarray(x, dtype=float)[..., None] for x in (d, f, d_star, s0))
    signal: NDArray[np.float64] = s0 * ((1.0 - f) * np.exp(-b * d) + f * np.exp(-b * d_star))
    return signal


@dataclass(frozen=True)
class IvimFit:
    """Segmented IVIM fit (maps of the spatial shape).

    Attributes
    ----------
    d : ndarray
        Tissue diffusion coefficient D (mm²/s).
    f : ndarray
        Perfusion fraction (0-1).
    d_star : ndarray
        Pseudo-diffusion coefficient D* (mm²/s).
    s0 : ndarray
        Fitted b = 0 signal.
    r2 : ndarray
        Coefficient of determination over all b-values.
    valid : ndarray of bool
    provenance : dict
    """

    d: NDArray[np.float64]
    f: NDArray[np.float64]
    d_star: NDArray[np.float64]
    s0: NDArray[np.float64]
    r2: NDArray[np.float64]
    valid: NDArray[np.bool_]
    provenance: dict[str, Any]


class IvimModel:
    """Segmented IVIM fit: D from high b, then (S0, f, D*) with D fixed.

    Step 1: weighted log-linear mono-exponential fit over b >= `b_threshold` gives D (the
    pseudo-diffusion term has decayed there). Step 2: with D fixed the model
    S = A exp(-b D) + B exp(-b D*) is linear in (A, B) >= 0; it is solved in closed form for every
    D* of a log grid (variable projection), the best grid point is refined by golden-section
    search, and f = B / (A + B), S0 = A + B. Vectorised over voxels.

    Parameters
    ----------
    bvalues : array_like
        b-value per volume (s/mm²); volumes of equal b are direction-averaged.
    b_threshold : float, optional
        Lowest b-value of the D fit (default 200 s/mm²).
    max_b : float, optional
        Highest b-value used (default: all); kurtosis bends the curve beyond ~1000 s/mm².
    d_bounds : (float, float)
        Bounds of D (mm²/s), default (0, 5e-3).
    d_star_bounds : (float, float)
        Bounds of D* (mm²/s), default (3e-3, 0.5); the OSIPI test bounds are (5e-3, 0.2).
    b0_threshold : float
        b-values below this count as 0 (default 0.5 s/mm²: IVIM protocols use b = 1-10).
    """

    def __init__(
        self,
        bvalues: ArrayLike,
        *,
        b_threshold: float = 200.0,
        max_b: float | None = None,
        d_bounds: tuple[float, float] = (0.0, 5e-3),
        d_star_bounds: tuple[float, float] = (3e-3, 0.5),
        b0_threshold: float = 0.5,
        shell_tolerance: float = 0.02,
        n_grid: int = 64,
        refine_iterations: int = 20,
    ) -> None:
        b = np.asarray(bvalues, dtype=float)
        shells, _ = group_shells(b, b0_threshold, shell_tolerance)
        if max_b is not None:
            shells = shells[shells <= max_b]
        high = shells[shells >= b_threshold]
        low = shells[shells < b_threshold]
        if high.size < 2 or low.size < 2 or shells[0] != 0.0:
            raise ValueError(
                f"segmented IVIM needs b = 0, another b < {b_threshold} and at least two b >= "
                f"{b_threshold} s/mm²; got {shells.tolist()}"
            )
        if not 0 < d_star_bounds[0] < d_star_bounds[1]:
            raise ValueError(f"invalid D* bounds {d_star_bounds}")
        self.bvalues, self.shells, self.high = b, shells, high
        self.b_threshold = float(b_threshold)
        self.d_bounds, self.d_star_bounds = d_bounds, d_star_bounds
        self.b0_threshold, self.shell_tolerance = b0_threshold, shell_tolerance
        self.n_grid, self.refine_iterations = int(n_grid), int(refine_iterations)

    @property
    def provenance(self) -> dict[str, Any]:
        return {
            "model": "IVIM bi-exponential",
            "fit": "segmented: D from b >= "
            f"{self.b_threshold:g} (weighted log-linear), then S0, f, D* by variable projection",
            "b_values_used": self.shells.tolist(),
            "d_bounds_mm2_s": list(self.d_bounds),
            "d_star_bounds_mm2_s": list(self.d_star_bounds),
        }

    def fit(self, signals: ArrayLike, mask: ArrayLike | None = None) -> IvimFit:
        """Fit every voxel; signals (..., n_volumes), volume axis last."""
        avg, shells = direction_average(
            signals,
            self.bvalues,
            b0_threshold=self.b0_threshold,
            shell_tolerance=self.shell_tolerance,
        )
        spatial = avg.shape[:-1]
        cols = [int(np.argmin(np.abs(shells - u))) for u in self.shells]
        shells = self.shells
        s = avg[..., cols].reshape(-1, shells.size)
        use = np.all(np.isfinite(s) & (s > 0), axis=1)
        if mask is not None:
            use &= np.asarray(mask, dtype=bool).reshape(-1)
        n = s.shape[0]
        out = {k: np.full(n, np.nan) for k in ("d", "f", "d_star", "s0", "r2")}
        if use.any():
            for key, val in self._fit_flat(s[use], shells).items():
                out[key][use] = val
        valid = (
            use
            & np.isfinite(out["d"])
            & (out["d"] >= self.d_bounds[0])
            & (out["d"] <= self.d_bounds[1])
        )
        for arr in out.values():
            arr[~valid] = np.nan
        return IvimFit(
            **{k: v.reshape(spatial) for k, v in out.items()},
            valid=valid.reshape(spatial),
            provenance=self.provenance,
        )

    def _fit_flat(
        self, s: NDArray[np.float64], b: NDArray[np.float64]
    ) -> dict[str, NDArray[np.float64]]:
        high = b >= self.b_threshold
        d, _ = _weighted_loglinear(b[high], s[:, high])
        d = np.clip(d, self.d_bounds[0], self.d_bounds[1])
        e_d = np.exp(-b[None, :] * d[:, None])  # (m, n)
        ss = np.sum(s * s, axis=1)

        def solve(
            d_star: NDArray[np.float64],
        ) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
            e_s = np.exp(-b[None, :] * d_star[:, None])
            p, q = np.sum(e_d * s, axis=1), np.sum(e_s * s, axis=1)
            g11, g12, g22 = (
                np.sum(e_d * e_d, axis=1),
                np.sum(e_d * e_s, axis=1),
                np.sum(e_s * e_s, axis=1),
            )
            det = g11 * g22 - g12 * g12
            with np.errstate(divide="ignore", invalid="ignore"):
                a = (p * g22 - q * g12) / det
                bb = (q * g11 - p * g12) / det
                ok = (det > 0) & (a >= 0) & (bb >= 0)
                # edges: only the D component, or only the D* component
                a_only, b_only = np.maximum(p / g11, 0.0), np.maximum(q / g22, 0.0)
            sse_int = np.where(
                ok,
                ss - 2 * (a * p + bb * q) + a * a * g11 + 2 * a * bb * g12 + bb * bb * g22,
                np.inf,
            )
            sse_a = ss - 2 * a_only * p + a_only**2 * g11
            sse_b = ss - 2 * b_only * q + b_only**2 * g22
            best_a = np.where(ok, a, 0.0)
            best_b = np.where(ok, bb, 0.0)
            sse = sse_int
            for cand_a, cand_b, cand in (
                (a_only, 0.0 * a_only, sse_a),
                (0.0 * b_only, b_only, sse_b),
            ):
                better = cand < sse
                sse = np.where(better, cand, sse)
                best_a = np.where(better, cand_a, best_a)
                best_b = np.where(better, cand_b, best_b)
            return best_a, best_b, sse

        grid = np.linspace(
            np.log(self.d_star_bounds[0]), np.log(self.d_star_bounds[1]), self.n_grid
        )
        m = s.shape[0]
        sse_grid = np.stack([solve(np.full(m, np.exp(g)))[2] for g in grid])
        k = np.argmin(sse_grid, axis=0)
        lo = grid[np.maximum(k - 1, 0)]
        hi = grid[np.minimum(k + 1, grid.size - 1)]
        ratio = (np.sqrt(5.0) - 1.0) / 2.0
        for _ in range(self.refine_iterations):
            x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
            left = solve(np.exp(x1))[2] < solve(np.exp(x2))[2]
            hi = np.where(left, x2, hi)
            lo = np.where(left, lo, x1)
        d_star = np.exp(0.5 * (lo + hi))
        a, bb, sse = solve(d_star)
        s0 = a + bb
        with np.errstate(divide="ignore", invalid="ignore"):
            f = np.where(s0 > 0, bb / s0, np.nan)
            ss_tot = np.sum((s - s.mean(axis=1, keepdims=True)) ** 2, axis=1)
            r2 = np.where(ss_tot > 0, 1 - sse / ss_tot, np.nan)
        return {"d": d, "f": f, "d_star": d_star, "s0": s0, "r2": r2}
