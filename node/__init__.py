"""Spine Response Node: the DICOM node (network, storage, index, scheduling, orchestration, CLI)."""

from __future__ import annotations

__version__ = "0.2.1"
