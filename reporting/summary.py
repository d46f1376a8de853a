"""Human-readable and JSON summaries of :class:`processing.results.TimePointResult` lists.

:func:`summary_records` gives the JSON-able records the ``analyze`` command writes to
``summary.json`` (values in the node's internal units, docs/architecture.md, Conventions: volumes
in mL, ADC in mm²/s, Ktrans in /min…; the SR converts them to its reported units, see
:func:`reporting.sr.reported_value`); :func:`results_from_summary` reads them
back. :func:`format_summary` gives the short text printed for the user: per lesion and time point
the volume, the main map statistics, the changes from baseline and the response call with the
criteria behind it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from processing.change import flatten_measurements
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

logger = logging.getLogger(__name__)

#: map statistics shown in the text summary, in this order
_TEXT_QUANTITIES = (
    "ADC",
    "MD",
    "MK",
    "IVIM_D",
    "IVIM_f",
    "Ktrans",
    "ve",
    "vp",
    "kep",
    "IAUC60",
    "T1",
)


def summary_records(results: Sequence[TimePointResult]) -> list[dict[str, Any]]:
    """One JSON-able record per lesion and time point, ordered by lesion then date.

    Keys: ``lesion`` (tracking_id, tracking_uid, vertebral_level), ``role``,
    ``study_instance_uid``, ``study_date``, ``days_since_treatment``, ``measurements`` (dotted
    path -> value, as :func:`processing.change.flatten_measurements`), ``units`` (dotted path ->
    unit), ``changes``, ``response`` (or None), ``comparability``, ``comparability_reasons``,
    ``radiomics_notes``, ``provenance``.
    """
    records = []
    for result in sorted(results, key=lambda r: (r.lesion.tracking_uid, r.study_date)):
        values = flatten_measurements(result.measurements)
        units = {path: _unit_of(path, result) for path in values}
        response = None
        if result.response is not None:
            response = asdict(result.response)
            response["category"] = result.response.category.value
        records.append(
            {
                "lesion": asdict(result.lesion),
                "role": result.role.value,
                "study_instance_uid": result.study_instance_uid,
                "study_date": result.study_date,
                "days_since_treatment": result.days_since_treatment,
                "measurements": values,
                "units": units,
                "changes": [asdict(change) for change in result.changes],
                "response": response,
                "comparability": (
                    result.comparability.value if result.comparability is not None else None
                ),
                "comparability_reasons": list(result.comparability_reasons),
                "radiomics_notes": list(result.measurements.radiomics_notes),
                "provenance": result.provenance,
            }
        )
    return records


def _unit_of(path: str, result: TimePointResult) -> str:
    if path in ("volume", "epidural_volume"):
        return "mL"
    if path in ("max_axial_diameter", "max_craniocaudal_extent", "max_3d_diameter"):
        return "mm"
    if path.startswith("radiomics."):
        return "pyradiomics"
    quantity = path.split(".", 1)[0]
    stats = result.measurements.map_statistics.get(quantity)
    return stats.unit if stats is not None else ""


def _format_value(value: float, unit: str) -> str:
    if unit in ("mm2/s", "mm^2/s"):
        return f"{value * 1e3:.3g}e-3 mm²/s"
    return f"{value:.3g} {unit}".rstrip()


def format_summary(results: Sequence[TimePointResult]) -> str:
    """Short human-readable summary (plain text, one block per lesion).

    No patient name, ID or birth date appears: lesions are named by their tracking identifier and
    studies by date.
    """
    if not results:
        return "No lesion was analysed."
    lines: list[str] = []
    by_lesion: dict[str, list[TimePointResult]] = {}
    for result in results:
        by_lesion.setdefault(result.lesion.tracking_uid, []).append(result)
    for lesion_results in by_lesion.values():
        lesion_results.sort(key=lambda r: r.study_date)
        lesion = lesion_results[0].lesion
        level = f" ({lesion.vertebral_level})" if lesion.vertebral_level else ""
        lines.append(f"Lesion {lesion.tracking_id}{level}")
        for result in lesion_results:
            m = result.measurements
            days = (
                f", day {result.days_since_treatment:+d}"
                if result.days_since_treatment is not None
                else ""
            )
            lines.append(
                f"  {result.role.value} {result.study_date}{days}: volume {m.volume_ml:.2f} mL"
            )
            # how the follow-up lesion was found (refined, with its volume range, or not)
            delineation = (result.provenance or {}).get("lesion_delineation") or {}
            if delineation.get("summary"):
                lines.append(f"    lesion {delineation['summary']}")
            if delineation.get("not_delineated"):
                lines.append(
                    f"    size not measured: {delineation['not_delineated']} "
                    "(the baseline GTV's place and size on this follow-up are not known)"
                )
            stats = [
                f"{q} mean {_format_value(m.map_statistics[q].mean, m.map_statistics[q].unit)}"
                for q in _TEXT_QUANTITIES
                if q in m.map_statistics
            ]
            if stats:
                lines.append("    " + "; ".join(stats))
            if result.comparability is not None:
                reasons = (
                    " (" + "; ".join(result.comparability_reasons) + ")"
                    if result.comparability_reasons
                    else ""
                )
                lines.append(
                    f"    comparability with baseline: {result.comparability.value}{reasons}"
                )
            changes = [
                c
                for c in result.changes
                if c.quantity in ("volume",)
                or (
                    c.quantity.split(".")[0] in _TEXT_QUANTITIES
                    and c.quantity.endswith(".mean")
                    or c.quantity.endswith(".median")
                )
            ]
            for change in changes:
                rel = f"{change.relative * 100:+.0f} %" if change.relative is not None else "n/a"
                flags = []
                if change.repeatability is not None:
                    beyond = "beyond" if change.beyond_repeatability else "within"
                    flags.append(f"{beyond} repeatability ±{change.repeatability * 100:.0f} %")
                if not change.comparable:
                    flags.append("NOT comparable")
                flag_text = f" [{', '.join(flags)}]" if flags else ""
                lines.append(
                    f"    change of {change.quantity} from {change.reference}: {rel}{flag_text}"
                )
            response = result.response
            if response is not None:
                lines.append(f"    RESPONSE: {response.category.value} ({response.rule_set})")
                for criterion in response.criteria:
                    mark = "x" if criterion.fired else " "
                    value = ""
                    if criterion.value is not None:
                        value = f": {criterion.value:.3g}"
                        if criterion.threshold is not None:
                            value += f" vs {criterion.threshold:.3g}"
                        if criterion.unit:
                            value += f" {criterion.unit}"
                    source = f" [{criterion.source}]" if criterion.source else ""
                    lines.append(f"      [{mark}] {criterion.description}{value}{source}")
                if response.leaning is not None:
                    lines.append(f"    functional evidence leans to: {response.leaning}")
                if response.recommendation:
                    lines.append(f"    recommendation: {response.recommendation}")
                if response.model_probability is not None:
                    lines.append(
                        f"    {response.model_name or 'model'}: probability of "
                        f"progression {response.model_probability:.2f}"
                    )
    return "\n".join(lines)


def results_from_summary(summary: dict[str, Any]) -> list[TimePointResult]:
    """Rebuild :class:`processing.results.TimePointResult` objects from ``summary.json``.

    The records (:func:`reporting.summary.summary_records`) keep every value shown by
    :func:`reporting.summary.format_summary`; the per-map voxel count is not stored there and is
    set to 0 (it is not displayed).
    """
    results = []
    for record in summary.get("time_points") or []:
        values: dict[str, float] = record["measurements"]
        units: dict[str, str] = record.get("units") or {}
        per_map: dict[str, dict[str, float]] = {}
        for path, value in values.items():
            head, _, stat = path.partition(".")
            if stat and head != "radiomics" and "." not in stat:
                per_map.setdefault(head, {})[stat] = value
        stats = {
            q: MapStatistics(
                quantity=q,
                unit=units.get(f"{q}.mean", ""),
                n_voxels=0,
                mean=s.get("mean", float("nan")),
                median=s.get("median", float("nan")),
                sd=s.get("sd", float("nan")),
                p10=s.get("p10", float("nan")),
                p90=s.get("p90", float("nan")),
                peak=s.get("peak"),
            )
            for q, s in per_map.items()
        }
        measurements = LesionMeasurements(
            volume_ml=values["volume"],
            max_axial_diameter_mm=values.get("max_axial_diameter"),
            max_craniocaudal_extent_mm=values.get("max_craniocaudal_extent"),
            max_3d_diameter_mm=values.get("max_3d_diameter"),
            epidural_volume_ml=values.get("epidural_volume"),
            map_statistics=stats,
            radiomics_notes=tuple(record.get("radiomics_notes") or ()),
        )
        response = None
        if record.get("response"):
            r = dict(record["response"])
            r["category"] = ResponseCategory(r["category"])
            r["criteria"] = tuple(Criterion(**c) for c in r.get("criteria") or ())
            r["model_top_features"] = tuple(tuple(f) for f in r.get("model_top_features") or ())
            response = ResponseAssessment(**r)
        comparability = record.get("comparability")
        results.append(
            TimePointResult(
                lesion=Lesion(**record["lesion"]),
                role=TimePointRole(record["role"]),
                study_instance_uid=record["study_instance_uid"],
                study_date=record["study_date"],
                days_since_treatment=record.get("days_since_treatment"),
                measurements=measurements,
                changes=tuple(Change(**c) for c in record.get("changes") or ()),
                response=response,
                comparability=None if comparability is None else Comparability(comparability),
                comparability_reasons=tuple(record.get("comparability_reasons") or ()),
                provenance=record.get("provenance") or {},
            )
        )
    return results
