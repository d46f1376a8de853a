"""Real-data corpus (issue 13, acceptance 1): every real DWI series gives a correct ADC map.

Every DWI series of ``shared/data/dwi_dcmqa/`` and ``shared/data/real_mr/`` with a b > 0 shell goes
through ``spine-node maps`` (``node.cli.main``). The ADC Parametric Map must pass ``dciodvfy`` with
0 errors, be read by dcmqi's ``paramap2itkimage`` and equal an independent reference written here
(numpy + nibabel, not :mod:`processing.dwi`):

- ``dcm2niix`` is run on the same DICOM files; its ``.bval`` must equal the source repository's
  ``Ref/`` where one exists;
- geometric mean over the volumes of each b-shell (b < 5 s/mm² is the b = 0 shell, other volumes
  join a shell within 5 % of its lowest b), ordinary log-linear least squares
  ln S = ln S0 - b ADC over the shells whose b-values the map's provenance lists (the dcm2niix
  b-values are used in the fit);
- looked up at each map voxel's world position: the Parametric Map's per-frame position,
  orientation and pixel spacing give the LPS position of every pixel; LPS -> RAS (negate x, y),
  inverse NIfTI affine, nearest voxel;
- derived TRACEW series (dcm2niix skips them): ln(S0/Sb)/b from the series' own pixels read with
  pydicom (per-frame b-value, position, orientation, rescale), looked up the same way.

Tissue voxels: the reference b = 0 signal above ``TISSUE_FRACTION`` (20 %) of its 99th percentile
over the reference volume, with a reference ADC of 1e-5-5e-3 mm²/s (a ratio of near-zero numbers
never counts). A tissue voxel where the map has no value counts as outside 5 %. Pass: median
|relative difference| < 1 % and >= 95 % of tissue voxels within 5 %.

Series where no ADC is possible (a 3-frame dynamic, a single-flip VIBE) must give no map and a
stated reason. ``pytest -s`` prints the table for the README ("validated on").
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest

from tests.real_data import real_data_root, real_series_dir
from tests.reporting.tools import dciodvfy, dcmqi

VENV_BIN = Path(sys.executable).parent
#: Fraction of the reference b = 0 signal's 99th percentile above which a voxel is tissue.
TISSUE_FRACTION = 0.2
#: Tissue ADC range of the comparison (mm²/s): above 1e-5 (far below any tissue, so that a ratio
#: of two near-zero numbers never counts) and below the maps' stated upper bound.
ADC_BOUNDS = (1e-5, 5e-3)


@dataclass(frozen=True)
class Case:
    """One real series: where it is and how its reference is made."""

    id: str
    source: str  # key of tests.real_data.REAL_SERIES
    series_number: int | None = None  # select one series of a folder holding several
    ref_bval: str | None = None  # Ref/ .bval relative to shared/data
    kind: str = "dcm2niix"  # "dcm2niix", "tracew" or "impossible"
    reason: str = ""  # for "impossible": part of the reason the node must state
    #: the series' volumes hold identical pixels (a validation export with the images replaced):
    #: the reference ADC is 0 everywhere, only the map's geometry and ADC = 0 can be checked
    identical_volumes: bool = False


CASES = [
    Case(
        "canon_cl_b0_b1500",
        "canon_cl",
        ref_bval="dwi_dcmqa/canon_dwi/Ref/9000_SAG_DTI_PA-ortho_cl.bval",
    ),
    Case(
        "canon_enh_b0_b1500",
        "canon_enh",
        ref_bval="dwi_dcmqa/canon_dwi/Ref/8000_DTI_PA-ALL_20d_enh.bval",
    ),
    Case(
        "ge_oblique_b0_b1000",
        "ge_dwi",
        ref_bval="dwi_dcmqa/ge_dwi/Ref/Ax_DWI_TENSOR_R2_1.bval",
        identical_volumes=True,
    ),
    Case(
        "philips_ingenia_cl_b0_b1000",
        "philips_cl",
        ref_bval="dwi_dcmqa/philips_dwi/Ref/701_DTI_Biobank_2mm_MB3S2_EPI_cl.bval",
    ),
    Case(
        "siemens_sag_mosaic_b0_b2000",
        "siemens_mosaic",
        ref_bval="dwi_dcmqa/siemens_sag_mosaic_dwi/Ref/4_DWI_SagAPmosaic.bval",
    ),
    Case(
        "philips_achieva_dti32",
        "philips_achieva_dti32",
        ref_bval="real_mr/philips_achieva_dti32/Ref/DT_HIGH_32DIR_SENSE_1201.bval",
    ),
    Case("siemens_xa61_s14_tracew", "xa61", series_number=14, kind="tracew"),
    Case("siemens_xa61_s15_tracew", "xa61", series_number=15, kind="tracew"),
    Case(
        "siemens_xa61_s16_b0_b2000",
        "xa61",
        series_number=16,
        ref_bval="real_mr/siemens_xa60_xa61_enhanced/Ref/"
        "phantom_check_MBfactor_CimaX_XA61_16_C2P_cmrr_mbep2d_diff_p2_mb1.bval",
    ),
    Case(
        "siemens_xa60_s14_b0_b1000",
        "xa60",
        ref_bval="real_mr/siemens_xa60_xa61_enhanced/Ref/"
        "phantom_check_MBfactor_TerraX_XA60_14_PRODUCT_ep2d_diff_p3_sms1.bval",
    ),
    Case(
        "uih_umr770_tiled_dti16",
        "uih_dti16",
        ref_bval="real_mr/uih_umr770_dti16/Ref/dti_tra_dir16_PA_6_134431.bval",
    ),
    Case(
        "siemens_e11_b0_500_1500",
        "imagedata_dwi",
        ref_bval="real_mr/imagedata_siemens/data/nifti/"
        "ep2d_RSI_b0_500_1500_6dir_20241202111754_3.bval",
    ),
    Case(
        "siemens_e11_dynamic_3frames",
        "imagedata_time",
        kind="impossible",
        reason="neither diffusion, VFA nor dynamic",
    ),
    Case(
        "siemens_e11_vibe_single_flip", "imagedata_cohort", kind="impossible", reason="flip=3.0 deg"
    ),
]
MAP_CASES = [c for c in CASES if c.kind != "impossible"]
IMPOSSIBLE_CASES = [c for c in CASES if c.kind == "impossible"]


# ------------------------------------------------------------------------------------------------
# running the node and dcm2niix once per series
# ------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Outputs of one series: the node's maps folder and stdout, dcm2niix's output folder."""

    case: Case
    dicom_dir: Path
    out_dir: Path
    returncode: int
    stdout: str
    pm_path: Path | None
    report: dict[str, Any] | None


