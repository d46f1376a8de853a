"""MR DICOM objects of the phantom: classic single-frame MR Image per vendor, and Enhanced MR.

Vendor encodings follow what the scanners write (docs/science.md §3.5/3.6 and the real files in
``../shared/data/dwi_dcmqa``); the deviations from the standard are listed in the package
docstring of :mod:`processing.phantom`.
"""

from __future__ import annotations

import datetime as dt
import struct
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, MRImageStorage

from processing.phantom import protocol as proto

if TYPE_CHECKING:
    from processing.phantom.patient import Phantom, SeriesData, StudyData

#: the phantom writer's Implementation Class UID (a UUID-derived 2.25 UID, PS3.5 B.2)
IMPLEMENTATION_CLASS_UID = (
    f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'spine-node-phantom:implementation-1').int}"
)
IMPLEMENTATION_VERSION = "SPINENODE_PH1"

VENDOR_EQUIPMENT: dict[str, dict[str, Any]] = {
    "standard": dict(
        Manufacturer="Spine Response Node",
        ManufacturerModelName="Synthetic MR 3T",
        SoftwareVersions="phantom 1.0",
        DeviceSerialNumber="PH0001",
    ),
    "siemens": dict(
        Manufacturer="SIEMENS",
        ManufacturerModelName="Prisma",
        SoftwareVersions="syngo MR E11",
        DeviceSerialNumber="67060",
    ),
    "ge": dict(
        Manufacturer="GE MEDICAL SYSTEMS",
        ManufacturerModelName="SIGNA Premier",
        SoftwareVersions=["30", "LX", "MR30.1_R01_2135.a"],
        DeviceSerialNumber="0000000000SPINE1",
    ),
    "philips": dict(
        Manufacturer="Philips",
        ManufacturerModelName="Ingenia Elition X",
        SoftwareVersions=["5.7.1", "5.7.1.2"],
        DeviceSerialNumber="45190",
    ),
    "enhanced": dict(
        Manufacturer="SIEMENS",
        ManufacturerModelName="MAGNETOM Vida",
        SoftwareVersions="syngo MR XA50",
        DeviceSerialNumber="175542",
    ),
}


#: dciodvfy errors each vendor variant really produces (the documented deviations; see the
#: package docstring). Anything else is a defect of the phantom.
VENDOR_DEVIATIONS: dict[str, tuple[str, ...]] = {
    "standard": (),
    "siemens": (),
    "ge": ("Element=<TriggerTime> Module=<MRImage>",),
    "philips": ("Element=<TriggerTime> Module=<MRImage>",),
    "enhanced": (),
}


def _ds_str(v: float) -> str:
    """A DS value that fits 16 characters."""
    s = f"{v:.10g}"
    if len(s) > 16:
        s = f"{v:.8g}"
    return s


def file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return meta


def patient_study_module(ds: Dataset, ph: Phantom, study: StudyData) -> None:
    """Patient, General Study and Patient Study attributes shared by every object."""
    p = ph.patient
    ds.PatientName = p["PatientName"]
    ds.PatientID = p["PatientID"]
    ds.IssuerOfPatientID = p["IssuerOfPatientID"]
    ds.PatientBirthDate = p["PatientBirthDate"]
    ds.PatientSex = p["PatientSex"]
    ds.PatientWeight = p["PatientWeight"]
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = study.date.strftime("%Y%m%d")
    ds.StudyTime = study.start.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{ph.seed % 100000}{study.key[-1] if study.key != 'baseline' else '0'}"
    ds.AccessionNumber = (
        f"PHA{ph.seed % 100000:05d}{study.key[-1] if study.key != 'baseline' else '0'}"
    )
    ds.StudyDescription = (
        "MRI SPINE W WO CONTRAST" if study.key == "baseline" else "MRI SPINE FOLLOW-UP"
    )


def _tm(t: dt.datetime) -> str:
    return t.strftime("%H%M%S.%f")[:13]


