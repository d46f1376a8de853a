"""processing.response: the rule set on the phantom scenarios (synthetic measurements and
images)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from processing.change import compute_changes
from processing.measure import measure_lesion
from processing.response import (
    RULE_SET,
    assess_response,
    compression_fracture_status,
    volume_threshold,
)
from processing.results import LesionMeasurements, MapStatistics, ResponseCategory

LC, LP = ResponseCategory.LOCAL_CONTROL, ResponseCategory.LOCAL_PROGRESSION
IND = ResponseCategory.INDETERMINATE

#: the phantom's scenario multipliers (processing/phantom SCENARIO_CHANGES, issue 3): volume,
#: diffusivity, Ktrans, vp, epidural component; and the days of the follow-ups
SCENARIOS = {
    "responder": [
        dict(volume=0.70, d=1.35, ktrans=0.40, vp=0.40, epidural=False),
        dict(volume=0.60, d=1.40, ktrans=0.35, vp=0.35, epidural=False),
    ],
    "progression": [
        dict(volume=1.40, d=0.95, ktrans=1.30, vp=1.20, epidural=True),
        dict(volume=1.90, d=0.92, ktrans=1.40, vp=1.30, epidural=True),
    ],
    "pseudoprogression": [
        dict(volume=1.20, d=1.20, ktrans=0.70, vp=0.40, epidural=False),
        dict(volume=0.95, d=1.30, ktrans=0.50, vp=0.35, epidural=False),
    ],
    "stable": [
        dict(volume=1.02, d=1.03, ktrans=0.95, vp=0.95, epidural=False),
        dict(volume=1.00, d=1.04, ktrans=0.95, vp=0.95, epidural=False),
    ],
}
EXPECTED = {
    "responder": [LC, LC],
    "progression": [LP, LP],
    "pseudoprogression": [IND, LC],
    "stable": [LC, LC],
}
DAYS = (84, 182)


def _stats(quantity: str, value: float) -> MapStatistics:
    return MapStatistics(quantity, "1", 500, value, value, 0.1 * value, 0.8 * value, 1.2 * value)


def _measurements(volume=1.0, d=1.0, ktrans=1.0, vp=1.0, epidural=False) -> LesionMeasurements:
    diameter = 24.0 * volume ** (1 / 3)
    return LesionMeasurements(
        volume_ml=6.5 * volume,
        max_axial_diameter_mm=diameter,
        epidural_volume_ml=0.6 * volume if epidural else 0.0,
        map_statistics={
            "ADC": _stats("ADC", 0.85e-3 * d),
            "Ktrans": _stats("Ktrans", 0.25 * ktrans),
            "vp": _stats("vp", 0.08 * vp),
        },
    )


def _crit(assessment, code):
    return {c.code: c for c in assessment.criteria}[code]


@pytest.mark.parametrize("version", ["1.0", "2.0"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_phantom_scenarios_give_the_expected_calls(scenario, version):
    baseline = _measurements(volume=1.0)
    previous, previous_call = None, None
    for step, days, expected in zip(SCENARIOS[scenario], DAYS, EXPECTED[scenario]):
        current = _measurements(**step)
        changes = compute_changes(current, baseline, previous)
        call = assess_response(
            changes, days_since_treatment=days, previous_category=previous_call, rule_set=version
        )
        assert call.category == expected, (scenario, days, call)
        assert call.rule_set == f"spine-sbrt-response {version}"
        assert RULE_SET == "spine-sbrt-response 2.0"  # the default
        previous, previous_call = current, call.category
        if scenario == "progression":
            assert call.epidural_progression is True
            assert _crit(call, "epidural-new").fired
        else:
            assert call.epidural_progression is False


def test_pseudoprogression_is_indeterminate_with_perfusion_evidence_listed():
    baseline = _measurements()
    current = _measurements(volume=1.20, d=1.20, ktrans=0.70, vp=0.40)
    call = assess_response(
        compute_changes(current, baseline), days_since_treatment=84, rule_set="1.0"
    )
    assert call.category == IND
    assert "confirmation MRI in 6-8 weeks" in call.recommendation
    volume = _crit(call, "volume-increase")
    assert volume.fired and volume.value == pytest.approx(20.0) and volume.threshold == 14.7
    vp = _crit(call, "perfusion-decrease-vp")
    assert vp.fired and vp.value == pytest.approx(-60.0) and vp.threshold == -20.0
    assert _crit(call, "perfusion-decrease-ktrans").value == pytest.approx(-30.0)
    assert not _crit(call, "perfusion-increase-vp").fired
    assert _crit(call, "pseudoprogression-window").fired
    assert _crit(call, "pseudoprogression-window").value == 12.0
    assert not _crit(call, "adc-increase").fired  # +20 % < 25 %


def test_growth_outside_the_window_confirmed_or_with_rising_perfusion_is_progression():
    baseline = _measurements()
    grown = _measurements(volume=1.40)
    late = assess_response(compute_changes(grown, baseline), days_since_treatment=273)
    assert late.category == LP and not _crit(late, "pseudoprogression-window").fired
    rising = _measurements(volume=1.40, vp=1.5)
    assert (
        assess_response(compute_changes(rising, baseline), days_since_treatment=70).category == LP
    )
    previous = _measurements(volume=1.20, vp=0.9)
    confirmed = assess_response(
        compute_changes(grown, baseline, previous), days_since_treatment=150, previous_category=IND
    )
    assert confirmed.category == LP and _crit(confirmed, "growth-confirmed").fired
    unknown_time = assess_response(compute_changes(grown, baseline), days_since_treatment=None)
    assert unknown_time.category == IND and "unknown" in unknown_time.recommendation


def test_size_dependent_thresholds_and_not_comparable_perfusion():
    assert volume_threshold(1.5) == 0.42
    assert volume_threshold(1.5, first_follow_up=False) == 0.713
    assert volume_threshold(1.5, reference="previous") == 0.372
    assert volume_threshold(5.0) == 0.147
    assert volume_threshold(5.0, reference="previous") == 0.109
    assert volume_threshold(12.0) == 0.133
    small = LesionMeasurements(volume_ml=1.5)
    assert (
        assess_response(
            compute_changes(LesionMeasurements(volume_ml=1.95), small), days_since_treatment=300
        ).category
        == LC
    )  # +30 % < 42 %
    baseline = _measurements()
    current = _measurements(volume=1.20, vp=0.40)
    changes = compute_changes(current, baseline, not_comparable=["vp", "Ktrans"])
    for version in ("1.0", "2.0"):
        call = assess_response(changes, days_since_treatment=84, rule_set=version)
        assert call.category == IND
        assert "no comparable perfusion data" in call.recommendation
        assert not any(c.code.startswith("perfusion") for c in call.criteria)


def test_fracture_and_bilsky_reported_separately_and_not_assessable():
    assert compression_fracture_status(5.0, 30.0) == "new"
    assert compression_fracture_status(22.0, 27.0) == "progressive"
    assert compression_fracture_status(22.0, 23.0) == "none"
    assert compression_fracture_status(None, 30.0) is None
    baseline, current = _measurements(), _measurements(volume=0.8, vp=0.5)
    call = assess_response(
        compute_changes(current, baseline),
        days_since_treatment=120,
        height_loss_baseline_pct=5.0,
        height_loss_current_pct=30.0,
        bilsky_baseline="1a",
        bilsky_current="1a",
    )
    assert call.category == LC and call.compression_fracture == "new"
    assert _crit(call, "compression-fracture").fired
    bilsky = assess_response(
        compute_changes(current, baseline),
        days_since_treatment=120,
        bilsky_baseline="1a",
        bilsky_current="2",
    )
    assert bilsky.category == LP and bilsky.epidural_progression
    none = assess_response((), days_since_treatment=90)
    assert none.category == ResponseCategory.NOT_ASSESSABLE


def _sphere_case(volume_ml: float, vp: float, adc: float, epidural: bool):
    """Images: a spherical lesion of the given volume with uniform vp and ADC maps, 1 mm grid."""
    zz, yy, xx = np.mgrid[:48, :48, :48]
    radius = (3 * volume_ml * 1000 / (4 * np.pi)) ** (1 / 3)
    lesion = ((zz - 24) ** 2 + (yy - 24) ** 2 + (xx - 24) ** 2) <= radius**2
    ep = np.zeros_like(lesion)
    if epidural:
        ep[24:30, 40:44, 20:28] = True

    def img(a):
        im = sitk.GetImageFromArray(a)
        im.SetSpacing((1.0, 1.0, 1.0))
        return im

    maps = {"vp": img(np.full(lesion.shape, vp)), "ADC": img(np.full(lesion.shape, adc))}
    return measure_lesion(
        img(lesion.astype(np.uint8)), maps, epidural_mask=img(ep.astype(np.uint8))
    )


def test_scenarios_from_images_through_measure_change_response():
    baseline = _sphere_case(6.5, vp=0.08, adc=0.85e-3, epidural=False)
    pseudo = _sphere_case(6.5 * 1.2, vp=0.08 * 0.4, adc=0.85e-3 * 1.2, epidural=False)
    progression = _sphere_case(6.5 * 1.4, vp=0.08 * 1.2, adc=0.85e-3 * 0.95, epidural=True)
    responder = _sphere_case(6.5 * 0.7, vp=0.08 * 0.4, adc=0.85e-3 * 1.35, epidural=False)
    cases = (("pseudo", pseudo), ("progression", progression), ("responder", responder))
    calls = {
        name: assess_response(compute_changes(m, baseline), days_since_treatment=84, rule_set="1.0")
        for name, m in cases
    }
    assert calls["pseudo"].category == IND
    assert _crit(calls["pseudo"], "perfusion-decrease-vp").value == pytest.approx(-60.0)
    assert calls["progression"].category == LP and calls["progression"].epidural_progression
    assert calls["responder"].category == LC
    assert _crit(calls["responder"], "adc-increase").fired
    v2 = {
        name: assess_response(compute_changes(m, baseline), days_since_treatment=84)
        for name, m in cases
    }
    assert v2["pseudo"].category == IND and v2["pseudo"].leaning == "treatment effect"
    assert _crit(v2["pseudo"], "perfusion-fall-vp").fired
    assert v2["progression"].category == LP and v2["progression"].epidural_progression
    assert v2["responder"].category == LC and v2["responder"].leaning == "treatment effect"
    assert _crit(v2["responder"], "adc-rise").fired  # +35 % > max(25 %, 12.9 %)


# --- with the phantom (processing.phantom, issue 3): ground-truth tumour values per study ------


def _truth_measurements(truth: dict) -> LesionMeasurements:
    tumour = truth["tumour"]
    means = tumour["means"]
    adc = tumour["adc_by_bvalues"]["b50-1000"]["adc_mm2_s"]
    return LesionMeasurements(
        volume_ml=tumour["volume_ml_continuous"],
        epidural_volume_ml=tumour["epidural_volume_ml"],
        map_statistics={
            "ADC": _stats("ADC", adc),
            "Ktrans": _stats("Ktrans", means["Ktrans"]),
            "vp": _stats("vp", means["vp"]),
        },
    )


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["responder", "stable", "progression", "pseudoprogression"])
def test_phantom_scenarios_ground_truth_give_the_phantoms_expected_call(scenario, make_phantom):
    folder = make_phantom(scenario, "standard", "small")
    studies = json.loads((folder / "ground_truth.json").read_text())["studies"]
    baseline = _truth_measurements(studies["baseline"])
    follow_up = studies["followup1"]
    call = assess_response(
        compute_changes(_truth_measurements(follow_up), baseline),
        days_since_treatment=follow_up["days_since_treatment"],
    )
    assert call.category.value == follow_up["expected_response"]
    if scenario == "pseudoprogression":
        assert follow_up["days_since_treatment"] == 84
        vp = _crit(call, "perfusion-fall-vp")
        assert vp.fired and vp.value < -50
        assert call.leaning == "treatment effect"
        assert _crit(call, "volume-increase").fired
    if scenario == "progression":
        assert call.epidural_progression is True


# --- rule set 2.0: functional evidence weighed against the combined repeatability --------------


def _call(version="2.0", days=84, **step):
    changes = compute_changes(
        _measurements(**step), _measurements(), published_repeatability=version != "1.0"
    )
    return assess_response(changes, days_since_treatment=days, rule_set=version)


def test_v2_growth_in_the_window_with_an_adc_fall_beyond_repeatability_is_progression():
    call = _call(volume=1.30, d=0.80)  # ADC -20 % > 12.9 %; perfusion unchanged
    assert call.category == LP and call.leaning == "progression"
    fall = _crit(call, "adc-fall")
    assert fall.fired and fall.value == pytest.approx(-20.0) and fall.threshold == -12.9
    assert "viable-tumour evidence (ADC -20 %)" in call.recommendation
    # 1.0 weighed only a vp rise: indeterminate
    assert _call("1.0", volume=1.30, d=0.80).category == IND


def test_v2_a_perfusion_rise_within_repeatability_is_not_evidence():
    call = _call(volume=1.30, vp=1.25)  # +25 %: above Kumar's 20 %, within 38.5 %
    # growth alone, inside the window: indeterminate, leaning to progression
    assert call.category == IND and call.leaning == "progression"
    rise = _crit(call, "perfusion-rise-vp")
    assert not rise.fired and rise.threshold == 38.5
    assert "leans to progression: a size increase without evidence of treatment effect" in (
        call.recommendation
    )
    assert "growth beyond threshold at the confirmation scan confirms" in call.recommendation
    # no size increase, no functional change beyond repeatability: nothing to lean on
    assert _call(volume=1.05, vp=1.25).leaning == "none"
    # 1.0 called the same +25 % progression
    assert _call("1.0", volume=1.30, vp=1.25).category == LP


def test_v2_mixed_evidence_is_indeterminate_and_says_what_to_watch():
    call = _call(volume=1.30, vp=1.50, d=1.30)  # vp +50 % (viable) against ADC +30 % (effect)
    assert call.category == IND and call.leaning == "mixed"
    assert "vp +50 % against ADC +30 %" in call.recommendation
    assert "watch vp and the ADC median" in call.recommendation
    # outside the window growth is progression whatever the functional evidence
    assert _call(days=300, volume=1.30, vp=1.50, d=1.30).category == LP


def test_v2_functional_progression_without_growth_is_indeterminate_never_progression():
    both = _call(volume=1.0, vp=1.50, d=0.80)
    assert both.category == IND and both.leaning == "progression"
    assert _crit(both, "functional-progression").fired
    assert "without a size increase" in both.recommendation
    one = _call(volume=1.0, vp=1.50)  # perfusion alone: reported, local control
    assert one.category == LC and one.leaning == "progression"
    assert not _crit(one, "functional-progression").fired


def test_v2_every_criterion_names_its_source_and_the_version_is_recorded():
    call = _call(volume=1.30, vp=0.40, d=1.30, epidural=True)
    assert call.rule_set == "spine-sbrt-response 2.0"
    assert all(c.source for c in call.criteria), [c.code for c in call.criteria if not c.source]
    assert _crit(call, "pseudoprogression-window").source.startswith("Amini 2016")
    assert _crit(call, "perfusion-fall-vp").source.startswith("Kumar 2017")
    assert all(c.source is None for c in _call("1.0", volume=1.30).criteria)
    assert assess_response((), days_since_treatment=1, rule_set="spine-sbrt-response 1.0").rule_set
    with pytest.raises(ValueError, match="unknown response rule set"):
        _call("3.0")


def test_v2_a_lesion_not_delineated_on_the_follow_up_is_never_local_control():
    """The baseline GTV carried over unchanged (refinement not used, registration check failed)
    keeps the baseline's size: no growth is measured, so no local control is called on it."""
    changes = compute_changes(_measurements(volume=1.0, vp=0.40), _measurements())
    reason = "refinement not used; registration check failed: overlap 0.43 < 0.80"
    call = assess_response(changes, days_since_treatment=200, lesion_not_delineated=reason)
    assert call.category == ResponseCategory.NOT_ASSESSABLE
    assert call.leaning == "treatment effect"  # the functional evidence is still weighed
    criterion = _crit(call, "lesion-not-delineated")
    assert criterion.fired and reason in criterion.description and criterion.source
    assert "radiologist review of the lesion's size" in call.recommendation
    # the same changes with the lesion delineated: local control
    assert assess_response(changes, days_since_treatment=200).category == LC
    # a size increase measured on an undelineated lesion decides nothing: not assessable, the
    # review asked for (delineated, the same increase outside the window is local progression)
    grown = compute_changes(_measurements(volume=1.6), _measurements())
    call = assess_response(grown, days_since_treatment=200, lesion_not_delineated=reason)
    assert call.category == ResponseCategory.NOT_ASSESSABLE, call.recommendation
    assert "suggests growth, which only the review can confirm" in call.recommendation
    assert _crit(call, "volume-increase").fired  # listed as measured
    assert assess_response(grown, days_since_treatment=200).category == LP
    # functional progression stays indeterminate, its recommendation saying the size is unknown
    both = compute_changes(_measurements(volume=1.0, vp=1.50, d=0.80), _measurements())
    call = assess_response(both, days_since_treatment=200, lesion_not_delineated=reason)
    assert call.category == IND and "size not measured" in call.recommendation
    # rule set 1.0 ignores it, as it was recorded
    v1 = assess_response(
        compute_changes(_measurements(), _measurements(), published_repeatability=False),
        days_since_treatment=200,
        rule_set="1.0",
        lesion_not_delineated=reason,
    )
    assert v1.category == LC
