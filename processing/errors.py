"""The domain errors of the science code (and of :mod:`reporting`, which builds on it).

Every error that :mod:`processing` or :mod:`reporting` raises on purpose, about the data or the
settings it was given, derives from :class:`ProcessingError`, never from ``ValueError``: a caller
catches the domain's errors (``except ProcessingError`` or a narrower class) and lets a programming
error (a ``ValueError``, ``KeyError`` or ``AttributeError`` from a bug) fail loudly instead of
turning it into a note. Genuine ``ValueError``\\ s of libraries (``float()``, pydicom) are caught
where they occur and, when they mean "this data cannot be used", re-raised as one of these.

Hierarchy::

    ProcessingError
    +-- InputError   the data cannot be used as given (series, RT objects, SEG, encodings...)
    +-- FitError     the data were usable but a model or an optimiser gave no usable answer

The node's own errors (configuration, store, chain) derive from :class:`node.errors.NodeError`;
see docs/architecture.md ("Errors").
"""

from __future__ import annotations

__all__ = ["FitError", "InputError", "ProcessingError"]


class ProcessingError(Exception):
    """Base class of the domain errors of :mod:`processing` and :mod:`reporting`."""


class InputError(ProcessingError):
    """The data (or the settings) cannot be used as given; the message says what and where."""


class FitError(ProcessingError):
    """A model fit, a registration or another computation gave no usable result for the data."""
