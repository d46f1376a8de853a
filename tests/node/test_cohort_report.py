"""``spine-node cohort --randomised`` and ``--report`` (issue 16): the validation report of a
randomised phantom cohort - its figures on hand-made records, and a real run of the test's seed
range (the report's own range, from seed 1000, is kept out of the suite)."""

from __future__ import annotations

import json

import pytest

from node.commands.cohort_report import END, START, evaluate, markdown, replace_section
from tests.node.test_cohort import main

LP = "local progression"
IND = "indeterminate - possible pseudoprogression"
LC = "local control"


def _call(case, state, call, leaning, days, volume, true_volume, base=10.0, **multipliers):
    return {
        "case_id": case,
        "true_state": state,
        "rule_based": call,
        "leaning": leaning,
        "days_since_treatment": days,
        "volume_ml": volume,
        "true_volume_ml": true_volume,
        "true_baseline_volume_ml": base,
        "baseline_volume_ml": base,
        "multipliers": {"volume": true_volume / base, **multipliers},
    }


def _patient(seed, course, calls, growth=None):
    return {
        "randomised": True,
        "baseline_volume_ml_nominal": 10.0,
        "seed": seed,
        "scenario": course,
        "growth": growth,
        "state": "analysed",
        "calls": calls,
    }


REPORT = {
    "summary": {"size": "small"},
    "patients": [
        _patient(1, "responder", [_call("P1-f1", "control", LC, "treatment effect", 90, 6.0, 6.2)]),
        _patient(
            2,
            "progression",
            [
                # in the window, growth with vp +60 %: a clear signature, detected
                _call("P2-f1", "progression", LP, "progression", 70, 14.0, 15.0, vp=1.6),
                # outside the window, growth: clear; called local control (a miss), and the
                # volume under-segmented by 20 %
                _call("P2-f2", "progression", LC, "none", 250, 16.0, 20.0),
            ],
            growth="eccentric",
        ),
        _patient(
            3,
            "progression",
            # in the window, growth without viable evidence: not a clear signature; indeterminate
            # leaning to progression inside the window counts as detected
            # (the continuous truth 13.5 mL, voxelised 13.0: the sampling's own error -3.7 %)
            [
                {
                    **_call("P3-f1", "progression", IND, "progression", 100, 13.0, 13.0),
                    "true_volume_ml_continuous": 13.5,
                }
            ],
            growth="central",
        ),
        _patient(
            4, "pseudoprogression", [_call("P4-f1", "pseudoprogression", LP, "mixed", 80, 13, 13)]
        ),
        {"randomised": False, "seed": 9, "scenario": "stable", "calls": []},  # not counted
    ],
}


def test_evaluate_counts_the_calls_against_the_true_states():
    figures = evaluate(REPORT)
    assert figures["patients"] == 4 and figures["follow_ups"] == 5
    assert figures["matrix"]["progression"] == {
        LP: 1,
        "indeterminate, leaning to progression": 1,
        LC: 1,
    }
    assert figures["matrix"]["control (responder)"] == {LC: 1}
    assert (figures["progression"], figures["progression_detected"]) == (3, 2)
    assert figures["progression_missed"] == ["P2-f2"]
    assert (figures["clear_signature"], figures["clear_signature_called_local_control"]) == (2, 1)
    assert (figures["pseudoprogression"], figures["pseudoprogression_called_progression"]) == (1, 1)
    assert (figures["control"], figures["control_called_progression"]) == (1, 0)
    assert figures["volume_error_grid"]["n"] == 5
    sampling = figures["volume_error_sampling"]
    assert sampling["n"] == 1 and sampling["median"] == pytest.approx(13.0 / 13.5 - 1)
    errors = figures["volume_error"]
    assert errors["n"] == 5 and errors["within_10pct"] == pytest.approx(4 / 5)  # all but P2-f2
    assert errors["p05"] == pytest.approx(-0.2)
    assert figures["volume_error_by"]["progression (eccentric)"]["n"] == 2


