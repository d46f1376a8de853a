"""SEG and Parametric Maps built on the phantom's source series of each vendor variant.

The lesion mask is the phantom's true tumour at the voxel centres of the series (the analytic
shape from ground_truth.json), so its voxel count on each grid is a known answer
(``tumour.voxel_counts``); dcmqi and highdicom must give it back.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
import SimpleITK as sitk
from pydicom import dcmread
from pydicom.dataset import Dataset

from processing.phantom.anatomy import TumourShape
from processing.results import Lesion
from reporting.pmap import build_parametric_map
from reporting.seg import build_segmentation
from tests.reporting.tools import dciodvfy, dcmqi

#: every vendor variant of the phantom ("enhanced": per-frame plane orientation and pixel measures)
VENDORS = ["standard", "siemens", "ge", "philips", "enhanced"]


def _shape(tumour: dict) -> TumourShape:
    s = tumour["shape"]
    return TumourShape(
        centre=tuple(s["centre"]),
        rotation=tuple(s["rotation"]),
        radii=tuple(s["radii"]),
        lobes=tuple(tuple(lb[:4]) + (int(lb[4]),) for lb in s["lobes"]),
        epidural_centre=tuple(s["epidural_centre"]) if s["epidural_centre"] else None,
        epidural_radii=tuple(s["epidural_radii"]) if s["epidural_radii"] else None,
    )


def _load(
    folder: Path, n_slices: int
) -> tuple[list[Dataset], list[int] | None, list[list[float]], np.ndarray, np.ndarray]:
    """Sources, source frames (multi-frame) and per-slice IPP of the first volume of a series,
    plus orientation (row, column direction) and pixel spacing."""
    files = sorted(folder.glob("*.dcm"))
    first = dcmread(files[0], stop_before_pixels=True)
    if int(first.get("NumberOfFrames", 1) or 1) > 1:
        frames = list(range(1, n_slices + 1))
        per_frame = first.PerFrameFunctionalGroupsSequence
        shared = first.SharedFunctionalGroupsSequence[0]

        def group(i: int, keyword: str) -> Dataset:
            item = per_frame[i]
            return (item if keyword in item else shared)[keyword][0]

        ipps = [
            [float(v) for v in group(i, "PlanePositionSequence").ImagePositionPatient]
            for i in range(n_slices)
        ]
        iop = np.array(group(0, "PlaneOrientationSequence").ImageOrientationPatient, float)
        spacing = np.array(group(0, "PixelMeasuresSequence").PixelSpacing, float)
        return [first], frames, ipps, iop, spacing
    datasets = sorted(
        (dcmread(f, stop_before_pixels=True) for f in files), key=lambda ds: int(ds.InstanceNumber)
    )[:n_slices]
    ipps = [[float(v) for v in ds.ImagePositionPatient] for ds in datasets]
    return (
        datasets,
        None,
        ipps,
        np.array(datasets[0].ImageOrientationPatient, float),
        np.array(datasets[0].PixelSpacing, float),
    )


def _true_mask(
    shape: TumourShape,
    ipps: list[list[float]],
    iop: np.ndarray,
    spacing: np.ndarray,
    rows: int,
    columns: int,
) -> np.ndarray:
    r, c = np.meshgrid(np.arange(rows), np.arange(columns), indexing="ij")
    row_dir, col_dir = iop[:3], iop[3:]
    out = []
    for ipp in ipps:
        # PS3.3 C.7.6.2.1.1: column index moves along the row direction (spacing[1])
        pts = (
            np.asarray(ipp)
            + c[..., None] * spacing[1] * row_dir
            + r[..., None] * spacing[0] * col_dir
        )
        out.append(shape.contains(pts))
    return np.stack(out)


@pytest.mark.slow
@pytest.mark.parametrize("vendor", VENDORS)
def test_seg_and_adc_map_on_phantom_series(
    vendor: str, make_phantom: Callable[..., Path], tmp_path: Path
) -> None:
    folder = make_phantom("responder", vendor, "small")
    truth = json.loads((folder / "ground_truth.json").read_text())
    study = truth["studies"]["baseline"]
    tumour = study["tumour"]
    shape = _shape(tumour)
    lesion = Lesion("GTV " + truth["treated_level"], "2.25.1234567890", truth["treated_level"])

    # SEG on the T2w grid: the true mask has the known voxel count
    t2w = study["series"]["t2w"]
    sources, frames, ipps, iop, spacing = _load(
        folder / "baseline" / t2w["folder"], t2w["geometry"]["size"][2]
    )
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    mask = _true_mask(shape, ipps, iop, spacing, rows, columns)
    assert int(mask.sum()) == tumour["voxel_counts"]["t2w"]
    seg = build_segmentation(
        sources, mask, lesion, algorithm_version="0.1.0", source_frames=frames, segment_type="gtv"
    )
    seg_path = tmp_path / "seg.dcm"
    seg.save_as(seg_path)
    dciodvfy(seg_path)
    back = hd.seg.Segmentation.from_dataset(dcmread(seg_path))
    assert back.get_segment_description(1).segmented_property_type.value == "228791009"
    dcmqi(
        "segimage2itkimage",
        "--inputDICOM",
        str(seg_path),
        "--outputDirectory",
        str(tmp_path),
        "--prefix",
        "seg",
        "--outputType",
        "nrrd",
    )
    label = sitk.ReadImage(str(tmp_path / "seg-1.nrrd"))
    assert int(sitk.GetArrayFromImage(label).sum()) == tumour["voxel_counts"]["t2w"]
    voxel_ml = float(np.prod(label.GetSpacing())) / 1000.0
    assert int(sitk.GetArrayFromImage(label).sum()) * voxel_ml == pytest.approx(
        tumour["volume_ml_voxels_t2w"], rel=1e-9
    )

    # ADC map on the first DWI volume: true D inside the tumour, 1.0e-3 mm2/s elsewhere
    dwi = study["series"]["dwi"]
    sources, frames, ipps, iop, spacing = _load(
        folder / "baseline" / dwi["folder"], dwi["geometry"]["size"][2]
    )
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    mask = _true_mask(shape, ipps, iop, spacing, rows, columns)
    assert int(mask.sum()) == tumour["voxel_counts"]["dwi"]
    d_true = tumour["means"]["D"]
    values = np.where(mask, d_true, 1.0e-3).astype(np.float32)
    pmap = build_parametric_map(
        sources,
        values,
        "ADC",
        provenance={"b_values": [0, 1000]},
        algorithm_version="0.1.0",
        source_frames=frames,
        vertebral_level=truth["treated_level"],
    )
    pm_path = tmp_path / "adc.dcm"
    pmap.save_as(pm_path)
    dciodvfy(pm_path)
    dcmqi(
        "paramap2itkimage",
        "--inputDICOM",
        str(pm_path),
        "--outputDirectory",
        str(tmp_path),
        "--prefix",
        "adc",
    )
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "adc-pmap.nrrd")))
    inside = np.isclose(image, np.float32(d_true * 1e6), rtol=1e-6)
    assert int(inside.sum()) == tumour["voxel_counts"]["dwi"]
    assert float(image[inside].mean()) == pytest.approx(d_true * 1e6, rel=1e-6)
