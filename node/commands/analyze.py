"""``spine-node analyze PATH... --out DIR``: the node's whole chain, offline.

The files are imported into a temporary store and index exactly as received instances would be,
then the same chain the node runs analyses each patient. Writes every produced DICOM object and
``summary.json`` to DIR and prints a short summary. Exit status 0 on success, 2 when nothing can be
analysed (with the reason), 1 on an unexpected failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders (any mix)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="node configuration (its [analysis] section is used)",
    )
    parser.add_argument(
        "--map-cache",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of computed maps kept between runs: a study whose map "
        "inputs and settings are unchanged is not refitted (default: none)",
    )


def run(args: argparse.Namespace) -> int:
    from node.analysis import format_course, patients_in_index
    from node.chain import course_summary
    from node.index import Index
    from node.ingest import import_files, iter_files
    from node.map_cache import MapCache
    from node.pipeline import StorePatient, run_patient
    from node.store import Store
    from node.worker import chain_settings_from
    from reporting.summary import format_summary

    settings = chain_settings_from(args.config)
    try:
        files = list(iter_files(args.paths))
    except FileNotFoundError as err:
        print(f"spine-node analyze: {err}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="spine-node-analyze-") as tmp:
        index = Index(Path(tmp) / "index.sqlite")
        try:
            # a throwaway store (deleted below): files are not fsynced
            store = Store(Path(tmp), index, durable=False)
            report = import_files(store, files)
            for path, reason in report.skipped:
                print(f"skipped {path}: {reason}", file=sys.stderr)
            if not report.stored:
                print(
                    "spine-node analyze: no DICOM instance could be read from the given paths",
                    file=sys.stderr,
                )
                return 2
            patients = patients_in_index(index)
            if len(patients) > 1:
                print(
                    f"spine-node analyze: the files hold {len(patients)} patients; analyse one "
                    "patient at a time",
                    file=sys.stderr,
                )
                return 2
            # the node's own runner: the store's rules (rejection notes), the chain, the outputs
            outcome = run_patient(
                StorePatient(index, store.root, patients[0]),
                settings,
                args.out,
                map_cache=None if args.map_cache is None else MapCache(args.map_cache),
            )
        finally:
            index.close()
    print(f"imported {outcome.inputs}")
    if outcome.result is None:
        print(f"spine-node analyze: nothing to analyse: {outcome.reason}", file=sys.stderr)
        return 2
    result = outcome.result
    print("CyberKnife course:")
    print(format_course(course_summary(result.course)))
    print(format_summary(result.results))
    for note in result.notes:
        print(f"note: {note}")
    print(f"wrote {len(outcome.paths)} DICOM objects and summary.json to {args.out}")
    return 0
