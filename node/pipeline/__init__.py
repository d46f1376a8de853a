"""One way to analyse a patient: load the datasets, run the chain, write the outputs.

The running node (:mod:`node.worker`, in its analysis child process), ``spine-node analyze`` and
``spine-node cohort`` all call :func:`run_patient`, so that they read their inputs with the same
rules (IHE IOCM rejection notes applied, key object selections left out), run the same chain with
the same error handling and write ``summary.json`` and the DICOM objects the same way.

Why inside ``node/`` and not beside it: the runner reads the node's store through its index
(:mod:`node.index`, :mod:`node.analysis`), uses the node's rejection rules
(:mod:`node.rejection`), its map cache (:mod:`node.map_cache`) and the chain's orchestration
(:mod:`node.chain`), and reports the node's errors (:class:`node.errors.NodeError`). A package
beside ``node/`` would import all of these and add a fourth layer without a rule of its own; inside
``node/`` it keeps the layering ``node -> reporting -> processing`` unchanged
(docs/architecture.md, "Layers").

Modules
-------
:mod:`node.pipeline.sources`
    Where a patient's datasets come from: the store (:class:`StorePatient`) or files and folders
    (:class:`DicomFolder`), both with rejection notes applied.
:mod:`node.pipeline.runner`
    :func:`run_patient` and its :class:`PatientOutcome`.
"""

from __future__ import annotations

from node.pipeline.runner import PatientOutcome, run_patient
from node.pipeline.sources import DatasetSource, DicomFolder, StorePatient, without_rejected

__all__ = [
    "DatasetSource",
    "DicomFolder",
    "PatientOutcome",
    "StorePatient",
    "run_patient",
    "without_rejected",
]
