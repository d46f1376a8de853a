"""The durable store without the network: completeness check, statuses, duplicates, paths."""

from __future__ import annotations

import io

import pytest
from pydicom.uid import generate_uid

from node.errors import (
    DatasetMismatchError,
    OutOfResourcesError,
    StoreOutcome,
    UnparseableDatasetError,
    store_status,
)
from node.index import Index
from node.store import Store, check_dataset_structure, is_valid_uid, uid_hash
from tests.node.dicom_factory import dataset_bytes, mr_dataset


def _encode(ds):
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    body = dataset_bytes_from(data)
    return data[: len(data) - len(body)], body


def dataset_bytes_from(data: bytes) -> bytes:
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length :]


def _tmp_files(store):
    return [p for p in store.tmp_dir.rglob("*") if p.is_file()]


@pytest.fixture
def store(tmp_path):
    index = Index(tmp_path / "index.sqlite3")
    yield Store(tmp_path / "storage", index)
    index.close()


def _mr(**kw):
    return mr_dataset(
        study_uid=kw.pop("study_uid", generate_uid()),
        series_uid=generate_uid(),
        instance_number=1,
        rows=16,
        columns=16,
        **kw,
    )


def _accept(store, ds, meta=None, body=None, **kw):
    m, b = _encode(ds)
    return store.accept(
        body if body is not None else b,
        meta if meta is not None else m,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        request_sop_class_uid=kw.get("cls", ds.SOPClassUID),
        request_sop_instance_uid=kw.get("inst", ds.SOPInstanceUID),
        calling_ae="PYSCU",
    )


def test_stored_file_is_the_received_bytes_under_a_hashed_path(store):
    ds = _mr()
    meta, body = _encode(ds)
    result = _accept(store, ds)
    assert result.outcome is StoreOutcome.STORED and store_status(result.outcome) == 0
    assert result.path.read_bytes() == meta + body
    rel = result.path.relative_to(store.instances_dir)
    assert rel.parts == (
        uid_hash(ds.StudyInstanceUID),
        uid_hash(ds.SeriesInstanceUID),
        uid_hash(ds.SOPInstanceUID) + ".dcm",
    )
    row = store.index.instance(ds.SOPInstanceUID)
    assert row is not None and row.size == len(meta) + len(body) and row.calling_ae == "PYSCU"
    assert _tmp_files(store) == []


def test_every_truncation_of_a_dataset_is_detected():
    from pydicom.dataset import Dataset

    ds = _mr()
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "1", "DCM", "x" * 40
    ds.ProcedureCodeSequence = [item, item]  # written with undefined lengths by pydicom
    _meta, body = _encode(ds)
    check_dataset_structure(body, implicit_vr=False, little_endian=True)
    # a cut exactly between two top-level elements leaves a shorter but well-formed dataset
    boundaries = set()
    for k in range(1, len(ds)):
        partial = Dataset()
        for element in list(ds)[:k]:
            partial.add(element)
        partial.file_meta = ds.file_meta
        boundaries.add(len(_encode(partial)[1]))
    undetected = []
    for cut in range(1, len(body)):
        try:
            check_dataset_structure(body[:cut], implicit_vr=False, little_endian=True)
            undetected.append(cut)
        except ValueError:
            pass
    assert set(undetected) <= boundaries
    assert len(body) - 1 - len(undetected) > 1000  # nearly every cut is caught


def test_nesting_bomb_is_refused_quickly():
    # 10,000 nested undefined-length sequences (explicit VR LE): (0040,0275) SQ, item
    opener = b"\x40\x00\x75\x02SQ\x00\x00\xff\xff\xff\xff" + b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    with pytest.raises(ValueError, match="nesting"):
        check_dataset_structure(opener * 10_000, implicit_vr=False, little_endian=True)


def test_truncated_dataset_is_quarantined_with_reason(store):
    ds = _mr()
    meta, body = _encode(ds)
    with pytest.raises(UnparseableDatasetError) as info:
        _accept(store, ds, body=body[:-100])
    assert store_status(info.value) == 0xC210
    errors = list(store.quarantine_dir.glob("*.error"))
    assert len(errors) == 1 and "cannot be parsed" in errors[0].read_text()
    assert errors[0].with_suffix(".dcm").read_bytes() == meta + body[:-100]
    assert store.index.instance(ds.SOPInstanceUID) is None


def test_request_uid_differing_from_dataset_gives_a900(store):
    ds = _mr()
    with pytest.raises(DatasetMismatchError) as info:
        _accept(store, ds, inst=generate_uid())
    assert store_status(info.value) == 0xA900
    assert not list(store.instances_dir.rglob("*.dcm"))


