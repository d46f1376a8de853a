"""Diffusion encoding (b-value and gradient direction) of MR images, for every vendor.

Pure functions on pydicom datasets. The b-value is returned in s/mm² and the gradient as a unit
vector in the DICOM patient coordinate system (LPS), whatever the vendor wrote. Private elements are
always found through their private creator (:meth:`pydicom.dataset.Dataset.private_block`), never by
a fixed element number, because the block a creator reserves varies between files.

Sources, in order of preference (docs/science.md §3.5):

1. Enhanced MR per-frame / shared functional groups: MR Diffusion Sequence (0018,9117).
2. Standard attributes in a classic image: DiffusionBValue (0018,9087), DiffusionGradientOrientation
   (0018,9089) or its Diffusion Gradient Direction Sequence (0018,9076).
3. Siemens: "SIEMENS MR HEADER" (0019,xx0C) B_value and (0019,xx0E) DiffusionGradientDirection, or
   the CSA Image Header Info (0029,xx10) of "SIEMENS CSA HEADER" (``B_value``,
   ``DiffusionGradientDirection``). Vectors are in patient coordinates.
4. GE: b-value = first value of "GEMS_PARM_01" (0043,xx39), modulo 10⁹ (GE adds a 10⁹ offset on some
   releases); gradient = "GEMS_ACQU_01" (0019,xxBB/xxBC/xxBD) in the *logical* (frequency, phase,
   slice) frame, rotated to LPS here following dcm2niix ``geCorrectBvecs``.
5. Philips: "Philips Imaging DD 001" (2001,xx03) b-value, (2001,xx04) direction label ("I" =
   isotropic), "Philips MR Imaging DD 001" (2005,xxB0/xxB1/xxB2) gradient RL/AP/FH (patient frame).
6. United Imaging (UIH): "Image Private Header" (0065,xx09) *effective* b-value (the one dcm2niix
   writes to ``.bval``, e.g. 929.75 for a nominal 1000 in (0065,xx0A), 1.25 for a nominal 0),
   falling back to the nominal (0065,xx0A); gradient (0065,xx37) in patient coordinates (LPS), as
   dcm2niix reads it (a zero vector at b > 0 would be an isotropic image).

References
----------
.. [1] DICOM PS3.3 C.8.13.5.9 MR Diffusion Macro; C.8.3.1 MR Image Module.
.. [2] C. Rorden et al., dcm2niix, ``console/nii_dicom.cpp`` and ``nii_dicom_batch.cpp``
       (``geCorrectBvecs``, ``siemensPhilipsCorrectBvecs``), https://github.com/rordenlab/dcm2niix
.. [3] dcm2niix vendor notes: ``GE/README.md``, ``Philips/README.md``, ``Siemens/README.md``.
"""

from __future__ import annotations

import logging
import math
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from processing.errors import InputError

with warnings.catch_warnings():
    # nibabel warns on import of its (unused here) experimental DICOM wrappers; we only use the CSA
    # header parser.
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader

logger = logging.getLogger(__name__)

#: b-values below this (s/mm²) are treated as b = 0: Philips stores repeated b0 volumes as
#: b = 0.001…0.004 with a dummy direction (data README, dcm2niix).
B0_THRESHOLD = 5.0

#: GE adds this offset to the b-value in (0043,xx39) on some software releases.
GE_B_VALUE_OFFSET = 1_000_000_000

SIEMENS_MR_HEADER = "SIEMENS MR HEADER"
SIEMENS_CSA_HEADER = "SIEMENS CSA HEADER"
GE_ACQU = "GEMS_ACQU_01"
GE_PARM = "GEMS_PARM_01"
PHILIPS_IMAGING_1 = "Philips Imaging DD 001"
PHILIPS_MR_IMAGING_1 = "Philips MR Imaging DD 001"
UIH_IMAGE_HEADER = "Image Private Header"


class DiffusionEncodingError(InputError):
    """The diffusion encoding of an image is present but cannot be used (inconsistent values)."""


class UnknownDiffusionEncodingError(DiffusionEncodingError):
    """An image is diffusion-weighted but carries no encoding this module can decode."""


