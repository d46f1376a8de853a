"""DICOM Segmentation of a treated lesion (PS3.3 A.51), built with highdicom.

One binary segment per SEG: the lesion at one time point (the GTV on the baseline grid, the refined
lesion on the follow-up grid), with the persistent Tracking ID/UID of the lesion so every SEG of the
same lesion carries the same Tracking UID across time points (docs/conformance.md §3).

A SEG written by someone else (a radiologist's correction, dcmqi, 3D Slicer...) is read with
:func:`read_segmentation`: segments, per-frame geometry and source references from the SEG alone,
and the mask on a given grid through the source references or by the SEG's own geometry.

Frame alignment (shared with :mod:`reporting.pmap`)
---------------------------------------------------
``mask``/``values`` have shape ``(n, rows, columns)`` and are aligned with the source frames:

* classic single-frame sources: ``array[i]`` is the frame of ``source_images[i]`` in the order
  given (sort the series before calling if you need spatial order);
* one multi-frame source (Enhanced MR): ``array[i]`` is source frame ``source_frames[i]``
  (1-based Frame Number); without ``source_frames`` the array must have one frame per source frame
  (``n == NumberOfFrames``) and ``array[i]`` is frame ``i + 1``.

For multi-frame sources the plane position, orientation and pixel spacing of each selected frame
are read from its Per-Frame Functional Group when present, else from the Shared Functional Group
(Siemens XA and the phantom's ``enhanced`` variant write them per frame; Canon shares orientation
and spacing). They are handed to highdicom explicitly. highdicom 0.28 still insists on a *shared*
Plane Orientation and Pixel Measures in a multi-frame source, so it is given a shallow copy of the
source whose Shared Functional Group also holds the (checked identical) values of the selected
frames (a copy also because highdicom writes into the source's shared Pixel Measures). The caller's
datasets are never modified, and what is referenced (SOP Instance UID, frame
numbers of every source frame at each position) is exactly the source.

Orientation tolerance
---------------------
Scanners write the direction cosines of an oblique stack with rounding noise (GE: per-slice
Image Orientation (Patient) differing in the 8th digit). Source frames whose direction cosines
differ from the first selected frame's by at most :data:`ORIENTATION_TOLERANCE` (each component)
are one stack: the derived object is written with the first frame's orientation, and highdicom is
handed header views of the sources that carry it. Beyond the tolerance a
:class:`SourceGeometryError` names the measured difference.

Explicit grid (mosaic and tiled sources)
----------------------------------------
A Siemens mosaic or a United Imaging tiled image holds a whole volume in one stored frame: the
de-tiled grid of the map exists in no source frame. With ``grid`` (a
:class:`processing.series.Geometry`) the plane positions, orientation and pixel spacing of the
derived object are computed from that grid (``array[k]`` is slice ``k`` of the grid, positions
``origin + k * spacing_z * normal``) and the source images are only referenced.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from highdicom.content import (
    PixelMeasuresSequence,
    PlaneOrientationSequence,
    PlanePositionSequence,
)
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from processing.errors import InputError
from processing.results import Lesion
from processing.series import ORIENTATION_TOLERANCE as _READER_ORIENTATION_TOLERANCE
from processing.series import SEGMENTATION_SOP_CLASS, Geometry, SeriesVolume, SourceFrame
from reporting import codes as rcodes
from reporting.uids import deterministic_uid, digest_arrays, digest_text, digest_uids

logger = logging.getLogger(__name__)

MANUFACTURER = "Spine Response Node"
MODEL_NAME = "spine-node"
DEVICE_SERIAL_NUMBER = "1"
SEG_SERIES_NUMBER = 9001
ALGORITHM_NAME = "spine-node lesion segmentation"

#: Largest difference of any direction cosine (Image Orientation (Patient) component) between two
#: source frames that still counts as one orientation; equal to the tolerance with which
#: :func:`processing.series.read_series` assembles a stack, so every series it reads can be
#: referenced. 1e-4 is an angle of about 0.006 degrees: 0.03 mm over a 300 mm field of view.
ORIENTATION_TOLERANCE: float = _READER_ORIENTATION_TOLERANCE


class SourceGeometryError(InputError):
    """The source images (or the grid given) cannot carry one geometry for a derived object."""


@dataclass(frozen=True)
class FrameGeometry:
    """Geometry handed to highdicom for a multi-frame source (None for single-frame sources).

    ``sources`` are the datasets to hand to highdicom (see module notes).
    """

    sources: list[Dataset]
    pixel_measures: PixelMeasuresSequence | None
    plane_orientation: PlaneOrientationSequence | None
    plane_positions: list[PlanePositionSequence] | None


def _with_shared_geometry(src: Dataset, orientation: Dataset, measures: Dataset) -> Dataset:
    """Shallow copy of ``src`` whose (deep-copied) shared group holds orientation and spacing.

    Always a copy: highdicom 0.28 writes Spacing Between Slices into the source's shared Pixel
    Measures item while building.
    """
    view = _header_view(src)
    new_shared = copy.deepcopy(src.SharedFunctionalGroupsSequence[0])
    new_shared.PlaneOrientationSequence = DicomSequence([copy.deepcopy(orientation)])
    new_shared.PixelMeasuresSequence = DicomSequence([copy.deepcopy(measures)])
    # delete first: assigning to an existing keyword would set the value of the element object
    # that ``view`` shares with ``src``
    del view.SharedFunctionalGroupsSequence
    view.SharedFunctionalGroupsSequence = DicomSequence([new_shared])
    return view


_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_AS = re.compile(r"^\d{3}[DWMY]$")


def _invalid_patient_study_attributes(ds: Dataset) -> dict[str, str | None]:
    """Attributes copied into derived objects whose source values are invalid -> replacement.

    ``None`` means remove (type 3), ``""`` means present but empty (type 2).
    """
    fixes: dict[str, str | None] = {}
    sex = ds.get("PatientSex")
    if sex is not None and str(sex) not in ("M", "F", "O", ""):
        fixes["PatientSex"] = ""
    for keyword, pattern, replacement in (
        ("PatientBirthDate", _DA, ""),
        ("StudyDate", _DA, ""),
        ("StudyTime", _TM, ""),
        ("PatientAge", _AS, None),
    ):
        value = ds.get(keyword)
        if value not in (None, "") and not pattern.match(str(value).strip()):
            fixes[keyword] = replacement
    return fixes


def sanitized_source(ds: Dataset, *, log: bool = True) -> Dataset:
    """``ds``, or a header view of it with invalid patient/study attribute values neutralised.

    highdicom copies the Patient and General Study attributes of the source into the derived
    object and refuses e.g. a Patient's Sex of ``"X"``; an invalid Patient's Age would make the
    derived object fail validation (dcmqi issue 453). Such values are emptied (type 2) or dropped
    (type 3) in a view that shares every other element with ``ds``; ``ds`` is not modified and the
    offending values are not logged (they may identify the patient).
    """
    fixes = _invalid_patient_study_attributes(ds)
    if not fixes:
        return ds
    view = _header_view(ds)
    for keyword, replacement in fixes.items():
        del view[keyword]
        if replacement is not None:
            setattr(view, keyword, replacement)
    if log:
        logger.warning(
            "source %s: invalid %s not copied into the derived object",
            ds.get("SOPInstanceUID"),
            ", ".join(sorted(fixes)),
        )
    return view


def _header_view(ds: Dataset) -> Dataset:
    """New dataset holding the same element objects (copy.copy of a pydicom Dataset shares the
    element dict, so replacing an element there would alter ``ds``)."""
    view = Dataset()
    for element in ds:
        view.add(element)
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta
    return view


def _frame_group(ds: Dataset, index: int, keyword: str) -> Dataset:
    """Functional group item ``keyword`` of frame ``index`` (0-based): per-frame, else shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and keyword in per_frame[index]:
        item: Dataset = per_frame[index][keyword][0]
        return item
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared is not None and keyword in shared[0]:
        shared_item: Dataset = shared[0][keyword][0]
        return shared_item
    raise ValueError(
        f"source {ds.SOPInstanceUID} frame {index + 1} has no {keyword} in its functional groups"
    )


