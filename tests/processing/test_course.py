"""CyberKnife course recognition, treatment date, fractionation, GTV choice, GTV dose, BED/EQD2."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

from processing.course import (
    RT_DOSE_STORAGE,
    RT_PLAN_STORAGE,
    CourseError,
    CyberKnifePatterns,
    bed,
    dose_statistics,
    eqd2,
    fractionation,
    recognise,
    recognise_course,
    rtdose_image,
    select_gtv,
    treatment_date,
)
from processing.rtstruct import rtstruct_to_mask

FOR_UID = "2.25.100"


def _plan(
    *,
    manufacturer="Accuray Inc.",
    model="CyberKnife",
    machine="CK1",
    n_beams=120,
    fractions=3,
    prescription=27.0,
    plan_date="20260301",
    review_date="20260305",
    approval="APPROVED",
    uid="2.25.200",
) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = RT_PLAN_STORAGE
    ds.SOPInstanceUID = uid
    ds.Modality = "RTPLAN"
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model
    ds.StudyInstanceUID = "2.25.300"
    ds.FrameOfReferenceUID = FOR_UID
    ds.RTPlanLabel = "L2 SBRT"
    ds.RTPlanDate = plan_date
    ds.ApprovalStatus = approval
    if review_date:
        ds.ReviewDate = review_date
    ds.BeamSequence = DicomSequence()
    for number in range(1, n_beams + 1):
        beam = Dataset()
        beam.BeamNumber = number
        beam.TreatmentMachineName = machine
        beam.TreatmentDeliveryType = "TREATMENT"
        ds.BeamSequence.append(beam)
    group = Dataset()
    group.FractionGroupNumber = 1
    group.NumberOfFractionsPlanned = fractions
    group.NumberOfBeams = n_beams
    ds.FractionGroupSequence = DicomSequence([group])
    organ = Dataset()
    organ.DoseReferenceNumber = 1
    organ.DoseReferenceType = "ORGAN_AT_RISK"
    organ.DeliveryMaximumDose = 21.0
    target = Dataset()
    target.DoseReferenceNumber = 2
    target.DoseReferenceType = "TARGET"
    target.TargetPrescriptionDose = prescription
    ds.DoseReferenceSequence = DicomSequence([organ, target])
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ref.ReferencedSOPInstanceUID = "2.25.400"
    ds.ReferencedStructureSetSequence = DicomSequence([ref])
    return ds


def _structure_set(rois) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    ds.SOPInstanceUID = "2.25.400"
    ds.Modality = "RTSTRUCT"
    ds.StructureSetROISequence = DicomSequence()
    ds.ROIContourSequence = DicomSequence()
    ds.RTROIObservationsSequence = DicomSequence()
    for number, name, kind, box in rois:
        item = Dataset()
        item.ROINumber = number
        item.ROIName = name
        item.ReferencedFrameOfReferenceUID = FOR_UID
        ds.StructureSetROISequence.append(item)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ContourSequence = DicomSequence()
        if box is not None:
            (x0, x1), (y0, y1), zs = box
            for z in zs:
                c = Dataset()
                c.ContourGeometricType = "CLOSED_PLANAR"
                points = [x0, y0, z, x1, y0, z, x1, y1, z, x0, y1, z]
                c.NumberOfContourPoints = 4
                c.ContourData = [float(v) for v in points]
                rc.ContourSequence.append(c)
        ds.ROIContourSequence.append(rc)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        if kind:
            obs.RTROIInterpretedType = kind
        ds.RTROIObservationsSequence.append(obs)
    return ds


def _dose(
    array_gy: np.ndarray, *, origin, spacing, summation="PLAN", scaling=1e-4, plan_uid="2.25.200"
) -> Dataset:
    """RT Dose from a (z, y, x) array in Gy, stored as uint32 with DoseGridScaling."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = RT_DOSE_STORAGE
    ds.SOPInstanceUID = "2.25.500"
    ds.Modality = "RTDOSE"
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = summation
    ds.DoseGridScaling = scaling
    ds.InstanceCreationDate = "20260228"
    ds.ImagePositionPatient = list(origin)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [spacing[1], spacing[0]]
    nz, ny, nx = array_gy.shape
    ds.GridFrameOffsetVector = [k * spacing[2] for k in range(nz)]
    ds.NumberOfFrames = nz
    ds.Rows, ds.Columns = ny, nx
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 32
    ds.HighBit = 31
    ds.PixelRepresentation = 0
    ds.PixelData = np.round(array_gy / scaling).astype("<u4").tobytes()
    ref = Dataset()
    ref.ReferencedSOPClassUID = RT_PLAN_STORAGE
    ref.ReferencedSOPInstanceUID = plan_uid
    ds.ReferencedRTPlanSequence = DicomSequence([ref])
    return ds


