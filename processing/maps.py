"""From the series of one study to every quantitative map they allow.

:func:`compute_maps` classifies the given series (:mod:`processing.classify`), then fits
ADC (+ IVIM when the b-values allow), tensor DKI (MK, MD, AK, RK, FA) or apparent kurtosis
(Kapp, Dapp), VFA T1 (or a flagged fixed T10) and DCE (extended Tofts Ktrans, ve, vp, kep with a
Parker population AIF; IAUC60 and time to peak). Each map is a :class:`QuantMap` on its source
grid with its unit, provenance and source series.

Units follow docs/architecture.md, Conventions: ADC/MD/D in mm²/s, Ktrans/kep in /min, ve/vp/f
fractions, T1 in s, IAUC60 in mmol/L·s, TTP in s.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
from numpy.typing import NDArray

from processing import classify as cl
from processing.classify import SeriesRole, classify_volume, protocol_inventory
from processing.dce import (
    ArterialInputFunction,
    ToftsModel,
    bolus_arrival_time,
    semi_quantitative,
    spgr_signal_to_concentration,
)
from processing.dki import ApparentKurtosisModel, TensorDkiModel
from processing.dwi import AdcModel, IvimModel
from processing.errors import FitError, InputError, ProcessingError
from processing.relaxivity import (
    DEFAULT_RELAXIVITY_PER_MM_S,
    normalise_overrides,
    resolve_relaxivity,
)
from processing.results import QUANTITY_UNITS
from processing.series import Geometry, SeriesVolume
from processing.t1 import T1Fit, VfaT1Model, fixed_t10

logger = logging.getLogger(__name__)

__all__ = ["MapSettings", "QuantMap", "compute_maps", "map_statistics"]

#: Internal UCUM unit of every quantity a map is computed for (one table with the measurements:
#: :data:`processing.results.QUANTITY_UNITS`).
UNITS: dict[str, str] = {q: u for q, u in QUANTITY_UNITS.items() if q not in ("T2w", "T1w")}


@dataclass(frozen=True)
class MapSettings:
    """Settings of the map computation (recorded in every map's provenance).

    Attributes
    ----------
    adc_min_b, adc_max_b : float
        b-range of the ADC fit (s/mm²); default 50-1000 (body DWI consensus; kurtosis bends the
        curve beyond ~1000). With fewer than two shells in the range, b = 0 joins; a two-point
        high-b protocol (b0 + b1500/2000/2500) uses b0 and its lowest shell above `adc_max_b`
        (:func:`processing.dwi.select_adc_shells`; the reason is in the ADC's provenance).
    adc_weighting : {"none", "S2"}
        ADC estimator. Default ``"none"`` (ordinary log-linear least squares): the definition of
        scanner ADC maps and of the phantom truth. With IVIM/kurtosis curvature the S²-weighted
        fit differs from it systematically (+1.6 % at ADC 0.77e-3, +2.8 % at 1.03e-3 mm²/s over
        b 50-1000 in the phantom tumour) while its precision gain at <= 6 b-values is small.
    ivim_b_threshold, ivim_max_b : float
        Lowest b of the IVIM D fit and highest b of the IVIM fit (s/mm²).
    hematocrit : float
        Large-vessel haematocrit for the Parker AIF (blood -> plasma).
    relaxivity : float
        Contrast agent r1 (/mM/s) used when the DCE series declares no agent that the table of
        :mod:`processing.relaxivity` (or `relaxivity_by_agent`) knows; the map provenance then
        carries a warning. Default 3.5 (gadoterate in plasma, 3 T, Rohrer 2005).
    relaxivity_by_agent : dict of str to float
        Site r1 values (/mM/s) by agent (generic or brand name); they win over the table.
    fixed_t10 : float
        T10 (s) used when no VFA series exists (flagged in provenance).
    extended_tofts : bool
        Fit the extended (vp) Tofts model; else standard.
    background_fraction : float
        Voxels whose reference signal is below this fraction of the 99th percentile are background.
    min_baseline_frames : int
        DCE frames needed before the detected bolus arrival (the first is excluded from the
        baseline as not yet in steady state); fewer raise "DCE without baseline".
    """

    adc_min_b: float = 50.0
    adc_max_b: float = 1000.0
    adc_weighting: str = "none"
    ivim_b_threshold: float = 200.0
    ivim_max_b: float = 1000.0
    hematocrit: float = 0.42
    relaxivity: float = DEFAULT_RELAXIVITY_PER_MM_S
    relaxivity_by_agent: dict[str, float] = field(default_factory=dict)
    fixed_t10: float = 1.0
    extended_tofts: bool = True
    background_fraction: float = 0.05
    min_baseline_frames: int = 3

    def __post_init__(self) -> None:
        if not 0 <= self.hematocrit < 1:
            raise ValueError(f"hematocrit must be in [0, 1), got {self.hematocrit}")
        if self.relaxivity <= 0 or self.fixed_t10 <= 0:
            raise ValueError("relaxivity and fixed T10 must be positive")
        normalise_overrides(self.relaxivity_by_agent)
        if not 0 <= self.adc_min_b < self.adc_max_b:
            raise ValueError("invalid ADC b-range")


@dataclass(frozen=True)
class QuantMap:
    """One quantitative map on the grid of its source series.

    Attributes
    ----------
    quantity : str
        ``ADC``, ``MK``, ``Ktrans``... (reporting.codes.QUANTITIES names where one exists).
    values : ndarray, shape (z, y, x)
        float32 values in `unit`; NaN where the fit is invalid or outside the analysed region.
    valid : ndarray of bool, shape (z, y, x)
    unit : str
        UCUM unit of `values`.
    geometry : Geometry
        Grid (origin, spacing, direction, size) of the source series.
    source_series_instance_uid : str
    provenance : dict
        Model, inputs used (b-values, time points, AIF, Hct, r1, T1 method...), settings.
    """

    quantity: str
    values: NDArray[np.float32]
    valid: NDArray[np.bool_]
    unit: str
    geometry: Geometry
    source_series_instance_uid: str
    provenance: dict[str, Any] = field(default_factory=dict)

    def image(self) -> sitk.Image:
        """The map as a SimpleITK image with the source geometry."""
        return self.geometry.image(np.asarray(self.values, dtype=np.float32))


def map_statistics(qmap: QuantMap, mask: NDArray[np.bool_] | None = None) -> dict[str, Any]:
    """Summary statistics of the valid voxels (inside `mask` when given)."""
    sel = qmap.valid if mask is None else (qmap.valid & mask)
    v = qmap.values[sel].astype(float)
    if v.size == 0:
        return {"n_voxels": 0}
    return {
        "n_voxels": int(v.size),
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "sd": float(v.std()),
        "p10": float(np.percentile(v, 10)),
        "p90": float(np.percentile(v, 90)),
        "min": float(v.min()),
        "max": float(v.max()),
    }


def _to_voxels_last(volume: SeriesVolume) -> NDArray[np.float64]:
    """(n, z, y, x) -> (z, y, x, n) float64."""
    return np.moveaxis(np.asarray(volume.array, dtype=np.float64), 0, -1)


def _foreground(reference: NDArray[np.float64], fraction: float) -> NDArray[np.bool_]:
    finite = reference[np.isfinite(reference)]
    if finite.size == 0:
        return np.zeros(reference.shape, dtype=bool)
    return np.isfinite(reference) & (reference > fraction * np.percentile(finite, 99))


def _qmap(
    quantity: str,
    values: NDArray[np.floating[Any]],
    valid: NDArray[np.bool_],
    volume: SeriesVolume,
    provenance: dict[str, Any],
) -> QuantMap:
    v = np.where(valid, values, np.nan).astype(np.float32)
    return QuantMap(
        quantity,
        v,
        np.asarray(valid, dtype=bool) & np.isfinite(v),
        UNITS[quantity],
        volume.geometry,
        volume.series_instance_uid,
        dict(provenance),
    )


def _diffusion_models_not_fitted(shells: list[float], flags: dict[str, bool]) -> dict[str, str]:
    """Why IVIM / kurtosis are not fitted for this b-scheme (model -> plain-language reason)."""
    scheme = ", ".join(f"{b:g}" for b in shells)
    out: dict[str, str] = {}
    if not flags.get("ivim"):
        out["IVIM"] = (
            f"b-values {scheme} s/mm²: IVIM needs at least {cl.IVIM_MIN_SHELLS} shells, "
            f"{cl.IVIM_MIN_LOW_SHELLS} of them at b <= {cl.IVIM_LOW_B:g} s/mm² (perfusion regime) "
            f"and one at b >= {cl.DIFFUSION_MIN_HIGH_B:g}"
        )
    if not flags.get("dki_tensor") and not flags.get("kurtosis_apparent"):
        out["DKI"] = (
            f"b-values {scheme} s/mm²: kurtosis needs at least {cl.KURTOSIS_MIN_SHELLS} shells "
            f"from b <= {cl.KURTOSIS_MAX_LOW_B:g} to b >= {cl.KURTOSIS_MIN_HIGH_B:g} s/mm² "
            f"(tensor DKI also {cl.DKI_MIN_DIRECTIONAL_SHELLS} directional shells and "
            f">= {cl.DKI_MIN_DIRECTIONS} directions)"
        )
    return out


def _diffusion_maps(
    volume: SeriesVolume, inventory_flags: dict[str, bool], settings: MapSettings
) -> dict[str, QuantMap]:
    out: dict[str, QuantMap] = {}
    b = volume.b_values
    keep = np.isfinite(b)
    signals = _to_voxels_last(volume)[..., keep]
    b = b[keep]
    grads = volume.gradients[keep]
    fg = _foreground(signals[..., int(np.argmin(b))], settings.background_fraction)
    adc_model = AdcModel(
        b, min_b=settings.adc_min_b, max_b=settings.adc_max_b, weighting=settings.adc_weighting
    )
    adc = adc_model.fit(signals, mask=fg)
    prov = {**adc.provenance, "b_values": list(adc.b_values_used)}
    not_fitted = _diffusion_models_not_fitted(adc_model.shells.tolist(), inventory_flags)
    if not_fitted:
        prov["models_not_fitted"] = not_fitted
    out["ADC"] = _qmap("ADC", adc.adc, adc.valid, volume, prov)
    if inventory_flags.get("ivim"):
        try:
            ivim = IvimModel(
                b, b_threshold=settings.ivim_b_threshold, max_b=settings.ivim_max_b
            ).fit(signals, mask=fg)
        except ValueError as err:
            logger.info("IVIM skipped for series %s: %s", volume.series_instance_uid, err)
        else:
            prov = {**ivim.provenance, "b_values": ivim.provenance["b_values_used"]}
            out["IVIM_D"] = _qmap("IVIM_D", ivim.d, ivim.valid, volume, prov)
            out["IVIM_f"] = _qmap("IVIM_f", ivim.f, ivim.valid, volume, prov)
            out["IVIM_Dstar"] = _qmap("IVIM_Dstar", ivim.d_star, ivim.valid, volume, prov)
    if inventory_flags.get("dki_tensor"):
        dki_model = TensorDkiModel(b, grads)
        dki = dki_model.fit(signals, mask=fg)
        prov = {**dki.provenance, "b_values": dki.provenance["b_values_used"]}
        for name, arr in (
            ("MK", dki.mk),
            ("MD", dki.md),
            ("AK", dki.ak),
            ("RK", dki.rk),
            ("FA", dki.fa),
        ):
            out[name] = _qmap(name, arr, dki.valid, volume, prov)
    elif inventory_flags.get("kurtosis_apparent"):
        kapp = ApparentKurtosisModel(b).fit(signals, mask=fg)
        prov = {**kapp.provenance, "b_values": list(kapp.b_values_used)}
        out["Kapp"] = _qmap("Kapp", kapp.kapp, kapp.valid, volume, prov)
        out["Dapp"] = _qmap("Dapp", kapp.dapp, kapp.valid, volume, prov)
    return out


def _resample_to(values: NDArray[np.float64], src: Geometry, dst: Geometry) -> NDArray[np.float64]:
    """Linear resampling of a (z, y, x) map from grid `src` to grid `dst` (NaN outside)."""
    if (
        np.allclose(src.origin, dst.origin, atol=1e-3)
        and np.allclose(src.spacing, dst.spacing)
        and np.allclose(src.direction, dst.direction, atol=1e-6)
        and src.size == dst.size
    ):
        return values
    img = src.image(np.asarray(values, dtype=np.float64))
    ref = dst.image(np.zeros(tuple(reversed(dst.size)), dtype=np.float64))
    out = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, float("nan"))
    return sitk.GetArrayFromImage(out)


def _stack_vfa(members: list[SeriesVolume]) -> SeriesVolume:
    """One VFA volume from one series per flip angle (same grid), first series' identity."""
    first = members[0]
    for m in members[1:]:
        if m.geometry.size != first.geometry.size:
            raise InputError(
                f"VFA series {m.series_instance_uid} is not on the grid of "
                f"{first.series_instance_uid}"
            )
    return dataclasses.replace(
        first,
        array=np.concatenate([np.asarray(m.array) for m in members], axis=0),
        volumes=tuple(v for m in members for v in m.volumes),
        source_frames=tuple(f for m in members for f in m.source_frames),
    )


def _t1_map(
    vfa: list[SeriesVolume] | None,
    dce: SeriesVolume,
    settings: MapSettings,
    notes: tuple[str, ...] = (),
) -> tuple[T1Fit, SeriesVolume | None]:
    shape = tuple(dce.array.shape[1:])
    if not vfa:
        reason = "; ".join(("no VFA T1 series", *notes))
        return fixed_t10(shape, settings.fixed_t10, reason=reason), None
    members = list(vfa)
    used = [
        {
            "series_instance_uid": m.series_instance_uid,
            "flip_angles_deg": [v.flip_angle for v in m.volumes],
        }
        for m in members
    ]
    vfa_volume = _stack_vfa(members) if len(members) > 1 else members[0]
    flips = np.array([v.flip_angle for v in vfa_volume.volumes], dtype=float)
    tr = vfa_volume.volumes[0].repetition_time
    if tr is None:  # classify_volume accepts a multi-flip series without Repetition Time
        raise InputError(
            f"VFA T1 series {vfa_volume.series_instance_uid} has no Repetition "
            "Time (0018,0080): T1 cannot be fitted"
        )
    tr_s = float(tr) / 1000.0
    signals = _to_voxels_last(vfa_volume)
    fg = _foreground(signals.mean(axis=-1), settings.background_fraction)
    fit = VfaT1Model(flips, tr_s).fit(signals, mask=fg)
    fit = dataclasses.replace(
        fit,
        provenance={
            **fit.provenance,
            "vfa_series": used,
            "vfa_layout": "one series per flip angle"
            if len(members) > 1
            else "one multi-flip series",
        },
    )
    if vfa_volume.geometry != dce.geometry:
        t1 = _resample_to(fit.t1, vfa_volume.geometry, dce.geometry)
        valid = np.isfinite(t1)
        fit = T1Fit(
            t1=t1,
            r1=1.0 / t1,
            m0=np.full(shape, np.nan),
            r2=np.full(shape, np.nan),
            valid=valid,
            method=fit.method,
            provenance={**fit.provenance, "resampled_to_dce_grid": "linear"},
        )
    return fit, vfa_volume


def _dce_maps(
    dce: SeriesVolume,
    vfa: list[SeriesVolume] | None,
    settings: MapSettings,
    vfa_notes: tuple[str, ...] = (),
) -> dict[str, QuantMap]:
    out: dict[str, QuantMap] = {}
    times = np.array([v.time for v in dce.volumes], dtype=float)
    if not np.all(np.isfinite(times)) or np.any(np.diff(times) <= 0):
        raise InputError(f"DCE series {dce.series_instance_uid} has no increasing frame times")
    flip = dce.volumes[0].flip_angle
    tr_ms = dce.volumes[0].repetition_time
    if flip is None or tr_ms is None:
        raise InputError(f"DCE series {dce.series_instance_uid} lacks flip angle or TR")
    signal = _to_voxels_last(dce)
    t1, vfa_used = _t1_map(vfa, dce, settings, vfa_notes)
    rel = resolve_relaxivity(
        dce.physics.contrast_agent,
        dce.physics.field_strength,
        overrides=settings.relaxivity_by_agent,
        default=settings.relaxivity,
    )
    if vfa_used is not None:
        out["T1"] = _qmap(
            "T1",
            t1.t1,
            t1.valid,
            vfa_used if vfa_used.geometry == dce.geometry else dce,
            t1.provenance,
        )
    fg = _foreground(signal[..., 0], settings.background_fraction) & t1.valid
    # bolus arrival from the mean relative enhancement of the most enhancing voxels
    base0 = signal[..., :2].mean(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        enh = np.where(fg[..., None], signal / base0[..., None] - 1.0, np.nan)
    if not fg.any():
        raise InputError(f"DCE series {dce.series_instance_uid}: no voxel with signal and T10")
    peak = np.full(fg.shape, np.nan)
    peak[fg] = np.nanmax(enh[fg], axis=-1)
    strong = fg & np.isfinite(peak) & (peak >= np.nanpercentile(peak[fg], 90))
    curve = np.nanmean(enh[strong], axis=0)
    del enh  # a copy of the whole series: the chain's peak memory is here (full-size DCE)
    bat = float(bolus_arrival_time(times, curve))
    if not np.isfinite(bat):
        raise InputError(
            f"DCE without baseline: no bolus arrival detected in series "
            f"{dce.series_instance_uid} (the contrast must arrive after >= "
            f"{settings.min_baseline_frames} pre-contrast frames)"
        )
    n_baseline = int(np.searchsorted(times, bat, side="left"))
    if n_baseline < settings.min_baseline_frames:
        raise InputError(
            f"DCE without baseline: series {dce.series_instance_uid} has {n_baseline} frame(s) "
            f"before the bolus arrival at {bat:.1f} s (need {settings.min_baseline_frames})"
        )
    conc = spgr_signal_to_concentration(
        signal,
        flip_angle=float(flip),
        repetition_time=float(tr_ms) / 1000.0,
        t10=np.where(fg, t1.t1, np.nan),
        relaxivity=rel.value,
        n_baseline=n_baseline,
    )
    fg &= np.all(np.isfinite(conc), axis=-1)
    # population AIF aligned on the detected arrival, then a global delay fitted on the mean
    # curve of the enhancing voxels (the sampling interval limits the detected arrival)
    aif0 = ArterialInputFunction.parker(
        times, hematocrit=settings.hematocrit, bolus_arrival_time=bat
    )
    enhancing = fg & strong
    mean_conc = np.nanmean(conc[enhancing], axis=0)
    step = float(np.median(np.diff(times)))
    delay_fit = ToftsModel(
        times,
        aif0,
        extended=settings.extended_tofts,
        fit_delay=True,
        delay_bounds=(-2.0 * step, 2.0 * step),
        delay_step=0.25,
    ).fit(mean_conc[None, :])
    delay = float(delay_fit.delay[0]) if np.isfinite(delay_fit.delay[0]) else 0.0
    aif = ArterialInputFunction.parker(
        times, hematocrit=settings.hematocrit, bolus_arrival_time=bat + delay
    )
    model = ToftsModel(times, aif, extended=settings.extended_tofts)
    fit = model.fit(conc, mask=fg)
    prov = {
        **fit.provenance,
        "model": "extended_tofts" if settings.extended_tofts else "tofts",
        **rel.provenance(),
        "t1_method": t1.method,
        "t1_provenance": t1.provenance,
        "n_baseline_frames": n_baseline,
        "bolus_arrival_s": bat,
        "aif_delay_fit_s": delay,
        "frame_times_s": times.tolist(),
    }
    warnings = list(rel.warnings)
    if t1.is_fallback:
        warnings.append("fixed T10 (no VFA series): Ktrans, ve, IAUC60 depend on the assumed T10")
    if warnings:
        prov["warning"] = "; ".join(warnings)
    out["Ktrans"] = _qmap("Ktrans", fit.ktrans, fit.valid, dce, prov)
    out["ve"] = _qmap("ve", fit.ve, fit.valid & np.isfinite(fit.ve), dce, prov)
    out["kep"] = _qmap("kep", fit.kep, fit.valid & np.isfinite(fit.kep), dce, prov)
    if fit.vp is not None:
        out["vp"] = _qmap("vp", fit.vp, fit.valid, dce, prov)
    conc[~fg] = np.nan  # in place: no further copy of the series for the semi-quantitative maps
    sq = semi_quantitative(times, conc, bolus_arrival=bat)
    sq_prov = {**sq.provenance, "bolus_arrival_s": bat, "t1_method": t1.method, **rel.provenance()}
    if warnings:
        sq_prov["warning"] = "; ".join(warnings)
    out["IAUC60"] = _qmap("IAUC60", sq.iauc60, sq.valid, dce, sq_prov)
    out["TTP"] = _qmap("TTP", sq.time_to_peak, sq.valid, dce, sq_prov)
    return out


def _map_group(
    label: str,
    series_uid: str,
    compute: Callable[[], dict[str, QuantMap]],
    skipped: list[str] | None,
) -> dict[str, QuantMap]:
    """``compute()``: the maps of one group (diffusion, DCE) of one series.

    The fitting modules refuse data they cannot fit with a ValueError: a group that cannot be
    computed is a :class:`FitError` for the caller (an :class:`InputError` stays one), or, when
    the caller collects ``skipped`` reasons, a reason there and no maps.
    """
    try:
        return compute()
    except (ProcessingError, ValueError) as err:
        if skipped is None:
            if isinstance(err, ValueError):
                raise FitError(str(err)) from err
            raise
        logger.warning("%s maps of series %s skipped: %s", label, series_uid, err)
        skipped.append(f"{label} ({series_uid}): {err}")
        return {}


def compute_maps(
    series: Iterable[SeriesVolume],
    *,
    settings: MapSettings | None = None,
    skipped: list[str] | None = None,
) -> dict[str, QuantMap]:
    """Every quantitative map the given series of one study allow.

    Parameters
    ----------
    series : iterable of SeriesVolume
        Assembled series (:func:`processing.series.read_series`) of one study; anatomical and
        unrelated series are ignored.
    settings : MapSettings, optional
    skipped : list of str, optional
        When given, a group of maps that cannot be computed (e.g. DCE without baseline) is left
        out, its reason appended here and the other groups are still returned; when None the
        ValueError propagates.

    Returns
    -------
    dict[str, QuantMap]
        Keyed by quantity (``ADC``, ``IVIM_D``, ``IVIM_f``, ``IVIM_Dstar``, ``MK``, ``MD``,
        ``AK``, ``RK``, ``FA`` or ``Kapp``/``Dapp``, ``T1``, ``Ktrans``, ``ve``, ``vp``, ``kep``,
        ``IAUC60``, ``TTP``); empty when no series allows a map. Each map's provenance carries
        ``elapsed_s`` (wall time of its group).

    Raises
    ------
    processing.errors.ProcessingError
        Only when ``skipped`` is None: a DWI/DCE series is unusable (:class:`InputError`, e.g.
        DCE without baseline frames) or its fit failed (:class:`FitError`); the message names it.
    """
    settings = settings or MapSettings()
    volumes = {v.series_instance_uid: v for v in series}
    classes = [classify_volume(v) for v in volumes.values()]
    inv = protocol_inventory(classes)
    settings_prov = {"settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__}}
    out: dict[str, QuantMap] = {}
    if inv.adc:
        uid = inv.adc[0]
        flags = {
            "ivim": uid in inv.ivim,
            "dki_tensor": uid in inv.dki_tensor,
            "kurtosis_apparent": uid in inv.kurtosis_apparent,
        }
        start = time.perf_counter()
        maps = _map_group(
            "diffusion", uid, lambda: _diffusion_maps(volumes[uid], flags, settings), skipped
        )
        elapsed = time.perf_counter() - start
        for name, m in maps.items():
            m.provenance.update(settings_prov, elapsed_s=elapsed)
        out.update(maps)
        logger.info("diffusion maps of series %s: %s (%.1f s)", uid, sorted(maps), elapsed)
    if inv.dce:
        dce = volumes[inv.dce]
        vfa = (
            [volumes[u] for u in inv.vfa_t1_series]
            if inv.vfa_t1_series and inv.dce_t1_method == "vfa"
            else None
        )
        start = time.perf_counter()
        if inv.dce_quantitative:
            maps = _map_group(
                "DCE", inv.dce, lambda: _dce_maps(dce, vfa, settings, inv.vfa_notes), skipped
            )
        else:
            logger.info("DCE series %s too short/slow for pharmacokinetics", inv.dce)
            maps = {}
        elapsed = time.perf_counter() - start
        for name, m in maps.items():
            m.provenance.update(settings_prov, elapsed_s=elapsed)
        out.update(maps)
        logger.info("DCE maps of series %s: %s (%.1f s)", inv.dce, sorted(maps), elapsed)
    roles = {c.series_instance_uid: c.role for c in classes}
    if not out and any(r in (SeriesRole.DWI, SeriesRole.DCE) for r in roles.values()):
        logger.warning("functional series present but no map could be computed")
    if not out and skipped is not None:
        # say why each series gives nothing (functional series already have their reason)
        for c in classes:
            if c.role in (SeriesRole.DWI, SeriesRole.TRACE, SeriesRole.DCE):
                continue
            skipped.append(
                f"no map from series {c.series_instance_uid} ({c.role.value}: "
                f"{'; '.join(c.reasons)}): maps need diffusion weighting, a dynamic "
                "series of >= 10 frames or >= 2 flip angles (VFA T1)"
            )
    return out
