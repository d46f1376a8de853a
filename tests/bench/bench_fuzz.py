"""Benchmark: a seeded fuzz run of mutated PDUs and datasets against a real ``spine-node serve``.

Valid byte streams are built once with pynetdicom (no network): an A-ASSOCIATE-RQ of calling AE
``PYSCU`` (Verification and MR Image Storage, Implicit VR Little Endian) and the P-DATA-TF PDUs
of a C-STORE-RQ of a small synthetic MR image (64 x 64, ~9 kB, 4 kB PDUs). A seeded mutator
(``random.Random`` per case, so any case can be replayed alone with ``--replay N``) flips bits,
replaces bytes with boundary values, truncates, inserts, duplicates and deletes chunks,
corrupts the PDU length (offset 2), item / PDV / element lengths and the PDU type. Three
campaigns, interleaved case by case:

* ``associate``: a mutated A-ASSOCIATE-RQ on a fresh TCP connection;
* ``pdata``: the valid A-ASSOCIATE-RQ, its A-ASSOCIATE-AC read, then the C-STORE P-DATA
  stream with one PDU mutated (or the whole stream, or an extra PDU of random type inserted);
* ``dataset``: a valid association and valid P-DATA framing around a mutated dataset (only
  the dataset bytes change; the fragments and their lengths are re-encoded around them).

Each case is sent on a raw socket (127.0.0.1 only), whatever the node answers is read (the
first PDU, or the connection closing) with short timeouts (when the node stays silent our
side is half-closed and its reaction read once more), then the socket is closed. Cases run on
a thread pool in batches; after each batch a real C-ECHO from ``ECHOSCU`` (pynetdicom) must
succeed, and the node's VmRSS / VmHWM (``/proc``) and the files left in
``<storage>/tmp/incoming`` (which must return to 0) are recorded.

At the end the node is stopped (SIGTERM) and its log file and stderr are scanned. Records that
carry a traceback are classified: *handled by pynetdicom* (its DUL / DIMSE code logs the
exception with ``LOGGER.exception`` and then aborts the association, e.g. "Received an invalid
DIMSE message", "Unable to decode the received PDU data"), *handler errors* (pynetdicom's
"Exception in the handler bound to ..." : the node's own event handler raised), tracebacks
logged by the node's own modules, and *uncaught* ones (``Exception in thread`` on stderr, or
a traceback on stderr with no log record).

Targets (issue 17, acceptance 4): >= 10,000 mutated PDUs and datasets; every echo answered;
no temp file leaked; node peak RSS <= 400 MB; no uncaught exception (handler errors and
uncaught thread exceptions fail the run; tracebacks pynetdicom logs for invalid input it then
aborts on, and those of its state machine that node.scp catches at the network thread's
boundary, are reported, not failed).

Run: ``.venv/bin/python -m tests.bench.bench_fuzz [--count N] [--seed S] [--workers W]``
(``--replay N`` sends case N alone to a fresh node and prints its bytes and the answer).
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.node.fixtures import NodeProcess, write_config  # noqa: E402

HOST = "127.0.0.1"
CALLED_AE = "SPINENODE"
#: maximum PDU the fuzzer builds its P-DATA with and announces in its A-ASSOCIATE-RQ
MAX_PDU = 4096
MAX_RSS_MB = 400
BATCH = 500
CAMPAIGNS = ("associate", "pdata", "dataset")
#: boundary values written into length fields and bytes
INTERESTING_32 = (0, 1, 2, 3, 4, 5, 6, 0x7F, 0x80, 0xFF, 0x100, 0x1000, 0x3FFF, 0x4000, 0xFFFF,
                  0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)  # fmt: skip
INTERESTING_16 = (0, 1, 2, 3, 4, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)
INTERESTING_8 = (0x00, 0x01, 0x02, 0x03, 0x7F, 0x80, 0xFE, 0xFF, 0x20, 0x2E)
LOG_RECORD = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<name>[\w.]+): (?P<msg>.*)$"
)
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b")
#: pynetdicom messages that precede a ``LOGGER.exception`` of invalid input it then aborts on
PYNETDICOM_HANDLED = (
    "Received an invalid DIMSE message",
    "Unable to decode the received PDU data",
    "Connection closed before the entire PDU was received",
    "Exception in DUL.run(), aborting association",
)


# --- valid streams -------------------------------------------------------------------------


@dataclass
class Streams:
    """The valid byte streams the mutator starts from, and where their length fields are."""

    associate_rq: bytes
    associate_lengths: list[tuple[int, int]]  # (offset, size) of item lengths
    command_pdus: list[bytes]
    dataset: bytes
    dataset_lengths: list[int]  # offsets of the 4-byte lengths of top-level elements
    mr_context_id: int = 3
    pdata: list[bytes] = field(default_factory=list)


def _associate_rq(calling: str = "PYSCU") -> bytes:
    from pydicom.uid import ImplicitVRLittleEndian
    from pynetdicom import build_context
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.pdu_primitives import (
        A_ASSOCIATE,
        ImplementationClassUIDNotification,
        ImplementationVersionNameNotification,
        MaximumLengthNotification,
    )
    from pynetdicom.sop_class import MRImageStorage, Verification

    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = CALLED_AE
    contexts = []
    for context_id, abstract in ((1, Verification), (3, MRImageStorage)):
        context = build_context(abstract, [ImplicitVRLittleEndian])
        context.context_id = context_id
        contexts.append(context)
    primitive.presentation_context_definition_list = contexts
    length = MaximumLengthNotification()
    length.maximum_length_received = MAX_PDU
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = "1.2.826.0.1.3680043.9.3811.3.0.4"
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = "FUZZ_1"
    primitive.user_information = [length, uid, version]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def _item_lengths(rq: bytes) -> list[tuple[int, int]]:
    """Offsets of the PDU length and of every item / sub-item length of an A-ASSOCIATE-RQ."""
    found = [(2, 4)]
    offset = 74
    while offset + 4 <= len(rq):
        kind, length = rq[offset], struct.unpack(">H", rq[offset + 2 : offset + 4])[0]
        found.append((offset + 2, 2))
        end = offset + 4 + length
        sub = {0x20: offset + 8, 0x50: offset + 4}.get(kind)
        while sub is not None and sub + 4 <= end:
            found.append((sub + 2, 2))
            sub += 4 + struct.unpack(">H", rq[sub + 2 : sub + 4])[0]
        offset = end
    return found


def _element_lengths(dataset: bytes) -> list[int]:
    """Offsets of the 4-byte value lengths of the top-level elements (implicit VR LE)."""
    found, offset = [], 0
    while offset + 8 <= len(dataset):
        length = struct.unpack("<I", dataset[offset + 4 : offset + 8])[0]
        found.append(offset + 4)
        if length == 0xFFFFFFFF:  # undefined length (a sequence): stop at the first one
            break
        offset += 8 + length
    return found


def pdata_pdu(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU of one PDV."""
    item = bytes([context_id, control]) + data
    pdv = struct.pack(">I", len(item)) + item
    return b"\x04\x00" + struct.pack(">I", len(pdv)) + pdv


