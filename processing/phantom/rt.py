"""The CyberKnife treatment course: RT Plan, RT Structure Set and RT Dose as Accuray exports them.

All three objects live in the baseline MR frame of reference (no planning CT is simulated; the
structure set references the baseline T2-weighted series). The plan has 110-160 non-isocentric,
non-coplanar static 6 MV beams (one isocentre position per beam, source-axis distance 800 mm,
fixed/IRIS cone modelled as a STEREOTACTIC applicator with square jaws), prescription to the 80 %
isodose. The dose grid is an analytic dose cloud: 125 % of the prescription at the GTV centre,
exactly the prescription (80 % isodose) on the GTV surface, falling off steeply outside.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import RTDoseStorage, RTPlanStorage, RTStructureSetStorage

from processing.phantom.anatomy import CANAL_CENTRE_Y_MM, CORD_SEMI_AXES_MM, Grid, TumourShape
from processing.phantom.mr import _ds_str, _tm, file_meta, patient_study_module

if TYPE_CHECKING:
    from processing.phantom.patient import Phantom

RT_EQUIPMENT = dict(
    Manufacturer="Accuray Inc.",
    ManufacturerModelName="CyberKnife",
    SoftwareVersions="Precision 3.3.1.3",
    InstitutionName="Phantom Hospital",
)
PTV_MARGIN_MM = 2.0
N_RAYS = 72


def plan_rt(ph: Phantom, rng: np.random.Generator) -> dict[str, Any]:
    """Decide the RT objects (UIDs, beams, contours, dose grid); returns their ground truth."""
    from processing.phantom.patient import phantom_uid

    ident = (ph.seed, ph.scenario, ph.vendor, ph.size)
    course = ph.rt["course"]
    baseline = ph.studies[0]
    t2 = next(s for s in baseline.series if s.role == "t2w")
    tumour = ph.anatomy.tumour
    n_beams = int(rng.integers(110, 161))
    centre = np.asarray(tumour.centre)
    beams: list[dict[str, Any]] = []
    for i in range(n_beams):
        iso = centre + rng.normal(0.0, 3.0, 3)
        beams.append(
            {
                "gantry": float(rng.uniform(0, 360)),
                "couch": float(rng.uniform(-40, 40)),
                "iso": [round(float(x), 2) for x in iso],
                "cone_mm": float(rng.choice([7.5, 10.0, 12.5, 15.0, 20.0])),
                "mu": round(float(rng.uniform(40, 320)), 1),
            }
        )
    contours = {
        "GTV": _slice_contours(tumour, ph.anatomy.tumour_contains, t2.grid, 0.0),
        "PTV": _slice_contours(tumour, ph.anatomy.tumour_contains, t2.grid, PTV_MARGIN_MM),
        "SpinalCord": _cord_contours(np.asarray(ph.anatomy.vertebra_centre), t2.grid),
    }
    dose_grid = _dose_grid(tumour)
    ph.rt.update(
        {
            "plan_uid": phantom_uid(*ident, "rtplan"),
            "struct_uid": phantom_uid(*ident, "rtstruct"),
            "dose_uid": phantom_uid(*ident, "rtdose"),
            "dose_reference_uid": phantom_uid(*ident, "dose-reference"),
            "plan_series_uid": phantom_uid(*ident, "rtplan-series"),
            "struct_series_uid": phantom_uid(*ident, "rtstruct-series"),
            "dose_series_uid": phantom_uid(*ident, "rtdose-series"),
            "beams": beams,
            "contours": contours,
            "dose_grid": dose_grid,
            "t2": t2,
        }
    )
    return {
        "rtplan": {
            "SOPInstanceUID": ph.rt["plan_uid"],
            "file": "rt/rtplan.dcm",
            "number_of_beams": n_beams,
            "total_mu": round(sum(b["mu"] for b in beams), 1),
        },
        "rtstruct": {
            "SOPInstanceUID": ph.rt["struct_uid"],
            "file": "rt/rtstruct.dcm",
            "referenced_series": t2.series_uid,
            "FrameOfReferenceUID": baseline.frame_of_reference_uid,
            "rois": {
                "GTV": {"number": 1, "type": "GTV", "slices": len(contours["GTV"])},
                "PTV": {
                    "number": 2,
                    "type": "PTV",
                    "slices": len(contours["PTV"]),
                    "margin_mm": PTV_MARGIN_MM,
                    "margin_note": "in-plane expansion only",
                },
                "SpinalCord": {"number": 3, "type": "ORGAN", "slices": len(contours["SpinalCord"])},
            },
        },
        "rtdose": {
            "SOPInstanceUID": ph.rt["dose_uid"],
            "file": "rt/rtdose.dcm",
            "geometry": dose_grid["grid"].as_dict(),
            "max_dose_gy_analytic": course["total_dose_gy"] / 0.8,
            "model": "D = Dmax * 0.8 ** (rho/rho_surface)**4 on the GTV's normalised radius; "
            "D = prescription on the GTV surface",
        },
    }


def _slice_contours(
    tumour: TumourShape,
    contains: Callable[[NDArray[np.float64]], NDArray[np.bool_]],
    grid: Grid,
    margin_mm: float,
) -> list[tuple[int, NDArray[np.float64]]]:
    """Closed planar contours of the tumour (expanded in-plane by ``margin_mm``) on each slice of
    ``grid``: rays from the section's centroid, the farthest inside point on each ray. ``contains``
    says where the tumour is drawn (:meth:`Anatomy.tumour_contains`, not the bare shape, whose main
    part may reach into the canal)."""
    out = []
    angles = np.linspace(0, 2 * np.pi, N_RAYS, endpoint=False)
    radii = np.arange(0.05, 45.0, 0.05)
    row, col = grid.matrix[:, 0], grid.matrix[:, 1]
    lo, hi = tumour.bounding_box()
    for k in range(grid.size[2]):
        p0 = grid.slice_position(k)
        if not (lo[2] - 1 <= p0[2] <= hi[2] + 1):  # axial structure-set grid: skip distant slices
            continue
        normal = grid.matrix[:, 2]
        # fine in-plane sampling around the tumour to find the section and its centroid
        s = np.arange(-45, 45, 0.5)
        uu, vv = np.meshgrid(s, s, indexing="ij")
        centre_proj = (
            np.asarray(tumour.centre) - ((np.asarray(tumour.centre) - p0) @ normal) * normal
        )
        pts = centre_proj + uu[..., None] * row + vv[..., None] * col
        inside = contains(pts)
        if not inside.any():
            continue
        c = pts[inside].mean(axis=0)
        dirs = np.cos(angles)[:, None] * row + np.sin(angles)[:, None] * col
        ray_pts = c + radii[None, :, None] * dirs[:, None, :]
        ins = contains(ray_pts)
        last = np.where(ins.any(axis=1), ins.shape[1] - 1 - np.argmax(ins[:, ::-1], axis=1), 0)
        r = radii[last] + 0.025 + margin_mm
        poly = c + r[:, None] * dirs
        out.append((k, np.round(poly, 3)))
    return out


def _cord_contours(c0: NDArray[np.float64], grid: Grid) -> list[tuple[int, NDArray[np.float64]]]:
    out = []
    a = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    for k in range(grid.size[2]):
        p0 = grid.slice_position(k)
        poly = np.stack(
            [
                c0[0] + CORD_SEMI_AXES_MM[0] * np.cos(a),
                c0[1] + CANAL_CENTRE_Y_MM + CORD_SEMI_AXES_MM[1] * np.sin(a),
                np.full_like(a, p0[2]),
            ],
            axis=1,
        )
        out.append((k, np.round(poly, 3)))
    return out


def _dose_grid(tumour: TumourShape) -> dict[str, Any]:
    spacing = 2.5
    n = (40, 40, 24)
    half = (np.asarray(n) - 1) * spacing / 2
    origin = np.round(np.asarray(tumour.centre) - half, 2)
    grid = Grid(
        n,
        (spacing, spacing, spacing),
        cast("tuple[float, float, float]", tuple(float(v) for v in origin)),
    )
    return {"grid": grid}


def _dose_values(tumour: TumourShape, grid: Grid, prescription_gy: float) -> NDArray[np.float64]:
    pts = grid.points()
    rot = np.asarray(tumour.rotation).reshape(3, 3)
    y = ((pts - np.asarray(tumour.centre)) @ rot) / np.asarray(tumour.radii)
    rho = np.linalg.norm(y, axis=-1)
    surface = tumour.radial(y / np.maximum(rho, 1e-12)[..., None])
    dmax = prescription_gy / 0.8
    dose: NDArray[np.float64] = dmax * 0.8 ** ((rho / surface) ** 4)
    return dose


def _common(
    ds: Dataset,
    ph: Phantom,
    modality: str,
    series_uid: str,
    series_number: int,
    description: str,
    when: dt.datetime,
) -> None:
    baseline = ph.studies[0]
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.InstanceCreationTime = _tm(when)
    patient_study_module(ds, ph, baseline)
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = str(series_number)
    ds.SeriesDescription = description
    ds.OperatorsName = ""
    for key, value in RT_EQUIPMENT.items():
        setattr(ds, key, value)
    ds.StationName = ph.rt["course"]["machine"]


def rt_datasets(ph: Phantom) -> Iterator[tuple[str, Dataset]]:
    """Yield the RT Structure Set, RT Plan and RT Dose of the course."""
    course = ph.rt["course"]
    plan_day = dt.datetime.strptime(course["plan_date"], "%Y%m%d") + dt.timedelta(hours=14)
    yield "rt/rtstruct.dcm", _rtstruct(ph, plan_day - dt.timedelta(days=1))
    yield "rt/rtplan.dcm", _rtplan(ph, plan_day)
    yield "rt/rtdose.dcm", _rtdose(ph, plan_day + dt.timedelta(minutes=20))


def _rtstruct(ph: Phantom, when: dt.datetime) -> Dataset:
    baseline = ph.studies[0]
    t2 = ph.rt["t2"]
    ds = Dataset()
    ds.file_meta = file_meta(RTStructureSetStorage, ph.rt["struct_uid"])
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = ph.rt["struct_uid"]
    _common(ds, ph, "RTSTRUCT", ph.rt["struct_series_uid"], 901, "CK Structures", when)
    ds.InstanceNumber = "1"
    ds.FrameOfReferenceUID = baseline.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.StructureSetLabel = "CK_SPINE"
    ds.StructureSetName = "CK spine SBRT"
    ds.StructureSetDate = when.strftime("%Y%m%d")
    ds.StructureSetTime = _tm(when)
    contour_images = Sequence()
    for k in range(t2.grid.size[2]):
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        item.ReferencedSOPInstanceUID = t2.sop_uids[0][k]
        contour_images.append(item)
    series_item = Dataset()
    series_item.SeriesInstanceUID = t2.series_uid
    series_item.ContourImageSequence = contour_images
    study_item = Dataset()
    study_item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study_item.ReferencedSOPInstanceUID = baseline.study_uid
    study_item.RTReferencedSeriesSequence = Sequence([series_item])
    for_item = Dataset()
    for_item.FrameOfReferenceUID = baseline.frame_of_reference_uid
    for_item.RTReferencedStudySequence = Sequence([study_item])
    ds.ReferencedFrameOfReferenceSequence = Sequence([for_item])
    rois = (
        ("GTV", "GTV", [255, 0, 0]),
        ("PTV", "PTV", [0, 128, 255]),
        ("SpinalCord", "ORGAN", [255, 255, 0]),
    )
    ds.StructureSetROISequence = Sequence()
    ds.ROIContourSequence = Sequence()
    ds.RTROIObservationsSequence = Sequence()
    for number, (name, kind, colour) in enumerate(rois, start=1):
        roi = Dataset()
        roi.ROINumber = str(number)
        roi.ReferencedFrameOfReferenceUID = baseline.frame_of_reference_uid
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "MANUAL"
        ds.StructureSetROISequence.append(roi)
        rc = Dataset()
        rc.ROIDisplayColor = [str(c) for c in colour]
        rc.ReferencedROINumber = str(number)
        rc.ContourSequence = Sequence()
        for cnum, (k, poly) in enumerate(ph.rt["contours"][name], start=1):
            c = Dataset()
            img = Dataset()
            img.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
            img.ReferencedSOPInstanceUID = t2.sop_uids[0][k]
            c.ContourImageSequence = Sequence([img])
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = str(len(poly))
            c.ContourNumber = str(cnum)
            c.ContourData = [_ds_str(float(x)) for x in poly.ravel()]
            rc.ContourSequence.append(c)
        ds.ROIContourSequence.append(rc)
        obs = Dataset()
        obs.ObservationNumber = str(number)
        obs.ReferencedROINumber = str(number)
        obs.RTROIInterpretedType = kind
        obs.ROIInterpreter = ""
        ds.RTROIObservationsSequence.append(obs)
    ds.ApprovalStatus = "APPROVED"
    ds.ReviewDate = when.strftime("%Y%m%d")
    ds.ReviewTime = _tm(when)
    ds.ReviewerName = "Physicist^Phantom"
    return ds


def _rtplan(ph: Phantom, when: dt.datetime) -> Dataset:
    course = ph.rt["course"]
    ds = Dataset()
    ds.file_meta = file_meta(RTPlanStorage, ph.rt["plan_uid"])
    ds.SOPClassUID = RTPlanStorage
    ds.SOPInstanceUID = ph.rt["plan_uid"]
    _common(ds, ph, "RTPLAN", ph.rt["plan_series_uid"], 902, "CK Plan", when)
    ds.InstanceNumber = "1"
    ds.FrameOfReferenceUID = ph.studies[0].frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.RTPlanLabel = f"{course['treated_level']}_SBRT"
    ds.RTPlanName = (
        f"{course['treated_level']} spine {course['total_dose_gy']:g}Gy/{course['fractions']}"
    )
    ds.RTPlanDate = when.strftime("%Y%m%d")
    ds.RTPlanTime = _tm(when)
    ds.RTPlanGeometry = "PATIENT"
    ds.PlanIntent = "PALLIATIVE"
    ds.PrescriptionDescription = (
        f"{course['total_dose_gy']:g} Gy in {course['fractions']} fraction(s) "
        f"to the {course['prescription_isodose_percent']:g}% isodose"
    )
    ref_ss = Dataset()
    ref_ss.ReferencedSOPClassUID = RTStructureSetStorage
    ref_ss.ReferencedSOPInstanceUID = ph.rt["struct_uid"]
    ds.ReferencedStructureSetSequence = Sequence([ref_ss])
    dref = Dataset()
    dref.DoseReferenceNumber = "1"
    dref.DoseReferenceUID = ph.rt["dose_reference_uid"]
    dref.DoseReferenceStructureType = "VOLUME"
    dref.ReferencedROINumber = "1"
    dref.DoseReferenceDescription = "GTV"
    dref.DoseReferenceType = "TARGET"
    dref.TargetPrescriptionDose = _ds_str(course["total_dose_gy"])
    dref.DeliveryMaximumDose = _ds_str(round(course["total_dose_gy"] / 0.8, 2))
    ds.DoseReferenceSequence = Sequence([dref])
    beams = ph.rt["beams"]
    fg = Dataset()
    fg.FractionGroupNumber = "1"
    fg.NumberOfFractionsPlanned = str(course["fractions"])
    fg.NumberOfBeams = str(len(beams))
    fg.NumberOfBrachyApplicationSetups = "0"
    fg.ReferencedBeamSequence = Sequence()
    for i, b in enumerate(beams, start=1):
        rb = Dataset()
        rb.ReferencedBeamNumber = str(i)
        rb.BeamMeterset = _ds_str(b["mu"])
        fg.ReferencedBeamSequence.append(rb)
    ds.FractionGroupSequence = Sequence([fg])
    ds.BeamSequence = Sequence()
    for i, b in enumerate(beams, start=1):
        beam = Dataset()
        beam.Manufacturer = RT_EQUIPMENT["Manufacturer"]
        beam.ManufacturerModelName = RT_EQUIPMENT["ManufacturerModelName"]
        beam.TreatmentMachineName = course["machine"]
        beam.PrimaryDosimeterUnit = "MU"
        beam.SourceAxisDistance = "800"
        half = b["cone_mm"] / 2.0
        bld = Sequence()
        for jaw in ("ASYMX", "ASYMY"):
            d = Dataset()
            d.RTBeamLimitingDeviceType = jaw
            d.NumberOfLeafJawPairs = "1"
            bld.append(d)
        beam.BeamLimitingDeviceSequence = bld
        beam.BeamNumber = str(i)
        beam.BeamName = f"Node{i:03d}"
        beam.BeamDescription = f"IRIS {b['cone_mm']:g} mm"
        beam.BeamType = "STATIC"
        beam.RadiationType = "PHOTON"
        beam.TreatmentDeliveryType = "TREATMENT"
        beam.NumberOfWedges = "0"
        beam.NumberOfCompensators = "0"
        beam.NumberOfBoli = "0"
        beam.NumberOfBlocks = "0"
        app = Dataset()
        app.ApplicatorID = f"IRIS{b['cone_mm']:g}"
        app.ApplicatorType = "STEREOTACTIC"
        app.ApplicatorDescription = f"IRIS variable aperture {b['cone_mm']:g} mm"
        beam.ApplicatorSequence = Sequence([app])
        beam.FinalCumulativeMetersetWeight = "1"
        beam.NumberOfControlPoints = "2"
        cps = Sequence()
        for idx in (0, 1):
            cp = Dataset()
            cp.ControlPointIndex = str(idx)
            cp.CumulativeMetersetWeight = str(idx)
            if idx == 0:
                cp.NominalBeamEnergy = "6"
                cp.DoseRateSet = "1000"
                pos = Sequence()
                for jaw in ("ASYMX", "ASYMY"):
                    p = Dataset()
                    p.RTBeamLimitingDeviceType = jaw
                    p.LeafJawPositions = [_ds_str(-half), _ds_str(half)]
                    pos.append(p)
                cp.BeamLimitingDevicePositionSequence = pos
                cp.GantryAngle = _ds_str(round(b["gantry"], 2))
                cp.GantryRotationDirection = "NONE"
                cp.BeamLimitingDeviceAngle = "0"
                cp.BeamLimitingDeviceRotationDirection = "NONE"
                cp.PatientSupportAngle = _ds_str(round(b["couch"] % 360, 2))
                cp.PatientSupportRotationDirection = "NONE"
                cp.TableTopEccentricAngle = "0"
                cp.TableTopEccentricRotationDirection = "NONE"
                cp.TableTopVerticalPosition = ""
                cp.TableTopLongitudinalPosition = ""
                cp.TableTopLateralPosition = ""
                cp.IsocenterPosition = [_ds_str(x) for x in b["iso"]]
            cps.append(cp)
        beam.ControlPointSequence = cps
        beam.ReferencedPatientSetupNumber = "1"
        ds.BeamSequence.append(beam)
    setup = Dataset()
    setup.PatientSetupNumber = "1"
    setup.PatientPosition = "HFS"
    ds.PatientSetupSequence = Sequence([setup])
    ds.ApprovalStatus = "APPROVED"
    review = dt.datetime.strptime(course["review_date"], "%Y%m%d") + dt.timedelta(hours=16)
    ds.ReviewDate = review.strftime("%Y%m%d")
    ds.ReviewTime = _tm(review)
    ds.ReviewerName = "Oncologist^Phantom"
    return ds


def _rtdose(ph: Phantom, when: dt.datetime) -> Dataset:
    course = ph.rt["course"]
    grid: Grid = ph.rt["dose_grid"]["grid"]
    dose = _dose_values(ph.anatomy.tumour, grid, course["total_dose_gy"])
    # 16-bit grid: dicom3tools' dciodvfy cannot parse 32-bit OW pixel data
    # (assertion in attrothr.cc)
    scaling = float(dose.max()) / 60000.0
    ds = Dataset()
    ds.file_meta = file_meta(RTDoseStorage, ph.rt["dose_uid"])
    ds.SOPClassUID = RTDoseStorage
    ds.SOPInstanceUID = ph.rt["dose_uid"]
    _common(ds, ph, "RTDOSE", ph.rt["dose_series_uid"], 903, "CK Dose", when)
    ds.ContentDate = when.strftime("%Y%m%d")
    ds.ContentTime = _tm(when)
    ds.InstanceNumber = "1"
    ds.FrameOfReferenceUID = ph.studies[0].frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ImagePositionPatient = [_ds_str(x) for x in grid.origin]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [_ds_str(grid.spacing[1]), _ds_str(grid.spacing[0])]
    ds.SliceThickness = _ds_str(grid.spacing[2])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = grid.size[1]
    ds.Columns = grid.size[0]
    ds.NumberOfFrames = str(grid.size[2])
    ds.FrameIncrementPointer = 0x3004000C
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = "PLAN"
    ref = Dataset()
    ref.ReferencedSOPClassUID = RTPlanStorage
    ref.ReferencedSOPInstanceUID = ph.rt["plan_uid"]
    ds.ReferencedRTPlanSequence = Sequence([ref])
    ds.GridFrameOffsetVector = [_ds_str(k * grid.spacing[2]) for k in range(grid.size[2])]
    ds.DoseGridScaling = _ds_str(scaling)
    ds.PixelData = np.rint(dose / scaling).astype(np.uint16).tobytes()
    return ds
