"""Series roles from physics (descriptions blank or wrong) and the per-study protocol inventory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from processing.classify import (
    RT_DOSE_STORAGE,
    RT_PLAN_STORAGE,
    RT_STRUCTURE_SET_STORAGE,
    SeriesRole,
    classify_series,
    classify_study,
    classify_volume,
    diffusion_inventory,
)
from processing.series import SEGMENTATION_SOP_CLASS, read_series
from tests.processing.test_series import make_series

SMALL = {"size": (3, 3, 2)}


def _directions(n: int) -> list[list[float]]:
    """n well-spread unit vectors on a hemisphere (Fibonacci lattice)."""
    i = np.arange(n) + 0.5
    z = 1.0 - i / n
    phi = np.pi * (1 + 5**0.5) * i
    r = np.sqrt(1 - z**2)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1).round(6).tolist()


def dwi_volumes(shells: list[tuple[float, int]]) -> list[dict]:
    vols = []
    for b, n in shells:
        if b == 0:
            vols.append({"DiffusionBValue": 0.0})
        elif n == 3:
            vols += [
                {"DiffusionBValue": b, "DiffusionGradientOrientation": g}
                for g in np.eye(3).tolist()
            ]
        else:
            vols += [
                {"DiffusionBValue": b, "DiffusionGradientOrientation": g} for g in _directions(n)
            ]
    return vols


PHANTOM_SHELLS = [(0, 1), (50, 3), (100, 3), (400, 3), (800, 3), (1000, 15), (1500, 3), (2000, 15)]


def study_series(study: str, frame_of_ref: str, description: str = "") -> dict[str, list[Dataset]]:
    """One synthetic spine MR study plus RT objects; every description is ``description``."""
    kw = dict(SMALL, study=study, frame_of_ref=frame_of_ref)
    series = {
        "t2w": make_series(
            common={
                "RepetitionTime": 4000.0,
                "EchoTime": 100.0,
                "FlipAngle": 150.0,
                "ScanningSequence": "SE",
                "SequenceVariant": "SK",
            },
            **kw,
        ),
        "t1w": make_series(
            common={
                "RepetitionTime": 600.0,
                "EchoTime": 10.0,
                "FlipAngle": 150.0,
                "ScanningSequence": "SE",
            },
            **kw,
        ),
        "stir": make_series(
            common={
                "RepetitionTime": 5000.0,
                "EchoTime": 60.0,
                "InversionTime": 263.4,
                "ScanningSequence": ["IR", "SE"],
            },
            **kw,
        ),
        "dwi": make_series(
            dwi_volumes(PHANTOM_SHELLS),
            common={
                "RepetitionTime": 5000.0,
                "EchoTime": 70.0,
                "ScanningSequence": "EP",
                "ImageType": ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"],
            },
            **kw,
        ),
        "vfa_t1": make_series(
            [{"FlipAngle": fa} for fa in (3.0, 10.0, 20.0)],
            common={
                "RepetitionTime": 4.0,
                "EchoTime": 1.5,
                "ScanningSequence": "GR",
                "MRAcquisitionType": "3D",
            },
            **kw,
        ),
        "dce": make_series(
            [
                {
                    "TemporalPositionIdentifier": t + 1,
                    "AcquisitionTime": f"{12 + (5 * t) // 3600:02d}{((5 * t) // 60) % 60:02d}"
                    f"{(5 * t) % 60:02d}",
                }
                for t in range(40)
            ],
            common={
                "RepetitionTime": 4.0,
                "EchoTime": 1.5,
                "FlipAngle": 15.0,
                "ScanningSequence": "GR",
                "MRAcquisitionType": "3D",
                "ContrastBolusAgent": "Gadoterate",
            },
            **kw,
        ),
        "adc_map": make_series(
            common={
                "ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"],
                "RepetitionTime": 5000.0,
                "EchoTime": 70.0,
            },
            **kw,
        ),
        "trace": make_series(
            [{"DiffusionBValue": 0.0}, {"DiffusionBValue": 50.0}, {"DiffusionBValue": 800.0}],
            common={
                "ImageType": ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"],
                "DiffusionDirectionality": "ISOTROPIC",
            },
            **kw,
        ),
    }
    for role, sop_class, modality in (
        ("rtplan", RT_PLAN_STORAGE, "RTPLAN"),
        ("rtstruct", RT_STRUCTURE_SET_STORAGE, "RTSTRUCT"),
        ("rtdose", RT_DOSE_STORAGE, "RTDOSE"),
        ("seg", SEGMENTATION_SOP_CLASS, "SEG"),
    ):
        ds = Dataset()
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid()
        ds.FrameOfReferenceUID = frame_of_ref
        ds.Modality = modality
        if role == "rtdose":  # RT Dose has pixel data; the SOP Class decides, not its presence
            ds.PixelData = b"\x00\x00"
        series[role] = [ds]
    for datasets in series.values():
        for ds in datasets:
            ds.SeriesDescription = description
    return series


@pytest.mark.parametrize("description", ["", "T1 SAG POST", "DWI b1000"])
def test_every_role_from_physics_whatever_the_description(description):
    series = study_series(generate_uid(), generate_uid(), description)
    for role, datasets in series.items():
        result = classify_series(datasets)
        assert result.role is SeriesRole(role), (role, result.reasons)
        assert result.reasons


def test_dwi_inventory_of_the_phantom_protocol():
    series = study_series(generate_uid(), generate_uid())
    inv = diffusion_inventory(read_series(series["dwi"]))
    assert inv.b_values == (0.0, 50.0, 100.0, 400.0, 800.0, 1000.0, 1500.0, 2000.0)
    assert dict(inv.shells)[1000.0] == 15 and dict(inv.shells)[2000.0] == 15
    assert inv.n_directions == 15 + 3  # two 15-direction shells share the lattice, plus x/y/z axes
    assert (inv.adc, inv.ivim, inv.kurtosis_apparent, inv.dki_tensor) == (True, True, True, True)


@pytest.mark.parametrize(
    "shells, expected",
    [
        ([(0, 1), (1000, 3)], (True, False, False, False)),  # clinical two-point ADC
        ([(50, 3), (800, 3)], (True, False, False, False)),
        (
            [(0, 1), (50, 3), (100, 3), (800, 3)],
            (True, True, False, False),
        ),  # IVIM, b_max too low for K
        ([(0, 1), (100, 3), (1000, 3), (2000, 3)], (True, False, True, False)),  # apparent K only
        ([(0, 1), (1000, 6), (2000, 6)], (True, False, True, False)),  # too few directions for DKI
        ([(0, 1), (1000, 20), (2000, 20)], (True, False, True, True)),
        ([(400, 3), (1000, 3), (2000, 3)], (True, False, False, False)),  # no low b → no Kapp
        ([(0, 1), (400, 3)], (True, False, False, False)),
        ([(0, 1), (200, 3)], (False, False, False, False)),  # b_max < 400: no reliable ADC
    ],
)
def test_diffusion_capabilities_follow_the_documented_thresholds(shells, expected):
    sv = read_series(make_series(dwi_volumes(shells), **SMALL))
    inv = diffusion_inventory(sv)
    assert (inv.adc, inv.ivim, inv.kurtosis_apparent, inv.dki_tensor) == expected


def test_protocol_inventory_of_a_full_study():
    study, frame = generate_uid(), generate_uid()
    series = study_series(study, frame)
    datasets = [ds for dss in series.values() for ds in dss]
    volumes = {}
    inv = classify_study(datasets, volumes=volumes)
    uid = {role: dss[0].SeriesInstanceUID for role, dss in series.items()}
    assert inv.study_instance_uid == study
    image_roles = {"t2w", "t1w", "stir", "dwi", "vfa_t1", "dce", "adc_map", "trace"}
    assert set(volumes) == {uid[r] for r in image_roles}
    assert volumes[uid["dce"]].n_volumes == 40
    assert inv.adc[0] == uid["dwi"] and uid["trace"] in inv.adc  # trace usable, ranked after
    assert inv.ivim == (uid["dwi"],)
    assert inv.dki_tensor == (uid["dwi"],) and inv.kurtosis_apparent == (uid["dwi"],)
    assert inv.dce == uid["dce"] and inv.dce_quantitative and inv.dce_t1_method == "vfa"
    assert inv.vfa_t1 == uid["vfa_t1"]
    assert inv.anatomy_reference == uid["t2w"]
    assert inv.adc_maps == (uid["adc_map"],)
    assert [c.series_instance_uid for c in inv.by_role("rtplan")] == [uid["rtplan"]]
    assert inv.analyses == {
        "adc",
        "ivim",
        "dki_tensor",
        "kurtosis_apparent",
        "dce_semi_quantitative",
        "dce_quantitative",
        "t1_vfa",
        "anatomy",
    }
    dce = next(c for c in inv.series if c.role is SeriesRole.DCE)
    assert dce.temporal_resolution == pytest.approx(5.0)
    assert dce.n_volumes == 40


def test_dce_without_matching_vfa_uses_fixed_t10():
    study, frame = generate_uid(), generate_uid()
    series = study_series(study, frame)
    for ds in series["vfa_t1"]:
        ds.FrameOfReferenceUID = generate_uid()  # VFA from another session cannot be used
    inv = classify_study([ds for role in ("dce", "vfa_t1", "t1w") for ds in series[role]])
    assert inv.dce_t1_method == "fixed_t10"
    assert inv.vfa_t1 is None
    assert inv.anatomy_reference == series["t1w"][0].SeriesInstanceUID


def test_unreadable_series_is_reported_not_dropped():
    study, frame = generate_uid(), generate_uid()
    series = study_series(study, frame)
    broken = series["t2w"][:1] + series["t2w"][1:]
    broken[0].ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    inv = classify_study(broken + series["t1w"])
    assert len(inv.errors) == 1 and "ImageOrientationPatient" in inv.errors[0][1]
    assert inv.anatomy_reference == series["t1w"][0].SeriesInstanceUID


def test_real_siemens_mosaic_dwi_inventory(shared_data: Path):
    files = sorted(
        (shared_data / "dwi_dcmqa/siemens_sag_mosaic_dwi/In/4_DWI_SagAPmosaic").glob("*")
    )
    result = classify_volume(read_series([pydicom.dcmread(f) for f in files]))
    assert result.role is SeriesRole.DWI
    inv = result.diffusion
    assert inv.shells[0] == (0.0, 0) and inv.shells[1][0] == 2000.0
    assert inv.n_directions == 20
    assert (inv.adc, inv.ivim, inv.kurtosis_apparent, inv.dki_tensor) == (True, False, False, False)


# ------------------------------------------------------------------------- phantom (acceptance 2)
#: Every vendor variant, and every scenario at least once (scenarios change the tumour, not the
#: acquisition, so each vendor is generated once to keep the suite fast).
PHANTOM_CASES = [
    ("standard", "responder"),
    ("siemens", "progression"),
    ("ge", "pseudoprogression"),
    ("philips", "stable"),
    ("enhanced", "responder"),
]


def read_phantom_blanked(root: Path) -> list[Dataset]:
    """Every DICOM file of a phantom patient, with descriptions and protocol names blanked out."""
    datasets = []
    for path in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        for keyword in ("SeriesDescription", "ProtocolName", "StudyDescription"):
            if keyword in ds:
                setattr(ds, keyword, "")
        ds.filename = str(path.relative_to(root))
        datasets.append(ds)
    return datasets


@pytest.mark.slow
@pytest.mark.parametrize("vendor, scenario", PHANTOM_CASES, ids=[v for v, _ in PHANTOM_CASES])
def test_phantom_every_series_gets_its_true_role_with_descriptions_blank(
    vendor, scenario, make_phantom
):
    import json

    root = make_phantom(scenario, vendor, "small")
    truth = json.loads((root / "ground_truth.json").read_text())
    datasets = read_phantom_blanked(root)
    expected: dict[str, str] = {}
    for study in truth["studies"].values():
        for role, series in study["series"].items():
            expected[series["SeriesInstanceUID"]] = role
    for role in ("rtplan", "rtstruct", "rtdose"):
        rel = truth["course"][role]["file"]
        expected[next(ds for ds in datasets if ds.filename == rel).SeriesInstanceUID] = role
    by_study: dict[str, list[Dataset]] = {}
    for ds in datasets:
        by_study.setdefault(ds.StudyInstanceUID, []).append(ds)
    seen = {}
    for study_uid, members in by_study.items():
        inventory = classify_study(members)
        assert inventory.errors == ()
        for c in inventory.series:
            seen[c.series_instance_uid] = c.role.value
        mr_truth = next(
            (s for s in truth["studies"].values() if s["StudyInstanceUID"] == study_uid), None
        )
        if mr_truth is not None:
            assert inventory.analyses >= {
                "adc",
                "ivim",
                "dki_tensor",
                "kurtosis_apparent",
                "dce_quantitative",
                "t1_vfa",
                "anatomy",
            }
            assert inventory.dce_t1_method == "vfa"
            assert inventory.anatomy_reference == mr_truth["series"]["t2w"]["SeriesInstanceUID"]
            dwi = next(c for c in inventory.series if c.role is SeriesRole.DWI)
            assert [list(s) for s in dwi.diffusion.shells] == [
                [b, 0 if b == 0 else n]
                for b, n in mr_truth["series"]["dwi"]["acquisition"]["shells"]
            ]
    assert seen == expected