@dataclass(frozen=True)
class DiffusionEncoding:
    """Diffusion encoding of one image (frame).

    Attributes
    ----------
    b_value : float
        Nominal b-value in s/mm² (as the scanner reports it; Philips b0 repeats stay 0.001…0.004).
    gradient : tuple of float or None
        Unit gradient direction in DICOM patient coordinates (LPS); ``None`` for b ≈ 0
        (b < :data:`B0_THRESHOLD`) and for isotropic (trace) images.
    directionality : str
        ``"DIRECTIONAL"``, ``"ISOTROPIC"`` (trace or scanner-combined image), ``"NONE"`` (b = 0) or
        ``"BMATRIX"`` — the defined terms of Diffusion Directionality (0018,9075).
    source : str
        Where the values came from: ``"enhanced"``, ``"standard"``, ``"siemens"``,
        ``"siemens_csa"``, ``"ge"`` or ``"philips"``.
    """

    b_value: float
    gradient: tuple[float, float, float] | None
    directionality: str
    source: str

    @property
    def is_b0(self) -> bool:
        """True when the image is effectively unweighted (b < :data:`B0_THRESHOLD` s/mm²)."""
        return self.b_value < B0_THRESHOLD


# --------------------------------------------------------------------------- private element access
_STRUCT = {"FL": "<f", "FD": "<d", "SL": "<l", "SS": "<h", "UL": "<L", "US": "<H"}


def _decode(value: Any, vr: str, expected_vr: str) -> Any:
    """Return a private element value, decoding raw bytes when the VR was unknown (UN)."""
    if not isinstance(value, bytes | bytearray) or expected_vr in ("OB", "OW", "UN"):
        return value
    fmt = _STRUCT.get(expected_vr)
    if fmt is not None:
        size = struct.calcsize(fmt)
        n = len(value) // size
        if n == 0:
            return None
        numbers = struct.unpack("<" + fmt[1:] * n, bytes(value[: n * size]))
        return numbers[0] if n == 1 else list(numbers)
    text = bytes(value).decode("ascii", errors="replace").strip("\x00 ")
    parts = [p.strip() for p in text.split("\\")]
    return parts[0] if len(parts) == 1 else parts


def private_value(ds: Dataset, group: int, creator: str, offset: int, expected_vr: str) -> Any:
    """Value of a private element found through its private creator, or ``None`` when absent.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The dataset (or functional-group item) to look in.
    group : int
        Odd group number, e.g. ``0x0019``.
    creator : str
        Private creator string, e.g. ``"GEMS_ACQU_01"``.
    offset : int
        Element offset inside the private block (the low byte, e.g. ``0xBB``).
    expected_vr : str
        VR used to decode the bytes when the file carried the element as UN.
    """
    try:
        block = ds.private_block(group, creator)
    except KeyError:
        return None
    if offset not in block:
        return None
    elem = block[offset]
    return _decode(elem.value, elem.VR, expected_vr)


def first_float(value: Any) -> float | None:
    """The (first) value of a numeric DICOM element as a finite float; None when absent, empty,
    not a number or not finite."""
    if value is None or value == "":
        return None
    if not isinstance(value, str | bytes) and hasattr(value, "__len__"):  # multi-valued element
        if len(value) == 0:
            return None
        value = value[0]
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _unit(vector: Sequence[float] | np.ndarray, what: str) -> tuple[float, float, float] | None:
    v = np.asarray(vector, dtype=float).reshape(-1)
    if v.size != 3 or not np.all(np.isfinite(v)):
        raise DiffusionEncodingError(f"{what}: gradient must have 3 finite components, got {v!r}")
    norm = float(np.linalg.norm(v))
    if norm < 1e-6:
        return None
    return (float(v[0] / norm), float(v[1] / norm), float(v[2] / norm))


def _make(
    b_value: float, gradient: Any, directionality: str | None, source: str, what: str
) -> DiffusionEncoding:
    if not np.isfinite(b_value) or b_value < 0:
        raise DiffusionEncodingError(f"{what}: invalid b-value {b_value!r} s/mm²")
    directionality = (directionality or "").upper()
    vec = None if gradient is None else _unit(gradient, what)
    if b_value < B0_THRESHOLD:
        return DiffusionEncoding(float(b_value), None, "NONE", source)
    if directionality == "ISOTROPIC" or (vec is None and directionality != "DIRECTIONAL"):
        return DiffusionEncoding(float(b_value), None, "ISOTROPIC", source)
    if vec is None:
        raise DiffusionEncodingError(
            f"{what}: b = {b_value:g} s/mm² is DIRECTIONAL but has no gradient direction"
        )
    return DiffusionEncoding(float(b_value), vec, directionality or "DIRECTIONAL", source)


