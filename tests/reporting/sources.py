"""Source images for the reporting tests: a small classic MR series built here and the real Canon
Enhanced MR DWI from the dcm2niix validation set (per-frame spatial functional groups variant)."""

from __future__ import annotations

import copy
import gzip
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import dcmread
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

CANON_ENHANCED = Path("dwi_dcmqa/canon_dwi/In/enh/8000.dcm.gz")

#: fixed UIDs so that tests of deterministic output UIDs compare like with like
STUDY_UID = "1.2.826.0.1.3680043.8.498.10001"
FOLLOW_UP_STUDY_UID = "1.2.826.0.1.3680043.8.498.10002"
FRAME_OF_REFERENCE_UID = "1.2.826.0.1.3680043.8.498.10003"


def classic_mr_series(
    *,
    study_uid: str = STUDY_UID,
    series_uid: str = "1.2.826.0.1.3680043.8.498.20001",
    study_date: str = "20260105",
    n_slices: int = 6,
    rows: int = 24,
    columns: int = 20,
    spacing: tuple[float, float] = (1.25, 1.25),
    slice_thickness: float = 4.0,
    series_description: str = "DWI b0",
    frame_of_reference_uid: str = FRAME_OF_REFERENCE_UID,
) -> list[Dataset]:
    """A sagittal classic single-frame MR series with realistic attributes (LPS, mm)."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(n_slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        sop_uid = f"{series_uid}.{k + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
        ds.AccessionNumber = "ACC0001"
        ds.Modality = "MR"
        ds.Manufacturer = "SIEMENS"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "MRI spine"
        ds.SeriesDescription = series_description
        ds.PatientName = "Test^Spine"
        ds.PatientID = "SRN-TEST-1"
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "F"
        ds.BodyPartExamined = "LSPINE"
        ds.ScanningSequence = "EP"
        ds.SequenceVariant = "SK"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SliceThickness = slice_thickness
        ds.RepetitionTime = 4000.0
        ds.EchoTime = 60.0
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = 1.5
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 5
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        # sagittal: rows along -z (feet), columns along +y (posterior); slices step along +x
        ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
        ds.ImagePositionPatient = [-10.0 + k * slice_thickness, -20.0, 40.0]
        ds.SliceLocation = -10.0 + k * slice_thickness
        ds.PixelSpacing = list(spacing)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = rng.integers(0, 4000, (rows, columns), dtype=np.uint16).tobytes()
        out.append(ds)
    return out


def canon_enhanced(shared_data: Path, *, per_frame_geometry: bool) -> Dataset:
    """The Canon Enhanced MR DWI (520 frames: 40 slices x b0 + 12 x b1500).

    With ``per_frame_geometry`` the Plane Orientation and Pixel Measures functional groups are
    moved from the shared to every per-frame item, as Siemens XA writes them; UIDs are unchanged.
    """
    with gzip.open(shared_data / CANON_ENHANCED, "rb") as fh:
        ds = dcmread(fh)
    if per_frame_geometry:
        shared = ds.SharedFunctionalGroupsSequence[0]
        for keyword in ("PlaneOrientationSequence", "PixelMeasuresSequence"):
            group = getattr(shared, keyword)
            for item in ds.PerFrameFunctionalGroupsSequence:
                setattr(item, keyword, DicomSequence([copy.deepcopy(group[0])]))
            del shared[keyword]
    return ds


def b0_frames(ds: Dataset) -> list[int]:
    """1-based frame numbers of the b = 0 frames, in stored order."""
    return [
        i + 1
        for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence)
        if float(item.MRDiffusionSequence[0].DiffusionBValue) == 0.0
    ]
