"""Build one synthetic CyberKnife patient in memory: images, timing, geometry and ground truth."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray

from processing.phantom import protocol as proto
from processing.phantom.anatomy import (
    BODY_SEMI_AXES_MM,
    LABEL,
    TISSUE_PARAMS,
    VERTEBRAL_NAMES,
    Anatomy,
    Grid,
    TumourShape,
    axis_angle_matrix,
    centred_grid,
    drawn_tumour,
    epidural_volume_ml,
    main_volume_ml,
    make_tumour,
    tumour_diameters_mm,
)
from processing.phantom.signals import (
    add_rician_noise,
    diffusion_attenuation,
    extended_tofts,
    kurtosis_ols,
    loglinear_adc,
    parker_aif_blood,
    spgr_signal,
)
from processing.phantom.trajectory import Trajectory
from processing.results import ResponseCategory

logger = logging.getLogger(__name__)

SCENARIOS = ("responder", "progression", "pseudoprogression", "stable")
VENDORS = ("standard", "siemens", "ge", "philips", "enhanced")

#: Per scenario, per follow-up: multipliers of baseline tumour volume, mono-exponential ADC
#: (b = 50-1000; the diffusivity D is scaled so that this ADC changes by exactly that factor),
#: Ktrans, ve, vp; whether an epidural component is present; the expected response call. Later
#: follow-ups than listed repeat the last entry (the tumour stays at its last state).
SCENARIO_CHANGES: dict[str, list[dict[str, Any]]] = {
    "responder": [
        dict(
            volume=0.70,
            adc=1.35,
            ktrans=0.40,
            ve=1.0,
            vp=0.40,
            epidural=False,
            category=ResponseCategory.LOCAL_CONTROL,
        ),
        dict(
            volume=0.60,
            adc=1.40,
            ktrans=0.35,
            ve=1.0,
            vp=0.35,
            epidural=False,
            category=ResponseCategory.LOCAL_CONTROL,
        ),
    ],
    "progression": [
        dict(
            volume=1.40,
            adc=0.95,
            ktrans=1.30,
            ve=1.0,
            vp=1.20,
            epidural=True,
            category=ResponseCategory.LOCAL_PROGRESSION,
        ),
        dict(
            volume=1.90,
            adc=0.92,
            ktrans=1.40,
            ve=1.0,
            vp=1.30,
            epidural=True,
            category=ResponseCategory.LOCAL_PROGRESSION,
        ),
        dict(
            volume=2.05,
            adc=0.90,
            ktrans=1.45,
            ve=1.0,
            vp=1.35,
            epidural=True,
            category=ResponseCategory.LOCAL_PROGRESSION,
        ),
        dict(
            volume=2.15,
            adc=0.90,
            ktrans=1.50,
            ve=1.0,
            vp=1.40,
            epidural=True,
            category=ResponseCategory.LOCAL_PROGRESSION,
        ),
    ],
    "pseudoprogression": [
        # +30 %: on the small phantom's voxel grid a nominal +20 % came out as +10 to +27 %, and
        # below the size-dependent threshold (14.7 % at 7.5 mL) it is not a size increase at all
        dict(
            volume=1.30,
            adc=1.20,
            ktrans=0.70,
            ve=1.0,
            vp=0.40,
            epidural=False,
            category=ResponseCategory.INDETERMINATE,
        ),
        dict(
            volume=0.95,
            adc=1.30,
            ktrans=0.50,
            ve=1.0,
            vp=0.35,
            epidural=False,
            category=ResponseCategory.LOCAL_CONTROL,
        ),
        dict(
            volume=0.90,
            adc=1.30,
            ktrans=0.45,
            ve=1.0,
            vp=0.35,
            epidural=False,
            category=ResponseCategory.LOCAL_CONTROL,
        ),
    ],
    "stable": [
        dict(
            volume=1.02,
            adc=1.03,
            ktrans=0.95,
            ve=1.0,
            vp=0.95,
            epidural=False,
            category=ResponseCategory.LOCAL_CONTROL,
        ),
        dict(
            volume=1.00,
            adc=1.04,
            ktrans=0.95,
            ve=1.0,
            vp=0.95,
            epidural=False,
            category=ResponseCategory.LOCAL_CONTROL,
        ),
    ],
}
#: days after treatment of follow-up n (1-based); pseudoprogression's first follow-up is at
#: ~12 weeks
FOLLOWUP_DAYS = (70, 182, 273, 365)
#: series numbers of a VFA written one series per flip angle: 61, 62, ...
VFA_SERIES_NUMBER = 60
REGIMENS = ((24.0, 1), (27.0, 3), (24.0, 2), (30.0, 5))
MACHINES = ("CK1", "CyberKnife M6")

#: counts that the nominal tumour signal is scaled to in every series (uint16 storage)
REFERENCE_COUNTS = 1000.0


def phantom_uid(*parts: object) -> str:
    """Deterministic UID ``2.25.<uuid5>`` from the phantom identity and an object name."""
    name = "/".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'spine-node-phantom:' + name).int}"


@dataclass
class SeriesData:
    """One generated MR series: pixels (volume, slice, row, column) and per-volume metadata."""

    role: str
    protocol: proto.SeriesProtocol
    grid: Grid
    series_uid: str
    folder: str
    pixels: NDArray[np.uint16]
    volumes: list[dict[str, Any]]  # per volume: b, gradient, flip_deg, time_s, temporal_position
    start: dt.datetime
    sop_uids: list[list[str]] = field(default_factory=list)  # [volume][slice]
    #: scanner-derived series: "TRACEW" or "ADC" (Image Type value 4), None for an acquisition
    derived: str | None = None


@dataclass
class StudyData:
    """One generated MR study: its identity, date, series, and its part of the ground truth."""

    key: str  # "baseline", "followup1", ...
    study_uid: str
    frame_of_reference_uid: str
    date: dt.date
    start: dt.datetime
    series: list[SeriesData]
    truth: dict[str, Any]


@dataclass
class Phantom:
    """A generated patient: studies with pixel data, RT course, and the ground-truth dict."""

    seed: int
    scenario: str
    vendor: str
    size: str
    patient: dict[str, str]
    studies: list[StudyData]
    anatomy: Anatomy
    ground_truth: dict[str, Any]
    rt: dict[str, Any]
    #: declared contrast agent, field strength and true r1 (:func:`protocol.contrast_truth`)
    contrast: dict[str, Any] = field(
        default_factory=lambda: proto.contrast_truth("gadoterate", proto.FIELD_STRENGTH_T)
    )
    #: VFA written as one series per flip angle
    vfa_series: bool = False
    #: DWI b-value scheme (:data:`protocol.DIFFUSION_SCHEMES`)
    diffusion_scheme: str = "standard"
    #: a Grayscale Softcopy Presentation State and a Philips private object in every DWI series
    non_image_objects: bool = False

    def _extras(self, study: StudyData) -> Iterator[tuple[str, Any]]:
        from processing.phantom import mr

        if self.non_image_objects:
            dwi = next(s for s in study.series if s.role == "dwi" and s.derived is None)
            yield from mr.non_image_objects(self, study, dwi)

    def iter_datasets(self) -> Iterator[tuple[str, Any]]:
        """Yield ``(relative path, pydicom Dataset)`` for every object, built lazily."""
        from processing.phantom import mr, rt

        for study in self.studies:
            for series in study.series:
                for relpath, ds in mr.series_datasets(self, study, series):
                    yield relpath, ds
            yield from self._extras(study)
        yield from rt.rt_datasets(self)

    def iter_files(self) -> Iterator[tuple[str, bytes]]:
        """Yield ``(relative path, DICOM Part 10 bytes)`` for every object.

        These are the files the command writes.
        """
        from processing.phantom import mr, rt

        for study in self.studies:
            for series in study.series:
                yield from mr.series_files(self, study, series)
            for relpath, ds in self._extras(study):
                yield relpath, mr.part10_bytes(ds)
        for relpath, ds in rt.rt_datasets(self):
            yield relpath, mr.part10_bytes(ds)


def true_tumour_mask(
    ground_truth: dict[str, Any], study: str, geometry: dict[str, Any]
) -> NDArray[np.bool_]:
    """The exact tumour mask of ``study`` on any grid (voxel-centre rule), from ground_truth.json.

    Parameters
    ----------
    ground_truth : dict
        The parsed ``ground_truth.json``.
    study : str
        ``"baseline"``, ``"followup1"``, ...
    geometry : dict
        ``origin``, ``spacing``, ``direction`` (row-major 3x3) and ``size`` of the grid, in that
        study's patient coordinates (LPS, mm), e.g. ``ground_truth["studies"][study]["series"]
        [role]["geometry"]``.

    Returns
    -------
    Boolean array (k, j, i), the numpy order of a SimpleITK image of that grid.
    """
    st = ground_truth["studies"][study]
    shape = st["tumour"]["shape"]
    tumour = TumourShape(
        tuple(shape["centre"]),
        tuple(shape["rotation"]),
        tuple(shape["radii"]),
        tuple(tuple(lb) for lb in shape["lobes"]),
        tuple(shape["epidural_centre"]) if shape["epidural_centre"] else None,
        tuple(shape["epidural_radii"]) if shape["epidural_radii"] else None,
    )
    grid = Grid(
        tuple(geometry["size"]),
        tuple(geometry["spacing"]),
        tuple(geometry["origin"]),
        tuple(geometry["direction"]),
    )
    pts = grid.points()
    if st.get("rigid_transform"):
        m = np.asarray(st["rigid_transform"]["followup_to_baseline"])
        pts = pts @ m[:3, :3].T + m[:3, 3]
    return drawn_tumour(tumour, ground_truth["vertebra_centre_mm"], pts)


def _rigid(rng: np.random.Generator, centre: NDArray[np.float64]) -> dict[str, Any]:
    """A random rigid displacement of a few mm and degrees about ``centre`` (LPS)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle_deg = float(rng.uniform(2.0, 4.0))
    rot = axis_angle_matrix(axis, np.deg2rad(angle_deg))
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    translation = direction * rng.uniform(3.0, 6.0)
    # baseline -> follow-up: x_fu = R (x_b - c) + c + t
    m_b2f = np.eye(4)
    m_b2f[:3, :3] = rot
    m_b2f[:3, 3] = centre + translation - rot @ centre
    m_f2b = np.linalg.inv(m_b2f)
    import SimpleITK as sitk

    euler = sitk.Euler3DTransform()
    euler.SetCenter([float(v) for v in centre])
    euler.SetMatrix([float(v) for v in rot.ravel()])
    euler.SetTranslation([float(v) for v in translation])
    return {
        "description": (
            "followup_to_baseline maps a point in follow-up patient coordinates (LPS mm) to "
            "the same anatomical point in baseline coordinates; baseline_to_followup is its "
            "inverse, i.e. the SimpleITK transform a registration with fixed = baseline and "
            "moving = follow-up returns (sitk_euler3d_baseline_to_followup)."
        ),
        "followup_to_baseline": m_f2b.tolist(),
        "baseline_to_followup": m_b2f.tolist(),
        "rotation_axis": axis.tolist(),
        "rotation_deg": angle_deg,
        "rotation_centre_mm": centre.tolist(),
        "translation_mm": translation.tolist(),
        "translation_norm_mm": float(np.linalg.norm(translation)),
        "sitk_euler3d_baseline_to_followup": {
            "center": list(euler.GetCenter()),
            "angles_rad_xyz": [euler.GetAngleX(), euler.GetAngleY(), euler.GetAngleZ()],
            "translation": list(euler.GetTranslation()),
        },
    }


