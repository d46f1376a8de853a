"""Radiomics: IBSI-style preprocessing with SimpleITK/numpy, then feature extraction by pyradiomics.

pyradiomics' own resampling aligns the new grid on the image origin and its re-segmentation offers
one mode at a time, so IBSI configurations cannot be reproduced through its settings alone. Here the
preprocessing is done first, IBSI-style (IBSI 1, chapter 2 "Image processing"):

1. interpolation to an isotropic grid whose size is ``ceil(n * s / s_new)`` per axis and whose
   centre coincides with the centre of the original grid ("align grid centers", IBSI 3WE3); the
   image is padded with its nearest boundary intensity first, so that extrapolated border voxels
   are defined; cubic B-spline interpolation (SimpleITK ``sitkBSpline``) by default;
2. optional rounding of interpolated intensities to the nearest integer (CT: Hounsfield units);
3. ROI interpolation: the 0/1 mask is interpolated linearly and voxels with a partial volume
   ``>= 0.5`` are kept (the *morphological* mask);
4. re-segmentation of the *intensity* mask: a range ``[low, high]`` and/or outlier removal at
   mean ± k·σ of the intensities left by the range step (IBSI "outlier filtering").

pyradiomics then receives the preprocessed image and masks with resampling off: shape features are
computed on the morphological mask, intensity and texture features on the intensity mask, as IBSI
prescribes. The known differences between pyradiomics and IBSI definitions are corrected in
:func:`to_ibsi` (see :data:`IBSI_CORRECTIONS`); :data:`IBSI_FEATURES` maps each pyradiomics feature
to its IBSI tag, name and permanent code, and is what the SR writer uses to code features.

A :class:`RadiomicsCache` shared by several extractions (maps of one grid, an ROI and its
perturbations) does each ROI-independent step (casting and interpolating an image) and each
image-independent step (interpolating an ROI, shape features) once; pyradiomics is handed the
bounding box of the ROI, which it would crop to itself. Results are bit-identical either way.

References
----------
.. [1] Zwanenburg A, Vallières M, et al. The Image Biomarker Standardization Initiative.
   Radiology 2020;295:328-338. IBSI reference manual, arXiv:1612.07003.
.. [2] van Griethuysen JJM, et al. Computational radiomics system to decode the radiographic
   phenotype. Cancer Res 2017;77:e104-e107 (pyradiomics).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from processing.errors import InputError

logger = logging.getLogger(__name__)

#: Version of the settings schema and of the preprocessing code; part of every settings digest.
RADIOMICS_SETTINGS_VERSION = "1.0"

#: Feature classes computed when the ROI is large enough; shape and first order are always computed.
TEXTURE_CLASSES: tuple[str, ...] = ("glcm", "glrlm", "glszm", "gldm", "ngtdm")
ALL_CLASSES: tuple[str, ...] = ("shape", "firstorder", *TEXTURE_CLASSES)


@dataclass(frozen=True)
class IbsiFeature:
    """One IBSI feature as reproduced from a pyradiomics feature.

    Attributes
    ----------
    tag : str
        IBSI reference tag (as in the IBSI reference value tables), e.g. ``cm_contrast_3D_avg``.
    name : str
        IBSI feature name.
    code : str
        IBSI permanent identifier (four characters, IBSI reference manual chapter 3).
    """

    tag: str
    name: str
    code: str


def _f(tag: str, name: str, code: str) -> IbsiFeature:
    return IbsiFeature(tag, name, code)


#: pyradiomics feature (``<class>_<Feature>``, without the image-type prefix) -> IBSI feature.
#: GLCM and GLRLM features are averaged over the 13 3-D directions by pyradiomics, i.e. IBSI's
#: "3D_avg" aggregation; GLDM with alpha 0 and distance 1 is IBSI's NGLDM.
IBSI_FEATURES: dict[str, IbsiFeature] = {
    # morphology (on the morphological mask)
    "shape_MeshVolume": _f("morph_volume", "Volume (mesh)", "RNU0"),
    "shape_VoxelVolume": _f("morph_vol_approx", "Volume (voxel counting)", "YEKZ"),
    "shape_SurfaceArea": _f("morph_area_mesh", "Surface area (mesh)", "C0JK"),
    "shape_SurfaceVolumeRatio": _f("morph_av", "Surface to volume ratio", "2PR5"),
    "shape_Sphericity": _f("morph_sphericity", "Sphericity", "QCFX"),
    "shape_Maximum3DDiameter": _f("morph_diam", "Maximum 3D diameter", "L0JK"),
    "shape_MajorAxisLength": _f("morph_pca_maj_axis", "Major axis length", "TDIC"),
    "shape_MinorAxisLength": _f("morph_pca_min_axis", "Minor axis length", "P9VJ"),
    "shape_LeastAxisLength": _f("morph_pca_least_axis", "Least axis length", "7J51"),
    "shape_Elongation": _f("morph_pca_elongation", "Elongation", "Q3CK"),
    "shape_Flatness": _f("morph_pca_flatness", "Flatness", "N17B"),
    # intensity-based statistics (on the intensity mask, not discretised)
    "firstorder_Mean": _f("stat_mean", "Mean intensity", "Q4LE"),
    "firstorder_Variance": _f("stat_var", "Intensity variance", "ECT3"),
    "firstorder_Skewness": _f("stat_skew", "Intensity skewness", "KE2A"),
    "firstorder_Kurtosis": _f("stat_kurt", "(Excess) intensity kurtosis", "IPH6"),
    "firstorder_Median": _f("stat_median", "Median intensity", "Y12H"),
    "firstorder_Minimum": _f("stat_min", "Minimum intensity", "1GSF"),
    "firstorder_10Percentile": _f("stat_p10", "10th intensity percentile", "QG58"),
    "firstorder_90Percentile": _f("stat_p90", "90th intensity percentile", "8DWT"),
    "firstorder_Maximum": _f("stat_max", "Maximum intensity", "84IY"),
    "firstorder_InterquartileRange": _f("stat_iqr", "Intensity interquartile range", "SALO"),
    "firstorder_Range": _f("stat_range", "Intensity range", "2OJQ"),
    "firstorder_MeanAbsoluteDeviation": _f(
        "stat_mad", "Intensity-based mean absolute deviation", "4FUA"
    ),
    "firstorder_RobustMeanAbsoluteDeviation": _f(
        "stat_rmad", "Intensity-based robust mean absolute deviation", "1128"
    ),
    "firstorder_Energy": _f("stat_energy", "Intensity-based energy", "N8CA"),
    "firstorder_RootMeanSquared": _f("stat_rms", "Root mean square intensity", "5ZWQ"),
    # intensity histogram (discretised intensities)
    "firstorder_Entropy": _f("ih_entropy", "Discretised intensity entropy", "TLU2"),
    "firstorder_Uniformity": _f("ih_uniformity", "Discretised intensity uniformity", "BJ5W"),
    # grey level co-occurrence matrix, 3D averaged over directions
    "glcm_MaximumProbability": _f("cm_joint_max_3D_avg", "Joint maximum", "GYBY"),
    "glcm_JointAverage": _f("cm_joint_avg_3D_avg", "Joint average", "60VM"),
    "glcm_SumSquares": _f("cm_joint_var_3D_avg", "Joint variance", "UR99"),
    "glcm_JointEntropy": _f("cm_joint_entr_3D_avg", "Joint entropy", "TU9B"),
    "glcm_DifferenceAverage": _f("cm_diff_avg_3D_avg", "Difference average", "TF7R"),
    "glcm_DifferenceVariance": _f("cm_diff_var_3D_avg", "Difference variance", "D3YU"),
    "glcm_DifferenceEntropy": _f("cm_diff_entr_3D_avg", "Difference entropy", "NTRS"),
    "glcm_SumAverage": _f("cm_sum_avg_3D_avg", "Sum average", "ZGXS"),
    "glcm_SumEntropy": _f("cm_sum_entr_3D_avg", "Sum entropy", "P6QZ"),
    "glcm_JointEnergy": _f("cm_energy_3D_avg", "Angular second moment", "8ZQL"),
    "glcm_Contrast": _f("cm_contrast_3D_avg", "Contrast", "ACUI"),
    "glcm_Id": _f("cm_inv_diff_3D_avg", "Inverse difference", "IB1Z"),
    "glcm_Idn": _f("cm_inv_diff_norm_3D_avg", "Normalised inverse difference", "NDRX"),
    "glcm_Idm": _f("cm_inv_diff_mom_3D_avg", "Inverse difference moment", "WF0Z"),
    "glcm_Idmn": _f("cm_inv_diff_mom_norm_3D_avg", "Normalised inverse difference moment", "1QCO"),
    "glcm_InverseVariance": _f("cm_inv_var_3D_avg", "Inverse variance", "E8JP"),
    "glcm_Correlation": _f("cm_corr_3D_avg", "Correlation", "NI2N"),
    "glcm_Autocorrelation": _f("cm_auto_corr_3D_avg", "Autocorrelation", "QWB0"),
    "glcm_ClusterTendency": _f("cm_clust_tend_3D_avg", "Cluster tendency", "DG8W"),
    "glcm_ClusterShade": _f("cm_clust_shade_3D_avg", "Cluster shade", "7NFM"),
    "glcm_ClusterProminence": _f("cm_clust_prom_3D_avg", "Cluster prominence", "AE86"),
    "glcm_Imc1": _f("cm_info_corr1_3D_avg", "Information correlation 1", "R8DG"),
    "glcm_Imc2": _f("cm_info_corr2_3D_avg", "Information correlation 2", "JN9H"),
    # grey level run length matrix, 3D averaged over directions
    "glrlm_ShortRunEmphasis": _f("rlm_sre_3D_avg", "Short runs emphasis", "22OV"),
    "glrlm_LongRunEmphasis": _f("rlm_lre_3D_avg", "Long runs emphasis", "W4KF"),
    "glrlm_LowGrayLevelRunEmphasis": _f("rlm_lgre_3D_avg", "Low grey level run emphasis", "V3SW"),
    "glrlm_HighGrayLevelRunEmphasis": _f("rlm_hgre_3D_avg", "High grey level run emphasis", "G3QZ"),
    "glrlm_ShortRunLowGrayLevelEmphasis": _f(
        "rlm_srlge_3D_avg", "Short run low grey level emphasis", "HTZT"
    ),
    "glrlm_ShortRunHighGrayLevelEmphasis": _f(
        "rlm_srhge_3D_avg", "Short run high grey level emphasis", "GD3A"
    ),
    "glrlm_LongRunLowGrayLevelEmphasis": _f(
        "rlm_lrlge_3D_avg", "Long run low grey level emphasis", "IVPO"
    ),
    "glrlm_LongRunHighGrayLevelEmphasis": _f(
        "rlm_lrhge_3D_avg", "Long run high grey level emphasis", "3KUM"
    ),
    "glrlm_GrayLevelNonUniformity": _f("rlm_glnu_3D_avg", "Grey level non-uniformity", "R5YN"),
    "glrlm_GrayLevelNonUniformityNormalized": _f(
        "rlm_glnu_norm_3D_avg", "Normalised grey level non-uniformity", "OVBL"
    ),
    "glrlm_RunLengthNonUniformity": _f("rlm_rlnu_3D_avg", "Run length non-uniformity", "W92Y"),
    "glrlm_RunLengthNonUniformityNormalized": _f(
        "rlm_rlnu_norm_3D_avg", "Normalised run length non-uniformity", "IC23"
    ),
    "glrlm_RunPercentage": _f("rlm_r_perc_3D_avg", "Run percentage", "9ZK5"),
    "glrlm_GrayLevelVariance": _f("rlm_gl_var_3D_avg", "Grey level variance", "8CE5"),
    "glrlm_RunVariance": _f("rlm_rl_var_3D_avg", "Run length variance", "SXLW"),
    "glrlm_RunEntropy": _f("rlm_rl_entr_3D_avg", "Run entropy", "HJ9O"),
    # grey level size zone matrix, 3D (the stored IBSI doc omits the code of small zone emphasis;
    # 5QRC is the IBSI reference manual's identifier)
    "glszm_SmallAreaEmphasis": _f("szm_sze_3D", "Small zone emphasis", "5QRC"),
    "glszm_LargeAreaEmphasis": _f("szm_lze_3D", "Large zone emphasis", "48P8"),
    "glszm_LowGrayLevelZoneEmphasis": _f("szm_lgze_3D", "Low grey level zone emphasis", "XMSY"),
    "glszm_HighGrayLevelZoneEmphasis": _f("szm_hgze_3D", "High grey level zone emphasis", "5GN9"),
    "glszm_SmallAreaLowGrayLevelEmphasis": _f(
        "szm_szlge_3D", "Small zone low grey level emphasis", "5RAI"
    ),
    "glszm_SmallAreaHighGrayLevelEmphasis": _f(
        "szm_szhge_3D", "Small zone high grey level emphasis", "HW1V"
    ),
    "glszm_LargeAreaLowGrayLevelEmphasis": _f(
        "szm_lzlge_3D", "Large zone low grey level emphasis", "YH51"
    ),
    "glszm_LargeAreaHighGrayLevelEmphasis": _f(
        "szm_lzhge_3D", "Large zone high grey level emphasis", "J17V"
    ),
    "glszm_GrayLevelNonUniformity": _f("szm_glnu_3D", "Grey level non-uniformity", "JNSA"),
    "glszm_GrayLevelNonUniformityNormalized": _f(
        "szm_glnu_norm_3D", "Normalised grey level non-uniformity", "Y1RO"
    ),
    "glszm_SizeZoneNonUniformity": _f("szm_zsnu_3D", "Zone size non-uniformity", "4JP3"),
    "glszm_SizeZoneNonUniformityNormalized": _f(
        "szm_zsnu_norm_3D", "Normalised zone size non-uniformity", "VB3A"
    ),
    "glszm_ZonePercentage": _f("szm_z_perc_3D", "Zone percentage", "P30P"),
    "glszm_GrayLevelVariance": _f("szm_gl_var_3D", "Grey level variance", "BYLV"),
    "glszm_ZoneVariance": _f("szm_zs_var_3D", "Zone size variance", "3NSA"),
    "glszm_ZoneEntropy": _f("szm_zs_entr_3D", "Zone size entropy", "GU8N"),
    # neighbouring grey level dependence (pyradiomics GLDM, alpha = 0, Chebyshev distance 1)
    "gldm_SmallDependenceEmphasis": _f("ngl_lde_3D", "Low dependence emphasis", "SODN"),
    "gldm_LargeDependenceEmphasis": _f("ngl_hde_3D", "High dependence emphasis", "IMOQ"),
    "gldm_LowGrayLevelEmphasis": _f("ngl_lgce_3D", "Low grey level count emphasis", "TL9H"),
    "gldm_HighGrayLevelEmphasis": _f("ngl_hgce_3D", "High grey level count emphasis", "OAE7"),
    "gldm_SmallDependenceLowGrayLevelEmphasis": _f(
        "ngl_ldlge_3D", "Low dependence low grey level emphasis", "EQ3F"
    ),
    "gldm_SmallDependenceHighGrayLevelEmphasis": _f(
        "ngl_ldhge_3D", "Low dependence high grey level emphasis", "JA6D"
    ),
    "gldm_LargeDependenceLowGrayLevelEmphasis": _f(
        "ngl_hdlge_3D", "High dependence low grey level emphasis", "NBZI"
    ),
    "gldm_LargeDependenceHighGrayLevelEmphasis": _f(
        "ngl_hdhge_3D", "High dependence high grey level emphasis", "9QMG"
    ),
    "gldm_GrayLevelNonUniformity": _f("ngl_glnu_3D", "Grey level non-uniformity", "FP8K"),
    "gldm_DependenceNonUniformity": _f("ngl_dcnu_3D", "Dependence count non-uniformity", "Z87G"),
    "gldm_DependenceNonUniformityNormalized": _f(
        "ngl_dcnu_norm_3D", "Normalised dependence count non-uniformity", "OKJI"
    ),
    "gldm_GrayLevelVariance": _f("ngl_gl_var_3D", "Grey level variance", "1PFV"),
    "gldm_DependenceVariance": _f("ngl_dc_var_3D", "Dependence count variance", "DNX2"),
    "gldm_DependenceEntropy": _f("ngl_dc_entr_3D", "Dependence count entropy", "FCBV"),
    # neighbourhood grey tone difference matrix, 3D, distance 1
    "ngtdm_Coarseness": _f("ngt_coarseness_3D", "Coarseness", "QCDE"),
    "ngtdm_Contrast": _f("ngt_contrast_3D", "Contrast", "65HE"),
    "ngtdm_Busyness": _f("ngt_busyness_3D", "Busyness", "NQ30"),
    "ngtdm_Complexity": _f("ngt_complexity_3D", "Complexity", "HDEZ"),
    "ngtdm_Strength": _f("ngt_strength_3D", "Strength", "1X9X"),
}

#: Documented differences between pyradiomics and IBSI that :func:`to_ibsi` corrects.
IBSI_CORRECTIONS: dict[str, str] = {
    "firstorder_Kurtosis": "pyradiomics reports the (non-excess) kurtosis; IBSI stat_kurt is the "
    "excess kurtosis: stat_kurt = Kurtosis - 3.",
    "shape_MajorAxisLength": "pyradiomics derives the PCA axis lengths from the population (N) "
    "covariance of voxel positions, IBSI from the sample (N-1) covariance: morph_pca_maj_axis = "
    "MajorAxisLength * sqrt(N/(N-1)), N = voxels in the morphological mask (on the IBSI digital "
    "phantom this moves 11.3 to the reference 11.4).",
    "shape_MinorAxisLength": "as MajorAxisLength: morph_pca_min_axis = MinorAxisLength * "
    "sqrt(N/(N-1)).",
    "shape_LeastAxisLength": "as MajorAxisLength: morph_pca_least_axis = LeastAxisLength * "
    "sqrt(N/(N-1)).",
}

#: Documented deviations that are not corrected (features left unmapped).
IBSI_UNMAPPED_NOTES: tuple[str, ...] = (
    "pyradiomics does not compute IBSI local intensity peaks, intensity-volume histogram "
    "features, GLDZM, 3D_comb (merged-direction) texture aggregation, NGLDM dependence count "
    "percentage/energy, or the IBSI morphology features based on bounding boxes, ellipsoids, "
    "convex hull, Moran's I or Geary's C; these are not reported.",
)


class RadiomicsError(InputError):
    """The image/mask pair cannot be processed (empty ROI, mismatched geometry, bad settings)."""


@dataclass(frozen=True)
class RadiomicsSettings:
    """Preprocessing and extraction settings for one quantity (one map) of one treatment course.

    The same object must be used for baseline and every follow-up of a course so that features are
    extracted identically; :meth:`digest` identifies it in provenance.

    Parameters
    ----------
    spacing_mm : float or None
        Isotropic voxel spacing of the interpolation grid, mm (> 0); ``None``: no interpolation.
    interpolator : {"bspline", "linear", "nearest"}
        Image interpolation; ``bspline`` is the cubic B-spline (IBSI "tricubic spline").
    round_intensities : bool
        Round interpolated intensities to the nearest integer (IBSI, for CT in HU).
    mask_partial_volume : float
        Threshold in (0, 1] on the linearly interpolated mask (IBSI: 0.5).
    resegment_range : (float or None, float or None) or None
        Intensity range kept in the intensity mask, map units; ``None`` for no range.
    resegment_sigma : float or None
        Outlier filtering: keep mean ± k·σ of the intensities left by the range step (IBSI: 3).
    bin_count, bin_width : int or None, float or None
        Discretisation: fixed bin number (IBSI FBN) or fixed bin size (FBS); exactly one is set.
    gldm_alpha : int
        Coarseness parameter of the NGLDM (IBSI: 0).
    min_texture_voxels : int
        Minimum voxels in the intensity mask for texture classes; smaller ROIs get shape and
        first-order features only, with a note.
    """

    spacing_mm: float | None = None
    interpolator: str = "bspline"
    round_intensities: bool = False
    mask_partial_volume: float = 0.5
    resegment_range: tuple[float | None, float | None] | None = None
    resegment_sigma: float | None = None
    bin_count: int | None = 32
    bin_width: float | None = None
    gldm_alpha: int = 0
    min_texture_voxels: int = 10
    version: str = RADIOMICS_SETTINGS_VERSION

    def __post_init__(self) -> None:
        for name in ("spacing_mm", "bin_width", "resegment_sigma", "mask_partial_volume"):
            value = getattr(self, name)
            if value is not None:  # canonical floats: equal settings, equal digests
                object.__setattr__(self, name, float(value))
        if self.spacing_mm is not None and not self.spacing_mm > 0:
            raise ValueError(f"spacing_mm must be > 0 mm, got {self.spacing_mm}")
        if self.interpolator not in _INTERPOLATORS:
            raise ValueError(
                f"interpolator must be one of {sorted(_INTERPOLATORS)}, got {self.interpolator!r}"
            )
        if not 0.0 < self.mask_partial_volume <= 1.0:
            raise ValueError(
                f"mask_partial_volume must be in (0, 1], got {self.mask_partial_volume}"
            )
        if (self.bin_count is None) == (self.bin_width is None):
            raise ValueError("set exactly one of bin_count (fixed bin number) and bin_width")
        if self.bin_count is not None and self.bin_count < 2:
            raise ValueError(f"bin_count must be >= 2, got {self.bin_count}")
        if self.bin_width is not None and not self.bin_width > 0:
            raise ValueError(f"bin_width must be > 0, got {self.bin_width}")
        if self.resegment_sigma is not None and not self.resegment_sigma > 0:
            raise ValueError(f"resegment_sigma must be > 0, got {self.resegment_sigma}")
        if self.resegment_range is not None:
            if len(self.resegment_range) != 2:
                raise ValueError("resegment_range must be (low, high)")
            low, high = self.resegment_range
            if low is not None and high is not None and not low < high:
                raise ValueError(f"resegment_range low must be < high, got {self.resegment_range}")
            # floats, so that equal settings have equal digests whatever number type was given
            object.__setattr__(
                self,
                "resegment_range",
                (None if low is None else float(low), None if high is None else float(high)),
            )
        if self.gldm_alpha < 0:
            raise ValueError(f"gldm_alpha must be >= 0, got {self.gldm_alpha}")
        if self.min_texture_voxels < 1:
            raise ValueError(f"min_texture_voxels must be >= 1, got {self.min_texture_voxels}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form (the course parameter file stores this)."""
        data = dataclasses.asdict(self)
        if self.resegment_range is not None:
            data["resegment_range"] = list(self.resegment_range)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RadiomicsSettings:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown radiomics settings: {sorted(unknown)}")
        kwargs = dict(data)
        if kwargs.get("resegment_range") is not None:
            kwargs["resegment_range"] = tuple(kwargs["resegment_range"])
        return cls(**kwargs)

    def digest(self) -> str:
        """Short SHA-256 of the canonical JSON form: identical settings give identical digests."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def describe(self) -> str:
        """One line for provenance and SR notes."""
        parts = [f"radiomics settings v{self.version} ({self.digest()})"]
        parts.append(
            f"resampled to {self.spacing_mm} mm isotropic, {self.interpolator}, centre-aligned grid"
            if self.spacing_mm
            else "no resampling"
        )
        if self.round_intensities:
            parts.append("intensities rounded")
        parts.append(f"mask partial volume >= {self.mask_partial_volume}")
        if self.resegment_range is not None:
            parts.append(f"re-segmentation range {list(self.resegment_range)}")
        if self.resegment_sigma is not None:
            parts.append(f"outliers outside mean ± {self.resegment_sigma} SD removed")
        parts.append(
            f"{self.bin_count} fixed bins"
            if self.bin_count is not None
            else f"fixed bin width {self.bin_width}"
        )
        return "; ".join(parts)


_INTERPOLATORS = {
    "bspline": sitk.sitkBSpline,
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
}

#: Default re-segmentation ranges per MR map (physically possible values, units of
#: docs/architecture.md, Conventions).
_MR_RANGES: dict[str, tuple[float | None, float | None]] = {
    "ADC": (0.0, 5.0e-3),
    "MD": (0.0, 5.0e-3),
    "IVIM_D": (0.0, 5.0e-3),
    "MK": (0.0, 3.0),
    "Kapp": (0.0, 3.0),
    "Ktrans": (0.0, 5.0),
    "kep": (0.0, 10.0),
    "ve": (0.0, 1.0),
    "vp": (0.0, 1.0),
    "IVIM_f": (0.0, 1.0),
    "IAUC60": (0.0, None),
}


def default_course_settings(
    quantities: Iterable[str],
    *,
    spacing_mm: float = 1.0,
    bin_count: int = 32,
) -> dict[str, RadiomicsSettings]:
    """Default parameter set of a treatment course for MR maps: one settings object per quantity.

    Fixed bin number (``bin_count``, default 32) because MR maps and weighted images have no
    calibrated intensity scale shared by all patients; centre-aligned cubic B-spline resampling
    to ``spacing_mm`` isotropic; re-segmentation to the physically possible range of each map.

    Parameters
    ----------
    quantities : iterable of str
        Map names (``ADC``, ``MK``, ``Ktrans``, ``ve``, ``vp``, ``IAUC60``, ``T2w``, ``T1w``...).
    spacing_mm : float
        Isotropic interpolation spacing, mm.
    bin_count : int
        Fixed number of bins.
    """
    return {
        q: RadiomicsSettings(
            spacing_mm=spacing_mm, bin_count=bin_count, resegment_range=_MR_RANGES.get(q)
        )
        for q in quantities
    }


def course_parameters_json(settings: Mapping[str, RadiomicsSettings]) -> str:
    """The course parameter file: JSON of every quantity's settings (stable key order)."""
    return json.dumps(
        {q: s.to_dict() for q, s in sorted(settings.items())}, indent=2, sort_keys=True
    )


