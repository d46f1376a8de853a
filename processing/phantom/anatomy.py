"""Analytic anatomy of the phantom: tissues, their parameters, the tumour and voxel grids.

The body is defined in continuous coordinates (the baseline study's patient coordinates, LPS, mm),
so every series is a point sampling of the same analytic object at its voxel centres (no partial
volume): a voxel *is* tumour when its centre lies inside the tumour surface. The true tumour mask
on any grid is therefore :func:`TumourShape.contains` at that grid's voxel centres, mapped through
the study's rigid transform for follow-ups.

Tissue values (3 T) follow the sources of docs/science.md §2: marrow D/f/D* from the OSIPI IVIM
bone-marrow reference (D 0.43e-3 mm²/s, f 0.145, D* 50e-3 mm²/s); tumour ADC ~0.7-0.9e-3 mm²/s
(Lee 2021) with higher kurtosis than marrow (docs/science.md §2.3); hypervascular metastasis DCE
values of the MSKCC series (Ktrans ~0.1-0.3 /min, vp 0.05-0.1); T1/T2 from standard 3 T tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

#: tissue label -> name (labels are indices into the parameter table)
TISSUES: tuple[str, ...] = (
    "air",
    "soft_tissue",
    "fat",
    "muscle",
    "blood",
    "marrow",
    "cortical_bone",
    "disc",
    "csf",
    "cord",
    "tumour",
)
LABEL = {name: i for i, name in enumerate(TISSUES)}

#: Parameters per tissue. pd: proton density (a.u.); t1, t2 in ms; d, dstar in mm²/s; k
#: kurtosis; f perfusion fraction; ktrans /min; ve, vp fractions; dwi: extra DWI weighting (fat
#: suppression of fat and fatty marrow, flow void of blood).
TISSUE_PARAMS: dict[str, dict[str, float]] = {
    "air": dict(pd=0.0, t1=1000, t2=1, d=1e-3, k=0, f=0, dstar=0.0, ktrans=0, ve=0, vp=0, dwi=0),
    "soft_tissue": dict(
        pd=0.80,
        t1=1200,
        t2=60,
        d=1.4e-3,
        k=0.5,
        f=0.10,
        dstar=20e-3,
        ktrans=0.10,
        ve=0.20,
        vp=0.05,
        dwi=1.0,
    ),
    "fat": dict(
        pd=0.95,
        t1=380,
        t2=80,
        d=0.02e-3,
        k=0,
        f=0,
        dstar=0.0,
        ktrans=0.01,
        ve=0.05,
        vp=0.005,
        dwi=0.05,
    ),
    "muscle": dict(
        pd=0.75,
        t1=1400,
        t2=40,
        d=1.5e-3,
        k=0.5,
        f=0.05,
        dstar=30e-3,
        ktrans=0.05,
        ve=0.12,
        vp=0.02,
        dwi=1.0,
    ),
    "blood": dict(
        pd=0.90, t1=1650, t2=200, d=2.0e-3, k=0, f=0, dstar=0.0, ktrans=0, ve=0, vp=1.0, dwi=0.1
    ),
    "marrow": dict(
        pd=0.85,
        t1=750,
        t2=60,
        d=0.43e-3,
        k=1.0,
        f=0.145,
        dstar=50e-3,
        ktrans=0.03,
        ve=0.10,
        vp=0.02,
        dwi=0.6,
    ),
    "cortical_bone": dict(
        pd=0.05, t1=1000, t2=2, d=0.3e-3, k=0, f=0, dstar=0.0, ktrans=0, ve=0, vp=0, dwi=1.0
    ),
    "disc": dict(
        pd=0.80,
        t1=1200,
        t2=110,
        d=1.7e-3,
        k=0.3,
        f=0,
        dstar=0.0,
        ktrans=0.005,
        ve=0.20,
        vp=0,
        dwi=1.0,
    ),
    "csf": dict(
        pd=1.00, t1=4000, t2=1500, d=3.0e-3, k=0, f=0, dstar=0.0, ktrans=0, ve=0, vp=0, dwi=1.0
    ),
    "cord": dict(
        pd=0.75, t1=1000, t2=75, d=1.0e-3, k=0.6, f=0.05, dstar=20e-3, ktrans=0, ve=0, vp=0, dwi=1.0
    ),
    "tumour": dict(
        pd=0.85,
        t1=1300,
        t2=90,
        d=0.85e-3,
        k=0.9,
        f=0.06,
        dstar=25e-3,
        ktrans=0.25,
        ve=0.35,
        vp=0.08,
        dwi=1.0,
    ),
}
PARAM_NAMES: tuple[str, ...] = (
    "pd",
    "t1",
    "t2",
    "d",
    "k",
    "f",
    "dstar",
    "ktrans",
    "ve",
    "vp",
    "dwi",
)
#: relative texture amplitude (standard deviation of a smooth multiplicative field) in tumour
TEXTURE_SD: dict[str, float] = {
    "d": 0.04,
    "k": 0.04,
    "f": 0.05,
    "dstar": 0.05,
    "pd": 0.02,
    "t1": 0.03,
    "t2": 0.03,
    "ktrans": 0.05,
    "ve": 0.04,
    "vp": 0.05,
}

VERTEBRAL_NAMES = ("T8", "T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5")
LEVEL_PITCH_MM = 33.0  # vertebral body 25 mm + disc 8 mm
BODY_HALF_HEIGHT_MM = 12.5
BODY_SEMI_AXES_MM = (22.0, 17.0)  # LR, AP of the vertebral body ellipse
CORTEX_MM = 1.5
CANAL_CENTRE_Y_MM = 27.0
CANAL_SEMI_AXES_MM = (10.0, 9.0)
CORD_SEMI_AXES_MM = (5.0, 4.0)


@dataclass(frozen=True)
class Grid:
    """A voxel grid in LPS: size (i, j, k), spacing (mm), origin (centre of voxel 0), direction.

    ``direction`` columns are the row (i), column (j) and slice (k) unit vectors, exactly as
    SimpleITK's ``GetDirection()`` reports them (row-major 3×3).
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def matrix(self) -> NDArray[np.float64]:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    def points(self) -> NDArray[np.float64]:
        """Voxel centres, shape (k, j, i, 3) in LPS mm (numpy order of a SimpleITK array)."""
        ni, nj, nk = self.size
        k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
        idx = np.stack([i, j, k], axis=-1).astype(np.float64) * np.asarray(self.spacing)
        centres: NDArray[np.float64] = np.asarray(self.origin) + idx @ self.matrix.T
        return centres

    def slice_position(self, k: int) -> NDArray[np.float64]:
        """ImagePositionPatient of slice k (centre of its first voxel)."""
        return np.asarray(self.origin) + k * self.spacing[2] * self.matrix[:, 2]

    def as_dict(self) -> dict[str, list[float] | list[int]]:
        return {
            "origin": [float(v) for v in self.origin],
            "spacing": [float(v) for v in self.spacing],
            "direction": [float(v) for v in self.direction],
            "size": [int(v) for v in self.size],
        }


