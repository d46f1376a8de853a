"""Series roles from acquisition physics, and the per-study protocol inventory.

The role of a series is decided from what was acquired — b-values and gradient directions, flip
angles, TR/TE/TI, temporal positions, inversion and fat suppression, Image Type tokens such as
DERIVED/ADC/TRACEW, the SOP Class — never from Series Description, which sites fill freely (or not
at all). The inventory says which analyses a study allows (ADC, IVIM, tensor DKI, apparent kurtosis,
quantitative DCE with a VFA or a fixed T10) and which series each would use.

Thresholds (documented so that a reviewer can check them against the protocols in docs/science.md
§3):

* b-values below 5 s/mm² are b = 0 (Philips stores repeated b0 as 0.001–0.004); b-values within
  max(25 s/mm², 5 %) form one shell.
* ADC: ≥ 2 distinct b-values with b_max ≥ 400 s/mm² (body DWI: b50–100 and b800–1000; §3.1).
* IVIM: ≥ 4 distinct b-values, ≥ 3 of them ≤ 200 s/mm² (including b = 0) and ≥ 1 ≥ 400 s/mm².
* Apparent (directionally averaged) kurtosis: ≥ 3 distinct b-values including one ≤ 100 s/mm² and
  b_max ≥ 1400 s/mm² (S(b) = S0·exp(−bD + b²D²K/6); §3.2).
* Tensor DKI: b = 0, ≥ 2 non-zero shells with ≥ 6 non-collinear directions each, ≥ 15 non-collinear
  directions in all and b_max ≥ 1400 s/mm² (§3.2; Tabesh 2011, dipy ``dki``).
* STIR: inversion recovery with TI 80–300 ms; T1w: spin echo TR ≤ 1000 ms and TE ≤ 30 ms, gradient
  echo TR < 50 ms with TE < 10 ms and flip ≥ 5°, or inversion recovery with TI 300–1500 ms;
  T2w: TR ≥ 1500 ms and TE ≥ 60 ms.
* VFA T1: ≥ 2 volumes with distinct flip angles at one TR (± 2 %), gradient echo (§3.3); or
  one-volume spoiled gradient-echo series (TR < 50 ms), one per flip angle, with the same frame
  of reference, grid, TR (± 2 %), sequence and contrast state (:func:`group_vfa_series`). A lone
  single-flip series is never VFA (``ProtocolInventory.vfa_notes`` says why).
* DCE: ≥ 5 volumes at one flip angle with strictly increasing acquisition times (§3.6).

References
----------
.. [1] docs/science.md §3.1–3.7 (acquisition facts, diffusion and DCE metadata).
.. [2] Tabesh A et al. Magn Reson Med 2011;65:823-836 (DKI estimation).
.. [3] DICOM PS3.3 C.8.13.1 (Image Type / Frame Type values, e.g. ADC, TRACEW, DIFFUSION).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
from pydicom.dataset import Dataset

from processing.diffusion_encoding import B0_THRESHOLD, DiffusionEncodingError
from processing.series import (
    SEGMENTATION_SOP_CLASS,
    SeriesError,
    SeriesVolume,
    group_by_series,
    read_series,
    set_aside_entry,
    split_set_aside,
)

logger = logging.getLogger(__name__)

RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"
RT_STRUCTURE_SET_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"

SHELL_ABS_TOLERANCE = 25.0  # s/mm²
SHELL_REL_TOLERANCE = 0.05
COLLINEAR_COS = float(np.cos(np.deg2rad(2.0)))

# Model thresholds of the inventory (module docstring); b-values in s/mm².
#: ADC (and IVIM) need a shell at or above this b-value.
DIFFUSION_MIN_HIGH_B = 400.0
#: IVIM: at least this many shells, of which IVIM_MIN_LOW_SHELLS at or below IVIM_LOW_B.
IVIM_MIN_SHELLS = 4
IVIM_MIN_LOW_SHELLS = 3
IVIM_LOW_B = 200.0
#: Kurtosis: at least this many shells from KURTOSIS_MAX_LOW_B or lower to KURTOSIS_MIN_HIGH_B.
KURTOSIS_MIN_SHELLS = 3
KURTOSIS_MAX_LOW_B = 100.0
KURTOSIS_MIN_HIGH_B = 1400.0
#: Tensor DKI: shells with at least DKI_MIN_SHELL_DIRECTIONS directions (DKI_MIN_DIRECTIONAL_SHELLS
#: of them) and DKI_MIN_DIRECTIONS non-collinear directions in all.
DKI_MIN_DIRECTIONAL_SHELLS = 2
DKI_MIN_SHELL_DIRECTIONS = 6
DKI_MIN_DIRECTIONS = 15


class SeriesRole(str, enum.Enum):
    """What a series is, for the analysis chain."""

    DWI = "dwi"
    #: a scanner-computed ADC map (Image Type ADC); values
    #: via :func:`processing.adc_qa.scanner_adc_mm2_s`
    ADC_MAP = "adc_map"
    TRACE = "trace"
    DCE = "dce"
    VFA_T1 = "vfa_t1"
    T1W = "t1w"
    T2W = "t2w"
    STIR = "stir"
    RTPLAN = "rtplan"
    RTSTRUCT = "rtstruct"
    RTDOSE = "rtdose"
    SEG = "seg"
    OTHER = "other"


@dataclass(frozen=True)
class DiffusionInventory:
    """b-value / direction inventory of a diffusion series and the models it supports.

    Attributes
    ----------
    shells : tuple of (float, int)
        (mean b-value in s/mm², number of non-collinear directions) per shell, ascending; b = 0 and
        isotropic-only shells have 0 directions.
    n_volumes : int
        Diffusion volumes in the series.
    has_b0 : bool
        At least one volume with b < 5 s/mm².
    n_isotropic : int
        Volumes that are trace / isotropic (excluded from tensor fits).
    n_directions : int
        Non-collinear directions over all b > 0 shells.
    adc, ivim, kurtosis_apparent, dki_tensor : bool
        Whether the acquisition supports each model (thresholds in the module docstring).
    """

    shells: tuple[tuple[float, int], ...]
    n_volumes: int
    has_b0: bool
    n_isotropic: int
    n_directions: int
    adc: bool
    ivim: bool
    kurtosis_apparent: bool
    dki_tensor: bool

    @property
    def b_values(self) -> tuple[float, ...]:
        """Shell b-values in s/mm², ascending (0 for the b0 shell)."""
        return tuple(b for b, _ in self.shells)


@dataclass(frozen=True)
class SeriesClassification:
    """Role of one series and the facts that decided it.

    Attributes
    ----------
    role : SeriesRole
    reasons : tuple of str
        Human-readable physics the decision rests on (for logs and the dashboard).
    diffusion : DiffusionInventory or None
        For ``dwi`` and ``trace`` series.
    n_volumes : int
        Volumes in the series (1 for RT objects).
    flip_angles : tuple of float
        Distinct flip angles (degrees), ascending.
    repetition_time : float or None
        TR in ms of the first volume.
    temporal_resolution : float or None
        Median interval between volumes in s (DCE).
    error : str or None
        Why the series could not be read (then ``role`` is ``other``).
    """

    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    role: SeriesRole
    reasons: tuple[str, ...] = ()
    diffusion: DiffusionInventory | None = None
    n_volumes: int = 1
    flip_angles: tuple[float, ...] = ()
    repetition_time: float | None = None
    temporal_resolution: float | None = None
    contrast_agent: str | None = None
    error: str | None = None
    #: grid of the series (processing.series.Geometry), for grouping VFA series
    geometry: Any = None
    #: scanning sequence tokens and sequence name, for grouping VFA series
    sequence: tuple[str, ...] = ()
    #: Series Instance UIDs of the VFA acquisition this single-flip series belongs to (ordered by
    #: flip angle), when the flip angles were acquired as separate series
    vfa_group: tuple[str, ...] = ()


def _shells(b_values: np.ndarray) -> list[list[int]]:
    order = np.argsort(b_values, kind="stable")
    shells: list[list[int]] = []
    start = None
    for i in order:
        b = float(b_values[i])
        b_eff = 0.0 if b < B0_THRESHOLD else b
        if start is not None and b_eff - start <= max(
            SHELL_ABS_TOLERANCE, SHELL_REL_TOLERANCE * start
        ):
            shells[-1].append(int(i))
        else:
            shells.append([int(i)])
            start = b_eff
    return shells


def _count_directions(vectors: Sequence[tuple[float, float, float]]) -> int:
    unique: list[np.ndarray] = []
    for v in vectors:
        g = np.asarray(v, dtype=float)
        if not any(abs(float(np.dot(g, u))) >= COLLINEAR_COS for u in unique):
            unique.append(g)
    return len(unique)


def diffusion_inventory(volume: SeriesVolume) -> DiffusionInventory:
    """Shells, directions and supported models of a diffusion series.

    The thresholds are those of the module docstring.
    """
    b = volume.b_values
    valid = np.isfinite(b)
    idx = np.flatnonzero(valid)
    shells = _shells(b[idx])
    shell_info: list[tuple[float, int]] = []
    all_dirs: list[tuple[float, float, float]] = []
    n_iso = 0
    for members in shells:
        vols = [volume.volumes[int(idx[m])] for m in members]
        mean_b = float(np.mean([v.b_value for v in vols]))
        if mean_b < B0_THRESHOLD:
            shell_info.append((0.0, 0))
            continue
        dirs = [v.gradient for v in vols if v.gradient is not None]
        n_iso += sum(1 for v in vols if v.gradient is None)
        shell_info.append((round(mean_b, 1), _count_directions(dirs)))
        all_dirs.extend(dirs)
    bs = [s for s, _ in shell_info]
    has_b0 = any(s == 0.0 for s in bs)
    b_max = max(bs) if bs else 0.0
    nonzero_dir_shells = [n for s, n in shell_info if s > 0 and n >= DKI_MIN_SHELL_DIRECTIONS]
    n_dirs = _count_directions(all_dirs)
    return DiffusionInventory(
        shells=tuple(shell_info),
        n_volumes=int(valid.sum()),
        has_b0=has_b0,
        n_isotropic=n_iso,
        n_directions=n_dirs,
        adc=len(bs) >= 2 and b_max >= DIFFUSION_MIN_HIGH_B,
        ivim=len(bs) >= IVIM_MIN_SHELLS
        and sum(1 for s in bs if s <= IVIM_LOW_B) >= IVIM_MIN_LOW_SHELLS
        and b_max >= DIFFUSION_MIN_HIGH_B,
        kurtosis_apparent=len(bs) >= KURTOSIS_MIN_SHELLS
        and min(bs) <= KURTOSIS_MAX_LOW_B
        and b_max >= KURTOSIS_MIN_HIGH_B,
        dki_tensor=has_b0
        and len(nonzero_dir_shells) >= DKI_MIN_DIRECTIONAL_SHELLS
        and n_dirs >= DKI_MIN_DIRECTIONS
        and b_max >= KURTOSIS_MIN_HIGH_B,
    )


def _image_tokens(volume: SeriesVolume) -> set[str]:
    tokens = set(volume.physics.image_type)
    for v in volume.volumes:
        tokens.update(v.image_type)
    return tokens


def _rel_equal(values: Sequence[float], rel: float) -> bool:
    if not values:
        return True
    ref = values[0]
    return all(abs(v - ref) <= rel * max(abs(ref), 1e-9) for v in values)


def _anatomical_role(volume: SeriesVolume) -> tuple[SeriesRole, list[str]]:
    phys = volume.physics
    first = volume.volumes[0]
    tr, te, ti, fa = first.repetition_time, first.echo_time, first.inversion_time, first.flip_angle
    gradient_echo = "GR" in phys.scanning_sequence or phys.echo_pulse_sequence == "GRADIENT"
    facts = [
        f"TR={tr} ms",
        f"TE={te} ms",
        f"TI={ti} ms",
        f"flip={fa} deg",
        f"scanning sequence {'/'.join(phys.scanning_sequence) or '?'}",
    ]
    if phys.inversion_recovery and ti is not None and ti > 0:
        if 80.0 <= ti <= 300.0:
            return SeriesRole.STIR, facts + ["short-TI inversion recovery (fat nulled)"]
        if 300.0 < ti <= 1500.0:
            return SeriesRole.T1W, facts + ["inversion recovery with T1-weighting TI"]
        return SeriesRole.OTHER, facts + ["long-TI inversion recovery (FLAIR-type)"]
    if tr is None or te is None:
        contrast = phys.acquisition_contrast
        if contrast in ("T1", "T2"):
            return SeriesRole(contrast.lower() + "w"), facts + [f"Acquisition Contrast {contrast}"]
        return SeriesRole.OTHER, facts + ["TR/TE not recorded"]
    if gradient_echo and tr < 50.0:
        if te < 10.0 and (fa or 0.0) >= 5.0:
            return SeriesRole.T1W, facts + ["spoiled gradient echo, short TR/TE"]
        return SeriesRole.OTHER, facts + ["gradient echo without T1 weighting"]
    if tr <= 1000.0 and te <= 30.0:
        return SeriesRole.T1W, facts + ["short TR and TE"]
    if tr >= 1500.0 and te >= 60.0:
        return SeriesRole.T2W, facts + ["long TR and TE"]
    return SeriesRole.OTHER, facts + ["neither T1- nor T2-weighted timing (e.g. proton density)"]


def classify_volume(volume: SeriesVolume) -> SeriesClassification:
    """Role of an assembled image series, from its acquisition physics (never its description)."""
    tokens = _image_tokens(volume)
    b = volume.b_values
    has_diffusion = bool(np.any(np.isfinite(b)))
    flips = sorted({round(v.flip_angle, 2) for v in volume.volumes if v.flip_angle is not None})
    tr = volume.volumes[0].repetition_time
    base: dict[str, Any] = dict(
        series_instance_uid=volume.series_instance_uid,
        study_instance_uid=volume.study_instance_uid,
        frame_of_reference_uid=volume.frame_of_reference_uid,
        modality=volume.modality,
        n_volumes=volume.n_volumes,
        flip_angles=tuple(float(f) for f in flips),
        repetition_time=tr,
        contrast_agent=volume.physics.contrast_agent,
        geometry=volume.geometry,
        sequence=(
            *volume.physics.scanning_sequence,
            volume.physics.echo_pulse_sequence,
            volume.physics.sequence_name,
        ),
    )
    if "ADC" in tokens:
        return SeriesClassification(role=SeriesRole.ADC_MAP, reasons=("Image Type ADC",), **base)
    if has_diffusion and np.nanmax(b) >= B0_THRESHOLD:
        inventory = diffusion_inventory(volume)
        derived_trace = bool(tokens & {"TRACEW", "TRACE", "ISOTROPIC"}) or (
            "DERIVED" in tokens and inventory.n_directions == 0
        )
        if derived_trace and inventory.n_directions == 0:
            return SeriesClassification(
                role=SeriesRole.TRACE,
                diffusion=inventory,
                reasons=(f"scanner-combined trace images, b = {inventory.b_values} s/mm²",),
                **base,
            )
        return SeriesClassification(
            role=SeriesRole.DWI,
            diffusion=inventory,
            reasons=(f"diffusion-weighted, shells (b, directions) = {inventory.shells}",),
            **base,
        )
    if volume.n_volumes >= 2:
        times = [v.time for v in volume.volumes]
        trs = [v.repetition_time for v in volume.volumes if v.repetition_time is not None]
        known = cast("list[float]", times)  # only compared once all are known not None
        gradient_echo = (
            "GR" in volume.physics.scanning_sequence
            or volume.physics.echo_pulse_sequence == "GRADIENT"
        )
        if (
            len(flips) >= 2
            and len(flips) == volume.n_volumes
            and _rel_equal(trs, 0.02)
            and gradient_echo
        ):
            return SeriesClassification(
                role=SeriesRole.VFA_T1,
                reasons=(f"gradient echo at TR {tr} ms with flip angles {flips} deg",),
                **base,
            )
        if (
            volume.n_volumes >= 5
            and len(flips) <= 1
            and all(t is not None for t in times)
            and all(b > a for a, b in zip(known, known[1:]))
        ):
            dt = float(np.median(np.diff(np.asarray(times, dtype=float))))
            return SeriesClassification(
                role=SeriesRole.DCE,
                temporal_resolution=dt,
                reasons=(f"{volume.n_volumes} time points every {dt:.2f} s at flip {flips} deg",),
                **base,
            )
        return SeriesClassification(
            role=SeriesRole.OTHER,
            reasons=(f"{volume.n_volumes} volumes that are neither diffusion, VFA nor dynamic",),
            **base,
        )
    role, facts = _anatomical_role(volume)
    return SeriesClassification(role=role, reasons=tuple(facts), **base)


#: Manufacturer written by the node in its own outputs (``reporting.seg.MANUFACTURER``; processing
#: may not import reporting, tests/reporting/test_companion.py checks they agree).
NODE_MANUFACTURER = "Spine Response Node"
#: Manufacturer's Model Name of the node's outputs (``reporting.seg.MODEL_NAME``).
NODE_MODEL_NAME = "spine-node"
#: Derivation Code of the node's map companion series: (113091, DCM) "Spatially-related frames
#: extracted from the volume" (``reporting.companion.EXTRACTED_CODE``).
COMPANION_DERIVATION_CODE = ("113091", "DCM")


def companion_set_aside_reason(ds: Dataset) -> str | None:
    """Why ``ds`` is kept out of the analysis as one of the node's own map companion images.

    The node writes, for every source series of its Parametric Maps, a derived 3-D companion
    series the maps reference (``reporting.companion``, docs/conformance.md §2.1). When those
    images come back (priors from the PACS, routed studies), a single-volume derived series would
    otherwise be classified as an anatomical series. Recognised by Image Type DERIVED, the node's
    Manufacturer, and its Derivation Code (113091, DCM) or its Manufacturer's Model Name (either
    survives a PACS that drops one of them); never by Series Description.

    Returns
    -------
    str or None
        The reason, or None when ``ds`` is not a companion image.
    """
    if str(ds.get("Manufacturer", "") or "").strip() != NODE_MANUFACTURER:
        return None
    image_type = ds.get("ImageType")
    values = [str(v).upper() for v in image_type] if image_type else []
    if not values or values[0] != "DERIVED":
        return None
    derivation = {
        (str(item.get("CodeValue", "")), str(item.get("CodingSchemeDesignator", "")))
        for item in ds.get("DerivationCodeSequence", [])
    }
    model = str(ds.get("ManufacturerModelName", "") or "").strip()
    if COMPANION_DERIVATION_CODE not in derivation and model != NODE_MODEL_NAME:
        return None
    return (
        f"map companion image written by the {NODE_MANUFACTURER} (Image Type DERIVED, "
        "derivation 113091 DCM): a display reference of the node's Parametric Maps, "
        "not an acquisition"
    )


_RT_AND_SEG_ROLES = (SeriesRole.RTPLAN, SeriesRole.RTSTRUCT, SeriesRole.RTDOSE, SeriesRole.SEG)


def _non_image_role(ds: Dataset) -> SeriesRole | None:
    sop = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "")).upper()
    if sop == RT_PLAN_STORAGE or modality == "RTPLAN":
        return SeriesRole.RTPLAN
    if sop == RT_STRUCTURE_SET_STORAGE or modality == "RTSTRUCT":
        return SeriesRole.RTSTRUCT
    if sop == RT_DOSE_STORAGE or modality == "RTDOSE":
        return SeriesRole.RTDOSE
    if sop == SEGMENTATION_SOP_CLASS or modality == "SEG":
        return SeriesRole.SEG
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        return SeriesRole.OTHER
    return None


def classify_series(datasets: Sequence[Dataset]) -> SeriesClassification:
    """Role of one series given all its datasets.

    RT Plan / Structure Set / Dose and Segmentation objects are recognised by SOP Class (or
    Modality); image series are assembled with :func:`processing.series.read_series` and classified
    by :func:`classify_volume`.

    Raises
    ------
    processing.series.SeriesError, processing.diffusion_encoding.DiffusionEncodingError
        The image series cannot be assembled (missing slice, mixed geometry, unknown encoding).
    """
    if not datasets:
        raise SeriesError("no datasets given")
    first = datasets[0]
    role = _non_image_role(first)
    if role is not None:
        return SeriesClassification(
            series_instance_uid=str(first.get("SeriesInstanceUID", "")),
            study_instance_uid=str(first.get("StudyInstanceUID", "")),
            frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
            modality=str(first.get("Modality", "")),
            role=role,
            reasons=(
                f"SOP Class {first.get('SOPClassUID', '?')}, Modality {first.get('Modality', '?')}",
            ),
        )
    return classify_volume(read_series(datasets))


#: geometry agreement for VFA series acquired separately (mm for origin, relative for spacing,
#: cosine components for direction)
VFA_GROUP_ORIGIN_MM = 0.01
VFA_GROUP_DIRECTION = 1e-4
VFA_GROUP_TR_REL = 0.02


def _single_flip_gre(s: SeriesClassification) -> bool:
    """A one-volume spoiled gradient-echo series at one flip angle (a VFA group candidate)."""
    gradient_echo = "GR" in s.sequence or "GRADIENT" in s.sequence
    return (
        s.role in (SeriesRole.T1W, SeriesRole.OTHER)
        and s.error is None
        and s.diffusion is None
        and s.n_volumes == 1
        and len(s.flip_angles) == 1
        and s.repetition_time is not None
        and 0 < s.repetition_time < 50.0
        and gradient_echo
        and s.geometry is not None
    )


def _same_grid(a: Any, b: Any) -> bool:
    return (
        tuple(a.size) == tuple(b.size)
        and np.allclose(a.origin, b.origin, atol=VFA_GROUP_ORIGIN_MM, rtol=0)
        and np.allclose(a.spacing, b.spacing, rtol=1e-4, atol=1e-4)
        and np.allclose(a.direction, b.direction, atol=VFA_GROUP_DIRECTION, rtol=0)
    )


def group_vfa_series(
    series: Sequence[SeriesClassification],
) -> tuple[list[tuple[SeriesClassification, ...]], list[str]]:
    """VFA acquisitions written as one series per flip angle.

    One-volume spoiled gradient-echo series (TR < 50 ms, one flip angle) of one study are grouped
    when they share the frame of reference, the grid (origin within 0.01 mm, spacing, direction,
    size), the TR (within 2 %), the scanning sequence and sequence name and the contrast state
    (Contrast/Bolus Agent), and differ in flip angle. A group with at least two distinct flip
    angles is one VFA acquisition (three or more are preferred for precision).

    Parameters
    ----------
    series : sequence of SeriesClassification
        Classifications of one study.

    Returns
    -------
    groups : list of tuple of SeriesClassification
        Each VFA group, members ordered by flip angle (one series per flip; for a repeated flip
        the first series is kept).
    notes : list of str
        Why each remaining single-flip gradient-echo series is not a VFA acquisition.
    """
    clusters: list[list[SeriesClassification]] = []
    for s in (s for s in series if _single_flip_gre(s)):
        for cluster in clusters:
            ref = cluster[0]
            # Both passed _single_flip_gre, which requires a repetition time.
            assert ref.repetition_time is not None and s.repetition_time is not None
            if (
                ref.frame_of_reference_uid == s.frame_of_reference_uid
                and ref.sequence == s.sequence
                and ref.contrast_agent == s.contrast_agent
                and abs(ref.repetition_time - s.repetition_time)
                <= VFA_GROUP_TR_REL * ref.repetition_time
                and _same_grid(ref.geometry, s.geometry)
            ):
                cluster.append(s)
                break
        else:
            clusters.append([s])
    groups: list[tuple[SeriesClassification, ...]] = []
    notes: list[str] = []
    for cluster in clusters:
        by_flip: dict[float, SeriesClassification] = {}
        for s in cluster:
            by_flip.setdefault(s.flip_angles[0], s)
        if len(by_flip) >= 2:
            groups.append(tuple(by_flip[f] for f in sorted(by_flip)))
            continue
        for s in cluster:
            notes.append(
                f"series {s.series_instance_uid} not used for VFA T1: a single flip angle "
                f"({s.flip_angles[0]:g} deg at TR {s.repetition_time:g} ms) and no other series "
                "of the study with the same frame of reference, grid, TR and sequence at a "
                "different flip angle; T1 needs at least two flip angles"
            )
    return groups, notes


def _with_vfa_groups(
    series: tuple[SeriesClassification, ...],
) -> tuple[tuple[SeriesClassification, ...], list[str]]:
    """``series`` with the members of VFA groups re-roled ``vfa_t1``; notes on the rest."""
    groups, notes = group_vfa_series(series)
    if not groups:
        return series, notes
    member: dict[str, SeriesClassification] = {}
    for group in groups:
        uids = tuple(s.series_instance_uid for s in group)
        flips = [s.flip_angles[0] for s in group]
        for s in group:
            member[s.series_instance_uid] = replace(
                s,
                role=SeriesRole.VFA_T1,
                vfa_group=uids,
                reasons=s.reasons
                + (
                    (
                        f"one flip angle of a VFA acquisition written as "
                        f"{len(group)} series (flip angles {flips} deg at TR "
                        f"{group[0].repetition_time} ms, same grid and sequence)"
                    ),
                ),
            )
    return tuple(member.get(s.series_instance_uid, s) for s in series), notes


@dataclass(frozen=True)
class ProtocolInventory:
    """Which analyses one study allows, and with which series.

    Attributes
    ----------
    study_instance_uid : str
    series : tuple of SeriesClassification
        Every series of the study (unreadable ones with ``error`` set and role ``other``).
    adc, ivim, dki_tensor, kurtosis_apparent : tuple of str
        Series Instance UIDs usable for each diffusion model, best first (most volumes).
    dce : str or None
        The DCE series (most time points) if any.
    dce_quantitative : bool
        Pharmacokinetic modelling possible: a DCE series with ≥ 10 time points at ≤ 10 s
        resolution (timing only; the arterial input function is population-based).
    dce_t1_method : str or None
        ``"vfa"`` when a VFA T1 series shares the DCE frame of reference and TR (± 5 %),
        ``"fixed_t10"`` otherwise, None without DCE.
    vfa_t1 : str or None
        The VFA series used for T10 (the first series of a VFA written one series per flip).
    vfa_t1_series : tuple of str
        Every series of that VFA acquisition: one multi-flip series, or one series per flip angle
        ordered by flip.
    vfa_notes : tuple of str
        Why single-flip gradient-echo series were not used as VFA T1.
    anatomy_reference : str or None
        Anatomical series for registration and lesion delineation: T2w, else T1w, else STIR.
    adc_maps : tuple of str
        Scanner-derived ADC maps (for comparison only).
    """

    study_instance_uid: str
    series: tuple[SeriesClassification, ...]
    adc: tuple[str, ...] = ()
    ivim: tuple[str, ...] = ()
    dki_tensor: tuple[str, ...] = ()
    kurtosis_apparent: tuple[str, ...] = ()
    dce: str | None = None
    dce_quantitative: bool = False
    dce_t1_method: str | None = None
    vfa_t1: str | None = None
    anatomy_reference: str | None = None
    adc_maps: tuple[str, ...] = ()
    errors: tuple[tuple[str, str], ...] = field(default=())
    vfa_t1_series: tuple[str, ...] = ()
    vfa_notes: tuple[str, ...] = ()
    #: objects and derived volumes kept out of the analysis (processing.series.SetAside), each with
    #: its one-line reason: DICOMDIR, presentation states, vendor private objects, SR, Philips
    #: isotropic image, derived images inside an acquired series
    set_aside: tuple[Any, ...] = ()

    def by_role(self, role: SeriesRole | str) -> tuple[SeriesClassification, ...]:
        """Classifications of the series with ``role``."""
        role = SeriesRole(role)
        return tuple(s for s in self.series if s.role is role)

    @property
    def analyses(self) -> frozenset[str]:
        """Names of the possible analyses: ``adc``, ``ivim``, ``dki_tensor``, ``kurtosis_apparent``,
        ``dce_semi_quantitative``, ``dce_quantitative``, ``t1_vfa``, ``anatomy``."""
        out = {
            name
            for name in ("adc", "ivim", "dki_tensor", "kurtosis_apparent")
            if getattr(self, name)
        }
        if self.dce:
            out.add("dce_semi_quantitative")
        if self.dce_quantitative:
            out.add("dce_quantitative")
        if self.vfa_t1:
            out.add("t1_vfa")
        if self.anatomy_reference:
            out.add("anatomy")
        return frozenset(out)


def protocol_inventory(
    classifications: Iterable[SeriesClassification], *, study_instance_uid: str | None = None
) -> ProtocolInventory:
    """Build the :class:`ProtocolInventory` of one study from its series classifications."""
    series = tuple(classifications)
    uids = {s.study_instance_uid for s in series if s.study_instance_uid}
    if study_instance_uid is None:
        if len(uids) > 1:
            raise ValueError(f"classifications span {len(uids)} studies; give study_instance_uid")
        study_instance_uid = uids.pop() if uids else ""
    series = tuple(s for s in series if s.study_instance_uid in ("", study_instance_uid))
    series, vfa_notes = _with_vfa_groups(series)

    def ranked(pred: Callable[[DiffusionInventory], bool]) -> tuple[str, ...]:
        chosen = [s for s in series if s.diffusion is not None and pred(s.diffusion)]
        chosen.sort(key=lambda s: (s.role is not SeriesRole.DWI, -s.n_volumes))
        return tuple(s.series_instance_uid for s in chosen)

    dces = sorted((s for s in series if s.role is SeriesRole.DCE), key=lambda s: -s.n_volumes)
    dce = dces[0] if dces else None
    vfa = None
    method = None
    quantitative = False
    # VFA candidates, one per acquisition (a group counts once), most flip angles first
    vfa_candidates: list[SeriesClassification] = []
    seen_groups: set[tuple[str, ...]] = set()
    for s in series:
        if s.role is SeriesRole.VFA_T1 and s.vfa_group not in seen_groups:
            vfa_candidates.append(s)
            if s.vfa_group:
                seen_groups.add(s.vfa_group)
    vfa_candidates.sort(key=lambda s: -(len(s.vfa_group) or len(s.flip_angles)))
    if dce is not None:
        quantitative = dce.n_volumes >= 10 and (dce.temporal_resolution or 1e9) <= 10.0
        for cand in vfa_candidates:
            same_for = cand.frame_of_reference_uid == dce.frame_of_reference_uid
            same_tr = (
                cand.repetition_time is not None
                and dce.repetition_time is not None
                and abs(cand.repetition_time - dce.repetition_time) <= 0.05 * dce.repetition_time
            )
            if same_for and same_tr:
                vfa = cand
                break
        method = "vfa" if vfa is not None else "fixed_t10"
    elif vfa_candidates:
        vfa = vfa_candidates[0]
    anatomy = None
    for role in (SeriesRole.T2W, SeriesRole.T1W, SeriesRole.STIR):
        found = [s for s in series if s.role is role]
        if found:
            anatomy = found[0].series_instance_uid
            break
    # the VFA acquisition: its series (one per flip angle, or one series holding them all)
    vfa_series = () if vfa is None else (vfa.vfa_group or (vfa.series_instance_uid,))
    return ProtocolInventory(
        study_instance_uid=study_instance_uid,
        series=series,
        adc=ranked(lambda d: d.adc),
        ivim=ranked(lambda d: d.ivim),
        dki_tensor=ranked(lambda d: d.dki_tensor),
        kurtosis_apparent=ranked(lambda d: d.kurtosis_apparent),
        dce=None if dce is None else dce.series_instance_uid,
        dce_quantitative=quantitative,
        dce_t1_method=method,
        vfa_t1=vfa_series[0] if vfa_series else None,
        anatomy_reference=anatomy,
        adc_maps=tuple(s.series_instance_uid for s in series if s.role is SeriesRole.ADC_MAP),
        errors=tuple((s.series_instance_uid, s.error) for s in series if s.error),
        vfa_t1_series=vfa_series,
        vfa_notes=tuple(vfa_notes),
    )


def classify_study(
    datasets: Iterable[Dataset], *, volumes: dict[str, SeriesVolume] | None = None
) -> ProtocolInventory:
    """Classify every series of one study and build its protocol inventory.

    Parameters
    ----------
    datasets : iterable of Dataset
        Every object of one study (MR images, RT objects, SEG...).
    volumes : dict, optional
        If given, filled with the :class:`~processing.series.SeriesVolume` of every image series
        that was assembled, keyed by Series Instance UID, so that callers need not assemble them
        twice.

    Notes
    -----
    A series that cannot be read is kept with role ``other`` and its error message (logged with the
    Series Instance UID) so that the rest of the study can still be analysed; nothing is silently
    dropped. Objects that are not images to analyse (DICOMDIR, presentation states, key objects,
    SR, RWVM, vendor private objects, anything without pixel data other than RT objects), the
    node's own map companion images (:func:`companion_set_aside_reason`) and derived volumes found
    inside an acquired series are listed in ``ProtocolInventory.set_aside``.
    """
    kept: list[Dataset] = []
    aside: list[Any] = []
    for ds in datasets:
        if _non_image_role(ds) in _RT_AND_SEG_ROLES:
            kept.append(ds)
        elif (reason := companion_set_aside_reason(ds)) is not None:
            aside.append(set_aside_entry(ds, reason))
        else:
            images, rest = split_set_aside([ds], keep_segmentations=True)
            kept.extend(images)
            aside.extend(rest)
    datasets = kept
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in datasets}
    if len(studies) != 1:
        raise ValueError(f"datasets span {len(studies)} studies; classify one study at a time")
    study = studies.pop()
    results = []
    for uid, members in group_by_series(datasets, set_aside=aside).items():
        try:
            if _non_image_role(members[0]) is not None:
                results.append(classify_series(members))
                continue
            volume = read_series(members)
        except (SeriesError, DiffusionEncodingError) as err:
            logger.warning("series %s cannot be assembled: %s", uid, err)
            first = members[0]
            results.append(
                SeriesClassification(
                    series_instance_uid=uid,
                    study_instance_uid=study,
                    frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
                    modality=str(first.get("Modality", "")),
                    role=SeriesRole.OTHER,
                    reasons=("unreadable series",),
                    n_volumes=0,
                    error=str(err),
                )
            )
            continue
        if volumes is not None:
            volumes[uid] = volume
        aside.extend(volume.excluded)
        results.append(classify_volume(volume))
    for entry in aside:
        logger.info(
            "set aside %s: %s", entry.sop_instance_uid or entry.file_name or "object", entry.reason
        )
    return replace(protocol_inventory(results, study_instance_uid=study), set_aside=tuple(aside))
