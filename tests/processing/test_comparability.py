"""Baseline vs follow-up acquisition comparability: verdicts per quantity and reasons."""

from __future__ import annotations

import dataclasses

import pytest
from pydicom.dataset import Dataset

from processing.comparability import (
    DCE_QUANTITIES,
    DIFFUSION_QUANTITIES,
    AcquisitionProtocol,
    assess_comparability,
    fat_suppression,
    protocol_from_datasets,
)
from processing.results import Comparability

C, CAUTION, NOT = Comparability.COMPARABLE, Comparability.CAUTION, Comparability.NOT_COMPARABLE

BASE = AcquisitionProtocol(
    field_strength_t=1.5,
    dwi_b_values=(0.0, 50.0, 400.0, 800.0),
    dwi_voxel_mm=(2.0, 2.0, 5.0),
    anatomical_voxel_mm=(0.8, 0.8, 3.0),
    dce_voxel_mm=(1.5, 1.5, 3.0),
    dwi_fat_suppression="STIR",
    dce_fat_suppression="NONE",
    dce_temporal_resolution_s=4.0,
    contrast_agent="Gadoterate",
    contrast_flow_rate_ml_s=3.0,
    contrast_injection_delay_s=30.0,
)


def _follow(**changes) -> AcquisitionProtocol:
    return dataclasses.replace(BASE, **changes)


def test_identical_protocols_are_comparable() -> None:
    result = assess_comparability(BASE, _follow(dwi_b_values=(0.003, 50.0, 400.0, 800.0)))
    assert result.overall is C and result.reasons == () and result.affected == ()
    assert result.is_comparable("ADC.mean") and result.is_comparable(
        "radiomics.ADC.original_glcm_Contrast"
    )


def test_field_strength_change() -> None:
    result = assess_comparability(BASE, _follow(field_strength_t=3.0))
    assert result.overall is NOT
    assert (
        result.of("Ktrans.median") is NOT
        and result.of("ve") is NOT
        and result.of("radiomics") is NOT
    )
    assert result.of("ADC.mean") is CAUTION and result.of("kep") is CAUTION
    assert result.of("volume") is C and result.is_comparable("volume")
    assert any("1.5 T vs 3 T" in r for r in result.reasons)
    assert result.of("radiomics.ADC.original_firstorder_Mean") is NOT


def test_b_values() -> None:
    same_max = assess_comparability(BASE, _follow(dwi_b_values=(0.0, 100.0, 800.0)))
    assert (
        all(same_max.of(q) is CAUTION for q in DIFFUSION_QUANTITIES) and same_max.overall is CAUTION
    )
    other_max = assess_comparability(BASE, _follow(dwi_b_values=(0.0, 50.0, 1000.0)))
    assert other_max.of("ADC") is NOT and not other_max.is_comparable("MK.mean")
    assert other_max.of("Ktrans") is C


def test_missing_dwi_or_dce_flags_those_quantities_only() -> None:
    result = assess_comparability(BASE, _follow(dwi_b_values=(), dce_temporal_resolution_s=None))
    assert all(result.of(q) is NOT for q in (*DIFFUSION_QUANTITIES, *DCE_QUANTITIES))
    assert result.overall is C  # the remaining (anatomical) quantities are comparable
    assert any("DWI missing at follow-up" in r for r in result.reasons)
    assert any("DCE missing at follow-up" in r for r in result.reasons)


@pytest.mark.parametrize(
    ("resolution_s", "expected"), [(4.4, C), (6.0, CAUTION), (9.0, NOT), (12.0, NOT)]
)
def test_dce_temporal_resolution(resolution_s, expected) -> None:
    result = assess_comparability(BASE, _follow(dce_temporal_resolution_s=resolution_s))
    assert result.of("Ktrans") is expected and result.of("TTP") is expected
    assert result.of("T1") is C and result.of("ADC") is C


