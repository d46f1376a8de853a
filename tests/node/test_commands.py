"""The operations commands as an administrator runs them: serve, echo, send, status; and the
index's schema management."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import pytest

from node.errors import IndexDatabaseError
from node.index import SCHEMA_VERSION, Index
from tests.node.dicom_factory import write_mr_series
from tests.node.fixtures import REPO, free_port, write_config

pytestmark = pytest.mark.network


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_serve_refuses_a_bad_configuration_naming_the_key(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[node]\nae_title = "A_FAR_TOO_LONG_AE_TITLE"\n')
    run = _cli("serve", "--config", str(config))
    assert run.returncode == 2 and "node.ae_title" in run.stderr


def test_echo_send_and_status_against_a_running_node(tmp_path, node_factory):
    storage = tmp_path / "storage"
    config = write_config(tmp_path / "node.toml", storage=storage)
    port = node_factory(config).start()
    target = f"SPINENODE@127.0.0.1:{port}"
    echo = _cli("echo", "--to", target)
    assert echo.returncode == 0 and "status 0x0000" in echo.stdout
    nobody = _cli("echo", "--to", f"SPINENODE@127.0.0.1:{free_port()}", "--timeout", "3")
    assert nobody.returncode == 1
    files = write_mr_series(tmp_path / "mr", 12, rows=16, columns=16)
    send = _cli("send", str(tmp_path / "mr"), "--to", target, "--calling-ae", "STORESCU")
    assert send.returncode == 0 and "sent 12 of 12" in send.stdout
    status = _cli("status", "--config", str(config), "--json")
    assert status.returncode == 0
    report = json.loads(status.stdout)
    assert report["instances"] == len(files) and report["studies"] == {"receiving": 1}
    assert [a["n_ok"] for a in report["associations"] if a["peer_ae"] == "STORESCU"] == [12]
    assert "DOE" not in status.stdout  # no patient data in the status either


def test_index_schema_is_migrated_once_and_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "index.sqlite3"
    Index(path).close()
    Index(path).close()  # reopening does not migrate again
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    assert {
        "patients",
        "studies",
        "series",
        "instances",
        "associations",
        "events",
        "outbox",
    } <= tables
    with pytest.raises(IndexDatabaseError, match="newer"):
        Index(path)
