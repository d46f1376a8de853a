"""The per-study map cache (node.map_cache): a re-analysis refits only the studies that changed.

Issue 14, acceptance 3: re-analysing a patient after one new follow-up refits only the new study's
maps (the fits are counted by wrapping the real :func:`processing.maps.compute_maps`), and the
summary and every output UID equal those of an uncached run. The baseline's perturbation
repeatability is kept in the same cache (issue 18: re-analysis cost) and equals the computed one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

import processing.maps
from node.analysis import write_outputs
from node.chain import ChainSettings, run_chain
from node.map_cache import MapCache, cache_key, instance_digest


def _datasets(patient: Path, folders: list[str]) -> list:
    return [
        dcmread(path)
        for folder in folders
        for path in sorted((patient / folder).rglob("*"))
        if path.is_file() and path.suffix.lower() in (".dcm", "")
    ]


def _without_timings(value: Any) -> Any:
    """The summary without wall times (chain timings, per-map fit durations)."""
    if isinstance(value, dict):
        return {
            k: _without_timings(v) for k, v in value.items() if k not in ("timings_s", "elapsed_s")
        }
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


@pytest.fixture
def counted_fits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry (the number of maps) per call of the real compute_maps."""
    calls: list[int] = []
    real = processing.maps.compute_maps

    def counting(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        calls.append(len(out))
        return out

    monkeypatch.setattr(processing.maps, "compute_maps", counting)
    return calls


def test_new_follow_up_refits_only_its_study(make_phantom, tmp_path, counted_fits):
    patient = make_phantom("responder", "standard", "small", followups=2)
    cache = MapCache(tmp_path / "cache")
    first = run_chain(
        _datasets(patient, ["baseline", "rt", "followup1"]),
        settings=ChainSettings(radiomics=False, outputs=False),
        map_cache=cache,
    )
    assert len(counted_fits) == 2 and all(counted_fits)  # baseline and follow-up 1, with maps
    assert not any(k.startswith("maps cached") for k in first.timings)
    assert "repeatability" in first.timings and "repeatability cached" not in first.timings
    entries = [p.name for p in (tmp_path / "cache").glob("*.npz")]
    assert len([n for n in entries if n.count(".") == 1]) == 2  # the two studies' maps
    assert len(list((tmp_path / "cache").glob("*.repeatability.json"))) == 1
    # follow-up 1's registration and lesion
    assert len(list((tmp_path / "cache").glob("*.followup_lesion.json"))) == 1
    assert not any(k.startswith("lesion cached") for k in first.timings)

    # the full chain (repeatability, DICOM outputs) without radiomics: the maps feed the same
    # measurements, changes and Parametric Maps, in half the time
    full = ChainSettings(radiomics=False)
    counted_fits.clear()
    cached = run_chain(
        _datasets(patient, ["baseline", "rt", "followup1", "followup2"]),
        settings=full,
        map_cache=cache,
    )
    assert len(counted_fits) == 1  # only follow-up 2 is fitted
    assert len(cached.studies) == 3
    hits = sorted(
        k.removeprefix("maps cached: ") for k in cached.timings if k.startswith("maps cached: ")
    )
    assert hits == sorted(s.study_instance_uid for s in cached.studies[:2])
    # the baseline's perturbation repeatability, from the first run's entry
    assert "repeatability cached" in cached.timings and "repeatability" not in cached.timings
    # follow-up 1 registered and its lesion found by the first run; follow-up 2 computed
    lesions = [k.removeprefix("lesion cached: ") for k in cached.timings if "lesion cached" in k]
    assert lesions == [cached.studies[1].study_instance_uid]

    counted_fits.clear()
    uncached = run_chain(
        _datasets(patient, ["baseline", "rt", "followup1", "followup2"]), settings=full
    )
    assert len(counted_fits) == 3
    assert "repeatability" in uncached.timings
    fit_time = uncached.timings["maps"]
    read_time = sum(v for k, v in cached.timings.items() if k.startswith("maps cached: "))
    print(
        f"maps: {fit_time:.1f} s for 3 studies uncached; cached run: "
        f"{cached.timings['maps']:.1f} s fitting 1 study + {read_time:.2f} s reading 2 entries"
    )

    for study_c, study_u in zip(cached.studies, uncached.studies, strict=True):
        assert study_c.maps.keys() == study_u.maps.keys()
        for quantity, qmap in study_u.maps.items():
            prov_c = dict(study_c.maps[quantity].provenance)
            prov_u = dict(qmap.provenance)
            prov_c.pop("elapsed_s", None), prov_u.pop("elapsed_s", None)
            assert repr(prov_c) == repr(prov_u), quantity  # same values and types
    out_c, out_u = tmp_path / "cached", tmp_path / "uncached"
    write_outputs(cached, out_c)
    write_outputs(uncached, out_u)
    summary_c = json.loads((out_c / "summary.json").read_text())
    summary_u = json.loads((out_u / "summary.json").read_text())
    assert _without_timings(summary_c) == _without_timings(summary_u)
    assert summary_c["outputs"] and summary_c["outputs"] == summary_u["outputs"]
    uids_c = sorted(str(ds.SOPInstanceUID) for ds in cached.outputs)
    uids_u = sorted(str(ds.SOPInstanceUID) for ds in uncached.outputs)
    assert uids_c == uids_u and len(uids_c) == len(cached.outputs)
    # the Parametric Maps carry the same pixel values (cached float32 maps are exact)
    pm = "1.2.840.10008.5.1.4.1.1.30"
    pixels_c = {
        str(ds.SOPInstanceUID): ds.FloatPixelData for ds in cached.outputs if ds.SOPClassUID == pm
    }
    pixels_u = {
        str(ds.SOPInstanceUID): ds.FloatPixelData for ds in uncached.outputs if ds.SOPClassUID == pm
    }
    assert pixels_c and pixels_c == pixels_u


def test_corrupt_entry_is_a_miss_and_a_corrected_instance_changes_the_key(
    make_phantom, tmp_path, caplog
):
    patient = make_phantom("responder", "standard", "small", followups=2)
    import numpy as np

    from processing.classify import classify_study
    from processing.maps import MapSettings, QuantMap
    from processing.series import group_by_series

    baseline = _datasets(patient, ["baseline"])
    volumes: dict[str, Any] = {}
    inventory = classify_study(baseline, volumes=volumes)
    series_uid = next(c.series_instance_uid for c in inventory.series if c.role.value == "dwi")
    dwi = list(group_by_series(baseline, set_aside=[])[series_uid])
    settings = MapSettings()
    key = cache_key(dwi, settings)
    # a map on the DWI grid whose provenance has the types a fit records (tuples, numpy scalars,
    # NaN, nested settings); the full round trip of fitted maps is checked above
    volume = volumes[series_uid]
    geometry = volume.geometry
    values = np.full(tuple(reversed(geometry.size)), np.nan, dtype=np.float32)
    values[:, 2:5, 3:7] = np.float32(1.25e-3)
    maps = {
        "ADC": QuantMap(
            "ADC",
            values,
            np.isfinite(values),
            "mm2/s",
            geometry,
            series_uid,
            {
                "model": "monoexponential",
                "b_values": (0.0, 50.0, 1000.0),
                "snr": np.float64(12.5),
                "n": np.int64(3),
                "r2": float("nan"),
                "settings": {"adc_weighting": "none", "grid": [1, (2, 3)]},
                "elapsed_s": 0.5,
            },
        )
    }
    cache = MapCache(tmp_path / "cache")
    assert cache.put(key, maps)
    again = cache.get(key)
    assert again is not None and again.keys() == maps.keys()
    for quantity, qmap in maps.items():
        got = again[quantity]
        assert (
            got.values.tobytes() == qmap.values.tobytes()
            and (got.valid == qmap.valid).all()
            and got.geometry == qmap.geometry
            and got.unit == qmap.unit
            and repr(got.provenance) == repr(qmap.provenance)
        )

    # a truncated array file: a miss with a warning, never a crash
    npz = tmp_path / "cache" / f"{key}.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="node.map_cache"):
        assert cache.get(key) is None
    assert "unreadable" in caplog.text
    # an unreadable description too
    assert cache.put(key, maps) and cache.get(key) is not None
    (tmp_path / "cache" / f"{key}.json").write_text("{not json")
    assert cache.get(key) is None

    # a corrected instance re-sent under the same SOP Instance UID changes the key, as do the
    # settings
    pristine = [dcmread(ds.filename) for ds in dwi]
    corrected = [dcmread(ds.filename) for ds in dwi]
    corrected[0].PixelData = bytes(len(corrected[0].PixelData))
    for ds in (*pristine, *corrected):
        ds.filename = None  # held in memory: digested from their encoding
    assert instance_digest(corrected[-1]) == instance_digest(pristine[-1])
    assert instance_digest(corrected[0]) != instance_digest(pristine[0])
    assert cache_key(corrected, settings) != cache_key(pristine, settings)
    assert str(corrected[0].SOPInstanceUID) == str(dwi[0].SOPInstanceUID)
    assert cache_key(dwi, MapSettings(adc_weighting="S2")) != key


def test_prune_keeps_the_newest_entries_within_the_limit(tmp_path):
    """The worker prunes the cache to ``[analysis] map_cache_mb`` after each analysis."""
    import os

    import numpy as np

    from node.config import AnalysisSection
    from processing.maps import QuantMap
    from processing.series import Geometry

    geometry = Geometry(
        origin=(0.0, 0.0, 0.0),
        spacing=(1.0, 1.0, 1.0),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        size=(64, 64, 16),
    )
    rng = np.random.default_rng(0)  # incompressible values: every entry has the same size
    cache = MapCache(tmp_path / "cache")
    keys = [f"{n:064x}" for n in range(4)]
    for n, key in enumerate(keys):
        values = rng.random((16, 64, 64), dtype=np.float32)
        assert cache.put(
            key,
            {
                "ADC": QuantMap(
                    "ADC", values, np.isfinite(values), "mm2/s", geometry, "1.2.3", {"n": n}
                )
            },
        )
        for path in (tmp_path / "cache").glob(f"{key}.*"):
            os.utime(path, (1_000_000 + n, 1_000_000 + n))  # written in this order
    entry = sum(p.stat().st_size for p in (tmp_path / "cache").glob(f"{keys[0]}.*"))
    assert cache.prune(int(2.5 * entry)) == 2
    assert [cache.get(k) is not None for k in keys] == [False, False, True, True]
    assert cache.prune(10 * entry) == 0
    assert AnalysisSection().map_cache_mb == 2048 and AnalysisSection(map_cache_mb=0)


def test_derived_entries_round_trip_and_a_damaged_one_is_a_miss(tmp_path, caplog):
    """A derived result (a follow-up's registration and lesion) comes back equal, type for
    type, with its arrays; a damaged array file or another kind under the key is a miss."""
    import numpy as np

    cache = MapCache(tmp_path / "cache")
    key = "ab" * 32
    description = {
        "registration": {
            "matrix": np.eye(4) * 1.5,
            "translation_mm": (0.1, -2.0, 3.25),
            "dice": None,
            "passed": False,
            "reasons": ("dice 0.41 < 0.5",),
            "attempts": 2,
        },
        "lesion_notes": ("propagated baseline GTV 1.20 mL -> 1.19 mL",),
        "lesion_delineation": {"volume_range_ml": [1.0, 1.4], "not_delineated": None},
        "mi": float("nan"),
    }
    mask = (np.arange(60).reshape(3, 4, 5) % 7 == 0).astype(np.uint8)
    assert cache.put_entry("followup_lesion", key, description, {"mask": mask})
    entry = cache.get_entry("followup_lesion", key)
    assert entry is not None
    restored, arrays = entry
    assert restored["registration"]["translation_mm"] == (0.1, -2.0, 3.25)
    assert type(restored["lesion_notes"]) is tuple and np.isnan(restored["mi"])
    assert np.array_equal(restored["registration"]["matrix"], np.eye(4) * 1.5)
    assert arrays["mask"].dtype == np.uint8 and np.array_equal(arrays["mask"], mask)
    assert cache.get_entry("other_kind", key) is None  # nothing of that kind under the key
    npz = tmp_path / "cache" / f"{key}.followup_lesion.npz"
    npz.write_bytes(npz.read_bytes()[:-10])
    with caplog.at_level(logging.WARNING, logger="node.map_cache"):
        assert cache.get_entry("followup_lesion", key) is None
    assert "unreadable" in caplog.text
    with pytest.raises(ValueError):
        cache.get_entry("not/a kind", key)


def test_a_file_digest_is_read_once_and_follows_the_file(tmp_path):
    """instance_digest keeps a file's digest on its dataset while the file is unchanged (an
    analysis keys the baseline's series several times); a rewritten file is digested anew."""
    import os

    from tests.node.dicom_factory import write_mr_series

    path = write_mr_series(tmp_path / "s", 1, rows=8, columns=8)[0]
    ds = dcmread(path)
    first = instance_digest(ds)
    assert ds.__dict__["_content_digest"][1] == first and instance_digest(ds) == first
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # one pixel byte changed, the file rewritten later
    path.write_bytes(bytes(data))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert instance_digest(ds) != first


def test_a_file_digest_covers_the_dataset_not_the_file_meta_a_receiver_writes(tmp_path):
    """The same instance written by another application (its own file meta information: the
    receiving node's implementation UID, the sender's AE title) has the same digest, so a cache
    shared by ``analyze`` and the node serves both; a changed dataset byte, or the dataset in
    another transfer syntax, has another digest. Checked end to end over the network in
    tests/e2e/test_node_roundtrip.py (the node's map cache shared with the analyses)."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    from node.map_cache import _dataset_offset
    from tests.node.dicom_factory import write_mr_series

    path = write_mr_series(tmp_path / "s", 1, rows=8, columns=8)[0]
    original = dcmread(path)
    received = dcmread(path)
    received.file_meta.ImplementationClassUID = "1.2.826.0.1.3680043.9.3811.3.0.4"
    received.file_meta.ImplementationVersionName = "PYNETDICOM_304"
    received.file_meta.SourceApplicationEntityTitle = "STORESCU"
    copy = tmp_path / "received.dcm"
    received.save_as(copy, enforce_file_format=True)
    head = copy.read_bytes()
    assert _dataset_offset(head) != _dataset_offset(path.read_bytes())  # longer file meta
    assert head[_dataset_offset(head) :] == path.read_bytes()[_dataset_offset(path.read_bytes()) :]
    assert instance_digest(dcmread(copy)) == instance_digest(original)

    changed = dcmread(path)
    changed.SeriesDescription = "another"
    changed.save_as(tmp_path / "changed.dcm", enforce_file_format=True)
    assert instance_digest(dcmread(tmp_path / "changed.dcm")) != instance_digest(original)
    other = dcmread(path)
    syntax = original.file_meta.TransferSyntaxUID
    other.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if syntax == ExplicitVRLittleEndian else ExplicitVRLittleEndian
    )
    other.save_as(tmp_path / "other.dcm", enforce_file_format=True)
    assert instance_digest(dcmread(tmp_path / "other.dcm")) != instance_digest(original)
    # a file without file meta information (a bare dataset) is digested whole
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(path.read_bytes()[_dataset_offset(path.read_bytes()) :])
    assert _dataset_offset(bare.read_bytes()) is None
    assert instance_digest(dcmread(bare, force=True)) != instance_digest(original)


def test_the_map_cache_folder_is_configurable_and_relative_to_the_file(tmp_path):
    from node.config import load_settings

    config = tmp_path / "conf" / "node.toml"
    config.parent.mkdir()
    config.write_text('[analysis]\nmap_cache_dir = "shared-maps"\n', encoding="utf-8")
    assert load_settings(config).analysis.map_cache_dir == tmp_path / "conf" / "shared-maps"
    assert load_settings(None).analysis.map_cache_dir is None  # <storage>/cache/maps
