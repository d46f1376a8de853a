"""``spine-node demo``: a newcomer's first run — a full DICOM round trip on this machine.

What it does, with nothing but this checkout (no PACS, no external service):

1. prepares an output folder (``./demo-output/`` by default; a previous demo's folder, recognised
   by its marker file, is emptied so the demo can be run again);
2. starts a local *result receiver* (an in-process pynetdicom Storage SCP, AE ``DEMORESULTS``,
   writing what it receives to ``<out>/received/``);
3. starts the node itself (:class:`node.service.NodeService`, AE ``SPINENODE``) on a free
   loopback port with an SQLite index and local storage under ``<out>/storage/`` and the
   configuration written to ``<out>/node.toml``, plus its dashboard on a free loopback port;
4. generates a small phantom patient (``spine-node phantom --size small``) under ``<out>/phantom/``;
5. sends the baseline MRI, the CyberKnife RT course (RTPLAN, RTSTRUCT, RTDOSE) and the follow-up
   MRI to the node over DICOM with the node's own C-STORE SCU (:func:`node.scu.send_files`);
6. waits until the node has analysed the patient and the receiver holds every object the analysis
   produced (SEG, Parametric Maps, TID 1500 SR...), or times out with a clear message;
7. prints what was received, the course found, the measurements and changes, the response call
   with its evidence (:func:`reporting.summary.format_summary`) and where everything is; then
   stops the node and the receiver (``--keep-running`` keeps the node and its dashboard up until
   Ctrl-C).

Exit status: 0 on success, 1 on a timeout or a failed analysis, 2 on a bad output folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

if TYPE_CHECKING:  # the CLI parser imports neither pynetdicom nor the node's service
    import sqlite3
    from collections.abc import Callable

    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event
    from pynetdicom.transport import ThreadedAssociationServer

    from node.index import Index
    from node.service import NodeService

logger = logging.getLogger(__name__)

#: marker file that makes an output folder safe to empty on the next run
MARKER = ".spine-node-demo"
NODE_AE = "SPINENODE"
SENDER_AE = "DEMOSCU"
RECEIVER_AE = "DEMORESULTS"
#: scenarios the demo offers (kept literal: building the CLI parser imports no science)
SCENARIOS = ("responder", "progression", "pseudoprogression", "stable")
_UID = re.compile(r"^[0-9.]{1,64}$")


class DemoError(RuntimeError):
    """The demo cannot go on (bad output folder, timeout, failed analysis)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo-output"),
        help="output folder (default ./demo-output; a previous demo's is emptied)",
    )
    parser.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="responder",
        help="phantom response scenario (default responder)",
    )
    parser.add_argument("--seed", type=int, default=7, help="phantom random seed (default 7)")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for the results (default 600)"
    )
    parser.add_argument(
        "--quiet-period",
        type=float,
        default=3.0,
        help="seconds without a new instance before a study is stable (default 3)",
    )
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="keep the node and its dashboard running after the demo (Ctrl-C ends)",
    )


# ----------------------------------------------------------------------------- output folder
def prepare_output(out: Path) -> Path:
    """Create ``out`` (or empty a previous demo's ``out``) and mark it as the demo's.

    Raises
    ------
    DemoError
        ``out`` exists, is not empty and holds no demo marker (it is never emptied then).
    """
    out = Path(out).resolve()
    if out.exists():
        if not out.is_dir():
            raise DemoError(f"{out} exists and is not a folder")
        entries = list(out.iterdir())
        if entries and not (out / MARKER).is_file():
            raise DemoError(
                f"{out} is not empty and was not made by spine-node demo; "
                "choose another folder with --out"
            )
        for entry in entries:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(
        "made by spine-node demo; emptied by its next run\n", encoding="utf-8"
    )
    return out


# ----------------------------------------------------------------------------- result receiver
@dataclass
class ReceivedObject:
    """One object the result receiver stored."""

    sop_class_uid: str
    sop_instance_uid: str
    path: Path


