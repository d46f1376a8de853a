"""DICOM Segmentation of a treated lesion (PS3.3 A.51), built with highdicom.

One binary segment per SEG: the lesion at one time point (the GTV on the baseline grid, the refined
lesion on the follow-up grid), with the persistent Tracking ID/UID of the lesion so every SEG of the
same lesion carries the same Tracking UID across time points (domain.md §4.3).

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
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.content import (
    PixelMeasuresSequence,
    PlaneOrientationSequence,
    PlanePositionSequence,
)
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes

from processing.results import Lesion
from reporting import codes as rcodes
from reporting.uids import deterministic_uid, digest_arrays, digest_text, digest_uids

logger = logging.getLogger(__name__)

MANUFACTURER = "Spine Response Node"
MODEL_NAME = "spine-node"
DEVICE_SERIAL_NUMBER = "1"
SEG_SERIES_NUMBER = 9001
ALGORITHM_NAME = "spine-node lesion segmentation"


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
        ("PatientBirthDate", _DA, ""), ("StudyDate", _DA, ""), ("StudyTime", _TM, ""),
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
        logger.warning("source %s: invalid %s not copied into the derived object",
                       ds.get("SOPInstanceUID"), ", ".join(sorted(fixes)))
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
        return per_frame[index][keyword][0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared is not None and keyword in shared[0]:
        return shared[0][keyword][0]
    raise ValueError(
        f"source {ds.SOPInstanceUID} frame {index + 1} has no {keyword} in its functional groups")


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


def source_geometry(
    source_images: Sequence[Dataset],
    n_frames: int,
    source_frames: Sequence[int] | None,
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
    """
    validate_sources(source_images)
    src = source_images[0]
    n_src = int(src.get("NumberOfFrames", 1) or 1)
    if len(source_images) > 1 or n_src == 1:
        if source_frames is not None:
            raise ValueError("source_frames applies to multi-frame sources only")
        if n_frames != len(source_images):
            raise ValueError(
                f"array has {n_frames} frames but {len(source_images)} source images were given")
        views = [sanitized_source(ds, log=False) for ds in source_images]
        changed = sum(view is not ds for view, ds in zip(views, source_images))
        if changed:
            logger.warning("series %s: invalid patient/study attributes in %d source images not "
                           "copied into the derived object", src.SeriesInstanceUID, changed)
        return FrameGeometry(views, None, None, None)
    frames = list(source_frames) if source_frames is not None else list(range(1, n_src + 1))
    if len(frames) != n_frames:
        raise ValueError(
            f"array has {n_frames} frames but {len(frames)} source frames were selected")
    if min(frames) < 1 or max(frames) > n_src:
        raise ValueError(f"source_frames must lie in 1..{n_src}")
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
        elif not np.allclose(iop, orientation, atol=1e-4) or not np.allclose(
                pix[0], spacing[0], atol=1e-4):
            raise ValueError(
                f"source frame {number} has a different orientation or pixel spacing from frame "
                f"{frames[0]}; select frames of one stack")
        positions.append(PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, ipp))
    assert orientation is not None and spacing is not None and first_items is not None
    return FrameGeometry(
        sources=[_with_shared_geometry(sanitized_source(src), *first_items)],
        pixel_measures=PixelMeasuresSequence(
            pixel_spacing=spacing[0], slice_thickness=spacing[1]),
        plane_orientation=PlaneOrientationSequence(
            hd.CoordinateSystemNames.PATIENT, orientation),
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
    src = source_images[0] if source_images else None
    if src is not None and mask.shape[1:] != (int(src.Rows), int(src.Columns)):
        raise ValueError(
            f"mask frames are {mask.shape[1:]} but sources are {(src.Rows, src.Columns)}")
    if not mask.any():
        raise ValueError("mask is empty: there is no lesion to encode")
    geometry = source_geometry(source_images, mask.shape[0], source_frames)
    assert src is not None

    type_code = rcodes.segment_type(segment_type)
    parameters = {str(k): str(v) for k, v in (algorithm_parameters or {}).items()}
    try:
        family = getattr(codes.cid7162, algorithm_family)
    except AttributeError as err:
        raise ValueError(f"{algorithm_family!r} is not a CID 7162 algorithm family") from err
    level = lesion.vertebral_level
    type_word = {"metastasis": "metastasis", "gtv": "GTV"}.get(segment_type.lower(),
                                                                type_code.meaning)
    label = f"{level} {type_word}" if level else type_word
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label[:64],
        segmented_property_category=rcodes.SEGMENT_CATEGORY,
        segmented_property_type=type_code,
        algorithm_type=algorithm_type,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=ALGORITHM_NAME, family=family, version=algorithm_version,
            parameters=parameters or None),
        tracking_uid=lesion.tracking_uid,
        tracking_id=lesion.tracking_id,
        anatomic_regions=[rcodes.vertebra_code(level)],
        display_color=hd.color.CIELabColor(55.0, 70.0, 50.0),  # red
    )
    if input_digest is None:
        input_digest = digest_text(
            digest_uids(source_images), digest_arrays(mask), segment_type,
            repr(sorted(parameters.items())), repr(list(source_frames or [])))
    uid_args = dict(source_study_uid=str(src.StudyInstanceUID),
                    tracking_uid=lesion.tracking_uid, algorithm_version=algorithm_version,
                    input_digest=input_digest)
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
    logger.info("built SEG %s (series %s) for lesion %s on series %s", instance_uid, series_uid,
                lesion.tracking_uid, src.SeriesInstanceUID)
    return seg
