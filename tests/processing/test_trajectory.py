"""processing.phantom.trajectory: randomised courses drawn from the documented ranges, and the
phantom patients they make (issue 16, randomised cohort)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from processing.phantom import generate_patient
from processing.phantom.trajectory import (
    BASELINE_VOLUME_ML,
    COURSES,
    LAST_FOLLOWUP_DAYS,
    random_trajectory,
)
from processing.response import volume_threshold

SEEDS = range(1000, 1200)


def test_courses_are_deterministic_balanced_and_within_their_ranges():
    trajectories = [random_trajectory(s) for s in SEEDS]
    assert random_trajectory(1000) == trajectories[0]
    assert Counter(t.course for t in trajectories) == {c: 50 for c in COURSES}
    growth = Counter(t.growth for t in trajectories if t.course == "progression")
    assert sorted(growth.values()) == [16, 17, 17] and set(growth) == {
        "central",
        "eccentric",
        "epidural",
    }
    volumes = [t.baseline_volume_ml for t in trajectories]
    assert BASELINE_VOLUME_ML[0] <= min(volumes) and max(volumes) <= BASELINE_VOLUME_ML[1]
    assert min(volumes) < 1.5 and max(volumes) > 20  # the range is covered
    assert {len(t.followups) for t in trajectories} == {1, 2, 3, 4}
    for t in trajectories:
        days = [f.days for f in t.followups]
        assert days == sorted(days) and 28 <= days[0] and days[-1] <= LAST_FOLLOWUP_DAYS
        for f in t.followups:
            assert 0.3 <= f.volume <= 2.0 + 1e-9
            if t.course == "responder":
                assert f.state == "control" and f.volume < 1 and f.adc > 1 and f.vp < 1
            elif t.course == "stable":
                assert f.state == "control" and 0.92 <= f.volume <= 1.06
                assert 0.9 <= f.adc <= 1.1 and 0.9 <= f.vp <= 1.1
            elif t.course == "pseudoprogression":
                assert 42 <= days[0] <= 150  # inside the 6-26-week window
                first = f is t.followups[0]
                assert f.state == ("pseudoprogression" if first else "control")
                grown = 1 + volume_threshold(t.baseline_volume_ml) + 0.05
                assert (f.volume >= grown - 1e-3) if first else (f.volume <= 1.0)
                assert f.vp < 1 and f.adc > 1  # treated tumour: perfusion down, ADC up
            else:
                assert f.state in ("control", "progression")
                if f.state == "progression":  # beyond the size threshold (up to +100 %)
                    threshold = volume_threshold(t.baseline_volume_ml, first_follow_up=True)
                    assert f.volume >= min(2.0, 1 + threshold) - 1e-3
                    assert f.adc <= 1.0 and f.vp >= 1.0
                    assert f.epidural == (t.growth == "epidural")
                    assert f.eccentric == (t.growth == "eccentric")
        states = [f.state for f in t.followups]
        if t.course == "progression":  # control until the onset, progression from then on
            onset = states.index("progression")
            assert set(states[onset:]) == {"progression"} and "progression" not in states[:onset]


@pytest.mark.slow
def test_an_eccentric_progression_grows_towards_the_posterior_elements():
    seed = next(
        s
        for s in range(1000, 1100)
        if random_trajectory(s).growth == "eccentric" and len(random_trajectory(s).followups) == 1
    )
    trajectory = random_trajectory(seed)
    patient = generate_patient(
        seed=seed, scenario="progression", size="small", trajectory=trajectory
    )
    studies = patient.ground_truth["studies"]
    base, follow_up = studies["baseline"]["tumour"], studies["followup1"]["tumour"]
    state = trajectory.followups[0]
    assert base["volume_ml_continuous"] == pytest.approx(trajectory.baseline_volume_ml, rel=0.01)
    assert follow_up["volume_ml_continuous"] == pytest.approx(
        trajectory.baseline_volume_ml * state.volume, rel=0.01
    )
    assert studies["followup1"]["true_state"] == "progression"
    assert "expected_response" not in studies["followup1"]
    # the centre moved back (+y, towards the canal) by the growth of the AP semi-axis
    c0 = np.asarray(base["shape"]["centre"])
    c1 = np.asarray(follow_up["shape"]["centre"])
    grown = (state.volume ** (1 / 3) - 1) * base["shape"]["radii"][1]
    assert c1 - c0 == pytest.approx([0.0, grown, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="not the trajectory"):
        generate_patient(seed=seed, scenario="responder", size="small", trajectory=trajectory)
