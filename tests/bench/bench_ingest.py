"""Benchmark: C-STORE ingest rate of the node vs Orthanc and dcmtk ``storescp``.

A plain pynetdicom SCP (raw write, no fsync, no index) shows what
pynetdicom itself costs; on four associations the same SCP also runs as three processes sharing
the port (SO_REUSEPORT), which is what several node receiver processes could reach at best.

The same synthetic MR set (default 1,000 images of 256 x 256 x 16 bit, ~129 kB each) is sent by
the same dcmtk ``storescu`` to each receiver on one association and on four parallel ones
(four ``storescu`` processes, a quarter of the files each). Every receiver writes to disk and
starts from an empty store each run. dcmtk processes (sender and receivers) and Orthanc get
``TCP_NODELAY=1`` in their environment; without it dcmtk stalls ~40 ms per image. The node
fsyncs every instance (and its folder) before answering Success. Prints images/s, the ratios
against the named baseline (Orthanc) and the node's peak resident memory (VmHWM).

Targets (issue 2): node rate >= Orthanc's on one association; node peak RSS <= 300 MB.

Run: ``.venv/bin/python -m tests.bench.bench_ingest [--images N] [--size PIXELS]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from tests.node.dicom_factory import write_mr_series  # noqa: E402

ENV = dict(os.environ, TCP_NODELAY="1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


class Receiver:
    """A receiver started fresh (empty storage) for each run."""

    name = ""
    ae_title = ""

    def start(self, work: Path, parallel: int) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        procs = getattr(self, "procs", None) or [getattr(self, "proc", None)]
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


class Storescp(Receiver):
    name = "dcmtk storescp"
    ae_title = "STORESCP"

    def start(self, work: Path, parallel: int) -> int:
        port = _free_port()
        out = work / "storescp"
        out.mkdir()
        fork = ["--fork"] if parallel > 1 else []  # single-process storescp serves one at a time
        self.proc = subprocess.Popen(
            ["storescp", *fork, "-od", str(out), "-aet", self.ae_title, str(port)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(port)
        return port

    def stop(self) -> None:
        # --fork children belong to the process group of the parent
        super().stop()


class Orthanc(Receiver):
    name = "Orthanc"
    ae_title = "ORTHANC"

    def start(self, work: Path, parallel: int) -> int:
        port = _free_port()
        storage = work / "orthanc"
        storage.mkdir()
        config = work / "orthanc.json"
        config.write_text(
            json.dumps(
                {
                    "Name": "bench",
                    "StorageDirectory": str(storage),
                    "IndexDirectory": str(storage),
                    "DicomAet": self.ae_title,
                    "DicomPort": port,
                    "HttpPort": _free_port(),
                    "RemoteAccessAllowed": False,
                    "DicomCheckCalledAet": False,
                    "DicomAlwaysAllowStore": True,
                    "StorageCompression": False,
                    "DicomThreadsCount": 4,
                    "Plugins": [],
                }
            )
        )
        self.proc = subprocess.Popen(
            ["/usr/sbin/Orthanc", str(config)],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(port)
        return port


_PLAIN_SCP = """
import socket, sys, uuid
from pathlib import Path
from pynetdicom import AE, evt, AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer
out = Path(sys.argv[1])
class SharedPort(ThreadedAssociationServer):
    def server_bind(self):
        # several processes listen on one port; the kernel spreads connections between them
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()
def handle(event):
    (out / uuid.uuid4().hex).write_bytes(event.encoded_dataset())
    return 0
