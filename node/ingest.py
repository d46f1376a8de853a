"""Import DICOM files from disk into the node's store, exactly as if they had arrived by C-STORE.

Used by ``spine-node analyze`` (offline runs use the same store, index and chain as the node) and
by the demo. Files are checked the way the C-STORE handler checks received datasets; files that are
not DICOM Part 10 are reported and skipped, never guessed at.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from node.errors import NodeError
from node.store import Store, StoreResult
from processing.series import MEDIA_STORAGE_DIRECTORY

logger = logging.getLogger(__name__)


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


def import_files(store: Store, paths: Iterable[Path]) -> ImportReport:
    """Store every DICOM file of ``paths``; report skipped ones (not DICOM, unparseable)."""
    report = ImportReport()
    for path in paths:
        try:
            header = dcmread(
                path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"]
            )
            if str(header.file_meta.get("MediaStorageSOPClassUID", "")) == MEDIA_STORAGE_DIRECTORY:
                logger.info(
                    "set aside %s: a DICOMDIR (media directory, not an instance)", path.name
                )
                report.skipped.append(
                    (
                        path,
                        "DICOMDIR: a media directory, not an instance "
                        "(its files are imported on their own)",
                    )
                )
                continue
            transfer_syntax = header.file_meta.get("TransferSyntaxUID")
            if not transfer_syntax:
                raise InvalidDicomError("no file meta information with a Transfer Syntax UID")
            # the C-STORE path for files: memory-mapped, checked, hashed, copied
            result = store.accept_file(
                path,
                transfer_syntax_uid=str(transfer_syntax),
                request_sop_class_uid=str(header.get("SOPClassUID", "")),
                request_sop_instance_uid=str(header.get("SOPInstanceUID", "")),
                calling_ae="IMPORT",
            )
        except NodeError as err:  # refused by the store: its reason names no patient data
            logger.warning("skipped %s: %s", path.name, type(err).__name__)
            report.skipped.append((path, f"{type(err).__name__}: {err}"))
            continue
        except (InvalidDicomError, EOFError, ValueError) as err:
            logger.warning("skipped %s: %s", path.name, type(err).__name__)
            report.skipped.append((path, f"{type(err).__name__}: not a readable DICOM file"))
            continue
        report.stored.append(result)
    return report