def course_parameters_from_json(text: str) -> dict[str, RadiomicsSettings]:
    """Read a course parameter file written by :func:`course_parameters_json`."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"course radiomics parameters are not valid JSON: {err}") from err
    return {q: RadiomicsSettings.from_dict(d) for q, d in raw.items()}


@dataclass(frozen=True)
class PreprocessedROI:
    """Image and masks after IBSI-style preprocessing, with IBSI diagnostic values.

    ``morphological_mask`` is the interpolated ROI (shape features); ``intensity_mask`` is that
    ROI after re-segmentation (intensity and texture features). ``diagnostics`` uses the IBSI
    diagnostic tags (``img_dim_x_interp_img``, ``int_mask_vox_count_reseg_roi``, ...).
    """

    image: sitk.Image
    morphological_mask: sitk.Image
    intensity_mask: sitk.Image
    diagnostics: dict[str, float]


def _check_geometry(image: sitk.Image, mask: sitk.Image) -> None:
    if image.GetDimension() != 3 or mask.GetDimension() != 3:
        raise RadiomicsError("image and mask must be 3-D")
    if image.GetSize() != mask.GetSize():
        raise RadiomicsError(
            f"mask size {mask.GetSize()} differs from image size {image.GetSize()}"
        )
    for name, a, b in (
        ("spacing", image.GetSpacing(), mask.GetSpacing()),
        ("origin", image.GetOrigin(), mask.GetOrigin()),
        ("direction", image.GetDirection(), mask.GetDirection()),
    ):
        if not np.allclose(a, b, atol=1e-3):
            raise RadiomicsError(f"mask {name} {b} differs from image {name} {a}")


def _bbox_dims(mask: np.ndarray) -> tuple[int, int, int]:
    """Bounding-box size (x, y, z) of a boolean (z, y, x) array, voxels."""
    if not mask.any():
        return (0, 0, 0)
    dims = []
    for axis in (2, 1, 0):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        dims.append(int(idx[-1] - idx[0] + 1))
    return (dims[0], dims[1], dims[2])


def _roi_diagnostics(
    step: str,
    image: np.ndarray,
    morph: np.ndarray,
    intensity: np.ndarray,
    *,
    shape: tuple[int, ...] | None = None,
) -> dict[str, float]:
    """ROI diagnostics; ``shape`` is the whole grid's when the arrays are cropped to the ROI."""
    out: dict[str, float] = {}
    z, y, x = shape if shape is not None else intensity.shape
    out.update(
        {
            f"int_mask_dim_x_{step}_roi": x,
            f"int_mask_dim_y_{step}_roi": y,
            f"int_mask_dim_z_{step}_roi": z,
        }
    )
    for prefix, m in (("int_mask", intensity), ("morph_mask", morph)):
        bx, by, bz = _bbox_dims(m)
        out.update(
            {
                f"{prefix}_bb_dim_x_{step}_roi": bx,
                f"{prefix}_bb_dim_y_{step}_roi": by,
                f"{prefix}_bb_dim_z_{step}_roi": bz,
                f"{prefix}_vox_count_{step}_roi": int(m.sum()),
            }
        )
    values = image[intensity]
    if values.size:
        out.update(
            {
                f"int_mask_mean_int_{step}_roi": float(values.mean()),
                f"int_mask_min_int_{step}_roi": float(values.min()),
                f"int_mask_max_int_{step}_roi": float(values.max()),
            }
        )
    return out


