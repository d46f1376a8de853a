"""Importing files (``node.ingest.import_files``): one header read per file, batched commits.

The import must store exactly what the one-file-at-a-time path (``Store.accept_file`` per
file, one index transaction each) stores, and keep "fsynced before the index records it".
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

from node.errors import NodeError, StoreOutcome
from node.index import Index
from node.ingest import ImportReport, import_files, iter_files
from node.store import Store
from processing.series import MEDIA_STORAGE_DIRECTORY
from tests.node import dicom_factory as factory

#: columns holding a time (differ between two imports)
_TIMES = {"received", "first_received", "last_received", "time", "stable_at"}


def _store(root: Path) -> Store:
    return Store(root / "storage", Index(root / "storage" / "index.sqlite3"))


def _one_by_one(store: Store, paths: list[Path]) -> ImportReport:
    """The import as it was: a read of the UIDs, then ``accept_file`` (its own read, its own
    fsyncs and index transaction) for every file."""
    report = ImportReport()
    for path in paths:
        try:
            header = dcmread(
                path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"]
            )
            if str(header.file_meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
                report.skipped.append((path, "DICOMDIR"))
                continue
            result = store.accept_file(
                path,
                transfer_syntax_uid=str(header.file_meta.TransferSyntaxUID),
                request_sop_class_uid=str(header.get("SOPClassUID", "")),
                request_sop_instance_uid=str(header.get("SOPInstanceUID", "")),
                calling_ae="IMPORT",
            )
        except NodeError as err:
            report.skipped.append((path, f"{type(err).__name__}: {err}"))
            continue
        except (InvalidDicomError, EOFError, ValueError) as err:
            report.skipped.append((path, f"{type(err).__name__}: not a readable DICOM file"))
            continue
        report.stored.append(result)
    return report


def _state(store: Store, report: ImportReport) -> dict[str, object]:
    """Everything an import leaves behind, without times and absolute folders."""
    state: dict[str, object] = {
        "stored": [
            (r.outcome, r.sop_instance_uid, r.study_uid, str(Path(r.path)).split("instances/")[-1])
            for r in report.stored
        ],
        "skipped": [
            (p.name, "DICOMDIR" if why.startswith("DICOMDIR") else why) for p, why in report.skipped
        ],
    }
    for table in ("patients", "studies", "series", "instances", "events", "rejections"):
        rows = store.index.query(f"SELECT * FROM {table} ORDER BY rowid")
        state[table] = [{k: r[k] for k in r.keys() if k not in _TIMES} for r in rows]
    state["files"] = {
        str(p.relative_to(store.instances_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store.instances_dir.rglob("*"))
        if p.is_file()
    }
    state["quarantined"] = sorted(
        p.read_text() for p in store.quarantine_dir.glob("*.error")
    )  # the reasons
    state["temporaries"] = [p for p in store.tmp_dir.rglob("*") if p.is_file()]
    return state


def _mixed_folder(folder: Path) -> list[Path]:
    """Two series, a duplicate, a conflicting copy, a rejection note, and damaged files."""
    folder.mkdir()
    study = generate_uid()
    first, second = factory.mr_series(study, 4, 0), factory.mr_series(study, 3, 10)
    for i, ds in enumerate(first + second):
        ds.save_as(folder / f"a{i:02d}.dcm", enforce_file_format=True)
    first[1].save_as(folder / "b-duplicate.dcm", enforce_file_format=True)
    conflicting = first[2]
    conflicting.SeriesDescription = "changed"
    conflicting.save_as(folder / "c-conflict.dcm", enforce_file_format=True)
    factory.rejection_note([second[0]]).save_as(folder / "d-note.dcm", enforce_file_format=True)
    (folder / "e-notes.txt").write_text("not DICOM\n")
    whole = (folder / "a00.dcm").read_bytes()
    (folder / "f-truncated.dcm").write_bytes(whole[:-100])
    bad_uid = factory.mr_series(study, 1, 20)[0]
    bad_uid.SOPInstanceUID = "../../x"  # pydicom warns: the two-step path, then quarantined
    bad_uid.save_as(folder / "g-bad-uid.dcm", enforce_file_format=True)
    directory = factory.mr_series(study, 1, 30)[0]
    directory.SOPClassUID = MEDIA_STORAGE_DIRECTORY  # pydicom copies it into the file meta
    directory.save_as(folder / "h-dicomdir", enforce_file_format=True)
    return list(iter_files([folder]))


@pytest.mark.parametrize("batch_size", [1, 2, 256])
def test_import_stores_what_one_file_at_a_time_stores(tmp_path, batch_size):
    files = _mixed_folder(tmp_path / "in")
    reference = _store(tmp_path / "reference")
    expected = _state(reference, _one_by_one(reference, files))
    store = _store(tmp_path / "batched")
    report = import_files(store, files, batch_size=batch_size)
    assert _state(store, report) == expected
    outcomes = [r.outcome for r in report.stored]
    assert outcomes.count(StoreOutcome.STORED) == 8
    assert StoreOutcome.ALREADY_STORED in outcomes
    assert StoreOutcome.CONFLICT_KEPT_FIRST in outcomes
    assert len(expected["rejections"]) == 1  # type: ignore[arg-type]
    assert len(expected["quarantined"]) == 2  # type: ignore[arg-type]
    assert not expected["temporaries"]


def test_each_file_is_fsynced_and_in_its_fsynced_folder_before_the_index_records_it(
    tmp_path, monkeypatch
):
    folder = tmp_path / "in"
    study = generate_uid()
    files = factory.write_mr_series(folder / "s1", 5, study_uid=study, rows=8, columns=8)
    files += factory.write_mr_series(folder / "s2", 4, study_uid=study, rows=8, columns=8)
    store = _store(tmp_path)
    synced_files: set[int] = set()  # inodes
    synced_names: set[Path] = set()  # names present in a folder when it was fsynced
    folder_syncs: list[Path] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if path.is_dir():
            folder_syncs.append(path)
            synced_names.update(path.iterdir())
        else:
            synced_files.add(os.fstat(fd).st_ino)

    monkeypatch.setattr(os, "fsync", fsync)
    commits: list[int] = []
    add_instances = store.index.add_instances

    def checked_add_instances(instances):
        for new, _ in instances:
            path = store.root / new.path
            assert path.stat().st_ino in synced_files, "indexed before the file was fsynced"
            assert path in synced_names, "indexed before its folder was fsynced"
        commits.append(len(instances))
        add_instances(instances)

    monkeypatch.setattr(store.index, "add_instances", checked_add_instances)
    report = import_files(store, files, batch_size=4)
    assert len(report.stored) == 9 and not report.skipped
    assert commits == [4, 4, 1]  # one transaction per batch, not per instance
    # one fsync per folder and batch: batches [s1 x4], [s1, s2 x3], [s2]
    assert len(folder_syncs) == 4
    assert not list(store.tmp_dir.glob("*.tmp"))


def test_a_row_the_index_refuses_fails_alone_and_leaves_no_file(tmp_path, monkeypatch):
    files = factory.write_mr_series(tmp_path / "in", 3, rows=8, columns=8)
    refused = str(dcmread(files[1]).SOPInstanceUID)
    store = _store(tmp_path)
    add_instance = store.index.add_instance

    def busy(instances):
        raise sqlite3.OperationalError("database is locked")

    def add_one(new, *, now=None):
        if new.sop_instance_uid == refused:
            raise sqlite3.OperationalError("database is locked")
        add_instance(new, now=now)

    monkeypatch.setattr(store.index, "add_instances", busy)
    monkeypatch.setattr(store.index, "add_instance", add_one)
    report = import_files(store, files)
    assert [r.sop_instance_uid for r in report.stored] == [
        str(dcmread(files[i]).SOPInstanceUID) for i in (0, 2)
    ]
    assert report.skipped == [
        (files[1], "OutOfResourcesError: index unavailable: database is locked")
    ]
    stored = {p for p in store.instances_dir.rglob("*.dcm")}
    assert stored == {r.path for r in report.stored}
    assert store.index.instance(refused) is None


def test_an_error_during_the_commit_leaves_neither_files_nor_rows(tmp_path, monkeypatch):
    files = factory.write_mr_series(tmp_path / "in", 3, rows=8, columns=8)
    store = _store(tmp_path)

    def interrupted(instances):
        raise KeyboardInterrupt

    monkeypatch.setattr(store.index, "add_instances", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_files(store, files)
    assert not list(store.instances_dir.rglob("*.dcm"))
    assert not list(store.tmp_dir.glob("*.tmp"))
    assert store.index.query("SELECT COUNT(*) FROM instances")[0][0] == 0


def test_a_cstore_of_a_staged_instance_waits_for_the_commit(tmp_path):
    files = factory.write_mr_series(tmp_path / "in", 1, rows=8, columns=8)
    ds = dcmread(files[0])
    store = _store(tmp_path)
    results = []
    with store.import_batch(calling_ae="IMPORT") as batch:
        batch.add_file(
            files[0],
            transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
            request_sop_class_uid=str(ds.SOPClassUID),
            request_sop_instance_uid=str(ds.SOPInstanceUID),
        )
        receiver = threading.Thread(
            target=lambda: results.append(
                store.accept_file(
                    files[0],
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    request_sop_class_uid=str(ds.SOPClassUID),
                    request_sop_instance_uid=str(ds.SOPInstanceUID),
                    calling_ae="PACS",
                )
            )
        )
        receiver.start()
        receiver.join(timeout=0.5)
        assert receiver.is_alive() and not results  # waits for the staged copy's commit
    receiver.join(timeout=10)
    assert [r.outcome for r in results] == [StoreOutcome.ALREADY_STORED]
    assert [r.outcome for _, r in batch.outcomes()] == [StoreOutcome.STORED]


def test_a_throwaway_store_stores_the_same_files_without_fsync(tmp_path, monkeypatch):
    """``spine-node analyze``'s temporary store (``durable=False``): the same files and rows as
    the node's store, and no fsync (its folder is deleted when the command ends)."""
    files = factory.write_mr_series(tmp_path / "in", 5, rows=8, columns=8)
    durable = import_files(_store(tmp_path / "a"), files)
    syncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: syncs.append(fd) or real_fsync(fd))
    root = tmp_path / "b" / "storage"
    throwaway = Store(root, Index(root / "index.sqlite3"), durable=False)
    report = import_files(throwaway, files)
    assert syncs == []
    assert [r.outcome for r in report.stored] == [r.outcome for r in durable.stored]
    for a, b in zip(durable.stored, report.stored, strict=True):
        assert a.path.read_bytes() == b.path.read_bytes()
    assert not list(throwaway.tmp_dir.glob("*.tmp"))