@dataclass
class ResultReceiver:
    """A minimal Storage SCP (pynetdicom) writing every received object to ``folder``.

    Parameters
    ----------
    folder : Path
        Where ``<SOPInstanceUID>.dcm`` files are written.
    ae_title : str
        Its AE title.
    """

    folder: Path
    ae_title: str = RECEIVER_AE
    received: dict[str, ReceivedObject] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None

    def _on_store(self, event: Event) -> int:
        request = cast("C_STORE", event.request)  # an EVT_C_STORE handler gets C-STORE requests
        sop_uid = str(request.AffectedSOPInstanceUID)
        sop_class = str(request.AffectedSOPClassUID)
        if not _UID.match(sop_uid):
            logger.warning("result receiver: refused an instance with a malformed SOP UID")
            return 0xC210
        path = self.folder / f"{sop_uid}.dcm"
        # atomic: a re-sent object (same UID) never shows a half-written file to a reader
        part = path.with_name(f"{sop_uid}.{threading.get_ident()}.part")
        chunked = getattr(request, "_dataset_path", None)
        if chunked is not None:
            # STORE_RECV_CHUNKED_DATASET (set by node.scp): pynetdicom wrote the whole file,
            # file meta included, to a temporary path it removes after this handler
            shutil.copyfile(event.dataset_path, part)
        else:
            part.write_bytes(event.encoded_dataset())
        os.replace(part, path)
        with self._lock:
            self.received[sop_uid] = ReceivedObject(sop_class, sop_uid, path)
        return 0x0000

    def start(self) -> int:
        """Start listening on a free loopback port; return the port."""
        from pydicom.uid import (
            DeflatedExplicitVRLittleEndian,
            ExplicitVRBigEndian,
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
        )
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        # pynetdicom accepts the first of *its* syntaxes the requestor proposed: explicit VR
        # first, since the node sends its files as stored (explicit VR little endian)
        syntaxes = [
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
            DeflatedExplicitVRLittleEndian,
            ExplicitVRBigEndian,
        ]
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:  # always set in pynetdicom's list
                ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        assert server is not None  # a non-blocking start returns its server
        self._server = server
        return int(server.server_address[1])

    def snapshot(self) -> dict[str, ReceivedObject]:
        """Copy of what was received so far (SOP instance UID -> object)."""
        with self._lock:
            return dict(self.received)

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None


# ----------------------------------------------------------------------------- node
def write_demo_config(out: Path, receiver_port: int, quiet_period_s: float) -> Path:
    """``<out>/node.toml``: the embedded defaults plus the demo's sender and receiver peers."""
    path = out / "node.toml"
    path.write_text(
        f"""# written by spine-node demo
[node]
ae_title = "{NODE_AE}"
bind_address = "127.0.0.1"
port = 0                        # a free port
storage = "storage"             # relative to this file
quiet_period_s = {quiet_period_s}
disk_low_water_mb = 0
result_destinations = ["{RECEIVER_AE}"]

[dispatch]
poll_interval_s = 1
backoff_initial_s = 2

[dashboard]
enabled = true
bind_address = "127.0.0.1"
port = 0                        # a free port
allow_local_without_login = true  # a throwaway single-user run; a site sets a login

[[peers]]
ae_title = "{SENDER_AE}"
host = "127.0.0.1"
may_send = true

[[peers]]
ae_title = "{RECEIVER_AE}"
host = "127.0.0.1"
port = {receiver_port}
may_send = false
may_receive = true
""",
        encoding="utf-8",
    )
    return path