def validate_sources(source_images: Sequence[Dataset]) -> None:
    """Check the sources are one series of one study with a frame of reference.

    Raises
    ------
    ValueError
        On an empty list, several multi-frame images, or mixed series/studies.
    """
    if not source_images:
        raise ValueError("source_images is empty")
    multiframe = [ds for ds in source_images if int(ds.get("NumberOfFrames", 1) or 1) > 1]
    if multiframe and len(source_images) > 1:
        raise ValueError("source_images must be one multi-frame image or single-frame images")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        values = {str(ds.get(keyword, "")) for ds in source_images}
        if len(values) != 1 or "" in values:
            raise ValueError(f"source_images must share one non-empty {keyword}; got {values}")


def _orientation_deviation(
    reference: Sequence[float] | np.ndarray, other: Sequence[float] | np.ndarray
) -> float:
    """Largest absolute difference between two sets of six direction cosines."""
    return float(
        np.max(np.abs(np.asarray(other, dtype=float) - np.asarray(reference, dtype=float)))
    )


def _check_orientation(
    reference: Sequence[float] | np.ndarray, other: Sequence[float] | np.ndarray, what: str
) -> float:
    """Deviation of ``other`` from ``reference``; :class:`SourceGeometryError` beyond tolerance."""
    deviation = _orientation_deviation(reference, other)
    if deviation > ORIENTATION_TOLERANCE:
        raise SourceGeometryError(
            f"{what} differs in Image Orientation (Patient) by {deviation:.3g} in a direction "
            f"cosine, more than the tolerance of {ORIENTATION_TOLERANCE:g}: the frames are not "
            "one stack"
        )
    return deviation