def dataset_pdus(context_id: int, dataset: bytes) -> list[bytes]:
    """The dataset fragments of a P-DATA stream as pynetdicom frames them for ``MAX_PDU``."""
    size = MAX_PDU - 6  # PDU body = PDV length (4), context id, control header, data
    chunks = [dataset[i : i + size] for i in range(0, len(dataset), size)] or [b""]
    return [
        pdata_pdu(context_id, 0x02 if i == len(chunks) - 1 else 0x00, chunk)
        for i, chunk in enumerate(chunks)
    ]


def build_streams(work: Path) -> Streams:
    from pydicom import dcmread
    from pynetdicom.dsutils import encode
    from pynetdicom.pdu import P_DATA_TF

    from tests.node.dicom_factory import c_store_rq_message, write_mr_series

    (path,) = write_mr_series(work / "mr", 1, rows=64, columns=64)
    ds = dcmread(path)
    dataset = bytes(encode(ds, True, True))
    message = c_store_rq_message(ds, dataset)
    pdus = []
    for primitive in message.encode_msg(3, MAX_PDU):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(bytes(pdu.encode()))
    commands = [p for p in pdus if p[11] & 0x01]
    # the dataset part framed by hand must be what pynetdicom sends (campaign 3 relies on it)
    assert pdus[len(commands) :] == dataset_pdus(3, dataset), "dataset framing differs"
    rq = _associate_rq()
    return Streams(
        associate_rq=rq,
        associate_lengths=_item_lengths(rq),
        command_pdus=commands,
        dataset=dataset,
        dataset_lengths=_element_lengths(dataset),
        pdata=pdus,
    )


