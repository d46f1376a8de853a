"""Where a patient's datasets come from: the node's store, or DICOM files and folders.

Both sources apply the same rules as the store (:mod:`node.rejection`): instances withdrawn by an
IHE IOCM rejection note (a Key Object Selection titled e.g. "Rejected for Quality Reasons",
(113001, DCM)) are left out, and so are key object selections (the notes among them): the chain
has no use for them.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import KeyObjectSelectionDocumentStorage

from node.index import Index
from node.rejection import rejection_note
from processing.series import MEDIA_STORAGE_DIRECTORY

logger = logging.getLogger(__name__)

#: Companion files of exports and conversions (dcm2niix sidecars, notes, reports): not DICOM, and
#: skipped quietly. (Compressed archives are not among them: a gzipped DICOM is worth a warning.)
COMPANION_SUFFIXES = frozenset(
    {
        ".bval",
        ".bvec",
        ".json",
        ".nii",
        ".txt",
        ".csv",
        ".md",
        ".xml",
        ".html",
        ".pdf",
        ".jpg",
        ".png",
    }
)


class DatasetSource(Protocol):
    """Something that gives every usable instance of one patient."""

    def load(self) -> list[Dataset]:
        """Every instance of the patient to analyse (pixel data included)."""
        ...


def without_rejected(datasets: Iterable[Dataset]) -> list[Dataset]:
    """``datasets`` without the instances their IOCM rejection notes withdraw, and without key
    object selections (the notes themselves among them), in their order.

    Parameters
    ----------
    datasets : iterable of Dataset
        Instances as read from files (a folder may hold rejection notes beside the instances).

    Returns
    -------
    list of Dataset
    """
    datasets = list(datasets)
    rejected: set[str] = set()
    for ds in datasets:
        note = rejection_note(ds)
        if note is not None:
            logger.info(
                "rejection note %s (%s) withdraws %d instance(s)",
                note.note_uid,
                note.reason,
                len(note.rejected),
            )
            rejected.update(note.rejected)
    return [
        ds
        for ds in datasets
        if str(ds.get("SOPClassUID", "")) != KeyObjectSelectionDocumentStorage
        and str(ds.get("SOPInstanceUID", "")) not in rejected
    ]


@dataclass(frozen=True)
class StorePatient:
    """One patient of the node's store, read through its index (rejections applied there).

    Parameters
    ----------
    index : Index or Path
        The open index, or the path of its database (opened for the read and closed again: the
        analysis child process does not keep a connection while the chain runs).
    store_root : Path
        The store's root folder (the index's paths are relative to it).
    patient_row : int
        The patient's row id in the index.
    """

    index: Index | Path
    store_root: Path
    patient_row: int

    def load(self) -> list[Dataset]:
        from node.analysis import patient_datasets

        if isinstance(self.index, Index):
            return patient_datasets(self.index, Path(self.store_root), self.patient_row)
        index = Index(Path(self.index))
        try:
            return patient_datasets(index, Path(self.store_root), self.patient_row)
        finally:
            index.close()


@dataclass(frozen=True)
class DicomFolder:
    """DICOM files and folders (searched recursively), with the rejection notes they hold applied.

    Files that are not DICOM (a ``truth.json``, a README) and DICOMDIR media directories are
    skipped and listed in :attr:`skipped` after :meth:`load`.

    Parameters
    ----------
    paths : sequence of Path
        Files or folders; every file under a folder is tried, in sorted path order.
    """

    paths: Sequence[Path]
    skipped: list[tuple[Path, str]] = field(default_factory=list, compare=False)

    def load(self) -> list[Dataset]:
        """Every DICOM instance under :attr:`paths`, rejected instances and notes left out.

        A file that cannot be read as DICOM is skipped (listed in :attr:`skipped` with its
        reason) and logged by file name only: at debug level for the companion files of exports
        and conversions (:data:`COMPANION_SUFFIXES`), as a warning otherwise.

        Raises
        ------
        FileNotFoundError
            A path does not exist.
        """
        from node.ingest import iter_files

        self.skipped.clear()
        datasets: list[Dataset] = []
        with warnings.catch_warnings():
            # pydicom's validation warnings quote element values (possibly identifiers)
            warnings.simplefilter("ignore")
            for path in sorted(iter_files(self.paths)):
                try:
                    ds = dcmread(path)
                except (InvalidDicomError, EOFError, OSError, ValueError) as err:
                    quiet = path.suffix.lower() in COMPANION_SUFFIXES
                    (logger.debug if quiet else logger.warning)(
                        "skipping %s: not readable as DICOM (%s)", path.name, type(err).__name__
                    )
                    self.skipped.append((path, f"not a DICOM file ({type(err).__name__})"))
                    continue
                meta = getattr(ds, "file_meta", None)
                media = "" if meta is None else str(meta.get("MediaStorageSOPClassUID", ""))
                if media == MEDIA_STORAGE_DIRECTORY:
                    self.skipped.append((path, "DICOMDIR (a media directory, not an instance)"))
                    continue
                datasets.append(ds)
        return without_rejected(datasets)