def _series_folder(case: Case, work: Path) -> Path:
    """The DICOM folder of the case (a folder of symlinks when one series of several is used)."""
    folder = real_series_dir(case.source)
    if case.series_number is None:
        return folder
    sub = work / f"{case.id}_dicom"
    sub.mkdir(parents=True, exist_ok=True)
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        if int(ds.get("SeriesNumber", -1)) == case.series_number:
            os.symlink(f, sub / f.name)
    return sub


def _run_node(case: Case, work: Path) -> Run:
    import json

    from node.cli import main

    dicom_dir = _series_folder(case, work)
    out_dir = work / f"{case.id}_maps"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["maps", str(dicom_dir), "--out", str(out_dir)])
    reports = sorted(out_dir.rglob("maps.json")) if out_dir.exists() else []
    report = json.loads(reports[0].read_text()) if reports else None
    pm = None
    if report and "ADC" in report["maps"] and report["maps"]["ADC"].get("parametric_map"):
        pm = reports[0].parent / report["maps"]["ADC"]["parametric_map"]
    return Run(case, dicom_dir, out_dir, int(rc or 0), buf.getvalue(), pm, report)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Lazily computed, module-wide: node runs, dcm2niix conversions and the README table rows."""
    real_data_root()
    state: dict[str, Any] = {
        "work": tmp_path_factory.mktemp("corpus"),
        "runs": {},
        "dcm2niix": {},
        "rows": {},
    }
    yield state
    rows = state["rows"]
    if rows:
        print("\n\nReal-data corpus (spine-node maps, ADC vs independent reference)")
        print("| series | outcome | b-values used | median |diff| | tissue voxels within 5 % |")
        print("|---|---|---|---|---|")
        for case in CASES:
            if case.id in rows:
                print("| " + " | ".join([case.id, *rows[case.id]]) + " |")


def _run(corpus: dict[str, Any], case: Case) -> Run:
    if case.id not in corpus["runs"]:
        corpus["runs"][case.id] = _run_node(case, corpus["work"])
    return corpus["runs"][case.id]


def _row(
    corpus: dict[str, Any],
    case: Case,
    outcome: str,
    bvals: str = "",
    median: str = "",
    within: str = "",
) -> None:
    corpus["rows"][case.id] = [outcome, bvals, median, within]


def _dcm2niix(corpus: dict[str, Any], run: Run) -> tuple[NiftiRef, np.ndarray]:
    """dcm2niix NIfTI + .bval of the series (converted once); checks the .bval against Ref/."""
    case = run.case
    if case.id not in corpus["dcm2niix"]:
        out = corpus["work"] / f"{case.id}_dcm2niix"
        out.mkdir()
        proc = subprocess.run(
            [
                str(VENV_BIN / "dcm2niix"),
                "-b",
                "n",
                "-z",
                "n",
                "-f",
                "%s",
                "-o",
                str(out),
                str(run.dicom_dir),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        bvals = sorted(out.glob("*.bval"))
        assert len(bvals) == 1, f"dcm2niix wrote {[b.name for b in bvals]} for {case.id}"
        b = np.loadtxt(bvals[0], ndmin=1)
        if case.ref_bval:
            ref = np.loadtxt(real_data_root() / case.ref_bval, ndmin=1)
            np.testing.assert_allclose(
                b, ref, rtol=0, atol=1e-3, err_msg=f"dcm2niix .bval differs from Ref/ ({case.id})"
            )
        img = nib.load(str(bvals[0].with_suffix(".nii")))
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
        corpus["dcm2niix"][case.id] = (NiftiRef(np.asarray(img.get_fdata(), dtype=float), lps), b)
    return corpus["dcm2niix"][case.id]


# ------------------------------------------------------------------------------------------------
# the independent reference
# ------------------------------------------------------------------------------------------------


@dataclass
class NiftiRef:
    """A reference image: data indexed (i, j, k[, volume]) and its voxel -> LPS mm affine."""

    data: np.ndarray
    affine_lps: np.ndarray


def shells_of(bvalues: np.ndarray) -> list[np.ndarray]:
    """Indices of the volumes of each b-shell, ascending (b < 5 is b = 0; 5 % within a shell)."""
    b = np.where(bvalues < 5.0, 0.0, bvalues)
    order = np.argsort(b, kind="stable")
    groups: list[list[int]] = []
    start = None
    for i in order:
        if start is not None and b[i] - start <= max(5.0, 0.05 * start):
            groups[-1].append(int(i))
        else:
            groups.append([int(i)])
            start = b[i]
    return [np.array(g) for g in groups]


def geometric_mean(volumes: np.ndarray) -> np.ndarray:
    """exp(mean(log S)) over the last axis; NaN where any signal <= 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(volumes > 0, np.log(np.where(volumes > 0, volumes, 1.0)), np.nan)
    return np.exp(logs.mean(axis=-1))