def _classic_views(source_images: Sequence[Dataset], grid: Geometry | None = None) -> list[Dataset]:
    """Sanitised views of single-frame sources sharing the first image's orientation.

    With ``grid`` (explicit geometry), a tiled image without Image Position (Patient) (United
    Imaging writes it per tile in a private sequence only) gets the grid's origin in its view, and
    one without orientation the grid's: highdicom needs them to build the object, but the written
    geometry comes from the grid.

    Raises
    ------
    SourceGeometryError
        An image without orientation or position (and no grid), or one whose orientation
        differs beyond the tolerance.
    """
    src = source_images[0]
    views = [sanitized_source(ds, log=False) for ds in source_images]
    changed = sum(view is not ds for view, ds in zip(views, source_images))
    if changed:
        logger.warning(
            "series %s: invalid patient/study attributes in %d source images not "
            "copied into the derived object",
            src.SeriesInstanceUID,
            changed,
        )
    if grid is not None:
        direction = grid.direction_matrix
        filled = {
            "ImagePositionPatient": [float(v) for v in grid.origin],
            "ImageOrientationPatient": [float(v) for v in (*direction[:, 0], *direction[:, 1])],
        }
        for n, (view, ds) in enumerate(zip(views, source_images)):
            missing = [keyword for keyword in filled if keyword not in ds]
            if missing:
                view = _header_view(ds) if view is ds else view
                for keyword in missing:
                    setattr(view, keyword, filled[keyword])
                views[n] = view
    for ds in views:
        if "ImageOrientationPatient" not in ds or "ImagePositionPatient" not in ds:
            raise SourceGeometryError(
                f"source {ds.get('SOPInstanceUID')} has no Image Orientation/Position (Patient)"
            )
    reference = [float(v) for v in views[0].ImageOrientationPatient]
    deviations = [
        _check_orientation(
            reference, [float(v) for v in ds.ImageOrientationPatient], f"source {ds.SOPInstanceUID}"
        )
        for ds in views
    ]
    if max(deviations) > 0.0:
        shared = copy.deepcopy(views[0].ImageOrientationPatient)
        out = []
        for view, ds in zip(views, source_images):
            if view is ds:
                view = _header_view(ds)
            del view.ImageOrientationPatient  # the element object may be shared with ds
            view.ImageOrientationPatient = copy.deepcopy(shared)
            out.append(view)
        views = out
        logger.info(
            "series %s: source orientations differ by up to %.3g (tolerance %g); the "
            "derived object uses the orientation of the first source image",
            src.SeriesInstanceUID,
            max(deviations),
            ORIENTATION_TOLERANCE,
        )
    return views


def _grid_geometry(
    source_images: Sequence[Dataset], n_frames: int, grid: Geometry
) -> FrameGeometry:
    """Geometry of ``n_frames`` slices of an explicit grid, referencing ``source_images``."""
    size = tuple(int(v) for v in grid.size)
    if n_frames != size[2]:
        raise SourceGeometryError(f"array has {n_frames} frames but the grid has {size[2]} slices")
    direction = grid.direction_matrix
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise SourceGeometryError(f"grid direction {grid.direction} is not orthonormal")
    if np.dot(np.cross(direction[:, 0], direction[:, 1]), direction[:, 2]) < 0:
        raise SourceGeometryError("grid slice axis points against row x column direction")
    src = source_images[0]
    n_src = int(src.get("NumberOfFrames", 1) or 1)
    if len(source_images) > 1 or n_src == 1:
        views = _classic_views(source_images, grid)
        thickness = src.get("SliceThickness")
    else:
        orientation_item = _frame_group(src, 0, "PlaneOrientationSequence")
        measures = _frame_group(src, 0, "PixelMeasuresSequence")
        views = [_with_shared_geometry(sanitized_source(src), orientation_item, measures)]
        thickness = measures.get("SliceThickness")
    spacing = [float(v) for v in grid.spacing]
    positions = [
        PlanePositionSequence(
            hd.CoordinateSystemNames.PATIENT, [float(v) for v in grid.index_to_lps((0.0, 0.0, k))]
        )
        for k in range(n_frames)
    ]
    thickness = float(thickness) if thickness not in (None, "") else spacing[2]
    return FrameGeometry(
        sources=views,
        # PixelSpacing is (between rows, between columns) = (y, x)
        pixel_measures=PixelMeasuresSequence(
            pixel_spacing=(spacing[1], spacing[0]),
            slice_thickness=thickness,
            spacing_between_slices=spacing[2],
        ),
        plane_orientation=PlaneOrientationSequence(
            hd.CoordinateSystemNames.PATIENT,
            [float(v) for v in (*direction[:, 0], *direction[:, 1])],
        ),
        plane_positions=positions,
    )


def source_alignment(
    volume: SeriesVolume, datasets_by_uid: Mapping[str, Dataset], volume_index: int = 0
) -> tuple[list[Dataset], list[int] | None, Geometry | None]:
    """The sources of a derived object on one volume of a series, as the builders take them.

    Parameters
    ----------
    volume : processing.series.SeriesVolume
        The assembled series the map or mask was computed on.
    datasets_by_uid : mapping
        The series' datasets by SOP Instance UID.
    volume_index : int, optional
        Which volume (b-value, time point...) the object refers to.

    Returns
    -------
    sources, source_frames, grid
        Classic images: the images of the volume in slice order, None, None. One multi-frame
        image: ``[image]``, its 1-based frame numbers in slice order, None. Mosaic or tiled images
        (a whole volume in one stored frame, so no stored frame has the geometry of a slice): the
        images holding the volume, None, and the volume's grid, from which the builders take the
        plane positions (see "Explicit grid" above).
    """
    frames = volume.source_frames[volume_index]
    if any(f.mosaic_tile is not None for f in frames):
        uids = list(dict.fromkeys(f.sop_instance_uid for f in frames))
        return [datasets_by_uid[uid] for uid in uids], None, volume.geometry
    if frames and frames[0].frame_number is not None:
        return (
            [datasets_by_uid[frames[0].sop_instance_uid]],
            [int(cast(int, f.frame_number)) for f in frames],
            None,
        )
    return [datasets_by_uid[f.sop_instance_uid] for f in frames], None, None