def _linear_dose(summation="PLAN", per_fraction_divisor=1.0) -> Dataset:
    # dose = 20 Gy + 0.1 Gy/mm * x on a 2.5 mm grid covering x = -10 ... 137.5 mm
    spacing = (2.5, 2.5, 2.5)
    origin = (-10.0, -10.0, -10.0)
    nx, ny, nz = 60, 12, 10
    x = origin[0] + np.arange(nx) * spacing[0]
    array = np.broadcast_to(20.0 + 0.1 * x, (nz, ny, nx)).copy() / per_fraction_divisor
    return _dose(array, origin=origin, spacing=spacing, summation=summation)


def _planning_grid() -> sitk.Image:
    grid = sitk.Image([110, 10, 8], sitk.sitkInt16)
    grid.SetOrigin((-5.0, -2.0, -3.0))  # 1 mm voxels: x = -5 ... 104, z = -3 ... 4 mm
    return grid


# GTV box: voxel centres x = 0 ... 99 mm (100 columns), y = 1 ... 4, z = 0, 1, 2 (one contour per
# 1 mm)
GTV_BOX = ((-0.5, 99.5), (0.5, 4.5), (0.0, 1.0, 2.0))


def test_bed_and_eqd2_match_the_domain_table() -> None:
    table = {
        (16.0, 1): (41.6, 34.7),
        (24.0, 1): (81.6, 68.0),
        (24.0, 2): (52.8, 44.0),
        (24.0, 3): (43.2, 36.0),
        (27.0, 3): (51.3, 42.8),
        (30.0, 5): (48.0, 40.0),
    }
    for (dose, n), (bed10, eqd2_10) in table.items():
        assert bed(dose, n) == pytest.approx(bed10, abs=0.05)
        assert eqd2(dose, n) == pytest.approx(eqd2_10, abs=0.05)
    assert bed(24.0, 1, alpha_beta_gy=3.0) == pytest.approx(24 * (1 + 24 / 3))
    with pytest.raises(ValueError, match="fractions"):
        bed(10.0, 0)


def test_recognition_by_manufacturer_machine_and_beam_count() -> None:
    ck = recognise(_plan())
    assert ck.is_cyberknife and ck.n_beams == 120 and ck.machine == "CK1"
    linac = recognise(
        _plan(manufacturer="Varian Medical Systems", model="TrueBeam", machine="TB2", n_beams=7)
    )
    assert not linac.is_cyberknife
    # a site linac named "CK-linac" with 7 beams: the name matches, the beam count says no
    assert not recognise(
        _plan(manufacturer="Elekta", model="Versa", machine="CK-linac", n_beams=7)
    ).is_cyberknife
    assert recognise(
        _plan(manufacturer="", model="", machine="CyberKnife M6", n_beams=140)
    ).is_cyberknife
    # Accuray Radixact plan (few beams, not a CyberKnife machine name)
    assert not recognise(_plan(model="Radixact", machine="RDX1", n_beams=1)).is_cyberknife
    site = CyberKnifePatterns(machine=r"^robot", min_beams=50)
    assert recognise(
        _plan(manufacturer="Other", model="X", machine="Robot7", n_beams=80), patterns=site
    ).is_cyberknife
    with pytest.raises(ValueError, match="invalid pattern"):
        CyberKnifePatterns(machine="(")