# --- mutator ---------------------------------------------------------------------------------


def _pdv_lengths(pdu: bytes) -> list[tuple[int, int]]:
    found, offset = [(2, 4)], 6
    while offset + 6 <= len(pdu):
        found.append((offset, 4))
        offset += 4 + struct.unpack(">I", pdu[offset : offset + 4])[0]
    return found


def mutate(
    rng: random.Random, data: bytes, lengths: list[tuple[int, int]], *, framing: bool = True
) -> tuple[bytes, list[str]]:
    """A mutated copy of ``data`` and the names of the operations applied (1 to 4 of them).

    ``lengths``: (offset, size, byte order) hints of its length fields; ``framing``: whether
    the PDU type (byte 0) may be replaced (not inside a dataset).
    """
    buf = bytearray(data)
    ops = []
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4))):
        op = rng.choice(
            (
                "bitflip",
                "bitflip",
                "bytes",
                "bytes",
                "truncate",
                "insert",
                "duplicate",
                "delete",
                "length",
                "length",
                "length",
                "pdutype",
            )  # fmt: skip
        )
        if op == "pdutype" and not framing:
            op = "length"
        n = len(buf)
        if n == 0:
            buf += rng.randbytes(rng.randint(1, 16))
            ops.append("refill")
            continue
        if op == "bitflip":
            for _ in range(rng.randint(1, 8)):
                buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == "bytes":
            for _ in range(rng.randint(1, 4)):
                buf[rng.randrange(n)] = rng.choice(INTERESTING_8 + (rng.randrange(256),))
        elif op == "truncate":
            del buf[rng.randrange(n) :]
        elif op == "insert":
            at = rng.randrange(n + 1)
            buf[at:at] = rng.randbytes(rng.randint(1, 64))
        elif op == "duplicate":
            start = rng.randrange(n)
            chunk = buf[start : start + rng.randint(1, 256)]
            at = rng.randrange(n + 1)
            buf[at:at] = chunk * rng.randint(1, 4)
        elif op == "delete":
            start = rng.randrange(n)
            del buf[start : start + rng.randint(1, 64)]
        elif op == "length":
            offset, size, order = rng.choice(lengths)
            if offset + size > n:
                continue
            fmt = order + ("I" if size == 4 else "H")
            current = struct.unpack(fmt, buf[offset : offset + size])[0]
            limit = 0xFFFFFFFF if size == 4 else 0xFFFF
            value = rng.choice(
                (
                    rng.choice(INTERESTING_32 if size == 4 else INTERESTING_16),
                    current + rng.randint(1, 16),
                    current - rng.randint(1, 16),
                    rng.randrange(limit + 1),
                )
            )
            buf[offset : offset + size] = struct.pack(fmt, value & limit)
        elif op == "pdutype":
            buf[0] = rng.choice((1, 2, 3, 4, 5, 6, 7, 0, 8, 0xFF, rng.randrange(256)))
        ops.append(op)
    return bytes(buf), ops


# --- one case --------------------------------------------------------------------------------


@dataclass
class Case:
    index: int
    campaign: str
    ops: list[str]
    streams: list[bytes]  # what is sent after the association (or the mutated RQ itself)
    calling: str = "PYSCU"