def check_frame_shape(
    shape: tuple[int, ...],
    source_images: Sequence[Dataset],
    grid: Geometry | None,
    what: str,
) -> None:
    """Refuse an array (frames, rows, columns) whose frames do not match the grid it is encoded on:
    ``grid`` when given, else the first source image's Rows x Columns.

    Raises
    ------
    ValueError
        The frame size differs; the message names ``what`` ("mask", "values").
    """
    src = source_images[0] if source_images else None
    expected = (
        (int(grid.size[1]), int(grid.size[0]))
        if grid is not None
        else (None if src is None else (int(src.Rows), int(src.Columns)))
    )
    if expected is not None and tuple(shape[1:]) != expected:
        raise ValueError(
            f"{what} frames are {tuple(shape[1:])} but "
            f"{'the grid has' if grid is not None else 'sources are'} {expected}"
        )


def source_geometry(
    source_images: Sequence[Dataset],
    n_frames: int,
    source_frames: Sequence[int] | None,
    grid: Geometry | None = None,
) -> FrameGeometry:
    """Geometry for ``n_frames`` output frames aligned with the sources (see module notes).

    Parameters
    ----------
    source_images : Sequence[pydicom.Dataset]
        Single-frame series, or one multi-frame image.
    n_frames : int
        Number of frames of the output array (axis 0).
    source_frames : Sequence[int], optional
        1-based source frame numbers the output frames align with (multi-frame sources only).
    grid : processing.series.Geometry, optional
        Explicit grid of the output array (mosaic/tiled sources): positions, orientation and
        spacing come from it and the sources are only referenced. Not with ``source_frames``.

    Raises
    ------
    SourceGeometryError
        Orientations differing beyond :data:`ORIENTATION_TOLERANCE`, or frames that do not fit.
    """
    validate_sources(source_images)
    if grid is not None:
        if source_frames is not None:
            raise SourceGeometryError("give either source_frames or an explicit grid, not both")
        return _grid_geometry(source_images, n_frames, grid)
    src = source_images[0]
    n_src = int(src.get("NumberOfFrames", 1) or 1)
    if len(source_images) > 1 or n_src == 1:
        if source_frames is not None:
            raise SourceGeometryError("source_frames applies to multi-frame sources only")
        if n_frames != len(source_images):
            raise SourceGeometryError(
                f"array has {n_frames} frames but {len(source_images)} source images were given"
            )
        return FrameGeometry(_classic_views(source_images), None, None, None)
    frames = list(source_frames) if source_frames is not None else list(range(1, n_src + 1))
    if len(frames) != n_frames:
        raise SourceGeometryError(
            f"array has {n_frames} frames but {len(frames)} source frames were selected"
        )
    if min(frames) < 1 or max(frames) > n_src:
        raise SourceGeometryError(f"source_frames must lie in 1..{n_src}")
    positions: list[PlanePositionSequence] = []
    orientation: tuple[float, ...] | None = None
    spacing: tuple[tuple[float, ...], float] | None = None
    first_items: tuple[Dataset, Dataset] | None = None
    for number in frames:
        i = number - 1
        ipp = [float(v) for v in _frame_group(src, i, "PlanePositionSequence").ImagePositionPatient]
        orientation_item = _frame_group(src, i, "PlaneOrientationSequence")
        iop = tuple(float(v) for v in orientation_item.ImageOrientationPatient)
        measures = _frame_group(src, i, "PixelMeasuresSequence")
        pix = (tuple(float(v) for v in measures.PixelSpacing), float(measures.SliceThickness))
        if orientation is None:
            orientation, spacing = iop, pix
            first_items = (orientation_item, measures)
        else:
            assert spacing is not None
            _check_orientation(orientation, iop, f"source frame {number} (vs frame {frames[0]})")
            if not np.allclose(pix[0], spacing[0], atol=1e-4):
                raise SourceGeometryError(
                    f"source frame {number} has pixel spacing {list(pix[0])}, frame {frames[0]} "
                    f"{list(spacing[0])}; select frames of one stack"
                )
        positions.append(PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, ipp))
    assert orientation is not None and spacing is not None and first_items is not None
    return FrameGeometry(
        sources=[_with_shared_geometry(sanitized_source(src), *first_items)],
        pixel_measures=PixelMeasuresSequence(pixel_spacing=spacing[0], slice_thickness=spacing[1]),
        plane_orientation=PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT, orientation),
        plane_positions=positions,
    )