def test_voxel_size_and_fat_suppression_and_contrast() -> None:
    coarse = assess_comparability(BASE, _follow(anatomical_voxel_mm=(1.0, 1.0, 4.5)))
    assert coarse.of("volume") is CAUTION and coarse.of("max_axial_diameter_mm") is CAUTION
    assert coarse.of("radiomics") is CAUTION
    much = assess_comparability(BASE, _follow(anatomical_voxel_mm=(1.6, 1.6, 4.0)))
    assert much.of("radiomics") is NOT and much.of("volume") is CAUTION
    fat = assess_comparability(BASE, _follow(dwi_fat_suppression="SPAIR"))
    assert fat.of("ADC") is CAUTION and fat.of("Ktrans") is C
    contrast = assess_comparability(
        BASE,
        _follow(
            contrast_agent="gadobutrol",
            contrast_flow_rate_ml_s=1.5,
            contrast_injection_delay_s=60.0,
        ),
    )
    assert (
        contrast.of("ve") is CAUTION
        and contrast.of("Ktrans") is CAUTION
        and contrast.overall is CAUTION
    )
    assert len(contrast.reasons) == 3


def test_protocol_from_datasets_reads_standard_headers() -> None:
    dwi = Dataset()
    dwi.MagneticFieldStrength = 3
    dwi.PixelSpacing = [1.8, 1.6]
    dwi.SliceThickness = 4
    dwi.ScanningSequence = ["SE", "EP", "IR"]
    dwi.InversionTime = 180
    dce = Dataset()
    dce.PixelSpacing = [1.2, 1.2]
    dce.SpacingBetweenSlices = 3
    dce.ScanOptions = "FS"
    dce.TemporalResolution = 4500
    dce.ContrastBolusAgent = "Dotarem"
    dce.ContrastFlowRate = [3.0]
    protocol = protocol_from_datasets(dwi=dwi, dce=dce, dwi_b_values=[0, 800])
    assert protocol.field_strength_t == 3.0
    assert protocol.dwi_voxel_mm == (1.6, 1.8, 4.0) and protocol.dce_voxel_mm == (1.2, 1.2, 3.0)
    assert protocol.dwi_fat_suppression == "STIR" and protocol.dce_fat_suppression == "FAT_SAT"
    assert protocol.dce_temporal_resolution_s == pytest.approx(4.5)
    assert protocol.contrast_agent == "Dotarem" and protocol.contrast_flow_rate_ml_s == 3.0
    plain = Dataset()
    assert fat_suppression(plain) is None
    with pytest.raises(ValueError, match="field_strength_t"):
        AcquisitionProtocol(field_strength_t=0.0)


def test_phantom_baseline_and_follow_up_are_comparable(make_phantom) -> None:
    """The phantom acquires both studies with one protocol: comparable; degrading it is caught."""
    import json

    import pydicom

    from processing.comparability import protocol_from_series
    from processing.series import read_series

    root = make_phantom("responder", "standard", "small")
    truth = json.loads((root / "ground_truth.json").read_text())

    def protocol(study: str) -> AcquisitionProtocol:
        read = {}
        for role in ("t2w", "dwi", "dce"):
            folder = root / study / truth["studies"][study]["series"][role]["folder"]
            read[role] = read_series([pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))])
        return protocol_from_series(anatomical=read["t2w"], dwi=read["dwi"], dce=read["dce"])

    baseline, follow_up = protocol("baseline"), protocol("followup1")
    assert baseline.field_strength_t == 3.0
    assert baseline.dwi_b_values == (0.0, 50.0, 100.0, 400.0, 800.0, 1000.0, 1500.0, 2000.0)
    assert baseline.dce_temporal_resolution_s == pytest.approx(5.0, abs=0.01)
    assert baseline.anatomical_voxel_mm == pytest.approx((1.5625, 1.5625, 5.0))
    result = assess_comparability(baseline, follow_up)
    assert result.overall is C and result.reasons == ()
    slower = assess_comparability(
        baseline, dataclasses.replace(follow_up, dce_temporal_resolution_s=11.0)
    )
    assert slower.of("Ktrans") is NOT and slower.of("ADC") is C
