"""TID 1500 report: dciodvfy, highdicom content tree (values, codes, units), dcmqi tid1500reader,
other-study evidence and deterministic UIDs."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pytest

from processing.results import TimePointResult
from reporting import codes as rcodes
from reporting.sr import (
    PARAMETRIC_MAP_STORAGE,
    build_measurement_report,
    reported_as_change,
    reported_value,
)
from reporting.summary import summary_records
from tests.reporting.results_fixture import BASELINE, FOLLOW_UP, LESION, VERSION, build_inputs
from tests.reporting.sources import FOLLOW_UP_STUDY_UID, STUDY_UID
from tests.reporting.tools import dciodvfy, tid1500_json

PARAMETERS = {
    "rule_set": "spine-sbrt-response 1.0",
    "radiomics_bin_width": "25",
    "dce_model": "extended_tofts",
    "aif": "Parker population AIF, Hct 0.42",
}
SOURCES = {"volume-increase": "SPINO 2015: +20 %"}


def _build(version: str = VERSION) -> tuple[hd.sr.Comprehensive3DSR, object]:
    objects = build_inputs(version)
    sr = build_measurement_report(
        [FOLLOW_UP, BASELINE],
        segmentations=objects.segs,
        parametric_maps=objects.pmaps,
        source_images=objects.baseline_sources + objects.follow_up_sources,
        algorithm_version=version,
        algorithm_parameters=PARAMETERS,
        criterion_sources=SOURCES,
    )
    return sr, objects


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    sr, objects = _build()
    path = tmp_path_factory.mktemp("sr") / "sr.dcm"
    sr.save_as(path)
    return path, objects


def test_sr_passes_dciodvfy(report: tuple[Path, object]) -> None:
    dciodvfy(report[0])


def _find(group, name: str, derivation: str | None = None, unit: str | None = None):
    hits = [
        m
        for m in group.get_measurements()
        if m.name.value == name
        and (m.derivation.value if m.derivation is not None else None) == derivation
        and (unit is None or m.unit.value == unit)
    ]
    assert len(hits) == 1, f"{len(hits)} measurements {name}/{derivation}/{unit}"
    return hits[0]


def _group_parameters(group) -> list[str]:
    """The Algorithm Parameters of a group's own algorithm identification."""
    return [item.value for item in group[0].ContentSequence if item.name.value == "111002"]


def _groups(sr) -> dict[tuple[str, str | None], object]:
    """(time point text, group method code value) -> group; a group of radiomics features is
    keyed ``RADIOMX image=<quantity>`` (one per image, named by its algorithm parameters)."""
    out = {}
    for group in sr.content.get_volumetric_roi_measurement_groups(tracking_uid=LESION.tracking_uid):
        time_point = next(
            item for item in group[0].ContentSequence if item.name.value == "C2348792"
        )
        method = group.method.value if group.method is not None else None
        if method == "RADIOMX":
            (image,) = [p for p in _group_parameters(group) if p.startswith("image=")]
            method = f"RADIOMX {image}"
        key = (time_point.value, method)
        assert key not in out, key
        out[key] = group
    return out