def build_segmentation(
    source_images: Sequence[Dataset],
    mask: np.ndarray,
    lesion: Lesion,
    *,
    segment_type: str = "metastasis",
    algorithm_version: str,
    source_frames: Sequence[int] | None = None,
    algorithm_type: str = "AUTOMATIC",
    algorithm_family: str = "MorphologicalOperations",
    algorithm_parameters: Mapping[str, str] | None = None,
    input_digest: str | None = None,
    series_number: int = SEG_SERIES_NUMBER,
    series_description: str | None = None,
    grid: Geometry | None = None,
) -> hd.seg.Segmentation:
    """Build a binary DICOM SEG of one lesion on one time point's source images.

    Parameters
    ----------
    source_images : Sequence[pydicom.Dataset]
        The series the lesion was segmented on (classic single-frame MR, or one Enhanced MR).
        Pixel data need not be loaded.
    mask : numpy.ndarray
        Boolean (or 0/1) array ``(n, rows, columns)`` aligned with the source frames as described
        in the module notes.
    lesion : processing.results.Lesion
        Tracking ID, Tracking UID (persisted per lesion) and vertebral level.
    segment_type : str
        ``"metastasis"`` (14799000, SCT), ``"neoplasm"`` (108369006, SCT), ``"primary"`` or
        ``"gtv"`` (228791009, SCT).
    algorithm_version : str
        Version written in the Segment Algorithm Identification and part of the UIDs.
    source_frames : Sequence[int], optional
        1-based frame numbers of a multi-frame source that ``mask`` frames align with.
    algorithm_type : str
        ``AUTOMATIC``, ``SEMIAUTOMATIC`` or ``MANUAL`` (SegmentAlgorithmType).
    algorithm_family : str
        Keyword of CID 7162 (e.g. ``MorphologicalOperations``, ``ManualProcessing``).
    algorithm_parameters : Mapping[str, str], optional
        Settings written in Algorithm Parameters.
    input_digest : str, optional
        Digest of the inputs for the deterministic UIDs; default: source SOP Instance UIDs,
        mask bytes, segment type and parameters.
    series_number : int
        Series Number of the SEG.
    series_description : str, optional
        Default ``"Lesion SEG <tracking id>"``.
    grid : processing.series.Geometry, optional
        The mask's own grid when no source frame has it (mosaic/tiled sources; see module notes).

    Returns
    -------
    highdicom.seg.Segmentation
        Binary SEG (all frames kept, empty ones included, so frame i maps to source frame i).

    References
    ----------
    PS3.3 A.51 Segmentation IOD; PS3.3 C.8.20.4 Segment Description Macro (Tracking ID/UID);
    TID 1500 / CID 7150, 7159, 9534.
    """
    if not algorithm_version:
        raise ValueError("algorithm_version must be given")
    if not lesion.tracking_uid:
        raise ValueError("lesion.tracking_uid must be the persisted Tracking UID of the lesion")
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3-D (frames, rows, columns), got shape {mask.shape}")
    if mask.dtype != bool:
        if not np.isin(np.unique(mask), (0, 1)).all():
            raise ValueError("mask must be boolean or contain only 0 and 1")
        mask = mask.astype(bool)
    check_frame_shape(mask.shape, source_images, grid, "mask")
    src = source_images[0] if source_images else None
    if not mask.any():
        raise ValueError("mask is empty: there is no lesion to encode")
    geometry = source_geometry(source_images, mask.shape[0], source_frames, grid)
    assert src is not None

    type_code = rcodes.segment_type(segment_type)
    parameters = {str(k): str(v) for k, v in (algorithm_parameters or {}).items()}
    try:
        family = getattr(codes.cid7162, algorithm_family)
    except AttributeError as err:
        raise ValueError(f"{algorithm_family!r} is not a CID 7162 algorithm family") from err
    level = lesion.vertebral_level
    type_word = {"metastasis": "metastasis", "gtv": "GTV"}.get(
        segment_type.lower(), type_code.meaning
    )
    label = f"{level} {type_word}" if level else type_word
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label[:64],
        segmented_property_category=rcodes.SEGMENT_CATEGORY,
        segmented_property_type=type_code,
        algorithm_type=algorithm_type,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=ALGORITHM_NAME,
            family=family,
            version=algorithm_version,
            parameters=parameters or None,
        ),
        tracking_uid=lesion.tracking_uid,
        tracking_id=lesion.tracking_id,
        anatomic_regions=[rcodes.vertebra_code(level)],
        display_color=hd.color.CIELabColor(55.0, 70.0, 50.0),  # red
    )
    if input_digest is None:
        input_digest = digest_text(
            digest_uids(source_images),
            digest_arrays(mask),
            segment_type,
            repr(sorted(parameters.items())),
            repr(list(source_frames or [])),
            *([repr(grid)] if grid is not None else []),
        )
    uid_args = dict(
        source_study_uid=str(src.StudyInstanceUID),
        tracking_uid=lesion.tracking_uid,
        algorithm_version=algorithm_version,
        input_digest=input_digest,
    )
    series_uid = deterministic_uid(kind="seg/series", **uid_args)
    instance_uid = deterministic_uid(kind="seg/instance", **uid_args)
    seg = hd.seg.Segmentation(
        source_images=geometry.sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MODEL_NAME,
        software_versions=algorithm_version,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        content_label="LESION",
        content_description=f"Lesion {lesion.tracking_id}"[:64],
        pixel_measures=geometry.pixel_measures,
        plane_orientation=geometry.plane_orientation,
        plane_positions=geometry.plane_positions,
        omit_empty_frames=False,
    )
    seg.SeriesDescription = (series_description or f"Lesion SEG {lesion.tracking_id}")[:64]
    logger.info(
        "built SEG %s (series %s) for lesion %s on series %s",
        instance_uid,
        series_uid,
        lesion.tracking_uid,
        src.SeriesInstanceUID,
    )
    return seg


# --------------------------------------------------------------------------- reading a reader's SEG


#: Largest distance (mm) between a SEG frame's Image Position (Patient) and the position of the
#: source slice it references, when the SEG does not state that spatial locations are preserved.
#: dcmqi writes positions with 7 significant digits (1e-4 mm at 100 mm).
SEG_POSITION_TOLERANCE_MM = 1e-2


class ReaderSegmentationError(InputError):
    """A Segmentation written by another tool cannot be read, or does not fit the grid asked for."""


