"""DICOM Parametric Map of one quantitative map (PS3.3 A.75), built with highdicom.

One Parametric Map per quantity (ADC, MD, MK, Kapp, Dapp, IVIM D/f/D*, Ktrans, ve, vp, kep, T1,
IAUC60, TTP) on the source grid, referencing the source series (Derivation Image / Source Image
Sequences written by highdicom).

Encoding (docs/conformance.md §2)
---------------------------------
* Pixels are 32-bit floats (Float Pixel Data) in the *output* unit of the quantity
  (:data:`reporting.codes.QUANTITIES`): diffusivities in um2/s (internal mm²/s × 10⁶), T1 in ms
  (internal s × 10³), Ktrans/kep in /min, ve/vp as ``{ratio}``, IVIM f as ``{0:1}``.
* Real World Value Mapping: identity (slope 1, intercept 0) with the UCUM unit, the quantity code in
  the Quantity Definition Sequence (246205007, SCT, "Quantity") and the model as
  (370129005, SCT, "Measurement Method"). The b-values used go into the Content Description, not
  into (113240, DCM) NUM items as dcmqi writes them: dciodvfy rejects value type NUM there
  (PS3.3 C.7.6.16.2.11.1.1 allows CODE/TEXT/... only).
* Frame Anatomy functional group (shared): the vertebra (or the spine), laterality ``U`` — dcmqi's
  ``paramap2itkimage`` refuses maps without it.
* Non-finite values (voxels where the fit failed or was rejected) are written as 0; the LUT
  Explanation says so.
* VOI window (LINEAR_EXACT): the quantity's display range (:data:`DISPLAY_RANGES`, e.g. ADC
  0-3000 um2/s, Ktrans 0-0.5 /min, fractions 0-1), else the data range.
* Sources: the node builds every map on the derived 3-D companion series of its source series
  (:mod:`reporting.companion`), one image per map frame, so viewers that need a 3-D referenced
  series (OHIF/cornerstone3D) can load the maps; any source series the alignment rules below
  accept can still be given.
* Frame alignment with the sources, the orientation tolerance (oblique GE series) and maps on an
  explicit grid (de-tiled mosaics): see :mod:`reporting.seg`.
* Stored frame order: ascending along the slice normal (row direction × column direction).
  highdicom sorts planes the other way round; dcmqi's ``paramap2itkimage`` (1.3) fills its volume
  in stored frame order but takes the origin from the lowest position along the normal, so it
  would flip such maps (3D Slicer reads Parametric Maps through dcmqi). The frames, their
  per-frame functional groups and Dimension Index Values are therefore re-ordered after
  highdicom built the object; positions and references travel with their frames.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from processing.series import Geometry
from reporting import codes as rcodes
from reporting.seg import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    MODEL_NAME,
    check_frame_shape,
    source_geometry,
)
from reporting.uids import deterministic_uid, digest_arrays, digest_text, digest_uids

logger = logging.getLogger(__name__)

PM_SERIES_NUMBER_BASE = 9100

_QUANTITY_ORDER = list(rcodes.QUANTITIES)

#: Display window (lowest, highest value shown) per quantity, in the stored (output) unit of
#: :data:`reporting.codes.QUANTITIES`: the range a reader expects for spine marrow and tumour, so
#: that maps of different patients and time points look alike in a viewer. Quantities not listed
#: (TTP: depends on the acquisition length) are windowed on their data range.
DISPLAY_RANGES: dict[str, tuple[float, float]] = {
    "ADC": (0.0, 3000.0),  # um2/s (free water at body temperature ~3000)
    "MD": (0.0, 3000.0),
    "Dapp": (0.0, 3000.0),
    "IVIM_D": (0.0, 3000.0),
    "IVIM_Dstar": (0.0, 100000.0),  # um2/s (pseudo-diffusion 10-100 x 10^-3 mm2/s)
    "MK": (0.0, 2.0),
    "Kapp": (0.0, 2.0),
    "AK": (0.0, 2.0),
    "RK": (0.0, 2.0),
    "FA": (0.0, 1.0),
    "IVIM_f": (0.0, 1.0),
    "Ktrans": (0.0, 0.5),  # /min
    "kep": (0.0, 2.0),  # /min
    "ve": (0.0, 1.0),
    "vp": (0.0, 0.2),  # plasma fraction: tumour values are a few percent
    "T1": (0.0, 3000.0),  # ms (marrow 500-1000, lesions 1000-2000 at 1.5-3 T)
    "IAUC60": (0.0, 30.0),  # mmol/l.s
}


def display_range(quantity: str, low: float, high: float) -> tuple[float, float]:
    """Window (lowest, highest value shown) of a map: :data:`DISPLAY_RANGES`, else the data range.

    Parameters
    ----------
    quantity : str
        Node quantity name.
    low, high : float
        Range of the stored values (output unit); used when the quantity has no display range.

    Returns
    -------
    tuple of float
        ``(lowest, highest)`` with ``highest > lowest`` (a valid, non-empty VOI window).
    """
    window = DISPLAY_RANGES.get(quantity)
    if window is None:
        window = (float(low), float(high))
    if not window[1] > window[0]:
        window = (window[0], window[0] + 1.0)
    return window


def _quantity_definitions(spec: rcodes.QuantitySpec) -> list[Dataset]:
    items: list[Dataset] = [
        hd.sr.CodeContentItem(name=codes.SCT.Quantity, value=spec.quantity, relationship_type=None),
    ]
    if spec.method is not None:
        items.append(
            hd.sr.CodeContentItem(
                name=codes.SCT.MeasurementMethod, value=spec.method, relationship_type=None
            )
        )
    return items


def build_parametric_map(
    source_images: Sequence[Dataset],
    values: np.ndarray,
    quantity: str,
    *,
    provenance: Mapping[str, Any],
    algorithm_version: str,
    source_frames: Sequence[int] | None = None,
    vertebral_level: str | None = None,
    input_digest: str | None = None,
    series_number: int | None = None,
    grid: Geometry | None = None,
) -> hd.pm.ParametricMap:
    """Build the Parametric Map of one quantity on the grid of its source images.

    Parameters
    ----------
    source_images : Sequence[pydicom.Dataset]
        The series the map was computed from (classic MR series, or one Enhanced MR image).
    values : numpy.ndarray
        Map ``(n, rows, columns)`` in the node's internal unit of ``quantity``
        (docs/architecture.md, Conventions: ADC/MD in mm²/s, Ktrans/kep in /min, ve/vp/f as
        fractions, T1 in s, IAUC60 in mmol/L·s, TTP in s), aligned with the source frames
        (see :mod:`reporting.seg`).
    quantity : str
        Quantity name (``reporting.codes.QUANTITIES``).
    provenance : Mapping[str, Any]
        How the map was made. Recognised keys: ``model`` (DCE: ``tofts``/``extended_tofts``),
        ``b_values`` (s/mm², diffusion maps), written in the Content Description; every item
        enters the input digest of the UIDs.
    algorithm_version : str
        Software version written in the object and part of the UIDs.
    source_frames : Sequence[int], optional
        1-based frame numbers of a multi-frame source that ``values`` frames align with (e.g. the
        b = 0 frames of an Enhanced MR DWI).
    vertebral_level : str, optional
        Treated level for the Frame Anatomy (default: Spine).
    input_digest : str, optional
        Input digest for the deterministic UIDs; default: source UIDs, values, quantity and
        provenance.
    series_number : int, optional
        Default 9100 + position of the quantity in ``QUANTITIES``.
    grid : processing.series.Geometry, optional
        The map's own grid (``values`` is ``(size_z, size_y, size_x)`` on it). Required when no
        source frame has the map's geometry (Siemens mosaic, United Imaging tiled images): plane
        positions, orientation and spacing are then written from the grid and the sources are only
        referenced (see :mod:`reporting.seg`). Not with ``source_frames``.

    Returns
    -------
    highdicom.pm.ParametricMap

    References
    ----------
    PS3.3 A.75 Parametric Map IOD; C.7.6.16.2.11 Real World Value Mapping; CID 7180, 7263, 7272,
    7273, 4101, 4107, 4109.
    """
    if not algorithm_version:
        raise ValueError("algorithm_version must be given")
    spec = rcodes.quantity_spec(quantity, model=provenance.get("model"))
    values = np.asarray(values)
    if values.ndim != 3:
        raise ValueError(f"values must be 3-D (frames, rows, columns), got {values.shape}")
    if not np.issubdtype(values.dtype, np.floating):
        raise ValueError(f"values must be floating point, got {values.dtype}")
    check_frame_shape(values.shape, source_images, grid, "values")
    src = source_images[0] if source_images else None
    geometry = source_geometry(source_images, values.shape[0], source_frames, grid)
    assert src is not None

    finite = np.isfinite(values)
    if not finite.any():
        raise ValueError(f"{quantity} map has no finite value")
    stored = np.where(finite, values.astype(np.float64) * spec.scale, 0.0).astype(np.float32)
    n_invalid = int((~finite).sum())
    low, high = float(stored.min()), float(stored.max())
    if low == high:
        high = low + 1.0  # a constant map still needs a non-empty mapped range
    b_values = provenance.get("b_values") if spec.image_flavor == "DIFFUSION" else None
    model_text = spec.method.meaning if spec.method is not None else "model-independent"
    explanation = f"{quantity} ({model_text}); failed fits = 0"
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=quantity[:16],
        lut_explanation=explanation[:64],
        unit=rcodes.UNITS[spec.unit],
        value_range=(low, high),
        slope=1.0,
        intercept=0.0,
    )
    # highdicom accepts a single quantity concept; the definition with the method is set on
    # the mapping item directly.
    # highdicom annotates the attribute as a list; a pydicom Sequence is what it stores itself
    mapping.QuantityDefinitionSequence = DicomSequence(  # type: ignore[assignment]
        _quantity_definitions(spec)
    )

    settings = repr(sorted((str(k), repr(v)) for k, v in provenance.items()))
    if input_digest is None:
        input_digest = digest_text(
            digest_uids(source_images),
            digest_arrays(values),
            quantity,
            settings,
            repr(list(source_frames or [])),
            *([repr(grid)] if grid is not None else []),
        )
    uid_args: dict[str, Any] = dict(
        source_study_uid=str(src.StudyInstanceUID),
        tracking_uid=None,
        algorithm_version=algorithm_version,
        input_digest=input_digest,
    )
    series_uid = deterministic_uid(kind=f"pm/{quantity}/series", **uid_args)
    instance_uid = deterministic_uid(kind=f"pm/{quantity}/instance", **uid_args)
    if series_number is None:
        series_number = PM_SERIES_NUMBER_BASE + _QUANTITY_ORDER.index(spec.name)
    window_low, window_high = display_range(spec.name, low, high)
    # LINEAR_EXACT: fractions (f, ve, vp) need window widths below 1 (PS3.3 C.11.2.1.3)
    voi = hd.VOILUTTransformation(
        window_center=(window_low + window_high) / 2.0,
        window_width=window_high - window_low,
        voi_lut_function="LINEAR_EXACT",
    )
    description = f"{quantity} map, {model_text}"
    if b_values:
        description += ", b " + "/".join(f"{float(b):g}" for b in b_values) + " s/mm2"
    pmap = hd.pm.ParametricMap(
        source_images=geometry.sources,
        pixel_array=stored,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=algorithm_version,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[voi],
        content_label=quantity.upper()[:16],
        content_description=description[:64],
        image_flavor=spec.image_flavor,
        pixel_measures=geometry.pixel_measures,
        plane_orientation=geometry.plane_orientation,
        plane_positions=geometry.plane_positions,
    )
    if _order_frames_along_normal(pmap):
        # rebuild highdicom's frame look-up from the re-ordered dataset
        pmap = hd.pm.ParametricMap.from_dataset(pmap, copy=False)
    anatomy = Dataset()
    region = rcodes.vertebra_code(vertebral_level) if vertebral_level else rcodes.SPINE
    anatomy.AnatomicRegionSequence = DicomSequence([region])
    anatomy.FrameLaterality = "U"
    pmap.SharedFunctionalGroupsSequence[0].FrameAnatomySequence = DicomSequence([anatomy])
    pmap.SeriesDescription = f"{quantity} map ({rcodes.UNITS[spec.unit].meaning})"[:64]
    logger.info(
        "built Parametric Map %s (%s, %d non-finite voxels) from series %s",
        instance_uid,
        quantity,
        n_invalid,
        src.SeriesInstanceUID,
    )
    return pmap


def _order_frames_along_normal(pmap: hd.pm.ParametricMap) -> bool:
    """Re-order frames ascending along row x column direction (see module notes).

    Returns True when the frames were re-ordered.
    """
    n_frames = int(pmap.NumberOfFrames)
    if n_frames < 2:
        return False
    iop = np.asarray(
        pmap.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient,
        dtype=float,
    )
    normal = np.cross(iop[:3], iop[3:])
    items = list(pmap.PerFrameFunctionalGroupsSequence)
    distances = [
        float(
            np.dot(
                normal, np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
            )
        )
        for item in items
    ]
    order = np.argsort(distances, kind="stable")
    if np.array_equal(order, np.arange(n_frames)):
        return False
    if len(pmap.DimensionIndexSequence) != 1:
        raise ValueError("cannot re-order a Parametric Map with several dimensions")
    frames = np.frombuffer(pmap.FloatPixelData, dtype="<f4").reshape(
        n_frames, int(pmap.Rows), int(pmap.Columns)
    )
    pmap.FloatPixelData = np.ascontiguousarray(frames[order]).tobytes()
    # highdicom annotates the attribute as a list; a pydicom Sequence is what it stores itself
    pmap.PerFrameFunctionalGroupsSequence = DicomSequence(  # type: ignore[assignment]
        [items[i] for i in order]
    )
    for index, item in enumerate(pmap.PerFrameFunctionalGroupsSequence, start=1):
        item.FrameContentSequence[0].DimensionIndexValues = index
    return True


def map_quantity(pmap: Dataset) -> str:
    """Node quantity name of a Parametric Map (read from its Real World Value Mapping)."""
    groups = pmap.get("SharedFunctionalGroupsSequence")
    item = None
    if groups is not None and "RealWorldValueMappingSequence" in groups[0]:
        item = groups[0].RealWorldValueMappingSequence[0]
    else:
        item = pmap.PerFrameFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    for definition in item.get("QuantityDefinitionSequence", []):
        if definition.ConceptNameCodeSequence[0].CodeValue == "246205007":
            return rcodes.quantity_from_code(
                CodedConcept.from_dataset(definition.ConceptCodeSequence[0])
            )
    raise ValueError(f"Parametric Map {pmap.SOPInstanceUID} has no Quantity definition")
