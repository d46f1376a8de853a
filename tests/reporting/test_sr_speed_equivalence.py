"""The SR build's speed-ups keep its output: garbage collector paused during the build (and
restored), content items marked as written in the report's encoding (same bytes, one
ambiguous-VR pass instead of one per ancestor), one concept-name object per code."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import highdicom as hd
import pydicom.filewriter
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO

from reporting import sr as srmod
from tests.reporting.results_fixture import BASELINE, FOLLOW_UP, VERSION, build_inputs


def _build() -> hd.sr.Comprehensive3DSR:
    objects = build_inputs(VERSION)
    return srmod.build_measurement_report(
        [FOLLOW_UP, BASELINE],
        segmentations=objects.segs,
        parametric_maps=objects.pmaps,
        source_images=objects.baseline_sources + objects.follow_up_sources,
        algorithm_version=VERSION,
        algorithm_parameters={"rule_set": "spine-sbrt-response 1.0"},
    )


@pytest.fixture(scope="module")
def report() -> hd.sr.Comprehensive3DSR:
    return _build()


def _items(ds: Dataset) -> Iterator[Dataset]:
    """Every item of every sequence of ``ds``, at any depth, as often as the writer visits it."""
    for elem in ds.values():
        if elem.VR == "SQ":
            for item in elem.value:
                yield item
                yield from _items(item)


def _content_items(sr: Dataset) -> Iterator[Dataset]:
    for item in sr.ContentSequence:
        yield item
        yield from _items(item)


def _unmarked(ds: Dataset) -> None:
    for item in _content_items(ds):
        item.set_original_encoding(None, None, "")


def _file_bytes(ds: Dataset) -> bytes:
    out = DicomBytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _dataset_bytes(ds: Dataset, *, implicit: bool) -> bytes:
    out = DicomBytesIO()
    out.is_implicit_VR, out.is_little_endian = implicit, True
    pydicom.filewriter.write_dataset(out, ds)
    return out.getvalue()


def test_marked_content_is_written_to_the_same_bytes_with_one_correction_pass(
    report: hd.sr.Comprehensive3DSR, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Marked items skip pydicom's per-item ambiguous-VR pass; the document's pass over the
    whole tree still runs; file, explicit and implicit VR encodings are unchanged."""
    calls = [0]
    correct = pydicom.filewriter.correct_ambiguous_vr

    def counted(*args: object, **kwargs: object) -> Dataset:
        calls[0] += 1
        return correct(*args, **kwargs)

    monkeypatch.setattr(pydicom.filewriter, "correct_ambiguous_vr", counted)
    content = list(_content_items(report))
    assert content and all(item.original_encoding == (False, True) for item in content)
    assert report.original_encoding == (None, None)  # the document's own pass always runs
    marked = _file_bytes(report)
    marked_calls, calls[0] = calls[0], 0
    marked_implicit = _dataset_bytes(report, implicit=True)
    marked_explicit = _dataset_bytes(report, implicit=False)

    copy = _build()
    copy.ContentDate, copy.ContentTime = report.ContentDate, report.ContentTime
    copy.InstanceCreationDate = report.InstanceCreationDate
    copy.InstanceCreationTime = report.InstanceCreationTime
    copy.ContributingEquipmentSequence = report.ContributingEquipmentSequence
    _unmarked(copy)
    calls[0] = 0
    unmarked = _file_bytes(copy)
    unmarked_calls = calls[0]
    assert marked == unmarked
    assert _dataset_bytes(copy, implicit=True) == marked_implicit
    assert _dataset_bytes(copy, implicit=False) == marked_explicit
    # about one pass: the document's over each dataset of the tree (plus the small passes of the
    # unmarked evidence and header sequences); unmarked, each item is corrected once per ancestor
    datasets = 1 + len(list(_items(report)))
    assert datasets <= marked_calls < 2 * datasets < unmarked_calls


def test_an_item_with_a_raw_element_is_not_marked() -> None:
    raw = Dataset()
    raw[0x00100010] = pydicom.dataelem.RawDataElement(
        pydicom.tag.Tag(0x00100010), None, 4, b"Doe^", 0, True, True
    )
    built = Dataset()
    built.PatientName = "Doe"
    sr = Dataset()
    sr.file_meta = pydicom.dataset.FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    sr.ContentSequence = [raw, built]
    srmod._mark_content_encoding(sr)
    assert raw.original_encoding == (None, None)
    assert built.original_encoding == (False, True)