# ----------------------------------------------------------------------------- per-source readers
def _from_mr_diffusion_item(item: Dataset, what: str) -> DiffusionEncoding | None:
    if "DiffusionBValue" not in item or item.DiffusionBValue is None:
        return None
    b = float(item.DiffusionBValue)
    directionality = str(item.get("DiffusionDirectionality", "") or "")
    gradient = None
    seq = item.get("DiffusionGradientDirectionSequence")
    if seq:
        gradient = seq[0].get("DiffusionGradientOrientation")
    elif "DiffusionGradientOrientation" in item:
        gradient = item.DiffusionGradientOrientation
    if directionality.upper() == "BMATRIX" and gradient is None:
        raise UnknownDiffusionEncodingError(
            f"{what}: diffusion encoded as a b-matrix only; directions cannot be recovered"
        )
    return _make(b, gradient, directionality, "enhanced", what)


def _from_standard(ds: Dataset, what: str) -> DiffusionEncoding | None:
    if "DiffusionBValue" not in ds or ds.DiffusionBValue is None or ds.DiffusionBValue == "":
        return None
    b = float(ds.DiffusionBValue)
    gradient = None
    if "DiffusionGradientOrientation" in ds and ds.DiffusionGradientOrientation:
        gradient = ds.DiffusionGradientOrientation
    elif ds.get("DiffusionGradientDirectionSequence"):
        gradient = ds.DiffusionGradientDirectionSequence[0].get("DiffusionGradientOrientation")
    directionality = str(ds.get("DiffusionDirectionality", "") or "")
    if not directionality:
        # Philips classic files mark trace images only in (2001,xx04) = "I".
        label = private_value(ds, 0x2001, PHILIPS_IMAGING_1, 0x04, "CS")
        if isinstance(label, str) and label.strip().upper() == "I":
            directionality = "ISOTROPIC"
    return _make(b, gradient, directionality, "standard", what)


def _from_siemens(ds: Dataset, what: str) -> DiffusionEncoding | None:
    b = first_float(private_value(ds, 0x0019, SIEMENS_MR_HEADER, 0x0C, "IS"))
    if b is not None:
        gradient = private_value(ds, 0x0019, SIEMENS_MR_HEADER, 0x0E, "FD")
        directionality = private_value(ds, 0x0019, SIEMENS_MR_HEADER, 0x0D, "CS")
        if isinstance(directionality, list):
            directionality = directionality[0]
        return _make(b, gradient, str(directionality or ""), "siemens", what)
    raw = private_value(ds, 0x0029, SIEMENS_CSA_HEADER, 0x10, "OB")
    if raw is None:
        return None
    try:
        header = csareader.read(bytes(raw))
        b = csareader.get_scalar(header, "B_value")
        gradient = csareader.get_vector(header, "DiffusionGradientDirection", 3)
    except (csareader.CSAReadError, KeyError, ValueError) as err:
        raise DiffusionEncodingError(f"{what}: unreadable Siemens CSA image header: {err}") from err
    if b is None:
        return None
    return _make(float(b), gradient, "", "siemens_csa", what)


