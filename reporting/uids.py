"""Deterministic UIDs for the node's outputs.

Re-running the analysis on the same inputs must give the same Series and SOP Instance UIDs so that a
PACS replaces earlier results instead of duplicating them, while a new algorithm version or changed
inputs give new ones (docs/architecture.md, "Deterministic UIDs"). UIDs are derived as
``2.25.<integer of a UUID>`` (PS3.5 §B.2, ISO/IEC 9834-8) where the UUID is a name-based version 5
UUID (RFC 9562 §5.5) of the identifying tuple.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterable

import numpy as np
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

#: Namespace of the node's name-based UUIDs (itself uuid5 of the project name in the URL namespace).
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:spine-response-node:outputs")

_SEPARATOR = "\x1f"  # unit separator: cannot occur in UIDs or version strings


def deterministic_uid(
    *,
    source_study_uid: str,
    tracking_uid: str | None,
    kind: str,
    algorithm_version: str,
    input_digest: str,
) -> str:
    """Return a ``2.25.`` UID that depends only on the identifying tuple.

    Parameters
    ----------
    source_study_uid : str
        Study Instance UID of the study the output belongs to.
    tracking_uid : str or None
        Lesion Tracking UID (None for outputs not tied to a lesion, e.g. a map).
    kind : str
        Output kind and level, e.g. ``"seg/series"``, ``"seg/instance"``, ``"pm/ADC/instance"``,
        ``"sr/series"``.
    algorithm_version : str
        Version of the algorithm that produced the output.
    input_digest : str
        Digest of the inputs (see :func:`digest_arrays`, :func:`digest_uids`).

    Returns
    -------
    str
        UID of at most 44 characters (``2.25.`` + at most 39 digits).
    """
    for name, value in (
        ("source_study_uid", source_study_uid),
        ("kind", kind),
        ("algorithm_version", algorithm_version),
        ("input_digest", input_digest),
    ):
        if not value:
            raise ValueError(f"{name} must be a non-empty string")
    key = _SEPARATOR.join(
        (source_study_uid, tracking_uid or "", kind, algorithm_version, input_digest)
    )
    return f"2.25.{uuid.uuid5(NAMESPACE, key).int}"


def digest_arrays(*arrays: np.ndarray) -> str:
    """SHA-256 hex digest of arrays (dtype, shape and bytes in C order)."""
    h = hashlib.sha256()
    for array in arrays:
        a = np.ascontiguousarray(array)
        h.update(str(a.dtype).encode())
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def digest_uids(datasets: Iterable[Dataset]) -> str:
    """SHA-256 hex digest of the SOP Instance UIDs of datasets (order-independent)."""
    h = hashlib.sha256()
    for uid in sorted(str(ds.SOPInstanceUID) for ds in datasets):
        h.update(uid.encode())
        h.update(_SEPARATOR.encode())
    return h.hexdigest()


def digest_text(*parts: str) -> str:
    """SHA-256 hex digest of text parts (e.g. a JSON dump of sorted settings)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8"))
        h.update(_SEPARATOR.encode())
    return h.hexdigest()
