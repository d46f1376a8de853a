"""Test-retest repeatability of the measured quantities, from the literature, and how it combines.

A change between two scans is real only when it exceeds what two scans of an unchanged lesion
would differ by. Two independent sources of variation add up:

* **test-retest** (scanner noise, repositioning, physiological variation, the fit): published
  repeatability coefficients of repeated scans, :data:`PUBLISHED` (relative, as fractions, 95 %:
  ``RC = 1.96 * sqrt(2) * wCV``);
* **segmentation** of this case: the per-case spread under one-voxel perturbations of the ROI
  (:func:`processing.change.perturbation_repeatability`), also a 95 % coefficient.

Being independent, they add in quadrature: ``RC = sqrt(RC_test_retest² + RC_segmentation²)``
(:func:`combined_coefficient`). A quantity without a published value keeps the segmentation
coefficient alone, and the report says so (``test_retest`` ``None``).

The published values (docs/science.md §2.6):

========== ======= ===========================================================================
quantity   RC      source
========== ======= ===========================================================================
volume     10.9 %  minimum detectable difference of spine SBRT GTV volumes (Neurosurgery 2021,
                   PMID 34392364); already a between-scan, between-reader coefficient, so the
                   segmentation perturbation (erosion/dilation dominates volume) is not added
ADC        12.9 %  %RC of ADC median of 65 osteoblastic bone metastases scanned twice in vivo
                   (Eveslage M, Rassek P, Riegel A, Maksoud Z, Bauer J, Görlich D, Noto B;
                   University of Münster); phantom 5.8 %
Ktrans     38.5 %  wCV 13.9 % of prostate Ktrans in paired scans (Alonzi R, et al. J Magn Reson
                   Imaging 2010;32:155-164), times 2.77
vp, ve,    38.5 %  no published spine or bone test-retest value was found: the Ktrans value of
kep,               the same fit is used, a lower bound (vp is less repeatable than Ktrans in
IAUC60             most reports)
========== ======= ===========================================================================

The ADC value is applied to every ADC statistic (it was measured on the median; percentiles and
the peak are less repeatable, so it is a lower bound there). IVIM, DKI, T1, the signal statistics,
diameters and radiomics features have no published value here: their changes are judged on the
segmentation coefficient alone and marked so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

#: 1.96 * sqrt(2): a 95 % repeatability coefficient from a within-subject coefficient of variation.
RC_FACTOR = 1.96 * math.sqrt(2.0)


@dataclass(frozen=True)
class PublishedCoefficient:
    """One quantity's published test-retest repeatability coefficient."""

    quantity: str
    coefficient: float  # relative 95 % repeatability coefficient (fraction)
    source: str  # short citation, shown beside the criterion that uses it
    basis: str  # what was measured, and how the value was derived


_KTRANS = PublishedCoefficient(
    "Ktrans",
    round(RC_FACTOR * 0.139, 3),
    "Alonzi 2010 (J Magn Reson Imaging 32:155)",
    "wCV 13.9 % of prostate Ktrans in paired scans, x 2.77",
)

#: Published repeatability coefficients by quantity (the map name for map statistics).
PUBLISHED: dict[str, PublishedCoefficient] = {
    "volume": PublishedCoefficient(
        "volume",
        0.109,
        "Neurosurgery 2021 (PMID 34392364)",
        "minimum detectable difference of spine SBRT GTV volume",
    ),
    "epidural_volume": PublishedCoefficient(
        "epidural_volume",
        0.109,
        "Neurosurgery 2021 (PMID 34392364)",
        "GTV volume MDD applied to the epidural part",
    ),
    "ADC": PublishedCoefficient(
        "ADC",
        0.129,
        "Eveslage et al. (Muenster), bone metastases",
        "%RC of ADC median, 65 osteoblastic metastases scanned twice in vivo",
    ),
    "Ktrans": _KTRANS,
    **{
        name: PublishedCoefficient(
            name,
            _KTRANS.coefficient,
            f"{_KTRANS.source}, Ktrans value",
            "no spine/bone test-retest value published; the Ktrans value of the same fit",
        )
        for name in ("vp", "ve", "kep", "IAUC60")
    },
}

#: Quantities whose published coefficient already contains segmentation variation: the per-case
#: perturbation is not added to them.
_INCLUDES_SEGMENTATION = frozenset({"volume", "epidural_volume"})


def published_coefficient(quantity: str) -> PublishedCoefficient | None:
    """The published coefficient for a dotted quantity path, or ``None`` if there is none.

    ``ADC.mean`` and ``ADC.p90`` take the value of ``ADC``; radiomics features
    (``radiomics.ADC.original_glcm_Contrast``) and quantities not in :data:`PUBLISHED` have
    none.
    """
    if quantity.startswith("radiomics."):
        return None
    return PUBLISHED.get(quantity) or PUBLISHED.get(quantity.split(".")[0])


def combined_coefficient(
    test_retest_rc: float | None, segmentation_rc: float | None
) -> float | None:
    """``sqrt(a² + b²)`` of the two relative coefficients; either may be missing (``None``)."""
    parts = [x for x in (test_retest_rc, segmentation_rc) if x is not None]
    if not parts:
        return None
    return math.sqrt(sum(x * x for x in parts))


@dataclass(frozen=True)
class Repeatability:
    """A quantity's repeatability coefficient and its two parts (relative, fractions)."""

    combined: float | None
    test_retest: float | None
    segmentation: float | None


def repeatability_of(
    quantity: str, segmentation: Mapping[str, float], *, published: bool = True
) -> Repeatability:
    """The combined coefficient of ``quantity`` given the per-case segmentation coefficients.

    Parameters
    ----------
    quantity : str
        Dotted quantity path (``volume``, ``ADC.mean``, ``radiomics.ADC.original_...``).
    segmentation : mapping of str to float
        Per-case coefficients by path (:func:`processing.change.perturbation_repeatability`);
        empty when the perturbation was not run.
    published : bool
        False: the segmentation coefficient alone for every quantity but the volumes (how
        response rule set 1.0 was recorded; kept to reproduce it).
    """
    value = published_coefficient(quantity)
    literature = value.coefficient if value is not None else None
    if quantity in _INCLUDES_SEGMENTATION:
        return Repeatability(literature, literature, None)
    if not published:
        literature = None
    case = segmentation.get(quantity)
    return Repeatability(combined_coefficient(literature, case), literature, case)
