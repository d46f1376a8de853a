"""Response assessment of a treated spinal metastasis: the documented rule sets.

Two versions are selectable (``[analysis] rule_set``); the version is recorded in every call,
summary and SR. **2.0** (the default, docs/science.md §1.12) keeps the size criteria, the
epidural criteria and the pseudoprogression window of 1.0 and weighs all functional evidence
explicitly, each item only when its change is beyond the combined repeatability coefficient
(published test-retest and per-case segmentation, :mod:`processing.repeatability`):

* viable-tumour evidence: a rise of vp, Ktrans or IAUC60 (>= +20 %, Kumar 2017, and beyond
  repeatability) or a fall of the ADC median beyond repeatability;
* treatment-effect evidence: a fall of vp, Ktrans or IAUC60 (<= -20 %, beyond repeatability) or
  a rise of the ADC median (>= +25 %, Messiou 2011, and beyond repeatability).

Local progression: epidural progression; a size increase outside the 6-26-week window or
confirmed by the next scan; a size increase inside the window with viable-tumour evidence and no
treatment-effect evidence. Indeterminate: any other size increase, and - without a size
increase - viable-tumour evidence from perfusion *and* diffusion together; the call states which
way the evidence leans (``ResponseAssessment.leaning``; a size increase without evidence of
treatment effect leans to progression) and what would settle it. Local control otherwise.
Every criterion names its source (``Criterion.source``).

Rule set ``spine-sbrt-response 1.0`` (kept for reproducibility) encodes the decision logic of
docs/science.md §1.11 (design, not a guideline; decision support only):

1. **Local progression** if any of
   a. epidural progression: new epidural tumour (baseline epidural volume 0, now
      >= 0.1 mL), epidural volume increase beyond the volume MDC (10.9 %) and >= 0.1 mL, or a
      higher Bilsky grade (SPINO criterion b);
   b. size increase beyond the size-dependent threshold (below) **outside** the
      pseudoprogression window of 6-26 weeks after treatment (Amini 2016);
   c. size increase confirmed on the following scan: the previous call was indeterminate or
      progression and the volume keeps growing beyond the threshold relative to the previous scan;
   d. size increase inside the window together with a perfusion **increase** (vp >= +20 %;
      failures +28 % to +88 % in Kumar 2017 and AJNR 2023) - a node design choice: growth with
      rising perfusion is not treated as pseudoprogression.
2. **Indeterminate - possible pseudoprogression** if the size increases inside the window without
   epidural progression and without a perfusion increase; when vp (or, without vp, Ktrans) falls
   by >= 20 % (Kumar 2017 cut-off) that is listed as the supporting perfusion evidence. A
   confirmation MRI in 6-8 weeks is recommended.
3. **Local control** otherwise; functional changes (vp/Ktrans fall, ADC rise >= 25 %, Messiou
   2011) are listed as supporting criteria.
4. Vertebral compression fracture (new / progressive, Genant height-loss grades) and epidural
   progression are reported separately from the tumour call whenever measurable.

Size increase means the GTV volume change from baseline exceeds the size-dependent threshold of
the Sunnybrook study (docs/science.md §1.3): baseline GTV < 2 mL: 42.0 % at the first follow-up,
71.3 % later, 37.2 % from the previous scan; 2-8.3 mL: 14.7 % (the cohort's optimal B-P2 threshold,
since the medium-size thresholds were below the MDD), 10.9 % from the previous scan; > 8.3 mL:
13.3 %; never below the MDD of 10.9 %. A linear increase of the maximum axial diameter by >= 20 %
and >= 5 mm (RECIST 1.1 PD) also counts (SPINO: "volume or linear dimension").

References
----------
.. [1] Thibault I, et al. Lancet Oncol 2015;16:e595-603 (SPINO).
.. [2] Amini B, et al. AJNR 2016;37:387 (osseous pseudoprogression, 9.7-24.4 weeks).
.. [3] Neurosurgery 2021, PMID 34392364 (volumetric thresholds, MDD 10.9 %).
.. [4] Kumar KA, et al. Technol Cancer Res Treat 2017 (Vp cut-off -20 %).
.. [5] Sahgal A, et al. J Clin Oncol 2013;31:3426 (VCF after spine SBRT); Genant HK 1993.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

from processing.change import VOLUME_MDC
from processing.results import Change, Criterion, ResponseAssessment, ResponseCategory

logger = logging.getLogger(__name__)

RULE_SET_NAME = "spine-sbrt-response"
#: The selectable versions; the default is the last.
RULE_SET_VERSIONS = ("1.0", "2.0")
RULE_SET_VERSION = RULE_SET_VERSIONS[-1]
#: Name and version of the default rule set, recorded in every :class:`ResponseAssessment`.
RULE_SET = f"{RULE_SET_NAME} {RULE_SET_VERSION}"
RULE_SET_V1 = f"{RULE_SET_NAME} 1.0"

#: Pseudoprogression window after treatment, days (6-26 weeks, docs/science.md §1.2/§1.11).
PSEUDOPROGRESSION_WINDOW_DAYS = (42, 182)
SMALL_GTV_ML = 2.0
LARGE_GTV_ML = 8.3
#: Relative vp/Ktrans change from baseline at or below which perfusion has fallen (Kumar 2017).
PERFUSION_DECREASE = -0.20
#: Relative vp change from baseline at or above which perfusion has risen.
PERFUSION_INCREASE = 0.20
#: Relative ADC rise supporting response (Messiou 2011: 75 % sensitive, 67 % specific).
ADC_INCREASE = 0.25
#: RECIST-like linear progression: relative and absolute increase of the maximum axial diameter.
DIAMETER_INCREASE = (0.20, 5.0)
#: Smallest epidural volume (mL) or epidural increase that counts as measurable disease.
EPIDURAL_MIN_ML = 0.1
#: Genant semi-quantitative grades by vertebral body height loss, % (grade 1 from 20 %).
GENANT_GRADES = ((20.0, 1), (25.0, 2), (40.0, 3))
BILSKY_ORDER = ("0", "1a", "1b", "1c", "2", "3")

CONFIRMATION_RECOMMENDATION = (
    "confirmation MRI in 6-8 weeks: size increase inside the "
    "pseudoprogression window (6-26 weeks after SBRT)"
)
PROGRESSION_RECOMMENDATION = "multidisciplinary review of local progression at the treated level"

#: The literature (or node design) behind each criterion of rule set 2.0, by criterion code
#: prefix; shown beside the criterion and written in the SR's algorithm parameters.
SOURCES: dict[str, str] = {
    "volume-increase": "Sunnybrook volumetric thresholds, Neurosurgery 2021 (PMID 34392364)",
    "diameter-increase": "RECIST 1.1 PD (Eisenhauer 2009); SPINO linear dimension",
    "growth-confirmed": "node design: growth confirmed on the next scan (SPINO)",
    "pseudoprogression-window": "Amini 2016 (AJNR 37:387): 6-26 weeks",
    "epidural": "SPINO criterion b (Thibault 2015); volume MDD Neurosurgery 2021",
    "bilsky-increase": "Bilsky 2010 (J Neurosurg Spine 13:324)",
    "perfusion-rise": "Kumar 2017 (Technol Cancer Res Treat); AJNR 2023;44:1451",
    "perfusion-fall": "Kumar 2017 (Technol Cancer Res Treat): vp cut-off -20 %",
    "adc-fall": "Padhani 2009 (Neoplasia 11:102): cellularity lowers ADC",
    "adc-rise": "Messiou 2011 (Eur Radiol): ADC +25 %",
    "functional-progression": "node design: viable-tumour evidence of perfusion and diffusion",
    "compression-fracture": "Sahgal 2013 (J Clin Oncol 31:3426); Genant 1993",
    "repeatability": "processing.repeatability: published test-retest (+) per-case ROI spread",
    "lesion-not-delineated": "node design: a size the node could not measure is not evidence "
    "of control",
}

#: Perfusion quantities weighed by rule set 2.0 (mean over the lesion, as in Kumar 2017).
PERFUSION_QUANTITIES = ("vp", "Ktrans", "IAUC60")
#: The ADC statistic weighed by rule set 2.0: the median (the published test-retest coefficient
#: was measured on it, and it is less sensitive than the mean to marrow at the ROI's edge).
ADC_STATISTIC = "median"

#: what a confirmation scan is to show, by where the functional evidence leans
_SETTLE = {
    "treatment effect": "settled by a stable or shrinking GTV at the confirmation scan",
    "mixed": "watch vp and the ADC median at the confirmation scan",
    "progression": "growth beyond threshold at the confirmation scan confirms progression",
}


def rule_set_version(rule_set: str) -> str:
    """The version of a rule set given as ``"2.0"`` or ``"spine-sbrt-response 2.0"``."""
    version = rule_set.removeprefix(RULE_SET_NAME).strip()
    if version not in RULE_SET_VERSIONS:
        raise ValueError(
            f"unknown response rule set {rule_set!r}; choose one of {RULE_SET_VERSIONS}"
        )
    return version


def volume_threshold(
    baseline_volume_ml: float, *, reference: str = "baseline", first_follow_up: bool = True
) -> float:
    """Relative GTV volume increase that counts as growth (size-dependent, docs/science.md §1.3).

    Parameters
    ----------
    baseline_volume_ml : float
        Baseline GTV volume, mL.
    reference : {"baseline", "previous"}
        Change from baseline or from the previous follow-up.
    first_follow_up : bool
        Whether the current scan is the first follow-up (small GTVs: B-P1 vs B-P2 threshold).

    Returns
    -------
    float
        Relative threshold (fraction), never below :data:`VOLUME_MDC`.
    """
    if baseline_volume_ml <= 0:
        raise ValueError(f"baseline volume must be > 0 mL, got {baseline_volume_ml}")
    if reference not in ("baseline", "previous"):
        raise ValueError(f"reference must be 'baseline' or 'previous', got {reference!r}")
    if baseline_volume_ml < SMALL_GTV_ML:
        value = 0.372 if reference == "previous" else (0.420 if first_follow_up else 0.713)
    elif baseline_volume_ml <= LARGE_GTV_ML:
        value = VOLUME_MDC if reference == "previous" else 0.147
    else:
        value = 0.133
    return max(value, VOLUME_MDC)


def genant_grade(height_loss_pct: float) -> int:
    """Genant semi-quantitative grade (0-3) from vertebral body height loss, %."""
    grade = 0
    for threshold, g in GENANT_GRADES:
        if height_loss_pct >= threshold:
            grade = g
    return grade


def compression_fracture_status(
    height_loss_baseline_pct: float | None, height_loss_current_pct: float | None
) -> str | None:
    """``"new"``, ``"progressive"``, ``"none"``, or ``None`` when not measurable.

    New: Genant grade 0 at baseline and >= 1 now. Progressive: a pre-existing fracture whose
    Genant grade has increased (Sahgal 2013 reports new and progressive VCF separately).
    """
    if height_loss_baseline_pct is None or height_loss_current_pct is None:
        return None
    before, now = genant_grade(height_loss_baseline_pct), genant_grade(height_loss_current_pct)
    if before == 0 and now >= 1:
        return "new"
    if before >= 1 and now > before:
        return "progressive"
    return "none"


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100.0 * x, 3)


def _find(
    changes: Sequence[Change],
    quantity: str,
    reference: str = "baseline",
) -> Change | None:
    for change in changes:
        if change.quantity == quantity and change.reference == reference:
            return change
    return None


def assess_response(
    changes: Sequence[Change],
    *,
    days_since_treatment: int | None,
    previous_category: ResponseCategory | None = None,
    bilsky_baseline: str | None = None,
    bilsky_current: str | None = None,
    height_loss_baseline_pct: float | None = None,
    height_loss_current_pct: float | None = None,
    rule_set: str = RULE_SET_VERSION,
    lesion_not_delineated: str | None = None,
) -> ResponseAssessment:
    """Apply a rule set (default :data:`RULE_SET`) to one lesion at one follow-up.

    Parameters
    ----------
    changes : sequence of Change
        From :func:`processing.change.compute_changes`; uses ``volume`` (baseline and previous),
        ``max_axial_diameter``, ``epidural_volume``, ``vp.mean``, ``Ktrans.mean``, ``ADC.mean``.
        Changes marked not comparable are not used as evidence.
    days_since_treatment : int or None
        Days from the (first) treatment fraction to this follow-up.
    previous_category : ResponseCategory, optional
        The call at the previous follow-up (for confirmation of growth).
    bilsky_baseline, bilsky_current : str, optional
        Bilsky ESCC grades (``0``, ``1a``, ``1b``, ``1c``, ``2``, ``3``).
    height_loss_baseline_pct, height_loss_current_pct : float, optional
        Vertebral body height loss of the treated level, %.
    rule_set : str
        ``"2.0"`` (default) or ``"1.0"``, with or without the rule set's name.
    lesion_not_delineated : str, optional
        Why the lesion could not be delineated on this follow-up (the registration check failed,
        the refinement was not used: the baseline GTV was carried over unchanged), ``None`` when
        it was. Rule set 2.0 then measures no size change: a call that would be local control
        is not assessable (docs/science.md §1.12). Rule set 1.0 ignores it, as recorded.

    Returns
    -------
    ResponseAssessment
        The category, every criterion evaluated (fired or not, with value, threshold and, in
        2.0, source), the rule set name and version, a recommendation, epidural progression and
        fracture status; in 2.0 also where the functional evidence leans.
    """
    follow_up = _FollowUp(
        days_since_treatment,
        previous_category,
        bilsky_baseline,
        bilsky_current,
        height_loss_baseline_pct,
        height_loss_current_pct,
        lesion_not_delineated,
    )
    if rule_set_version(rule_set) == "1.0":
        return _assess_v1(changes, follow_up)
    return _assess_v2(changes, follow_up)


@dataclass(frozen=True)
class _FollowUp:
    """What a rule set knows of the follow-up besides the changes (see assess_response)."""

    days_since_treatment: int | None
    previous_category: ResponseCategory | None
    bilsky_baseline: str | None
    bilsky_current: str | None
    height_loss_baseline_pct: float | None
    height_loss_current_pct: float | None
    lesion_not_delineated: str | None = None


def _not_assessable(rule_set: str, fracture: str | None) -> ResponseAssessment:
    return ResponseAssessment(
        category=ResponseCategory.NOT_ASSESSABLE,
        criteria=(
            Criterion("baseline-volume", "baseline and follow-up GTV volumes are needed", False),
        ),
        rule_set=rule_set,
        recommendation="no baseline GTV volume: response not assessable",
        compression_fracture=fracture,
    )


def _size_criteria(
    changes: Sequence[Change],
    volume: Change,
    previous_category: ResponseCategory | None,
    criteria: list[Criterion],
) -> tuple[bool, bool]:
    """Volume, diameter and confirmation criteria: ``(size increase, growth confirmed)``."""
    assert volume.relative is not None
    previous_volume = _find(changes, "volume", "previous")
    first_follow_up = previous_volume is None
    base_threshold = volume_threshold(volume.reference_value, first_follow_up=first_follow_up)
    volume_up = volume.comparable and volume.relative > base_threshold
    criteria.append(
        Criterion(
            "volume-increase",
            f"GTV volume change from baseline above the size-dependent threshold "
            f"(baseline {volume.reference_value:.2f} mL; Sunnybrook thresholds, Neurosurgery 2021)",
            volume_up,
            _pct(volume.relative),
            _pct(base_threshold),
            "%",
        )
    )

    diameter = _find(changes, "max_axial_diameter")
    diameter_up = False
    if diameter is not None and diameter.relative is not None:
        diameter_up = (
            diameter.comparable
            and diameter.relative >= DIAMETER_INCREASE[0]
            and diameter.absolute >= DIAMETER_INCREASE[1]
        )
        criteria.append(
            Criterion(
                "diameter-increase",
                "maximum axial diameter +20 % and +5 mm or more from baseline "
                f"(RECIST 1.1 PD; absolute change {diameter.absolute:+.1f} mm)",
                diameter_up,
                _pct(diameter.relative),
                _pct(DIAMETER_INCREASE[0]),
                "%",
            )
        )
    size_up = volume_up or diameter_up

    growth_confirmed = False
    if previous_volume is not None and previous_volume.relative is not None:
        prev_threshold = volume_threshold(volume.reference_value, reference="previous")
        growing = previous_volume.comparable and previous_volume.relative > prev_threshold
        growth_confirmed = bool(
            size_up
            and growing
            and previous_category
            in (ResponseCategory.INDETERMINATE, ResponseCategory.LOCAL_PROGRESSION)
        )
        criteria.append(
            Criterion(
                "growth-confirmed",
                "size increase confirmed: previous call indeterminate or "
                "progression and volume growing beyond threshold from the previous scan",
                growth_confirmed,
                _pct(previous_volume.relative),
                _pct(prev_threshold),
                "%",
            )
        )
    return size_up, growth_confirmed


def _window_criterion(days_since_treatment: int | None, criteria: list[Criterion]) -> bool | None:
    """Whether the follow-up is inside the pseudoprogression window (``None``: unknown)."""
    low, high = PSEUDOPROGRESSION_WINDOW_DAYS
    in_window: bool | None = None
    if days_since_treatment is not None:
        in_window = low <= days_since_treatment <= high
    criteria.append(
        Criterion(
            "pseudoprogression-window",
            "follow-up 6-26 weeks after treatment (Amini 2016)",
            bool(in_window),
            None if days_since_treatment is None else round(days_since_treatment / 7.0, 1),
            high / 7.0,
            "wk",
        )
    )
    return in_window


def _fracture_criterion(
    fracture: str | None,
    height_loss_baseline_pct: float | None,
    height_loss_current_pct: float | None,
    criteria: list[Criterion],
) -> None:
    if fracture is None:
        return
    criteria.append(
        Criterion(
            "compression-fracture",
            f"vertebral compression fracture: {fracture} (Genant grade "
            f"{genant_grade(height_loss_baseline_pct or 0.0)} -> "
            f"{genant_grade(height_loss_current_pct or 0.0)})",
            fracture in ("new", "progressive"),
            height_loss_current_pct,
            GENANT_GRADES[0][0],
            "%",
        )
    )


@dataclass
class _Shared:
    """The criteria both rule sets evaluate alike (size, window, epidural), and their outcome."""

    criteria: list[Criterion]
    fracture: str | None
    size_up: bool
    growth_confirmed: bool
    in_window: bool | None
    epidural_progression: bool | None


def _shared_criteria(
    changes: Sequence[Change], follow_up: _FollowUp, rule_set: str
) -> ResponseAssessment | _Shared:
    """Size, window and epidural criteria; a not-assessable call without baseline volume."""
    volume = _find(changes, "volume")
    fracture = compression_fracture_status(
        follow_up.height_loss_baseline_pct, follow_up.height_loss_current_pct
    )
    if volume is None or volume.reference_value <= 0 or volume.relative is None:
        return _not_assessable(rule_set, fracture)

    criteria: list[Criterion] = []
    size_up, growth_confirmed = _size_criteria(
        changes, volume, follow_up.previous_category, criteria
    )
    in_window = _window_criterion(follow_up.days_since_treatment, criteria)
    epidural_progression = _epidural_progression(
        changes, follow_up.bilsky_baseline, follow_up.bilsky_current, criteria
    )
    return _Shared(criteria, fracture, size_up, growth_confirmed, in_window, epidural_progression)


def _assess_v1(changes: Sequence[Change], follow_up: _FollowUp) -> ResponseAssessment:
    """Rule set 1.0 (docs/science.md §1.11), unchanged since it was first recorded."""
    shared = _shared_criteria(changes, follow_up, RULE_SET_V1)
    if isinstance(shared, ResponseAssessment):
        return shared
    criteria, size_up = shared.criteria, shared.size_up

    vp = _find(changes, "vp.mean")
    ktrans = _find(changes, "Ktrans.mean")
    perfusion_down = perfusion_up = False
    perfusion_known = False
    for name, change in (("vp", vp), ("Ktrans", ktrans)):
        if change is None or change.relative is None or not change.comparable:
            continue
        perfusion_known = True
        fired = change.relative <= PERFUSION_DECREASE
        criteria.append(
            Criterion(
                f"perfusion-decrease-{name.lower()}",
                f"{name} mean {change.relative * 100:+.0f} % "
                "from baseline; a fall of 20 % or more is consistent with response (Kumar 2017)",
                fired,
                _pct(change.relative),
                _pct(PERFUSION_DECREASE),
                "%",
            )
        )
        if name == "vp" or vp is None or not vp.comparable:
            perfusion_down = perfusion_down or fired
        if name == "vp":
            perfusion_up = change.relative >= PERFUSION_INCREASE and (
                change.beyond_repeatability is not False
            )
            criteria.append(
                Criterion(
                    "perfusion-increase-vp",
                    "vp mean +20 % or more from baseline (local failures "
                    "+28 to +88 %, Kumar 2017, AJNR 2023)",
                    perfusion_up,
                    _pct(change.relative),
                    _pct(PERFUSION_INCREASE),
                    "%",
                )
            )

    adc = _find(changes, "ADC.mean")
    if adc is not None and adc.relative is not None and adc.comparable:
        criteria.append(
            Criterion(
                "adc-increase",
                "ADC mean +25 % or more from baseline, supporting response (Messiou 2011)",
                adc.relative >= ADC_INCREASE,
                _pct(adc.relative),
                _pct(ADC_INCREASE),
                "%",
            )
        )
    _fracture_criterion(
        shared.fracture,
        follow_up.height_loss_baseline_pct,
        follow_up.height_loss_current_pct,
        criteria,
    )

    recommendation: str | None = None
    if shared.epidural_progression:
        category = ResponseCategory.LOCAL_PROGRESSION
        recommendation = PROGRESSION_RECOMMENDATION
    elif size_up and (shared.growth_confirmed or shared.in_window is False):
        category = ResponseCategory.LOCAL_PROGRESSION
        recommendation = PROGRESSION_RECOMMENDATION
    elif size_up and perfusion_up:
        category = ResponseCategory.LOCAL_PROGRESSION
        recommendation = PROGRESSION_RECOMMENDATION
    elif size_up:
        category = ResponseCategory.INDETERMINATE
        recommendation = CONFIRMATION_RECOMMENDATION
        if shared.in_window is None:
            recommendation += "; time since treatment unknown"
        if not perfusion_known:
            recommendation += "; no comparable perfusion data"
        elif not perfusion_down:
            recommendation += "; perfusion has not fallen"
    else:
        category = ResponseCategory.LOCAL_CONTROL
    logger.info(
        "response %s by %s (%d criteria, %d fired)",
        category.value,
        RULE_SET_V1,
        len(criteria),
        sum(c.fired for c in criteria),
    )
    return ResponseAssessment(
        category=category,
        criteria=tuple(criteria),
        rule_set=RULE_SET_V1,
        recommendation=recommendation,
        epidural_progression=shared.epidural_progression,
        compression_fracture=shared.fracture,
    )


def _beyond(change: Change) -> bool:
    """Whether a comparable change exceeds its repeatability coefficient (unknown: no)."""
    return bool(change.comparable and change.beyond_repeatability)


def _cut_off_criterion(
    change: Change, code: str, description: str, cut_off: float, *, rising: bool
) -> Criterion:
    """A change beyond both a literature cut-off and its repeatability, in one direction.

    ``rising``: fired when ``relative >= cut_off``; else when ``relative <= cut_off``; either
    way only when the (comparable) change is beyond its combined repeatability coefficient. The
    threshold reported is the effective one: the larger in size of the cut-off and the
    coefficient (:attr:`processing.results.Change.repeatability`).
    """
    assert change.relative is not None
    rc = change.repeatability or 0.0
    if rising:
        fired = change.relative >= cut_off and _beyond(change)
        threshold = max(cut_off, rc)
    else:
        fired = change.relative <= cut_off and _beyond(change)
        threshold = -max(-cut_off, rc)
    return Criterion(code, description, fired, _pct(change.relative), _pct(threshold), "%")


@dataclass
class _Evidence:
    """Rule set 2.0's functional evidence: the quantities (with their changes) that show viable
    tumour or treatment effect, and which kinds of data were there to show it."""

    viable: list[str]
    effect: list[str]
    perfusion_known: bool = False
    adc_known: bool = False
    perfusion_viable: bool = False
    adc_viable: bool = False

    def weigh(
        self, label: str, viable: Criterion, effect: Criterion, criteria: list[Criterion]
    ) -> bool:
        """Append one quantity's two criteria (viable tumour, then treatment effect) and record
        ``label`` under whichever fired; whether the viable-tumour one fired."""
        criteria += [viable, effect]
        if viable.fired:
            self.viable.append(label)
        if effect.fired:
            self.effect.append(label)
        return viable.fired


def _functional_evidence(changes: Sequence[Change], criteria: list[Criterion]) -> _Evidence:
    """Weigh the perfusion quantities and the ADC median; one criterion per direction each.

    Criteria are appended fired or not (perfusion: rise, then fall; ADC: fall, then rise).
    """
    evidence = _Evidence([], [])
    for name in PERFUSION_QUANTITIES:
        change = _find(changes, f"{name}.mean")
        if change is None or change.relative is None or not change.comparable:
            continue
        evidence.perfusion_known = True
        label = f"{name} {change.relative * 100:+.0f} %"
        rise = _cut_off_criterion(
            change,
            f"perfusion-rise-{name.lower()}",
            f"{name} mean +20 % or more from baseline, beyond repeatability: viable tumour",
            PERFUSION_INCREASE,
            rising=True,
        )
        fall = _cut_off_criterion(
            change,
            f"perfusion-fall-{name.lower()}",
            f"{name} mean -20 % or more from baseline, beyond repeatability: treatment effect",
            PERFUSION_DECREASE,
            rising=False,
        )
        if evidence.weigh(label, rise, fall, criteria):
            evidence.perfusion_viable = True
    adc = _find(changes, f"ADC.{ADC_STATISTIC}")
    if adc is not None and adc.relative is not None and adc.comparable:
        evidence.adc_known = True
        label = f"ADC {adc.relative * 100:+.0f} %"
        fall = _cut_off_criterion(
            adc,
            "adc-fall",
            f"ADC {ADC_STATISTIC} fall from baseline beyond repeatability: viable tumour",
            0.0,
            rising=False,
        )
        rise = _cut_off_criterion(
            adc,
            "adc-rise",
            f"ADC {ADC_STATISTIC} +25 % or more from baseline, beyond repeatability: "
            "treatment effect",
            ADC_INCREASE,
            rising=True,
        )
        if evidence.weigh(label, fall, rise, criteria):
            evidence.adc_viable = True
    return evidence


def _leaning(viable: Sequence[str], effect: Sequence[str]) -> str:
    if viable and effect:
        return "mixed"
    if viable:
        return "progression"
    if effect:
        return "treatment effect"
    return "none"


def _with_source(criterion: Criterion) -> Criterion:
    for prefix, source in SOURCES.items():
        if criterion.code.startswith(prefix):
            return replace(criterion, source=source)
    return criterion


def _assess_v2(changes: Sequence[Change], follow_up: _FollowUp) -> ResponseAssessment:
    """Rule set 2.0 (docs/science.md §1.12): size and window as 1.0, functional evidence weighed."""
    rule_set = f"{RULE_SET_NAME} 2.0"
    shared = _shared_criteria(changes, follow_up, rule_set)
    if isinstance(shared, ResponseAssessment):
        return shared
    criteria = shared.criteria
    # a lesion not delineated on the follow-up (the registration check failed, or the baseline
    # GTV was carried over) has no trustworthy size: its size and epidural criteria are listed
    # but decide nothing
    delineated = follow_up.lesion_not_delineated is None
    size_up = shared.size_up and delineated
    epidural_progression = shared.epidural_progression if delineated else None
    found = _functional_evidence(changes, criteria)
    viable, effect = found.viable, found.effect
    leaning = _leaning(viable, effect)
    if size_up and leaning == "none":
        # growth without any evidence of treatment effect leans to progression; the
        # confirmation scan settles it
        leaning = "progression"
    functional_progression = (
        found.perfusion_viable and found.adc_viable and not effect and not size_up
    )
    if found.perfusion_known and found.adc_known:
        criteria.append(
            Criterion(
                "functional-progression",
                "viable-tumour evidence from perfusion and diffusion together, no size increase",
                functional_progression,
            )
        )
    _fracture_criterion(
        shared.fracture,
        follow_up.height_loss_baseline_pct,
        follow_up.height_loss_current_pct,
        criteria,
    )

    evidence = {
        "progression": f"viable-tumour evidence ({', '.join(viable)})"
        if viable
        else "a size increase without evidence of treatment effect",
        "treatment effect": f"treatment-effect evidence ({', '.join(effect)})",
        "mixed": f"mixed evidence ({', '.join(viable)} against {', '.join(effect)})",
        "none": "no functional change beyond repeatability",
    }[leaning]
    recommendation: str | None = None
    if epidural_progression or (size_up and (shared.growth_confirmed or shared.in_window is False)):
        category = ResponseCategory.LOCAL_PROGRESSION
        recommendation = PROGRESSION_RECOMMENDATION
    elif size_up and shared.in_window and viable and not effect:
        category = ResponseCategory.LOCAL_PROGRESSION
        recommendation = f"{PROGRESSION_RECOMMENDATION}: size increase with {evidence}"
    elif size_up:
        category = ResponseCategory.INDETERMINATE
        recommendation = (
            f"{CONFIRMATION_RECOMMENDATION}; leans to {leaning}: {evidence}; {_SETTLE[leaning]}"
        )
        if shared.in_window is None:
            recommendation += "; time since treatment unknown"
        if not found.perfusion_known:
            recommendation += "; no comparable perfusion data (DCE)"
    elif functional_progression:
        category = ResponseCategory.INDETERMINATE
        recommendation = (
            f"follow-up MRI in 6-8 weeks: {evidence} without a size increase; "
            "watch the GTV volume and vp"
        )
    else:
        category = ResponseCategory.LOCAL_CONTROL
    if follow_up.lesion_not_delineated is not None:
        # the baseline GTV carried over unchanged has the baseline's size: no size change was
        # measured, so the absence of growth says nothing
        criteria.append(
            Criterion(
                "lesion-not-delineated",
                f"lesion not delineated on the follow-up ({follow_up.lesion_not_delineated}): "
                "size and epidural changes not measured",
                True,
            )
        )
        if category is ResponseCategory.LOCAL_CONTROL:
            category = ResponseCategory.NOT_ASSESSABLE
            recommendation = (
                "radiologist review of the lesion's size on the follow-up images (the node "
                f"could not delineate it); functional evidence leans to {leaning}: {evidence}"
            )
            if shared.size_up or shared.epidural_progression:
                recommendation += (
                    "; the size measured on the undelineated lesion suggests growth, "
                    "which only the review can confirm"
                )
        elif recommendation is not None:
            recommendation += "; size not measured (lesion not delineated on the follow-up)"
    logger.info(
        "response %s by %s (%d criteria, %d fired, leaning %s)",
        category.value,
        rule_set,
        len(criteria),
        sum(c.fired for c in criteria),
        leaning,
    )
    return ResponseAssessment(
        category=category,
        criteria=tuple(_with_source(c) for c in criteria),
        rule_set=rule_set,
        recommendation=recommendation,
        epidural_progression=epidural_progression,
        compression_fracture=shared.fracture,
        leaning=leaning,
    )


def _epidural_progression(
    changes: Sequence[Change],
    bilsky_baseline: str | None,
    bilsky_current: str | None,
    criteria: list[Criterion],
) -> bool | None:
    """Epidural progression (SPINO b) from epidural volume and/or Bilsky grades; None if unknown."""
    result: bool | None = None
    epidural = _find(changes, "epidural_volume")
    if epidural is not None and epidural.comparable:
        if epidural.reference_value < EPIDURAL_MIN_ML:
            fired = epidural.value >= EPIDURAL_MIN_ML
            description = (
                f"new epidural tumour: {epidural.value:.2f} mL now, "
                f"{epidural.reference_value:.2f} mL at baseline"
            )
            criteria.append(
                Criterion("epidural-new", description, fired, epidural.value, EPIDURAL_MIN_ML, "mL")
            )
        else:
            fired = bool(
                epidural.relative is not None
                and epidural.relative > VOLUME_MDC
                and epidural.absolute >= EPIDURAL_MIN_ML
            )
            criteria.append(
                Criterion(
                    "epidural-increase",
                    "epidural tumour volume increase beyond the volume MDC "
                    f"(10.9 %) and >= {EPIDURAL_MIN_ML} mL",
                    fired,
                    _pct(epidural.relative),
                    _pct(VOLUME_MDC),
                    "%",
                )
            )
        result = fired
    if bilsky_baseline is not None and bilsky_current is not None:
        try:
            before = BILSKY_ORDER.index(bilsky_baseline)
            now = BILSKY_ORDER.index(bilsky_current)
        except ValueError as err:
            raise ValueError(f"Bilsky grade must be one of {BILSKY_ORDER}") from err
        fired = now > before
        criteria.append(
            Criterion(
                "bilsky-increase",
                f"Bilsky ESCC grade {bilsky_baseline} -> {bilsky_current}",
                fired,
                float(now),
                float(before),
                None,
            )
        )
        result = bool(result) or fired
    return result