def test_the_collector_is_paused_during_the_build_and_restored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[bool] = []
    planar_groups = srmod.planar_groups

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(gc.isenabled())
        return planar_groups(*args, **kwargs)

    monkeypatch.setattr(srmod, "planar_groups", spy)
    assert gc.isenabled()
    _build()
    assert seen == [False] and gc.isenabled()
    gc.disable()
    try:
        _build()
        assert not gc.isenabled()  # a caller's own pause is left as it was
    finally:
        gc.enable()
    with pytest.raises(ValueError):
        srmod.build_measurement_report([], segmentations=[], algorithm_version=VERSION)
    assert gc.isenabled()  # also after a failed build


def test_overlapping_pauses_enable_the_collector_when_the_last_ends() -> None:
    assert gc.isenabled()
    first_in, second_out = threading.Event(), threading.Event()
    states: list[bool] = []

    def first() -> None:
        with srmod._collector_paused():
            first_in.set()
            second_out.wait(10)
            states.append(gc.isenabled())  # the other build has ended: still paused

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(10)
    with srmod._collector_paused():
        pass
    second_out.set()
    thread.join(10)
    assert states == [False]
    assert gc.isenabled()


def test_a_feature_has_one_concept_name_object_for_all_images() -> None:
    shared = srmod._SharedContent(algorithm_name="a", algorithm_version=VERSION, ibsi_codes=None)
    names = [
        shared.concept(f"radiomics.{image}.original_shape_Sphericity", BASELINE.measurements)
        for image in ("ADC", "Ktrans", "T2w")
    ]
    assert all(c is not None for c in names)
    first = names[0]
    assert first is not None
    assert all(c is not None and c.name is first.name for c in names)
    direct = srmod._concept_for_path(
        "radiomics.ADC.original_shape_Sphericity", BASELINE.measurements, None
    )
    assert direct is not None and first.name == direct.name


def test_the_document_equals_highdicoms_constructor_on_the_whole_tree(
    report: hd.sr.Comprehensive3DSR, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built with its Image Library and Imaging Measurements set aside during highdicom's
    constructor: the same bytes as the constructor given the whole tree (timestamps aside), the
    same content when highdicom reads it, and the same refusal of a reference without
    evidence."""

    def highdicom_whole_tree(
        *, evidence: list[Dataset], report: hd.sr.MeasurementReport, **kwargs: object
    ) -> hd.sr.Comprehensive3DSR:
        return hd.sr.Comprehensive3DSR(evidence=evidence, content=report, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(srmod, "_document", highdicom_whole_tree)
        whole = _build()
    assert type(whole) is hd.sr.Comprehensive3DSR and isinstance(report, srmod.LongitudinalReport)
    for keyword in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"):
        setattr(whole, keyword, getattr(report, keyword))
    whole.ContributingEquipmentSequence = report.ContributingEquipmentSequence
    assert _file_bytes(whole) == _file_bytes(report)
    assert len(report.ContentSequence) == 10  # observer context ... Image Library, measurements
    # highdicom's view of the content, parsed on first use: the whole tree, as the constructor's
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert len(groups) >= 4
    assert [g.tracking_uid for g in groups] == [
        g.tracking_uid
        for g in hd.sr.Comprehensive3DSR.from_dataset(
            whole
        ).content.get_volumetric_roi_measurement_groups()
    ]
    assert report.content is report.content  # parsed once

    # evidence missing a Parametric Map the measurements reference
    document = srmod._document
    dropped = str(build_inputs(VERSION).pmaps[0].SOPInstanceUID)

    def without_a_map(*, evidence: list[Dataset], **kwargs: object) -> object:
        kept = [ds for ds in evidence if str(ds.SOPInstanceUID) != dropped]
        assert len(kept) == len(evidence) - 1
        return document(evidence=kept, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(srmod, "_document", without_a_map)
    with pytest.raises(ValueError, match=f"no evidence was given for instances .*{dropped}"):
        _build()