def series_datasets(
    ph: Phantom, study: StudyData, series: SeriesData
) -> Iterator[tuple[str, Dataset]]:
    """Yield (relative path, Dataset) for every file of one series."""
    if ph.vendor == "enhanced":
        from processing.phantom import enhanced

        yield (
            f"{study.key}/{series.folder}/00001.dcm",
            enhanced.enhanced_series_dataset(ph, study, series),
        )
        return
    nz = series.grid.size[2]
    template = _classic_template(ph, study, series)
    for v, meta in enumerate(series.volumes):
        for k in range(nz):
            ds = _classic_instance(ph, series, template, v, k, meta)
            yield f"{study.key}/{series.folder}/{v * nz + k + 1:05d}.dcm", ds


def _encode_elements(ds: Dataset) -> dict[int, bytes]:
    """Each top-level element of ``ds`` encoded by pydicom (explicit VR little endian)."""
    out: dict[int, bytes] = {}
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        write_data_element(fp, elem)
        out[int(elem.tag)] = fp.getvalue()
    return out


def part10_bytes(ds: Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file in memory (pydicom's writer)."""
    fp = DicomBytesIO()
    ds.save_as(fp, enforce_file_format=True)
    return fp.getvalue()


def series_files(ph: Phantom, study: StudyData, series: SeriesData) -> Iterator[tuple[str, bytes]]:
    """Yield (relative path, Part 10 bytes) for every file of one series.

    Byte-identical to writing :func:`series_datasets` with pydicom (tested), but the elements
    shared by every file of a classic series are encoded once instead of once per file.
    """
    if ph.vendor == "enhanced":
        for relpath, ds in series_datasets(ph, study, series):
            yield relpath, part10_bytes(ds)
        return
    nz = series.grid.size[2]
    template = _encode_elements(_classic_template(ph, study, series))
    for v, meta in enumerate(series.volumes):
        for k in range(nz):
            elements = dict(template)
            elements.update(_encode_elements(_classic_parts(ph, series, v, k, meta)))
            fp = DicomBytesIO()
            fp.is_little_endian = True
            fp.is_implicit_VR = False
            fp.write(b"\0" * 128 + b"DICM")
            write_file_meta_info(
                fp, file_meta(MRImageStorage, series.sop_uids[v][k]), enforce_standard=True
            )
            body = b"".join(elements[tag] for tag in sorted(elements))
            yield f"{study.key}/{series.folder}/{v * nz + k + 1:05d}.dcm", fp.getvalue() + body


def image_type(role: str, vendor: str) -> list[str]:
    if role == "dwi":
        return (
            ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
            if vendor in ("siemens", "enhanced")
            else ["ORIGINAL", "PRIMARY", "OTHER"]
        )
    return (
        ["ORIGINAL", "PRIMARY", "OTHER"]
        if vendor != "siemens"
        else ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"]
    )


def sequence_name(series: SeriesData, meta: dict[str, Any]) -> str:
    sp = series.protocol
    if "sequence_name" in meta:
        return str(meta["sequence_name"])
    if series.role == "dwi":
        return f"ep_b{int(meta['b'])}" + ("#1" if meta["b"] > 0 else "")
    return {"t2w": "tse2d1_17", "t1w": "tse2d1_3", "stir": "tir2d1_13"}.get(sp.role, "fl3d1")


def equipment_and_series_module(
    ds: Dataset, ph: Phantom, study: StudyData, equipment: str, description: str
) -> None:
    """Modality, the scanner's equipment attributes (:data:`VENDOR_EQUIPMENT` ``[equipment]``),
    the site, the series description and protocol name, and the patient/study modules."""
    ds.Modality = "MR"
    for key, value in VENDOR_EQUIPMENT[equipment].items():
        setattr(ds, key, value)
    ds.InstitutionName = "Phantom Hospital"
    ds.StationName = "PHMR01"
    ds.SeriesDescription = description
    ds.ProtocolName = description
    ds.BodyPartExamined = "SPINE"
    patient_study_module(ds, ph, study)


def _classic_template(ph: Phantom, study: StudyData, series: SeriesData) -> Dataset:
    """Attributes shared by every file of a classic series (copied per instance)."""
    sp = series.protocol
    grid = series.grid
    vendor = ph.vendor
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    content_time = series.start + dt.timedelta(seconds=series.volumes[-1]["time_s"] + 15.0)
    ds.ImageType = image_type(series.role, vendor)
    if series.derived:
        ds.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION", series.derived]
    ds.InstanceCreationDate = study.date.strftime("%Y%m%d")
    ds.InstanceCreationTime = _tm(content_time)
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = study.date.strftime("%Y%m%d")
    ds.SeriesDate = study.date.strftime("%Y%m%d")
    ds.AcquisitionDate = study.date.strftime("%Y%m%d")
    ds.ContentDate = study.date.strftime("%Y%m%d")
    ds.SeriesTime = _tm(series.start)
    ds.ContentTime = _tm(content_time)
    equipment_and_series_module(ds, ph, study, vendor, sp.description)
    ds.ScanningSequence = list(sp.scanning_sequence)
    ds.SequenceVariant = list(sp.sequence_variant)
    ds.ScanOptions = "FS" if series.role in ("dwi",) else ""
    ds.MRAcquisitionType = sp.acquisition_type
    ds.AngioFlag = "N"
    ds.SliceThickness = _ds_str(grid.spacing[2])
    ds.RepetitionTime = _ds_str(sp.tr_ms)
    ds.EchoTime = _ds_str(sp.te_ms)
    if sp.ti_ms is not None:
        ds.InversionTime = _ds_str(sp.ti_ms)
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = "123.2"
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = _ds_str(ph.contrast["field_strength_t"])
    ds.SpacingBetweenSlices = _ds_str(grid.spacing[2])
    ds.EchoTrainLength = (
        "1" if sp.acquisition_type == "3D" else ("64" if series.role == "dwi" else "17")
    )
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = "100"
    ds.PixelBandwidth = "300"
    ds.InPlanePhaseEncodingDirection = "COL"
    ds.FlipAngle = _ds_str(sp.flip_deg)
    ds.PatientPosition = "HFS"
    ds.SeriesInstanceUID = series.series_uid
    ds.SeriesNumber = str(sp.series_number)
    ds.AcquisitionNumber = "1"
    ds.ImageOrientationPatient = [
        _ds_str(x) for x in (list(grid.matrix[:, 0]) + list(grid.matrix[:, 1]))
    ]
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = grid.size[1]
    ds.Columns = grid.size[0]
    ds.PixelSpacing = [_ds_str(grid.spacing[1]), _ds_str(grid.spacing[0])]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = "1000"
    ds.WindowWidth = "2000"
    if series.role == "dce":
        _dce_series_tags(ds, ph, series)
    return ds


def _classic_instance(
    ph: Phantom, series: SeriesData, template: Dataset, v: int, k: int, meta: dict[str, Any]
) -> Dataset:
    ds = Dataset()
    ds.update(template)
    ds.update(_classic_parts(ph, series, v, k, meta))
    ds.file_meta = file_meta(MRImageStorage, series.sop_uids[v][k])
    return ds


def _classic_parts(
    ph: Phantom, series: SeriesData, v: int, k: int, meta: dict[str, Any]
) -> Dataset:
    """The attributes of one classic file that differ from the series template."""
    grid = series.grid
    nz = grid.size[2]
    vendor = ph.vendor
    ds = Dataset()
    ds.SOPInstanceUID = series.sop_uids[v][k]
    ds.AcquisitionTime = _tm(series.start + dt.timedelta(seconds=meta["time_s"]))
    ds.SequenceName = sequence_name(series, meta)
    ds.InstanceNumber = str(v * nz + k + 1)
    ipp = grid.slice_position(k)
    ds.ImagePositionPatient = [_ds_str(x) for x in ipp]
    ds.SliceLocation = _ds_str(float(ipp @ grid.matrix[:, 2]))
    if series.role == "vfa_t1":
        ds.AcquisitionNumber = str(v + 1)
        ds.FlipAngle = _ds_str(meta["flip_deg"])
        if vendor == "philips":
            ds.private_block(0x2001, "Philips Imaging DD 001", create=True).add_new(
                0x23, "DS", _ds_str(meta["flip_deg"])
            )
    if series.role == "dwi" and series.derived != "ADC":
        _diffusion_tags(
            ds,
            vendor,
            meta,
            grid,
            bvalues=sorted({m["b"] for m in series.volumes}),
            directions=max(n for _, n in _shells(series)),
        )
    if series.role == "dce":
        _dce_tags(ds, vendor, series, meta)
    ds.add_new(0x7FE00010, "OW", series.pixels[v, k].tobytes())  # Pixel Data, 16-bit
    return ds


#: syngo data type codes of the CSA header (as in the real files: IS 6, FD 4)
_CSA_SYNGODT = {"IS": 6, "FD": 4}


def siemens_csa_header(fields: list[tuple[str, str, int, list[str]]]) -> bytes:
    """A Siemens CSA2 ("SV10") header holding ``fields`` as (name, VR, VM, item strings).

    Layout as the VE-series scanners write (0029,xx10) and the readers of dcm2niix and nibabel
    parse it: "SV10" 04 03 02 01, tag count, 77; per tag a 64-byte name, VM, VR (4 bytes),
    syngo data type, 6 items and 77; per item (length, length, 77, length) and the value padded
    to 4 bytes, empty items as (0, 0, 205, 0); 4 zero bytes at the end.
    """
    out = [b"SV10\x04\x03\x02\x01", struct.pack("<2I", len(fields), 77)]
    for name, vr, vm, values in fields:
        out.append(name.encode("ascii").ljust(64, b"\0"))
        out.append(
            struct.pack("<i4s3i", vm, vr.encode("ascii").ljust(4, b"\0"), _CSA_SYNGODT[vr], 6, 77)
        )
        for i in range(6):
            if i < len(values):
                data = values[i].encode("ascii") + b"\0"
                out.append(struct.pack("<4i", len(data), len(data), 77, len(data)))
                out.append(data.ljust((len(data) + 3) // 4 * 4, b"\0"))
            else:
                out.append(struct.pack("<4i", 0, 0, 205, 0))
    out.append(b"\0" * 4)
    return b"".join(out)


def ge_logical_gradient(g_lps: np.ndarray, grid_matrix: np.ndarray) -> list[float]:
    """GE (0019,10BB-BD): gradient in the logical (frequency, phase, slice) frame.

    Written as (−row, −column, normal) components of the LPS vector, which is what dcm2niix reads
    back as the image-frame vector with its documented (−x, y, z) GE sign convention
    (verified against dcm2niix by the phantom tests).
    """
    img = grid_matrix.T @ g_lps
    return [float(-img[0]), float(-img[1]), float(img[2])]


def _shells(series: SeriesData) -> list[tuple[float, int]]:
    """(b, number of volumes) per b-value of a DWI series, ascending b."""
    bs = [float(m["b"]) for m in series.volumes]
    return [(b, bs.count(b)) for b in sorted(set(bs))]


def _diffusion_tags(
    ds: Dataset,
    vendor: str,
    meta: dict[str, Any],
    grid: Any,
    *,
    bvalues: list[float] | None = None,
    directions: int = 15,
) -> None:
    """Diffusion encoding of one classic file as ``vendor`` writes it.

    ``meta["isotropic"]`` marks a scanner-combined trace image (b > 0, no gradient): standard
    DiffusionDirectionality ISOTROPIC, Siemens the b-value alone (no directionality, gradient or
    B-matrix), GE a zero gradient, Philips (2001,1004) "I".
    """
    b = float(meta["b"])
    g = np.asarray(meta["gradient"], dtype=np.float64)
    isotropic = bool(meta.get("isotropic")) and b > 0
    directional = b > 0 and not isotropic
    if vendor == "standard":
        ds.DiffusionBValue = b
        ds.DiffusionDirectionality = (
            "DIRECTIONAL" if directional else ("ISOTROPIC" if isotropic else "NONE")
        )
        if directional:
            ds.DiffusionGradientOrientation = [float(x) for x in g]
    elif vendor == "siemens":
        blk = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
        blk.add_new(0x08, "CS", "IMAGE NUM 4")
        blk.add_new(0x09, "LO", "1.0")
        blk.add_new(0x0C, "IS", str(int(round(b))))
        if not meta.get("isotropic"):
            blk.add_new(0x0D, "CS", "DIRECTIONAL" if directional else "NONE")
        if directional:
            blk.add_new(0x0E, "FD", [float(x) for x in g])
            bm = b * np.outer(g, g)
            blk.add_new(
                0x27,
                "FD",
                [
                    float(bm[0, 0]),
                    float(bm[0, 1]),
                    float(bm[0, 2]),
                    float(bm[1, 1]),
                    float(bm[1, 2]),
                    float(bm[2, 2]),
                ],
            )
        # the same encoding in the CSA Image Header Info, as VE-series scanners also write it
        fields = [("B_value", "IS", 1, [f"{int(round(b)):<8d}"])]
        if directional:
            bm = b * np.outer(g, g)
            fields += [
                ("DiffusionGradientDirection", "FD", 3, [f"{x:.8f}" for x in g]),
                (
                    "B_matrix",
                    "FD",
                    6,
                    [
                        f"{x:.8f}"
                        for x in (bm[0, 0], bm[0, 1], bm[0, 2], bm[1, 1], bm[1, 2], bm[2, 2])
                    ],
                ),
            ]
        fields.append(("SliceNormalVector", "FD", 3, [f"{x:.8f}" for x in grid.matrix[:, 2]]))
        csa = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
        csa.add_new(0x08, "CS", "IMAGE NUM 4")
        csa.add_new(0x09, "LO", "20241009")
        csa.add_new(0x10, "OB", siemens_csa_header(fields))
    elif vendor == "ge":
        blk = ds.private_block(0x0043, "GEMS_PARM_01", create=True)
        blk.add_new(0x39, "IS", [str(int(round(b)) + 1_000_000_000), "8", "0", "0"])
        acq = ds.private_block(0x0019, "GEMS_ACQU_01", create=True)
        lg = ge_logical_gradient(g, grid.matrix) if directional else [0.0, 0.0, 0.0]
        acq.add_new(0xBB, "DS", _ds_str(lg[0]))
        acq.add_new(0xBC, "DS", _ds_str(lg[1]))
        acq.add_new(0xBD, "DS", _ds_str(lg[2]))
        acq.add_new(0xE0, "DS", str(directions))  # number of diffusion directions (User data 24)
        ds.private_block(0x0043, "GEMS_PARM_01").add_new(0x8A, "CS", "COL")
    elif vendor == "philips":
        blk = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
        blk.add_new(0x03, "FL", b)
        blk.add_new(0x04, "CS", "O" if directional else ("I" if isotropic else "N"))
        mr = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
        mr.add_new(0xB0, "FL", float(g[0]))
        mr.add_new(0xB1, "FL", float(g[1]))
        mr.add_new(0xB2, "FL", float(g[2]))
        blk.add_new(
            0x0B, "CS", "TRANSVERSAL"
        )  # Slice Orientation (dcm2niix needs it for the vectors)
        idx = ds.private_block(0x2005, "Philips MR Imaging DD 005", create=True)
        bvals = bvalues if bvalues is not None else sorted({b for b, _ in proto.DWI_SHELLS})
        idx.add_new(0x12, "IS", str(bvals.index(b) + 1))
        idx.add_new(0x13, "IS", str(meta.get("gradient_number", 1)))


def _dce_series_tags(ds: Dataset, ph: Phantom, series: SeriesData) -> None:
    """Contrast/Bolus module (same in every phase of the series)."""
    inj = series.start + dt.timedelta(seconds=proto.BOLUS_ARRIVAL_S - 10.0)
    agent = ph.contrast
    volume_ml = round(
        float(ph.patient["PatientWeight"]) * agent["dose_mmol_per_kg"] / agent["mmol_per_ml"], 1
    )
    ds.ContrastBolusAgent = agent["agent_text"]
    ds.ContrastBolusRoute = "IV"
    ds.ContrastBolusVolume = _ds_str(volume_ml)
    ds.ContrastBolusStartTime = _tm(inj)
    ds.ContrastBolusTotalDose = _ds_str(volume_ml)
    ds.ContrastFlowRate = "3"
    ds.ContrastFlowDuration = _ds_str(round(volume_ml / 3.0, 1))
    ds.ContrastBolusIngredient = "GADOLINIUM"
    ds.ContrastBolusIngredientConcentration = _ds_str(agent["gadolinium_mg_per_ml"])


def _dce_tags(ds: Dataset, vendor: str, series: SeriesData, meta: dict[str, Any]) -> None:
    """Per-phase timing as each vendor writes it (docs/science.md §3.6)."""
    n = len(series.volumes)
    dt_s = series.volumes[1]["time_s"] - series.volumes[0]["time_s"]
    tp = int(meta["temporal_position"])
    if vendor in ("standard", "philips"):
        ds.TemporalPositionIdentifier = str(tp)
        ds.NumberOfTemporalPositions = str(n)
        ds.TemporalResolution = _ds_str(dt_s * 1000.0)
    if vendor in ("ge", "philips"):
        ds.TriggerTime = _ds_str(meta["time_s"] * 1000.0)
    if vendor == "ge":
        ds.NumberOfTemporalPositions = str(n)
    if vendor == "siemens":
        blk = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
        blk.add_new(0x16, "DS", _ds_str(meta["time_s"]))  # TimeAfterStart (s)
    if vendor == "philips":
        dd = ds.private_block(0x2001, "Philips Imaging DD 001", create=True)
        dd.add_new(0x08, "IS", str(tp))  # Phase Number
        dd.add_new(0x12, "CS", "Y")  # Dynamic Series
        dd.add_new(0x17, "SL", n)  # Number of Phases MR
        dd.add_new(0x81, "IS", str(n))  # Number of Dynamic Scans
        mr = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
        mr.add_new(0xA0, "FL", float(meta["time_s"]))  # MR Image Dynamic Scan Begin Time (s)
    ds.AcquisitionDateTime = series.start.strftime("%Y%m%d") + _tm(
        series.start + dt.timedelta(seconds=meta["time_s"])
    )


#: SOP Class of the Philips private non-image objects that real Philips exports file in the image
#: series (exam card / raw-data companions; the real CD export in dwi_dcmqa/philips_dwi has two).
PHILIPS_PRIVATE_SOP_CLASS = "1.3.46.670589.11.0.0.12.2"


def non_image_objects(
    ph: Phantom, study: StudyData, series: SeriesData
) -> Iterator[tuple[str, Dataset]]:
    """Yield (relative path, Dataset) of the non-image objects a CD export puts beside a series.

    Opt-in (``generate_patient(non_image_objects=True)``, ``--non-image-objects``; UIDs as
    deterministic as the rest of the phantom): a Grayscale Softcopy Presentation State on
    the series' first image (its own series, made with highdicom) and a Philips-style private
    non-image object (SOP Class 1.3.46.670589.11.0.0.12.2, no pixel data) sharing the image
    series' Series Instance UID, as in real Philips exports. Readers must set both aside.
    """
    import highdicom as hd

    from processing.phantom.patient import phantom_uid

    def generate_uid(name: str) -> str:
        return phantom_uid(
            ph.seed,
            ph.scenario,
            ph.vendor,
            ph.size,
            study.key,
            series.series_uid,
            "non-image",
            name,
        )

    first = next(iter(series_datasets(ph, study, series)))[1]
    equipment = VENDOR_EQUIPMENT[ph.vendor]
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[first],
        series_instance_uid=generate_uid("gsps-series"),
        series_number=99,
        sop_instance_uid=generate_uid("gsps"),
        instance_number=1,
        manufacturer=str(equipment["Manufacturer"]),
        manufacturer_model_name=str(equipment["ManufacturerModelName"]),
        software_versions="phantom 1.0",
        device_serial_number="PH0001",
        content_label="PHANTOM",
    )
    yield f"{study.key}/{series.folder}/PS_0001.dcm", gsps
    private = Dataset()
    private.file_meta = file_meta(PHILIPS_PRIVATE_SOP_CLASS, generate_uid("philips-private"))
    for keyword in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
    ):
        if keyword in first:
            setattr(private, keyword, first.get(keyword))
    private.SOPClassUID = PHILIPS_PRIVATE_SOP_CLASS
    private.SOPInstanceUID = private.file_meta.MediaStorageSOPInstanceUID
    private.Modality = "MR"
    private.SeriesInstanceUID = series.series_uid
    private.SeriesNumber = first.get("SeriesNumber")
    private.InstanceNumber = 9999
    block = private.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
    block.add_new(0x10, "LO", "EXAMCARD")
    yield f"{study.key}/{series.folder}/XX_0001.dcm", private
