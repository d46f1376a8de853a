"""Durable storage of received instances: check, write, fsync, rename, index.

:meth:`Store.accept` is everything the C-STORE handler does with the received bytes:

1. refuse when free disk is below the low-water mark (0xA700);
2. check that the bytes form a complete dataset (element lengths, item and sequence delimiters,
   nesting depth) and read the header without the pixel data; otherwise quarantine (0xC210);
3. compare the request's SOP Class/Instance UID with the dataset's (0xA900);
4. treat an already stored SOP Instance UID as an identical duplicate (Success, no new row) or a
   conflict (first copy kept, event recorded, warning status);
5. write to ``tmp/``, ``fsync``, ``os.replace`` into a path made of SHA-256 hashes of the study,
   series and SOP Instance UIDs (never the UIDs themselves: a UID of ``..`` would escape), fsync
   the folder, record the instance in the index — and only then report success.

Files imported from disk (:mod:`node.ingest`) take the same steps through an
:class:`ImportBatch`, with the header read once by the importer, and step 5 grouped: the
files of a batch are fsynced side by side, moved in place, their folders fsynced once, and
their rows recorded in one index transaction (still each file durable before its row).

No pixel decoding happens here.

References
----------
DICOM PS3.5 section 7 (data element encoding, 7.5 nesting of data sets) and A.4 (encapsulation);
PS3.10 section 7 (file meta information).
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import mmap
import os
import re
import shutil
import sqlite3
import struct
import threading
import time
import uuid
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.datadict import tag_for_keyword
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from node.errors import (
    DatasetMismatchError,
    OutOfResourcesError,
    StoreOutcome,
    UnparseableDatasetError,
)
from node.index import Index, NewInstance
from node.rejection import RejectionNote, rejection_note

logger = logging.getLogger(__name__)

#: PS3.5 9.1: digits and dots, at most 64 characters
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: default largest inflated size of a Deflated Explicit VR Little Endian dataset (bytes)
DEFAULT_MAX_INFLATED_BYTES = 128 * 1000 * 1000
#: fsyncs an import batch runs side by side (:class:`ImportBatch`)
FSYNC_THREADS = 16
#: deepest sequence nesting accepted (DCMTK's default limit is also 64)
MAX_NESTING_DEPTH = 64
_ITEM = 0xFFFEE000
_ITEM_DELIMITER = 0xFFFEE00D
_SEQUENCE_DELIMITER = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
#: the header elements the store reads from an instance (no pixel data)
HEADER_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "StudyDate",
    "AccessionNumber",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "SpecificCharacterSet",
    # an IHE IOCM rejection note's title and list of rejected instances (node.rejection)
    "ConceptNameCodeSequence",
    "CurrentRequestedProcedureEvidenceSequence",
]
_HEADER_TAG_NUMBERS = [(keyword, BaseTag(tag_for_keyword(keyword) or 0)) for keyword in HEADER_TAGS]


def header_of(ds: Dataset) -> dict[str, object]:
    """The values of :data:`HEADER_TAGS` in ``ds`` (``None`` when absent) and its rejection.

    The same values as ``ds.get(keyword)`` for each keyword, looked up by tag (no keyword
    lookup, no exception for every absent element), plus ``"rejection"``: the
    :func:`node.rejection.rejection_note` of ``ds``.
    """
    header: dict[str, object] = {
        keyword: ds[tag].value if tag in ds else None for keyword, tag in _HEADER_TAG_NUMBERS
    }
    header["rejection"] = rejection_note(ds)
    return header


def is_valid_uid(value: str) -> bool:
    """True for a syntactically valid UID (PS3.5 9.1: ``[0-9.]``, at most 64 characters)."""
    return len(value) <= 64 and bool(_UID.match(value))


def uid_hash(value: str) -> str:
    """Hex SHA-256 (first 32 hex digits) of a UID: what storage paths are built from."""
    return hashlib.sha256(value.encode("ascii", "replace")).hexdigest()[:32]


class _Truncated(ValueError):
    pass


def check_dataset_structure(
    data: bytes | memoryview, *, implicit_vr: bool, little_endian: bool
) -> None:
    """Check that an encoded dataset is complete: every length and delimiter is consistent.

    pydicom reads a truncated value silently, so this walks the element headers (PS3.5 7.1),
    the items of undefined-length sequences (7.5) and encapsulated pixel data (A.4).

    Parameters
    ----------
    data : bytes or memoryview
        The dataset as encoded in its transfer syntax (no file meta, already inflated).
    implicit_vr, little_endian : bool
        The transfer syntax's encoding.

    Raises
    ------
    ValueError
        With the byte offset of the first inconsistency.
    """
    prefix = "<" if little_endian else ">"
    tag_fmt = struct.Struct(prefix + "HH")
    u32 = struct.Struct(prefix + "I")
    u16 = struct.Struct(prefix + "H")
    end = len(data)

    def elements(pos: int, depth: int, in_item: bool) -> int:
        if depth > MAX_NESTING_DEPTH:
            raise ValueError(f"sequence nesting deeper than {MAX_NESTING_DEPTH} at byte {pos}")
        while pos < end:
            if pos + 8 > end:
                raise _Truncated(f"element header cut at byte {pos}")
            group, element = tag_fmt.unpack_from(data, pos)
            tag = (group << 16) | element
            if tag == _ITEM_DELIMITER:
                if not in_item:
                    raise ValueError(f"unexpected item delimiter at byte {pos}")
                return pos + 8
            if group == 0xFFFE:
                raise ValueError(f"unexpected delimitation tag {tag:08X} at byte {pos}")
            if implicit_vr:
                length = u32.unpack_from(data, pos + 4)[0]
                pos += 8
            else:
                vr = bytes(data[pos + 4 : pos + 6])
                if vr in _LONG_VRS:
                    if pos + 12 > end:
                        raise _Truncated(f"element header cut at byte {pos}")
                    length = u32.unpack_from(data, pos + 8)[0]
                    pos += 12
                else:
                    length = u16.unpack_from(data, pos + 6)[0]
                    pos += 8
            if length == _UNDEFINED:
                pos = items(pos, depth + 1)
            else:
                pos += length
                if pos > end:
                    raise _Truncated(f"value of ({group:04X},{element:04X}) cut at byte {end}")
        if in_item:
            raise _Truncated("item without its delimiter at the end of the data")
        return pos

    def items(pos: int, depth: int) -> int:
        while True:
            if pos + 8 > end:
                raise _Truncated(f"sequence without its delimiter at byte {pos}")
            group, element = tag_fmt.unpack_from(data, pos)
            tag = (group << 16) | element
            length = u32.unpack_from(data, pos + 4)[0]
            pos += 8
            if tag == _SEQUENCE_DELIMITER:
                return pos
            if tag != _ITEM:
                raise ValueError(f"expected an item tag at byte {pos - 8}, found {tag:08X}")
            if length == _UNDEFINED:
                pos = elements(pos, depth, in_item=True)
            else:
                pos += length
                if pos > end:
                    raise _Truncated(f"item cut at byte {end}")

    elements(0, 0, in_item=False)


class _Received:
    """A received instance: the dataset bytes for checking, and how to copy the whole file.

    Either in memory (``meta`` + ``dataset`` bytes) or in a Part 10 file written by pynetdicom
    (``STORE_RECV_CHUNKED_DATASET``), which is memory-mapped instead of read, so large
    multi-frame objects do not grow the node's memory.
    """

    def __init__(
        self, *, meta: bytes | None = None, dataset: bytes | None = None, path: Path | None = None
    ) -> None:
        self.path = path
        self._mmap: mmap.mmap | None = None
        if path is not None:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
            whole = memoryview(self._mmap) if self._mmap is not None else memoryview(b"")
            # Part 10: preamble, "DICM", then (0002,0000) File Meta Group Length, UL
            if (
                len(whole) < 144
                or bytes(whole[128:132]) != b"DICM"
                or bytes(whole[132:138]) != b"\x02\x00\x00\x00UL"
            ):
                whole.release()
                self.close()
                raise UnparseableDatasetError("received file has no DICOM file meta")
            meta_end = 144 + int.from_bytes(whole[140:144], "little")
            self.meta = bytes(whole[:meta_end])
            self.dataset: bytes | memoryview = whole[meta_end:]
            self._whole = whole
        else:
            assert meta is not None and dataset is not None
            self.meta, self.dataset = meta, dataset

    @property
    def size(self) -> int:
        return len(self.meta) + len(self.dataset)

    def stream(self) -> io.BufferedIOBase:
        """The whole Part 10 file as a binary stream (for pydicom)."""
        if self.path is not None:
            return open(self.path, "rb")
        return io.BytesIO(self.meta + bytes(self.dataset))

    def sha256(self) -> str:
        """SHA-256 (hex) of the dataset bytes, read in 1 MiB blocks for a file (no mapping of
        the pixel data into memory)."""
        if self.path is None:
            return hashlib.sha256(self.dataset).hexdigest()
        digest = hashlib.sha256()
        with open(self.path, "rb") as fh:
            fh.seek(len(self.meta))
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    def write_into(self, fd: int) -> None:
        """Write the whole file to ``fd`` (``sendfile`` from a received file)."""
        if self.path is None:
            for chunk in (self.meta, self.dataset):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            return
        with open(self.path, "rb") as fh:
            offset, total = 0, os.fstat(fh.fileno()).st_size
            while offset < total:
                sent = os.sendfile(fd, fh.fileno(), offset, total - offset)
                if sent == 0:
                    raise OSError(errno.EIO, "received file shrank while being copied")
                offset += sent

    def close(self) -> None:
        """Release the memory map (before pynetdicom deletes its temporary file)."""
        if self._mmap is not None:
            if isinstance(self.dataset, memoryview):
                self.dataset.release()
            self._whole.release()
            self._mmap.close()
            self._mmap = None


def stored_digest(path: Path) -> str:
    """SHA-256 (hex) of a stored Part 10 file's dataset, as the index records it (the file
    meta is not hashed).

    Raises
    ------
    UnparseableDatasetError
        The file has no DICOM file meta.
    OSError
        The file cannot be read.
    """
    received = _Received(path=Path(path))
    try:
        return received.sha256()
    finally:
        received.close()


@dataclass(frozen=True)
class StoreResult:
    """The outcome of :meth:`Store.accept` for a received instance."""

    outcome: StoreOutcome
    sop_instance_uid: str
    study_uid: str
    path: Path


class Store:
    """The node's folder store (instances, temporary files, quarantine, outbox files).

    Parameters
    ----------
    root : Path
        The storage folder. Sub-folders: ``instances/``, ``tmp/``, ``quarantine/``, ``outbox/``.
    index : Index
        Where stored instances are recorded.
    low_water_bytes : int
        Free space (bytes) below which instances are refused with 0xA700.
    max_inflated_bytes : int
        Largest size (bytes) a Deflated Explicit VR Little Endian dataset may inflate to; a
        larger one is refused with 0xA700 without being inflated further (0: no limit).
    durable : bool
        Whether a file is fsynced (with its folder) before it counts as stored: always for the
        node's store (nothing acknowledged may be lost). False only for a throwaway store whose
        folder is deleted when the process ends (``spine-node analyze``'s temporary one): files
        are still written whole and renamed into place, without waiting for the disk.
    """

    def __init__(
        self,
        root: Path,
        index: Index,
        *,
        low_water_bytes: int = 0,
        max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES,
        durable: bool = True,
    ) -> None:
        self.durable = durable
        self.root = Path(root).resolve()
        self.index = index
        self.low_water_bytes = int(low_water_bytes)
        self.max_inflated_bytes = int(max_inflated_bytes)
        self.instances_dir = self.root / "instances"
        self.tmp_dir = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        self.outbox_dir = self.root / "outbox"
        #: where the serve process's temporary files (pynetdicom's received datasets) go
        self.incoming_dir = self.tmp_dir / "incoming"
        # patient data: the storage folder is the owner's alone whatever the umask (files are
        # created 0600, see _stage); a store made by an older node is tightened here
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for folder in (
            self.root,
            self.instances_dir,
            self.tmp_dir,
            self.incoming_dir,
            self.quarantine_dir,
            self.outbox_dir,
        ):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            if folder.stat().st_mode & 0o077:
                os.chmod(folder, 0o700)
        #: striped locks, so two associations storing the same SOP Instance UID serialise
        self._locks = [threading.Lock() for _ in range(64)]

    # -- start-up -------------------------------------------------------------------------------
    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by a killed process (never acknowledged); return count.

        Covers ``tmp/`` and ``tmp/incoming/``, where ``spine-node serve`` lets pynetdicom write
        datasets as they arrive (``tempfile.tempdir``), so that they are on the storage's file
        system (hard link instead of copy) and cleaned here after a crash.
        """
        count = 0
        for path in self.tmp_dir.iterdir():
            if path.is_dir():
                count += sum(1 for p in path.rglob("*") if p.is_file())
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
                count += 1
        self.incoming_dir.mkdir(exist_ok=True)
        if count:
            logger.warning("removed %d temporary file(s) left by an interrupted run", count)
        return count

    # -- paths ----------------------------------------------------------------------------------
    def instance_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Storage path of an instance: hashes of its UIDs, always under ``instances/``."""
        path = (
            self.instances_dir
            / uid_hash(study_uid)
            / uid_hash(series_uid)
            / f"{uid_hash(sop_instance_uid)}.dcm"
        )
        if not path.resolve().is_relative_to(self.instances_dir):
            raise OutOfResourcesError("storage path escapes the storage folder")
        return path

    # -- writing --------------------------------------------------------------------------------
    def write_durably(
        self, data: bytes | memoryview | list[bytes | memoryview] | _Received, destination: Path
    ) -> None:
        """Write bytes to ``destination`` atomically: temporary file, fsync, rename, fsync folder.

        Raises
        ------
        OutOfResourcesError
            On any write error; no partial file is left behind.
        """
        tmp = self._stage(data, destination)
        try:
            error = self.sync(tmp)
            if error is None:
                os.replace(tmp, destination)
                error = self.sync(destination.parent)
            if error is not None:
                raise error
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise OutOfResourcesError(f"cannot write {destination.name}: {err.strerror}") from err

    def sync(self, path: Path) -> OSError | None:
        """fsync ``path`` (a file or a folder) when the store is :attr:`durable`; the error, if
        any (None for a store that is not durable)."""
        return _fsync(path) if self.durable else None

    def _stage(
        self, data: bytes | memoryview | list[bytes | memoryview] | _Received, destination: Path
    ) -> Path:
        """The bytes in a new temporary file in ``tmp/`` (a hard link to a received file on the
        same file system, else a copy), and ``destination``'s folder created; not yet fsynced.
        :meth:`write_durably` then fsyncs and renames it, :class:`ImportBatch` at its commit.

        Raises
        ------
        OutOfResourcesError
            On any write error; no temporary file is left behind.
        """
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.tmp"
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, _Received):
                if data.path is not None and _try_link(data.path, tmp):
                    return tmp  # no second copy of pynetdicom's (or the imported) file
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if isinstance(data, _Received):
                    data.write_into(fd)
                else:
                    for chunk in data if isinstance(data, list) else [data]:
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise OutOfResourcesError(f"cannot write {destination.name}: {err.strerror}") from err
        return tmp

    def import_batch(self, *, calling_ae: str | None, max_files: int = 256) -> ImportBatch:
        """An :class:`ImportBatch` into this store (use it as a context manager)."""
        return ImportBatch(self, calling_ae=calling_ae, max_files=max_files)

    def check_free_space(self) -> None:
        """Raise :class:`OutOfResourcesError` when free disk is below the low-water mark."""
        if self.low_water_bytes <= 0:
            return
        free = shutil.disk_usage(self.root).free
        if free < self.low_water_bytes:
            raise OutOfResourcesError(
                f"free disk {free / 1e6:.0f} MB is below the low-water mark "
                f"{self.low_water_bytes / 1e6:.0f} MB"
            )

    def quarantine(self, data: bytes | list[bytes | memoryview] | _Received, reason: str) -> Path:
        """Keep rejected bytes with a ``.error`` reason file; returns the data file's path."""
        stem = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
        path = self.quarantine_dir / f"{stem}.dcm"
        try:
            self.write_durably(data, path)
            self.write_durably(
                reason.encode("utf-8", "replace") + b"\n", self.quarantine_dir / f"{stem}.error"
            )
        except OutOfResourcesError as err:
            logger.error("could not quarantine rejected instance: %s", err)
        return path

    # -- the handler's work ---------------------------------------------------------------------
    def accept(
        self,
        dataset_bytes: bytes,
        file_meta_bytes: bytes,
        *,
        transfer_syntax_uid: str,
        request_sop_class_uid: str,
        request_sop_instance_uid: str,
        calling_ae: str | None = None,
        association_id: int | None = None,
    ) -> StoreResult:
        """Store one received instance (held in memory) durably and index it.

        Parameters
        ----------
        dataset_bytes : bytes
            The dataset exactly as received (encoded in ``transfer_syntax_uid``).
        file_meta_bytes : bytes
            Preamble, ``DICM`` prefix and encoded file meta information written before it.
        transfer_syntax_uid : str
            The accepted presentation context's transfer syntax.
        request_sop_class_uid, request_sop_instance_uid : str
            The C-STORE request's Affected SOP Class/Instance UID.
        calling_ae : str, optional
            The peer's AE title (recorded in the index).
        association_id : int, optional
            The index id of the association.

        Returns
        -------
        StoreResult

        Raises
        ------
        OutOfResourcesError, UnparseableDatasetError, DatasetMismatchError
        """
        self.check_free_space()
        return self._accept(
            _Received(meta=file_meta_bytes, dataset=dataset_bytes),
            transfer_syntax_uid,
            request_sop_class_uid,
            request_sop_instance_uid,
            calling_ae,
            association_id,
        )

    def accept_file(
        self,
        received_path: Path,
        *,
        transfer_syntax_uid: str,
        request_sop_class_uid: str,
        request_sop_instance_uid: str,
        calling_ae: str | None = None,
        association_id: int | None = None,
    ) -> StoreResult:
        """Like :meth:`accept`, for an instance pynetdicom received into a Part 10 file.

        The file (``event.dataset_path`` with ``STORE_RECV_CHUNKED_DATASET``) is memory-mapped,
        checked, hashed and copied; it is left in place (pynetdicom deletes it).
        """
        self.check_free_space()
        received = _Received(path=Path(received_path))
        try:
            return self._accept(
                received,
                transfer_syntax_uid,
                request_sop_class_uid,
                request_sop_instance_uid,
                calling_ae,
                association_id,
            )
        finally:
            received.close()

    def _accept(
        self,
        received: _Received,
        transfer_syntax_uid: str,
        request_sop_class_uid: str,
        request_sop_instance_uid: str,
        calling_ae: str | None,
        association_id: int | None,
    ) -> StoreResult:
        header = self._parse(received, transfer_syntax_uid)
        sop_class, sop_instance, study, series = self._checked_uids(
            received, header, request_sop_class_uid, request_sop_instance_uid
        )
        rejection = header.get("rejection")
        digest = received.sha256()
        path = self.instance_path(study, series, sop_instance)
        lock = self._lock_of(sop_instance)
        with lock:
            known = self._known_instance(sop_instance, digest, calling_ae)
            if known is not None:
                return known
            self.write_durably(received, path)
            try:
                self.index.add_instance(
                    self._new_instance(
                        header,
                        received,
                        sop_class,
                        sop_instance,
                        study,
                        series,
                        transfer_syntax_uid,
                        path,
                        digest,
                        calling_ae,
                        association_id,
                    )
                )
            except sqlite3.Error as err:
                # not indexed means not acknowledged: do not leave an orphan file behind; a
                # busy or full database is a resource problem the sender may retry (0xA700)
                path.unlink(missing_ok=True)
                raise OutOfResourcesError(f"index unavailable: {err}") from err
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        _log_rejection(sop_instance, rejection)
        return StoreResult(StoreOutcome.STORED, sop_instance, study, path)

    def _lock_of(self, sop_instance: str) -> threading.Lock:
        """The striped lock serialising the storage of one SOP Instance UID."""
        return self._locks[hash(sop_instance) % len(self._locks)]

    def _checked_uids(
        self,
        received: _Received,
        header: dict[str, object],
        request_sop_class_uid: str,
        request_sop_instance_uid: str,
    ) -> tuple[str, str, str, str]:
        """The header's SOP Class, SOP Instance, Study and Series Instance UIDs, checked.

        Raises
        ------
        UnparseableDatasetError
            A UID is missing or invalid (the instance is quarantined).
        DatasetMismatchError
            The dataset's SOP Class/Instance UID differ from the request's.
        """
        sop_class = str(header.get("SOPClassUID", "") or "")
        sop_instance = str(header.get("SOPInstanceUID", "") or "")
        study = str(header.get("StudyInstanceUID", "") or "")
        series = str(header.get("SeriesInstanceUID", "") or "")
        for name, value in (
            ("SOP Instance UID", sop_instance),
            ("Study Instance UID", study),
            ("Series Instance UID", series),
            ("SOP Class UID", sop_class),
        ):
            if not is_valid_uid(value):
                reason = f"invalid or missing {name} (not a PS3.5 9.1 UID)"
                self.quarantine(received, reason)
                raise UnparseableDatasetError(reason)
        if sop_class != request_sop_class_uid or sop_instance != request_sop_instance_uid:
            raise DatasetMismatchError(
                f"dataset SOP Class/Instance UID {sop_class}/{sop_instance} differ from the "
                f"request's {request_sop_class_uid}/{request_sop_instance_uid}"
            )
        return sop_class, sop_instance, study, series

    def _known_instance(
        self, sop_instance: str, digest: str, calling_ae: str | None
    ) -> StoreResult | None:
        """The outcome for an instance the index already holds (``None``: a new instance).

        An identical copy is ``ALREADY_STORED``; different content keeps the first copy and
        records a ``duplicate_conflict`` event. Called under the instance's lock.

        The index is trusted only when its file is there with the indexed size: a row whose
        file is missing or of another size (deleted or truncated behind the node's back) is
        removed with a ``missing_file`` event, and ``None`` returned, so the new copy is stored
        as a new instance. Only a ``stat`` is added to the duplicate path: re-hashing the
        stored copy would read every file of a re-sent study a second time; a changed file of
        the same size is what ``spine-node verify`` finds (it hashes every file).
        """
        try:
            existing = self.index.instance(sop_instance)
        except sqlite3.Error as err:
            raise OutOfResourcesError(f"index unavailable: {err}") from err
        if existing is None:
            return None
        problem = self._file_problem(existing.path, existing.size)
        if problem is not None:
            logger.warning(
                "instance %s is indexed but its file is %s: storing the copy received now",
                sop_instance,
                problem,
            )
            try:
                self.index.forget_instance(
                    sop_instance,
                    kind="missing_file",
                    detail=f"indexed file {problem}; replaced by a copy from {calling_ae or '?'}",
                )
            except sqlite3.Error as err:
                raise OutOfResourcesError(f"index unavailable: {err}") from err
            return None
        if existing.sha256 == digest:
            logger.info("duplicate instance %s (identical content) ignored", sop_instance)
            return StoreResult(
                StoreOutcome.ALREADY_STORED,
                sop_instance,
                existing.study_uid,
                Path(existing.path),
            )
        logger.warning(
            "instance %s received again with different content: first copy kept",
            sop_instance,
        )
        self.index.add_event(
            "duplicate_conflict",
            study_uid=existing.study_uid,
            sop_instance_uid=sop_instance,
            detail=f"kept sha256 {existing.sha256[:16]}, discarded {digest[:16]}"
            f" from {calling_ae or '?'}",
        )
        return StoreResult(
            StoreOutcome.CONFLICT_KEPT_FIRST,
            sop_instance,
            existing.study_uid,
            Path(existing.path),
        )

    def describe_stored(self, path: Path) -> NewInstance:
        """The index row of a file already in the store (``spine-node rebuild-index``).

        Reads the file's header (no pixel data) and hashes its dataset as :meth:`accept` does;
        the calling AE and association are unknown.

        Raises
        ------
        UnparseableDatasetError
            The file cannot be read as DICOM or lacks a valid UID.
        OSError
            The file cannot be read.
        """
        path = Path(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom's warnings may quote identifiers
                ds = dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID", "") or "")
            header = header_of(ds)
        except (InvalidDicomError, ValueError, EOFError, KeyError, struct.error) as err:
            raise UnparseableDatasetError(
                f"not a readable DICOM file: {type(err).__name__}: {_safe(err)}"
            ) from err
        uids = [
            str(header.get(k, "") or "")
            for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        ]
        if not all(is_valid_uid(uid) for uid in [*uids, transfer_syntax]):
            raise UnparseableDatasetError("invalid or missing UID (not a PS3.5 9.1 UID)")
        sop_class, sop_instance, study, series = uids
        received = _Received(path=path)
        try:
            return self._new_instance(
                header,
                received,
                sop_class,
                sop_instance,
                study,
                series,
                transfer_syntax,
                path.resolve(),
                received.sha256(),
                None,
                None,
            )
        finally:
            received.close()

    def _file_problem(self, relative_path: str, size: int) -> str | None:
        """What is wrong with an indexed file (``"missing"``, ``"of another size"``), or
        ``None`` when it is there with the indexed size."""
        try:
            actual = (self.root / relative_path).stat().st_size
        except FileNotFoundError:
            return "missing"
        except OSError as err:
            return f"unreadable ({err.strerror})"
        return None if actual == size else "of another size"

    def _new_instance(
        self,
        header: dict[str, object],
        received: _Received,
        sop_class: str,
        sop_instance: str,
        study: str,
        series: str,
        transfer_syntax_uid: str,
        path: Path,
        digest: str,
        calling_ae: str | None,
        association_id: int | None,
    ) -> NewInstance:
        """The index row of a stored instance."""
        rejection = header.get("rejection")
        assert rejection is None or isinstance(rejection, RejectionNote)
        return NewInstance(
            sop_instance_uid=sop_instance,
            sop_class_uid=sop_class,
            series_uid=series,
            study_uid=study,
            transfer_syntax_uid=transfer_syntax_uid,
            path=str(path.relative_to(self.root)),
            size=received.size,
            sha256=digest,
            calling_ae=calling_ae,
            association_id=association_id,
            patient_id=_text(header.get("PatientID")) or "",
            issuer_of_patient_id=_text(header.get("IssuerOfPatientID")) or "",
            patient_name=_text(header.get("PatientName")),
            birth_date=_text(header.get("PatientBirthDate")),
            study_date=_text(header.get("StudyDate")),
            accession_number=_text(header.get("AccessionNumber")),
            modality=_text(header.get("Modality")),
            series_number=_int(header.get("SeriesNumber")),
            series_description=_text(header.get("SeriesDescription")),
            rejects=rejection.rejected if rejection else (),
            rejection_reason=rejection.reason if rejection else None,
        )

    def _parse(
        self,
        received: _Received,
        transfer_syntax_uid: str,
        header: dict[str, object] | None = None,
    ) -> dict[str, object]:
        """Check completeness and read the header elements the index needs (no pixel data).

        ``header`` is the :func:`header_of` the caller already read from the same file (an
        import): then only the completeness check runs, and ``header`` is returned.
        """
        ts = UID(transfer_syntax_uid)
        try:
            raw = received.dataset
            if ts == DeflatedExplicitVRLittleEndian:
                raw = inflate_bounded(bytes(received.dataset), self.max_inflated_bytes)
            check_dataset_structure(
                raw, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian
            )
            if header is None:
                with warnings.catch_warnings(), received.stream() as stream:
                    # pydicom's warnings quote element values, which may be patient identifiers
                    warnings.simplefilter("ignore")
                    ds = dcmread(stream, stop_before_pixels=True, specific_tags=HEADER_TAGS)
                    header = header_of(ds)
        except (
            ValueError,
            InvalidDicomError,
            EOFError,
            KeyError,
            struct.error,
            zlib.error,
            NotImplementedError,
            TypeError,
            UnicodeDecodeError,
            AttributeError,
            RecursionError,
        ) as err:
            reason = f"dataset cannot be parsed: {type(err).__name__}: {_safe(err)}"
            self.quarantine(received, reason)
            raise UnparseableDatasetError(reason) from err
        return header


def inflate_bounded(deflated: bytes, max_bytes: int) -> bytes:
    """Inflate a Deflated Explicit VR Little Endian dataset (raw deflate, PS3.5 A.5), reading no
    more than ``max_bytes`` of output (0: no limit).

    Raises
    ------
    OutOfResourcesError
        The dataset inflates to more than ``max_bytes`` (a "deflate bomb": issue 17, row 4, 227 kB
        on the wire for 200 MB inflated); it was measured 1 MB at a time, never held.
    zlib.error
        The bytes are not a raw deflate stream.
    """
    if max_bytes:
        # first the size, 1 MB of output at a time (a bomb never takes more memory than that)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        size, pending = 0, deflated
        while True:
            size += len(inflater.decompress(pending, 1 << 20))
            if size > max_bytes:
                raise OutOfResourcesError(
                    f"deflated dataset of {len(deflated)} bytes inflates to more than the "
                    f"{max_bytes / 1e6:.0f} MB accepted"
                )
            pending = inflater.unconsumed_tail
            if not pending:
                break
    return zlib.decompress(deflated, -zlib.MAX_WBITS)


@dataclass(frozen=True)
class _Staged:
    """A file of an :class:`ImportBatch` copied into ``tmp/``, waiting for the batch's commit."""

    source: Path
    tmp: Path
    path: Path
    new: NewInstance
    received_at: float
    rejection: RejectionNote | None


class ImportBatch:
    """Import files into a store: the receive path's checks, with commits grouped in batches.

    Every file goes through the same steps as :meth:`Store.accept_file` (free space, file meta,
    completeness check, UID checks, duplicates, hashed path), but the durable write and the
    index row are grouped: up to ``max_files`` files are staged in ``tmp/``; the commit then
    fsyncs every staged file, moves it in place, fsyncs each folder once, and records all rows
    in one index transaction. A file is thus fsynced, and in its folder, before the index
    records it, as on the receive path; a crash before the commit leaves only temporary files
    (removed by :meth:`Store.remove_stale_temporaries`). The C-STORE handler keeps the one
    file, one commit path, since each instance is acknowledged on its own.

    The striped per-instance locks of the store are held from the duplicate check to the
    commit, so a C-STORE of the same SOP Instance UID in the same process waits for the commit
    (a lock already held elsewhere makes the batch commit first: it never waits while holding
    locks).

    Outcomes come in file order from :meth:`outcomes`: a :class:`StoreResult`, or the
    :class:`~node.errors.OutOfResourcesError` of a file whose commit failed. Errors found before
    the commit are raised by :meth:`add_file`, as :meth:`Store.accept_file` raises them.

    Parameters
    ----------
    store : Store
        Where the files go.
    calling_ae : str, optional
        Recorded in the index as the instances' source.
    max_files : int
        Files per commit (one index transaction, one fsync per folder).
    """

    def __init__(self, store: Store, *, calling_ae: str | None, max_files: int = 256) -> None:
        if max_files < 1:
            raise ValueError(f"max_files must be at least 1, not {max_files}")
        self.store = store
        self.calling_ae = calling_ae
        self.max_files = max_files
        self._staged: list[_Staged] = []
        self._staged_uids: set[str] = set()
        self._held: set[threading.Lock] = set()
        self._outcomes: list[tuple[Path, StoreResult | OutOfResourcesError]] = []

    def __enter__(self) -> ImportBatch:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc_type is None:
            self.flush()
            return
        try:
            self.flush()  # what was staged before the error is as valid as before it
        except Exception as err:  # the error being raised is the one to report
            logger.error("could not commit the last imported files: %s", type(err).__name__)

    def add_file(
        self,
        path: Path,
        *,
        transfer_syntax_uid: str,
        request_sop_class_uid: str,
        request_sop_instance_uid: str,
        header: dict[str, object] | None = None,
    ) -> None:
        """Check a Part 10 file and stage it for the next commit (see :meth:`outcomes`).

        Parameters
        ----------
        path : Path
            The file (left in place).
        transfer_syntax_uid : str
            Its file meta Transfer Syntax UID.
        request_sop_class_uid, request_sop_instance_uid : str
            The UIDs it is expected to carry (checked as a C-STORE request's).
        header : dict, optional
            :func:`header_of` the file's dataset when the caller has already read it (it is
            then not read again); by default the store reads it.

        Raises
        ------
        OutOfResourcesError, UnparseableDatasetError, DatasetMismatchError
            As :meth:`Store.accept_file`.
        """
        store = self.store
        store.check_free_space()
        received = _Received(path=Path(path))
        try:
            header = store._parse(received, transfer_syntax_uid, header)
            sop_class, sop_instance, study, series = store._checked_uids(
                received, header, request_sop_class_uid, request_sop_instance_uid
            )
            digest = received.sha256()
            destination = store.instance_path(study, series, sop_instance)
            if sop_instance in self._staged_uids:
                self.flush()  # a second copy within the batch: compare it with the indexed one
            self._hold(sop_instance)
            try:
                existing = store.index.instance(sop_instance)
            except sqlite3.Error as err:
                raise OutOfResourcesError(f"index unavailable: {err}") from err
            if existing is not None:
                # commit what came before, so outcomes and events stay in file order
                self.flush()
                self._hold(sop_instance)
                known = store._known_instance(sop_instance, digest, self.calling_ae)
                if known is not None:
                    self._outcomes.append((Path(path), known))
                    return
            tmp = store._stage(received, destination)
            rejection = header.get("rejection")
            self._staged.append(
                _Staged(
                    source=Path(path),
                    tmp=tmp,
                    path=destination,
                    new=store._new_instance(
                        header,
                        received,
                        sop_class,
                        sop_instance,
                        study,
                        series,
                        transfer_syntax_uid,
                        destination,
                        digest,
                        self.calling_ae,
                        None,
                    ),
                    received_at=time.time(),
                    rejection=rejection if isinstance(rejection, RejectionNote) else None,
                )
            )
            self._staged_uids.add(sop_instance)
        finally:
            received.close()
        if len(self._staged) >= self.max_files:
            self.flush()

    def outcomes(self) -> list[tuple[Path, StoreResult | OutOfResourcesError]]:
        """The outcomes decided since the last call, in file order (file, result or error)."""
        done, self._outcomes = self._outcomes, []
        return done

    def flush(self) -> None:
        """Commit the staged files now (and release the instance locks held)."""
        staged, self._staged, self._staged_uids = self._staged, [], set()
        try:
            if staged:
                self._commit(staged)
        finally:
            for lock in self._held:
                lock.release()
            self._held = set()

    def _hold(self, sop_instance: str) -> None:
        lock = self.store._lock_of(sop_instance)
        if lock in self._held:
            return
        if not lock.acquire(blocking=False):
            self.flush()  # never wait for a lock while holding others: no deadlock
            lock.acquire()
        self._held.add(lock)

    def _commit(self, staged: list[_Staged]) -> None:
        failed: dict[int, OutOfResourcesError] = {}
        written: list[_Staged] = []
        try:
            # fsync every file, then move it in place, then fsync each folder once. The fsyncs
            # run side by side: the device's cache flushes of concurrent fsyncs are merged,
            # one at a time each file costs a flush of its own
            with ThreadPoolExecutor(max_workers=min(FSYNC_THREADS, len(staged))) as pool:
                errors = list(pool.map(self.store.sync, [item.tmp for item in staged]))
                for item, error in zip(staged, errors, strict=True):
                    if error is None:
                        try:
                            os.replace(item.tmp, item.path)
                        except OSError as err:
                            error = err
                    if error is not None:
                        item.tmp.unlink(missing_ok=True)
                        failed[id(item)] = OutOfResourcesError(
                            f"cannot write {item.path.name}: {error.strerror}"
                        )
                    else:
                        written.append(item)
                folders = list(dict.fromkeys(item.path.parent for item in written))
                for folder, error in zip(folders, pool.map(self.store.sync, folders), strict=True):
                    if error is None:
                        continue
                    for item in written:
                        if item.path.parent == folder:
                            item.path.unlink(missing_ok=True)
                            failed[id(item)] = OutOfResourcesError(
                                f"cannot write {item.path.name}: {error.strerror}"
                            )
            written = [item for item in written if id(item) not in failed]
        except BaseException:
            for item in staged:
                item.tmp.unlink(missing_ok=True)
            for item in written:
                item.path.unlink(missing_ok=True)
            raise
        self._index(written, failed)
        for item in staged:
            refused = failed.get(id(item))
            if refused is not None:
                self._outcomes.append((item.source, refused))
                continue
            _log_rejection(item.new.sop_instance_uid, item.rejection)
            self._outcomes.append(
                (
                    item.source,
                    StoreResult(
                        StoreOutcome.STORED,
                        item.new.sop_instance_uid,
                        item.new.study_uid,
                        item.path,
                    ),
                )
            )

    def _index(self, written: list[_Staged], failed: dict[int, OutOfResourcesError]) -> None:
        """Record ``written`` in one transaction; if it fails, one row at a time (as the receive
        path does), so only the rows the index refuses fail (their files are removed)."""
        index = self.store.index
        try:
            index.add_instances([(item.new, item.received_at) for item in written])
        except sqlite3.Error:
            for position, item in enumerate(written):
                try:
                    index.add_instance(item.new, now=item.received_at)
                except sqlite3.Error as err:
                    item.path.unlink(missing_ok=True)
                    failed[id(item)] = OutOfResourcesError(f"index unavailable: {err}")
                except BaseException:
                    for rest in written[position:]:
                        rest.path.unlink(missing_ok=True)
                    raise
        except BaseException:
            for item in written:
                item.path.unlink(missing_ok=True)
            raise


def _log_rejection(sop_instance: str, rejection: object) -> None:
    if isinstance(rejection, RejectionNote):
        logger.info(
            "rejection note %s (%s) withdraws %d instance(s)",
            sop_instance,
            rejection.reason,
            len(rejection.rejected),
        )


def _fsync(path: Path) -> OSError | None:
    """fsync a file or folder; the error instead of raising it (for a pool of fsyncs)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as err:
        return err
    return None


def _try_link(source: Path, link: Path) -> bool:
    """Hard-link ``source`` as ``link``; ``False`` when the file system cannot (e.g. another
    device), so the caller copies instead."""
    try:
        os.link(source, link)
    except OSError as err:
        if err.errno in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            return False
        raise
    return True


def _safe(err: BaseException) -> str:
    """An exception message with quoted values removed (they may be identifiers)."""
    return re.sub(r"('[^']*'|\"[^\"]*\")", "'<redacted>'", str(err))[:300]


def _text(value: object) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


def _int(value: object) -> int | None:
    try:
        return int(value) if value not in (None, "") else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