def _image_diagnostics(step: str, image: sitk.Image, arr: np.ndarray) -> dict[str, float]:
    """IBSI image diagnostics of the values ``arr`` (z, y, x) on the grid of ``image``."""
    sx, sy, sz = image.GetSpacing()
    nx, ny, nz = image.GetSize()
    return {
        f"img_dim_x_{step}_img": nx,
        f"img_dim_y_{step}_img": ny,
        f"img_dim_z_{step}_img": nz,
        f"vox_dim_x_{step}_img": sx,
        f"vox_dim_y_{step}_img": sy,
        f"vox_dim_z_{step}_img": sz,
        f"mean_int_{step}_img": float(arr.mean()),
        f"min_int_{step}_img": float(arr.min()),
        f"max_int_{step}_img": float(arr.max()),
    }


def centre_aligned_grid(
    image: sitk.Image,
    spacing_mm: float,
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Size and origin of an isotropic interpolation grid centred on the image grid (IBSI 3WE3).

    Size per axis is ``ceil(n * s / spacing_mm)``; the origin is shifted along the image axes so
    that both grids share their centre.

    Returns
    -------
    size : tuple of int
        New grid size (x, y, z), voxels.
    origin : tuple of float
        New origin, mm (patient coordinates of the image).
    """
    size = np.asarray(image.GetSize(), dtype=float)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    new_size = np.ceil(np.round(size * spacing / spacing_mm, 6)).astype(int)
    offset_index_space = (spacing * (size - 1) - spacing_mm * (new_size - 1)) / 2.0
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    origin = np.asarray(image.GetOrigin(), dtype=float) + direction @ offset_index_space
    return tuple(int(n) for n in new_size), tuple(float(o) for o in origin)


def _geometry_key(image: sitk.Image) -> tuple[tuple[float, ...], ...]:
    """Exact grid of an image (size, origin, spacing, direction), as a dictionary key."""
    return (
        tuple(float(n) for n in image.GetSize()),
        image.GetOrigin(),
        image.GetSpacing(),
        image.GetDirection(),
    )


@dataclass(frozen=True)
class _Source:
    """An input image cast to float64, with its finite-value map (independent of the ROI)."""

    image: sitk.Image  # the caller's image, kept so that its id() stays unique in the cache
    image_f: sitk.Image
    img0: np.ndarray
    finite0: np.ndarray
    all_finite: bool


@dataclass(frozen=True)
class _Interpolated:
    """An image after NaN filling and interpolation (independent of the ROI given the fill)."""

    fill: str | None  # float.hex() of the fill value; None when the image has no undefined voxel
    img0: np.ndarray
    init_diagnostics: dict[str, float]
    image_out: sitk.Image
    img1: np.ndarray
    interp_diagnostics: dict[str, float]


@dataclass(frozen=True)
class _Roi:
    """A label mask as a boolean array, and its interpolated (morphological) form."""

    mask: sitk.Image  # kept so that its id() stays unique in the cache
    roi0: np.ndarray
    morph: np.ndarray


class RadiomicsCache:
    """Preprocessing and shape features shared between extractions on the same images and ROIs.

    Radiomics of one lesion are extracted on several images of one grid (e.g. ADC and MK) and, for
    the per-case repeatability, on several ROIs of one image (the original ROI and its
    perturbations). Work that does not depend on the ROI (casting and interpolating the image,
    interpolating its finite-value support) or does not depend on the image (interpolating the
    ROI; pyradiomics shape features, which only see the morphological mask and the voxel spacing)
    is done once and reused; results are bit-identical to extractions without a cache.

    Entries are keyed by the identity of the SimpleITK images passed in (the cache keeps a
    reference to them) and by the settings that matter to each step: the images must not be
    modified while the cache is in use. The interpolated image depends on the ROI when the image
    has undefined (NaN) voxels, which are filled with the median of the ROI's defined values: only
    the most recent fill value of each image is kept, to bound memory.
    """

    def __init__(self) -> None:
        self._sources: dict[int, _Source] = {}
        self._interpolated: dict[tuple[Any, ...], _Interpolated] = {}
        self._supports: dict[tuple[Any, ...], np.ndarray] = {}
        self._fill_cache: dict[tuple[Any, ...], tuple[sitk.Image, np.ndarray, np.ndarray]] = {}
        self._rois: dict[tuple[Any, ...], _Roi] = {}
        self._shapes: dict[tuple[Any, ...], dict[str, float]] = {}
        self._extractors: dict[tuple[Any, ...], Any] = {}
        self._results: dict[tuple[Any, ...], tuple[sitk.Image, sitk.Image, RadiomicsResult]] = {}

    def result(
        self, image: sitk.Image, mask: sitk.Image, label: int, settings: RadiomicsSettings
    ) -> RadiomicsResult | None:
        """A copy of the features already extracted from this image, ROI and settings, if any."""
        entry = self._results.get((id(image), id(mask), label, settings))
        if entry is None or entry[0] is not image or entry[1] is not mask:
            return None
        return _copy_result(entry[2])

    def store(
        self,
        image: sitk.Image,
        mask: sitk.Image,
        label: int,
        settings: RadiomicsSettings,
        result: RadiomicsResult,
    ) -> None:
        """Keep a copy of the features extracted from this image, ROI and settings."""
        self._results[(id(image), id(mask), label, settings)] = (
            image,
            mask,
            _copy_result(result),
        )

    def source(self, image: sitk.Image) -> _Source:
        """The image cast to float64, with its finite-value map."""
        entry = self._sources.get(id(image))
        if entry is None or entry.image is not image:
            image_f = sitk.Cast(image, sitk.sitkFloat64)
            img0 = sitk.GetArrayFromImage(image_f)
            finite0 = np.isfinite(img0)
            entry = _Source(image, image_f, img0, finite0, bool(finite0.all()))
            self._sources[id(image)] = entry
        return entry

    def roi(
        self, mask: sitk.Image, label: int, source: _Source, settings: RadiomicsSettings
    ) -> _Roi:
        """The ROI of ``mask`` on the grid of ``source`` and its interpolation (morphology)."""
        key = (
            id(mask),
            label,
            _geometry_key(source.image_f),
            settings.spacing_mm,
            settings.mask_partial_volume,
        )
        entry = self._rois.get(key)
        if entry is not None and entry.mask is mask:
            return entry
        roi = sitk.Cast(sitk.Equal(mask, label), sitk.sitkFloat64)
        roi.CopyInformation(source.image_f)
        roi0 = sitk.GetArrayFromImage(roi) > 0.5
        if settings.spacing_mm is None or not roi0.any():
            morph = roi0
        else:
            padded_roi = sitk.ConstantPad(roi, _PAD, _PAD, 0.0)
            roi_i = _resampler(source.image_f, settings.spacing_mm, sitk.sitkLinear, 0.0).Execute(
                padded_roi
            )
            # 1e-9 guards against float noise at exactly half partial volume
            morph = sitk.GetArrayFromImage(roi_i) >= settings.mask_partial_volume - 1e-9
        entry = _Roi(mask, roi0, morph)
        self._rois[key] = entry
        return entry

    def interpolated(
        self, source: _Source, roi0: np.ndarray, settings: RadiomicsSettings
    ) -> _Interpolated:
        """The image after NaN filling (median of the ROI's defined values) and interpolation.

        Interpolation (linear, B-spline or nearest neighbour on the padded image) is linear in
        the image values, so an image whose undefined voxels are filled with ``f`` interpolates
        to ``I(zero-filled) + f * I(undefined indicator)``: both terms are interpolated once per
        image (:meth:`_fill_terms`) and each fill value of a perturbed ROI costs one array sum
        instead of a resampling of the whole map. Every extraction goes this way, with or
        without a shared cache, so results do not depend on the cache.
        """
        fill: str | None = None
        img0 = source.img0
        fill_value = 0.0
        if not source.all_finite:
            fill_value = float(np.median(img0[source.finite0 & roi0]))
            fill = fill_value.hex()
        key = (
            id(source.image),
            settings.spacing_mm,
            settings.interpolator,
            settings.round_intensities,
        )
        entry = self._interpolated.get(key)
        if entry is not None and entry.fill == fill:
            return entry
        if fill is not None:
            img0 = np.where(source.finite0, img0, fill_value)
        init_diagnostics = _image_diagnostics("init", source.image_f, img0)
        if settings.spacing_mm is None:
            img1 = img0
        elif fill is None:
            img1 = _interpolate(source.image_f, settings, float(img0.min()))
        else:
            zero_filled, undefined = self._fill_terms(source, settings)
            img1 = zero_filled + fill_value * undefined
            # grid points outside the padded image (none on a centre-aligned grid) take the
            # filled image's minimum, as a direct resampling's default value would give them
            img1[np.isnan(img1)] = float(img0.min())
        if settings.round_intensities:
            img1 = np.rint(img1)
        image_out = sitk.GetImageFromArray(img1)
        if settings.spacing_mm is None:
            image_out.CopyInformation(source.image_f)
        else:
            _, origin = centre_aligned_grid(source.image_f, settings.spacing_mm)
            image_out.SetOrigin(origin)
            image_out.SetSpacing((settings.spacing_mm,) * 3)
            image_out.SetDirection(source.image_f.GetDirection())
        entry = _Interpolated(
            fill,
            img0,
            init_diagnostics,
            image_out,
            img1,
            _image_diagnostics("interp", image_out, img1),
        )
        self._interpolated[key] = entry
        return entry

    def _fill_terms(
        self, source: _Source, settings: RadiomicsSettings
    ) -> tuple[np.ndarray, np.ndarray]:
        """The interpolated zero-filled image (NaN outside the padded image) and the interpolated
        indicator of its undefined voxels, once per image and interpolation (see
        :meth:`interpolated`)."""
        assert settings.spacing_mm is not None
        key = (id(source.image), settings.spacing_mm, settings.interpolator)
        entry = self._fill_cache.get(key)
        if entry is not None and entry[0] is source.image:
            return entry[1], entry[2]
        terms = []
        for values, default in (
            (np.where(source.finite0, source.img0, 0.0), math.nan),
            ((~source.finite0).astype(np.float64), 0.0),
        ):
            image = sitk.GetImageFromArray(values)
            image.CopyInformation(source.image_f)
            terms.append(_interpolate(image, settings, default))
        zero_filled, undefined = terms
        self._fill_cache[key] = (source.image, zero_filled, undefined)
        return zero_filled, undefined

    def support(self, source: _Source, settings: RadiomicsSettings) -> np.ndarray:
        """Interpolated voxels drawing half or more of their weight from defined voxels."""
        if settings.spacing_mm is None:
            return source.finite0
        if source.all_finite:
            return np.ones(_grid_shape(source.image_f, settings.spacing_mm), dtype=bool)
        key = (id(source.image), settings.spacing_mm)
        defined = self._supports.get(key)
        if defined is None:
            support = sitk.GetImageFromArray(source.finite0.astype(np.float64))
            support.CopyInformation(source.image_f)
            support = sitk.ConstantPad(support, _PAD, _PAD, 0.0)
            resampler = _resampler(source.image_f, settings.spacing_mm, sitk.sitkLinear, 0.0)
            defined = sitk.GetArrayFromImage(resampler.Execute(support)) >= 0.5 + 1e-9
            self._supports[key] = defined
        return defined

    def shape_features(
        self,
        key: tuple[Any, ...],
        compute: Callable[[], dict[str, float]],
    ) -> dict[str, float]:
        """Shape features under ``key`` (morphological mask and settings), computed once."""
        features = self._shapes.get(key)
        if features is None:
            features = compute()
            self._shapes[key] = features
        return dict(features)

    def extractor(self, settings: RadiomicsSettings, classes: Iterable[str]) -> Any:
        """A pyradiomics extractor for these settings and feature classes, built once."""
        classes = tuple(classes)
        key = (settings.bin_count, settings.bin_width, settings.gldm_alpha, classes)
        extractor = self._extractors.get(key)
        if extractor is None:
            extractor = _extractor(settings, classes)
            self._extractors[key] = extractor
        return extractor


#: Padding (voxels per side) of the image and masks before interpolation.
_PAD = [4, 4, 4]


def _resampler(
    image: sitk.Image, spacing_mm: float, interpolator: int, default: float
) -> sitk.ResampleImageFilter:
    """Resampler onto the centre-aligned isotropic grid of ``image`` (float64 output)."""
    size, origin = centre_aligned_grid(image, spacing_mm)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(size)
    resampler.SetOutputOrigin(origin)
    resampler.SetOutputSpacing((spacing_mm,) * 3)
    resampler.SetOutputDirection(image.GetDirection())
    resampler.SetOutputPixelType(sitk.sitkFloat64)
    resampler.SetInterpolator(interpolator)
    resampler.SetDefaultPixelValue(default)
    return resampler


def _interpolate(image: sitk.Image, settings: RadiomicsSettings, default: float) -> np.ndarray:
    """``image`` interpolated onto its centre-aligned isotropic grid with the settings'
    interpolator, as a (z, y, x) array; padded first with its nearest boundary intensity so that
    border extrapolation is defined (IBSI 2.4). ``default``: value of grid points outside the
    padded image."""
    assert settings.spacing_mm is not None
    resampler = _resampler(
        image, settings.spacing_mm, _INTERPOLATORS[settings.interpolator], default
    )
    return sitk.GetArrayFromImage(resampler.Execute(sitk.ZeroFluxNeumannPad(image, _PAD, _PAD)))


def _grid_shape(image: sitk.Image, spacing_mm: float) -> tuple[int, int, int]:
    """Array shape (z, y, x) of the centre-aligned isotropic grid of ``image``."""
    size, _ = centre_aligned_grid(image, spacing_mm)
    return (size[2], size[1], size[0])


def _bbox(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """Bounding box of the True voxels of a non-empty boolean (z, y, x) array."""
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return (out[0], out[1], out[2])


def _crop(
    pre: PreprocessedROI, box: tuple[slice, slice, slice]
) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """Image, morphological and intensity masks of ``pre`` cropped to ``box`` (z, y, x)."""
    start = pre.image.TransformIndexToPhysicalPoint([box[2].start, box[1].start, box[0].start])
    out = []
    for image in (pre.image, pre.morphological_mask, pre.intensity_mask):
        cropped = sitk.GetImageFromArray(sitk.GetArrayViewFromImage(image)[box])
        cropped.SetSpacing(image.GetSpacing())
        cropped.SetDirection(image.GetDirection())
        cropped.SetOrigin(start)
        out.append(cropped)
    return out[0], out[1], out[2]


def preprocess(
    image: sitk.Image,
    mask: sitk.Image,
    settings: RadiomicsSettings,
    *,
    label: int = 1,
    cache: RadiomicsCache | None = None,
) -> PreprocessedROI:
    """IBSI-style preprocessing of an image and its ROI (see the module docstring).

    Parameters
    ----------
    image : SimpleITK.Image
        3-D image in its own units (HU, mm²/s, /min ...).
    mask : SimpleITK.Image
        Label image on the same grid; voxels equal to ``label`` form the ROI.
    settings : RadiomicsSettings
        Preprocessing settings.
    label : int
        ROI label value in ``mask``.
    cache : RadiomicsCache, optional
        Reuse of ROI-independent and image-independent steps between calls (identical results);
        the returned image may then be shared between calls and must not be modified.

    Returns
    -------
    PreprocessedROI
        Interpolated image, morphological and intensity masks (uint8 0/1), IBSI diagnostics.

    Raises
    ------
    RadiomicsError
        If the geometry differs or the ROI is empty at any step.
    """
    return _preprocess(image, mask, settings, label=label, cache=cache)[0]


def _preprocess(
    image: sitk.Image,
    mask: sitk.Image,
    settings: RadiomicsSettings,
    *,
    label: int,
    cache: RadiomicsCache | None,
) -> tuple[PreprocessedROI, tuple[slice, slice, slice]]:
    """:func:`preprocess`, also returning the bounding box (z, y, x) of the morphological mask."""
    _check_geometry(image, mask)
    cache = cache or RadiomicsCache()
    source = cache.source(image)
    roi = cache.roi(mask, label, source, settings)
    roi0, finite0 = roi.roi0, source.finite0
    if not roi0.any():
        raise RadiomicsError(f"mask has no voxel with label {label}")
    # Fitted maps leave voxels undefined (NaN: the fit failed or was masked out). One NaN would
    # spread through the interpolation kernel into the whole resampled image, so undefined voxels
    # are filled with the median of the ROI's defined values before interpolation and removed
    # from the intensity mask afterwards (re-segmentation; a resampled voxel drawing half or
    # more of its weight from undefined voxels is undefined). Shape uses the ROI as drawn.
    n_undefined = int((~finite0 & roi0).sum())
    if not source.all_finite and not (finite0 & roi0).any():
        raise RadiomicsError("the image is undefined (NaN) in every ROI voxel")
    interpolated = cache.interpolated(source, roi0, settings)
    diagnostics = dict(interpolated.init_diagnostics)
    diagnostics.update(_roi_diagnostics("init", interpolated.img0, roi0, roi0 & finite0))
    if n_undefined:  # not an IBSI diagnostic: only present when it matters
        diagnostics["undefined_vox_count_init_roi"] = n_undefined

    img1, morph = interpolated.img1, roi.morph
    diagnostics.update(interpolated.interp_diagnostics)
    if not morph.any():
        raise RadiomicsError("ROI vanished after interpolation (smaller than half a voxel)")
    # Everything below only concerns ROI voxels: work on the bounding box of the morphological
    # mask (the intensity mask lies within it); values come out in the same order as on the
    # whole grid, so the statistics are identical.
    box = _bbox(morph)
    shape = morph.shape
    img1_box, morph_box = img1[box], morph[box]
    diagnostics.update(_roi_diagnostics("interp", img1_box, morph_box, morph_box, shape=shape))

    intensity = morph_box & cache.support(source, settings)[box]
    if not intensity.any():
        raise RadiomicsError("the image is undefined (NaN) in every ROI voxel after interpolation")
    if settings.resegment_range is not None:
        low, high = settings.resegment_range
        if low is not None:
            intensity &= img1_box >= low
        if high is not None:
            intensity &= img1_box <= high
    if settings.resegment_sigma is not None and intensity.any():
        values = img1_box[intensity]
        mean, sd = values.mean(), values.std()
        k = settings.resegment_sigma
        intensity &= (img1_box >= mean - k * sd) & (img1_box <= mean + k * sd)
    if not intensity.any():
        raise RadiomicsError("no ROI voxel left after re-segmentation")
    diagnostics.update(_roi_diagnostics("reseg", img1_box, morph_box, intensity, shape=shape))

    image_out = interpolated.image_out

    def as_mask(arr: np.ndarray) -> sitk.Image:
        full = np.zeros(shape, dtype=np.uint8)
        full[box] = arr
        out = sitk.GetImageFromArray(full)
        out.CopyInformation(image_out)
        return out

    pre = PreprocessedROI(image_out, as_mask(morph_box), as_mask(intensity), diagnostics)
    return pre, box


@dataclass(frozen=True)
class RadiomicsResult:
    """Features of one ROI on one image.

    Attributes
    ----------
    features : dict
        pyradiomics feature name with image-type prefix (``original_glcm_Contrast``) -> value, as
        computed by pyradiomics (uncorrected).
    ibsi : dict
        IBSI tag -> value for every mapped feature, after :data:`IBSI_CORRECTIONS`.
    notes : tuple of str
        Settings used, corrections applied, classes left out and why.
    diagnostics : dict
        IBSI preprocessing diagnostics (grid sizes, ROI voxel counts after each step).
    texture_computed : bool
        False when the ROI was too small for texture features.
    """

    features: dict[str, float]
    ibsi: dict[str, float]
    notes: tuple[str, ...]
    diagnostics: dict[str, float]
    settings: RadiomicsSettings
    texture_computed: bool = True
    n_morphological_voxels: int = 0
    n_intensity_voxels: int = 0


def _extractor(settings: RadiomicsSettings, classes: Iterable[str]) -> Any:
    from radiomics import featureextractor

    params: dict[str, Any] = {
        "label": 1,
        "resampledPixelSpacing": None,
        "interpolator": None,
        "normalize": False,
        "removeOutliers": None,
        "preCrop": False,
        "correctMask": False,
        "minimumROIDimensions": 1,
        "minimumROISize": None,
        "voxelArrayShift": 0,
        "gldm_a": int(settings.gldm_alpha),
        "distances": [1],
        "symmetricalGlcm": True,
        "force2D": False,
        "additionalInfo": False,
    }
    if settings.bin_count is not None:
        params["binCount"] = settings.bin_count
    else:
        params["binWidth"] = settings.bin_width
    extractor = featureextractor.RadiomicsFeatureExtractor(**params)
    extractor.disableAllFeatures()
    for cls in classes:
        names = [key.split("_", 1)[1] for key in IBSI_FEATURES if key.startswith(cls + "_")]
        extractor.enableFeaturesByName(**{cls: names})
    return extractor


def _run_pyradiomics(
    image: sitk.Image,
    mask: sitk.Image,
    settings: RadiomicsSettings,
    classes: Iterable[str],
    *,
    cache: RadiomicsCache | None = None,
) -> dict[str, float]:
    radiomics_logger = logging.getLogger("radiomics")
    level = radiomics_logger.level
    # pyradiomics logs every setting and feature at INFO and warns about fixed bin counts on
    # every call; its errors still come through
    radiomics_logger.setLevel(logging.ERROR)
    try:
        if cache is None:
            extractor = _extractor(settings, classes)
        else:
            extractor = cache.extractor(settings, classes)
        raw = extractor.execute(image, mask, label=1)
    except (ValueError, RuntimeError) as err:
        raise RadiomicsError(f"pyradiomics failed: {err}") from err
    finally:
        radiomics_logger.setLevel(level)
    return {k: float(v) for k, v in raw.items() if k.startswith("original_")}


_PCA_AXES = ("shape_MajorAxisLength", "shape_MinorAxisLength", "shape_LeastAxisLength")


def to_ibsi(features: Mapping[str, float], *, n_voxels: int) -> dict[str, float]:
    """Map pyradiomics features to IBSI tags, applying :data:`IBSI_CORRECTIONS`.

    Parameters
    ----------
    features : mapping
        pyradiomics names with or without the ``original_`` prefix -> value.
    n_voxels : int
        Voxels in the morphological mask (for the PCA axis-length correction).
    """
    out: dict[str, float] = {}
    for name, value in features.items():
        key = name.removeprefix("original_")
        feature = IBSI_FEATURES.get(key)
        if feature is None:
            continue
        if key == "firstorder_Kurtosis":
            value = value - 3.0
        elif key in _PCA_AXES and n_voxels > 1:
            value = value * math.sqrt(n_voxels / (n_voxels - 1))
        out[feature.tag] = float(value)
    return out


def extract_features(
    image: sitk.Image,
    mask: sitk.Image,
    settings: RadiomicsSettings,
    *,
    label: int = 1,
    cache: RadiomicsCache | None = None,
) -> RadiomicsResult:
    """IBSI-style preprocessing, then pyradiomics shape, first-order and texture features.

    Parameters
    ----------
    image, mask : SimpleITK.Image
        Image and label mask on the same grid.
    settings : RadiomicsSettings
        The course's settings for this quantity.
    label : int
        ROI label in ``mask``.
    cache : RadiomicsCache, optional
        Shared by calls on the same images and ROIs (e.g. several maps of one grid, or an ROI and
        its perturbations) to preprocess each image and each ROI once; results are identical.

    Returns
    -------
    RadiomicsResult
        Raw pyradiomics features, IBSI-mapped corrected features, notes and diagnostics. When the
        intensity mask has fewer than ``settings.min_texture_voxels`` voxels, only shape and
        first-order features are returned and the notes say why.

    Raises
    ------
    RadiomicsError
        Empty ROI, mismatched geometry, or a pyradiomics failure.
    """
    cache = cache or RadiomicsCache()
    previous = cache.result(image, mask, label, settings)
    if previous is not None:
        return previous
    pre, box = _preprocess(image, mask, settings, label=label, cache=cache)
    n_morph = int(pre.diagnostics["morph_mask_vox_count_reseg_roi"])
    n_int = int(pre.diagnostics["int_mask_vox_count_reseg_roi"])
    notes = [
        settings.describe(),
        "pyradiomics " + _pyradiomics_version() + "; shape on the interpolated ROI, "
        "intensity and texture on the re-segmented ROI; GLCM/GLRLM averaged over 13 "
        "directions (IBSI 3D_avg); GLDM alpha " + f"{settings.gldm_alpha:g}",
        *(f"IBSI correction: {text}" for text in IBSI_CORRECTIONS.values()),
        *IBSI_UNMAPPED_NOTES,
    ]
    n_undefined = int(pre.diagnostics.get("undefined_vox_count_init_roi", 0))
    if n_undefined:
        notes.append(
            f"{n_undefined} ROI voxel(s) undefined in the map (failed fit) left out of "
            "the intensity and texture features"
        )
    # pyradiomics crops image and mask to the mask's bounding box before computing features;
    # handing it the bounding box of the morphological mask (which holds the intensity mask)
    # gives the same features without its whole-grid checks and crops.
    image_box, morph_box, intensity_box = _crop(pre, box)
    # shape features only depend on the morphological mask and the voxel spacing
    shape_key = (
        id(mask),
        label,
        _geometry_key(image),
        settings.spacing_mm,
        settings.mask_partial_volume,
        settings.bin_count,
        settings.bin_width,
        settings.gldm_alpha,
    )
    features = cache.shape_features(
        shape_key,
        lambda: _run_pyradiomics(image_box, morph_box, settings, ["shape"], cache=cache),
    )
    texture = n_int >= settings.min_texture_voxels
    classes = ["firstorder", *TEXTURE_CLASSES] if texture else ["firstorder"]
    if not texture:
        notes.append(
            f"texture features not computed: ROI has {n_int} voxels after preprocessing, fewer "
            f"than the {settings.min_texture_voxels} needed; shape and first-order only"
        )
        logger.info("ROI of %d voxels: texture features skipped", n_int)
    features.update(_run_pyradiomics(image_box, intensity_box, settings, classes, cache=cache))
    result = RadiomicsResult(
        features=features,
        ibsi=to_ibsi(features, n_voxels=n_morph),
        notes=tuple(notes),
        diagnostics=pre.diagnostics,
        settings=settings,
        texture_computed=texture,
        n_morphological_voxels=n_morph,
        n_intensity_voxels=n_int,
    )
    cache.store(image, mask, label, settings, result)
    return result


def _copy_result(result: RadiomicsResult) -> RadiomicsResult:
    """The result with its own dictionaries (cached results are never handed out as such)."""
    return dataclasses.replace(
        result,
        features=dict(result.features),
        ibsi=dict(result.ibsi),
        diagnostics=dict(result.diagnostics),
    )


def _pyradiomics_version() -> str:
    import radiomics

    return str(getattr(radiomics, "__version__", "unknown"))
