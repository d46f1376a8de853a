"""DICOM dates: one parser for every module that reads a DA (or DT) value.

DICOM stores dates as ``YYYYMMDD`` (DA) or at the start of a ``YYYYMMDDHHMMSS...`` (DT); the
node's index and JSON files store ISO ``YYYY-MM-DD``. :func:`dicom_date` reads all three.
"""

from __future__ import annotations

import datetime as dt

__all__ = ["dicom_date"]


def dicom_date(value: object) -> dt.date | None:
    """A DICOM DA/DT value, or an ISO date, as a :class:`datetime.date`.

    Parameters
    ----------
    value
        ``"20260105"``, ``"20260105093000.000"``, ``"2026-01-05"``, a ``date``/``datetime``,
        or None / an empty value.

    Returns
    -------
    datetime.date or None
        None when the value is absent or is not a valid date (the caller decides whether that
        is an error).
    """
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    text = str(value or "").strip()
    try:
        if len(text) >= 8 and text[:8].isdigit():
            return dt.datetime.strptime(text[:8], "%Y%m%d").date()
        if len(text) >= 10 and text[4] == "-" and text[7] == "-":
            return dt.date.fromisoformat(text[:10])
    except ValueError:
        return None
    return None
