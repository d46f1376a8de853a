"""Assemble an MR series into correctly oriented volumes, with the acquisition physics alongside.

Pure functions on pydicom datasets (the caller reads the files). Handles classic single-frame
images, Enhanced MR multi-frame objects (per-frame and shared functional groups, including Siemens
XA which writes the spatial groups per frame), Siemens mosaics and United Imaging tiled ``VFRAME``
images (one volume per file as a grid of slices, each slice's position in the private (0065,xx51)
items).

A series is what its images say, not every object that shares its UID: :func:`split_set_aside` /
:func:`set_aside_reason` keep out DICOMDIRs, presentation states, key objects, SR, Real World Value
Mapping, Philips private objects (1.3.46.670589.11.0.0.12.x) and anything without pixel data, each
as a :class:`SetAside` with a one-line reason (:func:`read_series` does the same for the datasets it
is given). Scanner-derived volumes inside an acquired series (ADC/FA/EADC maps, DERIVED images,
trace images and the Philips isotropic image beside directional ones) are left out of the volumes
and listed in :attr:`SeriesVolume.excluded`; a series made only of derived images (a TRACEW or
scanner ADC series) is read whole. A series becomes an array of shape
``(n_volumes, z, y, x)``: one 3-D volume per b-value/direction, time point, flip angle or echo,
with a :class:`VolumeMetadata` for each and the source frame of every slice (reporting references
them).

Geometry follows SimpleITK / ITK: origin = centre of the first voxel in LPS mm, spacing (x, y, z) in
mm, direction = 3×3 matrix whose columns are the row direction, the column direction and the slice
normal (row × column). Slices are ordered along the normal, as ``SimpleITK.ImageSeriesReader`` does.

A series that cannot be assembled without guessing (missing or duplicated slice, mixed orientation /
pixel spacing / matrix, irregular slice spacing, sheared stack, unknown diffusion encoding) raises a
subclass of :class:`SeriesError` (a ``ValueError``) naming the problem; a silently wrong volume is
never returned. Diffusion-encoding failures are raised as
:class:`SeriesUnknownDiffusionEncodingError` / :class:`SeriesDiffusionEncodingError`, which are also
the :mod:`processing.diffusion_encoding` exceptions, so either ``except`` clause catches them.

References
----------
.. [1] DICOM PS3.3 C.7.6.2 Image Plane Module; C.7.6.16 Multi-frame Functional Groups;
       C.8.13 Enhanced MR Image.
.. [2] nibabel ``nicom.dicomwrappers.MosaicWrapper`` (mosaic position correction) and dcm2niix
       (Philips volume order from (2005,xx96); UIH GRID images, ``UIH/README.md``).
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import warnings
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset

from processing.diffusion_encoding import (
    SIEMENS_CSA_HEADER,
    SIEMENS_MR_HEADER,
    UIH_IMAGE_HEADER,
    DiffusionEncoding,
    DiffusionEncodingError,
    UnknownDiffusionEncodingError,
    diffusion_encoding,
    first_float,
    private_value,
)
from processing.errors import InputError

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader

logger = logging.getLogger(__name__)

ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
SEGMENTATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
#: Philips (2005,1596) "diffusion order" (temporal order of volumes, R5.6+) sits in the block of
#: this creator (dcm2niix Philips/README).
PHILIPS_MR_IMAGING_6 = "Philips MR Imaging DD 006"

#: Direction cosines of two frames agree when every component differs by less than this.
ORIENTATION_TOLERANCE = 1e-4
#: Relative tolerance on slice spacing regularity and in-plane alignment of a stack.
SPACING_TOLERANCE = 0.02


class SeriesError(InputError):
    """A set of datasets cannot be assembled into a volume series."""


class MixedSeriesError(SeriesError):
    """The datasets belong to more than one series, or carry no image data."""


class MissingSliceError(SeriesError):
    """A slice (frame) is missing from at least one volume."""


class DuplicateSliceError(SeriesError):
    """The same slice appears more than once (same SOP instance, or same position twice)."""


class InconsistentGeometryError(SeriesError):
    """Frames disagree in orientation, pixel spacing, matrix size, or the stack is irregular."""


class SeriesDiffusionEncodingError(SeriesError, DiffusionEncodingError):
    """An image of the series has an inconsistent diffusion encoding."""


class SeriesUnknownDiffusionEncodingError(
    SeriesDiffusionEncodingError, UnknownDiffusionEncodingError
):
    """An image of the series is diffusion-weighted but its encoding is unknown (vendor/creator)."""


def _encoding(ds: Dataset, **kwargs: Any) -> DiffusionEncoding | None:
    """:func:`diffusion_encoding`, with its errors raised as :class:`SeriesError` subclasses."""
    try:
        return diffusion_encoding(ds, **kwargs)
    except UnknownDiffusionEncodingError as err:
        raise SeriesUnknownDiffusionEncodingError(str(err)) from err
    except DiffusionEncodingError as err:
        raise SeriesDiffusionEncodingError(str(err)) from err


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of one 3-D volume, in DICOM patient coordinates (LPS), as SimpleITK uses it.

    Attributes
    ----------
    origin : tuple of 3 float
        Centre of voxel (0, 0, 0) in mm (LPS).
    spacing : tuple of 3 float
        Voxel size in mm along x (column index), y (row index) and z (slice index).
    direction : tuple of 9 float
        Row-major 3×3 matrix whose columns are the unit vectors of x, y and z in LPS
        (``SimpleITK.Image.GetDirection()`` layout).
    size : tuple of 3 int
        Number of voxels along x, y, z.
    """

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    size: tuple[int, int, int]

    @property
    def direction_matrix(self) -> np.ndarray:
        """The 3×3 direction matrix (columns: row direction, column direction, slice normal)."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    def index_to_lps(self, index: Sequence[float]) -> np.ndarray:
        """Physical LPS position (mm) of a continuous voxel index (x, y, z)."""
        position: np.ndarray = np.asarray(self.origin) + self.direction_matrix @ (
            np.asarray(self.spacing) * np.asarray(index, dtype=float)
        )
        return position

    def image(self, values: np.ndarray) -> sitk.Image:
        """``values`` (z, y, x) as a SimpleITK image on this grid (the array's dtype is kept)."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(values))
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetSpacing(tuple(float(v) for v in self.spacing))
        image.SetDirection(tuple(float(v) for v in self.direction))
        return image


@dataclass(frozen=True)
class VolumeMetadata:
    """Acquisition parameters of one volume of a series.

    Attributes
    ----------
    b_value : float or None
        Diffusion b-value in s/mm²; None when the images record no diffusion encoding (Philips
        records b = 0 in every image, so non-diffusion Philips series show 0).
    gradient : tuple of 3 float or None
        Diffusion gradient unit vector in LPS; None for b ≈ 0 and for isotropic (trace) volumes.
    diffusion_directionality : str or None
        ``DIRECTIONAL``, ``ISOTROPIC``, ``NONE`` (b0) or None (not diffusion).
    flip_angle : float or None
        Flip angle in degrees.
    repetition_time, echo_time, inversion_time : float or None
        TR, TE, TI in ms.
    time : float or None
        Acquisition time of the volume in s relative to the first volume: from Trigger Time when it
        varies between volumes (GE/Philips multiphase), otherwise from the earliest acquisition
        (date)time of the volume's frames.
    trigger_time : float or None
        Trigger Time (0018,1060) of the volume in s, as written.
    temporal_position_index : int or None
        Temporal Position Index / Identifier of the volume.
    image_type : tuple of str
        Image Type (classic) or Frame Type (enhanced) values.
    """

    b_value: float | None = None
    gradient: tuple[float, float, float] | None = None
    diffusion_directionality: str | None = None
    flip_angle: float | None = None
    repetition_time: float | None = None
    echo_time: float | None = None
    inversion_time: float | None = None
    time: float | None = None
    trigger_time: float | None = None
    temporal_position_index: int | None = None
    image_type: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceFrame:
    """The stored image a slice came from (for SEG/PM/SR source references).

    ``frame_number`` is the 1-based frame of a multi-frame object, None for a single-frame image;
    ``mosaic_tile`` is the 0-based tile of a Siemens mosaic, None otherwise.
    """

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None = None
    mosaic_tile: int | None = None


@dataclass(frozen=True)
class AcquisitionPhysics:
    """Acquisition summary of a series (from the first image; the values classification uses).

    Attributes
    ----------
    manufacturer, model : str
    field_strength : float or None
        Magnetic Field Strength in T.
    scanning_sequence, sequence_variant, scan_options : tuple of str
        (0018,0020), (0018,0021), (0018,0022) values (enhanced objects: derived from the
        Echo Pulse Sequence / Inversion Recovery attributes where the classic ones are absent).
    sequence_name : str
        Sequence Name (classic) or Pulse Sequence Name (enhanced).
    mr_acquisition_type : str
        ``2D`` or ``3D`` (empty when not written).
    echo_pulse_sequence : str
        ``SPIN``, ``GRADIENT``, ``BOTH`` or empty.
    fat_suppression : str or None
        ``"spectral"`` (fat saturation / SPAIR / SPIR), ``"inversion"`` (STIR-type short-TI
        inversion), or None when no fat suppression is recorded.
    inversion_recovery : bool
        An inversion pulse was used (IR in Scanning Sequence, Inversion Recovery YES, or an
        inversion time).
    contrast_agent : str or None
        Contrast/Bolus Agent when recorded (post-contrast or dynamic acquisition).
    acquisition_contrast : str
        Enhanced MR Acquisition Contrast (``T1``, ``T2``, ``DIFFUSION``…) or empty.
    image_type : tuple of str
        Image Type of the first image.
    """

    manufacturer: str = ""
    model: str = ""
    field_strength: float | None = None
    scanning_sequence: tuple[str, ...] = ()
    sequence_variant: tuple[str, ...] = ()
    scan_options: tuple[str, ...] = ()
    sequence_name: str = ""
    mr_acquisition_type: str = ""
    echo_pulse_sequence: str = ""
    fat_suppression: str | None = None
    inversion_recovery: bool = False
    contrast_agent: str | None = None
    acquisition_contrast: str = ""
    image_type: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class SeriesVolume:
    """One series as volumes on a common grid.

    Attributes
    ----------
    array : numpy.ndarray
        float32, shape ``(n_volumes, z, y, x)``, modality values after Rescale Slope/Intercept.
    geometry : Geometry
        Grid shared by every volume.
    volumes : tuple of VolumeMetadata
        One per volume, in acquisition order (Philips: (2005,xx96) diffusion order).
    source_frames : tuple of tuple of SourceFrame
        ``source_frames[v][k]``: the stored frame of slice ``k`` of volume ``v``.
    physics : AcquisitionPhysics
    excluded : tuple of SetAside
        Derived volumes found inside the series and kept out of it (Philips isotropic image, scanner
        ADC/FA/TRACEW images among original ones), one entry per volume with the reason.
    """

    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    sop_class_uid: str
    series_number: int | None
    series_description: str
    array: np.ndarray
    geometry: Geometry
    volumes: tuple[VolumeMetadata, ...]
    source_frames: tuple[tuple[SourceFrame, ...], ...]
    physics: AcquisitionPhysics = field(default_factory=AcquisitionPhysics)
    excluded: tuple[SetAside, ...] = ()

    @property
    def n_volumes(self) -> int:
        """Number of volumes (first axis of :attr:`array`)."""
        return int(self.array.shape[0])

    @property
    def b_values(self) -> np.ndarray:
        """b-values in s/mm² per volume (NaN where not diffusion-weighted)."""
        return np.array([np.nan if v.b_value is None else v.b_value for v in self.volumes])

    @property
    def gradients(self) -> np.ndarray:
        """(n_volumes, 3) LPS gradient unit vectors (zeros for b0 / isotropic / non-diffusion)."""
        return np.array(
            [v.gradient if v.gradient is not None else (0.0, 0.0, 0.0) for v in self.volumes],
            dtype=float,
        )

    def volume_image(self, index: int) -> sitk.Image:
        """Volume ``index`` as a SimpleITK image (float32) with the series geometry."""
        if not -self.n_volumes <= index < self.n_volumes:
            raise IndexError(f"volume {index} out of range (series has {self.n_volumes})")
        return self.geometry.image(self.array[index])


# ----------------------------------------------------------------------------- set-aside objects
#: Media Storage Directory (DICOMDIR) SOP Class.
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
#: Philips private non-image objects (exam cards, spectro/raw data) share the images' series.
PHILIPS_PRIVATE_SOP_PREFIX = "1.3.46.670589.11.0.0.12."
#: Standard SOP Classes that hold no image to assemble (prefix match where it ends with a dot).
NON_IMAGE_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.11.": "Presentation State",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection",
    "1.2.840.10008.5.1.4.1.1.88.": "Structured Report",
    "1.2.840.10008.5.1.4.1.1.67": "Real World Value Mapping",
    "1.2.840.10008.5.1.4.1.1.104.": "Encapsulated Document",
    "1.2.840.10008.5.1.4.1.1.66": "Raw Data",
    "1.2.840.10008.5.1.4.1.1.66.1": "Spatial Registration",
    "1.2.840.10008.5.1.4.1.1.66.3": "Deformable Spatial Registration",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.481.": "Radiotherapy object",
}