def make_case(index: int, seed: int, streams: Streams) -> Case:
    rng = random.Random(f"{seed}:{index}")
    campaign = CAMPAIGNS[index % len(CAMPAIGNS)]
    calling = ("PYSCU", "STORESCU")[(index // len(CAMPAIGNS)) % 2]
    if campaign == "associate":
        data, ops = mutate(rng, streams.associate_rq, [(o, s, ">") for o, s in
                                                      streams.associate_lengths])  # fmt: skip
        return Case(index, campaign, ops, [data])
    if campaign == "pdata":
        pdus = list(streams.pdata)
        mode = rng.random()
        if mode < 0.7:  # one PDU mutated
            at = rng.randrange(len(pdus))
            pdus[at], ops = mutate(rng, pdus[at], [(o, s, ">") for o, s in _pdv_lengths(pdus[at])])
            ops = [f"pdu{at}:{'+'.join(ops)}"]
        elif mode < 0.9:  # the whole stream mutated as one
            joined = b"".join(pdus)
            data, ops = mutate(rng, joined, [(o, s, ">") for o, s in _pdv_lengths(pdus[0])])
            pdus, ops = [data], [f"stream:{'+'.join(ops)}"]
        else:  # an extra PDU of random type and content
            kind = rng.choice((1, 2, 3, 4, 5, 6, 7, 0, 9, 0xFF))
            body = rng.randbytes(rng.randint(0, 80))
            extra = bytes([kind, 0]) + struct.pack(">I", len(body)) + body
            at = rng.randrange(len(pdus) + 1)
            pdus.insert(at, extra)
            ops = [f"extra-pdu-0x{kind:02X}@{at}"]
        return Case(index, campaign, ops, pdus, calling)
    data, ops = mutate(
        rng, streams.dataset, [(o, 4, "<") for o in streams.dataset_lengths], framing=False
    )
    pdus = streams.command_pdus + dataset_pdus(streams.mr_context_id, data)
    return Case(index, campaign, ops, pdus, calling)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def read_answer(sock: socket.socket, wait_s: float) -> str:
    """The node's first answer within ``wait_s``: a PDU name, or what happened to the socket."""
    sock.settimeout(wait_s)
    try:
        header = _recv_exact(sock, 6)
        if not header:
            return "closed"
        if len(header) < 6:
            return "closed mid-PDU"
        kind, length = header[0], struct.unpack(">I", header[2:6])[0]
        body = _recv_exact(sock, min(length, 65536))
    except TimeoutError:
        return "silent"
    except ConnectionResetError:
        return "reset"
    except OSError as exc:
        return f"error {exc.__class__.__name__}"
    name = {
        0x02: "A-ASSOCIATE-AC",
        0x03: "A-ASSOCIATE-RJ",
        0x04: "P-DATA",
        0x06: "A-RELEASE-RP",
        0x07: "A-ABORT",
    }.get(kind, f"PDU 0x{kind:02X}")
    if kind == 0x03 and len(body) >= 4:
        name += f" {body[1]}/{body[2]}/{body[3]}"
    elif kind == 0x07 and len(body) >= 4:
        name += f" source {body[2]} reason {body[3]}"
    elif kind == 0x04:
        at = body.find(b"\x00\x00\x00\x09\x02\x00\x00\x00")
        if at >= 0 and at + 10 <= len(body):
            name = f"C-STORE-RSP 0x{struct.unpack('<H', body[at + 8 : at + 10])[0]:04X}"
    return name


def _associate(port: int, rq: bytes, timeout_s: float = 10.0) -> socket.socket | None:
    """A socket with an established association (None when the node did not accept)."""
    for attempt in range(2):
        sock = socket.create_connection((HOST, port), timeout=timeout_s)
        sock.sendall(rq)
        answer = read_answer(sock, timeout_s)
        if answer == "A-ASSOCIATE-AC":
            return sock
        sock.close()
        time.sleep(0.2 * (attempt + 1))  # an association limit: let the others end
    return None


def run_case(case: Case, port: int, rqs: dict[str, bytes]) -> str:
    """Send one case and return the node's reaction."""
    try:
        if case.campaign == "associate":
            sock = socket.create_connection((HOST, port), timeout=10)
        else:
            maybe = _associate(port, rqs[case.calling])
            if maybe is None:
                return "setup failed (no A-ASSOCIATE-AC)"
            sock = maybe
    except OSError as exc:
        return f"connect failed ({exc.__class__.__name__})"
    with sock:
        sent_all = True
        try:
            for data in case.streams:
                sock.sendall(data)
        except OSError:  # the node hung up while we were sending
            sent_all = False
        answer = read_answer(sock, 3.0 if case.campaign == "dataset" else 0.25)
        if answer == "silent":
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            answer = "silent; after our FIN: " + read_answer(sock, 3.0)
        if not sent_all:
            answer += " (hung up while we sent)"
    return answer


# --- node probes -----------------------------------------------------------------------------


def echo(port: int) -> tuple[bool, float, str]:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    start = time.monotonic()
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    try:
        assoc = ae.associate(HOST, port, ae_title=CALLED_AE)
        if not assoc.is_established:
            return False, time.monotonic() - start, "association not established"
        status = assoc.send_c_echo()
        assoc.release()
    finally:
        ae.shutdown()
    ok = status is not None and getattr(status, "Status", None) == 0x0000
    return ok, time.monotonic() - start, "" if ok else f"status {status!r}"


def memory_mb(pid: int) -> tuple[float, float]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def threads_fds(pid: int) -> tuple[int, int]:
    threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            threads = int(line.split()[1])
    return threads, len(list(Path(f"/proc/{pid}/fd").iterdir()))


def incoming_files(storage: Path) -> int:
    folder = storage / "tmp" / "incoming"
    return sum(1 for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0


def wait_incoming_empty(storage: Path, timeout_s: float = 10.0) -> tuple[int, int]:
    """(files right after the batch, files after waiting up to ``timeout_s``)."""
    first = incoming_files(storage)
    deadline = time.monotonic() + timeout_s
    now = first
    while now and time.monotonic() < deadline:
        time.sleep(0.1)
        now = incoming_files(storage)
    return first, now


# --- log scan --------------------------------------------------------------------------------


@dataclass
class Finding:
    category: str
    head: str  # record line (logger: message)
    last: str  # last line of the traceback (exception type and message)


def _records(text: str) -> list[tuple[str, list[str]]]:
    """Log records as (record line, continuation lines)."""
    records: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if LOG_RECORD.match(line) or not records:
            records.append((line, []))
        else:
            records[-1][1].append(line)
    return records


def scan_log(log_text: str) -> list[Finding]:
    """Every log record with a traceback, classified."""
    findings = []
    previous = ""
    for line, rest in _records(log_text):
        match = LOG_RECORD.match(line)
        msg = match["msg"] if match else line
        name = match["name"] if match else "?"
        if any(r.startswith("Traceback") for r in rest):
            last = next((r for r in reversed(rest) if r.strip()), "")
            trace = "\n".join(rest)  # by the frames: records of threads interleave
            if "fsm.py" in trace and "do_action" in trace:
                # pynetdicom's state machine logs and re-raises; node.scp catches it at the
                # network thread's boundary (an uncaught one would also show on stderr)
                category = (
                    "handled by the node (pynetdicom's state machine raised, caught at the "
                    "network thread's boundary, connection dropped)"
                )
            elif "_handlers.py" in trace and "in trigger" in trace:
                category = "handled by pynetdicom (its own PDU-logging handler raised, caught)"
            elif "Exception in the handler" in previous or "_on_" in trace:
                category = "handler error (the node's event handler raised)"
            elif "_read_pdu_data" in trace or "decode_bytes" in trace:
                category = "handled by pynetdicom (logged with traceback, PDU refused / aborted)"
            elif "receive_primitive" in trace or any(h in previous for h in PYNETDICOM_HANDLED):
                category = "handled by pynetdicom (logged with traceback, association aborted)"
            elif name.startswith("pynetdicom.events") and "standard_" in previous:
                category = "handled by pynetdicom (its own PDU-logging handler raised, caught)"
            elif name.startswith("pynetdicom"):
                category = "pynetdicom traceback, other"
            else:
                category = f"logged by the node ({name})"
            findings.append(Finding(category, f"{name}: {previous} / {msg}"[:200], last[:200]))
        previous = msg
    return findings


def scan_stderr(stderr_text: str, logged_tracebacks: int) -> list[Finding]:
    """Exceptions that reached stderr without a log record: uncaught."""
    findings = []
    lines = stderr_text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Exception in thread") or line.startswith("Exception ignored in"):
            tail = next(
                (lines[j] for j in range(i + 1, min(i + 200, len(lines)))
                 if EXCEPTION_LINE.match(lines[j])),
                "",
            )  # fmt: skip
            findings.append(Finding("uncaught (stderr)", line[:200], tail[:200]))
    extra = stderr_text.count("Traceback (most recent call last)") - logged_tracebacks
    if extra > len(findings):
        findings.append(
            Finding("uncaught (stderr)", f"{extra - len(findings)} traceback(s) with no record", "")
        )
    return findings


# --- main ------------------------------------------------------------------------------------


def replay(index: int, seed: int, work: Path) -> int:
    streams = build_streams(work)
    case = make_case(index, seed, streams)
    storage = work / "storage"
    config = write_config(work / "node.toml", storage=storage, quiet_period_s=86400)
    node = NodeProcess(config, work, "node")
    port = node.start()
    try:
        print(f"case {index} ({case.campaign}, calling {case.calling}): {' '.join(case.ops)}")
        for data in case.streams:
            print(f"  send {len(data)} bytes: {data[:96].hex()}{'...' if len(data) > 96 else ''}")
        rqs = {c: _associate_rq(c) for c in ("PYSCU", "STORESCU")}
        print(f"  answer: {run_case(case, port, rqs)}")
        ok, took, why = echo(port)
        print(f"  echo after: {'ok' if ok else 'FAILED ' + why} ({took * 1000:.0f} ms)")
        time.sleep(1)
        print(f"  files in tmp/incoming 1 s later: {incoming_files(storage)}")
    finally:
        node.stop()
    stderr = (work / "node-1.stderr").read_text(encoding="utf-8", errors="replace")
    print(f"  'Exception in thread' on the node's stderr: {stderr.count('Exception in thread')}")
    print(f"  node log: {work}/node-1.log, stderr {work}/node-1.stderr")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_500, help="mutated cases (all campaigns)")
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--workers", type=int, default=8, help="parallel connections")
    parser.add_argument("--batch", type=int, default=BATCH, help="cases between echoes")
    parser.add_argument("--replay", type=int, default=None, help="send only case N, verbosely")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_fuzz_"))
    if args.replay is not None:
        return replay(args.replay, args.seed, work)
    storage = work / "storage"
    config = write_config(
        work / "node.toml",
        storage=storage,
        quiet_period_s=86400,  # no study becomes stable: no analysis competes with the fuzzing
        node_extra="acse_timeout_s = 3\ndimse_timeout_s = 5",
    )
    streams = build_streams(work)
    rqs = {c: _associate_rq(c) for c in ("PYSCU", "STORESCU")}
    node = NodeProcess(config, work, "node")
    port = node.start()
    assert node.proc is not None
    pid = node.proc.pid
    print(
        f"node pid {pid} on {HOST}:{port}; seed {args.seed}, {args.count} cases, "
        f"{args.workers} connections at once, echo every {args.batch}; work folder {work}",
        flush=True,
    )

    started = time.monotonic()
    answers: dict[str, Counter[str]] = {c: Counter() for c in CAMPAIGNS}
    cases_per: Counter[str] = Counter()
    ops_seen: Counter[str] = Counter()
    echoes: list[tuple[bool, float, str]] = []
    peak_rss = peak_hwm = 0.0
    tmp_max_after_batch = tmp_leftover_batches = 0
    slow_cases: list[tuple[float, int, str]] = []
    examples: dict[tuple[str, str], list[int]] = {}
    peak_threads = peak_fds = 0
    lock = threading.Lock()
    node_died = False

    def one(index: int) -> None:
        case = make_case(index, args.seed, streams)
        t0 = time.monotonic()
        answer = run_case(case, port, rqs)
        took = time.monotonic() - t0
        with lock:
            cases_per[case.campaign] += 1
            answers[case.campaign][answer] += 1
            examples.setdefault((case.campaign, answer), []).append(index)
            for op in case.ops:
                for name in op.split(":")[-1].split("@")[0].split("+"):
                    ops_seen[name] += 1
            if took > 5:
                slow_cases.append((took, index, answer))

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        for batch_start in range(0, args.count, args.batch):
            indices = range(batch_start, min(args.count, batch_start + args.batch))
            list(pool.map(one, indices))
            if node.proc.poll() is not None:
                node_died = True
                print(f"node exited with {node.proc.returncode} during batch at {batch_start}")
                break
            first, left = wait_incoming_empty(storage)
            tmp_max_after_batch = max(tmp_max_after_batch, first)
            tmp_leftover_batches += 1 if left else 0
            result = echo(port)
            echoes.append(result)
            rss, hwm = memory_mb(pid)
            threads, fds = threads_fds(pid)
            peak_rss, peak_hwm = max(peak_rss, rss), max(peak_hwm, hwm)
            peak_threads, peak_fds = max(peak_threads, threads), max(peak_fds, fds)
            print(
                f"  cases {indices.stop:>6}: echo {'ok' if result[0] else 'FAILED ' + result[2]}"
                f" {result[1] * 1000:5.0f} ms; RSS {rss:5.1f} MB (HWM {hwm:5.1f}); "
                f"tmp/incoming {first} -> {left}; threads {threads}, fds {fds}; "
                f"{time.monotonic() - started:5.0f} s",
                flush=True,
            )
    elapsed = time.monotonic() - started

    leftover = wait_incoming_empty(storage, 10.0)[1] if not node_died else incoming_files(storage)
    code_on_stop: int | None = None
    if not node_died:
        try:
            code_on_stop = node.stop(timeout_s=30)
        except Exception as exc:  # noqa: BLE001 - a node that does not stop is a finding
            print(f"node did not stop on SIGTERM: {exc!r}")
            node.close()
    else:
        node._stderr.close()
    leftover_after_stop = incoming_files(storage)
    log_text = (work / "node-1.log").read_text(encoding="utf-8", errors="replace")
    stderr_text = (work / "node-1.stderr").read_text(encoding="utf-8", errors="replace")
    logged = scan_log(log_text)
    uncaught = scan_stderr(stderr_text, log_text.count("Traceback (most recent call last)"))
    levels = Counter(m["level"] for m in map(LOG_RECORD.match, log_text.splitlines()) if m)

    total = sum(cases_per.values())
    print(f"\ncases: {total} in {elapsed:.0f} s ({total / max(elapsed, 1e-9):.0f}/s)")
    for campaign in CAMPAIGNS:
        print(f"  {campaign:<9} {cases_per[campaign]:>6}; node answers:")
        for answer, n in answers[campaign].most_common():
            cases = " ".join(map(str, sorted(examples[(campaign, answer)])[:3]))
            print(f"      {n:>6}  {answer}  (e.g. case {cases})")
    print("  mutation operations: " + ", ".join(f"{k} {v}" for k, v in ops_seen.most_common()))
    if slow_cases:
        slow_cases.sort(reverse=True)
        print(f"  cases slower than 5 s: {len(slow_cases)}; slowest:")
        for took, index, answer in slow_cases[:5]:
            print(f"      case {index}: {took:.1f} s, {answer}")
    ok_echoes = [e for e in echoes if e[0]]
    failed = [e for e in echoes if not e[0]]
    slowest = max((e[1] for e in echoes), default=0.0)
    print(
        f"echoes: {len(ok_echoes)} ok, {len(failed)} failed; slowest {slowest * 1000:.0f} ms, "
        f"median {sorted(e[1] for e in echoes)[len(echoes) // 2] * 1000 if echoes else 0:.0f} ms"
    )
    for e in failed[:3]:
        print(f"  failed echo: {e[2]}")
    print(f"node memory: peak VmRSS {peak_rss:.1f} MB, VmHWM {peak_hwm:.1f} MB (max {MAX_RSS_MB})")
    print(f"node threads / open fds after a batch: peak {peak_threads} / {peak_fds}")
    print(
        f"temp files in tmp/incoming: up to {tmp_max_after_batch} right after a batch, "
        f"{tmp_leftover_batches} batch(es) not back to 0 within 10 s, {leftover} at the end, "
        f"{leftover_after_stop} after stop"
    )
    print(
        f"node: {'DIED during the run' if node_died else f'stopped with {code_on_stop}'}; "
        "log records by level: " + ", ".join(f"{k} {v}" for k, v in sorted(levels.items()))
    )
    by_category: dict[str, Counter[tuple[str, str]]] = {}
    for finding in logged + uncaught:
        by_category.setdefault(finding.category, Counter())[(finding.head, finding.last)] += 1
    print(f"tracebacks: {len(logged)} in log records, {len(uncaught)} uncaught on stderr")
    for category, found in sorted(by_category.items()):
        print(f"  {category}: {sum(found.values())}")
        for (head, last), n in found.most_common(4):
            print(f"      {n:>5} x {head}\n              -> {last}")

    genuine = [f for f in logged + uncaught if not f.category.startswith("handled by")]
    problems = []
    if total < args.count:
        problems.append(f"only {total} of {args.count} cases ran")
    if failed or node_died:
        problems.append("an echo failed or the node died")
    if leftover or leftover_after_stop or tmp_leftover_batches:
        problems.append("temp files leaked")
    if peak_hwm > MAX_RSS_MB:
        problems.append(f"peak RSS {peak_hwm:.0f} MB > {MAX_RSS_MB} MB")
    if genuine:
        problems.append(f"{len(genuine)} exception(s) other than pynetdicom's handled ones")
    print("result: " + ("ok" if not problems else "FAILED: " + "; ".join(problems)))
    if problems or args.keep:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
