"""Enhanced MR Image Storage (PS3.3 A.36.2): one multi-frame object per series, as Siemens XA
writes.

Frames are in the classic file order (volume-major, slices inferior to superior). Like the
Siemens XA exports, Pixel Measures, Plane Position, Plane Orientation, Frame Content and the MR
Image Frame Type are written per frame; the timing, FOV, echo, modifier, coil and averages
macros are shared except where they vary (flip angle of the VFA series). DWI frames carry the
MR Diffusion macro (b-value, directionality, LPS gradient); DCE frames carry the Temporal
Position Index, FrameAcquisitionDateTime/FrameReferenceDateTime and the Enhanced Contrast/Bolus
module with its per-frame Contrast/Bolus Usage. Dimensions: Stack ID and In-Stack Position, plus
b-value and gradient (DWI), Temporal Position Index (DCE) or flip angle (VFA).
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import EnhancedMRImageStorage

from processing.phantom import protocol as proto
from processing.phantom.mr import (
    _ds_str,
    _tm,
    equipment_and_series_module,
    file_meta,
)

if TYPE_CHECKING:
    from processing.phantom.patient import Phantom, SeriesData, StudyData

ACQUISITION_CONTRAST = {
    "t2w": "T2",
    "t1w": "T1",
    "stir": "T2",
    "dwi": "DIFFUSION",
    "vfa_t1": "T1",
    "dce": "T1",
}
PULSE_SEQUENCE = {
    "t2w": "tse2d1_17",
    "t1w": "tse2d1_3",
    "stir": "tir2d1_13",
    "dwi": "ep_b",
    "vfa_t1": "fl3d1",
    "dce": "fl3d1",
}


def _code(code: Any) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _dt(t: dt.datetime) -> str:
    return t.strftime("%Y%m%d%H%M%S.%f")


def _dimension(org_uid: str, pointer: int, group: int, label: str) -> Dataset:
    d = Dataset()
    d.DimensionOrganizationUID = org_uid
    d.DimensionIndexPointer = Tag(pointer)
    d.FunctionalGroupPointer = Tag(group)
    d.DimensionDescriptionLabel = label
    return d


#: MR Pulse Sequence module attributes (Type 1C: present only in ORIGINAL or MIXED images)
PULSE_SEQUENCE_KEYWORDS = (
    "PulseSequenceName",
    "MRAcquisitionType",
    "EchoPulseSequence",
    "MultipleSpinEcho",
    "MultiPlanarExcitation",
    "PhaseContrast",
    "TimeOfFlightContrast",
    "SteadyStatePulseSequence",
    "EchoPlanarPulseSequence",
    "SaturationRecovery",
    "SpectrallySelectedSuppression",
    "OversamplingPhase",
    "GeometryOfKSpaceTraversal",
    "SegmentedKSpaceTraversal",
    "RectilinearPhaseEncodeReordering",
    "NumberOfKSpaceTrajectories",
    "CoverageOfKSpace",
)


def enhanced_series_dataset(ph: Phantom, study: StudyData, series: SeriesData) -> Dataset:
    """The Enhanced MR Image object holding every frame of ``series``."""
    from processing.phantom.patient import phantom_uid

    sp = series.protocol
    grid = series.grid
    nz = grid.size[2]
    n_vol = len(series.volumes)
    sop_uid = series.sop_uids[0][0]
    role = series.role
    ds = Dataset()
    ds.file_meta = file_meta(EnhancedMRImageStorage, sop_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    end = series.start + dt.timedelta(seconds=series.volumes[-1]["time_s"] + 15.0)
    image_type_3 = "DIFFUSION" if role == "dwi" else ("PERFUSION" if role == "dce" else "STATIC")
    frame_type = (
        ["DERIVED", "PRIMARY", image_type_3, series.derived]
        if series.derived
        else ["ORIGINAL", "PRIMARY", image_type_3, "NONE"]
    )
    ds.ImageType = frame_type
    ds.InstanceCreationDate = study.date.strftime("%Y%m%d")
    ds.InstanceCreationTime = _tm(end)
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = study.date.strftime("%Y%m%d")
    ds.SeriesDate = study.date.strftime("%Y%m%d")
    ds.ContentDate = study.date.strftime("%Y%m%d")
    ds.SeriesTime = _tm(series.start)
    ds.ContentTime = _tm(end)
    ds.AcquisitionDateTime = _dt(series.start)
    equipment_and_series_module(ds, ph, study, "enhanced", sp.description)
    ds.PatientPosition = "HFS"
    ds.SeriesInstanceUID = series.series_uid
    ds.SeriesNumber = str(sp.series_number)
    ds.InstanceNumber = "1"
    ds.AcquisitionNumber = "1"
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionContextSequence = Sequence()
    # Enhanced MR Image module
    ds.AcquisitionDuration = float(
        series.volumes[-1]["time_s"] + (sp.tr_ms / 1000.0 if role != "dce" else 5.0)
    )
    ds.ResonantNucleus = "1H"
    ds.KSpaceFiltering = "NONE"
    ds.MagneticFieldStrength = _ds_str(ph.contrast["field_strength_t"])
    ds.ApplicableSafetyStandardAgency = "IEC"
    ds.ContentQualification = "PRODUCT"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = ACQUISITION_CONTRAST[role]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.PresentationLUTShape = "IDENTITY"
    # MR Pulse Sequence module
    ds.PulseSequenceName = PULSE_SEQUENCE[role]
    ds.MRAcquisitionType = sp.acquisition_type
    ds.EchoPulseSequence = "GRADIENT" if role in ("vfa_t1", "dce") else "SPIN"
    if role not in ("vfa_t1", "dce"):
        ds.MultipleSpinEcho = "NO"
    ds.MultiPlanarExcitation = "NO"
    ds.PhaseContrast = "NO"
    ds.TimeOfFlightContrast = "NO"
    ds.SteadyStatePulseSequence = "NONE"
    ds.EchoPlanarPulseSequence = "YES" if role == "dwi" else "NO"
    ds.SaturationRecovery = "NO"
    ds.SpectrallySelectedSuppression = "FAT" if role == "dwi" else "NONE"
    ds.OversamplingPhase = "NONE"
    ds.GeometryOfKSpaceTraversal = "RECTILINEAR"
    ds.SegmentedKSpaceTraversal = (
        "SINGLE" if role == "dwi" else ("PARTIAL" if role in ("t2w", "t1w", "stir") else "SINGLE")
    )
    ds.RectilinearPhaseEncodeReordering = "LINEAR"
    ds.NumberOfKSpaceTrajectories = 1
    ds.CoverageOfKSpace = "FULL" if sp.acquisition_type == "3D" else None
    if sp.acquisition_type != "3D":
        del ds.CoverageOfKSpace
    if series.derived:
        # a DERIVED image carries no MR Pulse Sequence attributes (Type 1C: only ORIGINAL/MIXED)
        for keyword in PULSE_SEQUENCE_KEYWORDS:
            if keyword in ds:
                delattr(ds, keyword)
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = grid.size[1]
    ds.Columns = grid.size[0]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if role == "dce":
        _enhanced_contrast(ds, ph, series)
    # Multi-frame Dimension module
    org_uid = phantom_uid(
        ph.seed,
        ph.scenario,
        ph.vendor,
        ph.size,
        study.key,
        role,
        *([series.derived] if series.derived else []),
        "dimension-organization",
    )
    org = Dataset()
    org.DimensionOrganizationUID = org_uid
    ds.DimensionOrganizationSequence = Sequence([org])
    ds.DimensionOrganizationType = "3D" if n_vol == 1 else "3D_TEMPORAL" if role == "dce" else None
    if ds.DimensionOrganizationType is None:
        del ds.DimensionOrganizationType
    dims = [
        _dimension(org_uid, 0x00209056, 0x00209111, "Stack ID"),
        _dimension(org_uid, 0x00209057, 0x00209111, "In-Stack Position Number"),
    ]
    if role == "dwi" and series.derived == "TRACEW":
        dims.append(_dimension(org_uid, 0x00189087, 0x00189117, "Diffusion b-value"))
    elif role == "dwi" and series.derived is None:
        dims += [
            _dimension(org_uid, 0x00189087, 0x00189117, "Diffusion b-value"),
            _dimension(org_uid, 0x00189089, 0x00189076, "Diffusion Gradient Orientation"),
        ]
    elif role == "dce":
        dims.append(_dimension(org_uid, 0x00209128, 0x00209111, "Temporal Position Index"))
    elif role == "vfa_t1":
        dims.append(_dimension(org_uid, 0x00181314, 0x00189112, "Flip Angle"))
    ds.DimensionIndexSequence = Sequence(dims)
    # Multi-frame Functional Groups
    ds.NumberOfFrames = str(n_vol * nz)
    ds.SharedFunctionalGroupsSequence = Sequence([_shared_groups(ph, series)])
    bvals = sorted({v.get("b", 0.0) for v in series.volumes})
    grads: list[tuple[float, ...]] = []
    for vol in series.volumes:
        g = tuple(vol.get("gradient", (0.0, 0.0, 0.0)))
        if g not in grads:
            grads.append(g)
    per_frame = Sequence()
    orientation = [_ds_str(x) for x in (list(grid.matrix[:, 0]) + list(grid.matrix[:, 1]))]
    for v, meta in enumerate(series.volumes):
        t_frame = series.start + dt.timedelta(seconds=meta["time_s"])
        for k in range(nz):
            fg = Dataset()
            fc = Dataset()
            fc.FrameAcquisitionNumber = v + 1
            fc.FrameReferenceDateTime = _dt(t_frame)
            fc.FrameAcquisitionDateTime = _dt(t_frame)
            fc.FrameAcquisitionDuration = float(
                sp.tr_ms if role != "dce" else meta.get("duration_ms", 4000.0)
            )
            fc.StackID = "1"
            fc.InStackPositionNumber = k + 1
            index = [1, k + 1]
            if role == "dwi" and series.derived == "TRACEW":
                index.append(bvals.index(meta["b"]) + 1)
            elif role == "dwi" and series.derived is None:
                index += [bvals.index(meta["b"]) + 1, grads.index(tuple(meta["gradient"])) + 1]
            elif role == "dce":
                fc.TemporalPositionIndex = int(meta["temporal_position"])
                index.append(int(meta["temporal_position"]))
            elif role == "vfa_t1":
                index.append(v + 1)
            fc.DimensionIndexValues = index
            fg.FrameContentSequence = Sequence([fc])
            pos = Dataset()
            pos.ImagePositionPatient = [_ds_str(x) for x in grid.slice_position(k)]
            fg.PlanePositionSequence = Sequence([pos])
            ori = Dataset()
            ori.ImageOrientationPatient = orientation
            fg.PlaneOrientationSequence = Sequence([ori])
            pm = Dataset()
            pm.PixelSpacing = [_ds_str(grid.spacing[1]), _ds_str(grid.spacing[0])]
            pm.SliceThickness = _ds_str(grid.spacing[2])
            pm.SpacingBetweenSlices = _ds_str(grid.spacing[2])
            fg.PixelMeasuresSequence = Sequence([pm])
            ft = Dataset()
            ft.FrameType = frame_type
            ft.PixelPresentation = "MONOCHROME"
            ft.VolumetricProperties = "VOLUME"
            ft.VolumeBasedCalculationTechnique = "NONE"
            ft.ComplexImageComponent = "MAGNITUDE"
            ft.AcquisitionContrast = ACQUISITION_CONTRAST[role]
            fg.MRImageFrameTypeSequence = Sequence([ft])
            if role == "dwi":
                fg.MRDiffusionSequence = Sequence([_diffusion_item(meta)])
            if role == "vfa_t1":
                fg.MRTimingAndRelatedParametersSequence = Sequence(
                    [_timing_item(sp, meta["flip_deg"])]
                )
            if role == "dce":
                usage = Dataset()
                usage.ContrastBolusAgentNumber = 1
                usage.ContrastBolusAgentAdministered = (
                    "YES" if meta["time_s"] >= proto.BOLUS_ARRIVAL_S - 10.0 else "NO"
                )
                usage.ContrastBolusAgentDetected = (
                    "YES" if meta["time_s"] >= proto.BOLUS_ARRIVAL_S else "NO"
                )
                fg.ContrastBolusUsageSequence = Sequence([usage])
            per_frame.append(fg)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.ascontiguousarray(
        series.pixels.reshape(n_vol * nz, grid.size[1], grid.size[0])
    ).tobytes()
    return ds


def _timing_item(sp: proto.SeriesProtocol, flip_deg: float) -> Dataset:
    t = Dataset()
    t.RepetitionTime = float(sp.tr_ms)
    t.FlipAngle = float(flip_deg)
    etl = 1 if sp.acquisition_type == "3D" else (64 if sp.role == "dwi" else 17)
    t.EchoTrainLength = etl
    t.RFEchoTrainLength = 0 if sp.role in ("dwi", "vfa_t1", "dce") else etl
    t.GradientEchoTrainLength = (
        etl if sp.role == "dwi" else (1 if sp.role in ("vfa_t1", "dce") else 0)
    )
    sar = Dataset()
    sar.SpecificAbsorptionRateDefinition = "IEC_WHOLE_BODY"
    sar.SpecificAbsorptionRateValue = 0.4
    t.SpecificAbsorptionRateSequence = Sequence([sar])
    t.GradientOutputType = "DB_DT"
    t.GradientOutput = 50.0
    modes = []
    for kind in ("STATIC FIELD", "RF", "GRADIENT"):
        m = Dataset()
        m.OperatingModeType = kind
        m.OperatingMode = "IEC_NORMAL"
        modes.append(m)
    t.OperatingModeSequence = Sequence(modes)
    return t


def _diffusion_item(meta: dict[str, Any]) -> Dataset:
    d = Dataset()
    b = float(meta["b"])
    d.DiffusionBValue = b
    if meta.get("isotropic"):  # scanner-combined trace / map frame, as Siemens XA writes it
        d.DiffusionDirectionality = "ISOTROPIC"
    elif b > 0:
        d.DiffusionDirectionality = "DIRECTIONAL"
        g = Dataset()
        g.DiffusionGradientOrientation = [float(x) for x in meta["gradient"]]
        d.DiffusionGradientDirectionSequence = Sequence([g])
    else:
        d.DiffusionDirectionality = "NONE"
    return d


def _shared_groups(ph: Phantom, series: SeriesData) -> Dataset:
    sp = series.protocol
    role = series.role
    grid = series.grid
    fg = Dataset()
    if role != "vfa_t1":
        fg.MRTimingAndRelatedParametersSequence = Sequence([_timing_item(sp, sp.flip_deg)])
    fov = Dataset()
    fov.InPlanePhaseEncodingDirection = "COLUMN"
    fov.MRAcquisitionFrequencyEncodingSteps = grid.size[0]
    fov.MRAcquisitionPhaseEncodingStepsInPlane = grid.size[1]
    if sp.acquisition_type == "3D":
        fov.MRAcquisitionPhaseEncodingStepsOutOfPlane = grid.size[2]
    fov.PercentSampling = 100.0
    fov.PercentPhaseFieldOfView = 100.0
    fg.MRFOVGeometrySequence = Sequence([fov])
    echo = Dataset()
    echo.EffectiveEchoTime = float(sp.te_ms)
    fg.MREchoSequence = Sequence([echo])
    mod = Dataset()
    mod.InversionRecovery = "YES" if sp.ti_ms is not None else "NO"
    if sp.ti_ms is not None:
        mod.InversionTimes = [float(sp.ti_ms)]
    mod.FlowCompensation = "NONE"
    mod.T2Preparation = "NO"
    mod.SpectrallySelectedExcitation = "NONE"
    mod.SpatialPresaturation = "NONE"
    mod.PartialFourier = "NO"
    mod.ParallelAcquisition = "NO"
    fg.MRModifierSequence = Sequence([mod])
    imod = Dataset()
    imod.MagnetizationTransfer = "NONE"
    imod.BloodSignalNulling = "NO"
    imod.Tagging = "NONE"
    imod.TransmitterFrequency = [123.2]
    imod.PixelBandwidth = 300.0
    fg.MRImagingModifierSequence = Sequence([imod])
    rx = Dataset()
    rx.ReceiveCoilName = "Spine_32"
    rx.ReceiveCoilManufacturerName = "SIEMENS"
    rx.ReceiveCoilType = "MULTICOIL"
    rx.QuadratureReceiveCoil = "NO"
    element = Dataset()
    element.MultiCoilElementName = "SP1;SP2;SP3"
    element.MultiCoilElementUsed = "YES"
    rx.MultiCoilDefinitionSequence = Sequence([element])
    fg.MRReceiveCoilSequence = Sequence([rx])
    tx = Dataset()
    tx.TransmitCoilName = "Body"
    tx.TransmitCoilManufacturerName = "SIEMENS"
    tx.TransmitCoilType = "BODY"
    fg.MRTransmitCoilSequence = Sequence([tx])
    avg = Dataset()
    avg.NumberOfAverages = 1.0
    fg.MRAveragesSequence = Sequence([avg])
    pvt = Dataset()
    pvt.RescaleIntercept = "0"
    pvt.RescaleSlope = "1"
    pvt.RescaleType = "US"
    fg.PixelValueTransformationSequence = Sequence([pvt])
    voi = Dataset()
    voi.WindowCenter = "1000"
    voi.WindowWidth = "2000"
    fg.FrameVOILUTSequence = Sequence([voi])
    anat = Dataset()
    anat.AnatomicRegionSequence = Sequence([_code(codes.SCT.Spine)])
    anat.FrameLaterality = "U"
    fg.FrameAnatomySequence = Sequence([anat])
    return fg


def _enhanced_contrast(ds: Dataset, ph: Phantom, series: SeriesData) -> None:
    """Enhanced Contrast/Bolus module (PS3.3 C.7.6.4b)."""
    declared = ph.contrast
    volume_ml = round(
        float(ph.patient["PatientWeight"]) * declared["dose_mmol_per_kg"] / declared["mmol_per_ml"],
        1,
    )
    agent = _code(getattr(codes.SCT, declared["sct"]))
    agent.ContrastBolusAgentNumber = 1
    route = _code(codes.SCT.IntravenousRoute)
    agent.ContrastBolusAdministrationRouteSequence = Sequence([route])
    ingredient = _code(codes.SCT.Gadolinium)
    agent.ContrastBolusIngredientCodeSequence = Sequence([ingredient])
    agent.ContrastBolusVolume = volume_ml
    agent.ContrastBolusIngredientConcentration = declared["gadolinium_mg_per_ml"]
    agent.ContrastBolusIngredientOpaque = "NO"
    admin = Dataset()
    admin.ContrastBolusVolume = volume_ml
    start = series.start + dt.timedelta(seconds=proto.BOLUS_ARRIVAL_S - 10.0)
    admin.ContrastBolusStartTime = _tm(start)
    admin.ContrastBolusStopTime = _tm(start + dt.timedelta(seconds=volume_ml / 3.0))
    admin.ContrastFlowRate = [3.0]
    admin.ContrastFlowDuration = [round(volume_ml / 3.0, 2)]
    agent.ContrastAdministrationProfileSequence = Sequence([admin])
    ds.ContrastBolusAgentSequence = Sequence([agent])
