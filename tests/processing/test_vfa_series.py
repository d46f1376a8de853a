"""VFA T1 from one series per flip angle (acceptance 4), and the refusal of a single flip angle.

The phantom writes the VFA acquisition as three series (flip 3, 10, 20 deg, same grid, TR and
sequence); the node must group them into one VFA acquisition: T10 within 5 % of the phantom
truth in the tumour, ``t1_method`` "variable flip angle" with the series and flips listed and the
B1 caveat. The real Siemens ``t1_vibe_flip3`` series (one flip angle) must not become VFA.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Any

import pydicom
import pytest

from processing.classify import (
    SeriesRole,
    classify_study,
    classify_volume,
    protocol_inventory,
)
from processing.maps import MapSettings, QuantMap, compute_maps, map_statistics
from processing.phantom import generate_patient, true_tumour_mask
from processing.series import SeriesVolume, read_series
from processing.t1 import T1MappingError, VfaT1Model


@functools.cache
def phantom_dce_study(
    agent: str, field_strength: float, vfa_series: bool
) -> tuple[tuple[SeriesVolume, ...], dict[str, Any]]:
    """The baseline DCE and VFA series of a small in-memory phantom, and its ground truth."""
    ph = generate_patient(
        size="small",
        followups=0,
        contrast_agent=agent,
        field_strength=field_strength,
        vfa_series=vfa_series,
    )
    truth = ph.ground_truth
    wanted = {truth["studies"]["baseline"]["series"]["dce"]["folder"]}
    vfa = truth["studies"]["baseline"]["series"]["vfa_t1"]
    wanted |= {s["folder"] for s in vfa.get("separate_series", [])} | {vfa["folder"]}
    by_folder: dict[str, list] = defaultdict(list)
    study = next(s for s in ph.studies if s.key == "baseline")
    from processing.phantom import mr

    for series in study.series:
        if series.folder in wanted:
            for _, ds in mr.series_datasets(ph, study, series):
                by_folder[series.folder].append(ds)
    return tuple(read_series(v) for v in by_folder.values()), truth


def tumour_mean(truth: dict[str, Any], qmap: QuantMap) -> float:
    geometry = {
        "origin": qmap.geometry.origin,
        "spacing": qmap.geometry.spacing,
        "direction": qmap.geometry.direction,
        "size": qmap.geometry.size,
    }
    stats = map_statistics(qmap, true_tumour_mask(truth, "baseline", geometry))
    assert stats["n_voxels"] > 20
    return float(stats["mean"])


def test_vfa_as_separate_series_gives_t10_within_5_percent() -> None:
    volumes, truth = phantom_dce_study("gadobutrol", 1.5, True)
    separate = truth["studies"]["baseline"]["series"]["vfa_t1"]["separate_series"]
    assert [s["flip_deg"] for s in separate] == [3.0, 10.0, 20.0]
    assert len(volumes) == 4 and all(
        v.n_volumes == 1
        for v in volumes
        if v.series_instance_uid
        != truth["studies"]["baseline"]["series"]["dce"]["SeriesInstanceUID"]
    )
    # each flip series alone is not VFA; together they are one acquisition
    inv = protocol_inventory([classify_volume(v) for v in volumes])
    assert inv.dce_t1_method == "vfa"
    assert inv.vfa_t1_series == tuple(s["SeriesInstanceUID"] for s in separate)
    assert all(
        c.role is SeriesRole.VFA_T1
        for c in inv.series
        if c.series_instance_uid in inv.vfa_t1_series
    )
    maps = compute_maps(volumes)
    t1 = maps["T1"]
    prov = t1.provenance
    assert prov["t1_method"] == "variable flip angle"
    assert prov["vfa_layout"] == "one series per flip angle"
    assert [s["flip_angles_deg"] for s in prov["vfa_series"]] == [[3.0], [10.0], [20.0]]
    assert [s["series_instance_uid"] for s in prov["vfa_series"]] == list(inv.vfa_t1_series)
    assert prov["b1_caveat"] == "no B1 correction: flip-angle error biases T1"
    t10_truth_s = truth["studies"]["baseline"]["tumour"]["means_by_series"]["vfa_t1"]["T1_ms"] / 1e3
    t10 = tumour_mean(truth, t1)
    assert abs(t10 / t10_truth_s - 1.0) <= 0.05, (t10, t10_truth_s)
    assert maps["Ktrans"].provenance["t1_method"] == "variable flip angle"
    assert "warning" not in maps["Ktrans"].provenance


def test_series_with_other_tr_or_grid_are_not_grouped() -> None:
    import dataclasses

    volumes, truth = phantom_dce_study("gadobutrol", 1.5, True)
    dce_uid = truth["studies"]["baseline"]["series"]["dce"]["SeriesInstanceUID"]
    flips = [v for v in volumes if v.series_instance_uid != dce_uid]
    # the 20 deg series at another TR: the two remaining flips still make a VFA acquisition
    other_tr = dataclasses.replace(
        flips[2],
        volumes=tuple(dataclasses.replace(m, repetition_time=8.0) for m in flips[2].volumes),
    )
    inv = protocol_inventory([classify_volume(v) for v in (*flips[:2], other_tr)])
    assert inv.vfa_t1_series == tuple(v.series_instance_uid for v in flips[:2])
    assert any(
        other_tr.series_instance_uid in n and "single flip angle" in n for n in inv.vfa_notes
    )
    # one flip series alone: no VFA, a stated reason, and the DCE falls back to a flagged T10
    dce = next(v for v in volumes if v.series_instance_uid == dce_uid)
    inv = protocol_inventory([classify_volume(v) for v in (dce, flips[0])])
    assert inv.vfa_t1 is None and inv.dce_t1_method == "fixed_t10"
    assert len(inv.vfa_notes) == 1 and "T1 needs at least two flip angles" in inv.vfa_notes[0]
    maps = compute_maps([dce, flips[0]], settings=MapSettings())
    assert "T1" not in maps
    prov = maps["Ktrans"].provenance
    assert prov["t1_method"] == "fixed value"
    assert "single flip angle" in prov["t1_provenance"]["reason"]
    assert "fixed T10" in prov["warning"]


def test_single_flip_model_is_refused_with_a_reason() -> None:
    with pytest.raises(T1MappingError, match="at least two distinct flip angles, got \\[3.0\\]"):
        VfaT1Model([3.0, 3.0], 0.004)


def test_real_siemens_single_flip_vibe_is_not_vfa() -> None:
    from tests.real_data import real_series_dir

    root = real_series_dir("imagedata_cohort")
    by_study: dict[str, list] = defaultdict(list)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except pydicom.errors.InvalidDicomError:
            continue
        by_study[str(ds.StudyInstanceUID)].append(ds)
    vibe_seen = 0
    for datasets in by_study.values():
        inv = classify_study(datasets)
        vibes = [s for s in inv.series if s.flip_angles == (3.0,) and s.n_volumes == 1]
        for s in vibes:
            vibe_seen += 1
            assert s.role is not SeriesRole.VFA_T1
            assert any(
                s.series_instance_uid in n and "single flip angle (3 deg" in n
                for n in inv.vfa_notes
            ), inv.vfa_notes
        assert inv.vfa_t1 is None and "t1_vfa" not in inv.analyses
    assert vibe_seen >= 2


def test_phantom_cli_choices_match_the_generator() -> None:
    from node.commands import phantom as command
    from processing.phantom import protocol

    assert command.CONTRAST_AGENTS == tuple(protocol.CONTRAST_AGENTS)
    assert command.FIELD_STRENGTHS == protocol.FIELD_STRENGTHS_T
    with pytest.raises(ValueError, match="field strength"):
        generate_patient(size="small", followups=0, field_strength=7.0)