# ----------------------------------------------------------------------------- results
def find_summary(storage: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest ``results/patient-*/summary.json`` under ``storage`` and its content."""
    candidates = sorted(
        (storage / "results").glob("patient-*/summary.json"), key=lambda p: p.stat().st_mtime
    )
    for path in reversed(candidates):
        try:
            return path, json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # being written
    return None


def results_complete(summary: dict[str, Any], received: dict[str, ReceivedObject]) -> bool:
    """True when a follow-up has a response call and every output reached the receiver."""
    assessed = any(tp.get("response") for tp in summary.get("time_points") or [])
    outputs = [o["sop_instance_uid"] for o in summary.get("outputs") or []]
    return assessed and bool(outputs) and all(uid in received for uid in outputs)


def _sop_name(uid: str) -> str:
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else uid


# ----------------------------------------------------------------------------- the demo
def _study_uid(folder: Path) -> str:
    """StudyInstanceUID of the first DICOM file under ``folder`` (a phantom folder is one study)."""
    from pydicom import dcmread

    first = next(p for p in sorted(folder.rglob("*.dcm")))
    return str(dcmread(first, stop_before_pixels=True).StudyInstanceUID)


def _send_study(folder: Path, label: str, port: int) -> int:
    """C-STORE one folder of the phantom to the node; the number of instances sent."""
    from node.errors import is_success_or_warning
    from node.scu import PeerAddress, expand_paths, send_files

    files = [p for p in expand_paths([folder]) if p.suffix == ".dcm"]
    t0 = time.perf_counter()
    results = send_files(
        files, PeerAddress(NODE_AE, "127.0.0.1", port), calling_ae=SENDER_AE, timeout_s=60
    )
    failed = sum(not is_success_or_warning(r.status) for r in results)
    print(
        f"  {label}: {len(results) - failed} instance(s) in {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    if failed:
        raise DemoError(f"{failed} instance(s) of the {label} were refused by the node")
    return len(results)


#: events the analysis worker records when a run for a stable study ends
_OUTCOMES = ("analysis_done", "analysis_waiting", "analysis_failed")


def _outcomes(index: Index, study_uid: str) -> list[sqlite3.Row]:
    """The worker's outcome events (rows of ``events``) recorded for ``study_uid`` so far."""
    return [e for kind in _OUTCOMES for e in index.events(kind) if e["study_uid"] == study_uid]


def _wait_for_analysis(
    service: NodeService, study_uid: str, seen: int, deadline: float, log_path: Path
) -> sqlite3.Row:
    """Wait for the worker's next outcome event of ``study_uid`` (after ``seen`` earlier ones)."""
    t0 = time.monotonic()
    last_note = t0
    while time.monotonic() < deadline:
        events = _outcomes(service.index, study_uid)
        if len(events) > seen:
            event = max(events, key=lambda e: e["id"])
            if event["kind"] == "analysis_failed":
                raise DemoError(f"the analysis failed: {event['detail']} (log: {log_path})")
            return event
        now = time.monotonic()
        if now - last_note >= 20:
            last_note = now
            print(f"  ... {now - t0:.0f} s", flush=True)
        time.sleep(0.5)
    raise DemoError(
        f"the node did not finish analysing study {study_uid} in time; see "
        f"{log_path} (a slower machine may need --timeout)"
    )


def _wait_for_delivery(
    service: NodeService, receiver: ResultReceiver, deadline: float, log_path: Path
) -> tuple[Path, dict[str, Any]]:
    """Wait until the receiver holds every object of the newest ``summary.json``."""
    storage = service.settings.node.storage
    while time.monotonic() < deadline:
        found = find_summary(storage)
        if found is not None and results_complete(found[1], receiver.snapshot()):
            return found
        time.sleep(0.5)
    found = find_summary(storage)
    expected = len(found[1].get("outputs") or []) if found else 0
    raise DemoError(
        f"the result receiver got {len(receiver.snapshot())} of {expected} object(s) in time; "
        f"see {log_path} and `spine-node status`"
    )


def _print_report(
    out: Path,
    summary_path: Path,
    summary: dict[str, Any],
    receiver: ResultReceiver,
    dashboard_url: str | None,
) -> None:
    from node.analysis import format_course
    from reporting.summary import format_summary, results_from_summary

    print("\n=== Course found ===")
    print(format_course(summary["course"]))
    print("\n=== Studies ===")
    for study in summary.get("studies") or []:
        days = study.get("days_since_treatment")
        day = f", day {days:+d}" if days is not None else ""
        reg = study.get("registration")
        reg_text = ""
        if reg:
            t = ", ".join(f"{v:.1f}" for v in reg["translation_mm"])
            reg_text = (
                f"; registered to baseline: translation ({t}) mm, "
                f"{'passed' if reg['passed'] else 'NOT passed'}"
            )
        print(
            f"  {study['role']} {study['study_date']}{day}: maps "
            f"{', '.join(study.get('maps') or []) or 'none'}{reg_text}"
        )
    print("\n=== Measurements, changes and response ===")
    print(format_summary(results_from_summary(summary)))
    print("\n=== Results received by the result receiver (as a PACS would) ===")
    from pydicom import dcmread

    counts: Counter[tuple[str, str]] = Counter()
    for obj in receiver.snapshot().values():
        study = str(dcmread(obj.path, stop_before_pixels=True).StudyInstanceUID)
        counts[(study, _sop_name(obj.sop_class_uid))] += 1
    roles = {s["study_instance_uid"]: s["role"] for s in summary.get("studies") or []}
    for (study, name), n in sorted(counts.items()):
        print(f"  {roles.get(study, 'study')} {study}: {n} x {name}")
    for note in summary.get("notes") or []:
        print(f"  note: {note}")
    print("\n=== Where things are ===")
    print(f"  node configuration   {out / 'node.toml'}")
    print(f"  node log             {out / 'node.log'}")
    print(f"  phantom (input)      {out / 'phantom'}  (ground truth: ground_truth.json)")
    print(f"  node results         {summary_path.parent}  (summary.json + DICOM objects)")
    print(f"  received by receiver {receiver.folder}")
    if dashboard_url:
        print(f"  dashboard            {dashboard_url}  (while the node runs; --keep-running)")
    print(f"  status               spine-node status --config {out / 'node.toml'}")


def run(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    try:
        out = prepare_output(args.out)
    except (DemoError, OSError) as err:
        print(f"spine-node demo: {err}", file=sys.stderr)
        return 2
    console, restore = _quiet_console(out / "node.log")
    try:
        return _run(args, out, console, t_start)
    finally:
        restore()


def _quiet_console(log_path: Path) -> tuple[TextIO, Callable[[], None]]:
    """Send the node's log to ``log_path`` only; the console keeps warnings and the demo's text.

    The analysis runs in child processes that log to the inherited standard error as well as to
    the log file: standard error (file descriptor 2) is pointed at ``os.devnull`` for the
    demo's duration, and the console handler writes to a duplicate of the original one.
    Returns the console stream and a function that restores standard error.
    """
    from node.logs import configure_logging

    sys.stderr.flush()
    saved = os.dup(2)
    console = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    level = logging.getLevelName(logging.getLogger().level)
    configure_logging(level if isinstance(level, str) else "INFO", str(log_path))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        ):
            handler.setStream(console)
            handler.setLevel(logging.WARNING)

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            ):
                handler.setStream(sys.stderr)
        console.close()

    return console, restore


