"""The one runner (node.pipeline): its sources apply IOCM rejection notes everywhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.analysis import patient_datasets
from node.chain import ChainError
from node.errors import NodeError
from node.index import Index
from node.pipeline import DicomFolder, StorePatient, run_patient, without_rejected
from node.roles import PatientMismatchError
from node.store import Store
from node.timeline import TimelineError
from tests.node import dicom_factory as factory


def _uids(datasets: list[Dataset]) -> set[str]:
    return {str(ds.SOPInstanceUID) for ds in datasets}


def test_domain_errors_have_their_own_hierarchy_not_value_error():
    from processing.adc_qa import AdcQaError
    from processing.course import CourseError
    from processing.diffusion_encoding import DiffusionEncodingError
    from processing.errors import FitError, InputError, ProcessingError
    from processing.lesion import LesionError
    from processing.radiomics import RadiomicsError
    from processing.registration import RegistrationError
    from processing.relaxivity import RelaxivityError
    from processing.rtstruct import RTStructError
    from processing.series import MissingSliceError, SeriesError
    from processing.t1 import T1MappingError
    from reporting.seg import ReaderSegmentationError, SourceGeometryError

    inputs = (
        AdcQaError,
        CourseError,
        DiffusionEncodingError,
        RadiomicsError,
        RelaxivityError,
        RTStructError,
        SeriesError,
        MissingSliceError,
        T1MappingError,
        ReaderSegmentationError,
        SourceGeometryError,
    )
    for error in inputs:
        assert issubclass(error, InputError) and not issubclass(error, ValueError), error
    for error in (LesionError, RegistrationError):
        assert issubclass(error, FitError) and not issubclass(error, ValueError), error
    assert issubclass(InputError, ProcessingError) and issubclass(FitError, ProcessingError)
    for error in (ChainError, PatientMismatchError, TimelineError):
        assert issubclass(error, NodeError) and not issubclass(error, ValueError), error


def test_without_rejected_drops_the_rejected_instances_and_every_key_object_selection():
    study = generate_uid()
    wrong, kept = factory.mr_series(study, 3, 0), factory.mr_series(study, 2, 10)
    note = factory.rejection_note(wrong)
    teaching = factory.rejection_note(kept, code_value="113004", meaning="For Teaching")
    remaining = without_rejected([*wrong, note, *kept, teaching])
    assert [str(d.SOPInstanceUID) for d in remaining] == [str(d.SOPInstanceUID) for d in kept]
    assert without_rejected([*wrong, *kept]) == [*wrong, *kept]  # no note: everything, in order


def test_folder_source_applies_the_notes_it_holds_and_skips_non_dicom(tmp_path):
    study = generate_uid()
    wrong, kept = factory.mr_series(study, 3, 0), factory.mr_series(study, 2, 10)
    folder = tmp_path / "in"
    (folder / "images").mkdir(parents=True)
    for n, ds in enumerate([*wrong, *kept]):
        ds.save_as(folder / "images" / f"{n:02d}.dcm", enforce_file_format=True)
    factory.rejection_note(wrong).save_as(folder / "note.dcm", enforce_file_format=True)
    (folder / "README.txt").write_text("not DICOM", encoding="utf-8")
    source = DicomFolder([folder])
    assert _uids(source.load()) == _uids(kept)
    assert [p.name for p, _ in source.skipped] == ["README.txt"]
    with pytest.raises(FileNotFoundError):
        DicomFolder([tmp_path / "missing"]).load()


def test_store_source_reads_like_patient_datasets(tmp_path):
    index = Index(tmp_path / "storage" / "index.sqlite3")
    store = Store(tmp_path / "storage", index)
    study = generate_uid()
    wrong, kept = factory.mr_series(study, 2, 0), factory.mr_series(study, 2, 10)
    for n, ds in enumerate([*wrong, *kept, factory.rejection_note(wrong)]):
        path = tmp_path / f"in-{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        store.accept_file(
            path,
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            request_sop_class_uid=str(ds.SOPClassUID),
            request_sop_instance_uid=str(ds.SOPInstanceUID),
            calling_ae="PACS",
        )
    expected = _uids(patient_datasets(index, store.root, 1))
    assert expected == _uids(kept)
    assert _uids(StorePatient(index, store.root, 1).load()) == expected
    # by path: the index is opened for the read only (the analysis child process)
    assert _uids(StorePatient(index.path, store.root, 1).load()) == expected
    index.close()


def test_nothing_to_analyse_is_an_outcome_not_an_exception(tmp_path):
    study = generate_uid()
    folder = tmp_path / "in"
    folder.mkdir()
    for n, ds in enumerate(factory.mr_series(study, 2, 0)):
        ds.save_as(folder / f"{n}.dcm", enforce_file_format=True)
    outcome = run_patient(DicomFolder([folder]), out_dir=tmp_path / "out")
    assert outcome.state == "waiting" and outcome.result is None
    assert "no CyberKnife treatment course" in (outcome.reason or "")
    assert outcome.inputs == "2 instances in 1 series of 1 studies"
    assert outcome.calls == [] and outcome.paths == []
    assert not (tmp_path / "out").exists()  # nothing written
    other = factory.mr_series(generate_uid(), 1, 5, patient_id="OTHER-PATIENT")
    other[0].save_as(folder / "other.dcm", enforce_file_format=True)
    mixed = run_patient(DicomFolder([folder]))
    assert mixed.state == "waiting" and mixed.reason is not None


def _copy_with_rejected_plan(phantom: Path, folder: Path) -> str:
    """Copy a phantom patient and add a rejection note withdrawing its RT Plan."""
    shutil.copytree(phantom, folder)
    plans = [
        ds
        for ds in (dcmread(p) for p in sorted((folder / "rt").rglob("*.dcm")))
        if ds.Modality == "RTPLAN"
    ]
    assert plans
    factory.rejection_note(plans).save_as(folder / "rt" / "rejection.dcm", enforce_file_format=True)
    return str(plans[0].SOPInstanceUID)


def test_a_rejection_note_in_a_folder_withdraws_the_plan(make_phantom, tmp_path):
    folder = tmp_path / "patient"
    plan_uid = _copy_with_rejected_plan(make_phantom("responder"), folder)
    datasets = DicomFolder([folder]).load()
    assert plan_uid not in _uids(datasets)
    assert not any(ds.Modality == "KO" for ds in datasets)
    outcome = run_patient(DicomFolder([folder]))
    # without its plan the patient has no course: nothing is analysed from rejected data
    assert outcome.state == "waiting"
    assert "no CyberKnife treatment course" in (outcome.reason or "")


def test_cohort_patients_go_through_the_runner_with_rejections(make_phantom, tmp_path, monkeypatch):
    import node.commands.phantom as phantom_command
    from node.commands.cohort import CohortPatient, analyse_patient

    phantom = make_phantom("responder")

    def fake_write_phantom(out: Path, **kwargs: object) -> dict:
        _copy_with_rejected_plan(phantom, Path(out))
        return json.loads((phantom / "ground_truth.json").read_text(encoding="utf-8"))

    monkeypatch.setattr(phantom_command, "write_phantom", fake_write_phantom)
    status = analyse_patient(CohortPatient(1, "responder", "standard", 7), tmp_path / "P001")
    assert status["state"] == "failed"
    assert status["reason"].startswith("nothing to analyse: no CyberKnife treatment course")
    assert not (tmp_path / "P001").exists()  # removed unless keep