def _ge_logical_to_image(
    v: np.ndarray, phase_encoding: str, normal: np.ndarray, what: str
) -> np.ndarray:
    """Rotate a GE logical (frequency, phase, slice) gradient into the image frame.

    The image frame is (row direction, column direction, row × column) of ImageOrientationPatient.
    Follows dcm2niix ``geCorrectBvecs`` (validated against dcm2niix's ``.bvec`` for the oblique
    axial GE reference set): for COL phase encoding the logical vector is flipped on the axes
    dcm2niix flips for the slice plane (axial z; sagittal x, y; coronal y, z) and the whole vector
    negated (the polarity of a diffusion gradient is physically irrelevant; the sign follows
    dcm2niix). ROW phase encoding swaps frequency and phase first; dcm2niix marks that path
    untested.
    """
    x, y, z = (float(c) for c in v)
    pe = phase_encoding.upper()
    if pe.startswith("COL"):
        pass
    elif pe == "ROW":
        logger.warning(
            "%s: GE gradients with ROW phase encoding use dcm2niix's untested rotation", what
        )
        x, y = y, -x
    else:
        raise UnknownDiffusionEncodingError(
            f"{what}: GE gradients are in the logical frame but In-plane Phase Encoding Direction "
            f"(0018,1312) is {phase_encoding!r}; cannot rotate them"
        )
    axis = int(np.argmax(np.abs(normal)))
    flips = {0: (-1.0, -1.0, 1.0), 1: (1.0, -1.0, -1.0), 2: (1.0, 1.0, -1.0)}[axis]
    return -np.array([x * flips[0], y * flips[1], z * flips[2]])


def _from_ge(ds: Dataset, what: str, orientation: np.ndarray | None) -> DiffusionEncoding | None:
    scanning = ds.get("ScanningSequence") or []
    scanning = [scanning] if isinstance(scanning, str) else list(scanning)
    if "EP" not in [str(s).upper() for s in scanning]:
        # GE writes (0043,xx39) in every image; only its echo-planar diffusion images use it as b.
        return None
    slop = private_value(ds, 0x0043, GE_PARM, 0x39, "IS")
    b = first_float(slop)
    if b is None:
        return None
    b = float(b) % GE_B_VALUE_OFFSET
    comps = [
        first_float(private_value(ds, 0x0019, GE_ACQU, off, "DS")) for off in (0xBB, 0xBC, 0xBD)
    ]
    if b < B0_THRESHOLD:
        return DiffusionEncoding(b, None, "NONE", "ge")
    if any(c is None for c in comps):
        raise UnknownDiffusionEncodingError(
            f"{what}: GE b-value {b:g} s/mm² without gradient elements (0019,xxBB-xxBD)"
        )
    logical = np.array(comps, dtype=float)
    norm = float(np.linalg.norm(logical))
    if norm < 1e-6:
        return DiffusionEncoding(b, None, "ISOTROPIC", "ge")
    if 0.03 < norm < 0.97:
        # GE scales b by |g|² for multi-shell tensor files (dcm2niix issue 163).
        b *= norm * norm
    if orientation is None:
        raise UnknownDiffusionEncodingError(
            f"{what}: GE gradients need ImageOrientationPatient to be expressed in LPS"
        )
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    phase = str(ds.get("InPlanePhaseEncodingDirection", "") or "")
    g_img = _ge_logical_to_image(logical / norm, phase, normal, what)
    rotation = np.column_stack([row, col, normal])
    return _make(b, rotation @ g_img, "DIRECTIONAL", "ge", what)


def _from_philips(ds: Dataset, what: str) -> DiffusionEncoding | None:
    b = first_float(private_value(ds, 0x2001, PHILIPS_IMAGING_1, 0x03, "FL"))
    if b is None:
        return None
    label = private_value(ds, 0x2001, PHILIPS_IMAGING_1, 0x04, "CS")
    comps = [
        first_float(private_value(ds, 0x2005, PHILIPS_MR_IMAGING_1, off, "FL"))
        for off in (0xB0, 0xB1, 0xB2)
    ]
    directionality = "ISOTROPIC" if isinstance(label, str) and label.strip().upper() == "I" else ""
    gradient = None if any(c is None for c in comps) else comps
    return _make(b, gradient, directionality, "philips", what)


def _from_uih(ds: Dataset, what: str) -> DiffusionEncoding | None:
    if "UIH" not in str(ds.get("Manufacturer", "") or "").upper():
        return None
    b = first_float(private_value(ds, 0x0065, UIH_IMAGE_HEADER, 0x09, "FD"))
    if b is None:
        b = first_float(private_value(ds, 0x0065, UIH_IMAGE_HEADER, 0x0A, "FD"))
    if b is None:
        return None
    gradient = private_value(ds, 0x0065, UIH_IMAGE_HEADER, 0x37, "FD")
    if gradient is not None and not hasattr(gradient, "__len__"):
        gradient = None
    return _make(b, None if gradient is None else [float(g) for g in gradient], "", "uih", what)


