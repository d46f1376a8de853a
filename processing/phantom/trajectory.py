"""Randomised courses of a treated lesion for the phantom cohort (issue 16).

The four fixed scenarios of :mod:`processing.phantom.patient` are one point each. A
:class:`Trajectory` draws a whole course from ranges instead, a deterministic function of its
seed:

* baseline GTV 1-30 mL (log-uniform; spine SBRT GTVs of the Sunnybrook series, docs/science.md
  §1.3, span about this range);
* 1-4 follow-ups, the first 4-26 weeks after treatment, then every 8-16 weeks, none later than
  60 weeks;
* the true course, cycling with the seed (so that consecutive seeds are balanced):

  - **responder**: the GTV shrinks to 30-90 % by the last follow-up; ADC rises by 10-60 %,
    vp and Ktrans fall to 20-80 % (Kumar 2017: vp -76 %, Ktrans -66 % without recurrence;
    Messiou 2011: ADC rises in responders);
  - **stable**: GTV 92-106 % of baseline, functional changes within ±10 %;
  - **progression**: stable until an onset follow-up, then growth beyond the size-dependent
    threshold (docs/science.md §1.3: 13.3-71.3 %) by a further 5-45 %, and by 10-50 % at each
    later follow-up, up to twice the baseline volume (a lesion growing less than the minimum
    detectable difference is not measurably progressing); ADC 75-100 %, vp 100-190 % and Ktrans
    90-180 % of baseline
    (Kumar 2017: vp +28 % in recurrences; AJNR 2023: +88 %); the growth is central, eccentric
    (towards the posterior elements) or with a new epidural component, cycling with the seed;
  - **pseudoprogression**: the first follow-up inside the 6-26-week window grows beyond the
    size threshold by a further 5-30 % with ADC 105-140 %, vp 30-80 % and Ktrans 40-90 % of
    baseline (Amini 2016; the perfusion of treated tumour falls), then shrinks to 70-100 % at
    later follow-ups.

Each follow-up carries its true state (``progression`` or ``control``; a pseudoprogression's
enlarged follow-up is ``pseudoprogression``, whose outcome is control) and the call the phantom
expects from rule set 2.0 is *not* recorded here: the cohort report compares the node's call with
the true state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from processing.response import volume_threshold

#: the courses drawn, in equal parts (names of :data:`processing.phantom.patient.SCENARIOS`)
COURSES = ("responder", "stable", "progression", "pseudoprogression")
#: how a progressing lesion grows
GROWTH_KINDS = ("central", "eccentric", "epidural")
BASELINE_VOLUME_ML = (1.0, 30.0)
FIRST_FOLLOWUP_DAYS = (28, 182)
LAST_FOLLOWUP_DAYS = 420
#: the pseudoprogression window (processing.response.PSEUDOPROGRESSION_WINDOW_DAYS)
_WINDOW = (42, 182)


@dataclass(frozen=True)
class FollowUpState:
    """The lesion at one follow-up: multipliers of its baseline values and its true state."""

    days: int
    volume: float
    adc: float
    ktrans: float
    vp: float
    epidural: bool
    eccentric: bool
    state: str  # "control", "progression" or "pseudoprogression"

    def change(self) -> dict[str, object]:
        """The phantom's per-follow-up change dict (:data:`patient.SCENARIO_CHANGES` keys)."""
        return dict(
            volume=self.volume,
            adc=self.adc,
            ktrans=self.ktrans,
            ve=1.0,
            vp=self.vp,
            epidural=self.epidural,
            eccentric=self.eccentric,
        )


@dataclass(frozen=True)
class Trajectory:
    """A randomised course of one lesion (see the module docstring)."""

    seed: int
    course: str
    baseline_volume_ml: float
    growth: str | None  # a progression's kind of growth
    followups: tuple[FollowUpState, ...]


#: a multiplier, or the (low, high) range it is drawn from (uniformly)
Value = float | tuple[float, float]