def ols_adc(signals: list[np.ndarray], bvalues: list[float]) -> np.ndarray:
    """Ordinary least squares of ln S = a - b ADC over the given shells (voxel-wise)."""
    b = np.asarray(bvalues, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.stack([np.log(s) for s in signals], axis=-1)
    db = b - b.mean()
    slope = ((y - y.mean(axis=-1, keepdims=True)) * db).sum(axis=-1) / (db * db).sum()
    return -slope


def nifti_reference(
    ref: NiftiRef, bvalues: np.ndarray, used: list[float]
) -> tuple[NiftiRef, NiftiRef]:
    """Reference ADC and b = 0 images from a dcm2niix 4-D image over the shells `used`."""
    groups = shells_of(bvalues)
    means = [float(np.mean(bvalues[g])) for g in groups]
    signals, bs = [], []
    for u in used:
        k = int(np.argmin([abs(m - u) for m in means]))
        assert abs(means[k] - u) <= max(5.0, 0.1 * u), f"no shell near b = {u} in {means}"
        signals.append(geometric_mean(ref.data[..., groups[k]]))
        bs.append(means[k])
    b0 = geometric_mean(ref.data[..., groups[0]])
    return NiftiRef(ols_adc(signals, bs), ref.affine_lps), NiftiRef(b0, ref.affine_lps)


def _frame_geometry(ds: pydicom.Dataset, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(IPP, IOP, PixelSpacing) of frame i of an enhanced object (per-frame, else shared)."""

    def find(attr_seq: str, attr: str) -> Any:
        for groups in (
            ds.PerFrameFunctionalGroupsSequence[i],
            ds.SharedFunctionalGroupsSequence[0],
        ):
            if attr_seq in groups:
                return getattr(getattr(groups, attr_seq)[0], attr)
        raise KeyError(attr)

    return (
        np.array(find("PlanePositionSequence", "ImagePositionPatient"), dtype=float),
        np.array(find("PlaneOrientationSequence", "ImageOrientationPatient"), dtype=float),
        np.array(find("PixelMeasuresSequence", "PixelSpacing"), dtype=float),
    )


def _pixel_lps(
    ipp: np.ndarray, iop: np.ndarray, spacing: np.ndarray, rows: int, cols: int
) -> np.ndarray:
    """LPS position (rows, cols, 3) of every pixel of a frame (PS3.3 C.7.6.2.1.1)."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return (
        ipp[None, None, :]
        + c[..., None] * spacing[1] * iop[None, None, :3]
        + r[..., None] * spacing[0] * iop[None, None, 3:]
    )


def lookup(ref: NiftiRef, points_lps: np.ndarray) -> np.ndarray:
    """Nearest-voxel values of `ref` at LPS points (..., 3); NaN outside the image."""
    pts = np.concatenate([points_lps.reshape(-1, 3), np.ones((points_lps[..., 0].size, 1))], axis=1)
    ijk = np.rint((np.linalg.inv(ref.affine_lps) @ pts.T)[:3].T).astype(int)
    shape = np.array(ref.data.shape[:3])
    inside = np.all((ijk >= 0) & (ijk < shape), axis=1)
    out = np.full(ijk.shape[0], np.nan)
    out[inside] = ref.data[ijk[inside, 0], ijk[inside, 1], ijk[inside, 2]]
    return out.reshape(points_lps.shape[:-1])


def parametric_map_values(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """ADC (mm²/s) of every pixel of a Parametric Map and each pixel's LPS position."""
    ds = pydicom.dcmread(path)
    pixels = np.asarray(ds.pixel_array, dtype=float).reshape(
        int(ds.NumberOfFrames), ds.Rows, ds.Columns
    )
    rwvm = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    unit = rwvm.MeasurementUnitsCodeSequence[0].CodeValue
    scale = {"mm2/s": 1.0, "um2/s": 1e-6, "10-6.mm2/s": 1e-6, "10-3.mm2/s": 1e-3}[unit]
    values = pixels * float(rwvm.RealWorldValueSlope) + float(rwvm.RealWorldValueIntercept)
    positions = np.stack(
        [_pixel_lps(*_frame_geometry(ds, i), ds.Rows, ds.Columns) for i in range(pixels.shape[0])]
    )
    return values * scale, positions


def tracew_reference(dicom_dir: Path) -> tuple[NiftiRef, NiftiRef, float]:
    """ln(S0/Sb)/b and S0 from a derived trace series' own pixels (pydicom), with its b."""
    frames: dict[float, list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]] = {}
    for f in sorted(p for p in dicom_dir.iterdir() if p.is_file()):
        ds = pydicom.dcmread(f)
        arr = np.asarray(ds.pixel_array, dtype=float).reshape(-1, ds.Rows, ds.Columns)
        for i in range(arr.shape[0]):
            pf = ds.PerFrameFunctionalGroupsSequence[i]
            b = float(pf.MRDiffusionSequence[0].DiffusionBValue)
            slope, intercept = 1.0, 0.0
            for groups in (pf, ds.SharedFunctionalGroupsSequence[0]):
                if "PixelValueTransformationSequence" in groups:
                    t = groups.PixelValueTransformationSequence[0]
                    slope, intercept = float(t.RescaleSlope), float(t.RescaleIntercept)
                    break
            ipp, iop, spacing = _frame_geometry(ds, i)
            frames.setdefault(b, []).append((arr[i] * slope + intercept, ipp, iop, spacing))
    assert len(frames) == 2, f"expected one b = 0 and one b > 0 volume, got b = {sorted(frames)}"
    b0_key, b_key = sorted(frames)
    stacks = []
    for key in (b0_key, b_key):
        normal = np.cross(frames[key][0][2][:3], frames[key][0][2][3:])
        ordered = sorted(frames[key], key=lambda t: float(t[1] @ normal))
        stacks.append(np.stack([t[0] for t in ordered], axis=-1).transpose(1, 0, 2))  # (c, r, k)
    ipp0, iop, spacing = ordered[0][1], ordered[0][2], ordered[0][3]
    dz = float((ordered[1][1] - ordered[0][1]) @ normal) if len(ordered) > 1 else 1.0
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * spacing[1]
    affine[:3, 1] = iop[3:] * spacing[0]
    affine[:3, 2] = normal * dz
    affine[:3, 3] = ipp0
    with np.errstate(divide="ignore", invalid="ignore"):
        adc = np.log(stacks[0] / stacks[1]) / (b_key - b0_key)
    return NiftiRef(adc, affine), NiftiRef(stacks[0], affine), b_key


def agreement(
    map_values: np.ndarray, ref_adc: np.ndarray, ref_b0: np.ndarray, b0_p99: float
) -> dict[str, float]:
    """Median |relative difference| and fraction of tissue voxels within 5 %."""
    tissue = (
        np.isfinite(ref_b0)
        & (ref_b0 > TISSUE_FRACTION * b0_p99)
        & np.isfinite(ref_adc)
        & (ref_adc > ADC_BOUNDS[0])
        & (ref_adc < ADC_BOUNDS[1])
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(map_values[tissue] / ref_adc[tissue] - 1.0)
    has = np.isfinite(rel)
    return {
        "n_tissue": int(tissue.sum()),
        "n_with_value": int(has.sum()),
        "median_abs_rel": float(np.median(rel[has])) if has.any() else float("nan"),
        "median_ref_adc": float(np.median(ref_adc[tissue])) if tissue.any() else float("nan"),
        "within_5pct": float(np.sum(rel[has] <= 0.05) / max(int(tissue.sum()), 1)),
    }


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------


def _adc_run(corpus: dict[str, Any], case: Case) -> Run:
    run = _run(corpus, case)
    if run.pm_path is None:
        reason = "no ADC map"
        if run.report and "ADC" in run.report["maps"]:
            reason = "ADC computed, no Parametric Map: " + str(
                run.report["maps"]["ADC"].get("parametric_map_error")
            )
        elif run.stdout.strip():
            reason = "no ADC map: " + " / ".join(run.stdout.strip().splitlines()[-2:])
        _row(corpus, case, f"FAIL: {reason}")
        pytest.fail(f"{case.id}: {reason}")
    return run


@pytest.mark.parametrize("case", MAP_CASES, ids=[c.id for c in MAP_CASES])
def test_adc_parametric_map_is_valid_dicom(
    corpus: dict[str, Any], case: Case, tmp_path: Path
) -> None:
    """The ADC Parametric Map passes dciodvfy (0 errors) and dcmqi's paramap2itkimage reads it."""
    run = _adc_run(corpus, case)
    dciodvfy(run.pm_path)
    dcmqi(
        "paramap2itkimage",
        "--inputDICOM",
        str(run.pm_path),
        "--outputDirectory",
        str(tmp_path),
        "--prefix",
        "adc",
    )
    assert (tmp_path / "adc-pmap.nrrd").is_file()


@pytest.mark.parametrize("case", MAP_CASES, ids=[c.id for c in MAP_CASES])
def test_adc_equals_independent_reference(corpus: dict[str, Any], case: Case) -> None:
    """ADC map = dcm2niix (or TRACEW pixels) log-linear reference at each voxel's position."""
    run = _adc_run(corpus, case)
    prov = run.report["maps"]["ADC"]["provenance"]
    used = [float(b) for b in prov["b_values_used"]]
    assert prov.get("b_selection_reason"), "the provenance must say why these b-values"
    # no series of the corpus has the three b <= 200 shells IVIM needs: a reason, not a map
    assert "IVIM" in prov.get("models_not_fitted", {}) and "IVIM_D" not in run.report["maps"]
    if case.kind == "tracew":
        ref_adc, ref_b0, b = tracew_reference(run.dicom_dir)
        assert len(used) == 2 and abs(used[1] - b) <= 1.0, (used, b)
    else:
        nifti, bvals = _dcm2niix(corpus, run)
        ref_adc, ref_b0 = nifti_reference(nifti, bvals, used)
        if case.id == "siemens_e11_b0_500_1500":
            assert used == [0.0, 500.0], "b <= 1000 must use b0/b500 only"
    values, positions = parametric_map_values(run.pm_path)
    b0_p99 = float(np.nanpercentile(ref_b0.data, 99))
    if case.identical_volumes:
        # every volume holds the same pixels: the reference and the map must both be ADC = 0
        b0_at = lookup(ref_b0, positions)
        body = np.isfinite(b0_at) & (b0_at > TISSUE_FRACTION * b0_p99)
        assert np.nanmax(np.abs(ref_adc.data)) < 1e-12
        assert body.sum() >= 100 and np.all(np.abs(values[body & np.isfinite(values)]) < 1e-9)
        # geometry: every map pixel lies on a dcm2niix voxel centre (within 0.05 voxel)
        pts = np.concatenate([positions.reshape(-1, 3), np.ones((values.size, 1))], axis=1)
        ijk = (np.linalg.inv(ref_b0.affine_lps) @ pts.T)[:3]
        assert np.abs(ijk - np.rint(ijk)).max() < 0.05
        assert np.all((np.rint(ijk) >= 0) & (np.rint(ijk).T < ref_b0.data.shape[:3]).T)
        _row(
            corpus,
            case,
            "ADC map = 0, as the reference (all volumes hold identical pixels in "
            "this validation export): geometry and DICOM checked only",
            "/".join(f"{b:g}" for b in used),
            "n/a",
            "n/a",
        )
        return
    stats = agreement(values, lookup(ref_adc, positions), lookup(ref_b0, positions), b0_p99)
    _row(
        corpus,
        case,
        f"ADC map (tissue median {1e3 * stats['median_ref_adc']:.3f}e-3 mm²/s)",
        "/".join(f"{b:g}" for b in used),
        f"{100 * stats['median_abs_rel']:.4f} %",
        f"{100 * stats['within_5pct']:.1f} % of {stats['n_tissue']}",
    )
    assert stats["n_tissue"] >= 100, stats
    assert stats["median_abs_rel"] < 0.01, stats
    assert stats["within_5pct"] >= 0.95, stats


@pytest.mark.parametrize("case", IMPOSSIBLE_CASES, ids=[c.id for c in IMPOSSIBLE_CASES])
def test_series_without_a_possible_map_are_refused_with_a_reason(
    corpus: dict[str, Any], case: Case
) -> None:
    """No diffusion and no usable DCE/VFA: no map, exit status 1 and a stated reason."""
    run = _run(corpus, case)
    assert run.returncode == 1
    assert run.pm_path is None and not list(run.out_dir.rglob("*.dcm"))
    assert "no quantitative map could be computed" in run.stdout
    stated = [line for line in run.stdout.splitlines() if "skipped no map from series" in line]
    assert stated and any(case.reason in line for line in stated), run.stdout
    reason = next(line for line in stated if case.reason in line).split("skipped ", 1)[1]
    _row(corpus, case, f"no map; node's reason: {reason}")


# ------------------------------------------------------------------------------------------------
# scanner-ADC QA (acceptance 5) on real data: the node's ADC vs a "scanner" map made from the
# independent reference above, on the dcm2niix grid (another grid than the node's)
# ------------------------------------------------------------------------------------------------


def _scanner_like_image(ref: NiftiRef, factor: float) -> Any:
    """The reference ADC as a scanner stores it: integers in 10^-6 mm²/s, on the NIfTI grid."""
    import SimpleITK as sitk

    stored = np.where(np.isfinite(ref.data) & (ref.data > 0), np.rint(ref.data * factor * 1e6), 0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(stored.transpose(2, 1, 0), dtype=np.int16))
    spacing = np.linalg.norm(ref.affine_lps[:3, :3], axis=0)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(x) for x in (ref.affine_lps[:3, :3] / spacing).ravel()))
    img.SetOrigin(tuple(float(x) for x in ref.affine_lps[:3, 3]))
    return img


