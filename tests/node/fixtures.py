"""Node test fixtures, registered for the whole suite in ``tests/conftest.py``.

- :func:`node_factory`: ``spine-node serve`` subprocesses (:class:`NodeProcess`) that log into one
  session folder, :func:`node_log_dir`;
- :func:`_suite_log_capture` (autouse): every in-process log record of the suite also goes to that
  folder, through the node's own :class:`~node.logs.PhiFilter`, as the command line would write
  it; at the end of the session every file there is searched for the seeded patient identifiers
  (``tests/node/dicom_factory.PHI_TOKENS`` and the phantom's ``PHANTOM^``/``PHID-``), and a hit
  fails the session (issue 2, acceptance 8; ``tests/node/test_no_phi_in_logs.py`` checks a seeded
  scenario's logs as a regular test);
- helpers: :func:`free_port`, :func:`require_tool`, :func:`write_config`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.logs import PhiFilter
from tests.node.dicom_factory import PHI_TOKENS

REPO = Path(__file__).resolve().parents[2]
_SESSION_LOG_DIR: list[Path] = []


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (make test installs dcmtk)")
    return path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA with a server and a client certificate (CN localhost, SAN 127.0.0.1)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        cwd=d,
    )
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            "/CN=localhost",
            cwd=d,
        )
        (d / f"{name}.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            cwd=d,
        )
    return d


@pytest.fixture(scope="session")
def node_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("node-logs")
    _SESSION_LOG_DIR.append(path)
    return path


#: identifiers seeded by the node tests and by the phantom generator (processing.phantom)
SUITE_PHI_TOKENS: tuple[str, ...] = (*PHI_TOKENS, "PHANTOM^", "PHID-")


def find_phi(folder: Path, tokens: tuple[str, ...] = SUITE_PHI_TOKENS) -> list[tuple[str, str]]:
    """``(file name, token)`` for every seeded identifier found in the files of ``folder``."""
    leaks = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        body = path.read_text(encoding="utf-8", errors="replace")
        leaks.extend((path.name, token) for token in tokens if token in body)
    return leaks


@pytest.fixture(scope="session", autouse=True)
def _suite_log_capture(node_log_dir: Path) -> Iterator[None]:
    """Write the suite's in-process records to the session log folder; grep it at the end."""
    handler = logging.FileHandler(node_log_dir / "in-process.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(PhiFilter())
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    yield
    root.removeHandler(handler)
    root.setLevel(old_level)
    handler.close()
    leaks = find_phi(node_log_dir)
    if leaks:
        pytest.fail(f"seeded patient identifiers found in the suite's logs: {leaks[:20]}")


def write_config(
    path: Path,
    *,
    storage: Path,
    port: int = 0,
    quiet_period_s: float = 60.0,
    extra: str = "",
    node_extra: str = "",
) -> Path:
    """A node configuration for tests (dcmtk's STORESCU/ECHOSCU plus PYSCU may send).

    The dashboard listens on a free port, so that nodes of different tests never compete for the
    default one.
    """
    path.write_text(
        f"""
[node]
ae_title = "SPINENODE"
bind_address = "127.0.0.1"
port = {port}
storage = "{storage}"
quiet_period_s = {quiet_period_s}
disk_low_water_mb = 0
network_timeout_s = 20
{node_extra}

[[peers]]
ae_title = "STORESCU"
[[peers]]
ae_title = "ECHOSCU"
[[peers]]
ae_title = "PYSCU"
{extra}
{"" if "[dashboard]" in extra else "[dashboard]" + chr(10) + "port = 0"}
""",
        encoding="utf-8",
    )
    return path


def receiving_peer(port: int, ae_title: str = "STORESCP") -> str:
    """The ``[[peers]]`` table of a destination the node sends results to (and never hears
    from), for :func:`write_config`'s ``extra``."""
    return f"""
[[peers]]
ae_title = "{ae_title}"
port = {port}
may_send = false
may_receive = true
"""


class NodeProcess:
    """``spine-node serve`` as a subprocess, logging into the session log folder."""

    def __init__(self, config: Path, log_dir: Path, name: str) -> None:
        self.config = config
        self.log_dir = log_dir
        self.name = name
        self.proc: subprocess.Popen[str] | None = None
        self.port: int | None = None
        self.runs = 0

    def start(self, timeout_s: float = 30.0) -> int:
        self.runs += 1
        stem = self.log_dir / f"{self.name}-{self.runs}"
        self._stderr = open(f"{stem}.stderr", "w", encoding="utf-8")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node.cli",
                "--log-file",
                f"{stem}.log",
                "serve",
                "--config",
                str(self.config),
            ],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd=REPO,
            env=env,
        )
        deadline = time.monotonic() + timeout_s
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if "listening on" in line:
                self.port = int(line.strip().rsplit(":", 1)[1])
                return self.port
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"node did not start; see {stem}.stderr")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout_s)
        self._stderr.close()
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self._stderr.close()


@pytest.fixture
def node_factory(node_log_dir: Path, request: pytest.FixtureRequest) -> Iterator[type[NodeProcess]]:
    """Make :class:`NodeProcess` instances that are killed at the end of the test."""
    started: list[NodeProcess] = []

    def make(config: Path) -> NodeProcess:
        node = NodeProcess(config, node_log_dir, f"{request.node.name}-{len(started)}")
        started.append(node)
        return node

    yield make  # type: ignore[misc]
    for node in started:
        node.close()