ae = AE(ae_title="PLAIN")
ae.supported_contexts = AllStoragePresentationContexts
server = ae.make_server(
    ("127.0.0.1", int(sys.argv[2])), evt_handlers=[(evt.EVT_C_STORE, handle)],
    server_class=SharedPort,
)
server.serve_forever()
"""


class PlainPynetdicom(Receiver):
    """The pynetdicom documentation's storage SCP: raw write, no fsync, no index, defaults."""

    name = "plain pynetdicom"
    ae_title = "PLAIN"
    #: processes listening on the one port (SO_REUSEPORT)
    processes = 1

    def start(self, work: Path, parallel: int) -> int:
        port = _free_port()
        out = work / "plain"
        out.mkdir()
        self.procs = [
            subprocess.Popen(
                [sys.executable, "-c", _PLAIN_SCP, str(out), str(port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(self.processes)
        ]
        _wait_port(port)
        time.sleep(1.0 if self.processes > 1 else 0.0)  # every process listening
        return port


class PlainPynetdicomProcesses(PlainPynetdicom):
    """The same SCP in three processes sharing the port: what pynetdicom can do on both cores
    when the interpreter lock of one process is not the limit (four associations only)."""

    name = "pynetdicom x3 proc"
    processes = 3


class Node(Receiver):
    name = "spine-node"
    ae_title = "SPINENODE"

    def start(self, work: Path, parallel: int) -> int:
        config = work / "node.toml"
        config.write_text(
            f'[node]\nport = 0\nstorage = "{work / "node"}"\nquiet_period_s = 3600\n'
            'disk_low_water_mb = 100\n[[peers]]\nae_title = "STORESCU"\n'
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node.cli",
                "--log-file",
                str(work / "node.log"),
                "serve",
                "--config",
                str(config),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"node did not start: {line!r}")
        return int(line.strip().rsplit(":", 1)[1])

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("VmHWM not found")


def _send(folders: list[Path], ae_title: str, port: int) -> float:
    """Run one storescu per folder in parallel; returns the wall time (s)."""
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                "storescu",
                "-aet",
                "STORESCU",
                "-aec",
                ae_title,
                "+sd",
                "127.0.0.1",
                str(port),
                str(folder),
            ],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for folder in folders
    ]
    for proc in procs:
        _out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - start


def _count(receiver: Receiver, work: Path) -> int:
    if isinstance(receiver, Node):
        import sqlite3

        with sqlite3.connect(work / "node" / "index.sqlite3") as db:
            return int(db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])
    if isinstance(receiver, Storescp):
        return sum(1 for _ in (work / "storescp").iterdir())
    if isinstance(receiver, PlainPynetdicom):  # and PlainPynetdicomProcesses
        return sum(1 for _ in (work / "plain").iterdir())
    return sum(1 for p in (work / "orthanc").rglob("*") if p.is_file() and len(p.name) > 30)


def _lineup(receivers: list[Callable[[], Receiver]], parallel: int) -> list[Callable[[], Receiver]]:
    """The receivers of one run: with several associations, also pynetdicom on both cores."""
    return receivers + ([PlainPynetdicomProcesses] if parallel > 1 else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=256, help="rows = columns")
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            print(f"{tool} not installed: benchmark skipped")
            return 1
    have_orthanc = Path("/usr/sbin/Orthanc").exists()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        root = Path(tmp)
        files = write_mr_series(root / "mr", args.images, rows=args.size, columns=args.size)
        size_mb = sum(p.stat().st_size for p in files) / 1e6
        quarters = []
        for k in range(4):
            folder = root / f"mr{k}"
            folder.mkdir()
            for p in files[k::4]:
                os.link(p, folder / p.name)
            quarters.append(folder)
        print(
            f"ingest: {args.images} MR images {args.size}x{args.size} ({size_mb:.0f} MB), "
            f"dcmtk storescu, TCP_NODELAY=1"
        )
        receivers: list[Callable[[], Receiver]] = [Node, PlainPynetdicom, Storescp]
        if have_orthanc:
            receivers.insert(1, Orthanc)
        rates: dict[tuple[str, int], float] = {}
        node_rss = 0.0
        for parallel in (1, 4):
            for make in _lineup(receivers, parallel):
                receiver = make()
                work = root / f"run-{receiver.name.replace(' ', '_')}-{parallel}"
                work.mkdir()
                port = receiver.start(work, parallel)
                try:
                    elapsed = _send(
                        [root / "mr"] if parallel == 1 else quarters, receiver.ae_title, port
                    )
                    if isinstance(receiver, Node):
                        node_rss = max(node_rss, receiver.peak_rss_mb())
                finally:
                    receiver.stop()
                stored = _count(receiver, work)
                if stored != args.images:
                    print(f"  WARNING {receiver.name} stored {stored} of {args.images}")
                rates[(receiver.name, parallel)] = args.images / elapsed
                print(
                    f"  {receiver.name:15s} {parallel} assoc: {args.images / elapsed:7.0f} "
                    f"images/s ({elapsed:.2f} s)",
                    flush=True,
                )
                shutil.rmtree(work)
        baseline = "Orthanc" if have_orthanc else "dcmtk storescp"
        print(f"ratios against the baseline ({baseline}, same run):")
        for parallel in (1, 4):
            base = rates[(baseline, parallel)]
            for make in _lineup(receivers, parallel):
                name = make.name
                print(f"  {name:15s} {parallel} assoc: {rates[(name, parallel)] / base:5.2f} x")
        print(
            f"spine-node peak resident memory while receiving: {node_rss:.0f} MB (target <= 300 MB)"
        )
        ok = rates[("spine-node", 1)] >= rates[(baseline, 1)] and node_rss <= 300
        print(
            f"targets (rate >= {baseline} on 1 association, RSS <= 300 MB): "
            f"{'met' if ok else 'NOT met'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
