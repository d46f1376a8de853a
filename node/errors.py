"""The node's exceptions, and the one place where outcomes become DICOM status codes.

Nothing below :func:`store_status` returns raw hexadecimal statuses: the C-STORE handler turns
either a :class:`StoreOutcome` or a :class:`NodeError` into a status here.

References
----------
DICOM PS3.4 Annex B.2.3, Table B.2-1 (C-STORE statuses); PS3.7 Annex C (status classes).
"""

from __future__ import annotations

import enum
import logging

logger = logging.getLogger(__name__)

#: PS3.4 Table B.2-1 and PS3.7 C.
SUCCESS = 0x0000
#: Warning "Elements Discarded": used when an instance with an already stored SOP Instance UID
#: but different content arrives; the first copy is kept and the new content is discarded.
WARNING_ELEMENTS_DISCARDED = 0xB006
#: Refused: Out of Resources (disk below the low-water mark, write error).
REFUSED_OUT_OF_RESOURCES = 0xA700
#: Error: Data Set does not match SOP Class (request UIDs differ from the dataset's).
ERROR_DATASET_DOES_NOT_MATCH = 0xA900
#: Error: Cannot understand (the dataset cannot be parsed).
ERROR_CANNOT_UNDERSTAND = 0xC210
#: Failure: Unable to process (any other failure in the handler).
FAILURE_UNABLE_TO_PROCESS = 0xC211


class NodeError(Exception):
    """Base class of the node's errors; :attr:`status` is the C-STORE status it maps to."""

    status: int = FAILURE_UNABLE_TO_PROCESS


class ConfigError(NodeError):
    """The configuration file is missing, unreadable or holds an invalid value (names the key)."""


class UnparseableDatasetError(NodeError):
    """The received bytes are not a complete, well-formed DICOM dataset (kept in quarantine)."""

    status = ERROR_CANNOT_UNDERSTAND


class DatasetMismatchError(NodeError):
    """The C-STORE request's SOP Class/Instance UID differs from the dataset's (not stored)."""

    status = ERROR_DATASET_DOES_NOT_MATCH


class OutOfResourcesError(NodeError):
    """Free disk is below the low-water mark, or writing failed (no partial file is left)."""

    status = REFUSED_OUT_OF_RESOURCES


class IndexDatabaseError(NodeError):
    """The index database is unusable (wrong schema version, locked beyond the timeout)."""


class PeerError(NodeError):
    """A remote peer could not be reached, rejected the association or aborted it."""


class StoreOutcome(enum.Enum):
    """What the store did with a received instance."""

    STORED = "stored"
    #: same SOP Instance UID and identical content: nothing written, no new row
    ALREADY_STORED = "already_stored"
    #: same SOP Instance UID, different content: first copy kept, event recorded
    CONFLICT_KEPT_FIRST = "conflict_kept_first"


_OUTCOME_STATUS = {
    StoreOutcome.STORED: SUCCESS,
    StoreOutcome.ALREADY_STORED: SUCCESS,
    StoreOutcome.CONFLICT_KEPT_FIRST: WARNING_ELEMENTS_DISCARDED,
}


def store_status(result: StoreOutcome | BaseException) -> int:
    """Map a store outcome or an exception raised while storing to a C-STORE status.

    Parameters
    ----------
    result : StoreOutcome or BaseException
        The store's outcome, or the exception it raised.

    Returns
    -------
    int
        The C-STORE response status (PS3.4 Table B.2-1). Unexpected exceptions give 0xC211.
    """
    if isinstance(result, StoreOutcome):
        return _OUTCOME_STATUS[result]
    if isinstance(result, NodeError):
        return result.status
    if isinstance(result, OSError):
        return REFUSED_OUT_OF_RESOURCES
    return FAILURE_UNABLE_TO_PROCESS


def is_success_or_warning(status: int | None) -> bool:
    """True when a C-STORE response status means the peer holds the instance (PS3.7 C.1-C.3)."""
    if status is None:
        return False
    return status == SUCCESS or (status & 0xF000) == 0xB000 or status == 0x0107 or status == 0x0116
