"""IHE IOCM rejection notes: parsed, recorded durably, and respected by every analysis."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComprehensiveSRStorage, ExplicitVRLittleEndian, generate_uid

from node.analysis import link_superseded_reports, patient_datasets
from node.index import Index
from node.rejection import rejection_note
from node.store import Store
from tests.node import dicom_factory as factory


def _store(tmp_path: Path) -> Store:
    return Store(tmp_path / "storage", Index(tmp_path / "storage" / "index.sqlite3"))


def _accept(store: Store, ds: Dataset, tmp_path: Path) -> None:
    path = tmp_path / f"in-{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    store.accept_file(
        path,
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        request_sop_class_uid=str(ds.SOPClassUID),
        request_sop_instance_uid=str(ds.SOPInstanceUID),
        calling_ae="PACS",
    )


def test_rejection_note_is_recognised_by_its_title():
    study = generate_uid()
    images = factory.mr_series(study, 3, 0)
    note = rejection_note(factory.rejection_note(images))
    assert note is not None
    assert note.reason == "Rejected for Quality Reasons"
    assert set(note.rejected) == {str(d.SOPInstanceUID) for d in images}
    # a key object selection with another title is an ordinary object; images are not notes
    teaching = factory.rejection_note(images, code_value="113004", meaning="For Teaching")
    assert rejection_note(teaching) is None
    assert rejection_note(images[0]) is None


def test_rejected_instances_are_left_out_of_the_analysis(tmp_path):
    store = _store(tmp_path)
    study = generate_uid()
    wrong, kept = factory.mr_series(study, 3, 0), factory.mr_series(study, 2, 10)
    for ds in wrong + kept:
        _accept(store, ds, tmp_path)
    patient = 1
    assert len(patient_datasets(store.index, store.root, patient)) == 5
    assert store.index.mark_stable(study) is False  # analysed once
    _accept(store, factory.rejection_note(wrong), tmp_path)
    # the note is stored (it was acknowledged) and recorded with its reason, atomically
    rows = store.index.query("SELECT sop_instance_uid, reason FROM rejections")
    assert {r[0] for r in rows} == {str(d.SOPInstanceUID) for d in wrong}
    assert {r[1] for r in rows} == {"Rejected for Quality Reasons"}
    [event] = store.index.events("instances_rejected")
    assert event["study_uid"] == study and event["detail"].startswith("3 instance(s)")
    # analysis sees only the instances still valid: neither the rejected ones nor the note
    remaining = {str(d.SOPInstanceUID) for d in patient_datasets(store.index, store.root, patient)}
    assert remaining == {str(d.SOPInstanceUID) for d in kept}
    # the note re-opens its study: when it is stable again it is amended, and re-analysed
    assert store.index.mark_stable(study) is True


def test_instance_arriving_after_its_rejection_note_stays_hidden(tmp_path):
    store = _store(tmp_path)
    study = generate_uid()
    images = factory.mr_series(study, 2, 0)
    _accept(store, images[0], tmp_path)
    _accept(store, factory.rejection_note(images), tmp_path)
    _accept(store, images[1], tmp_path)  # a late copy of a rejected image
    assert patient_datasets(store.index, store.root, 1) == []


def _sr(study: str, series: str, path: Path) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ComprehensiveSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "SR"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_new_report_names_the_report_it_supersedes(tmp_path):
    study, other = generate_uid(), generate_uid()
    old_series = generate_uid()
    previous = {
        study: [
            {
                "sop_class_uid": ComprehensiveSRStorage,
                "sop_instance_uid": "1.2.3.4",
                "series_instance_uid": old_series,
            }
        ]
    }
    changed = _sr(study, generate_uid(), tmp_path / "a.dcm")
    untouched = _sr(other, generate_uid(), tmp_path / "b.dcm")
    assert link_superseded_reports([changed, untouched], previous) == 1
    item = dcmread(changed).PredecessorDocumentsSequence[0]
    assert item.StudyInstanceUID == study
    assert item.ReferencedSeriesSequence[0].SeriesInstanceUID == old_series
    ref = item.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        ComprehensiveSRStorage,
        "1.2.3.4",
    )
    assert "PredecessorDocumentsSequence" not in dcmread(untouched)
    # the same report again (same UID as recorded): nothing to supersede
    same = {
        study: [
            {
                "sop_class_uid": ComprehensiveSRStorage,
                "sop_instance_uid": str(dcmread(changed).SOPInstanceUID),
                "series_instance_uid": old_series,
            }
        ]
    }
    assert link_superseded_reports([changed], same) == 0