def centred_grid(
    centre: NDArray[np.float64],
    size: tuple[int, int, int],
    spacing: tuple[float, float, float],
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
) -> Grid:
    """A grid whose voxel-centre box is centred on ``centre`` (LPS mm)."""
    half = (np.asarray(size) - 1) * np.asarray(spacing) / 2.0
    origin = np.round(np.asarray(centre) - np.asarray(direction).reshape(3, 3) @ half, 4)
    return Grid(
        size=size,
        spacing=spacing,
        origin=cast("tuple[float, float, float]", tuple(float(v) for v in origin)),
        direction=direction,
    )


def _legendre2(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return 1.5 * x * x - 0.5


def _legendre3(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return x * (2.5 * x * x - 1.5)


@dataclass(frozen=True)
class TumourShape:
    """An irregular, star-shaped tumour in a vertebral body, optionally with an epidural part.

    A point x is inside the main body when |y| < 1 + Σ w·P_n(ŷ·v) with y = Rᵀ(x − c)/radii,
    P_n Legendre polynomials of degree 2 and 3 along random unit vectors v. The epidural
    component is an ellipsoid (centre, semi-axes in LPS mm) behind the posterior body wall.
    """

    centre: tuple[float, float, float]
    rotation: tuple[float, ...]
    radii: tuple[float, float, float]
    lobes: tuple[tuple[float, float, float, float, int], ...]  # (vx, vy, vz, weight, degree)
    epidural_centre: tuple[float, float, float] | None = None
    epidural_radii: tuple[float, float, float] | None = None

    def radial(self, unit: NDArray[np.float64]) -> NDArray[np.float64]:
        r = np.ones(unit.shape[:-1])
        for vx, vy, vz, w, deg in self.lobes:
            c = unit @ np.array([vx, vy, vz])
            r = r + w * (_legendre2(c) if deg == 2 else _legendre3(c))
        return r

    def contains_main(self, pts: NDArray[np.float64]) -> NDArray[np.bool_]:
        out = np.zeros(pts.shape[:-1], dtype=bool)
        amplitude = sum(abs(lb[3]) for lb in self.lobes)
        reach = float(np.max(self.radii)) * (1.0 + amplitude)
        d = pts - np.asarray(self.centre)
        near = (
            (np.abs(d[..., 0]) < reach) & (np.abs(d[..., 1]) < reach) & (np.abs(d[..., 2]) < reach)
        )
        if not near.any():
            return out
        rot = np.asarray(self.rotation).reshape(3, 3)
        y = (d[near] @ rot) / np.asarray(self.radii)
        rho = np.sqrt(np.einsum("ij,ij->i", y, y))
        inside = rho < 1.0 - amplitude
        shell = ~inside & (rho < 1.0 + amplitude)  # only here does the surface need evaluating
        unit = y[shell] / np.maximum(rho[shell], 1e-12)[:, None]
        inside[shell] = rho[shell] < self.radial(unit)
        out[near] = inside
        return out

    def contains_epidural(self, pts: NDArray[np.float64]) -> NDArray[np.bool_]:
        if self.epidural_centre is None or self.epidural_radii is None:
            return np.zeros(pts.shape[:-1], dtype=bool)
        out = np.zeros(pts.shape[:-1], dtype=bool)
        d = pts - np.asarray(self.epidural_centre)
        r = self.epidural_radii
        near = (np.abs(d[..., 0]) < r[0]) & (np.abs(d[..., 1]) < r[1]) & (np.abs(d[..., 2]) < r[2])
        y = d[near] / np.asarray(self.epidural_radii)
        out[near] = np.einsum("ij,ij->i", y, y) < 1.0
        return out

    def contains(self, pts: NDArray[np.float64]) -> NDArray[np.bool_]:
        """True where the LPS point (body/baseline coordinates) is tumour."""
        return self.contains_main(pts) | self.contains_epidural(pts)

    def bounding_box(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        ext = float(np.max(self.radii)) * (1.0 + sum(abs(lb[3]) for lb in self.lobes)) + 1.0
        lo = np.asarray(self.centre) - ext
        hi = np.asarray(self.centre) + ext
        if self.epidural_centre is not None and self.epidural_radii is not None:
            lo = np.minimum(
                lo, np.asarray(self.epidural_centre) - np.asarray(self.epidural_radii) - 1
            )
            hi = np.maximum(
                hi, np.asarray(self.epidural_centre) + np.asarray(self.epidural_radii) + 1
            )
        return lo, hi

    def scaled(self, volume_factor: float) -> TumourShape:
        """Same shape with the main part's volume multiplied by ``volume_factor``."""
        s = volume_factor ** (1.0 / 3.0)
        return TumourShape(
            self.centre,
            self.rotation,
            tuple(r * s for r in self.radii),
            self.lobes,
            self.epidural_centre,
            self.epidural_radii,
        )

    def with_epidural(
        self, centre: tuple[float, float, float], radii: tuple[float, float, float]
    ) -> TumourShape:
        return TumourShape(self.centre, self.rotation, self.radii, self.lobes, centre, radii)

    def to_dict(self) -> dict[str, object]:
        return {
            "model": "|R^T(x-c)/radii| < 1 + sum(w * P_deg(u . v)) (Legendre P2/P3), "
            "union with the epidural ellipsoid; LPS mm in baseline coordinates",
            "centre": list(self.centre),
            "rotation": list(self.rotation),
            "radii": list(self.radii),
            "lobes": [list(lb) for lb in self.lobes],
            "epidural_centre": list(self.epidural_centre) if self.epidural_centre else None,
            "epidural_radii": list(self.epidural_radii) if self.epidural_radii else None,
        }


def random_rotation(rng: np.random.Generator, max_deg: float) -> NDArray[np.float64]:
    """Rotation matrix about a random axis by a random angle in [-max_deg, max_deg]."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_deg, max_deg))
    return axis_angle_matrix(axis, angle)


def axis_angle_matrix(axis: NDArray[np.float64], angle_rad: float) -> NDArray[np.float64]:
    """Rodrigues' rotation matrix."""
    x, y, z = axis / np.linalg.norm(axis)
    k = np.array([[0, -z, y], [z, 0, -x], [-y, x, 0]])
    rotation: NDArray[np.float64] = (
        np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * (k @ k)
    )
    return rotation


def make_tumour(
    rng: np.random.Generator, vertebra_centre: NDArray[np.float64], target_volume_ml: float
) -> TumourShape:
    """Random irregular tumour of about ``target_volume_ml`` in the treated vertebral body."""
    centre = vertebra_centre + np.array(
        [rng.uniform(-4, 4), rng.uniform(-1, 3), rng.uniform(-1, 1)]
    )
    lobes = []
    for deg in (2, 2, 3, 3):
        v = rng.normal(size=3)
        v /= np.linalg.norm(v)
        lobes.append(
            (
                float(v[0]),
                float(v[1]),
                float(v[2]),
                float(rng.uniform(0.06, 0.12) * rng.choice([-1, 1])),
                deg,
            )
        )
    rot = random_rotation(rng, 15.0)
    base = np.array([1.35, 1.05, 0.85])  # LR, AP, SI proportions
    shape = TumourShape(
        cast("tuple[float, float, float]", tuple(float(v) for v in centre)),
        tuple(float(v) for v in rot.ravel()),
        cast("tuple[float, float, float]", tuple(float(v) for v in base)),
        tuple(lobes),
    )
    unit_volume = continuous_volume_ml(shape)
    return shape.scaled(target_volume_ml / unit_volume)


def main_volume_ml(shape: TumourShape, *, n_directions: int = 200_000) -> float:
    """Volume (mL) of the main (intraosseous) part: radii product · (1/3)∮ρ(u)³ dΩ, evaluated
    with a Fibonacci-sphere quadrature (relative error < 1e-5)."""
    i = np.arange(n_directions) + 0.5
    z = 1.0 - 2.0 * i / n_directions
    phi = np.pi * (1 + 5**0.5) * i
    r = np.sqrt(1 - z**2)
    unit = np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)
    mean_rho3 = float(np.mean(shape.radial(unit) ** 3))
    return float(np.prod(shape.radii)) * 4.0 * np.pi / 3.0 * mean_rho3 / 1000.0


def epidural_volume_ml(shape: TumourShape, *, step_mm: float = 0.15) -> float:
    """Volume (mL) of the epidural component outside the main part (midpoint rule on a
    ``step_mm`` grid over the epidural ellipsoid's box; relative error < 0.5 %)."""
    if shape.epidural_centre is None or shape.epidural_radii is None:
        return 0.0
    c, r = np.asarray(shape.epidural_centre), np.asarray(shape.epidural_radii)
    return _lattice_volume_ml(
        c - r,
        c + r,
        step_mm,
        lambda pts: shape.contains_epidural(pts) & ~shape.contains_main(pts),
    )


def _lattice_volume_ml(
    lo: NDArray[np.float64],
    hi: NDArray[np.float64],
    step_mm: float,
    inside: Callable[[NDArray[np.float64]], NDArray[np.bool_]],
) -> float:
    """Volume (mL) of the points where ``inside`` holds in the box ``lo``-``hi`` (LPS mm): the
    midpoint rule on a ``step_mm`` lattice, one axial plane at a time."""
    axes = [np.arange(lo[d] + step_mm / 2, hi[d], step_mm) for d in range(3)]
    total = 0
    yy, xx = np.meshgrid(axes[1], axes[0], indexing="ij")
    for z in axes[2]:
        pts = np.stack([xx, yy, np.full_like(xx, z)], axis=-1)
        total += int(inside(pts).sum())
    return total * step_mm**3 / 1000.0


def tumour_diameters_mm(
    shape: TumourShape, to_study: NDArray[np.floating[Any]] | None = None, *, step_mm: float = 0.4
) -> dict[str, float]:
    """Maximum 3-D diameter, maximum axial diameter and craniocaudal extent (mm) of the shape.

    Measured on the continuous shape (sampled on a ``step_mm`` lattice, accurate to about one
    step) in the study's patient coordinates: ``to_study`` (4x4) maps baseline to study
    coordinates; axial means perpendicular to that study's S axis.
    """
    from scipy.spatial import ConvexHull, QhullError, distance

    lo, hi = shape.bounding_box()
    axes = [np.arange(lo[d], hi[d] + step_mm, step_mm) for d in range(3)]
    zz, yy, xx = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    pts = np.stack([xx, yy, zz], axis=-1)
    inside = shape.contains(pts)
    boundary = inside & ~ndimage.binary_erosion(inside)
    surface = pts[boundary]
    if to_study is not None:
        surface = surface @ to_study[:3, :3].T + to_study[:3, 3]

    def hull_diameter(p: NDArray[np.float64]) -> float:
        if len(p) < 2:
            return 0.0
        try:
            p = p[ConvexHull(p).vertices]
        except QhullError:  # degenerate (collinear) section: every point is a candidate
            pass
        return float(distance.pdist(p).max())

    axial = 0.0
    z = surface[:, 2]
    for z0 in np.arange(z.min(), z.max() + step_mm, step_mm):
        section = surface[np.abs(z - z0) <= step_mm / 2, :2]
        axial = max(axial, hull_diameter(section))
    return {
        "max_3d_diameter_mm": hull_diameter(surface),
        "max_axial_diameter_mm": axial,
        "max_craniocaudal_extent_mm": float(z.max() - z.min()),
        "accuracy_mm": step_mm,
    }


def in_canal(
    pts: NDArray[np.float64], vertebra_centre: tuple[float, float, float] | NDArray[np.float64]
) -> NDArray[np.bool_]:
    """True where the LPS point lies in the spinal canal of the vertebra at ``vertebra_centre``."""
    local = pts - np.asarray(vertebra_centre)
    x, yc = local[..., 0], local[..., 1] - CANAL_CENTRE_Y_MM
    inside: NDArray[np.bool_] = (x / CANAL_SEMI_AXES_MM[0]) ** 2 + (
        yc / CANAL_SEMI_AXES_MM[1]
    ) ** 2 < 1.0
    return inside


def drawn_tumour(
    shape: TumourShape,
    vertebra_centre: tuple[float, float, float] | NDArray[np.float64],
    pts: NDArray[np.float64],
) -> NDArray[np.bool_]:
    """True where the LPS point is tumour as the phantom draws it: the main (intraosseous) part
    is held back by the posterior wall and the dura, so only the epidural component lies in the
    canal and the truth's epidural volume is all the tumour there is. The images, the true mask
    and the RT Structure Set's GTV all use it."""
    inside: NDArray[np.bool_] = (
        shape.contains_main(pts) & ~in_canal(pts, vertebra_centre)
    ) | shape.contains_epidural(pts)
    return inside


def continuous_volume_ml(shape: TumourShape) -> float:
    """Tumour volume (mL) of the continuous shape: main part plus epidural component.

    The main part as drawn: where a large lesion reaches past the posterior wall, the labels
    (:meth:`Anatomy.labels`) keep that part out of the canal; :meth:`Anatomy.tumour_volume_ml`
    is the volume without it.
    """
    return main_volume_ml(shape) + epidural_volume_ml(shape)


@dataclass(frozen=True)
class Anatomy:
    """The whole body: vertebral column around ``vertebra_centre`` (LPS mm) and one tumour."""

    vertebra_centre: tuple[float, float, float]
    tumour: TumourShape
    tumour_params: dict[str, float]
    texture_seed: int
    level_names: tuple[str, ...]  # names of levels -2..+2 around the treated one
    texture_box_mm: float = 80.0
    texture_step_mm: float = 2.0
    _textures: dict[str, NDArray[np.float64]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def texture_fields(self) -> dict[str, NDArray[np.float64]]:
        if not self._textures:
            rng = np.random.default_rng(self.texture_seed)
            n = int(self.texture_box_mm / self.texture_step_mm) + 1
            for name in TEXTURE_SD:
                f = ndimage.gaussian_filter(rng.normal(size=(n, n, n)), sigma=2.0, mode="wrap")
                f = np.clip(f / f.std(), -2.5, 2.5)
                self._textures[name] = f
        return self._textures

    def in_canal(self, pts: NDArray[np.float64]) -> NDArray[np.bool_]:
        """True where the LPS point (baseline/body coordinates) lies in the spinal canal."""
        return in_canal(pts, self.vertebra_centre)

    def tumour_contains(self, pts: NDArray[np.float64]) -> NDArray[np.bool_]:
        """True where the LPS point (baseline/body coordinates) is drawn as tumour."""
        return drawn_tumour(self.tumour, self.vertebra_centre, pts)

    def tumour_volume_ml(self, *, step_mm: float = 0.2) -> float:
        """True tumour volume (mL): the continuous shape's (:func:`continuous_volume_ml`) less the
        main part's reach into the canal, which :meth:`labels` keeps out (midpoint rule on a
        ``step_mm`` lattice over the canal's part of the tumour's box)."""
        volume = continuous_volume_ml(self.tumour)
        lo, hi = self.tumour.bounding_box()
        centre = np.asarray(self.vertebra_centre)
        canal_lo = centre + np.array(
            [-CANAL_SEMI_AXES_MM[0], CANAL_CENTRE_Y_MM - CANAL_SEMI_AXES_MM[1], -np.inf]
        )
        canal_hi = centre + np.array(
            [CANAL_SEMI_AXES_MM[0], CANAL_CENTRE_Y_MM + CANAL_SEMI_AXES_MM[1], np.inf]
        )
        lo, hi = np.maximum(lo, canal_lo), np.minimum(hi, canal_hi)
        if np.any(hi <= lo):
            return volume
        return volume - _lattice_volume_ml(
            lo,
            hi,
            step_mm,
            lambda pts: (
                self.tumour.contains_main(pts)
                & ~self.tumour.contains_epidural(pts)
                & self.in_canal(pts)
            ),
        )

    def labels(self, pts: NDArray[np.float64]) -> NDArray[np.int16]:
        """Tissue label at each LPS point (baseline/body coordinates)."""
        local = pts - np.asarray(self.vertebra_centre)
        x, y, z = local[..., 0], local[..., 1], local[..., 2]
        lab = np.zeros(pts.shape[:-1], dtype=np.int16)
        torso = (x / 170.0) ** 2 + ((y + 40.0) / 125.0) ** 2 < 1.0
        inner = (x / 150.0) ** 2 + ((y + 40.0) / 105.0) ** 2 < 1.0
        lab[torso] = LABEL["fat"]
        lab[inner] = LABEL["soft_tissue"]
        # paravertebral fat pad and paraspinal muscles
        lab[inner & ((x / 80.0) ** 2 + ((y - 55.0) / 48.0) ** 2 < 1.0)] = LABEL["fat"]
        for sx in (-1, 1):
            lab[((x - sx * 32.0) / 26.0) ** 2 + ((y - 58.0) / 24.0) ** 2 < 1.0] = LABEL["muscle"]
        for sx in (-1, 1):
            lab[((x - sx * 45.0) / 14.0) ** 2 + ((y + 5.0) / 18.0) ** 2 < 1.0] = LABEL[
                "muscle"
            ]  # psoas
        lab[(x - 22.0) ** 2 + (y + 32.0) ** 2 < 11.0**2] = LABEL["blood"]  # aorta, left anterior
        # vertebral column: bodies and discs along z
        zl = np.mod(z + LEVEL_PITCH_MM / 2, LEVEL_PITCH_MM) - LEVEL_PITCH_MM / 2  # level-local z
        ell = (x / BODY_SEMI_AXES_MM[0]) ** 2 + (y / BODY_SEMI_AXES_MM[1]) ** 2
        in_col = ell < 1.0
        is_body = np.abs(zl) < BODY_HALF_HEIGHT_MM
        lab[in_col & ~is_body] = LABEL["disc"]
        lab[in_col & is_body] = LABEL["cortical_bone"]
        inner_ell = (x / (BODY_SEMI_AXES_MM[0] - CORTEX_MM)) ** 2 + (
            y / (BODY_SEMI_AXES_MM[1] - CORTEX_MM)
        ) ** 2
        lab[(inner_ell < 1.0) & (np.abs(zl) < BODY_HALF_HEIGHT_MM - CORTEX_MM)] = LABEL["marrow"]
        # posterior elements (pedicles, laminae, spinous process) at body heights
        yc = y - CANAL_CENTRE_Y_MM
        ring = (x / 20.0) ** 2 + (yc / 17.0) ** 2 < 1.0
        spinous = (np.abs(x) < 4.0) & (yc > 10.0) & (yc < 45.0)
        post = (
            (ring | spinous)
            & (np.abs(zl) < BODY_HALF_HEIGHT_MM - 2.0)
            & (y > BODY_SEMI_AXES_MM[1] - 3.0)
        )
        lab[post] = LABEL["cortical_bone"]
        post_in = (
            (
                ((x / 17.5) ** 2 + (yc / 14.5) ** 2 < 1.0)
                | ((np.abs(x) < 2.5) & (yc > 10.0) & (yc < 43.0))
            )
            & (np.abs(zl) < BODY_HALF_HEIGHT_MM - 3.5)
            & (y > BODY_SEMI_AXES_MM[1] - 1.0)
        )
        lab[post & post_in] = LABEL["marrow"]
        # canal: CSF with the cord
        canal = self.in_canal(pts)
        lab[canal] = LABEL["csf"]
        lab[(x / CORD_SEMI_AXES_MM[0]) ** 2 + (yc / CORD_SEMI_AXES_MM[1]) ** 2 < 1.0] = LABEL[
            "cord"
        ]
        lab[self.tumour_contains(pts)] = LABEL["tumour"]
        return lab

    def parameters(
        self, pts: NDArray[np.float64], labels: NDArray[np.int16] | None = None
    ) -> dict[str, NDArray[np.float64]]:
        """Per-point tissue parameters (see :data:`TISSUE_PARAMS` for names and units)."""
        if labels is None:
            labels = self.labels(pts)
        table = {
            name: np.array([TISSUE_PARAMS[t][name] for t in TISSUES], dtype=np.float64)
            for name in PARAM_NAMES
        }
        for name, value in self.tumour_params.items():
            table[name][LABEL["tumour"]] = value
        params = {name: table[name][labels] for name in PARAM_NAMES}
        tum = labels == LABEL["tumour"]
        if tum.any():
            fields = self.texture_fields()
            coords = (
                (pts[tum] - np.asarray(self.tumour.centre)) + self.texture_box_mm / 2
            ) / self.texture_step_mm
            for name, sd in TEXTURE_SD.items():
                mod = ndimage.map_coordinates(fields[name], coords.T, order=1, mode="nearest")
                params[name][tum] = params[name][tum] * (1.0 + sd * mod)
        return params