def test_treatment_date_priority_and_estimated_flag() -> None:
    record = Dataset()
    record.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.4"
    record.TreatmentDate = "20260310"
    second = Dataset()
    second.SOPClassUID = "1.2.840.10008.5.1.4.1.1.481.4"
    second.TreatmentDate = "20260312"
    assert treatment_date(_plan(), records=[second, record]) == (
        treatment_date(_plan(), records=[record])
    )
    first = treatment_date(_plan(), records=[second, record])
    assert first.date == dt.date(2026, 3, 10) and not first.estimated and "record" in first.source
    approved = treatment_date(_plan())
    assert (
        approved.date == dt.date(2026, 3, 5)
        and approved.estimated
        and "ReviewDate" in approved.source
    )
    unapproved = treatment_date(_plan(approval="UNAPPROVED"))
    assert unapproved.date == dt.date(2026, 3, 1) and unapproved.source == "RTPlanDate"
    dose = Dataset()
    dose.InstanceCreationDate = "20260228"
    only_dose = treatment_date(None, dose=dose)
    assert only_dose.date == dt.date(2026, 2, 28) and only_dose.estimated
    with pytest.raises(CourseError, match="no treatment record"):
        treatment_date(None)


def test_fractionation_uses_the_target_prescription() -> None:
    frac = fractionation(_plan(fractions=3, prescription=27.0))
    assert frac.fractions == 3 and frac.prescription_dose_gy == 27.0
    assert frac.dose_per_fraction_gy == pytest.approx(9.0)
    assert frac.bed_gy == pytest.approx(51.3) and frac.eqd2_gy == pytest.approx(42.75)


def test_gtv_selection_by_interpreted_type_then_name() -> None:
    box = GTV_BOX
    typed = _structure_set(
        [(1, "PTV", "PTV", box), (2, "Tumour L2", "GTV", box), (3, "GTV_old", None, box)]
    )
    assert select_gtv(typed).number == 2
    untyped = _structure_set(
        [(1, "PTV_27Gy", None, box), (2, "SpinalCord", None, box), (3, "gtv_L2", None, box)]
    )
    assert select_gtv(untyped).number == 3
    two_typed = _structure_set([(1, "GTVp", "GTV", box), (2, "ITV", "GTV", box)])
    assert select_gtv(two_typed).number == 1
    empty_gtv = _structure_set([(1, "GTV", "GTV", None), (2, "CTV", "CTV", box)])
    with pytest.raises(CourseError, match="no GTV"):
        select_gtv(empty_gtv)


@pytest.mark.parametrize(("summation", "divisor"), [("PLAN", 1.0), ("FRACTION", 3.0)])
def test_gtv_dose_statistics_on_a_linear_dose_field(summation, divisor) -> None:
    structure = _structure_set([(1, "GTV", "GTV", GTV_BOX)])
    mask = rtstruct_to_mask(structure, 1, _planning_grid())
    assert int(sitk.GetArrayFromImage(mask).sum()) == 100 * 4 * 3
    dose = rtdose_image(_linear_dose(summation, divisor), fractions=3)
    stats = dose_statistics(dose, mask, fractions=3)
    # voxel doses are 20.0, 20.1, ..., 29.9 Gy (uniform); D_x is the (100 - x) percentile
    assert stats.dmin_gy == pytest.approx(20.0, abs=1e-3)
    assert stats.dmax_gy == pytest.approx(29.9, abs=1e-3)
    assert stats.dmean_gy == pytest.approx(24.95, abs=1e-3)
    assert stats.d98_gy == pytest.approx(20.198, abs=0.01)
    assert stats.d95_gy == pytest.approx(20.495, abs=0.01)
    assert stats.d50_gy == pytest.approx(24.95, abs=0.01)
    assert stats.volume_ml == pytest.approx(1.2)
    assert stats.bed_gy["D95"] == pytest.approx(bed(stats.d95_gy, 3))
    assert stats.eqd2_gy["Dmean"] == pytest.approx(eqd2(stats.dmean_gy, 3))


def test_dose_outside_the_grid_and_relative_dose_are_refused() -> None:
    structure = _structure_set([(1, "GTV", "GTV", ((-0.5, 200.5), (0.5, 4.5), (0.0,)))])
    grid = sitk.Image([220, 10, 8], sitk.sitkInt16)
    grid.SetOrigin((-5.0, -2.0, -3.0))
    mask = rtstruct_to_mask(structure, 1, grid)
    with pytest.raises(CourseError, match="outside the RT Dose grid"):
        dose_statistics(rtdose_image(_linear_dose()), mask, fractions=1)
    relative = _linear_dose()
    relative.DoseUnits = "RELATIVE"
    with pytest.raises(CourseError, match="not absolute"):
        rtdose_image(relative)
    with pytest.raises(CourseError, match="per FRACTION"):
        rtdose_image(_linear_dose("FRACTION"))