@dataclass(frozen=True)
class ReaderSegment:
    """One segment of a Segmentation (Segment Sequence item).

    ``category`` and ``property_type`` are the Segmented Property Category / Type codes as written
    (older tools write SRT codes: they are kept, not translated).
    """

    number: int
    label: str
    category: hd.sr.CodedConcept | None
    property_type: hd.sr.CodedConcept | None
    algorithm_type: str
    tracking_id: str | None
    tracking_uid: str | None


@dataclass(frozen=True)
class SegmentationFrame:
    """Geometry and references of one stored frame of a Segmentation.

    Attributes
    ----------
    number : int
        1-based frame number in the SEG.
    segment_number : int
        Referenced Segment Number of the frame.
    position : tuple of 3 float
        Image Position (Patient) of the frame's first pixel, LPS mm.
    orientation : tuple of 6 float
        Image Orientation (Patient) (row direction, column direction).
    pixel_spacing : tuple of 2 float
        Pixel Spacing as written: (between rows, between columns) in mm.
    slice_thickness : float or None
    source_sop_instance_uids : tuple of str
        SOP Instance UIDs in the frame's Derivation Image / Source Image Sequence.
    source_frame_numbers : tuple of int
        Referenced Frame Numbers there (empty for single-frame sources).
    """

    number: int
    segment_number: int
    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    slice_thickness: float | None
    source_sop_instance_uids: tuple[str, ...]
    source_frame_numbers: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class ReaderSegmentation:
    """A DICOM Segmentation read without its source images (see :func:`read_segmentation`).

    The referenced images are only needed to place the mask on their grid
    (:meth:`mask_on`); everything else is read from the SEG itself.
    """

    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    segmentation_type: str
    rows: int
    columns: int
    segments: tuple[ReaderSegment, ...]
    frames: tuple[SegmentationFrame, ...]
    referenced_series_instance_uids: tuple[str, ...]
    referenced_sop_instance_uids: tuple[str, ...]
    content_date: str
    content_time: str
    manufacturer: str
    segmentation: hd.seg.Segmentation = field(repr=False)

    @property
    def number_of_frames(self) -> int:
        """Number of stored frames."""
        return len(self.frames)

    def segment(self, number: int) -> ReaderSegment:
        """The segment with Segment Number ``number``."""
        for item in self.segments:
            if item.number == number:
                return item
        raise ReaderSegmentationError(
            f"SEG {self.sop_instance_uid} has no segment {number} "
            f"(segments {[s.number for s in self.segments]})"
        )

    def mask_for_sources(
        self,
        source_frames: Sequence[SourceFrame],
        segment_numbers: Sequence[int] | None = None,
        *,
        reference: sitk.Image | None = None,
    ) -> np.ndarray:
        """Boolean mask ``(n, rows, columns)`` aligned with ``source_frames`` (union of segments).

        The SEG frames are matched to the given stored images (single-frame) or frames of one
        multi-frame image through the SEG's source references; an image it does not segment gives
        an empty slice. Many tools (dcmqi among them) do not state that spatial locations are
        preserved (Spatial Locations Preserved, type 3): such a SEG is accepted only with the
        ``reference`` grid of the source slices, after checking that every matched SEG frame lies
        on its slice (position within :data:`SEG_POSITION_TOLERANCE_MM`, orientation within
        :data:`ORIENTATION_TOLERANCE`, same pixel spacing and matrix).

        Raises
        ------
        ReaderSegmentationError
            The SEG references none of the images, or its frames do not lie on them.
        """
        if not source_frames:
            raise ReaderSegmentationError("no source frames given")
        multi = source_frames[0].frame_number is not None
        if multi and len({f.sop_instance_uid for f in source_frames}) != 1:
            raise ReaderSegmentationError(
                "source frames of several multi-frame images cannot be matched at once"
            )
        numbers = list(segment_numbers) if segment_numbers is not None else None

        def pixels(ignore_spatial_locations: bool) -> np.ndarray:
            options: dict[str, Any] = {
                "segment_numbers": numbers,
                "combine_segments": True,
                "skip_overlap_checks": True,
                "assert_missing_frames_are_empty": True,
                "ignore_spatial_locations": ignore_spatial_locations,
            }
            if multi:
                by_frame: np.ndarray = self.segmentation.get_pixels_by_source_frame(
                    source_frames[0].sop_instance_uid,
                    [int(f.frame_number or 0) for f in source_frames],
                    **options,
                )
                return by_frame
            return self.segmentation.get_pixels_by_source_instance(
                [f.sop_instance_uid for f in source_frames], **options
            )

        try:
            try:
                array = pixels(False)
            except RuntimeError as err:
                if "spatial locations" not in str(err):
                    raise
                if reference is None:
                    raise ReaderSegmentationError(
                        f"SEG {self.sop_instance_uid} does not state that spatial locations are "
                        "preserved; give the reference grid to check its frames"
                    ) from err
                self._check_frames_on(reference, source_frames)
                array = pixels(True)
        except (ValueError, KeyError, AttributeError, IndexError, RuntimeError) as err:
            # highdicom's refusals (ReaderSegmentationError itself is not caught here)
            raise ReaderSegmentationError(
                f"SEG {self.sop_instance_uid} does not align with the given source images: {err}"
            ) from err
        return np.asarray(array) > 0

    def _check_frames_on(self, reference: sitk.Image, source_frames: Sequence[SourceFrame]) -> None:
        """Every SEG frame referencing one of ``source_frames`` lies on that slice of
        ``reference``; :class:`ReaderSegmentationError` otherwise (or when none does)."""
        slice_of: dict[tuple[str, int | None], int] = {
            (f.sop_instance_uid, f.frame_number): k for k, f in enumerate(source_frames)
        }
        direction = np.asarray(reference.GetDirection(), dtype=float).reshape(3, 3)
        expected_iop = np.concatenate([direction[:, 0], direction[:, 1]])
        spacing = reference.GetSpacing()
        size = reference.GetSize()
        matched = 0
        for frame in self.frames:
            numbers: list[int | None] = list(frame.source_frame_numbers) or [None]
            slices = {
                slice_of[(uid, n)]
                for uid in frame.source_sop_instance_uids
                for n in numbers
                if (uid, n) in slice_of
            }
            for k in slices:
                origin = np.asarray(reference.TransformIndexToPhysicalPoint((0, 0, k)))
                offset = float(np.linalg.norm(np.asarray(frame.position) - origin))
                if offset > SEG_POSITION_TOLERANCE_MM:
                    raise ReaderSegmentationError(
                        f"SEG frame {frame.number} lies {offset:.3g} mm from the slice it "
                        f"references (tolerance {SEG_POSITION_TOLERANCE_MM:g} mm)"
                    )
                _check_orientation(expected_iop, frame.orientation, f"SEG frame {frame.number}")
                if not np.allclose(frame.pixel_spacing, (spacing[1], spacing[0]), rtol=1e-4):
                    raise ReaderSegmentationError(
                        f"SEG frame {frame.number} has pixel spacing {list(frame.pixel_spacing)}, "
                        f"the slice it references {[spacing[1], spacing[0]]}"
                    )
                if (self.rows, self.columns) != (size[1], size[0]):
                    raise ReaderSegmentationError(
                        f"SEG frames are {(self.rows, self.columns)} but the slices "
                        f"{(size[1], size[0])}"
                    )
                matched += 1
        if not matched:
            raise ReaderSegmentationError(
                f"SEG {self.sop_instance_uid} references none of the given source images"
            )

    def mask_on(
        self,
        reference: sitk.Image,
        source_frames: Sequence[SourceFrame] | None = None,
        segment_numbers: Sequence[int] | None = None,
    ) -> sitk.Image:
        """The union of the segments as a ``uint8`` mask on the grid of ``reference``.

        Parameters
        ----------
        reference : SimpleITK.Image
            Target grid (e.g. the anatomical series the reader drew on).
        source_frames : Sequence[processing.series.SourceFrame], optional
            The stored frame of each slice of ``reference`` (``SeriesVolume.source_frames[0]``):
            the mask is then taken frame by frame through the SEG's source references (exact,
            no resampling). Without them, the SEG frames are placed by their own geometry and
            resampled (nearest neighbour) onto ``reference``.
        segment_numbers : Sequence[int], optional
            Segments to combine (default: all).

        Raises
        ------
        ReaderSegmentationError
            Frames that do not match the references, or SEG frames that form no regular stack.
        """
        size = reference.GetSize()
        if source_frames is not None:
            if len(source_frames) != size[2]:
                raise ReaderSegmentationError(
                    f"{len(source_frames)} source frames for a reference of {size[2]} slices"
                )
            array = self.mask_for_sources(source_frames, segment_numbers, reference=reference)
            if array.shape != (size[2], size[1], size[0]):
                raise ReaderSegmentationError(
                    f"SEG frames are {array.shape[1:]} but the reference slices are "
                    f"{(size[1], size[0])}"
                )
            mask = sitk.GetImageFromArray(array.astype(np.uint8))
            mask.CopyInformation(reference)
            return mask
        return sitk.Resample(
            self.image(segment_numbers),
            reference,
            sitk.Transform(),
            sitk.sitkNearestNeighbor,
            0,
            sitk.sitkUInt8,
        )

    def image(self, segment_numbers: Sequence[int] | None = None) -> sitk.Image:
        """The union of the segments on the SEG's own grid (``uint8``, LPS geometry).

        Empty frames a tool left out are filled in when the remaining positions lie on a regular
        stack.

        Raises
        ------
        ReaderSegmentationError
            The frames do not form one regular stack.
        """
        try:
            volume = self.segmentation.get_volume(
                segment_numbers=list(segment_numbers) if segment_numbers is not None else None,
                combine_segments=True,
                skip_overlap_checks=True,
                allow_missing_positions=True,
            )
        except (ValueError, KeyError, AttributeError, RuntimeError) as err:
            raise ReaderSegmentationError(
                f"SEG {self.sop_instance_uid} frames do not form one regular stack: {err}"
            ) from err
        if volume is None:
            raise ReaderSegmentationError(
                f"SEG {self.sop_instance_uid} frames do not form one regular stack"
            )
        affine = np.asarray(volume.affine, dtype=float)
        # highdicom volume axes: (slice, row, column); SimpleITK: (x=column, y=row, z=slice)
        axes = [affine[:3, 2], affine[:3, 1], affine[:3, 0]]
        spacing = [float(np.linalg.norm(a)) for a in axes]
        direction = np.column_stack([a / s for a, s in zip(axes, spacing)])
        image = sitk.GetImageFromArray((np.asarray(volume.array) > 0).astype(np.uint8))
        image.SetOrigin(tuple(float(v) for v in affine[:3, 3]))
        image.SetSpacing(spacing)
        image.SetDirection(tuple(float(v) for v in direction.reshape(-1)))
        return image