def test_markdown_and_the_readme_section(tmp_path):
    text = markdown(evaluate(REPORT))
    assert "| progression | 1 | 1 | 0 | 1 | 0 |" in text
    assert "progression detected (local progression, or indeterminate leaning" in text
    assert "2/3 (67 %)" in text and "Phantoms are not patients" in text
    assert "the voxelised truth itself against the true volume" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{START}\nold\n{END}\nafter\n", encoding="utf-8")
    replace_section(readme, text)
    content = readme.read_text(encoding="utf-8")
    assert f"{START}\n{text}{END}\nafter" in content and "old" not in content
    # a full-size cohort has a section of its own; the small one's is left as it is
    full = "<!-- cohort-report-full:start -->\nold full\n<!-- cohort-report-full:end -->\n"
    readme.write_text(readme.read_text(encoding="utf-8") + full, encoding="utf-8")
    replace_section(readme, "full text\n", "full")
    content = readme.read_text(encoding="utf-8")
    assert f"{START}\n{text}{END}\nafter" in content and "old full" not in content
    assert (
        "<!-- cohort-report-full:start -->\nfull text\n<!-- cohort-report-full:end -->" in content
    )
    with pytest.raises(ValueError, match="cohort-report-huge"):  # no section for that size
        replace_section(tmp_path / "README.md", "x", "huge")
    (tmp_path / "plain.md").write_text("no markers", encoding="utf-8")
    with pytest.raises(ValueError, match="cohort-report"):
        replace_section(tmp_path / "plain.md", text)


@pytest.mark.slow
def test_a_randomised_cohort_run_and_its_report(tmp_path, capsys):
    """Seeds 54-55: an eccentric progression (22 mL, +29 % at week 16 with Ktrans +74 % and
    ADC -24 %) and a pseudoprogression (5.5 mL, +36 % at week 17 with vp -43 % and ADC +28 %),
    analysed by the node's chain; the report measures them."""
    out = tmp_path / "cohort"
    rc = main(
        [
            "cohort",
            "--randomised",
            "--patients",
            "2",
            "--seed",
            "54",
            "--jobs",
            "2",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr()
    assert "validation report: spine-node cohort --report" in capsys.readouterr().out
    readme = tmp_path / "README.md"
    readme.write_text(f"{START}\n{END}\n", encoding="utf-8")
    assert main(["cohort", "--report", str(out), "--readme", str(readme)]) == 0
    printed = capsys.readouterr().out
    figures = json.loads((out / "report.json").read_text())
    assert printed.startswith("Randomised phantom cohort: 2 patients (seeds 54–55")
    assert (out / "report.md").read_text() in readme.read_text()
    assert figures["follow_ups"] == 2 and figures["failed"] == 0
    # against the phantoms' truth: the progression found (a clear signature: growth with an ADC
    # fall beyond repeatability), the pseudoprogression indeterminate leaning to treatment
    # effect, both volumes within 10 %
    assert figures["progression_detected"] == figures["progression"] == 1
    assert figures["clear_signature"] == 1
    assert figures["matrix"]["pseudoprogression"] == {"indeterminate, other": 1}
    assert figures["volume_error"]["within_10pct"] == 1.0
    # each follow-up records how its lesion was delineated, for reading its volume error
    calls = [
        c for p in json.loads((out / "patients.json").read_text())["patients"] for c in p["calls"]
    ]
    for call in calls:
        low, high = call["volume_range_ml"]
        assert low <= call["volume_ml"] <= high
        assert any(n.startswith("refined on follow-up images") for n in call["lesion_notes"])
        # and what decided its call, with the epidural part against the phantom's
        assert call["epidural_volume_ml"] is not None
        assert call["true_epidural_volume_ml"] is not None
    progression = next(c for c in calls if c["true_state"] == "progression")
    assert "volume-increase" in progression["fired"] and "adc-fall" in progression["fired"]
    pseudo = next(c for c in calls if c["true_state"] == "pseudoprogression")
    assert "pseudoprogression-window" in pseudo["fired"]
    # a folder without randomised patients is refused
    assert main(["cohort", "--report", str(tmp_path)]) == 2