def _tumour_means(
    params: dict[str, NDArray[np.float64]], mask: NDArray[np.bool_]
) -> dict[str, float]:
    out = {
        "D": params["d"],
        "K": params["k"],
        "f": params["f"],
        "Dstar": params["dstar"],
        "T1_ms": params["t1"],
        "T2_ms": params["t2"],
        "PD": params["pd"],
        "Ktrans": params["ktrans"],
        "ve": params["ve"],
        "vp": params["vp"],
    }
    means = {k: float(np.mean(v[mask])) for k, v in out.items()}
    kep = np.divide(
        params["ktrans"], params["ve"], out=np.zeros_like(params["ve"]), where=params["ve"] > 0
    )
    means["kep"] = float(np.mean(kep[mask]))
    return means


MEAN_UNITS = {
    "D": "mm2/s",
    "K": "1",
    "f": "1",
    "Dstar": "mm2/s",
    "T1_ms": "ms",
    "T2_ms": "ms",
    "PD": "a.u.",
    "Ktrans": "/min",
    "ve": "1",
    "vp": "1",
    "kep": "/min",
}


def _sample(
    anatomy: Anatomy, grid: Grid, to_body: NDArray[np.float64] | None
) -> tuple[NDArray[np.int16], dict[str, NDArray[np.float64]]]:
    pts = grid.points()
    if to_body is not None:
        pts = pts @ to_body[:3, :3].T + to_body[:3, 3]
    labels = anatomy.labels(pts)
    return labels, anatomy.parameters(pts, labels)


def _scale_for(reference_signal: float) -> float:
    return REFERENCE_COUNTS / reference_signal


def _to_uint16(x: NDArray[np.float64]) -> NDArray[np.uint16]:
    return np.clip(np.rint(x), 0, 65535).astype(np.uint16)


def _nominal_tumour(anatomy: Anatomy) -> dict[str, float]:
    nominal = dict(TISSUE_PARAMS["tumour"])
    nominal.update(anatomy.tumour_params)
    return nominal