def _coded(item: Dataset, keyword: str) -> hd.sr.CodedConcept | None:
    sequence = item.get(keyword)
    if not sequence:
        return None
    return hd.sr.CodedConcept.from_dataset(sequence[0])


def _optional_group(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    try:
        return _frame_group(ds, index, keyword)
    except ValueError:
        return None


def read_segmentation(ds: Dataset) -> ReaderSegmentation:
    """Read a DICOM Segmentation written by any tool (a reader's correction, dcmqi, Slicer...).

    Needs only the SEG: segments (number, label, category/type codes, tracking identifiers),
    per-frame geometry (position, orientation, pixel spacing) and source references are read from
    its functional groups. ``ds`` is not modified.

    Parameters
    ----------
    ds : pydicom.Dataset
        A Segmentation Storage object (binary or fractional).

    Returns
    -------
    ReaderSegmentation

    Raises
    ------
    ReaderSegmentationError
        Not a Segmentation, or one highdicom cannot decode, or frames without plane position,
        orientation, pixel spacing or segment number.

    References
    ----------
    PS3.3 A.51 Segmentation IOD; C.8.20.2 Segmentation Image Module; C.7.6.16 functional groups.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class != SEGMENTATION_SOP_CLASS:
        raise ReaderSegmentationError(
            f"{ds.get('SOPInstanceUID', '?')} is not a Segmentation (SOP Class {sop_class})"
        )
    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=True)
    except (ValueError, KeyError, AttributeError, TypeError) as err:
        raise ReaderSegmentationError(
            f"SEG {ds.get('SOPInstanceUID', '?')} cannot be decoded: {err}"
        ) from err
    segments = []
    for item in ds.get("SegmentSequence", []):
        segments.append(
            ReaderSegment(
                number=int(item.SegmentNumber),
                label=str(item.get("SegmentLabel", "") or ""),
                category=_coded(item, "SegmentedPropertyCategoryCodeSequence"),
                property_type=_coded(item, "SegmentedPropertyTypeCodeSequence"),
                algorithm_type=str(item.get("SegmentAlgorithmType", "") or ""),
                tracking_id=str(item.TrackingID) if item.get("TrackingID") else None,
                tracking_uid=str(item.TrackingUID) if item.get("TrackingUID") else None,
            )
        )
    if not segments:
        raise ReaderSegmentationError(f"SEG {ds.SOPInstanceUID} has no Segment Sequence")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    frames = []
    try:
        for i in range(n_frames):
            position = _frame_group(ds, i, "PlanePositionSequence").ImagePositionPatient
            orientation = _frame_group(ds, i, "PlaneOrientationSequence").ImageOrientationPatient
            measures = _frame_group(ds, i, "PixelMeasuresSequence")
            identification = _frame_group(ds, i, "SegmentIdentificationSequence")
            sop_uids: list[str] = []
            frame_numbers: list[int] = []
            per_frame = ds.PerFrameFunctionalGroupsSequence[i]
            for derivation in per_frame.get("DerivationImageSequence", []):
                for source in derivation.get("SourceImageSequence", []):
                    sop_uids.append(str(source.ReferencedSOPInstanceUID))
                    numbers = source.get("ReferencedFrameNumber")
                    if numbers not in (None, ""):
                        numbers = numbers if isinstance(numbers, Sequence) else [numbers]
                        frame_numbers.extend(int(n) for n in numbers)
            thickness = measures.get("SliceThickness")
            # ImagePositionPatient has 3 values and PixelSpacing 2 (PS3.3 C.7.6.2); mypy cannot
            # see the length of a tuple built from a DICOM multi-value
            frames.append(
                SegmentationFrame(
                    number=i + 1,
                    segment_number=int(identification.ReferencedSegmentNumber),
                    position=tuple(float(v) for v in position),  # type: ignore[arg-type]
                    orientation=tuple(float(v) for v in orientation),
                    pixel_spacing=tuple(float(v) for v in measures.PixelSpacing),  # type: ignore[arg-type]
                    slice_thickness=float(thickness) if thickness not in (None, "") else None,
                    source_sop_instance_uids=tuple(sop_uids),
                    source_frame_numbers=tuple(frame_numbers),
                )
            )
    except (ValueError, AttributeError, IndexError) as err:
        raise ReaderSegmentationError(
            f"SEG {ds.SOPInstanceUID} frame {len(frames) + 1}: {err}"
        ) from err
    series_uids: list[str] = []
    instance_uids: list[str] = []
    for series in ds.get("ReferencedSeriesSequence", []):
        series_uids.append(str(series.SeriesInstanceUID))
        instance_uids.extend(
            str(item.ReferencedSOPInstanceUID)
            for item in series.get("ReferencedInstanceSequence", [])
        )
    result = ReaderSegmentation(
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        segmentation_type=str(ds.get("SegmentationType", "")),
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        segments=tuple(segments),
        frames=tuple(frames),
        referenced_series_instance_uids=tuple(series_uids),
        referenced_sop_instance_uids=tuple(instance_uids),
        content_date=str(ds.get("ContentDate", "") or ""),
        content_time=str(ds.get("ContentTime", "") or ""),
        manufacturer=str(ds.get("Manufacturer", "") or ""),
        segmentation=seg,
    )
    logger.debug(
        "read SEG %s: %d segment(s), %d frame(s)",
        result.sop_instance_uid,
        len(segments),
        len(frames),
    )
    return result
