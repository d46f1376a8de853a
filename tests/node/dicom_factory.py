"""Small synthetic MR instances for node tests and the ingest benchmark (pydicom only).

Every instance carries the seeded fake identifiers :data:`PHI_TOKENS` so that the log test can
prove none of them reaches a log.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

PATIENT_NAME = "DOE^JOHN"
PATIENT_ID = "PID-123"
BIRTH_DATE = "19600101"
#: seeded identifiers that must never appear in a log
PHI_TOKENS: tuple[str, ...] = (PATIENT_NAME, "DOE", PATIENT_ID, BIRTH_DATE)


def mr_dataset(
    *,
    study_uid: str,
    series_uid: str,
    instance_number: int,
    rows: int = 64,
    columns: int = 64,
    patient_name: str = PATIENT_NAME,
    patient_id: str = PATIENT_ID,
    birth_date: str = BIRTH_DATE,
    seed: int = 0,
) -> Dataset:
    """One MR Image Storage instance (16-bit, explicit VR little endian, 1 mm pixels)."""
    ds = Dataset()
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study_uid, "for"])
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.PatientSex = "M"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC-0001"
    ds.StudyID = "1"
    ds.Modality = "MR"
    ds.Manufacturer = "SYNTHETIC"
    ds.SeriesNumber = 1
    ds.SeriesDescription = "T2 SAG"
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    rng = np.random.default_rng(seed + instance_number)
    ds.PixelData = rng.integers(0, 4096, size=(rows, columns), dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def mr_series(study_uid: str, count: int, seed: int, **kwargs: Any) -> list[Dataset]:
    """``count`` 16 x 16 MR instances of one new series of ``study_uid`` (instance i has seed
    ``seed + i``); ``kwargs`` go to :func:`mr_dataset`."""
    series_uid = generate_uid()
    return [
        mr_dataset(
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=i + 1,
            rows=16,
            columns=16,
            seed=seed + i,
            **kwargs,
        )
        for i in range(count)
    ]


def write_mr_series(
    folder: Path,
    count: int,
    *,
    study_uid: str | None = None,
    rows: int = 64,
    columns: int = 64,
    seed: int = 0,
) -> list[Path]:
    """Write ``count`` MR instances of one new series into ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    paths = []
    for i in range(1, count + 1):
        ds = mr_dataset(
            study_uid=study_uid,
            series_uid=series_uid,
            instance_number=i,
            rows=rows,
            columns=columns,
            seed=seed,
        )
        path = folder / f"MR{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, without preamble and file meta information."""
    data = Path(path).read_bytes()
    if data[128:132] != b"DICM":
        raise ValueError(f"{path} is not a DICOM Part 10 file")
    # (0002,0000) group length: explicit VR 'UL', value at offset 132+8
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


def paths_of(items: Sequence[Path]) -> list[str]:
    """Paths as strings (for subprocess argument lists)."""
    return [str(p) for p in items]


def rejection_note(
    rejected: Sequence[Dataset],
    *,
    code_value: str = "113001",
    meaning: str = "Rejected for Quality Reasons",
) -> Dataset:
    """An IHE IOCM rejection note (Key Object Selection Document, built by highdicom) that
    withdraws ``rejected`` (instances of one study), as a PACS sends it after a correction."""
    import highdicom as hd
    from pydicom.sr.coding import Code

    content = hd.ko.KeyObjectSelection(
        document_title=Code(code_value, "DCM", meaning), referenced_objects=list(rejected)
    )
    study_uid = str(rejected[0].StudyInstanceUID)
    return hd.ko.KeyObjectSelectionDocument(
        evidence=list(rejected),
        content=content,
        series_instance_uid=generate_uid(entropy_srcs=[study_uid, "rejection-series"]),
        series_number=9990,
        sop_instance_uid=generate_uid(
            entropy_srcs=[study_uid, code_value, *(str(d.SOPInstanceUID) for d in rejected)]
        ),
        instance_number=1,
        manufacturer="Test PACS",
    )


def c_store_rq_message(ds: Dataset, payload: bytes) -> Any:
    """pynetdicom's C-STORE-RQ message (``C_STORE_RQ``) of ``ds`` with ``payload`` (its
    encoded dataset) as data set, for scripted peers that send its PDUs themselves
    (``message.encode_msg(context_id, max_pdu)``) or alter its command set first."""
    from io import BytesIO

    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(payload)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return message
