"""The one runner: a patient's datasets in, the chain's result and its written outputs out."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from node.chain import ChainError, ChainResult, ChainSettings, run_chain
from node.pipeline.sources import DatasetSource
from node.roles import PatientMismatchError

if TYPE_CHECKING:
    from node.map_cache import MapCache

logger = logging.getLogger(__name__)


@dataclass
class PatientOutcome:
    """What :func:`run_patient` did for one patient.

    Attributes
    ----------
    state : {'done', 'waiting'}
        ``done``: the chain ran (and its outputs were written when an output folder was given);
        ``waiting``: nothing can be analysed yet, :attr:`reason` says why (no course, no baseline,
        datasets of several patients...).
    reason : str or None
        Why the patient is waiting (no PHI: the chain's messages name UIDs, never patients).
    inputs : str
        The loaded datasets in a few words (instances, series, studies).
    result : ChainResult or None
        The chain's result when ``done``.
    paths : list of Path
        The written DICOM objects (``summary.json`` beside them), in output order.
    times_s : dict
        Wall time of ``load``, ``chain`` and ``write`` (seconds).
    """

    state: Literal["done", "waiting"]
    reason: str | None = None
    inputs: str = ""
    result: ChainResult | None = None
    paths: list[Path] = field(default_factory=list)
    times_s: dict[str, float] = field(default_factory=dict)

    @property
    def calls(self) -> list[str]:
        """The rule-based response call of every follow-up, in time order."""
        if self.result is None:
            return []
        return [r.response.category.value for r in self.result.results if r.response is not None]


def run_patient(
    source: DatasetSource,
    settings: ChainSettings | None = None,
    out_dir: Path | None = None,
    *,
    map_cache: MapCache | None = None,
) -> PatientOutcome:
    """Load one patient's datasets, run the chain and write its outputs.

    Parameters
    ----------
    source : DatasetSource
        :class:`node.pipeline.StorePatient` (the node, ``analyze``) or
        :class:`node.pipeline.DicomFolder` (``cohort``); both leave rejected instances out.
    settings : ChainSettings, optional
        The chain's settings (default: the built-in defaults).
    out_dir : Path, optional
        Where the DICOM objects and ``summary.json`` are written
        (:func:`node.analysis.write_outputs`); nothing is written without it.
    map_cache : node.map_cache.MapCache, optional
        Computed maps kept between runs (:func:`node.chain.run_chain`).

    Returns
    -------
    PatientOutcome
        ``done``, or ``waiting`` when the chain finds nothing to analyse
        (:class:`node.chain.ChainError`) or the datasets belong to several patients
        (:class:`node.roles.PatientMismatchError`).

    Raises
    ------
    OSError
        The datasets cannot be read or the outputs cannot be written.
    processing.errors.ProcessingError
        A domain error the chain does not turn into a note (unusable data it cannot work around).
    """
    from node.analysis import chain_datasets_summary, write_outputs

    times: dict[str, float] = {}
    start = time.perf_counter()
    datasets = source.load()
    times["load"] = time.perf_counter() - start
    inputs = chain_datasets_summary(datasets)
    start = time.perf_counter()
    try:
        result = run_chain(datasets, settings=settings, map_cache=map_cache)
    except (ChainError, PatientMismatchError) as err:
        return PatientOutcome("waiting", reason=str(err), inputs=inputs, times_s=times)
    finally:
        times["chain"] = time.perf_counter() - start
        del datasets  # the chain keeps what it needs; the pixel data of the rest can go
    paths: list[Path] = []
    if out_dir is not None:
        start = time.perf_counter()
        paths = write_outputs(result, Path(out_dir))
        times["write"] = time.perf_counter() - start
    return PatientOutcome("done", inputs=inputs, result=result, paths=paths, times_s=times)