def test_highdicom_reads_content_values_codes_units(report: tuple[Path, object]) -> None:
    path, objects = report
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    # document in the follow-up study; baseline objects as other-study evidence
    assert sr.StudyInstanceUID == FOLLOW_UP_STUDY_UID
    other = {item.StudyInstanceUID for item in sr.PertinentOtherEvidenceSequence}
    current = {item.StudyInstanceUID for item in sr.CurrentRequestedProcedureEvidenceSequence}
    assert (other, current) == ({STUDY_UID}, {FOLLOW_UP_STUDY_UID})
    other_uids = {
        ref.ReferencedSOPInstanceUID
        for study in sr.PertinentOtherEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert objects.segs[0].SOPInstanceUID in other_uids
    assert {pm.SOPInstanceUID for pm in objects.pmaps[:2]} <= other_uids
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
    assert sr.content.get_observer_contexts()[0].observer_type.value == "121007"  # Device

    rule_set = rcodes.rule_set_code(FOLLOW_UP.response.rule_set).value
    groups = _groups(sr)
    assert set(groups) == {
        ("baseline 20260105", None),
        ("baseline 20260105", "RADIOMX image=ADC"),
        ("follow-up 20260420", rule_set),
        ("follow-up 20260420", "RADIOMX image=ADC"),
        ("follow-up 20260420", "CHGREL"),
        ("follow-up 20260420", "CHGABS"),
    }
    base, fu = groups[("baseline 20260105", None)], groups[("follow-up 20260420", rule_set)]
    fu_features = groups[("follow-up 20260420", "RADIOMX image=ADC")]

    # tracking, segment, source series, finding, site
    for group, seg in ((base, objects.segs[0]), (fu, objects.segs[1])):
        assert group.tracking_uid == LESION.tracking_uid
        assert group.tracking_identifier == "GTV L2"
        image, series = list(group.referenced_segment)
        assert image.name.value == "121191"  # Referenced Segment
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert int(image.ReferencedSOPSequence[0].ReferencedSegmentNumber) == 1
        assert series.value == seg.ReferencedSeriesSequence[0].SeriesInstanceUID
        assert group.finding_type.value == "14799000"
        assert [site.value.value for site in group.finding_sites] == ["14293000"]  # L2

    # measurements in reported units
    assert _find(fu, "118565006", unit="cm3").value == pytest.approx(3.1)
    assert _find(base, "118565006", unit="cm3").value == pytest.approx(4.2)
    adc_mean = _find(fu, "113041", "373098007")
    assert (adc_mean.value, adc_mean.unit.value) == (pytest.approx(1350.0), "um2/s")
    adc_pm = objects.pmaps[2]
    assert adc_mean.referenced_images[0].value == (PARAMETRIC_MAP_STORAGE, adc_pm.SOPInstanceUID)
    assert _find(fu, "113041", "P10").value == pytest.approx(1350.0 * 0.7)
    assert _find(fu, "113041", "126031").value == pytest.approx(1350.0 * 0.6)  # peak
    ktrans_median = _find(base, "126312", "373099004")
    assert (ktrans_median.value, ktrans_median.unit.value) == (pytest.approx(0.133), "/min")
    assert _find(fu, "AXDIAM").value == pytest.approx(21.5)
    # T2w signal statistics: T2 Weighted MR Signal Intensity, scanner units
    t2w_mean = _find(fu, "110805", "373098007")
    assert (t2w_mean.value, t2w_mean.unit.value) == (pytest.approx(310.0), "1")
    # radiomics: IBSI codes, kurtosis converted to excess kurtosis, shape units
    # (in the group of the image's features, which names the map they were computed on)
    kurtosis = _find(fu_features, "IPH6")
    assert (kurtosis.name.scheme_designator, kurtosis.value) == ("IBSI", pytest.approx(1.25))
    volume = _find(fu_features, "RNU0")
    assert (volume.value, volume.unit.value) == (pytest.approx(3100.0), "mm3")
    assert _find(fu_features, "Q4LE").value == pytest.approx(1350.0)  # mean intensity, in um2/s
    private = rcodes.pyradiomics_private_code("wavelet-LLH_glcm_Contrast").value
    assert _find(fu_features, private).name.scheme_designator == "99PYRADIOMICS"
    # the features' map is named once, by their group, not by each feature
    assert f"Parametric Map={adc_pm.SOPInstanceUID}" in _group_parameters(fu_features)
    assert not _find(fu_features, "IPH6").referenced_images
    assert not any(
        m.name.scheme_designator in ("IBSI", rcodes.PYRADIOMICS_SCHEME)
        for m in fu.get_measurements()
    )

    # changes from baseline
    rel, absolute = (
        groups[("follow-up 20260420", "CHGREL")],
        groups[("follow-up 20260420", "CHGABS")],
    )
    assert _find(rel, "118565006", unit="%").value == pytest.approx(-1.1 / 4.2 * 100)
    assert _find(absolute, "118565006", unit="cm3").value == pytest.approx(-1.1)
    assert _find(absolute, "113041", "373098007").value == pytest.approx(400.0)
    assert _find(rel, "126312", "373099004").value == pytest.approx(-50.0)

    # response and criteria as coded qualitative evaluations
    evaluations = {q.name.value: q.value for q in fu.get_qualitative_evaluations()}
    assert evaluations["112020"].value == "LC"
    assert evaluations["112020"].scheme_designator == "99SPINESBRT"
    fired = rcodes.criterion_code("perfusion-decrease", "").value
    not_fired = rcodes.criterion_code("volume-increase", "").value
    assert (evaluations[fired].value, evaluations[not_fired].value) == ("52101004", "272519000")
    assert evaluations["EPIPROG"].value == "272519000"
    assert evaluations["VCF"].value == "VCFNONE"
    assert evaluations["CMPAB"].value == "CMPOK"
    assert _find(fu, not_fired).value == pytest.approx(-26.19)
    assert _find(fu, "PPROB").value == pytest.approx(0.12)

    # the settings once per time point (its measurement group), the criteria's sources with the
    # response; the other groups name the algorithm, a radiomics group its image and map
    settings = sorted(f"{k}={v}" for k, v in PARAMETERS.items())
    assert _group_parameters(base) == settings
    assert _group_parameters(fu) == [*settings, "source of volume-increase=SPINO 2015: +20 %"]
    assert _group_parameters(fu_features) == [
        "image=ADC",
        f"Parametric Map={objects.pmaps[2].SOPInstanceUID}",
    ]
    assert _group_parameters(rel) == _group_parameters(absolute) == []


def test_time_point_context(report: tuple[Path, object]) -> None:
    sr = hd.sr.srread(report[0])
    groups = _groups(sr)
    for (time_point, method), group in groups.items():
        items = {item.name.value: item for item in group[0].ContentSequence}
        baseline = time_point.startswith("baseline")
        assert items["126072"].value.value == ("C1442488" if baseline else "264908009")
        assert float(items["126073"].value) == (1.0 if baseline else 2.0)
        offset = items["128740"]
        assert float(offset.value) == (-9.0 if baseline else 96.0)
        assert offset.unit.value == "d"
        assert offset.ContentSequence[0].ConceptCodeSequence[0].CodeValue == "SBRTSTART"


def test_dcmqi_reads_values_equal_to_summary(report: tuple[Path, object], tmp_path: Path) -> None:
    data = tid1500_json(report[0], tmp_path)
    groups = data["Measurements"]
    assert {g["TrackingUniqueIdentifier"] for g in groups} == {LESION.tracking_uid}
    by_time_point: dict[tuple[str, str | None], list] = {}
    for g in groups:
        method = g.get("measurementMethod", {}).get("CodeValue")
        # the groups of radiomics features (one per image) are read together
        by_time_point.setdefault((g["timePoint"], method), []).extend(g["measurementItems"])

    def dcmqi_value(items, code, derivation=None, unit=None):
        hits = [
            float(i["value"])
            for i in items
            if i["quantity"]["CodeValue"] == code
            and i.get("derivationModifier", {}).get("CodeValue") == derivation
            and (unit is None or i["units"]["CodeValue"] == unit)
        ]
        assert len(hits) == 1, (code, derivation, unit, hits)
        return hits[0]

    checked = 0
    for record, result in zip(summary_records([BASELINE, FOLLOW_UP]), (BASELINE, FOLLOW_UP)):
        method = (
            rcodes.rule_set_code(result.response.rule_set).value
            if result.response is not None
            else None
        )
        time_point = f"{result.role.value} {result.study_date}"
        items = [*by_time_point[(time_point, method)], *by_time_point[(time_point, "RADIOMX")]]
        for path, value in record["measurements"].items():
            written = reported_value(path, value, result.measurements)
            if written is None:
                continue
            code, derivation = _codes_for(path, result)
            assert dcmqi_value(items, code, derivation, written[1]) == pytest.approx(
                written[0], rel=1e-9
            ), path
            checked += 1
        for change in record["changes"]:
            if change["relative"] is None:
                continue
            if not reported_as_change(change["quantity"]):
                # radiomics changes stay in summary.json: none in the report
                assert all(
                    i["quantity"]["CodeValue"] != _codes_for(change["quantity"], result)[0]
                    for i in by_time_point[(f"{result.role.value} {result.study_date}", "CHGREL")]
                )
                continue
            items = by_time_point[(f"{result.role.value} {result.study_date}", "CHGREL")]
            code, derivation = _codes_for(change["quantity"], result)
            assert dcmqi_value(items, code, derivation, "%") == pytest.approx(
                change["relative"] * 100.0, rel=1e-9
            )
            checked += 1
    assert checked >= 40


def _codes_for(path: str, result: TimePointResult) -> tuple[str, str | None]:
    from reporting.sr import _concept_for_path

    concept = _concept_for_path(path, result.measurements, None)
    assert concept is not None
    return concept.name.value, (concept.derivation.value if concept.derivation else None)


def test_sr_uids_are_deterministic() -> None:
    first, _ = _build()
    again, _ = _build()
    newer, _ = _build("0.2.0")
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (
        again.SeriesInstanceUID,
        again.SOPInstanceUID,
    )
    assert first.SOPInstanceUID != newer.SOPInstanceUID
    assert first.SeriesInstanceUID != newer.SeriesInstanceUID


def test_time_point_without_seg_is_reported_without_roi(tmp_path: Path) -> None:
    """A follow-up whose lesion could not be delineated (no SEG): TID 1501 group, still valid."""
    import dataclasses

    from processing.results import ResponseCategory

    objects = build_inputs()
    not_assessable = dataclasses.replace(
        FOLLOW_UP,
        response=dataclasses.replace(FOLLOW_UP.response, category=ResponseCategory.NOT_ASSESSABLE),
    )
    sr = build_measurement_report(
        [BASELINE, not_assessable],
        segmentations=objects.segs[:1],
        parametric_maps=objects.pmaps,
        algorithm_version=VERSION,
    )
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    dciodvfy(path)
    back = hd.sr.srread(path)
    # the baseline, its values and its ADC features
    assert len(back.content.get_volumetric_roi_measurement_groups()) == 2
    # follow-up: TID 1501 groups (response, ADC features, relative and absolute changes)
    assert len(back.content.get_image_measurement_groups(tracking_uid=LESION.tracking_uid)) == 4
    data = tid1500_json(path, tmp_path)
    assert {g["timePoint"] for g in data["Measurements"]} == {
        "baseline 20260105",
        "follow-up 20260420",
    }
    follow_up = [
        g
        for g in data["Measurements"]
        if g["timePoint"] == "follow-up 20260420"
        and g.get("measurementMethod", {}).get("CodeValue", "").startswith("RSET")
    ]
    (group,) = follow_up
    assert "ReferencedSegment" not in group
    values = {
        (q["conceptCode"]["CodeValue"], q["conceptValue"]["CodeValue"])
        for q in group["qualitativeEvaluations"]
    }
    assert ("112020", "NA") in values


def test_sr_needs_evidence_of_the_latest_study() -> None:
    objects = build_inputs()
    with pytest.raises(ValueError, match="no evidence of the latest study"):
        build_measurement_report(
            [BASELINE, FOLLOW_UP], segmentations=objects.segs[:1], algorithm_version=VERSION
        )


def test_two_lesions_and_changes_from_previous(tmp_path: Path) -> None:
    """Groups per lesion, previous-time-point changes, criterion units (wk) and one without UCUM."""
    import dataclasses

    import numpy as np

    from processing.results import Change, Criterion, Lesion
    from reporting.seg import build_segmentation

    objects = build_inputs()
    second = Lesion("GTV T11", "1.2.826.0.1.3680043.8.498.556", "T11")
    mask = np.zeros((6, 24, 20), dtype=bool)
    mask[1:3, 2:6, 2:6] = True
    segs = list(objects.segs)
    for sources in (objects.baseline_sources, objects.follow_up_sources):
        segs.append(build_segmentation(sources, mask, second, algorithm_version=VERSION))
    response = dataclasses.replace(
        FOLLOW_UP.response,
        criteria=(
            Criterion(
                "pseudoprogression-window",
                "follow-up 6-26 weeks after treatment",
                True,
                value=13.7,
                threshold=26.0,
                unit="wk",
            ),
            Criterion("bilsky-increase", "Bilsky grade 1a -> 1b", False, value=1.0, unit="grade"),
        ),
    )
    follow_up_2 = dataclasses.replace(
        FOLLOW_UP,
        lesion=second,
        response=response,
        changes=(Change("volume", "previous", 2.0, 2.5, 0.5, 0.25, 0.2, True),),
    )
    baseline_2 = dataclasses.replace(BASELINE, lesion=second)
    sr = build_measurement_report(
        [BASELINE, FOLLOW_UP, baseline_2, follow_up_2],
        segmentations=segs,
        parametric_maps=objects.pmaps,
        algorithm_version=VERSION,
    )
    path = tmp_path / "sr2.dcm"
    sr.save_as(path)
    dciodvfy(path)
    back = hd.sr.srread(path)
    groups = back.content.get_volumetric_roi_measurement_groups(tracking_uid=second.tracking_uid)
    methods = sorted(g.method.value for g in groups if g.method is not None)
    assert methods == sorted(
        ["CHGABSP", "CHGRELP", "RADIOMX", "RADIOMX", rcodes.rule_set_code(response.rule_set).value]
    )
    rel = next(g for g in groups if g.method is not None and g.method.value == "CHGRELP")
    assert _find(rel, "118565006", unit="%").value == pytest.approx(25.0)
    main = next(g for g in groups if g.method is not None and g.method.value.startswith("RSET"))
    window = rcodes.criterion_code("pseudoprogression-window", "").value
    assert (_find(main, window).value, _find(main, window).unit.value) == (
        pytest.approx(13.7),
        "wk",
    )
    bilsky = rcodes.criterion_code("bilsky-increase", "").value
    assert not [m for m in main.get_measurements() if m.name.value == bilsky]
    evaluations = {q.name.value: q.value.value for q in main.get_qualitative_evaluations()}
    assert evaluations[bilsky] == "272519000"  # Absent, still reported
    assert (
        len(back.content.get_volumetric_roi_measurement_groups(tracking_uid=LESION.tracking_uid))
        == 6
    )


def test_baseline_only_report_without_image_library(tmp_path: Path) -> None:
    """The report of a baseline alone (no follow-up yet, no source headers) is valid too."""
    objects = build_inputs()
    sr = build_measurement_report(
        [BASELINE],
        segmentations=objects.segs[:1],
        parametric_maps=objects.pmaps[:2],
        algorithm_version=VERSION,
    )
    path = tmp_path / "baseline.dcm"
    sr.save_as(path)
    dciodvfy(path)
    data = tid1500_json(path, tmp_path)
    assert sr.StudyInstanceUID == STUDY_UID and "PertinentOtherEvidenceSequence" not in sr
    group, features = data["Measurements"]
    assert features["measurementMethod"]["CodeValue"] == "RADIOMX"
    volume = [i for i in group["measurementItems"] if i["quantity"]["CodeValue"] == "118565006"]
    assert [float(i["value"]) for i in volume] == [pytest.approx(4.2)]


def test_a_synthetic_models_long_name_keeps_its_warning() -> None:
    from processing.response_model import SYNTHETIC_STATEMENT
    from reporting.sr import model_algorithm_name

    long_name = f"site response model v1 [{SYNTHETIC_STATEMENT}]"
    assert len(long_name) > 64
    name = model_algorithm_name(long_name)
    assert len(name) <= 64
    assert name == "site response model v1 [SYNTHETIC DATA: NOT CLINICAL]"
    assert model_algorithm_name("site logistic model") == "site logistic model"
    clinical = "a very long clinical model name " * 3
    assert len(model_algorithm_name(clinical)) <= 64
    assert model_algorithm_name(clinical).endswith("...")


def test_shared_content_is_built_once_per_concept_unit_and_parameters() -> None:
    """A report builds each concept, algorithm identification and map reference once; a map
    statistic whose map is in another unit gets its own concept (another scale)."""
    import dataclasses

    from reporting.sr import _concept_for_path, _SharedContent

    shared = _SharedContent(algorithm_name="a", algorithm_version=VERSION, ibsi_codes=None)
    measurements = BASELINE.measurements
    concept = shared.concept("ADC.mean", measurements)
    assert concept is shared.concept("ADC.mean", FOLLOW_UP.measurements)
    assert concept == _concept_for_path("ADC.mean", measurements, None)
    adc = dataclasses.replace(measurements.map_statistics["ADC"], unit="um2/s")
    in_um2 = dataclasses.replace(measurements, map_statistics={"ADC": adc})
    other = shared.concept("ADC.mean", in_um2)
    assert other is not None and concept is not None
    assert (other.scale, concept.scale) == (1.0, pytest.approx(1e6))
    assert shared.concept("radiomics.ADC.original_glcm_Contrast", measurements) is shared.concept(
        "radiomics.ADC.original_glcm_Contrast", in_um2
    )
    assert shared.concept("no_such_quantity.mean", measurements) is None
    algorithm = shared.algorithm(["image=ADC"])
    assert algorithm is shared.algorithm(("image=ADC",))
    assert [(item.name.value, item.value) for item in algorithm] == [
        ("111001", "a"),
        ("111003", VERSION),
        ("111002", "image=ADC"),
    ]
    assert shared.source_map("1.2.3") is shared.source_map("1.2.3")


def test_shared_items_are_written_under_every_measurement(report: tuple[Path, object]) -> None:
    """Items shared by several NUMs in memory are each NUM's own items in the file; a radiomics
    feature is a bare NUM: its image and map are named by its group's algorithm."""
    back = hd.sr.srread(report[0])
    features = [
        (group, m)
        for group in back.content.get_volumetric_roi_measurement_groups()
        for m in group.get_measurements()
        if m.name.scheme_designator in ("IBSI", rcodes.PYRADIOMICS_SCHEME)
    ]
    assert len(features) >= 8  # five ADC features at two time points, less unwritten ones
    maps = {str(pm.SOPInstanceUID) for pm in report[1].pmaps}
    for group, measurement in features:
        assert group.method.value == "RADIOMX"
        assert "image=ADC" in _group_parameters(group)
        assert "ContentSequence" not in measurement[0]
        (named,) = [p for p in _group_parameters(group) if p.startswith("Parametric Map=")]
        assert named.partition("=")[2] in maps
