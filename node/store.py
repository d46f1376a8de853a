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
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from node.errors import (
    DatasetMismatchError,
    OutOfResourcesError,
    StoreOutcome,
    UnparseableDatasetError,
)
from node.index import Index, NewInstance
from node.rejection import rejection_note

logger = logging.getLogger(__name__)

#: PS3.5 9.1: digits and dots, at most 64 characters
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
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
_HEADER_TAGS = [
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
    """

    def __init__(self, root: Path, index: Index, *, low_water_bytes: int = 0) -> None:
        self.root = Path(root).resolve()
        self.index = index
        self.low_water_bytes = int(low_water_bytes)
        self.instances_dir = self.root / "instances"
        self.tmp_dir = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        self.outbox_dir = self.root / "outbox"
        #: where the serve process's temporary files (pynetdicom's received datasets) go
        self.incoming_dir = self.tmp_dir / "incoming"
        for folder in (
            self.instances_dir,
            self.tmp_dir,
            self.incoming_dir,
            self.quarantine_dir,
            self.outbox_dir,
        ):
            folder.mkdir(parents=True, exist_ok=True)
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
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}.tmp"
        try:
            destination.parent.mkdir(parents=True, exist_ok=True)
            # same file system: a hard link to pynetdicom's received file, no second copy
            linked = (
                isinstance(data, _Received) and data.path is not None and _try_link(data.path, tmp)
            )
            fd = (
                os.open(tmp, os.O_RDONLY)
                if linked
                else os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            )
            try:
                if isinstance(data, _Received) and not linked:
                    data.write_into(fd)
                elif not linked:
                    for chunk in data if isinstance(data, list) else [data]:
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, destination)
            dir_fd = os.open(destination.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise OutOfResourcesError(f"cannot write {destination.name}: {err.strerror}") from err

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
        rejection = header.get("rejection")
        digest = received.sha256()
        path = self.instance_path(study, series, sop_instance)
        lock = self._locks[hash(sop_instance) % len(self._locks)]
        with lock:
            try:
                existing = self.index.instance(sop_instance)
            except sqlite3.Error as err:
                raise OutOfResourcesError(f"index unavailable: {err}") from err
            if existing is not None:
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
            self.write_durably(received, path)
            try:
                self.index.add_instance(
                    NewInstance(
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
                )
            except sqlite3.Error as err:
                # not indexed means not acknowledged: do not leave an orphan file behind; a
                # busy or full database is a resource problem the sender may retry (0xA700)
                path.unlink(missing_ok=True)
                raise OutOfResourcesError(f"index unavailable: {err}") from err
            except BaseException:
                path.unlink(missing_ok=True)
                raise
        if rejection is not None:
            logger.info(
                "rejection note %s (%s) withdraws %d instance(s)",
                sop_instance,
                rejection.reason,
                len(rejection.rejected),
            )
        return StoreResult(StoreOutcome.STORED, sop_instance, study, path)

    def _parse(self, received: _Received, transfer_syntax_uid: str) -> dict[str, object]:
        """Check completeness and read the header elements the index needs (no pixel data)."""
        ts = UID(transfer_syntax_uid)
        try:
            raw = received.dataset
            if ts == DeflatedExplicitVRLittleEndian:
                raw = zlib.decompress(bytes(received.dataset), -zlib.MAX_WBITS)
            check_dataset_structure(
                raw, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian
            )
            with warnings.catch_warnings(), received.stream() as stream:
                # pydicom's warnings quote element values, which may be patient identifiers
                warnings.simplefilter("ignore")
                ds = dcmread(stream, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
                header = {k: ds.get(k) for k in _HEADER_TAGS}
                header["rejection"] = rejection_note(ds)
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
