"""The validation report of a randomised phantom cohort (``spine-node cohort --report DIR``).

Reads ``DIR/patients.json`` of a ``spine-node cohort --randomised`` run and measures, per
follow-up, the node's call against the phantom's true state and its GTV volume against the
phantom's voxelised truth (on the anatomical grid):

* **confusion matrix**: true state (progression; pseudoprogression; control, by course) against
  the call (local progression; indeterminate leaning to progression; other indeterminate; local
  control; not assessable);
* **progression detected**: local progression, or indeterminate leaning to progression inside
  the 6-26-week window (issue 16's definition);
* **clear signature**: a true progression whose growth is beyond the size threshold outside the
  window, or beyond it with viable-tumour evidence beyond the published repeatability (vp or
  Ktrans up by more than max(20 %, 38.5 %), ADC down by more than 12.9 %), or with a new epidural
  component; such a follow-up must never be called local control;
* responders and stable lesions called progression; pseudoprogressions called progression;
* **volume error** ``measured / true - 1`` of every follow-up against the true (continuous)
  volume of the phantom's tumour, and against its voxelisation on the anatomical grid (voxel
  centres inside the tumour: the best a voxel mask on that grid can do; on 5 mm slices it
  differs from the true volume by several % for small lesions): median, 5th-95th percentile
  and the share within ±10 %, overall and by course and kind of growth; and the voxelisation's
  own error against the true volume (the ceiling of a voxel-level segmentation).

The markdown it prints can replace the README's section between
``<!-- cohort-report:start -->`` and ``<!-- cohort-report:end -->`` (``--readme``; a cohort of
full-size phantoms: ``<!-- cohort-report-full:start -->`` … ``-full:end -->``). Phantoms are
not patients: the report says so.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from processing.repeatability import PUBLISHED
from processing.response import (
    PERFUSION_INCREASE,
    PSEUDOPROGRESSION_WINDOW_DAYS,
    volume_threshold,
)

START = "<!-- cohort-report:start -->"
END = "<!-- cohort-report:end -->"
CALLS = (
    "local progression",
    "indeterminate, leaning to progression",
    "indeterminate, other",
    "local control",
    "not assessable",
)


def _call_column(call: dict[str, Any]) -> str:
    category = call.get("rule_based") or "not assessable"
    if category.startswith("indeterminate"):
        if call.get("leaning") == "progression":
            return CALLS[1]
        return CALLS[2]
    if category in (CALLS[0], CALLS[3]):
        return category
    return CALLS[4]


def _in_window(days: int | None) -> bool:
    low, high = PSEUDOPROGRESSION_WINDOW_DAYS
    return days is not None and low <= days <= high


def clear_signature(call: dict[str, Any], baseline_ml: float, *, first_follow_up: bool) -> bool:
    """Whether a true progression shows a signature the rule set must not miss (module doc).

    ``baseline_ml`` is the true baseline volume; the true growth is the phantom's multiplier.
    """
    m = call.get("multipliers") or {}
    if m.get("epidural"):
        return True
    if not baseline_ml or "volume" not in m:
        return False
    growth = m["volume"] - 1.0 > volume_threshold(baseline_ml, first_follow_up=first_follow_up)
    if not growth:
        return False
    if not _in_window(call.get("days_since_treatment")):
        return True
    perfusion = 1.0 + max(PERFUSION_INCREASE, PUBLISHED["vp"].coefficient)
    viable = (
        m.get("vp", 1.0) > perfusion
        or m.get("ktrans", 1.0) > perfusion
        or m.get("adc", 1.0) < 1.0 - PUBLISHED["ADC"].coefficient
    )
    return bool(viable)


def _true_volume(call: dict[str, Any], patient: dict[str, Any]) -> float | None:
    """The tumour's true (continuous) volume at the follow-up, mL."""
    if call.get("true_volume_ml_continuous"):
        return float(call["true_volume_ml_continuous"])
    # runs before this field was recorded: the trajectory's nominal volume times its multiplier
    # (the phantom scales the tumour to exactly that volume)
    nominal = patient.get("baseline_volume_ml_nominal")
    multiplier = (call.get("multipliers") or {}).get("volume")
    return float(nominal) * float(multiplier) if nominal and multiplier else None