def _run(args: argparse.Namespace, out: Path, console: TextIO, t_start: float) -> int:
    from node.commands.phantom import write_phantom
    from node.config import load_settings
    from node.errors import ConfigError, NodeError, PeerError
    from node.service import NodeService

    print(f"spine-node demo: output folder {out}", flush=True)
    receiver = ResultReceiver(out / "received")
    receiver_port = receiver.start()
    print(f"result receiver {RECEIVER_AE} listening on 127.0.0.1:{receiver_port}", flush=True)
    service = None
    try:
        settings = load_settings(write_demo_config(out, receiver_port, args.quiet_period))
        service = NodeService(settings)
        host, port = service.start()
        # NodeService starts the dashboard of the [dashboard] section (None when it could not)
        dashboard_url = getattr(service.dashboard, "url", None)
        print(
            f"node {NODE_AE} listening on {host}:{port}; storage {settings.node.storage}"
            + (f"; dashboard {dashboard_url}" if dashboard_url else ""),
            flush=True,
        )

        print(f"generating a small {args.scenario} phantom patient ...", flush=True)
        t0 = time.perf_counter()
        truth = write_phantom(out / "phantom", seed=args.seed, scenario=args.scenario, size="small")
        print(f"  written in {time.perf_counter() - t0:.1f} s", flush=True)

        phantom = out / "phantom"
        log_path = out / "node.log"
        deadline = time.monotonic() + args.timeout
        baseline_uid = _study_uid(phantom / "baseline")
        print(
            "sending the baseline MRI and the RT course to the node over DICOM (C-STORE):",
            flush=True,
        )
        seen = len(_outcomes(service.index, baseline_uid))
        _send_study(phantom / "baseline", "baseline MRI", port)
        _send_study(phantom / "rt", "RT course (RTPLAN, RTSTRUCT, RTDOSE)", port)
        print(
            f"waiting for the study to be stable ({args.quiet_period:g} s) and analysed ...",
            flush=True,
        )
        event = _wait_for_analysis(service, baseline_uid, seen, deadline, log_path)
        print(f"  baseline: {event['detail']}", flush=True)
        follow_ups = [
            phantom / f"followup{i}" for i in range(1, 5) if (phantom / f"followup{i}").is_dir()
        ]
        for i, folder in enumerate(follow_ups, start=1):
            uid = _study_uid(folder)
            seen = len(_outcomes(service.index, uid))
            print(f"sending follow-up {i} (as the PACS would, months later):", flush=True)
            _send_study(folder, f"follow-up {i} MRI", port)
            print("waiting for the analysis ...", flush=True)
            event = _wait_for_analysis(service, uid, seen, deadline, log_path)
            if event["kind"] != "analysis_done":
                raise DemoError(f"follow-up {i} was not analysed: {event['detail']}")
            print(f"  follow-up {i}: {event['detail']}", flush=True)
        print("waiting for the results to reach the result receiver ...", flush=True)
        summary_path, summary = _wait_for_delivery(service, receiver, deadline, log_path)
        _print_report(out, summary_path, summary, receiver, dashboard_url)
        scenario = (truth.get("generator") or {}).get("scenario")
        print(
            f"\n(the phantom was generated as a '{scenario}' case; its ground truth is in "
            f"{out / 'phantom' / 'ground_truth.json'})"
        )
        print(f"\ndemo finished in {time.monotonic() - t_start:.0f} s", flush=True)
        if args.keep_running:
            print("node and dashboard keep running; Ctrl-C stops them", flush=True)
            stop = threading.Event()
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            while not stop.wait(0.5):
                pass
        return 0
    except (DemoError, PeerError) as err:
        print(f"spine-node demo: {err}", file=console)
        return 1
    except (ConfigError, NodeError, OSError) as err:
        print(f"spine-node demo: cannot run: {err}", file=console)
        return 1
    except KeyboardInterrupt:
        print(
            "spine-node demo: interrupted; stopping the node (a running analysis finishes first)",
            file=console,
        )
        return 130
    finally:
        if service is not None:
            service.stop()
        receiver.stop()
