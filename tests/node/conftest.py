"""Fixtures for node tests: a running ``spine-node serve`` subprocess, configs, free ports.

Every node started here logs to a file in one session folder (:func:`node_log_dir`); the
in-process tests' records go there too (through the node's own :class:`~node.logs.PhiFilter`),
so ``test_zz_no_phi_in_logs.py`` can grep all of them for the seeded identifiers.
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


@pytest.fixture(scope="session")
def node_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("node-logs")
    _SESSION_LOG_DIR.append(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _in_process_log_file(node_log_dir: Path) -> Iterator[None]:
    """Also write in-process node records to the session log folder, as the CLI would."""
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


def write_config(path: Path, *, storage: Path, port: int = 0, quiet_period_s: float = 60.0,
                 extra: str = "", node_extra: str = "") -> Path:
    """A node configuration for tests (dcmtk's STORESCU/ECHOSCU plus PYSCU may send)."""
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
""",
        encoding="utf-8",
    )
    return path


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
            [sys.executable, "-m", "node.cli", "--log-file", f"{stem}.log", "serve",
             "--config", str(self.config)],
            stdout=subprocess.PIPE, stderr=self._stderr, text=True, cwd=REPO, env=env,
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
def node_factory(node_log_dir: Path, request: pytest.FixtureRequest) -> Iterator[
        type[NodeProcess]]:
    """Make :class:`NodeProcess` instances that are killed at the end of the test."""
    started: list[NodeProcess] = []

    def make(config: Path) -> NodeProcess:
        node = NodeProcess(config, node_log_dir, f"{request.node.name}-{len(started)}")
        started.append(node)
        return node

    yield make  # type: ignore[misc]
    for node in started:
        node.close()
