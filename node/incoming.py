"""Temporary files of datasets as they arrive: bounded, checked against the disk, never left.

With ``_config.STORE_RECV_CHUNKED_DATASET`` pynetdicom writes each incoming C-STORE dataset
fragment by fragment into a file it opens with ``tempfile.NamedTemporaryFile`` (in its module
``pynetdicom.dimse_messages``), hands the file's path to the ``EVT_C_STORE`` handler, and deletes
the file after the handler returns. Two things it does not do, which a node must (issue 17, rows
6-9):

* **It writes until the disk is full.** A write that fails (``ENOSPC``) raises inside the
  association's network thread: the association is aborted, no status is sent, and the partial
  file fills the storage's file system until restart.
* **It leaves the file when the transfer does not complete** (the peer aborts or disappears
  mid-dataset, or the command set cannot be encoded into the file meta), one file per try.

:func:`install` replaces that factory (a wrap, not a fork: the module attribute pynetdicom looks
up at each dataset) with one that gives the node's listener an :class:`IncomingFile` (other AEs
of the process keep pynetdicom's own file), which

* counts what it writes and checks free space every :data:`CHECK_EVERY_BYTES` (and before the
  first byte) against the low-water mark; beyond ``max_dataset_bytes``, below the mark, or on a
  failed write it **truncates the file to zero and discards the rest of the dataset** while the
  transfer continues, so that the node can answer the request with 0xA700 (Refused: Out of
  Resources, PS3.4 Table GG.4-1) instead of aborting; the store's handler asks
  :func:`refusal` first;
* lives in the store's ``tmp/incoming/`` (on the storage's file system: stored by rename, removed
  at start-up after a crash), and is registered until closed, so that :func:`discard_unfinished`
  removes the files of an association that ended before its datasets were complete.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: free space is checked again after this many bytes of one dataset (and before its first)
CHECK_EVERY_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class IncomingPolicy:
    """Where incoming datasets are written and the limits they are held to."""

    directory: Path
    #: free space (bytes) the storage's file system keeps; 0: only a failed write refuses
    low_water_bytes: int = 0
    #: largest dataset accepted (bytes); 0: no limit
    max_dataset_bytes: int = 0


#: the policy of each listening node, by ``id()`` of its pynetdicom AE
_policies: dict[int, IncomingPolicy] = {}
_open: dict[str, IncomingFile] = {}
_lock = threading.Lock()


class _Discard:
    """What an :class:`IncomingFile` writes to once it has refused its dataset."""

    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class IncomingFile:
    """The temporary file of one incoming dataset (the interface pynetdicom uses of a
    ``NamedTemporaryFile``: ``name``, ``write``, ``file.flush``, ``close``)."""

    def __init__(self, policy: IncomingPolicy) -> None:
        self.policy = policy
        policy.directory.mkdir(parents=True, exist_ok=True)
        with _lock:
            fd, name = tempfile.mkstemp(suffix=".dcm", dir=policy.directory)
            _open[name] = self
        self.name = name
        #: the association's network thread that writes it (its death orphans the file)
        self.owner = threading.current_thread()
        self.file: Any = os.fdopen(fd, "wb")
        self.written = 0
        self.discarded = 0
        self._next_check = 0
        #: why the dataset is refused (None while it is being written)
        self.refused: str | None = None

    def write(self, data: bytes) -> int:
        size = len(data)
        if self.refused is not None:
            self.discarded += size
            return size
        limit = self.policy.max_dataset_bytes
        if limit and self.written + size > limit:
            self._refuse(f"dataset larger than the {limit / 1e6:.0f} MB accepted")
            self.discarded += size
            return size
        if self.written + size >= self._next_check:
            self._next_check = self.written + size + CHECK_EVERY_BYTES
            free = shutil.disk_usage(self.policy.directory).free
            if free - size < self.policy.low_water_bytes:
                self._refuse(
                    f"free disk {free / 1e6:.0f} MB would fall below the low-water mark "
                    f"{self.policy.low_water_bytes / 1e6:.0f} MB"
                )
                self.discarded += size
                return size
        try:
            self.file.write(data)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            self._refuse(f"writing the dataset failed: {os.strerror(err.errno)}")
            self.discarded += size
            return size
        self.written += size
        return size

    def _refuse(self, reason: str) -> None:
        """Stop writing: give the space back at once, swallow the rest of the dataset."""
        self.refused = reason
        try:
            self.file.close()  # flushing what is buffered may fail on a full disk
        except OSError:
            pass
        try:
            os.truncate(self.name, 0)
        except OSError:
            pass
        self.file = _Discard()
        logger.warning("incoming dataset refused while arriving: %s", reason)

    def close(self) -> None:
        with _lock:
            _open.pop(self.name, None)
        try:
            self.file.close()
        except OSError as err:
            # a full disk when flushing the last bytes: the handler has answered already
            # (it asks refusal() first) or the file is discarded below
            if self.refused is None:
                self.refused = f"writing the dataset failed: {os.strerror(err.errno or 0)}"

    def discard(self) -> None:
        """Close and delete (an unfinished transfer)."""
        self.close()
        try:
            os.unlink(self.name)
        except FileNotFoundError:
            pass


def _factory(*args: Any, **kwargs: Any) -> Any:
    """Stand-in for ``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")``, called by
    pynetdicom in the association's network thread (a ``DULServiceProvider``, whose ``assoc``
    names the AE): an :class:`IncomingFile` for a node's listener, pynetdicom's own file for any
    other AE of the process."""
    assoc = getattr(threading.current_thread(), "assoc", None)
    policy = _policies.get(id(getattr(assoc, "ae", None)))
    if policy is None:
        return tempfile.NamedTemporaryFile(*args, **kwargs)
    return IncomingFile(policy)


def install(ae: object, policy: IncomingPolicy) -> None:
    """Write the datasets arriving at ``ae`` (a pynetdicom AE) through :class:`IncomingFile`."""
    import pynetdicom.dimse_messages

    _policies[id(ae)] = policy
    pynetdicom.dimse_messages.NamedTemporaryFile = _factory  # type: ignore[assignment]


def uninstall(ae: object) -> None:
    """``ae`` stopped listening: its datasets are no longer written here."""
    _policies.pop(id(ae), None)


def refusal(dataset_file: object) -> str | None:
    """Why the dataset written to ``dataset_file`` (a request's ``_dataset_file``) is refused;
    None when it was written whole."""
    if isinstance(dataset_file, IncomingFile):
        try:
            dataset_file.file.flush()
        except OSError as err:
            dataset_file._refuse(f"writing the dataset failed: {os.strerror(err.errno or 0)}")
        return dataset_file.refused
    return None


def discard_unfinished(assoc: object) -> bool:
    """Delete the file of the DIMSE message an association was still receiving when it ended
    (``assoc.dimse.message``, pynetdicom's message in progress); True if there was one."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    dataset_file = getattr(message, "_data_set_file", None)
    if not isinstance(dataset_file, IncomingFile):
        return False
    dataset_file.discard()
    return True


def discard_orphans() -> int:
    """Delete the files whose writing thread has died without finishing them (pynetdicom's
    network thread raised on a malformed PDU: no end event reached the listener); the count."""
    with _lock:
        orphans = [f for f in _open.values() if not f.owner.is_alive()]
    for dataset_file in orphans:
        dataset_file.discard()
    return len(orphans)