def _looks_diffusion_weighted(ds: Dataset) -> bool:
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "DERIVED" in image_type[:1]:
        # Scanner-derived maps (ADC, FA, exponential ADC) legitimately carry no encoding.
        return False
    if "DIFFUSION" in image_type:
        return True
    if str(ds.get("AcquisitionContrast", "") or "").upper() == "DIFFUSION":
        return True
    # Siemens names its diffusion EPI "*ep_b1000#1" and similar.
    return "ep_b" in str(ds.get("SequenceName", "") or "").lower()


def diffusion_encoding(
    ds: Dataset, *, frame_groups: Sequence[Dataset] = (), orientation: Sequence[float] | None = None
) -> DiffusionEncoding | None:
    """Diffusion encoding of one image or frame.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        The image (classic) or the multi-frame object (enhanced).
    frame_groups : sequence of Dataset, optional
        For an enhanced multi-frame object: the per-frame functional-group item of the frame, then
        the shared functional-group item (searched in that order for the MR Diffusion Sequence).
    orientation : sequence of 6 float, optional
        ImageOrientationPatient of the frame (needed for GE, whose gradients are in the logical
        frame).

    Returns
    -------
    DiffusionEncoding or None
        ``None`` when the image carries no diffusion encoding and does not look diffusion-weighted.

    Raises
    ------
    UnknownDiffusionEncodingError
        The image is diffusion-weighted (ImageType DIFFUSION, Acquisition Contrast DIFFUSION, a
        Siemens ``ep_b`` sequence) but no known encoding is present.
    DiffusionEncodingError
        The encoding is present but inconsistent (negative b, directional without a direction).
    """
    what = f"SOP Instance {ds.get('SOPInstanceUID', '?')}"
    for group in frame_groups:
        seq = group.get("MRDiffusionSequence")
        if seq:
            enc = _from_mr_diffusion_item(seq[0], what)
            if enc is not None:
                return enc
    iop = None if orientation is None else np.asarray(orientation, dtype=float)
    if iop is None and "ImageOrientationPatient" in ds:
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
    standard = _from_standard(ds, what)
    explicit = str(ds.get("DiffusionDirectionality", "") or "").upper()
    if standard is not None and (standard.gradient is not None or standard.is_b0 or explicit):
        return standard
    # A standard b-value without direction (GE writes (0018,9087) only) is completed from the
    # vendor's private elements; without them it is an isotropic (trace) image.
    for reader in (_from_siemens, _from_philips, _from_uih):
        enc = reader(ds, what)
        if enc is not None:
            return enc
    enc = _from_ge(ds, what, iop)
    if enc is not None:
        return enc
    if standard is not None:
        return standard
    if _looks_diffusion_weighted(ds):
        raise UnknownDiffusionEncodingError(
            f"{what} ({ds.get('Manufacturer', 'unknown manufacturer')}) is diffusion-weighted but "
            "has no standard (0018,9087) or known private (Siemens, GE, Philips) diffusion encoding"
        )
    return None


def gradients_to_image_frame(gradients_lps: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Express LPS gradient directions in the image frame: g_img = Rᵀ·g_LPS.

    Parameters
    ----------
    gradients_lps : (n, 3) array
        Gradient unit vectors in patient coordinates (LPS); rows of NaN or zeros stay as they are.
    direction : (3, 3) array
        Direction cosines whose columns are the row direction, the column direction and the slice
        normal (SimpleITK's direction matrix, as in :class:`processing.series.Geometry`).

    Returns
    -------
    (n, 3) array
        Components along (row, column, normal). dcm2niix's FSL ``.bvec`` equals this after a
        per-axis sign flip that depends on how it wrote the NIfTI (data README: (x, −y, z) for
        Philips classic and Canon enhanced, (x, y, z) for the Siemens sagittal mosaic).
    """
    g = np.asarray(gradients_lps, dtype=float).reshape(-1, 3)
    r = np.asarray(direction, dtype=float).reshape(3, 3)
    components: np.ndarray = g @ r
    return components
