"""Pre-contrast T1 (T10) mapping from variable-flip-angle spoiled gradient echo, with a fallback.

Spoiled gradient echo (SPGR) steady state: S(alpha) = M0 sin(alpha) (1 - E1) / (1 - cos(alpha) E1),
E1 = exp(-TR R1). The signal is linear in M0 for fixed R1, so the fit is a one-dimensional search
over R1 (variable projection) on a log grid, refined by golden-section search, for all voxels at
once. The linearised DESPOT1 estimate is also available.

Units: T1 in s, R1 in /s, TR in s, flip angles in degrees; flip-angle axis LAST.

References
----------
.. [1] Deoni SCL, Rutt BK, Peters TM. Rapid combined T1 and T2 mapping using gradient recalled
   acquisition in the steady state. MRM 2003;49:515-526 (DESPOT1 linearisation).
.. [2] Wang HZ, Riederer SJ, Lee JN. Optimizing the precision in T1 relaxation estimation using
   limited flip angles. MRM 1987;5:399-416.
.. [3] OSIPI DCE-DSC-MRI CodeCollection, test/T1_mapping (tolerance 0.05 /s + 5 % on R1 and S0).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from processing.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["B1_CAVEAT", "T1Fit", "T1MappingError", "VfaT1Model", "fixed_t10", "spgr_signal"]

#: DICOM CID 4100 codes for the T1 method, recorded in provenance.
T1_METHOD_VFA = ("126350", "DCM", "T1 by Multiple Flip Angles")
T1_METHOD_FIXED = ("126352", "DCM", "T1 by Fixed Value")

#: recorded in the provenance of every VFA T1 fitted with the nominal flip angles
B1_CAVEAT = "no B1 correction: flip-angle error biases T1"


class T1MappingError(InputError):
    """The acquisition does not allow a T1 map (e.g. a single flip angle)."""


def spgr_signal(
    m0: ArrayLike, r1: ArrayLike, flip_angle: ArrayLike, repetition_time: float
) -> NDArray[np.float64]:
    """Steady-state SPGR signal M0 sin(a)(1 - E1)/(1 - cos(a) E1); angles in degrees, TR in s."""
    a = np.deg2rad(np.asarray(flip_angle, dtype=float))
    e1 = np.exp(-repetition_time * np.asarray(r1, dtype=float))
    signal: NDArray[np.float64] = np.asarray(m0) * np.sin(a) * (1.0 - e1) / (1.0 - np.cos(a) * e1)
    return signal


#: voxels fitted at once (bounds the memory of the grid search)
BLOCK_VOXELS = 16384


@dataclass(frozen=True)
class T1Fit:
    """T1 map with fit quality; arrays of the spatial shape.

    Attributes
    ----------
    t1 : ndarray
        T1 (s).
    r1 : ndarray
        R1 = 1/T1 (/s).
    m0 : ndarray
        Equilibrium signal (scanner units); NaN for the fixed-value fallback.
    r2 : ndarray
        Coefficient of determination of the signal fit (NaN for the fallback).
    valid : ndarray of bool
    method : str
        ``"variable flip angle"`` or ``"fixed value"`` (the fallback, flagged in every output).
    provenance : dict
    """

    t1: NDArray[np.float64]
    r1: NDArray[np.float64]
    m0: NDArray[np.float64]
    r2: NDArray[np.float64]
    valid: NDArray[np.bool_]
    method: str
    provenance: dict[str, Any]

    @property
    def is_fallback(self) -> bool:
        return self.method == "fixed value"


def fixed_t10(shape: tuple[int, ...], t10: float = 1.0, *, reason: str = "no VFA series") -> T1Fit:
    """Fixed-T10 fallback map (s), flagged as such.

    Parameters
    ----------
    shape : tuple of int
        Spatial shape.
    t10 : float
        Assumed pre-contrast T1 (s); e.g. ~1.0 s for vertebral metastases at 1.5-3 T.
    reason : str
        Why the fallback was used (recorded in provenance).
    """
    if not 0.05 <= t10 <= 10.0:
        raise ValueError(f"fixed T10 {t10} s outside the physical range 0.05-10 s")
    logger.warning("Using fixed T10 = %.3f s (%s): Ktrans/ve/IAUC depend on it", t10, reason)
    t1 = np.full(shape, float(t10))
    return T1Fit(
        t1=t1,
        r1=1.0 / t1,
        m0=np.full(shape, np.nan),
        r2=np.full(shape, np.nan),
        valid=np.ones(shape, dtype=bool),
        method="fixed value",
        provenance={
            "t1_method": "fixed value",
            "t1_method_code": T1_METHOD_FIXED,
            "fixed_t10_s": float(t10),
            "reason": reason,
        },
    )


class VfaT1Model:
    """Variable-flip-angle T1 model.

    Parameters
    ----------
    flip_angles : array_like, shape (n,)
        Nominal flip angles (degrees), at least 2 distinct.
    repetition_time : float
        TR (s), the same for all flip angles.
    b1 : array_like, optional
        Relative B1 (actual/nominal flip angle), scalar or per voxel, default 1.
    min_t1, max_t1 : float, optional
        Physical bounds (s); default 0.01 and 10 (the QIBA T1 DRO goes down to 22 ms).
    method : {"nonlinear", "linear"}
        ``nonlinear`` (default): least squares on the signal; ``linear``: DESPOT1 regression.
    """

    def __init__(
        self,
        flip_angles: ArrayLike,
        repetition_time: float,
        *,
        b1: ArrayLike = 1.0,
        min_t1: float = 0.01,
        max_t1: float = 10.0,
        method: str = "nonlinear",
        n_grid: int = 256,
        refine_iterations: int = 30,
    ) -> None:
        fa = np.asarray(flip_angles, dtype=float)
        if fa.ndim != 1 or np.unique(fa).size < 2:
            raise T1MappingError(
                f"VFA T1 needs at least two distinct flip angles, got {np.unique(fa).tolist()} "
                "deg: a single flip angle does not determine T1"
            )
        if np.any((fa <= 0) | (fa >= 180)):
            raise ValueError("flip angles must be in (0, 180) degrees")
        if repetition_time <= 0:
            raise ValueError(f"TR must be positive, got {repetition_time}")
        if not 0 < min_t1 < max_t1:
            raise ValueError("invalid T1 bounds")
        if method not in ("nonlinear", "linear"):
            raise ValueError(f"unknown method {method!r}")
        self.flip_angles = fa
        self.repetition_time = float(repetition_time)
        self.b1 = np.asarray(b1, dtype=float)
        self.min_t1, self.max_t1 = float(min_t1), float(max_t1)
        self.method = method
        self.n_grid = int(n_grid)
        self.refine_iterations = int(refine_iterations)

    def _basis(
        self, r1: NDArray[np.float64], sin_a: NDArray[np.float64], cos_a: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        e1 = np.exp(-self.repetition_time * r1)[..., None]
        return sin_a * (1.0 - e1) / (1.0 - cos_a * e1)

    def _sse(
        self,
        s: NDArray[np.float64],
        r1: NDArray[np.float64],
        sin_a: NDArray[np.float64],
        cos_a: NDArray[np.float64],
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        f = self._basis(r1, sin_a, cos_a)
        fs = np.sum(f * s, axis=-1)
        ff = np.sum(f * f, axis=-1)
        m0 = fs / ff
        return np.sum(s * s, axis=-1) - fs * m0, m0

    def fit(self, signal: ArrayLike, mask: ArrayLike | None = None) -> T1Fit:
        """Fit T1 for every voxel.

        Parameters
        ----------
        signal : array_like, shape (..., n_flip)
            Signal per flip angle, flip-angle axis last.
        mask : array_like of bool, optional
            Voxels to fit.

        Returns
        -------
        T1Fit
            Invalid (NaN) where the signal is not finite, not positive, or the optimum lies on a
            T1 bound (no minimum inside the physical range).
        """
        s = np.asarray(signal, dtype=float)
        if s.shape[-1] != self.flip_angles.size:
            raise ValueError(
                f"signal has {s.shape[-1]} flip angles, model has {self.flip_angles.size}"
            )
        spatial = s.shape[:-1]
        flat = s.reshape(-1, s.shape[-1])
        use = np.all(np.isfinite(flat), axis=1) & np.all(flat > 0, axis=1)
        if mask is not None:
            use &= np.asarray(mask, dtype=bool).reshape(-1)
        b1 = np.broadcast_to(self.b1, spatial).reshape(-1)
        n = flat.shape[0]
        r1 = np.full(n, np.nan)
        m0 = np.full(n, np.nan)
        idx = np.flatnonzero(use)
        if idx.size:
            sv = flat[idx]
            alpha = np.deg2rad(self.flip_angles)[None, :] * b1[idx][:, None]
            fit = self._fit_linear if self.method == "linear" else self._fit_nonlinear
            # in blocks of voxels (each is independent): the non-linear fit's grid search holds
            # n_grid values per voxel (about 1 GB for a full-size DCE study at once)
            for start in range(0, idx.size, BLOCK_VOXELS):
                block = slice(start, start + BLOCK_VOXELS)
                r1[idx[block]], m0[idx[block]] = fit(sv[block], alpha[block])
        r1_lo, r1_hi = 1.0 / self.max_t1, 1.0 / self.min_t1
        valid = use & np.isfinite(r1) & (r1 > r1_lo * (1 + 1e-6)) & (r1 < r1_hi * (1 - 1e-6))
        r1[~valid] = np.nan
        m0[~valid] = np.nan
        pred = spgr_signal(
            m0[:, None], r1[:, None], self.flip_angles[None, :] * b1[:, None], self.repetition_time
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            ss_res = np.sum((flat - pred) ** 2, axis=1)
            ss_tot = np.sum((flat - flat.mean(axis=1, keepdims=True)) ** 2, axis=1)
            r2 = np.where(valid & (ss_tot > 0), 1.0 - ss_res / ss_tot, np.nan)
            t1 = 1.0 / r1
        return T1Fit(
            t1=t1.reshape(spatial),
            r1=r1.reshape(spatial),
            m0=m0.reshape(spatial),
            r2=r2.reshape(spatial),
            valid=valid.reshape(spatial),
            method="variable flip angle",
            provenance=self.provenance,
        )

    @property
    def provenance(self) -> dict[str, Any]:
        return {
            "t1_method": "variable flip angle",
            "t1_method_code": T1_METHOD_VFA,
            "fit": "SPGR " + self.method + " least squares",
            "flip_angles_deg": self.flip_angles.tolist(),
            "repetition_time_s": self.repetition_time,
            "b1_corrected": bool(np.any(self.b1 != 1.0)),
            **({} if np.any(self.b1 != 1.0) else {"b1_caveat": B1_CAVEAT}),
            "t1_bounds_s": [self.min_t1, self.max_t1],
        }

    def _fit_linear(
        self, s: NDArray[np.float64], alpha: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        # DESPOT1: S/sin(a) = E1 S/tan(a) + M0 (1 - E1), ordinary least squares per voxel
        y = s / np.sin(alpha)
        x = s / np.tan(alpha)
        xm, ym = x.mean(axis=1, keepdims=True), y.mean(axis=1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            e1 = np.sum((x - xm) * (y - ym), axis=1) / np.sum((x - xm) ** 2, axis=1)
            intercept = ym[:, 0] - e1 * xm[:, 0]
            r1 = -np.log(e1) / self.repetition_time
            m0 = intercept / (1.0 - e1)
        bad = ~((e1 > 0) & (e1 < 1))
        r1[bad] = np.nan
        m0[bad] = np.nan
        return r1, m0

    def _fit_nonlinear(
        self, s: NDArray[np.float64], alpha: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        sin_a, cos_a = np.sin(alpha), np.cos(alpha)
        grid = np.linspace(np.log(1.0 / self.max_t1), np.log(1.0 / self.min_t1), self.n_grid)
        ss = np.sum(s * s, axis=-1)
        if np.all(alpha == alpha[:1]):
            # one flip-angle set for all voxels: the grid SSE is a single matrix product
            f = self._basis(np.exp(grid), sin_a[:1], cos_a[:1])  # (n_grid, n_fa)
            sse_grid = ss[None, :] - (f @ s.T) ** 2 / np.sum(f * f, axis=1)[:, None]
        else:
            sse_grid = np.stack(
                [self._sse(s, np.full(s.shape[0], np.exp(g)), sin_a, cos_a)[0] for g in grid]
            )
        best = np.argmin(sse_grid, axis=0)
        lo = grid[np.maximum(best - 1, 0)]
        hi = grid[np.minimum(best + 1, grid.size - 1)]
        ratio = (np.sqrt(5.0) - 1.0) / 2.0
        x1 = hi - ratio * (hi - lo)
        x2 = lo + ratio * (hi - lo)
        f1 = self._sse(s, np.exp(x1), sin_a, cos_a)[0]
        f2 = self._sse(s, np.exp(x2), sin_a, cos_a)[0]
        for _ in range(self.refine_iterations):
            left = f1 < f2
            hi = np.where(left, x2, hi)
            lo = np.where(left, lo, x1)
            x_new = np.where(left, hi - ratio * (hi - lo), lo + ratio * (hi - lo))
            f_new = self._sse(s, np.exp(x_new), sin_a, cos_a)[0]
            x1, x2 = np.where(left, x_new, x2), np.where(left, x1, x_new)
            f1, f2 = np.where(left, f_new, f2), np.where(left, f1, f_new)
        r1 = np.exp(0.5 * (lo + hi))
        # optimum on the grid edge: no interior minimum within the physical range
        r1 = np.where((best == 0) | (best == grid.size - 1), np.nan, r1)
        return r1, self._sse(s, r1, sin_a, cos_a)[1]