def generate_patient(
    *,
    seed: int = 0,
    scenario: str = "responder",
    vendor: str = "standard",
    size: str = "full",
    followups: int = 1,
    sagittal: bool = False,
    contrast_agent: str = "gadoterate",
    field_strength: float = proto.FIELD_STRENGTH_T,
    vfa_series: bool = False,
    diffusion_scheme: str = "standard",
    scanner_maps: bool = False,
    non_image_objects: bool = False,
    trajectory: Trajectory | None = None,
) -> Phantom:
    """Generate a synthetic CyberKnife spine patient (baseline MR, RT course, follow-up MR).

    Parameters
    ----------
    seed : int
        Everything (anatomy, tumour, dates, noise, UIDs) is a deterministic function of
        (seed, scenario, vendor, size).
    scenario : {'responder', 'progression', 'pseudoprogression', 'stable'}
    vendor : {'standard', 'siemens', 'ge', 'philips', 'enhanced'}
    size : {'full', 'small'}
    followups : int
        Number of follow-up studies (1 = ~10 weeks; then ~6, ~9, ~12 months).
    sagittal : bool
        Add a sagittal T2-weighted series (key ``t2w_sag``, role ``t2w``) to every MR study.
    contrast_agent : str
        Declared agent (a key of :data:`protocol.CONTRAST_AGENTS`, default gadoterate); the DCE
        signal is simulated with its true r1 at `field_strength` (Rohrer 2005 plasma table) and
        the agent and r1 are recorded in ``ground_truth.json`` (``contrast``).
    field_strength : {1.5, 3.0}
        Magnetic Field Strength (T) of every MR series.
    vfa_series : bool
        Write the VFA T1 acquisition as one series per flip angle (series numbers 61, 62...,
        same grid, TR and sequence) instead of one multi-flip series.
    diffusion_scheme : {'standard', 'two-point'}
        DWI b-values: 'standard' (b 0-2000, 8 shells) or 'two-point' (b 0 + b 1500 x 3
        directions, as Canon/Siemens body protocols); ground truth ``adc_by_bvalues`` then also
        has "b0,1500".
    scanner_maps : bool
        Add to every MR study the scanner's derived diffusion series: a TRACEW series (series 51:
        the b 0 image and the geometric mean over directions of the noisy high-b images) and an
        ADC series (series 52: unsigned integers in 1e-6 mm²/s, OLS log-linear fit of the noiseless
        signal over :data:`protocol.SCANNER_ADC_BVALUES`); truth in ``series.dwi_trace`` and
        ``series.adc_scanner`` and the tumour's ``scanner_adc``.
    non_image_objects : bool
        Write beside every DWI series the non-image objects of a CD export
        (:func:`mr.non_image_objects`: a presentation state and a Philips private object).
    trajectory : Trajectory, optional
        A randomised course (:func:`processing.phantom.trajectory.random_trajectory`): its
        baseline volume, follow-up days and per-follow-up changes replace the scenario's
        (``scenario`` must be its course; ``followups`` is ignored). Each follow-up's truth then
        has ``true_state`` instead of ``expected_response``.

    Returns
    -------
    Phantom
        In-memory patient; :meth:`Phantom.iter_datasets` builds the DICOM objects and
        ``Phantom.ground_truth`` is the JSON-serialisable truth.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {SCENARIOS}")
    if vendor not in VENDORS:
        raise ValueError(f"unknown vendor {vendor!r}; choose one of {VENDORS}")
    if trajectory is not None:
        if scenario != trajectory.course:
            raise ValueError(f"scenario {scenario!r} is not the trajectory's {trajectory.course!r}")
        followups = len(trajectory.followups)
    elif followups < 0 or followups > len(FOLLOWUP_DAYS):
        raise ValueError(f"followups must be between 0 and {len(FOLLOWUP_DAYS)}, got {followups}")
    protocol = proto.protocol_for(size, sagittal=sagittal, diffusion_scheme=diffusion_scheme)
    contrast = proto.contrast_truth(contrast_agent, field_strength)
    ident: tuple[object, ...] = (seed, scenario, vendor, size)
    if (contrast_agent, float(field_strength), vfa_series) != ("gadoterate", 3.0, False):
        # another declared acquisition is another patient (distinct UIDs)
        ident = ident + (
            contrast_agent,
            float(field_strength),
            "vfa-series" if vfa_series else "vfa",
        )
    if trajectory is not None:
        ident = ident + ("trajectory",)
    if (diffusion_scheme, scanner_maps, non_image_objects) != ("standard", False, False):
        ident = ident + (
            diffusion_scheme,
            "scanner-maps" if scanner_maps else "",
            "non-image-objects" if non_image_objects else "",
        )
    rng = np.random.default_rng([seed, SCENARIOS.index(scenario)])
    # anatomy: treated vertebra centre in baseline scanner coordinates
    c0 = np.round(np.array([rng.uniform(-3, 3), rng.uniform(10, 40), rng.uniform(-40, 40)]), 2)
    level_index = int(rng.integers(2, len(VERTEBRAL_NAMES) - 2))
    level_names = VERTEBRAL_NAMES[level_index - 2 : level_index + 3]
    v0 = float(rng.uniform(5.0, 9.0))
    if trajectory is not None:
        v0 = trajectory.baseline_volume_ml
    tumour0 = make_tumour(rng, c0, v0)
    jitter = {k: float(rng.uniform(0.92, 1.08)) for k in ("d", "k", "ktrans", "ve", "vp", "t1")}
    base_params = {
        k: TISSUE_PARAMS["tumour"][k] * jitter.get(k, 1.0)
        for k in ("d", "k", "ktrans", "ve", "vp", "t1")
    }
    texture_seed = int(rng.integers(0, 2**31))
    # dates
    base_date = dt.date(2024, 1, 8) + dt.timedelta(days=int(rng.integers(0, 540)))
    treat_delay = int(rng.integers(3, 15))
    treatment_date = base_date + dt.timedelta(days=treat_delay)
    dose_gy, fractions = REGIMENS[int(rng.integers(0, len(REGIMENS)))]
    machine = MACHINES[int(rng.integers(0, len(MACHINES)))]
    birth = dt.date(1945, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 30)))
    patient = {
        "PatientName": f"PHANTOM^{seed}",
        "PatientID": (
            f"PHID-{seed:05d}-{scenario[:4].upper()}-{vendor[:3].upper()}-{size[0].upper()}"
        ),
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": "F" if rng.random() < 0.5 else "M",
        "PatientWeight": f"{rng.uniform(55, 95):.0f}",
        "IssuerOfPatientID": "SPINE-NODE-PHANTOM",
    }
    anatomy0 = Anatomy(
        cast("tuple[float, float, float]", tuple(float(v) for v in c0)),
        tumour0,
        base_params,
        texture_seed,
        level_names,
    )
    studies: list[StudyData] = []
    noise_sigma: dict[str, float] = {}
    scales: dict[str, float] = {}
    visits: list[tuple[str, dt.date, dict[str, Any] | None]] = [("baseline", base_date, None)]
    changes = SCENARIO_CHANGES[scenario]
    for n in range(1, followups + 1):
        if trajectory is not None:
            state = trajectory.followups[n - 1]
            visits.append(
                (
                    f"followup{n}",
                    treatment_date + dt.timedelta(days=state.days),
                    {**state.change(), "true_state": state.state},
                )
            )
            continue
        days = FOLLOWUP_DAYS[n - 1]
        if n == 1 and scenario == "pseudoprogression":
            days = 84
        visits.append(
            (
                f"followup{n}",
                treatment_date + dt.timedelta(days=days),
                changes[min(n, len(changes)) - 1],
            )
        )
    transforms: dict[str, dict[str, Any]] = {}
    for key, date, change in visits:
        srng = np.random.default_rng(
            [seed, SCENARIOS.index(scenario), VENDORS.index(vendor), len(studies), 7]
        )
        if change is None:
            anatomy, to_body, rigid = anatomy0, None, None
            grid_centre = c0 + np.round(srng.uniform(-2, 2, 3), 1)
        else:
            shape = _changed_shape(tumour0, c0, v0, change)
            params = {k: base_params[k] * change.get(k, 1.0) for k in base_params}
            params["d"] = base_params["d"] * _d_multiplier_for_adc(base_params, change["adc"])
            anatomy = Anatomy(anatomy0.vertebra_centre, shape, params, texture_seed, level_names)
            rigid = _rigid(srng, c0)
            transforms[key] = rigid
            to_body = np.asarray(rigid["followup_to_baseline"])
            grid_centre = (
                np.asarray(rigid["baseline_to_followup"])[:3, :3] @ c0
                + np.asarray(rigid["baseline_to_followup"])[:3, 3]
            )
            grid_centre = grid_centre + np.round(srng.uniform(-3, 3, 3), 1)
        start = dt.datetime.combine(date, dt.time(8, 0)) + dt.timedelta(
            minutes=int(srng.integers(0, 540))
        )
        study = _make_study(
            ident,
            key,
            date,
            start,
            anatomy,
            to_body,
            grid_centre,
            protocol,
            srng,
            noise_sigma,
            scales,
            contrast=contrast,
            vfa_series=vfa_series,
            scanner_maps=scanner_maps,
        )
        study.truth["rigid_transform"] = rigid
        if change is not None:
            if "category" in change:
                study.truth["expected_response"] = change["category"].value
            else:
                study.truth["true_state"] = change["true_state"]
            study.truth["days_since_treatment"] = (date - treatment_date).days
            study.truth["scenario_multipliers"] = {
                k: v for k, v in change.items() if k not in ("category", "true_state")
            }
        else:
            study.truth["days_before_treatment"] = (treatment_date - date).days
        studies.append(study)
    course = {
        "machine": machine,
        "manufacturer": "Accuray Inc.",
        "model": "CyberKnife",
        "fractions": fractions,
        "total_dose_gy": dose_gy,
        "dose_per_fraction_gy": dose_gy / fractions,
        "prescription_isodose_percent": 80.0,
        "treatment_date": treatment_date.strftime("%Y%m%d"),
        "plan_date": (treatment_date - dt.timedelta(days=2)).strftime("%Y%m%d"),
        "review_date": (treatment_date - dt.timedelta(days=1)).strftime("%Y%m%d"),
        "treated_level": level_names[2],
        "bed10_gy": fractions * (dose_gy / fractions) * (1 + (dose_gy / fractions) / 10.0),
    }
    phantom = Phantom(
        seed,
        scenario,
        vendor,
        size,
        patient,
        studies,
        anatomy0,
        {},
        {"course": course},
        contrast=contrast,
        vfa_series=vfa_series,
        diffusion_scheme=diffusion_scheme,
        non_image_objects=non_image_objects,
    )
    from processing.phantom import rt

    rt_truth = rt.plan_rt(phantom, np.random.default_rng([seed, SCENARIOS.index(scenario), 99]))
    phantom.ground_truth = _ground_truth(phantom, protocol, rt_truth)
    logger.debug(
        "phantom seed %d (%s, %s, %s): %d studies, baseline study %s",
        seed,
        scenario,
        vendor,
        size,
        len(studies),
        studies[0].study_uid,
    )
    return phantom


def _d_multiplier_for_adc(base: dict[str, float], adc_factor: float) -> float:
    """Multiplier m of D such that the nominal tumour's ADC changes by adc_factor.

    The ADC is the one over b = 50-1000.
    """
    from scipy.optimize import brentq

    b = np.asarray(proto.ADC_SUBSETS["b50-1000"])
    f, ds = TISSUE_PARAMS["tumour"]["f"], TISSUE_PARAMS["tumour"]["dstar"]

    def adc(m: float) -> float:
        sig = diffusion_attenuation(
            b[:, None], np.array([base["d"] * m]), np.array([base["k"]]), f, ds
        )
        return float(loglinear_adc(b, sig)[0])

    target = adc(1.0) * adc_factor
    return float(brentq(lambda m: adc(m) - target, 0.3, 3.0, xtol=1e-10))


def _changed_shape(
    tumour0: TumourShape, c0: NDArray[np.float64], v0: float, change: dict[str, Any]
) -> TumourShape:
    target = v0 * change["volume"]
    shape = tumour0.scaled(change["volume"])
    if change.get("eccentric"):
        # growth towards the posterior elements (+y, the canal's side): the anterior boundary
        # stays where it was, the centre moves back by the growth of the AP semi-axis
        grown = (change["volume"] ** (1.0 / 3.0) - 1.0) * tumour0.radii[1]
        x, y, z = shape.centre
        shape = dataclasses.replace(shape, centre=(x, y + grown, z))
    if not change["epidural"]:
        return shape
    ec = (tumour0.centre[0], float(c0[1] + BODY_SEMI_AXES_MM[1] + 2.5), tumour0.centre[2])
    er = (8.0, 3.5, 11.0)
    factor = change["volume"]
    for _ in range(4):  # secant-free fixed point: rescale the main part until the union hits target
        shape = tumour0.scaled(factor).with_epidural(ec, er)
        vol = main_volume_ml(shape, n_directions=20_000) + epidural_volume_ml(shape, step_mm=0.25)
        factor *= (target / vol) ** 1.2 if vol > 0 else 1.0
    return tumour0.scaled(factor).with_epidural(ec, er)


def _make_study(
    ident: tuple[object, ...],
    key: str,
    date: dt.date,
    start: dt.datetime,
    anatomy: Anatomy,
    to_body: NDArray[np.float64] | None,
    grid_centre: NDArray[np.float64],
    protocol: proto.Protocol,
    rng: np.random.Generator,
    noise_sigma: dict[str, float],
    scales: dict[str, float],
    *,
    contrast: dict[str, Any] | None = None,
    vfa_series: bool = False,
    scanner_maps: bool = False,
) -> StudyData:
    contrast = contrast or proto.contrast_truth("gadoterate", proto.FIELD_STRENGTH_T)
    study_uid = phantom_uid(*ident, key, "study")
    for_uid = phantom_uid(*ident, key, "frame-of-reference")
    nominal = _nominal_tumour(anatomy) if key == "baseline" else None
    series_list: list[SeriesData] = []
    truth_series: dict[str, Any] = {}
    tumour_truth: dict[str, Any] = {"means_by_series": {}, "voxel_counts": {}}
    t = start
    sampled: dict[Grid, tuple[NDArray[np.int16], dict[str, NDArray[np.float64]]]] = {}
    for sp in protocol.series:
        grid = centred_grid(grid_centre, sp.size, sp.spacing, sp.direction)
        if grid not in sampled:  # T2w/T1w/STIR and VFA/DCE share their grids
            sampled[grid] = _sample(anatomy, grid, to_body)
        labels, params = sampled[grid]
        mask = labels == LABEL["tumour"]
        signal, volumes, extra = _synthesise(
            sp, params, labels, protocol, t, r1_per_mM_s=float(contrast["r1_per_mM_per_s"])
        )
        # per-series scaling and noise fixed at baseline (same protocol -> same receiver settings)
        if nominal is not None:
            ref = _reference_signal(sp, nominal, protocol)
            scales[sp.key] = _scale_for(ref)
            noise_sigma[sp.key] = REFERENCE_COUNTS / sp.snr
        if sp.role == "dwi" and scanner_maps:
            dwi_noiseless = (signal, mask)
        nrng = np.random.default_rng(rng.integers(0, 2**63))
        pixels = np.empty(signal.shape, dtype=np.uint16)
        for v in range(signal.shape[0]):  # volume by volume to bound memory
            pixels[v] = _to_uint16(
                add_rician_noise(signal[v] * scales[sp.key], noise_sigma[sp.key], nrng)
            )
        series_uid = phantom_uid(*ident, key, sp.key, "series")
        folder = f"series{sp.series_number:03d}"
        separate: list[dict[str, Any]] = []
        if sp.role == "vfa_t1" and vfa_series:
            # one series per flip angle: same grid, TR, sequence and scaling, own UID and number
            for v, meta in enumerate(volumes):
                spv = dataclasses.replace(
                    sp,
                    series_number=VFA_SERIES_NUMBER + v + 1,
                    description=f"{sp.description} FA{meta['flip_deg']:g}",
                    flip_deg=float(meta["flip_deg"]),
                )
                uid_v = phantom_uid(*ident, key, sp.key, "series", v)
                folder_v = f"series{spv.series_number:03d}"
                sdv = SeriesData(
                    sp.role,
                    spv,
                    grid,
                    uid_v,
                    folder_v,
                    pixels[v : v + 1],
                    [{**meta, "time_s": 0.0}],
                    t + dt.timedelta(seconds=float(meta["time_s"])),
                )
                sdv.sop_uids = [[phantom_uid(*ident, key, sp.key, v, k) for k in range(sp.size[2])]]
                series_list.append(sdv)
                separate.append(
                    {
                        "SeriesInstanceUID": uid_v,
                        "SeriesNumber": spv.series_number,
                        "folder": folder_v,
                        "flip_deg": float(meta["flip_deg"]),
                    }
                )
            series_uid, folder = separate[0]["SeriesInstanceUID"], separate[0]["folder"]
        else:
            sd = SeriesData(sp.role, sp, grid, series_uid, folder, pixels, volumes, t)
            sd.sop_uids = [
                [phantom_uid(*ident, key, sp.key, v, k) for k in range(sp.size[2])]
                for v in range(len(volumes))
            ]
            series_list.append(sd)
        duration = volumes[-1]["time_s"] + 10.0
        t = t + dt.timedelta(seconds=int(duration) + 60)
        tumour_truth["means_by_series"][sp.key] = _tumour_means(params, mask)
        tumour_truth["voxel_counts"][sp.key] = int(mask.sum())
        truth_series[sp.key] = {
            "SeriesInstanceUID": series_uid,
            "SeriesNumber": sp.series_number,
            "folder": folder,
            "role": sp.role,
            "geometry": grid.as_dict(),
            "number_of_files": len(volumes) * sp.size[2],
            "acquisition": _acquisition_truth(sp, protocol, volumes, contrast),
            "noise_sigma_counts": noise_sigma[sp.key],
            "counts_per_unit_signal": scales[sp.key],
            **extra,
        }
        if separate:
            truth_series[sp.key]["separate_series"] = separate
        if sp.role == "dwi":
            tumour_truth.update(_diffusion_truth(params, mask, protocol))
            if scanner_maps:
                dwi_series = series_list[-1]
        if sp.key == "t2w":
            tumour_truth["volume_ml_voxels_t2w"] = float(mask.sum() * np.prod(sp.spacing) / 1000.0)
    if scanner_maps:
        signal, mask = dwi_noiseless
        for sd, series_truth in _scanner_series(
            ident,
            key,
            dwi_series,
            signal,
            mask,
            protocol,
            scales["dwi"],
            noise_sigma["dwi"],
            tumour_truth,
        ):
            series_list.append(sd)
            truth_series[series_truth.pop("key")] = series_truth
    means = {}
    by = tumour_truth["means_by_series"]
    for q in ("D", "K", "f", "Dstar"):
        means[q] = by["dwi"][q]
    means["T1_ms"] = by["vfa_t1"]["T1_ms"]
    for q in ("T2_ms", "PD"):
        means[q] = by["t2w"][q]
    for q in ("Ktrans", "ve", "vp", "kep"):
        means[q] = by["dce"][q]
    tumour_truth["means"] = means
    tumour_truth["mean_units"] = MEAN_UNITS
    tumour_truth["means_note"] = (
        "means over the voxels whose centre is inside the tumour on the grid of "
        "the series that measures the quantity (D, K, f, Dstar: dwi; T1: vfa_t1; "
        "Ktrans, ve, vp, kep: dce; T2, PD: t2w); means_by_series gives every "
        "quantity on every grid"
    )
    tumour_truth["volume_ml_continuous"] = anatomy.tumour_volume_ml()
    tumour_truth["epidural_volume_ml"] = epidural_volume_ml(anatomy.tumour)
    tumour_truth.update(
        tumour_diameters_mm(anatomy.tumour, None if to_body is None else np.linalg.inv(to_body))
    )
    tumour_truth["shape"] = anatomy.tumour.to_dict()
    tumour_truth["nominal_parameters"] = _nominal_tumour(anatomy)
    truth = {
        "StudyInstanceUID": study_uid,
        "FrameOfReferenceUID": for_uid,
        "StudyDate": date.strftime("%Y%m%d"),
        "StudyTime": start.strftime("%H%M%S"),
        "series": truth_series,
        "tumour": tumour_truth,
    }
    return StudyData(key, study_uid, for_uid, date, start, series_list, truth)


#: series numbers of the scanner's derived diffusion series (``scanner_maps``)
TRACEW_SERIES_NUMBER = 51
ADC_SERIES_NUMBER = 52
#: the scanner's ADC is computed where the noiseless b = 0 signal is at least this many noise
#: sigmas (background and signal voids are 0, as scanners threshold them)
SCANNER_ADC_THRESHOLD_SIGMA = 5.0


def _geometric_mean(images: NDArray[Any]) -> NDArray[np.float64]:
    """Geometric mean over axis 0; 0 where any image is 0."""
    x = np.asarray(images, dtype=np.float64)
    out = np.zeros(x.shape[1:])
    ok = np.all(x > 0, axis=0)
    out[ok] = np.exp(np.mean(np.log(x[:, ok]), axis=0))
    return out


def _scanner_series(
    ident: tuple[object, ...],
    key: str,
    dwi: SeriesData,
    signal: NDArray[np.floating],
    mask: NDArray[np.bool_],
    protocol: proto.Protocol,
    scale: float,
    sigma: float,
    tumour_truth: dict[str, Any],
) -> list[tuple[SeriesData, dict[str, Any]]]:
    """The scanner's TRACEW and ADC series derived from one DWI series, with their truth.

    TRACEW: the b = 0 image and, at :data:`protocol.SCANNER_TRACE_B`, the geometric mean over the
    directions of the stored (noisy) directional images, rounded to integers, as Siemens scanners
    combine them. ADC: ordinary least-squares log-linear fit of the noiseless signal (in stored
    counts) over :data:`protocol.SCANNER_ADC_BVALUES`, stored as unsigned integers in
    1e-6 mm²/s, 0 where the b = 0 signal is below :data:`SCANNER_ADC_THRESHOLD_SIGMA` noise
    sigmas. Adds ``scanner_adc`` (expected values of the stored map) to ``tumour_truth``.
    """
    scheme = protocol.diffusion_scheme
    bvals = np.array([float(m["b"]) for m in dwi.volumes])
    b_trace = proto.SCANNER_TRACE_B[scheme]
    b0 = int(np.flatnonzero(bvals == 0.0)[0])
    high = np.flatnonzero(bvals == b_trace)
    trace_pixels = np.stack([dwi.pixels[b0], _to_uint16(_geometric_mean(dwi.pixels[high]))])
    sp_t = dataclasses.replace(
        dwi.protocol,
        series_number=TRACEW_SERIES_NUMBER,
        description=f"{dwi.protocol.description}_TRACEW",
    )
    vols_t = [
        {
            "b": float(bvals[i]),
            "gradient": [0.0, 0.0, 0.0],
            "isotropic": True,
            "time_s": float(dwi.volumes[i]["time_s"]),
        }
        for i in (b0, int(high[0]))
    ]
    trace = SeriesData(
        "dwi",
        sp_t,
        dwi.grid,
        phantom_uid(*ident, key, "dwi_trace", "series"),
        f"series{TRACEW_SERIES_NUMBER:03d}",
        trace_pixels,
        vols_t,
        dwi.start,
        derived="TRACEW",
    )
    nz = dwi.grid.size[2]
    trace.sop_uids = [
        [phantom_uid(*ident, key, "dwi_trace", v, k) for k in range(nz)] for v in range(2)
    ]

    used = np.asarray(proto.SCANNER_ADC_BVALUES[scheme])
    counts = np.stack([_geometric_mean(signal[bvals == b] * scale) for b in used])
    valid = (counts[0] >= SCANNER_ADC_THRESHOLD_SIGMA * sigma) & np.all(counts > 0, axis=0)
    adc = np.zeros(valid.shape)
    adc[valid] = loglinear_adc(used, counts[:, valid])
    stored = _to_uint16(adc * 1e6)
    sp_a = dataclasses.replace(
        dwi.protocol, series_number=ADC_SERIES_NUMBER, description=f"{dwi.protocol.description}_ADC"
    )
    vols_a = [
        {
            "b": float(used.max()),
            "gradient": [0.0, 0.0, 0.0],
            "isotropic": True,
            "time_s": 0.0,
            "sequence_name": f"ep_b{int(used.min())}_{int(used.max())}",
        }
    ]
    adc_series = SeriesData(
        "dwi",
        sp_a,
        dwi.grid,
        phantom_uid(*ident, key, "adc_scanner", "series"),
        f"series{ADC_SERIES_NUMBER:03d}",
        stored[None],
        vols_a,
        dwi.start,
        derived="ADC",
    )
    adc_series.sop_uids = [[phantom_uid(*ident, key, "adc_scanner", 0, k) for k in range(nz)]]

    values = stored.astype(np.float64) * 1e-6
    tissue = stored > 0
    tumour = mask & tissue
    expected: dict[str, Any] = {}
    subsets = dict(proto.ADC_SUBSETS)
    if scheme == "two-point":
        subsets.update(proto.TWO_POINT_ADC_SUBSETS)
    acquired = set(bvals.tolist())
    for name, bset in subsets.items():
        if not set(bset) <= acquired:
            continue
        b = np.asarray(bset)
        sig = np.stack([_geometric_mean(signal[bvals == bi]) for bi in b])
        ok = tissue & np.all(sig > 0, axis=0)
        fit = np.full(tissue.shape, np.nan)
        fit[ok] = loglinear_adc(b, sig[:, ok])
        rel = fit / np.where(tissue, values, np.nan) - 1.0
        expected[name] = {
            "tumour_median_relative_difference": float(np.nanmedian(rel[tumour])),
            "tissue_median_relative_difference": float(np.nanmedian(rel[ok])),
        }
    tumour_truth["scanner_adc"] = {
        "bvalues_used": used.tolist(),
        "fit": "ordinary least squares of ln S on b per voxel, noiseless direction-averaged signal",
        "stored_unit": "unsigned integers in 1e-6 mm2/s (0 = not computed)",
        "threshold": f"b = 0 signal >= {SCANNER_ADC_THRESHOLD_SIGMA:g} noise sigma",
        "tumour_mean_mm2_s": float(values[tumour].mean()),
        "tumour_median_mm2_s": float(np.median(values[tumour])),
        "tissue_median_mm2_s": float(np.median(values[tissue])),
        "tumour_voxels": int(tumour.sum()),
        "tissue_voxels": int(tissue.sum()),
        "expected_node_vs_scanner": expected,
        "expected_note": (
            "per b subset: median over voxels of (noiseless OLS ADC over that "
            "subset) / (stored scanner ADC) - 1, in the tumour and over every voxel "
            "the scanner map covers; what an ADC QA fitting that subset should find, "
            "up to noise"
        ),
    }
    common = {
        "geometry": dwi.grid.as_dict(),
        "number_of_files": None,
        "derived_from": dwi.series_uid,
    }
    out = []
    for sd, role, name, extra in (
        (
            trace,
            "trace",
            "dwi_trace",
            {
                "bvalues": [0.0, b_trace],
                "combination": (
                    f"b {b_trace:g}: geometric mean of the {high.size} stored "
                    "directional images, rounded; b 0: the acquired b = 0 image"
                ),
            },
        ),
        (
            adc_series,
            "adc_map",
            "adc_scanner",
            {"bvalues_used": used.tolist(), "stored_unit": "1e-6 mm2/s"},
        ),
    ):
        out.append(
            (
                sd,
                {
                    "key": name,
                    "SeriesInstanceUID": sd.series_uid,
                    "SeriesNumber": sd.protocol.series_number,
                    "folder": sd.folder,
                    "role": role,
                    **common,
                    "number_of_files": len(sd.volumes) * nz,
                    **extra,
                },
            )
        )
    return out


def _reference_signal(
    sp: proto.SeriesProtocol, p: dict[str, float], protocol: proto.Protocol
) -> float:
    """Noiseless signal of the nominal tumour in this series (b = 0 / pre-contrast / DCE flip)."""
    one = {k: np.array([v], dtype=np.float64) for k, v in p.items()}
    lab = np.array([LABEL["tumour"]], dtype=np.int16)
    if sp.role in ("vfa_t1", "dce"):
        return float(
            spgr_signal(
                one["pd"], 1000.0 / one["t1"], flip_deg=sp.flip_deg, tr_s=sp.tr_ms / 1000.0
            )[0]
        )
    return float(_weighted(sp, one, lab)[0])


def _weighted(
    sp: proto.SeriesProtocol, p: dict[str, NDArray[np.float64]], labels: NDArray[np.int16]
) -> NDArray[np.float64]:
    """Spin-echo family signal (T2w/T1w: PD·(1−e^{−TR/T1})·e^{−TE/T2}; STIR adds the inversion)."""
    t1, t2 = p["t1"], p["t2"]
    if sp.ti_ms is not None:
        mz = np.abs(1.0 - 2.0 * np.exp(-sp.ti_ms / t1) + np.exp(-sp.tr_ms / t1))
    else:
        mz = 1.0 - np.exp(-sp.tr_ms / t1)
    s = p["pd"] * mz * np.exp(-sp.te_ms / t2)
    if sp.role == "dwi":
        s = s * p["dwi"]
    return s


def _synthesise(
    sp: proto.SeriesProtocol,
    params: dict[str, NDArray[np.float64]],
    labels: NDArray[np.int16],
    protocol: proto.Protocol,
    start: dt.datetime,
    *,
    r1_per_mM_s: float = proto.R1_PER_MM_PER_S,
) -> tuple[NDArray[np.floating[Any]], list[dict[str, Any]], dict[str, Any]]:
    """Noiseless signal (V, k, j, i) and per-volume metadata of one series."""
    extra: dict[str, Any] = {}
    if sp.role in ("t2w", "t1w", "stir"):
        return _weighted(sp, params, labels)[None], [{"time_s": 0.0}], extra
    if sp.role == "dwi":
        s0 = _weighted(sp, params, labels)
        vols = proto.dwi_volumes(protocol.dwi_shells)
        out = np.empty((len(vols),) + s0.shape, dtype=np.float32)
        meta: list[dict[str, Any]] = []
        seen: dict[float, int] = {}
        for v, (b, g) in enumerate(vols):
            out[v] = s0 * diffusion_attenuation(
                b, params["d"], params["k"], params["f"], params["dstar"]
            )
            seen[b] = seen.get(b, 0) + 1
            meta.append(
                {
                    "b": b,
                    "gradient": [float(x) for x in g],
                    "gradient_number": seen[b],
                    "time_s": v * sp.tr_ms / 1000.0,
                }
            )
        return out, meta, extra
    r10 = 1000.0 / params["t1"]
    tr_s = sp.tr_ms / 1000.0
    if sp.role == "vfa_t1":
        out = np.stack(
            [spgr_signal(params["pd"], r10, flip_deg=a, tr_s=tr_s) for a in protocol.vfa_flip_deg]
        )
        meta = [{"flip_deg": a, "time_s": 20.0 * i} for i, a in enumerate(protocol.vfa_flip_deg)]
        return out, meta, extra
    if sp.role == "dce":
        t = np.arange(protocol.dce_frames) * protocol.dce_dt_s
        shape = params["pd"].shape
        flat = {k: v.ravel() for k, v in params.items()}
        blood = labels.ravel() == LABEL["blood"]
        cb = parker_aif_blood(t, bolus_arrival_s=proto.BOLUS_ARRIVAL_S)
        r10_flat = r10.ravel()
        out = np.empty((t.size, r10_flat.size), dtype=np.float32)
        chunk = 32768  # voxels per block: bounds the (time x voxel) temporaries to a few tens of MB
        for lo in range(0, r10_flat.size, chunk):
            sl = slice(lo, lo + chunk)
            conc = np.zeros((t.size, r10_flat[sl].size))
            perfused = (flat["ktrans"][sl] > 0) | (flat["vp"][sl] > 0)
            if perfused.any():
                conc[:, perfused] = extended_tofts(
                    t,
                    flat["ktrans"][sl][perfused],
                    flat["ve"][sl][perfused],
                    flat["vp"][sl][perfused],
                    bolus_arrival_s=proto.BOLUS_ARRIVAL_S,
                    hct=proto.HCT,
                )
            conc[:, blood[sl]] = cb[:, None]
            r1 = (r10_flat[sl][None, :] + r1_per_mM_s * conc).astype(np.float32)
            out[:, sl] = spgr_signal(
                flat["pd"][sl].astype(np.float32)[None, :], r1, flip_deg=sp.flip_deg, tr_s=tr_s
            )
        out = out.reshape((t.size,) + shape)
        meta = [{"time_s": float(ti), "temporal_position": n + 1} for n, ti in enumerate(t)]
        extra["aif_whole_blood_mM"] = [float(v) for v in cb]
        extra["frame_times_s"] = [float(v) for v in t]
        return out, meta, extra
    raise ValueError(f"no signal model for role {sp.role!r}")


def _acquisition_truth(
    sp: proto.SeriesProtocol,
    protocol: proto.Protocol,
    volumes: list[dict[str, Any]],
    contrast: dict[str, Any],
) -> dict[str, Any]:
    acq: dict[str, Any] = {
        "RepetitionTime_ms": sp.tr_ms,
        "EchoTime_ms": sp.te_ms,
        "FlipAngle_deg": sp.flip_deg,
        "InversionTime_ms": sp.ti_ms,
        "MagneticFieldStrength_T": contrast["field_strength_t"],
        "MRAcquisitionType": sp.acquisition_type,
        "ScanningSequence": list(sp.scanning_sequence),
        "snr_tumour": sp.snr,
    }
    if sp.role == "dwi":
        acq["bvalues"] = sorted({v["b"] for v in volumes})
        acq["shells"] = [[b, n] for b, n in protocol.dwi_shells]
        if protocol.diffusion_scheme != "standard":
            acq["diffusion_scheme"] = protocol.diffusion_scheme
    if sp.role == "vfa_t1":
        acq["flip_angles_deg"] = list(protocol.vfa_flip_deg)
    if sp.role == "dce":
        acq.update(
            {
                "temporal_resolution_s": protocol.dce_dt_s,
                "number_of_temporal_positions": protocol.dce_frames,
                "bolus_arrival_s": proto.BOLUS_ARRIVAL_S,
                "injection_start_s": proto.BOLUS_ARRIVAL_S - 10.0,
                "contrast_agent": contrast["agent_text"],
                "dose_mmol_per_kg": contrast["dose_mmol_per_kg"],
                "r1_per_mM_per_s": contrast["r1_per_mM_per_s"],
                "r1_source": contrast["r1_source"],
                "hct": proto.HCT,
                "aif": {
                    "model": (
                        "Parker 2006 population AIF, whole blood, evaluated at "
                        "(t - bolus_arrival_s)/60 min"
                    ),
                    "plasma": "Cp = Cb / (1 - hct)",
                    "tissue_model": "extended Tofts",
                    "signal_model": "SPGR with R1 = R10 + r1*C, R10 = 1/T10 of each tissue",
                    "aorta": "blood voxels carry C = Cb (whole blood)",
                },
            }
        )
    return acq


def _diffusion_truth(
    params: dict[str, NDArray[np.float64]],
    mask: NDArray[np.bool_],
    protocol: proto.Protocol | None = None,
) -> dict[str, Any]:
    """Exact mono-exponential ADC and apparent kurtosis per b subset.

    Noiseless values, for the tumour.
    """
    d, k, f, ds = (params[n][mask] for n in ("d", "k", "f", "dstar"))
    adc = {}
    subsets = dict(proto.ADC_SUBSETS)
    if protocol is not None and protocol.diffusion_scheme == "two-point":
        subsets.update(proto.TWO_POINT_ADC_SUBSETS)
    for name, bset in subsets.items():
        b = np.asarray(bset)
        sig = np.stack([diffusion_attenuation(bi, d, k, f, ds) for bi in b])
        adc[name] = {"bvalues": list(bset), "adc_mm2_s": float(np.mean(loglinear_adc(b, sig)))}
    kurt = {}
    for name, bset in proto.KURTOSIS_SUBSETS.items():
        b = np.asarray(bset)
        sig = np.stack([diffusion_attenuation(bi, d, k, f, ds) for bi in b])
        dapp, kapp = kurtosis_ols(b, sig)
        kurt[name] = {
            "bvalues": list(bset),
            "D_mm2_s": float(np.mean(dapp)),
            "K": float(np.mean(kapp)),
        }
    return {
        "adc_by_bvalues": adc,
        "kurtosis_by_bvalues": kurt,
        "dki_tensor_fit_noiseless": _dipy_dki_truth(d, k, f, ds),
        "diffusion_note": (
            "signal S(b)/S0 = f exp(-b D*) + (1-f) exp(-b D + b^2 D^2 K/6), isotropic; ADC truth = "
            "mean over tumour voxels of the per-voxel OLS log-linear ADC of the noiseless "
            "direction-averaged signal over the listed b-values"
        ),
    }


#: protocol subsets for the noiseless dipy DKI truth: every b-value, b0 with the shells >= 400,
#: and the shells >= 400 without b0 (perfusion-free)
DKI_SUBSETS: dict[str, tuple[float, float]] = {
    "all": (0.0, 2000.0),
    "b0+b400-2000": (400.0, 2000.0),
    "b400-2000": (400.0, 2000.0),
}


def _dipy_dki_truth(
    d: NDArray[np.float64],
    k: NDArray[np.float64],
    f: NDArray[np.float64],
    dstar: NDArray[np.float64],
) -> dict[str, Any]:
    """Tumour-mean MK and MD that dipy's DKI model (default WLS) returns on the noiseless signal.

    With IVIM perfusion in the signal the tensor fit over all b-values is biased away from K;
    this is its exact noiseless value for this protocol's gradient table, per b subset.
    """
    import dipy.reconst.dki as dki
    from dipy.core.gradients import gradient_table

    vols = proto.dwi_volumes()
    bvals = np.array([b for b, _ in vols])
    bvecs = np.array([g for _, g in vols])
    out: dict[str, Any] = {}
    for name, (low, high) in DKI_SUBSETS.items():
        if name == "all":
            sel = bvals <= high
        elif name.startswith("b0+"):
            sel = (bvals == 0) | ((bvals >= low) & (bvals <= high))
        else:
            sel = (bvals >= low) & (bvals <= high)
        b = bvals[sel]
        signal = np.stack([diffusion_attenuation(bi, d, k, f, dstar) for bi in b], axis=1) * 1000.0
        gtab = gradient_table(b, bvecs=bvecs[sel], b0_threshold=min(50.0, float(b.min())))
        fit = dki.DiffusionKurtosisModel(gtab).fit(signal)
        out[name] = {
            "bvalues": sorted({float(x) for x in b}),
            "MK": float(np.mean(fit.mk(min_kurtosis=0, max_kurtosis=10))),
            "MD_mm2_s": float(np.mean(fit.md)),
            "fit": "dipy DiffusionKurtosisModel, default (WLS)",
        }
    return out


def _ground_truth(
    ph: Phantom, protocol: proto.Protocol, rt_truth: dict[str, Any]
) -> dict[str, Any]:
    gt: dict[str, Any] = {
        "generator": {
            "name": "spine-node phantom",
            "seed": ph.seed,
            "scenario": ph.scenario,
            "vendor": ph.vendor,
            "size": ph.size,
            "followups": len(ph.studies) - 1,
        },
        "patient": ph.patient,
        "course": ph.rt["course"] | rt_truth,
        "treated_level": ph.anatomy.level_names[2],
        "vertebral_levels": list(ph.anatomy.level_names),
        "vertebra_centre_mm": list(ph.anatomy.vertebra_centre),
        "tissue_parameters": TISSUE_PARAMS,
        "studies": {},
        "dwi_files": {},
        "contrast": dict(ph.contrast),
        "vfa_layout": "one series per flip angle" if ph.vfa_series else "one multi-flip series",
    }
    if ph.diffusion_scheme != "standard":
        gt["generator"]["diffusion_scheme"] = ph.diffusion_scheme
    if ph.non_image_objects:
        gt["generator"]["non_image_objects"] = True
    for study in ph.studies:
        gt["studies"][study.key] = study.truth
        dwi = next(s for s in study.series if s.role == "dwi" and s.derived is None)
        files = []
        nz = dwi.grid.size[2]
        for v, meta in enumerate(dwi.volumes):
            for k in range(nz):
                files.append(
                    {
                        "file": f"{study.key}/{dwi.folder}/{v * nz + k + 1:05d}.dcm",
                        "b": meta["b"],
                        "gradient_lps": meta["gradient"],
                    }
                )
        if ph.vendor == "enhanced":
            files = [
                {
                    "file": f"{study.key}/{dwi.folder}/00001.dcm",
                    "frames": [
                        {"frame": v * nz + k + 1, "b": m["b"], "gradient_lps": m["gradient"]}
                        for v, m in enumerate(dwi.volumes)
                        for k in range(nz)
                    ],
                }
            ]
        gt["dwi_files"][study.key] = files
    baseline = gt["studies"]["baseline"]["tumour"]
    for key, st in gt["studies"].items():
        if key == "baseline":
            continue
        tum = st["tumour"]
        st["change_from_baseline"] = {
            "volume_relative": tum["volume_ml_continuous"] / baseline["volume_ml_continuous"] - 1.0,
            **{
                f"{q}_relative": tum["means"][q] / baseline["means"][q] - 1.0
                for q in ("D", "Ktrans", "vp", "ve")
            },
            "adc_b50-1000_relative": tum["adc_by_bvalues"]["b50-1000"]["adc_mm2_s"]
            / baseline["adc_by_bvalues"]["b50-1000"]["adc_mm2_s"]
            - 1.0,
        }
    return gt