def test_recognise_course_links_plan_structure_dose_and_ignores_linac_plans() -> None:
    structure = _structure_set([(1, "PTV", "PTV", GTV_BOX), (2, "GTV L2", "GTV", GTV_BOX)])
    mask = rtstruct_to_mask(structure, select_gtv(structure).number, _planning_grid())
    linac = _plan(manufacturer="Varian", model="TrueBeam", machine="TB1", n_beams=9, uid="2.25.201")
    datasets = [linac, structure, _linear_dose(), _plan()]
    course = recognise_course(datasets, gtv_mask=mask)
    assert course is not None
    assert course.rtplan_sop_instance_uid == "2.25.200" and course.n_beams == 120
    assert course.treatment_date.date == dt.date(2026, 3, 5) and course.treatment_date.estimated
    assert course.fractionation.fractions == 3 and course.fractionation.prescription_dose_gy == 27.0
    assert course.gtv is not None and course.gtv.number == 2
    assert (
        course.rtstruct_sop_instance_uid == "2.25.400"
        and course.rtdose_sop_instance_uid == "2.25.500"
    )
    assert course.gtv_dose is not None and course.gtv_dose.dmean_gy == pytest.approx(
        24.95, abs=1e-3
    )
    assert recognise_course([linac, structure]) is None


# --------------------------------------------------------------------------- phantom
@pytest.mark.parametrize("scenario", ["responder", "progression"])
def test_phantom_course_date_fractions_dose_and_gtv_dose(make_phantom, scenario) -> None:
    """Acceptance 1 (course part): the phantom's CyberKnife RT objects give its course."""
    import json

    import pydicom

    from processing.series import read_series

    root = make_phantom(scenario, "standard", "small")
    truth = json.loads((root / "ground_truth.json").read_text())
    rt = [pydicom.dcmread(p) for p in sorted((root / "rt").glob("*.dcm"))]
    series = truth["studies"]["baseline"]["series"]["t2w"]
    t2w = read_series(
        [pydicom.dcmread(p) for p in sorted((root / "baseline" / series["folder"]).glob("*.dcm"))]
    )
    structure = next(d for d in rt if d.Modality == "RTSTRUCT")
    mask = rtstruct_to_mask(structure, select_gtv(structure).number, t2w.volume_image(0))
    course = recognise_course(rt, gtv_mask=mask)
    expected = truth["course"]
    assert course is not None and course.machine == expected["machine"]
    assert course.n_beams == expected["rtplan"]["number_of_beams"]
    assert course.rtplan_sop_instance_uid == expected["rtplan"]["SOPInstanceUID"]
    # no treatment record is exported: the approved plan's review date, flagged as an estimate
    # (a lower bound of the first fraction)
    assert (
        course.treatment_date.date == dt.datetime.strptime(expected["review_date"], "%Y%m%d").date()
    )
    assert course.treatment_date.estimated
    assert (
        course.treatment_date.date
        <= dt.datetime.strptime(expected["treatment_date"], "%Y%m%d").date()
    )
    assert course.fractionation.fractions == expected["fractions"]
    assert course.fractionation.prescription_dose_gy == pytest.approx(expected["total_dose_gy"])
    assert course.fractionation.bed_gy == pytest.approx(expected["bed10_gy"])
    assert course.gtv is not None and course.gtv.name == "GTV"
    # dose model: prescription on the GTV surface rising to max_dose_gy_analytic at its centre
    dose = course.gtv_dose
    assert dose is not None
    prescription = expected["total_dose_gy"]
    assert dose.dmin_gy == pytest.approx(prescription, rel=0.03)
    assert dose.d98_gy == pytest.approx(prescription, rel=0.03)
    assert dose.dmax_gy == pytest.approx(expected["rtdose"]["max_dose_gy_analytic"], rel=0.01)
    assert prescription < dose.dmean_gy < expected["rtdose"]["max_dose_gy_analytic"]
