"""Diffusion kurtosis: dipy's tensor DKI when the protocol allows, else apparent kurtosis.

Tensor DKI (MK, MD, AK, RK, FA) uses :class:`dipy.reconst.dki.DiffusionKurtosisModel`; it needs
b = 0, at least two non-zero shells (>= 6 directions each) up to ~2000 s/mm² and at least 15
non-collinear gradient directions. Otherwise (e.g. trace-only body protocols) the direction-averaged
signal is fitted with S(b) = S0 exp(-b D + b² D² K / 6), giving Dapp and Kapp.

Units: b in s/mm², diffusivities in mm²/s, kurtosis dimensionless; volume axis LAST.

References
----------
.. [1] Jensen JH et al. Diffusional kurtosis imaging: the quantification of non-Gaussian water
   diffusion by means of magnetic resonance imaging. MRM 2005;53:1432-1440.
.. [2] Tabesh A et al. Estimation of tensors and tensor-derived measures in diffusional kurtosis
   imaging. MRM 2011;65:823-836.
.. [3] Henriques RN et al. Diffusional kurtosis imaging in the diffusion imaging in Python
   project. Front Hum Neurosci 2021;15:675433 (dipy DKI).
.. [4] Rosenkrantz AB et al. Body diffusion kurtosis imaging: basic principles, applications, and
   considerations for clinical practice. JMRI 2015;42:1190-1202 (apparent kurtosis model).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from dipy.core.gradients import gradient_table
from dipy.reconst import dki as dipy_dki
from dipy.reconst import dti as dipy_dti
from dipy.reconst.dki import DiffusionKurtosisModel
from numpy.typing import ArrayLike, NDArray

from processing.dwi import B0_THRESHOLD, direction_average, group_shells

logger = logging.getLogger(__name__)

__all__ = [
    "ApparentKurtosisFit",
    "ApparentKurtosisModel",
    "DkiFit",
    "TensorDkiModel",
    "n_noncollinear_directions",
    "protocol_allows_tensor_dki",
    "tensor_dki_volumes",
]

#: dipy's default lower kurtosis bound (-3/7, Jensen 2005) and a practical upper bound.
MIN_KURTOSIS = -3.0 / 7.0
MAX_KURTOSIS = 10.0


def n_noncollinear_directions(bvecs: ArrayLike, *, angle_tolerance_deg: float = 5.0) -> int:
    """Number of distinct gradient axes (v and -v count once) among unit vectors (n, 3)."""
    v = np.asarray(bvecs, dtype=float).reshape(-1, 3)
    norms = np.linalg.norm(v, axis=1)
    v = v[norms > 0.5] / norms[norms > 0.5, None]
    cos_tol = np.cos(np.deg2rad(angle_tolerance_deg))
    kept: list[NDArray[np.float64]] = []
    for u in v:
        if all(abs(float(u @ w)) < cos_tol for w in kept):
            kept.append(u)
    return len(kept)


def tensor_dki_volumes(
    bvalues: ArrayLike,
    bvecs: ArrayLike | None,
    *,
    min_shell_directions: int = 6,
    min_directions: int = 15,
    min_b_max: float = 1400.0,
    max_b_max: float = 3500.0,
    b0_threshold: float = B0_THRESHOLD,
) -> tuple[NDArray[np.bool_] | None, str]:
    """Volumes usable for tensor DKI, or None with the reason why the protocol does not allow it.

    Selected: the b = 0 volumes and every shell with >= `min_shell_directions` non-collinear
    directions and b <= `max_b_max`. Required: b = 0, >= 2 such shells, >= `min_directions`
    non-collinear directions in all, and a highest selected b >= `min_b_max` (docs/science.md §3.2;
    the same thresholds as :mod:`processing.classify`). Shells with fewer directions (e.g. the
    3-direction low-b shells of IVIM protocols) are left out of the tensor fit.

    Returns
    -------
    (ndarray of bool or None, str)
        Volume selection and a sentence for the provenance.
    """
    b = np.asarray(bvalues, dtype=float)
    shells, labels = group_shells(b, b0_threshold, 0.02)
    if shells[0] != 0.0:
        return None, "no b = 0 volume"
    if bvecs is None:
        return None, "no gradient directions (trace-weighted data)"
    g = np.asarray(bvecs, dtype=float).reshape(-1, 3)
    selected = labels == 0
    used: list[float] = []
    dirs: list[NDArray[np.float64]] = []
    for k, bk in enumerate(shells):
        if bk == 0.0 or bk > max_b_max:
            continue
        members = labels == k
        if n_noncollinear_directions(g[members]) >= min_shell_directions:
            selected |= members
            used.append(float(bk))
            dirs.append(g[members])
    if len(used) < 2:
        return None, (
            f"fewer than two non-zero shells with >= {min_shell_directions} "
            f"non-collinear directions ({used})"
        )
    n_dir = n_noncollinear_directions(np.concatenate(dirs))
    if n_dir < min_directions:
        return None, f"{n_dir} < {min_directions} non-collinear directions"
    if max(used) < min_b_max:
        return None, f"highest b {max(used):g} < {min_b_max:g} s/mm²"
    return selected, f"b = 0 and shells {used} s/mm² with {n_dir} non-collinear directions"


def protocol_allows_tensor_dki(
    bvalues: ArrayLike, bvecs: ArrayLike | None, **kwargs: Any
) -> tuple[bool, str]:
    """Whether tensor DKI is identifiable (see :func:`tensor_dki_volumes`); (decision, reason)."""
    selection, reason = tensor_dki_volumes(bvalues, bvecs, **kwargs)
    return selection is not None, reason


#: voxels fitted at once (bounds the memory of the batched normal equations)
BLOCK_VOXELS = 16384


@dataclass(frozen=True)
class DkiFit:
    """Tensor DKI maps (spatial shape).

    Attributes
    ----------
    mk, ak, rk : ndarray
        Mean, axial and radial kurtosis (dimensionless), within [min_kurtosis, max_kurtosis].
    md : ndarray
        Mean diffusivity (mm²/s).
    fa : ndarray
        Fractional anisotropy (0-1).
    valid : ndarray of bool
    provenance : dict
    """

    mk: NDArray[np.float64]
    md: NDArray[np.float64]
    ak: NDArray[np.float64]
    rk: NDArray[np.float64]
    fa: NDArray[np.float64]
    valid: NDArray[np.bool_]
    provenance: dict[str, Any]


class TensorDkiModel:
    """Tensor DKI through dipy's :class:`~dipy.reconst.dki.DiffusionKurtosisModel`.

    Parameters
    ----------
    bvalues : array_like, shape (n,)
        b-values (s/mm²).
    bvecs : array_like, shape (n, 3)
        Unit gradient directions in the image frame (zero vectors for b = 0).
    fit_method : str
        ``"WLS"`` (default, weighted linear least squares [2]) or ``"OLS"``: dipy's ``ls_fit_dki``
        estimator, solved for all voxels at once (dipy's own loop costs ~1 ms per voxel); the
        kurtosis and diffusivity metrics are dipy's functions.
    min_kurtosis, max_kurtosis : float
        Bounds applied to MK, AK, RK (dipy's keyword arguments).
    max_md : float
        Voxels with MD outside (0, max_md] mm²/s are invalid.
    require_protocol : bool
        Raise ValueError when :func:`protocol_allows_tensor_dki` says no (default True).
    """

    def __init__(
        self,
        bvalues: ArrayLike,
        bvecs: ArrayLike,
        *,
        fit_method: str = "WLS",
        min_kurtosis: float = MIN_KURTOSIS,
        max_kurtosis: float = MAX_KURTOSIS,
        max_md: float = 5e-3,
        b0_threshold: float = B0_THRESHOLD,
        require_protocol: bool = True,
    ) -> None:
        if fit_method.upper() not in ("WLS", "OLS"):
            raise ValueError(f"fit_method must be 'WLS' or 'OLS', got {fit_method!r}")
        b = np.asarray(bvalues, dtype=float)
        g = np.asarray(bvecs, dtype=float).reshape(-1, 3)
        if g.shape[0] != b.size:
            raise ValueError(f"{b.size} b-values but {g.shape[0]} gradient vectors")
        selection, reason = tensor_dki_volumes(b, g, b0_threshold=b0_threshold)
        if selection is None:
            if require_protocol:
                raise ValueError(f"protocol does not support tensor DKI: {reason}")
            selection = np.ones(b.size, dtype=bool)
        self.selection = selection
        b = np.where(b < b0_threshold, 0.0, b)[selection]
        g = np.where((b < b0_threshold)[:, None], 0.0, g[selection])
        self.gtab = gradient_table(b, bvecs=g, b0_threshold=b0_threshold)
        self._model = DiffusionKurtosisModel(self.gtab, fit_method=fit_method)
        self.fit_method = fit_method
        self.min_kurtosis, self.max_kurtosis, self.max_md = min_kurtosis, max_kurtosis, max_md
        self.reason = reason
        self.shells = group_shells(b, b0_threshold, 0.02)[0]

    @property
    def provenance(self) -> dict[str, Any]:
        from dipy.version import version as dipy_version

        return {
            "model": "diffusion kurtosis tensor",
            "fit": f"dipy {dipy_version} "
            f"DiffusionKurtosisModel design, {self.fit_method} solved batched; dipy metrics",
            "b_values_used": self.shells.tolist(),
            "n_volumes": int(self.gtab.bvals.size),
            "protocol": self.reason,
            "kurtosis_bounds": [self.min_kurtosis, self.max_kurtosis],
        }

    def _wls_params(self, data: NDArray[np.float64]) -> NDArray[np.float64]:
        """dipy's ``ls_fit_dki`` (weighted: W = OLS-predicted signal) for every voxel (rows of
        ``data``), in blocks of :data:`BLOCK_VOXELS` voxels.

        Same design matrix, weights and parameter packing as
        :class:`~dipy.reconst.dki.DiffusionKurtosisModel` with ``fit_method="WLS"`` (which loops
        over voxels in Python); the weighted normal equations are solved batched. Returns dipy's
        27 DKI parameters per voxel (tests check equality with dipy's own fit). Each voxel is
        independent; the blocks bound the memory of the normal equations (22 x 22 values per
        voxel: 1.1 GB for a full-size study at once).
        """
        return np.concatenate(
            [
                self._wls_params_block(data[i : i + BLOCK_VOXELS])
                for i in range(0, max(data.shape[0], 1), BLOCK_VOXELS)
            ]
        )

    def _wls_params_block(self, data: NDArray[np.float64]) -> NDArray[np.float64]:
        a = self._model.design_matrix
        y = np.log(np.maximum(data, self._model.min_signal))
        if self.fit_method.upper() in ("OLS", "LS", "LLS", "OLLS"):
            result = y @ self._model.inverse_design_matrix.T
        else:
            w2 = np.exp(2.0 * (y @ self._model.inverse_design_matrix.T) @ a.T)  # (N, g)
            n_par = a.shape[1]
            # A^T W^2 A for all voxels as one matrix product with the outer products of A's rows
            ata = (w2 @ (a[:, :, None] * a[:, None, :]).reshape(a.shape[0], -1)).reshape(
                -1, n_par, n_par
            )
            aty = (w2 * y) @ a
            result = np.linalg.solve(ata, aty[..., None])[..., 0]
        evals, evecs = dipy_dti.decompose_tensor(
            dipy_dti.from_lower_triangular(result[:, :6]), min_diffusivity=0
        )
        md2 = evals.mean(axis=-1, keepdims=True) ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            kt = np.where(md2 > 0, result[:, 6:21] / md2, 0.0)
        return np.concatenate([evals, evecs[:, 0, :], evecs[:, 1, :], evecs[:, 2, :], kt], axis=1)

    def fit(self, signals: ArrayLike, mask: ArrayLike | None = None) -> DkiFit:
        """Fit the DKI tensor voxel-wise; signals (..., n_volumes)."""
        s = np.asarray(signals, dtype=float)
        if s.shape[-1] != self.selection.size:
            raise ValueError(f"signals have {s.shape[-1]} volumes, the model {self.selection.size}")
        s = s[..., self.selection]
        spatial = s.shape[:-1]
        use = np.all(np.isfinite(s) & (s > 0), axis=-1)
        if mask is not None:
            use &= np.asarray(mask, dtype=bool)
        params = np.zeros(spatial + (27,))
        params[use] = self._wls_params(s[use])
        kw = {"min_kurtosis": self.min_kurtosis, "max_kurtosis": self.max_kurtosis}
        sub = params[use]
        mk, ak, rk = (np.full(spatial, np.nan) for _ in range(3))
        md, fa = np.full(spatial, np.nan), np.full(spatial, np.nan)
        if sub.shape[0]:
            mk[use] = dipy_dki.mean_kurtosis(sub, **kw)
            ak[use] = dipy_dki.axial_kurtosis(sub, **kw)
            rk[use] = dipy_dki.radial_kurtosis(sub, **kw)
            md[use] = dipy_dti.mean_diffusivity(sub[:, :3])
            fa[use] = dipy_dti.fractional_anisotropy(sub[:, :3])
        valid = use & np.isfinite(mk) & np.isfinite(md) & (md > 0) & (md <= self.max_md)
        mk_map, md_map, ak_map, rk_map, fa_map = (
            np.where(valid, x, np.nan) for x in (mk, md, ak, rk, fa)
        )
        return DkiFit(
            mk_map, md_map, ak_map, rk_map, fa_map, valid=valid, provenance=self.provenance
        )


@dataclass(frozen=True)
class ApparentKurtosisFit:
    """Direction-averaged apparent kurtosis fit.

    Attributes
    ----------
    kapp : ndarray
        Apparent kurtosis (dimensionless), clipped to the bounds.
    dapp : ndarray
        Apparent diffusivity (mm²/s).
    s0 : ndarray
    r2 : ndarray
    valid : ndarray of bool
    b_values_used : tuple of float
    provenance : dict
    """

    kapp: NDArray[np.float64]
    dapp: NDArray[np.float64]
    s0: NDArray[np.float64]
    r2: NDArray[np.float64]
    valid: NDArray[np.bool_]
    b_values_used: tuple[float, ...]
    provenance: dict[str, Any]


class ApparentKurtosisModel:
    """S(b) = S0 exp(-b D + b² D² K / 6) on direction-averaged signals [4].

    ln S is quadratic in b, so the fit is a weighted (w = S²) linear least-squares quadratic
    regression per voxel (closed form, vectorised): ln S = c0 + c1 b + c2 b², D = -c1,
    K = 6 c2 / D².

    Parameters
    ----------
    bvalues : array_like
        b-value per volume (s/mm²).
    min_b : float
        Lowest non-zero b used (default 0: all, including b = 0 which anchors S0).
    max_b : float
        Highest b used (default 3000 s/mm²; the expansion fails beyond ~3000).
    min_kurtosis, max_kurtosis : float
        Bounds of K (clipped, like dipy); default -3/7 and 10.
    max_d : float
        Voxels with D outside (0, max_d] mm²/s are invalid.
    """

    def __init__(
        self,
        bvalues: ArrayLike,
        *,
        min_b: float = 0.0,
        max_b: float = 3000.0,
        min_kurtosis: float = MIN_KURTOSIS,
        max_kurtosis: float = MAX_KURTOSIS,
        max_d: float = 5e-3,
        b0_threshold: float = B0_THRESHOLD,
    ) -> None:
        b = np.asarray(bvalues, dtype=float)
        shells, _ = group_shells(b, b0_threshold, 0.02)
        used = shells[((shells >= min_b) | (shells == 0.0)) & (shells <= max_b)]
        if used.size < 3:
            raise ValueError(f"apparent kurtosis needs at least 3 b-values, got {used.tolist()}")
        if used.max() < 1000.0:
            raise ValueError(f"apparent kurtosis needs b up to >= 1000 s/mm², got {used.max():g}")
        self.bvalues, self.used, self.b0_threshold = b, used, b0_threshold
        self.min_kurtosis, self.max_kurtosis, self.max_d = min_kurtosis, max_kurtosis, max_d

    @property
    def provenance(self) -> dict[str, Any]:
        return {
            "model": "apparent kurtosis (direction-averaged)",
            "fit": "weighted linear least squares on ln S (w = S^2)",
            "b_values_used": self.used.tolist(),
            "kurtosis_bounds": [self.min_kurtosis, self.max_kurtosis],
        }

    def fit(self, signals: ArrayLike, mask: ArrayLike | None = None) -> ApparentKurtosisFit:
        """Fit every voxel; signals (..., n_volumes) are direction-averaged per shell first."""
        avg, shells = direction_average(signals, self.bvalues, b0_threshold=self.b0_threshold)
        cols = [int(np.argmin(np.abs(shells - u))) for u in self.used]
        spatial = avg.shape[:-1]
        s = avg[..., cols].reshape(-1, len(cols))
        use = np.all(np.isfinite(s) & (s > 0), axis=1)
        if mask is not None:
            use &= np.asarray(mask, dtype=bool).reshape(-1)
        n = s.shape[0]
        k = np.full(n, np.nan)
        d = np.full(n, np.nan)
        s0 = np.full(n, np.nan)
        r2 = np.full(n, np.nan)
        if use.any():
            sv = s[use]
            b = self.used / 1000.0  # ms/µm² scaling keeps the normal equations well conditioned
            x = np.stack([np.ones_like(b), b, b * b], axis=1)  # (n_b, 3)
            w = sv * sv
            xtwx = np.einsum("mb,bi,bj->mij", w, x, x)
            xtwy = np.einsum("mb,bi,mb->mi", w, x, np.log(sv))
            c = np.linalg.solve(xtwx, xtwy[..., None])[..., 0]
            dv = -c[:, 1] / 1000.0
            with np.errstate(divide="ignore", invalid="ignore"):
                kv = 6.0 * (c[:, 2] / 1e6) / dv**2
            s0v = np.exp(c[:, 0])
            pred = np.exp(c @ x.T)
            ss_tot = np.sum((sv - sv.mean(axis=1, keepdims=True)) ** 2, axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                r2[use] = np.where(
                    ss_tot > 0, 1 - np.sum((sv - pred) ** 2, axis=1) / ss_tot, np.nan
                )
            k[use] = np.clip(kv, self.min_kurtosis, self.max_kurtosis)
            d[use], s0[use] = dv, s0v
        valid = use & np.isfinite(k) & np.isfinite(d) & (d > 0) & (d <= self.max_d)
        for arr in (k, d, s0, r2):
            arr[~valid] = np.nan
        return ApparentKurtosisFit(
            kapp=k.reshape(spatial),
            dapp=d.reshape(spatial),
            s0=s0.reshape(spatial),
            r2=r2.reshape(spatial),
            valid=valid.reshape(spatial),
            b_values_used=tuple(self.used.tolist()),
            provenance=self.provenance,
        )
