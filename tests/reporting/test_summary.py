"""Summaries of TimePointResult lists: JSON records and the text printed for the user."""

from __future__ import annotations

import json

import pytest

from reporting.summary import format_summary, summary_records
from tests.reporting.results_fixture import BASELINE, FOLLOW_UP


def test_summary_records_are_json_and_complete() -> None:
    records = summary_records([FOLLOW_UP, BASELINE])
    assert [r["role"] for r in records] == ["baseline", "follow-up"]
    records = json.loads(json.dumps(records))  # JSON-able
    base, fu = records
    assert base["measurements"]["volume"] == pytest.approx(4.2)
    assert fu["measurements"]["ADC.mean"] == pytest.approx(1.35e-3)
    assert fu["measurements"]["ADC.peak"] == pytest.approx(1.35e-3 * 0.6)
    assert fu["units"]["ADC.mean"] == "mm2/s" and fu["units"]["volume"] == "mL"
    assert fu["measurements"]["radiomics.ADC.original_glcm_Contrast"] == pytest.approx(7.5)
    assert fu["response"]["category"] == "local control"
    assert [c["code"] for c in fu["response"]["criteria"]] == [
        "volume-increase",
        "perfusion-decrease",
    ]
    assert fu["changes"][0]["relative"] == pytest.approx(-1.1 / 4.2)
    assert fu["comparability"] == "comparable" and base["response"] is None
    assert fu["lesion"]["tracking_uid"] == "1.2.826.0.1.3680043.8.498.555"
    assert fu["days_since_treatment"] == 96


def test_format_summary_text() -> None:
    text = format_summary([BASELINE, FOLLOW_UP])
    lines = text.splitlines()
    assert lines[0] == "Lesion GTV L2 (L2)"
    assert "  baseline 20260105, day -9: volume 4.20 mL" in lines
    assert "  follow-up 20260420, day +96: volume 3.10 mL" in lines
    assert "    ADC mean 1.35e-3 mm²/s; Ktrans mean 0.07 /min" in lines
    assert "    change of volume from baseline: -26 % [beyond repeatability ±20 %]" in lines
    assert (
        "    RESPONSE: local control (spine-sbrt-response 1.0 (SPINO + volumetric + DCE))" in lines
    )
    assert "      [x] Ktrans decrease beyond repeatability: -50 vs -25 % [Kumar 2017]" in lines
    assert "    functional evidence leans to: treatment effect" in lines
    assert "      [ ] Volume increase >= 20 % from baseline: -26.2 vs 20 %" in lines
    # PHI never appears (the fixtures' patient name and ID)
    assert "Test^Spine" not in text and "SRN-TEST-1" not in text
    assert format_summary([]) == "No lesion was analysed."


def test_results_from_summary_reads_back_what_summary_records_wrote():
    """summary.json records -> TimePointResult -> the same records and the same printed text."""
    import json

    from reporting.summary import format_summary, results_from_summary, summary_records

    records = json.loads(json.dumps(summary_records([BASELINE, FOLLOW_UP]), default=str))
    back = results_from_summary({"time_points": records})
    assert format_summary(back) == format_summary([BASELINE, FOLLOW_UP])
    assert [r.lesion for r in back] == [BASELINE.lesion, FOLLOW_UP.lesion]