@dataclass(frozen=True)
class SetAside:
    """An object (or a derived volume of a series) kept out of series assembly, with the reason.

    Attributes
    ----------
    reason : str
        One line: why it was set aside.
    sop_instance_uid, sop_class_uid, series_instance_uid : str
        Identifiers of the object ("" when it has none, e.g. a DICOMDIR's series).
    file_name : str or None
        File name (no folder) when known.
    """

    reason: str
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    series_instance_uid: str = ""
    file_name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (``maps.json`` ``set_aside`` entries)."""
        return {
            "file": self.file_name,
            "sop_instance_uid": self.sop_instance_uid,
            "sop_class_uid": self.sop_class_uid,
            "series_instance_uid": self.series_instance_uid,
            "reason": self.reason,
        }


def _sop_class(ds: Dataset) -> str:
    sop = str(ds.get("SOPClassUID", "") or "")
    if not sop and getattr(ds, "file_meta", None) is not None:
        sop = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return sop


def set_aside_reason(ds: Dataset, *, keep_segmentations: bool = False) -> str | None:
    """Why ``ds`` is not an image to assemble into a series, or None when it is one.

    Set aside: a DICOMDIR (Media Storage Directory), objects without Series Instance UID, known
    non-image SOP Classes (presentation states, key objects, SR, Real World Value Mapping, Philips
    private objects 1.3.46.670589.11.0.0.12.x, RT objects, and Segmentation unless
    ``keep_segmentations``) and anything without pixel data.
    """
    sop = _sop_class(ds)
    if sop == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
        return "DICOMDIR (Media Storage Directory): an index of the files, not an image"
    if sop.startswith(PHILIPS_PRIVATE_SOP_PREFIX):
        return f"Philips private non-image object (SOP Class {sop})"
    segmentation = sop == SEGMENTATION_SOP_CLASS or str(ds.get("Modality", "")).upper() == "SEG"
    if not (keep_segmentations and segmentation):
        for prefix, name in sorted(NON_IMAGE_SOP_CLASSES.items(), key=lambda kv: -len(kv[0])):
            if sop == prefix or (prefix.endswith(".") and sop.startswith(prefix)):
                return f"{name} (SOP Class {sop}): not a source image"
    if not ds.get("SeriesInstanceUID"):
        return f"no Series Instance UID (SOP Class {sop or '?'})"
    if (
        "PixelData" not in ds
        and "FloatPixelData" not in ds
        and "DoubleFloatPixelData" not in ds
        and not segmentation
    ):
        return f"no pixel data (SOP Class {sop or '?'}, Modality {ds.get('Modality', '?')})"
    return None


def _file_name(ds: Dataset) -> str | None:
    name = getattr(ds, "filename", None)
    if isinstance(name, str) and name:
        return name.replace("\\", "/").rsplit("/", 1)[-1]
    return None


def set_aside_entry(ds: Dataset, reason: str) -> SetAside:
    """The :class:`SetAside` record of ``ds`` (its UIDs and file name) with ``reason``."""
    return SetAside(
        reason=reason,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        sop_class_uid=_sop_class(ds),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        file_name=_file_name(ds),
    )


def split_set_aside(
    datasets: Iterable[Dataset],
    *,
    keep_segmentations: bool = False,
) -> tuple[list[Dataset], list[SetAside]]:
    """Separate the images to assemble from the objects to set aside (:func:`set_aside_reason`).

    Returns
    -------
    images : list of Dataset
        Datasets to group and assemble, order kept.
    set_aside : list of SetAside
        One entry per other dataset, with its one-line reason.
    """
    images: list[Dataset] = []
    aside: list[SetAside] = []
    for ds in datasets:
        reason = set_aside_reason(ds, keep_segmentations=keep_segmentations)
        if reason is None:
            images.append(ds)
            continue
        aside.append(set_aside_entry(ds, reason))
        logger.debug("set aside %s: %s", aside[-1].sop_instance_uid or aside[-1].file_name, reason)
    return images, aside


# ----------------------------------------------------------------------------- helpers
def group_by_series(
    datasets: Iterable[Dataset], *, set_aside: list[SetAside] | None = None
) -> dict[str, list[Dataset]]:
    """Group datasets by Series Instance UID (insertion order kept).

    Parameters
    ----------
    datasets : iterable of Dataset
    set_aside : list, optional
        When given, datasets without a Series Instance UID (e.g. a DICOMDIR) are appended to it as
        :class:`SetAside` instead of raising.

    Raises
    ------
    MixedSeriesError
        A dataset has no Series Instance UID (and ``set_aside`` is None).
    """
    groups: dict[str, list[Dataset]] = defaultdict(list)
    for ds in datasets:
        uid = ds.get("SeriesInstanceUID")
        if not uid:
            if set_aside is not None:
                set_aside.append(
                    set_aside_entry(ds, set_aside_reason(ds) or "no Series Instance UID")
                )
                continue
            raise MixedSeriesError(
                f"dataset {ds.get('SOPInstanceUID', '?')} has no Series Instance UID"
            )
        groups[str(uid)].append(ds)
    return dict(groups)


def _int(value: Any) -> int | None:
    f = first_float(value)
    return None if f is None else int(round(f))


def _strings(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return (value.upper(),)
    return tuple(str(v).upper() for v in value)


def _datetime_seconds(dt_value: Any = None, date: Any = None, time: Any = None) -> float | None:
    """Seconds (naive, since 1970) of a DICOM DT value, or of a DA + TM pair; None if unparsable."""
    if dt_value:
        text = str(dt_value).strip()
        for sep in ("+", "-"):
            if sep in text[8:]:
                text = text[: 8 + text[8:].index(sep)]  # drop the UTC offset
    elif time:
        text = (str(date).strip() if date else "19700101") + str(time).strip()
    else:
        return None
    if len(text) < 8:
        return None
    try:
        base = _dt.datetime.strptime(text[:8], "%Y%m%d")
    except ValueError:
        return None
    rest = text[8:].replace(":", "")
    frac = 0.0
    if "." in rest:
        rest, digits = rest.split(".", 1)
        frac = float("0." + digits) if digits.isdigit() else 0.0
    if not rest.isdigit() and rest:
        return None
    hh = int(rest[0:2]) if len(rest) >= 2 else 0
    mm = int(rest[2:4]) if len(rest) >= 4 else 0
    ss = int(rest[4:6]) if len(rest) >= 6 else 0
    return (base - _dt.datetime(1970, 1, 1)).total_seconds() + hh * 3600 + mm * 60 + ss + frac


def _item(groups: Sequence[Dataset], keyword: str) -> Dataset | None:
    """First item of functional-group sequence ``keyword`` (per-frame first, then shared)."""
    for g in groups:
        seq = g.get(keyword)
        if seq:
            item: Dataset = seq[0]
            return item
    return None


@dataclass
class _Frame:
    pixels: np.ndarray
    ipp: np.ndarray
    iop: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_spacing: float | None
    encoding: DiffusionEncoding | None
    flip_angle: float | None
    repetition_time: float | None
    echo_time: float | None
    inversion_time: float | None
    trigger_time: float | None
    acquisition_seconds: float | None
    temporal_position_index: int | None
    acquisition_order: int | None
    instance_number: int
    image_type: tuple[str, ...]
    source: SourceFrame


def _rescale(pixels: np.ndarray, slope: Any, intercept: Any) -> np.ndarray:
    out = pixels.astype(np.float32)
    s = first_float(slope)
    i = first_float(intercept)
    if s is not None and s != 1.0:
        out *= np.float32(s)
    if i:
        out += np.float32(i)
    return out


def _pixel_array(ds: Dataset) -> np.ndarray:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise MixedSeriesError(
            f"SOP Instance {ds.get('SOPInstanceUID', '?')} ({ds.get('Modality', '?')}) "
            "has no pixel data"
        )
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise MixedSeriesError(
            f"SOP Instance {ds.get('SOPInstanceUID', '?')} is not a greyscale image"
        )
    return ds.pixel_array


def _classic_common(ds: Dataset) -> dict[str, Any]:
    trigger = first_float(ds.get("TriggerTime"))
    return dict(
        flip_angle=first_float(ds.get("FlipAngle")),
        repetition_time=first_float(ds.get("RepetitionTime")),
        echo_time=first_float(ds.get("EchoTime")),
        inversion_time=first_float(ds.get("InversionTime")),
        trigger_time=None if trigger is None else trigger / 1000.0,
        acquisition_seconds=_datetime_seconds(ds.get("AcquisitionDateTime"))
        if ds.get("AcquisitionDateTime")
        else _datetime_seconds(
            None, ds.get("AcquisitionDate") or ds.get("SeriesDate"), ds.get("AcquisitionTime")
        ),
        temporal_position_index=_int(ds.get("TemporalPositionIdentifier")),
        acquisition_order=_int(private_value(ds, 0x2005, PHILIPS_MR_IMAGING_6, 0x96, "IS")),
        instance_number=_int(ds.get("InstanceNumber")) or 0,
        image_type=_strings(ds.get("ImageType")),
    )


def _mosaic_count(ds: Dataset) -> int | None:
    n = _int(private_value(ds, 0x0019, SIEMENS_MR_HEADER, 0x0A, "US"))
    if n is not None:
        return n
    raw = private_value(ds, 0x0029, SIEMENS_CSA_HEADER, 0x10, "OB")
    if raw is None:
        return None
    try:
        value = csareader.get_n_mosaic(csareader.read(bytes(raw)))
    except (csareader.CSAReadError, KeyError, ValueError):
        return None
    return None if value is None else int(value)


def _csa_slice_normal(ds: Dataset) -> np.ndarray | None:
    raw = private_value(ds, 0x0029, SIEMENS_CSA_HEADER, 0x10, "OB")
    if raw is None:
        return None
    try:
        normal = csareader.get_slice_normal(csareader.read(bytes(raw)))
    except (csareader.CSAReadError, KeyError, ValueError):
        return None
    return None if normal is None else np.asarray(normal, dtype=float)


def _uih_tiles(ds: Dataset) -> list[_Frame] | None:
    """De-tile a United Imaging ``VFRAME`` image (one volume as a grid of slices), or None.

    UIH writes the number of slices in "Image Private Header" (0065,xx50) and one item per slice,
    in tile order (row-major over the grid), with its own ImagePositionPatient in (0065,xx51); the
    tile matrix is (0065,xx04) ``"rows*cols"`` (dcm2niix reads the same elements).
    """
    items = private_value(ds, 0x0065, UIH_IMAGE_HEADER, 0x51, "SQ")
    if "VFRAME" not in _strings(ds.get("ImageType")) or not items:
        return None
    uid = str(ds.get("SOPInstanceUID", "?"))
    n = _int(private_value(ds, 0x0065, UIH_IMAGE_HEADER, 0x50, "DS")) or len(items)
    matrix = str(private_value(ds, 0x0065, UIH_IMAGE_HEADER, 0x04, "SH") or "")
    try:
        tr, tc = (int(v) for v in matrix.replace("x", "*").split("*"))
    except ValueError:
        raise InconsistentGeometryError(
            f"SOP Instance {uid}: UIH tiled image without a tile matrix (0065,xx04)"
        ) from None
    pixels = _rescale(_pixel_array(ds), ds.get("RescaleSlope"), ds.get("RescaleIntercept"))
    rows, cols = pixels.shape
    if rows % tr or cols % tc or len(items) < n or n > (rows // tr) * (cols // tc):
        raise InconsistentGeometryError(
            f"SOP Instance {uid}: UIH tiled image {rows}×{cols} cannot hold {n} tiles of {tr}×{tc} "
            f"({len(items)} slice positions)"
        )
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    ps = cast("tuple[float, float]", tuple(float(v) for v in ds.PixelSpacing))
    common = _classic_common(ds)
    encoding = _encoding(ds, orientation=iop)
    spacing = first_float(ds.get("SpacingBetweenSlices")) or first_float(ds.get("SliceThickness"))
    per_row = cols // tc
    frames = []
    for k in range(n):
        item = items[k]
        if "ImagePositionPatient" not in item:
            raise InconsistentGeometryError(
                f"SOP Instance {uid}: UIH tile {k} has no ImagePositionPatient"
            )
        r0, c0 = (k // per_row) * tr, (k % per_row) * tc
        frames.append(
            _Frame(
                pixels=pixels[r0 : r0 + tr, c0 : c0 + tc],
                ipp=np.asarray(item.ImagePositionPatient, dtype=float),
                iop=iop,
                pixel_spacing=ps,
                slice_spacing=spacing,
                encoding=encoding,
                source=SourceFrame(str(ds.SOPClassUID), uid, None, k),
                **common,
            )
        )
    return frames


def _frames_classic(ds: Dataset) -> list[_Frame]:
    uid = str(ds.get("SOPInstanceUID", "?"))
    tiles = _uih_tiles(ds)
    if tiles is not None:
        return tiles
    for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if kw not in ds or not ds[kw].value:
            raise InconsistentGeometryError(f"SOP Instance {uid} has no {kw}")
    ipp = np.asarray(ds.ImagePositionPatient, dtype=float)
    iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    ps = cast("tuple[float, float]", tuple(float(v) for v in ds.PixelSpacing))
    pixels = _rescale(_pixel_array(ds), ds.get("RescaleSlope"), ds.get("RescaleIntercept"))
    common = _classic_common(ds)
    encoding = _encoding(ds, orientation=iop)
    spacing = first_float(ds.get("SpacingBetweenSlices")) or first_float(ds.get("SliceThickness"))
    source_class = str(ds.SOPClassUID)
    image_type = common["image_type"]
    if "MOSAIC" in image_type:
        n = _mosaic_count(ds)
        if n is None or n < 1:
            raise InconsistentGeometryError(
                f"SOP Instance {uid} is a Siemens MOSAIC without NumberOfImagesInMosaic"
            )
        grid = math.ceil(math.sqrt(n))
        rows, cols = pixels.shape
        if rows % grid or cols % grid:
            raise InconsistentGeometryError(
                f"SOP Instance {uid}: mosaic {rows}×{cols} not divisible into {grid}×{grid} tiles"
            )
        tr, tc = rows // grid, cols // grid
        row_cos, col_cos = iop[:3], iop[3:]
        # ImagePositionPatient of a mosaic is that of the whole mosaic's corner
        # (nibabel MosaicWrapper).
        corner = ipp + row_cos * ps[1] * (cols - tc) / 2.0 + col_cos * ps[0] * (rows - tr) / 2.0
        normal = _csa_slice_normal(ds)
        if normal is None:
            normal = np.cross(row_cos, col_cos)
        if spacing is None:
            raise InconsistentGeometryError(f"SOP Instance {uid}: mosaic without slice spacing")
        frames = []
        for k in range(n):
            r0, c0 = (k // grid) * tr, (k % grid) * tc
            frames.append(
                _Frame(
                    pixels=pixels[r0 : r0 + tr, c0 : c0 + tc],
                    ipp=corner + k * spacing * normal,
                    iop=iop,
                    pixel_spacing=ps,
                    slice_spacing=spacing,
                    encoding=encoding,
                    source=SourceFrame(source_class, uid, None, k),
                    **common,
                )
            )
        return frames
    return [
        _Frame(
            pixels=pixels,
            ipp=ipp,
            iop=iop,
            pixel_spacing=ps,
            slice_spacing=spacing,
            encoding=encoding,
            source=SourceFrame(source_class, uid),
            **common,
        )
    ]


def _frames_enhanced(ds: Dataset) -> list[_Frame]:
    uid = str(ds.get("SOPInstanceUID", "?"))
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_item = shared[0] if shared else Dataset()
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    n_frames = int(ds.get("NumberOfFrames", 1))
    if len(per_frame) != n_frames:
        raise InconsistentGeometryError(
            f"SOP Instance {uid}: {len(per_frame)} per-frame functional groups "
            f"for {n_frames} frames"
        )
    pixels = _pixel_array(ds)
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    base = _classic_common(ds)
    frames = []
    for i, pf in enumerate(per_frame):
        groups = (pf, shared_item)
        pos = _item(groups, "PlanePositionSequence")
        ori = _item(groups, "PlaneOrientationSequence")
        meas = _item(groups, "PixelMeasuresSequence")
        if pos is None or ori is None or meas is None or "PixelSpacing" not in meas:
            raise InconsistentGeometryError(
                f"SOP Instance {uid} frame {i + 1}: plane position, orientation or pixel "
                "measures missing"
            )
        iop = np.asarray(ori.ImageOrientationPatient, dtype=float)
        timing = _item(groups, "MRTimingAndRelatedParametersSequence") or Dataset()
        echo = _item(groups, "MREchoSequence") or Dataset()
        modifier = _item(groups, "MRModifierSequence") or Dataset()
        content = _item(groups, "FrameContentSequence") or Dataset()
        ftype = _item(groups, "MRImageFrameTypeSequence") or Dataset()
        transform = _item(groups, "PixelValueTransformationSequence") or Dataset()
        inversion = (
            first_float(modifier.get("InversionTimes")) if "InversionTimes" in modifier else None
        )
        acq = content.get("FrameAcquisitionDateTime") or content.get("FrameReferenceDateTime")
        frames.append(
            _Frame(
                pixels=_rescale(
                    pixels[i],
                    transform.get("RescaleSlope", ds.get("RescaleSlope")),
                    transform.get("RescaleIntercept", ds.get("RescaleIntercept")),
                ),
                ipp=np.asarray(pos.ImagePositionPatient, dtype=float),
                iop=iop,
                pixel_spacing=cast(
                    "tuple[float, float]", tuple(float(v) for v in meas.PixelSpacing)
                ),
                slice_spacing=first_float(meas.get("SpacingBetweenSlices"))
                or first_float(meas.get("SliceThickness")),
                encoding=_encoding(ds, frame_groups=groups, orientation=iop),
                flip_angle=first_float(timing.get("FlipAngle")) or base["flip_angle"],
                repetition_time=first_float(timing.get("RepetitionTime"))
                or base["repetition_time"],
                echo_time=first_float(echo.get("EffectiveEchoTime")) or base["echo_time"],
                inversion_time=inversion if inversion is not None else base["inversion_time"],
                trigger_time=base["trigger_time"],
                acquisition_seconds=_datetime_seconds(acq) if acq else base["acquisition_seconds"],
                temporal_position_index=_int(content.get("TemporalPositionIndex")),
                acquisition_order=None,
                instance_number=base["instance_number"],
                image_type=_strings(ftype.get("FrameType")) or base["image_type"],
                source=SourceFrame(str(ds.SOPClassUID), uid, i + 1),
            )
        )
    return frames


def _physics(ds: Dataset) -> AcquisitionPhysics:
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_item = shared[0] if shared else Dataset()
    modifier = _item((shared_item,), "MRModifierSequence") or Dataset()
    if not modifier and ds.get("PerFrameFunctionalGroupsSequence"):
        modifier = (
            _item((ds.PerFrameFunctionalGroupsSequence[0],), "MRModifierSequence") or Dataset()
        )
    scanning = _strings(ds.get("ScanningSequence"))
    variant = _strings(ds.get("SequenceVariant"))
    options = _strings(ds.get("ScanOptions"))
    echo_pulse = str(ds.get("EchoPulseSequence", "") or "").upper()
    ti = first_float(ds.get("InversionTime"))
    if ti is None and "InversionTimes" in modifier:
        ti = first_float(modifier.InversionTimes)
    inversion = (
        "IR" in scanning
        or str(modifier.get("InversionRecovery", "")).upper() == "YES"
        or (ti is not None and ti > 0)
    )
    if not scanning and echo_pulse:
        scanning = tuple(
            x
            for x, ok in (
                ("IR", inversion),
                ("SE", echo_pulse in ("SPIN", "BOTH")),
                ("GR", echo_pulse in ("GRADIENT", "BOTH")),
            )
            if ok
        )
        if str(ds.get("EchoPlanarPulseSequence", "")).upper() == "YES":
            scanning = scanning + ("EP",)
    fat: str | None = None
    suppression = str(
        ds.get("SpectrallySelectedSuppression", "")
        or modifier.get("SpectrallySelectedSuppression", "")
        or ""
    ).upper()
    if any(o in ("FS", "FAT_SAT", "SFS", "SPAIR", "SPIR") for o in options) or "FAT" in suppression:
        fat = "spectral"
    elif inversion and ti is not None and 80.0 <= ti <= 300.0:
        # Short-TI inversion recovery nulls fat (STIR, TI ≈ 150–250 ms at 1.5–3 T).
        fat = "inversion"
    agent = ds.get("ContrastBolusAgent")
    if not agent and ds.get("ContrastBolusAgentSequence"):
        item = ds.ContrastBolusAgentSequence[0]
        agent = item.get("CodeMeaning") or item.get("CodeValue")
    if not agent:
        usage = _item((shared_item,), "ContrastBolusUsageSequence")
        if (
            usage is not None
            and str(usage.get("ContrastBolusAgentAdministered", "")).upper() == "YES"
        ):
            agent = "administered"
    return AcquisitionPhysics(
        manufacturer=str(ds.get("Manufacturer", "") or ""),
        model=str(ds.get("ManufacturerModelName", "") or ""),
        field_strength=first_float(ds.get("MagneticFieldStrength")),
        scanning_sequence=scanning,
        sequence_variant=variant,
        scan_options=options,
        sequence_name=str(ds.get("SequenceName", "") or ds.get("PulseSequenceName", "") or ""),
        mr_acquisition_type=str(ds.get("MRAcquisitionType", "") or "").upper(),
        echo_pulse_sequence=echo_pulse,
        fat_suppression=fat,
        inversion_recovery=bool(inversion),
        contrast_agent=str(agent) if agent else None,
        acquisition_contrast=str(ds.get("AcquisitionContrast", "") or "").upper(),
        image_type=_strings(ds.get("ImageType")),
    )


def _volume_key(f: _Frame) -> tuple[Hashable, ...]:
    """Parameters that distinguish volumes; frames sharing them at one position are repeats."""
    enc = f.encoding
    grad = None if enc is None or enc.gradient is None else tuple(round(c, 4) for c in enc.gradient)
    return (
        None if enc is None else round(enc.b_value, 4),
        grad,
        None if enc is None else enc.directionality,
        None if f.flip_angle is None else round(f.flip_angle, 3),
        None if f.echo_time is None else round(f.echo_time, 3),
        None if f.inversion_time is None else round(f.inversion_time, 3),
        f.temporal_position_index,
        None if f.trigger_time is None else round(f.trigger_time, 4),
        f.acquisition_order,
        f.image_type,
    )


def _order_key(f: _Frame) -> tuple[float, ...]:
    return (
        f.acquisition_order if f.acquisition_order is not None else -1,
        f.temporal_position_index if f.temporal_position_index is not None else -1,
        f.trigger_time if f.trigger_time is not None else -1.0,
        f.acquisition_seconds if f.acquisition_seconds is not None else -1.0,
        f.instance_number,
        f.source.frame_number or 0,
        f.source.mosaic_tile or 0,
    )


def read_series(datasets: Sequence[Dataset]) -> SeriesVolume:
    """Assemble the datasets of one MR (or other cross-sectional) series into volumes.

    Parameters
    ----------
    datasets : sequence of pydicom.dataset.Dataset
        Every image of one series: classic single-frame images (including Siemens mosaics) or one or
        more Enhanced MR multi-frame objects. Order does not matter.

    Returns
    -------
    SeriesVolume
        ``array`` (n_volumes, z, y, x) float32 with its :class:`Geometry`, per-volume
        :class:`VolumeMetadata`, per-slice :class:`SourceFrame` and :class:`AcquisitionPhysics`.

    Raises
    ------
    MixedSeriesError
        Empty input, several Series Instance UIDs, or a dataset without pixel data.
    DuplicateSliceError
        A SOP instance (frame) given twice, or one volume holding two frames at the same position.
    MissingSliceError
        A volume lacks a position the others have, or a gap in an otherwise regular stack.
    InconsistentGeometryError
        Mixed orientation, pixel spacing or matrix, irregular spacing, or a sheared stack.
    SeriesUnknownDiffusionEncodingError
        Diffusion-weighted images with no decodable encoding (also an
        :class:`~processing.diffusion_encoding.UnknownDiffusionEncodingError`).
    SeriesDiffusionEncodingError
        Inconsistent diffusion encoding (negative b, directional without a direction).
    """
    if not datasets:
        raise MixedSeriesError("no datasets given")
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(uids) != 1:
        raise MixedSeriesError(f"datasets belong to {len(uids)} series: {sorted(uids)}")
    series_uid = uids.pop()
    datasets, aside = split_set_aside(datasets, keep_segmentations=True)
    if not datasets:
        raise MixedSeriesError(f"series {series_uid} holds no image: {aside[0].reason}")
    seen: set[str] = set()
    frames: list[_Frame] = []
    for ds in datasets:
        sop = str(ds.get("SOPInstanceUID", ""))
        if sop in seen:
            raise DuplicateSliceError(f"series {series_uid}: SOP Instance {sop} given twice")
        seen.add(sop)
        if str(ds.get("SOPClassUID", "")) == ENHANCED_MR_IMAGE_STORAGE or (
            "PerFrameFunctionalGroupsSequence" in ds and int(ds.get("NumberOfFrames", 1)) >= 1
        ):
            frames.extend(_frames_enhanced(ds))
        else:
            frames.extend(_frames_classic(ds))
    frames, excluded = _without_derived(series_uid, frames)
    excluded = tuple(aside) + excluded
    first = next(
        (
            ds
            for ds in datasets
            if str(ds.get("SOPInstanceUID", "")) == frames[0].source.sop_instance_uid
        ),
        datasets[0],
    )
    return _assemble(series_uid, first, frames, excluded)


#: Image/Frame Type values of scanner-computed maps (PS3.3 C.8.13.1.1.1 and vendor usage: Siemens
#: EADC/EXP, Philips/GE FA and ADC): never diffusion-weighted images to fit.
DERIVED_MAP_TOKENS = frozenset({"ADC", "EADC", "EXP", "FA", "COLFA", "CALC_BVALUE", "MD"})
#: Image/Frame Type values of scanner-combined (trace) diffusion-weighted images.
TRACE_TOKENS = frozenset({"TRACEW", "TRACE", "ISOTROPIC"})


def _derived_reason(f: _Frame, directional_series: bool) -> str | None:
    """Why a frame is a scanner-derived image rather than an acquired one (None if acquired).

    Maps (ADC, FA, EADC…) and other DERIVED images are always derived; trace images (TRACEW, an
    isotropic image at b > 0 such as the Philips (2001,1004) = I image) only count as derived in a
    series that holds directional images, which they were computed from (a trace-only series —
    e.g. Siemens b0 ``NONE`` + b1000 ``TRACEW`` — is an acquisition in its own right).
    """
    tokens = set(f.image_type)
    enc = f.encoding
    text = "/".join(f.image_type)
    isotropic = enc is not None and not enc.is_b0 and enc.directionality == "ISOTROPIC"
    if tokens & DERIVED_MAP_TOKENS:
        return f"scanner-derived map (Image Type {text})"
    if directional_series and isotropic and enc is not None:
        if enc.source == "philips":
            return (
                f"Philips isotropic (trace) image, (2001,1004) = I, b = {enc.b_value:g} s/mm², "
                "computed by the scanner inside a directional series"
            )
        return f"isotropic (trace) image at b = {enc.b_value:g} s/mm² inside a directional series"
    if directional_series and tokens & TRACE_TOKENS:
        return f"scanner-combined trace image (Image Type {text}) inside a directional series"
    if f.image_type[:1] == ("DERIVED",) and not tokens & TRACE_TOKENS:
        return f"derived image (Image Type {text})"
    return None


def _without_derived(
    series_uid: str, frames: list[_Frame]
) -> tuple[list[_Frame], tuple[SetAside, ...]]:
    """Drop derived frames from a series that also holds acquired ones (one entry per volume).

    A series made only of derived images (a scanner ADC or TRACEW series) is kept whole: its role is
    decided by :mod:`processing.classify`.
    """
    directional = any(
        f.encoding is not None
        and f.encoding.gradient is not None
        and not set(f.image_type) & (TRACE_TOKENS | DERIVED_MAP_TOKENS)
        for f in frames
    )
    reasons = [_derived_reason(f, directional) for f in frames]
    if not any(reasons) or all(reasons):
        return frames, ()
    kept = [f for f, r in zip(frames, reasons) if r is None]
    dropped: dict[tuple[str, tuple[Hashable, ...]], list[_Frame]] = defaultdict(list)
    for f, r in zip(frames, reasons):
        if r is not None:
            dropped[(r, _volume_key(f))].append(f)
    excluded = []
    for (reason, _), members in dropped.items():
        sops = sorted({m.source.sop_instance_uid for m in members})
        excluded.append(
            SetAside(
                reason=f"{reason}: left out of fitting ({len(members)} frame(s))",
                sop_instance_uid=sops[0] if len(sops) == 1 else f"{len(sops)} SOP instances",
                sop_class_uid=members[0].source.sop_class_uid,
                series_instance_uid=series_uid,
            )
        )
    logger.info("series %s: %d derived volume(s) left out", series_uid, len(excluded))
    return kept, tuple(excluded)


def _assemble(
    series_uid: str, first: Dataset, frames: list[_Frame], excluded: tuple[SetAside, ...] = ()
) -> SeriesVolume:
    ref = frames[0]
    for f in frames:
        if np.max(np.abs(f.iop - ref.iop)) > ORIENTATION_TOLERANCE:
            raise InconsistentGeometryError(
                f"series {series_uid}: mixed ImageOrientationPatient {ref.iop.round(4).tolist()} "
                f"and {f.iop.round(4).tolist()} (SOP Instance {f.source.sop_instance_uid})"
            )
        if f.pixels.shape != ref.pixels.shape:
            raise InconsistentGeometryError(
                f"series {series_uid}: mixed matrix {ref.pixels.shape} and {f.pixels.shape} "
                f"(SOP Instance {f.source.sop_instance_uid})"
            )
        if not np.allclose(f.pixel_spacing, ref.pixel_spacing, rtol=1e-4, atol=1e-4):
            raise InconsistentGeometryError(
                f"series {series_uid}: mixed PixelSpacing {ref.pixel_spacing} and "
                f"{f.pixel_spacing} (SOP Instance {f.source.sop_instance_uid})"
            )
    row, col = ref.iop[:3], ref.iop[3:]
    normal = np.cross(row, col)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3 or abs(float(np.dot(row, col))) > 1e-3:
        raise InconsistentGeometryError(
            f"series {series_uid}: ImageOrientationPatient is not two orthonormal vectors"
        )
    normal /= np.linalg.norm(normal)
    # Cluster slice positions along the normal.
    dist = np.array([float(np.dot(f.ipp, normal)) for f in frames])
    order = np.argsort(dist, kind="stable")
    tol_pos = 1e-2 * min(ref.pixel_spacing) if ref.pixel_spacing else 1e-3
    pos_index = np.empty(len(frames), dtype=int)
    centres: list[float] = []
    for idx in order:
        if not centres or dist[idx] - centres[-1] > max(tol_pos, 1e-3):
            centres.append(float(dist[idx]))
        pos_index[idx] = len(centres) - 1
    n_pos = len(centres)
    # Group frames into volumes.
    by_key: dict[tuple[Hashable, ...], list[int]] = defaultdict(list)
    for i, f in enumerate(frames):
        by_key[_volume_key(f)].append(i)
    volumes: list[list[int]] = []
    for key, members in by_key.items():
        per_pos: dict[int, list[int]] = defaultdict(list)
        for i in members:
            per_pos[int(pos_index[i])].append(i)
        counts = Counter(len(per_pos.get(p, [])) for p in range(n_pos))
        repeats = counts.most_common(1)[0][0] or max(counts)
        extra = [p for p in range(n_pos) if len(per_pos.get(p, [])) > repeats]
        if extra:
            raise DuplicateSliceError(
                f"series {series_uid}: slice position(s) {[round(centres[p], 3) for p in extra]} "
                f"mm along the normal appear more often than the other {n_pos - len(extra)} in the "
                f"volume(s) with b/flip/TE/TI/time key {key}: duplicated slice"
            )
        short = [p for p in range(n_pos) if len(per_pos.get(p, [])) < repeats]
        if short or repeats == 0:
            raise MissingSliceError(
                f"series {series_uid}: volume(s) with b/flip/TE/TI/time key {key} lack slice "
                f"position(s) {[round(centres[p], 3) for p in short]} mm along the normal "
                f"({len(short)} of {n_pos} positions incomplete): missing slice"
            )
        for p in per_pos:
            per_pos[p].sort(key=lambda i: _order_key(frames[i]))
        for j in range(repeats):
            volumes.append([per_pos[p][j] for p in range(n_pos)])
    if n_pos > 1:
        steps = np.diff(centres)
        step = float(np.median(steps))
        if np.any(steps > step * (1.5)):
            gap = int(np.argmax(steps))
            raise MissingSliceError(
                f"series {series_uid}: gap of {steps[gap]:.3f} mm between slices at "
                f"{centres[gap]:.3f} and {centres[gap + 1]:.3f} mm (regular spacing {step:.3f} "
                "mm): missing slice"
            )
        if np.any(np.abs(steps - step) > SPACING_TOLERANCE * step):
            raise InconsistentGeometryError(
                f"series {series_uid}: irregular slice spacing {np.round(steps, 3).tolist()} mm"
            )
    else:
        step = ref.slice_spacing or 1.0
    # Stack must be a straight line along the normal (no shear / gantry tilt).
    first_of_pos = {}
    for vol in volumes[:1]:
        for p, i in enumerate(vol):
            first_of_pos[p] = frames[i].ipp
    origin = first_of_pos[0]
    for p in range(1, n_pos):
        expected = origin + normal * (centres[p] - centres[0])
        if np.linalg.norm(first_of_pos[p] - expected) > SPACING_TOLERANCE * max(step, 1.0):
            raise InconsistentGeometryError(
                f"series {series_uid}: slice {p} is displaced in-plane by "
                f"{np.linalg.norm(first_of_pos[p] - expected):.3f} mm (sheared stack)"
            )
    volumes.sort(key=lambda vol: min(_order_key(frames[i]) for i in vol))
    array = np.stack([np.stack([frames[i].pixels for i in vol]) for vol in volumes]).astype(
        np.float32
    )
    direction = np.column_stack([row, col, normal])
    geometry = Geometry(
        origin=cast("tuple[float, float, float]", tuple(float(v) for v in origin)),
        spacing=(float(ref.pixel_spacing[1]), float(ref.pixel_spacing[0]), float(step)),
        direction=tuple(float(v) for v in direction.reshape(-1)),
        size=(int(array.shape[3]), int(array.shape[2]), int(array.shape[1])),
    )
    metas = _volume_metadata(frames, volumes)
    sources = tuple(tuple(frames[i].source for i in vol) for vol in volumes)
    logger.debug("series %s: %d volume(s) of %s voxels", series_uid, len(volumes), geometry.size)
    return SeriesVolume(
        series_instance_uid=series_uid,
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        modality=str(first.get("Modality", "")),
        sop_class_uid=str(first.get("SOPClassUID", "")),
        series_number=_int(first.get("SeriesNumber")),
        series_description=str(first.get("SeriesDescription", "") or ""),
        array=array,
        geometry=geometry,
        volumes=metas,
        source_frames=sources,
        physics=_physics(first),
        excluded=excluded,
    )


def _volume_metadata(frames: list[_Frame], volumes: list[list[int]]) -> tuple[VolumeMetadata, ...]:
    trig = [frames[vol[0]].trigger_time for vol in volumes]
    acq = [
        min((a for i in vol if (a := frames[i].acquisition_seconds) is not None), default=None)
        for vol in volumes
    ]
    # Only used as lists of floats once every entry is known not to be None.
    trig_known = cast("list[float]", trig)
    acq_known = cast("list[float]", acq)
    use_trigger = all(t is not None for t in trig) and len({round(t, 4) for t in trig_known}) > 1
    if use_trigger:
        t0 = min(trig_known)
        times: list[float | None] = [t - t0 for t in trig_known]
    elif all(a is not None for a in acq):
        t0 = min(acq_known)
        times = [a - t0 for a in acq_known]
    else:
        times = [None] * len(volumes)
    out = []
    for vol, t in zip(volumes, times):
        f = frames[vol[0]]
        enc = f.encoding
        out.append(
            VolumeMetadata(
                b_value=None if enc is None else enc.b_value,
                gradient=None if enc is None else enc.gradient,
                diffusion_directionality=None if enc is None else enc.directionality,
                flip_angle=f.flip_angle,
                repetition_time=f.repetition_time,
                echo_time=f.echo_time,
                inversion_time=f.inversion_time,
                time=None if t is None else float(t),
                trigger_time=f.trigger_time,
                temporal_position_index=f.temporal_position_index,
                image_type=f.image_type,
            )
        )
    return tuple(out)


__all__ = [
    "AcquisitionPhysics",
    "DuplicateSliceError",
    "Geometry",
    "InconsistentGeometryError",
    "MissingSliceError",
    "MixedSeriesError",
    "SeriesDiffusionEncodingError",
    "SeriesError",
    "SeriesUnknownDiffusionEncodingError",
    "SeriesVolume",
    "SetAside",
    "SourceFrame",
    "VolumeMetadata",
    "group_by_series",
    "read_series",
    "set_aside_entry",
    "set_aside_reason",
    "split_set_aside",
]
