"""A baseline and a follow-up of one treated lesion with known numbers, and their DICOM inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from processing.results import (
    Change,
    Comparability,
    Criterion,
    Lesion,
    LesionMeasurements,
    MapStatistics,
    ResponseAssessment,
    ResponseCategory,
    TimePointResult,
    TimePointRole,
)
from reporting.pmap import build_parametric_map
from reporting.seg import build_segmentation
from tests.reporting.sources import FOLLOW_UP_STUDY_UID, STUDY_UID, classic_mr_series

LESION = Lesion(
    tracking_id="GTV L2", tracking_uid="1.2.826.0.1.3680043.8.498.555", vertebral_level="L2"
)
VERSION = "0.1.0"


def _measurements(volume: float, adc: float, ktrans: float) -> LesionMeasurements:
    return LesionMeasurements(
        volume_ml=volume,
        max_axial_diameter_mm=21.5,
        max_craniocaudal_extent_mm=18.25,
        max_3d_diameter_mm=27.0,
        map_statistics={
            "ADC": MapStatistics(
                "ADC",
                "mm2/s",
                412,
                adc,
                adc * 0.98,
                0.21e-3,
                adc * 0.7,
                adc * 1.3,
                peak=adc * 0.6,
                peak_definition="mean of the lowest 10 % of voxels",
            ),
            "Ktrans": MapStatistics(
                "Ktrans", "/min", 398, ktrans, ktrans * 0.95, 0.031, ktrans * 0.5, ktrans * 1.6
            ),
            "T2w": MapStatistics("T2w", "1", 420, 310.0, 300.0, 40.0, 260.0, 360.0),
        },
        radiomics={
            "ADC": {
                "original_firstorder_Kurtosis": 4.25,
                "original_glcm_Contrast": 7.5,
                "original_shape_MeshVolume": volume * 1000.0,
                "original_firstorder_Mean": adc,
                "wavelet-LLH_glcm_Contrast": 2.5,
            }
        },
    )


BASELINE = TimePointResult(
    lesion=LESION,
    role=TimePointRole.BASELINE,
    study_instance_uid=STUDY_UID,
    study_date="20260105",
    days_since_treatment=-9,
    measurements=_measurements(4.2, 0.95e-3, 0.14),
)

_FU = _measurements(3.1, 1.35e-3, 0.07)
FOLLOW_UP = TimePointResult(
    lesion=LESION,
    role=TimePointRole.FOLLOW_UP,
    study_instance_uid=FOLLOW_UP_STUDY_UID,
    study_date="20260420",
    days_since_treatment=96,
    measurements=_FU,
    changes=(
        Change("volume", "baseline", 4.2, 3.1, -1.1, -1.1 / 4.2, 0.2, True),
        Change("ADC.mean", "baseline", 0.95e-3, 1.35e-3, 0.4e-3, 0.4 / 0.95, 0.15, True),
        Change("Ktrans.median", "baseline", 0.133, 0.0665, -0.0665, -0.5, 0.25, True),
        Change("radiomics.ADC.original_glcm_Contrast", "baseline", 7.5, 7.5, 0.0, 0.0, None, None),
    ),
    response=ResponseAssessment(
        category=ResponseCategory.LOCAL_CONTROL,
        criteria=(
            Criterion(
                "volume-increase",
                "Volume increase >= 20 % from baseline",
                False,
                value=-26.19,
                threshold=20.0,
                unit="%",
            ),
            Criterion(
                "perfusion-decrease",
                "Ktrans decrease beyond repeatability",
                True,
                value=-50.0,
                threshold=-25.0,
                unit="%",
                source="Kumar 2017",
            ),
        ),
        rule_set="spine-sbrt-response 1.0 (SPINO + volumetric + DCE)",
        recommendation="routine follow-up MRI in 3 months",
        epidural_progression=False,
        compression_fracture="none",
        model_probability=0.12,
        model_top_features=(("Ktrans.median", -0.8), ("volume", 0.3)),
        model_name="site logistic model",
        leaning="treatment effect",
    ),
    comparability=Comparability.COMPARABLE,
)


@dataclass
class Objects:
    baseline_sources: list[Dataset]
    follow_up_sources: list[Dataset]
    segs: list[Dataset]
    pmaps: list[Dataset]


def _mask(n: int) -> np.ndarray:
    mask = np.zeros((n, 24, 20), dtype=bool)
    mask[2:4, 8:14, 6:12] = True
    return mask


def build_inputs(version: str = VERSION) -> Objects:
    """Sources, SEGs and ADC/Ktrans maps of both time points (deterministic)."""
    base = classic_mr_series(
        study_uid=STUDY_UID, series_uid="1.2.826.0.1.3680043.8.498.30001", study_date="20260105"
    )
    fu = classic_mr_series(
        study_uid=FOLLOW_UP_STUDY_UID,
        series_uid="1.2.826.0.1.3680043.8.498.30002",
        study_date="20260420",
    )
    segs, pmaps = [], []
    for sources, result in ((base, BASELINE), (fu, FOLLOW_UP)):
        n = len(sources)
        segs.append(
            build_segmentation(
                sources, _mask(n), LESION, algorithm_version=version, segment_type="metastasis"
            )
        )
        stats = result.measurements.map_statistics
        pmaps.append(
            build_parametric_map(
                sources,
                np.full((n, 24, 20), stats["ADC"].mean, np.float32),
                "ADC",
                provenance={"b_values": [0, 800]},
                algorithm_version=version,
                vertebral_level="L2",
            )
        )
        pmaps.append(
            build_parametric_map(
                sources,
                np.full((n, 24, 20), stats["Ktrans"].mean, np.float32),
                "Ktrans",
                provenance={"model": "extended_tofts"},
                algorithm_version=version,
                vertebral_level="L2",
            )
        )
    return Objects(base, fu, segs, pmaps)