def _draw(rng: np.random.Generator, value: Value) -> float:
    if isinstance(value, tuple):
        value = float(rng.uniform(*value))
    return round(value, 3)


def _days(rng: np.random.Generator, n: int, first: tuple[int, int]) -> list[int]:
    days = [int(rng.integers(first[0], first[1] + 1))]
    while len(days) < n:
        nxt = days[-1] + int(rng.integers(56, 113))
        if nxt > LAST_FOLLOWUP_DAYS:
            break
        days.append(nxt)
    return days


def random_trajectory(seed: int) -> Trajectory:
    """The course of seed ``seed`` (deterministic)."""
    rng = np.random.default_rng([seed, 16])
    # the course and a progression's kind of growth cycle with the seed (a range of consecutive
    # seeds is balanced); everything else is drawn
    course = COURSES[seed % len(COURSES)]
    low, high = BASELINE_VOLUME_ML
    volume0 = round(math.exp(rng.uniform(math.log(low), math.log(high))), 2)
    n = int(rng.integers(1, 5))
    first = _WINDOW if course == "pseudoprogression" else FIRST_FOLLOWUP_DAYS
    days = _days(rng, n, (first[0], min(first[1], 150)) if course == "pseudoprogression" else first)
    growth: str | None = None
    states: list[FollowUpState] = []

    def drawn(
        days_after: int,
        state: str,
        volume: Value,
        adc: Value,
        ktrans: Value,
        vp: Value,
        **kind: bool,
    ) -> FollowUpState:
        v, a, k, p = (_draw(rng, value) for value in (volume, adc, ktrans, vp))
        return FollowUpState(
            days_after,
            v,
            a,
            k,
            p,
            kind.get("epidural", False),
            kind.get("eccentric", False),
            state,
        )

    if course == "responder":
        end = (rng.uniform(0.3, 0.9), rng.uniform(1.1, 1.6), rng.uniform(0.2, 0.8))
        ktrans_end = rng.uniform(0.2, 0.8)
        for k, d in enumerate(days, start=1):
            f = (k / len(days)) ** 0.7
            states.append(
                drawn(
                    d,
                    "control",
                    1 + (end[0] - 1) * f,
                    1 + (end[1] - 1) * f,
                    1 + (ktrans_end - 1) * f,
                    1 + (end[2] - 1) * f,
                )
            )
    elif course == "stable":
        for d in days:
            states.append(drawn(d, "control", (0.92, 1.06), (0.9, 1.1), (0.9, 1.1), (0.9, 1.1)))
    elif course == "pseudoprogression":
        for k, d in enumerate(days):
            if k == 0:
                grown = 1.0 + volume_threshold(volume0) + rng.uniform(0.05, 0.3)
                states.append(
                    drawn(d, "pseudoprogression", grown, (1.05, 1.4), (0.4, 0.9), (0.3, 0.8))
                )
            else:
                states.append(drawn(d, "control", (0.7, 1.0), (1.1, 1.5), (0.3, 0.8), (0.3, 0.7)))
    else:  # progression
        growth = GROWTH_KINDS[(seed // len(COURSES)) % len(GROWTH_KINDS)]
        onset = int(rng.integers(0, len(days)))
        volume = 1.0
        for k, d in enumerate(days):
            if k < onset:
                states.append(drawn(d, "control", (0.92, 1.06), (0.9, 1.1), (0.9, 1.1), (0.9, 1.1)))
                continue
            if k == onset:
                threshold = volume_threshold(volume0, first_follow_up=k == 0)
                volume = min(2.0, 1.0 + threshold + rng.uniform(0.05, 0.45))
            else:
                volume = min(2.0, volume * rng.uniform(1.1, 1.5))
            states.append(
                drawn(
                    d,
                    "progression",
                    volume,
                    (0.75, 1.0),
                    (0.9, 1.8),
                    (1.0, 1.9),
                    epidural=growth == "epidural",
                    eccentric=growth == "eccentric",
                )
            )
    return Trajectory(seed, course, volume0, growth, tuple(states))