@pytest.mark.parametrize("factor", [1.0, 1.1])
def test_adc_qa_against_a_scanner_map_made_from_the_reference(
    corpus: dict[str, Any], factor: float
) -> None:
    """Node ADC vs reference-as-scanner-map (x `factor`): median relative difference 1/f - 1."""
    import SimpleITK as sitk

    from processing.adc_qa import compare_with_scanner_adc
    from processing.maps import compute_maps
    from processing.series import group_by_series, read_series

    case = next(c for c in CASES if c.id == "siemens_xa60_s14_b0_b1000")
    run = _adc_run(corpus, case)
    nifti, bvals = _dcm2niix(corpus, run)
    ref_adc, _ = nifti_reference(nifti, bvals, [0.0, 1000.0])
    datasets = [pydicom.dcmread(f) for f in sorted(run.dicom_dir.iterdir()) if f.is_file()]
    (series,) = group_by_series(datasets).values()
    adc = compute_maps([read_series(series)])["ADC"]
    # a spherical "tumour" of radius 6 voxels at the centre of the valid voxels
    z, y, x = np.nonzero(adc.valid)
    centre = np.array([z.mean(), y.mean(), x.mean()])
    grid = np.indices(adc.valid.shape).transpose(1, 2, 3, 0)
    tumour = np.linalg.norm((grid - centre) * [1.0, 1.0, 1.0], axis=-1) <= 6
    stored = _scanner_like_image(ref_adc, factor)  # integers in 1e-6 mm2/s, as scanners store
    qa = compare_with_scanner_adc(
        adc.values,
        adc.valid,
        adc.geometry,
        sitk.Cast(stored, sitk.sitkFloat64) * 1e-6,
        scanner_scaling="x1e-6",
        tumour_mask=tumour,
        scanner_series_instance_uid="synthetic",
    )
    expected = 1.0 / factor - 1.0
    assert qa.scanner_scaling == "x1e-6"
    assert qa.tissue.n_voxels >= 0.9 * int(adc.valid.sum()), qa
    assert qa.tumour is not None and qa.tumour.n_voxels >= 100, qa
    for region in (qa.tissue, qa.tumour):
        assert abs(region.median_relative_difference - expected) < 0.005, region
        assert abs(region.median_difference - expected * region.median_scanner) < 2e-5, region
    d = qa.to_dict()
    assert set(d["tissue"]) >= {"median_difference_mm2_s", "median_relative_difference"}
    if factor != 1.0:
        _check_qa_in_the_report(d, corpus["work"] / f"sr_{factor}")
    print(
        f"\nADC QA (XA60 s14, scanner = reference x {factor}): tissue "
        f"{100 * qa.tissue.median_relative_difference:+.2f} % over {qa.tissue.n_voxels} voxels, "
        f"tumour {100 * qa.tumour.median_relative_difference:+.2f} % over "
        f"{qa.tumour.n_voxels} voxels"
    )


