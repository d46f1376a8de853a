"""DICOM outputs (SEG, Parametric Map, TID 1500 SR) built with highdicom.

``reporting`` may import result types from ``processing``; it never imports ``node``.
"""