def _row(call: dict[str, Any], course: str) -> str:
    state = call.get("true_state")
    return f"control ({course})" if state == "control" else str(state)


def _distribution(errors: list[float]) -> dict[str, Any]:
    if not errors:
        return {"n": 0}
    ordered = sorted(errors)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]

    return {
        "n": len(errors),
        "median": statistics.median(errors),
        "p05": pct(0.05),
        "p95": pct(0.95),
        "within_10pct": sum(abs(e) <= 0.10 for e in errors) / len(errors),
    }


def evaluate(report: dict[str, Any]) -> dict[str, Any]:
    """The cohort's figures from ``patients.json`` (see the module docstring)."""
    matrix: dict[str, Counter[str]] = defaultdict(Counter)
    errors: list[float] = []
    errors_by: dict[str, list[float]] = defaultdict(list)
    grid_errors: list[float] = []
    sampling_errors: list[float] = []
    progression = detected = clear = clear_missed = 0
    pseudo = pseudo_lp = control = control_lp = 0
    missed: list[str] = []
    patients = [p for p in report.get("patients", []) if p.get("randomised")]
    for patient in patients:
        course = patient["scenario"]
        for index, call in enumerate(patient.get("calls") or []):
            state = call.get("true_state")
            if state is None:
                continue
            column = _call_column(call)
            matrix[_row(call, course)][column] += 1
            true_volume = _true_volume(call, patient)
            if true_volume:
                error = call["volume_ml"] / true_volume - 1.0
                errors.append(error)
                label = course if course != "progression" else f"progression ({patient['growth']})"
                errors_by[label].append(error)
            if call.get("true_volume_ml"):
                grid_errors.append(call["volume_ml"] / call["true_volume_ml"] - 1.0)
                if call.get("true_volume_ml_continuous"):
                    # the voxelised truth itself: what a perfect voxel-level segmentation of
                    # images sampled at voxel centres (no partial volume) measures
                    sampling_errors.append(
                        call["true_volume_ml"] / call["true_volume_ml_continuous"] - 1.0
                    )
            if state == "progression":
                progression += 1
                hit = column == CALLS[0] or (
                    column == CALLS[1] and _in_window(call.get("days_since_treatment"))
                )
                detected += hit
                if not hit:
                    missed.append(call["case_id"])
                # the true (nominal) baseline volume, as the true growth is the multiplier's
                baseline_ml = float(patient.get("baseline_volume_ml_nominal") or 0.0)
                if clear_signature(call, baseline_ml, first_follow_up=index == 0):
                    clear += 1
                    clear_missed += column == CALLS[3]
            elif state == "pseudoprogression":
                pseudo += 1
                pseudo_lp += column == CALLS[0]
            else:
                control += 1
                control_lp += column == CALLS[0]
    return {
        "patients": len(patients),
        "follow_ups": sum(sum(c.values()) for c in matrix.values()),
        "seeds": sorted(p["seed"] for p in patients),
        "size": (report.get("summary") or {}).get("size"),
        "failed": sum(p.get("state") != "analysed" for p in patients),
        "matrix": {row: dict(counts) for row, counts in sorted(matrix.items())},
        "progression": progression,
        "progression_detected": detected,
        "progression_missed": missed,
        "clear_signature": clear,
        "clear_signature_called_local_control": clear_missed,
        "pseudoprogression": pseudo,
        "pseudoprogression_called_progression": pseudo_lp,
        "control": control,
        "control_called_progression": control_lp,
        "volume_error": _distribution(errors),
        "volume_error_grid": _distribution(grid_errors),
        "volume_error_sampling": _distribution(sampling_errors),
        "volume_error_by": {k: _distribution(v) for k, v in sorted(errors_by.items())},
    }


def _rate(k: int, n: int) -> str:
    return f"{k}/{n} ({100.0 * k / n:.0f} %)" if n else "–"


def _pct(x: float) -> str:
    return f"{100.0 * x:+.1f} %"


