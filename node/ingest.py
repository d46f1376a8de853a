"""Import DICOM files from disk into the node's store, exactly as if they had arrived by C-STORE.

Used by ``spine-node analyze`` (offline runs use the same store, index and chain as the node) and
by the demo. Files are checked the way the C-STORE handler checks received datasets; files that are
not DICOM Part 10 are reported and skipped, never guessed at. Each file's header is read once;
the store commits the files in batches (:class:`node.store.ImportBatch`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError

from node.errors import NodeError
from node.store import HEADER_TAGS, ImportBatch, Store, StoreResult, header_of
from processing.series import MEDIA_STORAGE_DIRECTORY

logger = logging.getLogger(__name__)

#: files per commit of an import (one index transaction, one fsync per folder)
IMPORT_BATCH_FILES = 256


@dataclass
class ImportReport:
    """What an import did: stored results, and the files skipped with the reason."""

    stored: list[StoreResult] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def iter_files(paths: Sequence[Path | str]) -> Iterator[Path]:
    """Every regular file under ``paths`` (files or folders), in a stable order."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            # follow linked folders (a study assembled from links), but never twice (link cycles)
            seen: set[str] = set()
            for root, dirs, files in os.walk(path, followlinks=True):
                real = os.path.realpath(root)
                if real in seen:
                    dirs[:] = []
                    continue
                seen.add(real)
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")


def import_files(
    store: Store, paths: Iterable[Path], *, batch_size: int = IMPORT_BATCH_FILES
) -> ImportReport:
    """Store every DICOM file of ``paths``; report skipped ones (not DICOM, unparseable).

    Each file's header is read once (:func:`_read_header`) and handed to the store, which
    checks and stages it; files are committed ``batch_size`` at a time (one index transaction,
    one fsync per folder: :class:`~node.store.ImportBatch`), each fsynced before the index
    records it.
    """
    report = ImportReport()
    with store.import_batch(calling_ae="IMPORT", max_files=batch_size) as batch:
        for path in paths:
            try:
                _import_one(batch, path, report)
            finally:
                _collect(batch, report)
    _collect(batch, report)
    return report


def _import_one(batch: ImportBatch, path: Path, report: ImportReport) -> None:
    """Check one file and hand it to ``batch``; a file refused before the commit is skipped."""
    ds: Dataset
    try:
        read = _read_header(path)
        if read is None:
            # the read failed or warned: the two-step path, for the same messages and outcome
            ds = dcmread(
                path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"]
            )
            header = None
        else:
            ds, header = read
        if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
            logger.info("set aside %s: a DICOMDIR (media directory, not an instance)", path.name)
            report.skipped.append(
                (
                    path,
                    "DICOMDIR: a media directory, not an instance "
                    "(its files are imported on their own)",
                )
            )
            return
        transfer_syntax = ds.file_meta.get("TransferSyntaxUID")
        if not transfer_syntax:
            raise InvalidDicomError("no file meta information with a Transfer Syntax UID")
        # the C-STORE path for files: memory-mapped, checked, hashed, copied
        batch.add_file(
            path,
            transfer_syntax_uid=str(transfer_syntax),
            request_sop_class_uid=str(ds.get("SOPClassUID", "")),
            request_sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            header=header,
        )
    except NodeError as err:  # refused by the store: its reason names no patient data
        logger.warning("skipped %s: %s", path.name, type(err).__name__)
        report.skipped.append((path, f"{type(err).__name__}: {err}"))
    except (InvalidDicomError, EOFError, ValueError) as err:
        logger.warning("skipped %s: %s", path.name, type(err).__name__)
        report.skipped.append((path, f"{type(err).__name__}: not a readable DICOM file"))


def _collect(batch: ImportBatch, report: ImportReport) -> None:
    """Move the outcomes ``batch`` has decided into ``report``."""
    for path, outcome in batch.outcomes():
        if isinstance(outcome, NodeError):
            logger.warning("skipped %s: %s", path.name, type(outcome).__name__)
            report.skipped.append((path, f"{type(outcome).__name__}: {outcome}"))
        else:
            report.stored.append(outcome)


def _read_header(path: Path) -> tuple[Dataset, dict[str, object]] | None:
    """The file's header (no pixel data), read once for the checks here and for the store.

    Returns ``None`` when reading it raised or warned: the caller then takes the two-step path
    of a C-STORE'd file (a read of the SOP Class/Instance UIDs here, the store's own read
    there), so that a damaged file is reported, warned about and quarantined exactly as before.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = dcmread(path, stop_before_pixels=True, specific_tags=HEADER_TAGS)
            header = header_of(ds)
            ds.file_meta.get("MediaStorageSOPClassUID", "")
            ds.file_meta.get("TransferSyntaxUID")
    except Exception:  # noqa: BLE001 - any failure: the two-step path reports it as before
        return None
    return None if caught else (ds, header)
