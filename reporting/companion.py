"""Derived 3-D companion series that the Parametric Maps reference (one image per map frame).

Why
---
cornerstone3D viewers (OHIF) load a Parametric Map only when its Referenced Series is a plain 3-D
series with one image per map frame, on the map's grid, matched frame by frame through the
Derivation Image Sequence. The maps are computed on 4-D acquisitions (a DWI series with every
b-value and direction, a dynamic series, a multi-flip VFA series; Siemens mosaics and United
Imaging tiled images hold a whole volume in one stored image), which such viewers cannot use as a
reference. For every source series of the exported maps the node therefore writes a companion
series: classic MR Image Storage, one single-frame image per slice of the map's grid (same Rows,
Columns, Image Orientation/Position (Patient), Pixel Spacing and Frame of Reference), and builds
the maps on it (docs/conformance.md §2.1).

Pixel data (a display reference, not a quantitative image)
-----------------------------------------------------------
* Diffusion series: the lowest-b trace image — the mean of the b ≈ 0 volumes
  (b < ``processing.diffusion_encoding.B0_THRESHOLD``), or, when the lowest b is not zero, the
  geometric mean of the volumes of the lowest shell (the trace-weighted image of that shell). The
  b = 0 image has the highest signal-to-noise ratio and shows the anatomy the maps are read on.
* Dynamic (DCE) series: the mean of the pre-contrast frames (the frames before the bolus arrival
  found by the DCE fit, ``n_baseline_frames`` of the map provenance), or the first time point when
  that number is not known. The pre-contrast mean has more signal-to-noise than one frame and no
  enhancement that would depend on the timing.
* Variable flip angle series: the volume with the largest flip angle among the series' own
  images. At the short TR of a VFA acquisition it is the most T1-weighted volume (fat bright,
  marrow lesions dark), the contrast a T1 map is compared with; the low flip angles are nearly
  proton-density weighted. When the VFA volumes come from one series per flip angle, only the
  series the map references is used (its single flip angle).
* Any other series: its first volume.

Values are the source's modality values (after Rescale Slope/Intercept) rounded to unsigned
16-bit integers; when the largest value does not fit (or leaves fewer than 256 grey levels) the
image is scaled linearly to 0..4095 and the Derivation Description says so.

Header
------
Patient, General Study and Patient Study attributes are copied from an original image of the
series (sanitised like the other builders, :func:`reporting.seg.sanitized_source`), the MR
acquisition attributes from the assembled series (:class:`processing.series.AcquisitionPhysics`
and the selected volume's metadata, which also covers Enhanced MR sources), the equipment is the
node's (:data:`reporting.seg.MANUFACTURER`). Image Type ``DERIVED\\SECONDARY\\OTHER``, Derivation
Code (113091, DCM, "Spatially-related frames extracted from the volume"), plus (113049, DCM,
"Pixel by pixel mean") when volumes were averaged (CID 7203), and a Source Image Sequence per
image naming every original frame it was made from (with Referenced Frame Number for multi-frame
sources; a mosaic/tiled image is named as a whole). The node recognises its own companion series
when they come back and sets them aside (:func:`processing.classify.companion_set_aside_reason`).

UIDs are deterministic (:func:`reporting.uids.deterministic_uid`): the same inputs, settings and
algorithm version give the same series and instance UIDs.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import MRImageStorage
from pydicom.valuerep import DSfloat

from processing.diffusion_encoding import B0_THRESHOLD
from processing.errors import InputError
from processing.series import SeriesVolume, SourceFrame
from reporting.header import derived_dataset
from reporting.seg import DEVICE_SERIAL_NUMBER, MANUFACTURER, MODEL_NAME, sanitized_source
from reporting.uids import deterministic_uid, digest_text, digest_uids

logger = logging.getLogger(__name__)

#: Series Number of the first companion series of a study (the next ones count up).
COMPANION_SERIES_NUMBER_BASE = 9080
#: Image Type of every companion image (PS3.3 C.8.3.1.1.1: value 3 ``OTHER``).
IMAGE_TYPE = ("DERIVED", "SECONDARY", "OTHER")
#: (113091, DCM) "Spatially-related frames extracted from the volume" (CID 7203)
EXTRACTED_CODE = codes.DCM.SpatiallyRelatedFramesExtractedFromTheVolume
#: (113049, DCM) "Pixel by pixel mean" (CID 7203), when several volumes were averaged
MEAN_CODE = codes.DCM.PixelByPixelMean
#: (121322, DCM) "Source image for image processing operation" (CID 7202)
SOURCE_PURPOSE_CODE = codes.DCM.SourceImageForImageProcessingOperation
#: lowest-b shell: b-values within max(this, 5 %) of the lowest b (classification's shell rule)
_SHELL_ABS_TOLERANCE = 25.0
_SHELL_REL_TOLERANCE = 0.05
#: stored values are rescaled to 0.._SCALED_MAX when the data do not fit 16 bits usefully
_SCALED_MAX = 4095.0
_MIN_GREY_LEVELS = 255.0


class CompanionError(InputError):
    """The companion series cannot be built from the given series (the message says why)."""


@dataclass(frozen=True)
class CompanionSelection:
    """Which volumes of the series make the companion's pixels, and how.

    Attributes
    ----------
    volumes : tuple of int
        Indices into the series' volumes.
    combine : str
        ``"single"``, ``"mean"`` (arithmetic) or ``"geometric mean"``.
    label : str
        Short text for the Series Description (e.g. ``"b=0"``, ``"pre-contrast mean"``).
    description : str
        Sentence for the Derivation Description.
    """

    volumes: tuple[int, ...]
    combine: str
    label: str
    description: str


def _own_volumes(volume: SeriesVolume, datasets_by_uid: Mapping[str, Dataset]) -> list[int]:
    """Volumes whose every stored frame is among the given datasets (the series' own images)."""
    own = [
        v
        for v, frames in enumerate(volume.source_frames)
        if frames and all(f.sop_instance_uid in datasets_by_uid for f in frames)
    ]
    if not own:
        raise CompanionError(
            f"none of the volumes of series {volume.series_instance_uid} has all its images "
            "among the datasets given"
        )
    return own


def select_volumes(
    volume: SeriesVolume,
    datasets_by_uid: Mapping[str, Dataset],
    *,
    pre_contrast_frames: int | None = None,
) -> CompanionSelection:
    """Choose the volumes of ``volume`` the companion is made of (see module notes).

    Parameters
    ----------
    volume : processing.series.SeriesVolume
        The assembled source series of the maps.
    datasets_by_uid : mapping
        The series' datasets by SOP Instance UID (volumes with images elsewhere are not used).
    pre_contrast_frames : int, optional
        Number of pre-contrast frames of a dynamic series (from the DCE fit).
    """
    own = _own_volumes(volume, datasets_by_uid)
    b = volume.b_values
    diffusion = [v for v in own if np.isfinite(b[v])]
    if diffusion and float(np.nanmax(b[diffusion])) >= B0_THRESHOLD:
        lowest = min(float(b[v]) for v in diffusion)
        if lowest < B0_THRESHOLD:
            chosen = tuple(v for v in diffusion if float(b[v]) < B0_THRESHOLD)
            label = "b=0"
            combine = "mean" if len(chosen) > 1 else "single"
        else:
            tolerance = max(_SHELL_ABS_TOLERANCE, _SHELL_REL_TOLERANCE * lowest)
            chosen = tuple(v for v in diffusion if float(b[v]) - lowest <= tolerance)
            label = f"b={lowest:g} trace"
            combine = "geometric mean" if len(chosen) > 1 else "single"
        how = {
            "single": "the volume",
            "mean": f"the mean of the {len(chosen)} volumes",
            "geometric mean": f"the geometric mean (trace) of the {len(chosen)} volumes",
        }[combine]
        return CompanionSelection(
            chosen, combine, label, f"Lowest-b image: {how} at {label.split()[0]} s/mm2"
        )
    flips = {v: volume.volumes[v].flip_angle for v in own}
    known_flips = {v: f for v, f in flips.items() if f is not None}
    if len(set(known_flips.values())) >= 2:
        v_max = max(known_flips, key=lambda v: (known_flips[v], -v))
        label = f"flip {known_flips[v_max]:g} deg"
        return CompanionSelection(
            (v_max,),
            "single",
            label,
            f"Largest flip angle volume ({label})",
        )
    if len(own) >= 2:
        n_pre = 1 if pre_contrast_frames is None else int(pre_contrast_frames)
        if n_pre < 1:
            raise CompanionError(f"pre_contrast_frames must be >= 1, got {pre_contrast_frames}")
        chosen = tuple(own[:n_pre])
        if len(chosen) > 1:
            return CompanionSelection(
                chosen,
                "mean",
                "pre-contrast mean",
                f"Mean of the {len(chosen)} pre-contrast time points",
            )
        return CompanionSelection(
            chosen, "single", "pre-contrast", "First (pre-contrast) time point"
        )
    return CompanionSelection((own[0],), "single", "volume 1", "First volume")


def _combined(volume: SeriesVolume, selection: CompanionSelection) -> np.ndarray:
    """(z, y, x) float64 image of the selected volumes."""
    stack = np.asarray(volume.array, dtype=np.float64)[list(selection.volumes)]
    stack = np.where(np.isfinite(stack), stack, 0.0)
    if selection.combine == "geometric mean":
        with np.errstate(divide="ignore"):
            logs = np.log(np.clip(stack, 0.0, None))
        combined: np.ndarray = np.exp(logs.mean(axis=0))
        return np.where(np.isfinite(combined), combined, 0.0)
    mean: np.ndarray = stack.mean(axis=0)
    return mean


def _to_uint16(image: np.ndarray) -> tuple[np.ndarray, float]:
    """Unsigned 16-bit pixels and the factor applied (1.0: the source's values, rounded)."""
    values = np.clip(image, 0.0, None)
    top = float(values.max()) if values.size else 0.0
    scale = 1.0
    if top > 65535.0 or 0.0 < top < _MIN_GREY_LEVELS:
        scale = _SCALED_MAX / top
    return np.rint(values * scale).astype(np.uint16), scale


def _window(pixels: np.ndarray) -> tuple[float, float]:
    """Window centre and width covering the 0.5-99.5 percentiles of the non-zero pixels."""
    nonzero = pixels[pixels > 0]
    if nonzero.size == 0:
        return 0.5, 1.0
    low, high = (float(v) for v in np.percentile(nonzero, [0.5, 99.5]))
    width = max(high - low, 1.0)
    return low + width / 2.0, width


def _ds(value: float) -> DSfloat:
    return DSfloat(float(value), auto_format=True)


def _source_item(frame: SourceFrame) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = frame.sop_class_uid
    item.ReferencedSOPInstanceUID = frame.sop_instance_uid
    if frame.frame_number is not None:
        item.ReferencedFrameNumber = int(frame.frame_number)
    item.PurposeOfReferenceCodeSequence = DicomSequence([_code_item(SOURCE_PURPOSE_CODE)])
    return item


def _code_item(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


#: Patient Study (and other patient-level) attributes copied from the template when present
_PATIENT_STUDY_EXTRA = ("PatientAge", "PatientSize", "PatientWeight")
#: General Series / acquisition attributes copied from the template's top level when present
_TEMPLATE_KEYWORDS = (
    "BodyPartExamined",
    "PatientPosition",
    "ContrastBolusAgent",
    "ContrastBolusRoute",
    "ImagedNucleus",
    "ImagingFrequency",
    "EchoTrainLength",
    "MagneticFieldStrength",
)


def _acquisition_attributes(
    ds: Dataset, volume: SeriesVolume, template: Dataset, index: int
) -> None:
    """MR Image module acquisition attributes, from the assembled series, else the template."""
    physics = volume.physics
    meta = volume.volumes[index]
    for keyword in _TEMPLATE_KEYWORDS:
        value = template.get(keyword)
        if value not in (None, ""):
            setattr(ds, keyword, value)
    scanning = list(physics.scanning_sequence) or list(template.get("ScanningSequence") or [])
    ds.ScanningSequence = scanning or ["RM"]
    variant = list(physics.sequence_variant) or list(template.get("SequenceVariant") or [])
    ds.SequenceVariant = variant or ["NONE"]
    options = list(physics.scan_options) or list(template.get("ScanOptions") or [])
    ds.ScanOptions = options or ""
    acquisition = physics.mr_acquisition_type or str(template.get("MRAcquisitionType", "") or "")
    ds.MRAcquisitionType = acquisition if acquisition in ("2D", "3D") else ""
    ds.RepetitionTime = "" if meta.repetition_time is None else _ds(meta.repetition_time)
    ds.EchoTime = "" if meta.echo_time is None else _ds(meta.echo_time)
    if "EchoTrainLength" not in ds:
        ds.EchoTrainLength = ""
    if "IR" in ds.ScanningSequence or meta.inversion_time is not None:
        ds.InversionTime = "" if meta.inversion_time is None else _ds(meta.inversion_time)
    if meta.flip_angle is not None:
        ds.FlipAngle = _ds(meta.flip_angle)
    if physics.sequence_name:
        ds.SequenceName = physics.sequence_name[:16]
    if "MagneticFieldStrength" not in ds and physics.field_strength is not None:
        ds.MagneticFieldStrength = _ds(physics.field_strength)
    if "ContrastBolusAgent" not in ds and physics.contrast_agent:
        ds.ContrastBolusAgent = physics.contrast_agent[:64]


def build_companion_series(
    volume: SeriesVolume,
    datasets_by_uid: Mapping[str, Dataset],
    *,
    algorithm_version: str,
    pre_contrast_frames: int | None = None,
    series_number: int = COMPANION_SERIES_NUMBER_BASE,
    input_digest: str | None = None,
) -> list[Dataset]:
    """Build the companion series of ``volume``: one MR image per slice of its grid.

    Parameters
    ----------
    volume : processing.series.SeriesVolume
        The assembled source series of the maps (classic, Enhanced MR multi-frame, Siemens mosaic
        or United Imaging tiled). The maps are on ``volume.geometry``.
    datasets_by_uid : mapping
        The series' datasets by SOP Instance UID (header templates and references).
    algorithm_version : str
        Software version written in the images and part of the UIDs.
    pre_contrast_frames : int, optional
        Pre-contrast frames of a dynamic series (``n_baseline_frames`` of the DCE fit).
    series_number : int, optional
        Series Number of the companion series.
    input_digest : str, optional
        Input digest for the deterministic UIDs; default: the SOP Instance UIDs of the series'
        datasets, the selection and the series UID.

    Returns
    -------
    list of pydicom.Dataset
        ``result[k]`` is slice ``k`` of ``volume.geometry`` (the order of the map's frames).

    Raises
    ------
    CompanionError
        No usable volume, or images of the series that are not given.

    References
    ----------
    PS3.3 A.4 MR Image IOD; C.7.6.1 General Image (Derivation Code, Source Image Sequence);
    C.8.3.1 MR Image (Image Type); CID 7202, 7203.
    """
    if not algorithm_version:
        raise ValueError("algorithm_version must be given")
    selection = select_volumes(volume, datasets_by_uid, pre_contrast_frames=pre_contrast_frames)
    geometry = volume.geometry
    size_x, size_y, size_z = (int(v) for v in geometry.size)
    first_volume = selection.volumes[0]
    frames_by_slice = [
        [volume.source_frames[v][k] for v in selection.volumes] for k in range(size_z)
    ]
    template = sanitized_source(datasets_by_uid[frames_by_slice[0][0].sop_instance_uid])
    pixels, scale = _to_uint16(_combined(volume, selection))
    if pixels.shape != (size_z, size_y, size_x):
        raise CompanionError(f"volume array {pixels.shape} does not match its grid {geometry.size}")
    center, width = _window(pixels)
    if input_digest is None:
        input_digest = digest_text(
            digest_uids(datasets_by_uid.values()),
            volume.series_instance_uid,
            repr(selection),
        )
    study_uid = str(template.StudyInstanceUID)

    def uid(kind: str) -> str:
        return deterministic_uid(
            source_study_uid=study_uid,
            tracking_uid=None,
            kind=f"companion/{kind}",
            algorithm_version=algorithm_version,
            input_digest=digest_text(input_digest, volume.series_instance_uid),
        )

    series_uid = uid("series")
    direction = geometry.direction_matrix
    orientation = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
    normal = direction[:, 2]
    spacing = [float(v) for v in geometry.spacing]
    thickness = template.get("SliceThickness")
    if thickness in (None, "") and "SharedFunctionalGroupsSequence" in template:
        measures = template.SharedFunctionalGroupsSequence[0].get("PixelMeasuresSequence")
        thickness = measures[0].get("SliceThickness") if measures else None
    slice_thickness = _ds(float(thickness) if thickness not in (None, "") else spacing[2])
    source_text = str(volume.series_description or template.get("SeriesDescription", "") or "")
    suffix = f"{selection.label}, map reference"
    description = f"{source_text[: 64 - len(suffix) - 1]} {suffix}".strip()[:64]
    derivation = (
        f"{selection.description} of series {volume.series_number or '?'} "
        f"({volume.series_instance_uid}), on the grid of the Parametric Maps made from it; "
        "a display reference, not a quantitative image"
    )
    if scale != 1.0:
        derivation += f"; signal scaled by {scale:.6g} to 0-{_SCALED_MAX:g}"
    derivation_codes = [_code_item(EXTRACTED_CODE)]
    if selection.combine != "single":
        derivation_codes.append(_code_item(MEAN_CODE))
    now = datetime.datetime.now(datetime.timezone.utc)
    out: list[Dataset] = []
    for k in range(size_z):
        sop_uid = uid(f"instance/{k + 1}")
        ds = derived_dataset(MRImageStorage, sop_uid, template)
        for keyword in _PATIENT_STUDY_EXTRA:
            if template.get(keyword) not in (None, ""):
                setattr(ds, keyword, template.get(keyword))
        ds.ImageType = list(IMAGE_TYPE)
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = volume.frame_of_reference_uid
        ds.PositionReferenceIndicator = template.get("PositionReferenceIndicator", "") or ""
        ds.Manufacturer = MANUFACTURER
        ds.ManufacturerModelName = MODEL_NAME
        ds.DeviceSerialNumber = DEVICE_SERIAL_NUMBER
        ds.SoftwareVersions = algorithm_version
        _acquisition_attributes(ds, volume, template, first_volume)
        if "PatientPosition" not in ds:
            ds.PatientPosition = ""
        ds.DerivationDescription = derivation[:1024]
        ds.DerivationCodeSequence = DicomSequence(derivation_codes)
        references = list(dict.fromkeys(frames_by_slice[k]))
        ds.SourceImageSequence = DicomSequence([_source_item(f) for f in references])
        ds.BurnedInAnnotation = "NO"
        position = geometry.index_to_lps((0.0, 0.0, float(k)))
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]
        ds.SliceThickness = slice_thickness
        ds.SpacingBetweenSlices = _ds(spacing[2])
        ds.SliceLocation = _ds(float(np.dot(normal, position)))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = size_y
        ds.Columns = size_x
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.WindowCenter = _ds(center)
        ds.WindowWidth = _ds(width)
        ds.LossyImageCompression = "00"
        ds.PixelData = np.ascontiguousarray(pixels[k]).tobytes()
        out.append(ds)
    logger.info(
        "built companion series %s (%d images, %s) of series %s",
        series_uid,
        len(out),
        selection.label,
        volume.series_instance_uid,
    )
    return out
