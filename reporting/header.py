"""The header every pydicom-built output shares (objects highdicom has no class for).

Spatial Registration and Encapsulated PDF are written with pydicom; both start from the same file
meta, the patient and study of the source image (so they land in the patient's own study), and the
SOP Common creation date/time.
"""

from __future__ import annotations

import datetime

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

#: Patient and General Study attributes copied from the source image
PATIENT_STUDY_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)
#: Type 2 attributes of the Patient and General Study modules (present, possibly empty)
TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def derived_dataset(sop_class_uid: str, sop_instance_uid: str, source: Dataset) -> Dataset:
    """A new dataset in ``source``'s patient and study, with file meta and SOP Common filled.

    Parameters
    ----------
    sop_class_uid, sop_instance_uid : str
        Of the new object.
    source : pydicom.Dataset
        An image of the study the object belongs to (ideally already sanitised, see
        :func:`reporting.seg.sanitized_source`).
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            element = source.data_element(keyword)
            assert element is not None  # `keyword in source` was just checked
            setattr(ds, keyword, element.value)
        elif keyword in TYPE2_KEYWORDS:
            setattr(ds, keyword, "")
    now = datetime.datetime.now(datetime.timezone.utc)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    return ds