def markdown(figures: dict[str, Any]) -> str:
    """The report as markdown (for the README's "validated on" section)."""
    seeds = figures["seeds"]
    seed_text = f"seeds {seeds[0]}–{seeds[-1]}" if seeds else "no seeds"
    lines = [
        f"Randomised phantom cohort: {figures['patients']} patients ({seed_text}, "
        f"{figures['size']} phantoms), {figures['follow_ups']} follow-ups, response rule set 2.0 "
        "against the published repeatability coefficients (the cohort skips the per-case ROI "
        f"perturbation); {figures['failed']} patient(s) not analysed. Phantoms are not patients: "
        "these figures check the node against its own simulation, whose ranges are the authors' "
        "reading of the literature (`processing/phantom/trajectory.py`).",
        "",
        "| true state \\ call | " + " | ".join(CALLS) + " |",
        "|---|" + "---:|" * len(CALLS),
    ]
    for row, counts in figures["matrix"].items():
        lines.append(f"| {row} | " + " | ".join(str(counts.get(c, 0)) for c in CALLS) + " |")
    e = figures["volume_error"]
    lines += [
        "",
        f"- progression detected (local progression, or indeterminate leaning to progression "
        f"inside the window): {_rate(figures['progression_detected'], figures['progression'])}",
        f"- progression with a clear signature called local control: "
        f"{_rate(figures['clear_signature_called_local_control'], figures['clear_signature'])}",
        f"- pseudoprogression called progression: "
        f"{_rate(figures['pseudoprogression_called_progression'], figures['pseudoprogression'])}",
        f"- responding, stable or not yet progressing lesions called progression: "
        f"{_rate(figures['control_called_progression'], figures['control'])}",
    ]
    g = figures.get("volume_error_grid") or {}
    if e.get("n"):
        lines.append(
            f"- follow-up GTV volume against the true volume: median {_pct(e['median'])}, "
            f"5th–95th percentile {_pct(e['p05'])} to {_pct(e['p95'])}, within ±10 % in "
            f"{100.0 * e['within_10pct']:.0f} % of {e['n']} follow-ups"
        )
    if g.get("n"):
        lines.append(
            f"- against the truth voxelised on the anatomical grid: median {_pct(g['median'])}, "
            f"{_pct(g['p05'])} to {_pct(g['p95'])}, within ±10 % in "
            f"{100.0 * g['within_10pct']:.0f} %"
        )
    s = figures.get("volume_error_sampling") or {}
    if s.get("n"):
        lines.append(
            "- the voxelised truth itself against the true volume (the best a voxel-level "
            "segmentation of these images, sampled at voxel centres without partial volume, can "
            f"do): {_pct(s['p05'])} to {_pct(s['p95'])}, within ±10 % in "
            f"{100.0 * s['within_10pct']:.0f} %"
        )
    if e.get("n"):
        lines.append("- by course (against the true volume):")
        for label, d in figures["volume_error_by"].items():
            lines.append(
                f"  - {label}: median {_pct(d['median'])}, {_pct(d['p05'])} to "
                f"{_pct(d['p95'])}, within ±10 % in {100.0 * d['within_10pct']:.0f} % of {d['n']}"
            )
    return "\n".join(lines) + "\n"


def markers(size: str | None = "small") -> tuple[str, str]:
    """The README markers of a cohort report of phantoms of ``size``: :data:`START` and
    :data:`END` for the small phantoms, ``<!-- cohort-report-<size>:start -->`` … otherwise, so
    that a report of each size has its own section."""
    if size in (None, "small"):
        return START, END
    return f"<!-- cohort-report-{size}:start -->", f"<!-- cohort-report-{size}:end -->"


def replace_section(readme: Path, text: str, size: str | None = "small") -> None:
    """Put ``text`` between the README's cohort-report markers of ``size`` (they must exist)."""
    start, end = markers(size)
    content = readme.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(content):
        raise ValueError(f"{readme} has no {start} ... {end} section")
    new = pattern.sub(lambda _m: f"{start}\n{text}{end}", content, count=1)
    tmp = readme.with_name(readme.name + ".part")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(readme)


def load(folder: Path) -> dict[str, Any]:
    """``folder/patients.json`` of a cohort run."""
    data: dict[str, Any] = json.loads((folder / "patients.json").read_text(encoding="utf-8"))
    return data
