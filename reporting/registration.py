"""DICOM Spatial Registration object for a rigid follow-up → baseline transform (PS3.3 A.39).

highdicom (0.28) has no Spatial Registration IOD, so the object is written with pydicom, module by
module as PS3.3 A.39.1 lists them, and validated with dciodvfy in the tests.

Encoding
--------
* The registration's own Frame of Reference (Frame of Reference module) is the *fixed* (baseline)
  frame of reference: the Registered RCS.
* Registration Sequence item 1: the fixed frame of reference and its images, identity matrix.
* Registration Sequence item 2: the moving (follow-up) frame of reference and its images, with
  ``matrix_moving_to_fixed`` (4×4, LPS mm, ``processing.registration.RigidRegistration``) as
  Frame of Reference Transformation Matrix, type RIGID (PS3.3 C.20.2.1.1: the matrix maps
  coordinates of the item's frame of reference into the Registered RCS), registration type
  (125024, DCM, "Image Content-based Alignment") from CID 7100.
* Patient and study attributes come from the moving (follow-up) images: the object belongs to the
  follow-up study; the baseline images are listed in the Common Instance Reference module as
  other-study instances.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from reporting.header import derived_dataset
from reporting.seg import (
    DEVICE_SERIAL_NUMBER,
    MANUFACTURER,
    MODEL_NAME,
    sanitized_source,
    validate_sources,
)
from reporting.uids import deterministic_uid, digest_arrays, digest_text, digest_uids

logger = logging.getLogger(__name__)

SPATIAL_REGISTRATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.1"
REG_SERIES_NUMBER = 9300


def _check_rigid(matrix: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=float)
    if matrix.shape != (4, 4):
        raise ValueError(f"matrix must be 4x4, got {matrix.shape}")
    if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError("last row of a homogeneous matrix must be (0, 0, 0, 1)")
    rotation = matrix[:3, :3]
    if not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-6) or not np.isclose(
        np.linalg.det(rotation), 1.0, atol=1e-6
    ):
        raise ValueError("matrix is not rigid: its 3x3 part must be a proper rotation")
    return matrix


def _image_references(images: Sequence[Dataset]) -> DicomSequence:
    items = []
    for ds in images:
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        items.append(item)
    return DicomSequence(items)


def _registration_item(images: Sequence[Dataset], matrix: np.ndarray) -> Dataset:
    item = Dataset()
    item.FrameOfReferenceUID = images[0].FrameOfReferenceUID
    item.ReferencedImageSequence = _image_references(images)
    matrix_item = Dataset()
    matrix_item.FrameOfReferenceTransformationMatrixType = "RIGID"
    matrix_item.FrameOfReferenceTransformationMatrix = [float(f"{v:.10g}") for v in matrix.ravel()]
    registration_type = Dataset()
    registration_type.CodeValue = "125024"
    registration_type.CodingSchemeDesignator = "DCM"
    registration_type.CodeMeaning = "Image Content-based Alignment"
    registration = Dataset()
    registration.RegistrationTypeCodeSequence = DicomSequence([registration_type])
    registration.MatrixSequence = DicomSequence([matrix_item])
    item.MatrixRegistrationSequence = DicomSequence([registration])
    return item


def _series_reference(images: Sequence[Dataset]) -> Dataset:
    series = Dataset()
    series.SeriesInstanceUID = images[0].SeriesInstanceUID
    series.ReferencedInstanceSequence = _image_references(images)
    return series


def build_spatial_registration(
    fixed_images: Sequence[Dataset],
    moving_images: Sequence[Dataset],
    matrix_moving_to_fixed: np.ndarray,
    *,
    algorithm_version: str,
    content_description: str = "Rigid follow-up to baseline registration",
    series_number: int = REG_SERIES_NUMBER,
) -> Dataset:
    """Build a Spatial Registration object for a rigid transform between two frames of reference.

    Parameters
    ----------
    fixed_images : Sequence[pydicom.Dataset]
        Images of the fixed (baseline) series; their Frame of Reference is the registered RCS.
    moving_images : Sequence[pydicom.Dataset]
        Images of the moving (follow-up) series; the object joins their study.
    matrix_moving_to_fixed : numpy.ndarray
        4×4 rigid homogeneous matrix mapping moving LPS (mm) to fixed LPS (mm).
    algorithm_version : str
        Software version (Software Versions) and part of the deterministic UIDs.
    content_description : str
        Content Description of the object.
    series_number : int
        Series Number.

    Returns
    -------
    pydicom.Dataset
        Spatial Registration Storage instance with file meta information, ready to save.

    References
    ----------
    DICOM PS3.3 A.39 Spatial Registration IOD; C.20.1 Spatial Registration Series module;
    C.20.2 Spatial Registration module; C.12.2 Common Instance Reference module; CID 7100.
    """
    if not algorithm_version:
        raise ValueError("algorithm_version must be given")
    validate_sources(fixed_images)
    validate_sources(moving_images)
    matrix = _check_rigid(matrix_moving_to_fixed)
    fixed, moving = fixed_images[0], sanitized_source(moving_images[0])
    if fixed.FrameOfReferenceUID == moving.FrameOfReferenceUID:
        raise ValueError(
            "fixed and moving images share one Frame of Reference: nothing to register"
        )

    digest = digest_text(
        digest_uids(fixed_images), digest_uids(moving_images), digest_arrays(np.round(matrix, 6))
    )
    uid_args: dict[str, Any] = dict(
        source_study_uid=str(moving.StudyInstanceUID),
        tracking_uid=None,
        algorithm_version=algorithm_version,
        input_digest=digest,
    )
    sop_instance_uid = deterministic_uid(kind="reg/instance", **uid_args)

    ds = derived_dataset(SPATIAL_REGISTRATION_STORAGE, sop_instance_uid, moving)
    # General Series + Spatial Registration Series
    ds.Modality = "REG"
    ds.SeriesInstanceUID = deterministic_uid(kind="reg/series", **uid_args)
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "Follow-up to baseline registration"
    # the spine is unpaired: naming the body part lets validators skip Laterality (2C)
    ds.BodyPartExamined = "SPINE"
    # Frame of Reference: the registered (fixed) RCS
    ds.FrameOfReferenceUID = fixed.FrameOfReferenceUID
    ds.PositionReferenceIndicator = ""
    # General Equipment + Enhanced General Equipment
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = MODEL_NAME
    ds.DeviceSerialNumber = DEVICE_SERIAL_NUMBER
    ds.SoftwareVersions = algorithm_version
    # Spatial Registration (with Content Identification)
    ds.ContentDate = ds.InstanceCreationDate
    ds.ContentTime = ds.InstanceCreationTime
    ds.InstanceNumber = 1
    ds.ContentLabel = "REGISTRATION"
    ds.ContentDescription = content_description[:64]
    ds.ContentCreatorName = ""
    ds.RegistrationSequence = DicomSequence(
        [
            _registration_item(fixed_images, np.eye(4)),
            _registration_item(moving_images, matrix),
        ]
    )
    # Common Instance Reference: same-study (moving) and other-study (fixed) instances
    ds.ReferencedSeriesSequence = DicomSequence([_series_reference(moving_images)])
    if fixed.StudyInstanceUID != moving.StudyInstanceUID:
        other = Dataset()
        other.StudyInstanceUID = fixed.StudyInstanceUID
        other.ReferencedSeriesSequence = DicomSequence([_series_reference(fixed_images)])
        ds.StudiesContainingOtherReferencedInstancesSequence = DicomSequence([other])
    else:
        ds.ReferencedSeriesSequence.append(_series_reference(fixed_images))
    logger.info(
        "built Spatial Registration %s: FoR %s -> %s",
        sop_instance_uid,
        moving.FrameOfReferenceUID,
        fixed.FrameOfReferenceUID,
    )
    return ds


def registration_matrix(reg: Dataset, moving_frame_of_reference_uid: str) -> np.ndarray:
    """Read back the 4×4 matrix mapping ``moving_frame_of_reference_uid`` into the REG's RCS."""
    for item in reg.RegistrationSequence:
        if item.get("FrameOfReferenceUID") == moving_frame_of_reference_uid:
            values = (
                item.MatrixRegistrationSequence[0]
                .MatrixSequence[0]
                .FrameOfReferenceTransformationMatrix
            )
            return np.asarray([float(v) for v in values]).reshape(4, 4)
    raise ValueError(f"no registration item for Frame of Reference {moving_frame_of_reference_uid}")