def _check_qa_in_the_report(qa: dict[str, Any], folder: Path) -> None:
    """The QA result in a time point's provenance reaches the TID 1500 SR as valid NUMs."""
    import dataclasses

    import highdicom as hd

    from reporting.sr import build_measurement_report
    from tests.reporting.results_fixture import (
        BASELINE,
        FOLLOW_UP,
        VERSION,
        build_inputs,
    )
    from tests.reporting.tools import tid1500_json

    objects = build_inputs(VERSION)
    follow_up = dataclasses.replace(
        FOLLOW_UP, provenance={**FOLLOW_UP.provenance, "scanner_adc_qa": qa}
    )
    sr = build_measurement_report(
        [BASELINE, follow_up],
        segmentations=objects.segs,
        parametric_maps=objects.pmaps,
        algorithm_version=VERSION,
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sr.dcm"
    sr.save_as(path)
    dciodvfy(path)
    back = hd.sr.srread(path)
    found = {}
    for group in back.content.get_volumetric_roi_measurement_groups():
        for m in group.get_measurements():
            if m.name.value.startswith("ADCQA-"):
                found[m.name.value] = (m.value, m.unit.value)
    assert set(found) == {"ADCQA-TUM-REL", "ADCQA-TUM-ABS", "ADCQA-TIS-REL", "ADCQA-TIS-ABS"}
    assert found["ADCQA-TUM-REL"][1] == "%"
    assert abs(found["ADCQA-TUM-REL"][0] - 100 * qa["tumour"]["median_relative_difference"]) < 1e-6
    assert abs(found["ADCQA-TIS-ABS"][0] - 1e6 * qa["tissue"]["median_difference_mm2_s"]) < 1e-6
    data = tid1500_json(path, folder)
    codes = {
        m["quantity"]["CodeValue"]
        for g in data["Measurements"]
        for m in g.get("measurementItems", [])
    }
    assert "ADCQA-TUM-REL" in codes


def _synthetic_scanner_adc_series(run: Run, ref_adc: NiftiRef, folder: Path) -> int:
    """A scanner-style ADC series (Image Type ADC, 10^-6 mm²/s integers) beside the DWI series.

    Made with pydicom from the DWI's own b = 0 images (same grid and study), pixel values = the
    independent reference ADC looked up at each pixel's position. Returns the number of files.
    """
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    n = 0
    for f in sorted(p for p in run.dicom_dir.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(f)
        if float(ds.get("DiffusionBValue", -1.0)) != 0.0:
            continue
        positions = _pixel_lps(
            np.array(ds.ImagePositionPatient, dtype=float),
            np.array(ds.ImageOrientationPatient, dtype=float),
            np.array(ds.PixelSpacing, dtype=float),
            ds.Rows,
            ds.Columns,
        )
        adc = lookup(ref_adc, positions)
        stored = np.where(np.isfinite(adc) & (adc > 0), np.rint(adc * 1e6), 0).clip(0, 65535)
        for keyword in (
            "DiffusionBValue",
            "DiffusionGradientOrientation",
            "DiffusionDirectionality",
        ):
            if keyword in ds:
                delattr(ds, keyword)
        ds.ImageType = ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = int(ds.SeriesNumber) + 1
        ds.SeriesDescription = "synthetic scanner ADC (test)"
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = stored.astype(np.uint16).tobytes()
        ds.save_as(folder / f"adc_{n:03d}.dcm", enforce_file_format=True)
        n += 1
    return n


def test_maps_json_reports_the_node_adc_against_a_scanner_adc_series(
    corpus: dict[str, Any],
) -> None:
    """Acceptance 5 through ``spine-node maps``: a study with a scanner ADC series gets the QA."""
    import json

    from node.cli import main

    case = next(c for c in CASES if c.id == "canon_cl_b0_b1500")
    run = _adc_run(corpus, case)
    nifti, bvals = _dcm2niix(corpus, run)
    ref_adc, _ = nifti_reference(nifti, bvals, [0.0, 1500.0])
    adc_dir = corpus["work"] / "canon_scanner_adc"
    assert _synthetic_scanner_adc_series(run, ref_adc, adc_dir) == 40
    out = corpus["work"] / "canon_with_scanner_adc_maps"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["maps", str(run.dicom_dir), str(adc_dir), "--out", str(out)]) == 0
    report = json.loads((out / "maps.json").read_text())
    qa = report["scanner_adc_qa"]
    assert "error" not in qa, qa
    assert "vendor convention, stored in 1e-6 mm2/s" in qa["scanner_scaling"], qa
    assert qa["tumour"] is None  # no lesion mask outside the analysis chain
    assert qa["tissue"]["n_voxels"] >= 0.5 * report["maps"]["ADC"]["statistics"]["n_voxels"]
    assert abs(qa["tissue"]["median_relative_difference"]) < 0.005, qa
    _check_chain_qa(run, adc_dir)
    print(
        f"\nmaps.json ADC QA (Canon b0/b1500 vs synthetic scanner ADC): "
        f"{100 * qa['tissue']['median_relative_difference']:+.3f} % over "
        f"{qa['tissue']['n_voxels']} voxels"
    )


def _check_chain_qa(run: Run, adc_dir: Path) -> None:
    """The analysis chain's step (node.chain._scanner_adc_qa) with a lesion mask on another grid."""
    from types import SimpleNamespace

    import SimpleITK as sitk

    from node.chain import _scanner_adc_qa
    from processing.adc_qa import find_scanner_adc
    from processing.maps import compute_maps
    from processing.series import group_by_series, read_series

    dwi = [pydicom.dcmread(f) for f in sorted(run.dicom_dir.rglob("*")) if f.is_file()]
    adc_series = [pydicom.dcmread(f) for f in sorted(adc_dir.iterdir())]
    volumes = [read_series(s) for s in group_by_series(dwi + adc_series).values()]
    scanner = find_scanner_adc(volumes)
    assert scanner is not None and scanner.series_instance_uid == str(
        adc_series[0].SeriesInstanceUID
    )
    adc = compute_maps([v for v in volumes if v is not scanner])["ADC"]
    image = adc.image()
    # "lesion": a 15 mm ball at the centre of the valid voxels, on a 2 mm isotropic grid
    z, y, x = np.nonzero(adc.valid)
    centre = image.TransformContinuousIndexToPhysicalPoint(
        [float(x.mean()), float(y.mean()), float(z.mean())]
    )
    grid = sitk.Image([40, 40, 40], sitk.sitkUInt8)
    grid.SetSpacing([2.0, 2.0, 2.0])
    grid.SetOrigin([c - 39.0 for c in centre])
    idx = np.indices((40, 40, 40)).astype(float)
    mask = sitk.GetImageFromArray(
        (np.linalg.norm(idx - 19.5, axis=0) * 2.0 <= 15.0).astype(np.uint8)
    )
    mask.CopyInformation(grid)
    study = SimpleNamespace(
        scanner_adc=scanner,
        scanner_adc_dataset=adc_series[0],
        maps={"ADC": SimpleNamespace(image=image)},
        lesion_mask=mask,
        study_instance_uid=run.case.id,
        scanner_adc_qa=None,
    )
    notes: list[str] = []
    _scanner_adc_qa(study, notes)
    qa = study.scanner_adc_qa
    assert not notes and "error" not in qa, (notes, qa)
    assert qa["tumour"]["n_voxels"] >= 50, qa
    assert abs(qa["tumour"]["median_relative_difference"]) < 0.005, qa
    assert abs(qa["tissue"]["median_relative_difference"]) < 0.005, qa