def test_path_traversal_uid_is_refused_and_nothing_escapes(store):
    ds = _mr()
    ds.SOPInstanceUID = "../../x"
    with pytest.raises(UnparseableDatasetError, match="SOP Instance UID") as info:
        _accept(store, ds, inst="../../x")
    assert store_status(info.value) == 0xC210
    assert not (store.instances_dir / ".." / ".." / "x").exists()
    assert not (store.root / "x").exists() and not (store.root.parent / "x").exists()
    assert not is_valid_uid("..") and not is_valid_uid("1." + "2" * 70) and is_valid_uid("1.2.3")


def test_duplicate_sop_instance_uid_identical_content(store):
    ds = _mr()
    first = _accept(store, ds)
    again = _accept(store, ds)
    assert again.outcome is StoreOutcome.ALREADY_STORED and store_status(again.outcome) == 0
    assert store.index.query("SELECT COUNT(*) FROM instances")[0][0] == 1
    assert again.path == first.path.relative_to(store.root)


def test_duplicate_sop_instance_uid_different_content(store):
    ds = _mr()
    first = _accept(store, ds)
    original = first.path.read_bytes()
    ds.PixelData = bytes(len(ds.PixelData))
    second = _accept(store, ds)
    assert second.outcome is StoreOutcome.CONFLICT_KEPT_FIRST
    assert store_status(second.outcome) == 0xB006
    assert first.path.read_bytes() == original
    events = store.index.events("duplicate_conflict")
    assert len(events) == 1 and events[0]["sop_instance_uid"] == ds.SOPInstanceUID
    assert store.index.query("SELECT COUNT(*) FROM instances")[0][0] == 1


def test_low_disk_refuses_with_a700_and_writes_nothing(store):
    store.low_water_bytes = 10**18  # an exabyte: always below
    ds = _mr()
    with pytest.raises(OutOfResourcesError) as info:
        _accept(store, ds)
    assert store_status(info.value) == 0xA700
    assert not list(store.instances_dir.rglob("*")) and not _tmp_files(store)


def test_write_error_refuses_with_a700_and_leaves_no_partial_file(store):
    ds = _mr()
    # a regular file where the study folder must be created: mkdir fails (works even as root)
    (store.instances_dir / uid_hash(ds.StudyInstanceUID)).write_bytes(b"")
    with pytest.raises(OutOfResourcesError) as info:
        _accept(store, ds)
    assert store_status(info.value) == 0xA700
    assert not _tmp_files(store)
    assert store.index.instance(ds.SOPInstanceUID) is None


def test_stale_temporaries_are_removed(store):
    (store.tmp_dir / "abc.tmp").write_bytes(b"partial")
    assert store.remove_stale_temporaries() == 1
    assert not _tmp_files(store)


def test_factory_dataset_bytes_helper(tmp_path):
    ds = _mr()
    path = tmp_path / "a.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert dataset_bytes(path) == _encode(ds)[1]


def test_index_failure_refuses_with_a700_and_removes_the_written_file(store):
    ds = _mr()
    # the index can look up but no longer record: the file is written, then removed again
    store.index._conn.execute(
        "CREATE TRIGGER refuse BEFORE INSERT ON instances "
        "BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"
    )
    with pytest.raises(OutOfResourcesError, match="index unavailable") as info:
        _accept(store, ds)
    assert store_status(info.value) == 0xA700
    assert not list(store.instances_dir.rglob("*.dcm")) and not _tmp_files(store)
    store.index._conn.execute("DROP TABLE instances")  # and one that cannot even look up
    with pytest.raises(OutOfResourcesError, match="index unavailable"):
        _accept(store, _mr())


@pytest.mark.parametrize("can_link", [True, False])
def test_instance_received_into_a_file_is_stored_from_it(store, tmp_path, monkeypatch, can_link):
    import node.store as store_module

    if not can_link:  # another file system: the bytes are copied instead of hard-linked
        monkeypatch.setattr(store_module, "_try_link", lambda source, link: False)
    ds = _mr()
    received = tmp_path / "received.dcm"
    meta, body = _encode(ds)
    received.write_bytes(meta + body)
    result = store.accept_file(
        received,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        request_sop_class_uid=ds.SOPClassUID,
        request_sop_instance_uid=ds.SOPInstanceUID,
    )
    assert result.outcome is StoreOutcome.STORED
    assert result.path.read_bytes() == meta + body
    assert (result.path.stat().st_ino == received.stat().st_ino) is can_link
    received.unlink()  # as pynetdicom does after the handler: the stored copy stays
    assert result.path.read_bytes() == meta + body
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(meta + body[:-10])
    with pytest.raises(UnparseableDatasetError):
        store.accept_file(
            truncated,
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
            request_sop_class_uid=ds.SOPClassUID,
            request_sop_instance_uid=ds.SOPInstanceUID,
        )
    assert len(list(store.quarantine_dir.glob("*.dcm"))) == 1
