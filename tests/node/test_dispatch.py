"""Acceptance 7 of issue 2: the outbox delivers exactly once to a PACS that starts late,
across a SIGKILL of the node; failed items are listed and re-queueable."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from node.config import settings_from_mapping
from node.dispatch import Dispatcher, Outbox, backoff_delay
from node.index import Index
from node.store import Store
from tests.node.dicom_factory import write_mr_series
from tests.node.fixtures import REPO, free_port, receiving_peer, require_tool, write_config

pytestmark = pytest.mark.network


def _outbox(storage: Path) -> list[tuple[str, int, int | None]]:
    with sqlite3.connect(storage / "index.sqlite3") as db:
        return db.execute("SELECT state, tries, last_status FROM outbox ORDER BY id").fetchall()


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_outbox_delivers_exactly_once_to_a_late_pacs_across_a_node_kill(tmp_path, node_factory):
    require_tool("storescp")
    pacs_port = free_port()
    storage = tmp_path / "storage"
    config = write_config(
        tmp_path / "node.toml",
        storage=storage,
        extra=receiving_peer(pacs_port)
        + """
[dispatch]
max_tries = 1000
backoff_initial_s = 0.3
backoff_max_s = 1.0
poll_interval_s = 0.2
""",
    )
    files = write_mr_series(tmp_path / "results", 20, rows=32, columns=32)
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    node = node_factory(config)
    node.start()
    queued = subprocess.run(
        [
            sys.executable,
            "-m",
            "node.cli",
            "send",
            "--queue",
            "--to",
            "STORESCP",
            "--config",
            str(config),
            "--reason",
            "test results",
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert queued.returncode == 0, queued.stderr
    # the PACS is down: every item is tried at least twice, none is lost or given up
    _wait(lambda: all(t >= 2 for _s, t, _st in _outbox(storage)), 30, "two failed tries")
    node.kill()
    rows = _outbox(storage)
    assert len(rows) == 20 and {s for s, _t, _st in rows} <= {"queued", "sending"}
    received = tmp_path / "pacs"
    received.mkdir()
    pacs = subprocess.Popen(
        ["storescp", "+uf", "-od", str(received), "-aet", "STORESCP", str(pacs_port)],
        env=dict(os.environ, TCP_NODELAY="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        node.start()
        _wait(lambda: all(s == "sent" for s, _t, _st in _outbox(storage)), 30, "delivery")
        time.sleep(1.0)  # give a duplicate (if any) the time to arrive
        assert node.stop() == 0
    finally:
        pacs.terminate()
        pacs.wait(timeout=10)
    arrived = [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in received.iterdir()]
    assert len(arrived) == 20 and set(arrived) == uids  # every one, exactly once
    assert all(st == 0 for _s, _t, st in _outbox(storage))
    # the copies the outbox sent from live in the storage folder
    with sqlite3.connect(storage / "index.sqlite3") as db:
        paths = [Path(r[0]) for r in db.execute("SELECT path FROM outbox")]
    assert all(p.is_relative_to(storage.resolve() / "outbox") and p.exists() for p in paths)


def test_item_fails_after_max_tries_and_is_requeued_by_reprocess(tmp_path):
    storage = tmp_path / "storage"
    settings = settings_from_mapping(
        {
            "node": {"storage": str(storage), "dimse_timeout_s": 5},
            "peers": [{"ae_title": "DEADPACS", "port": free_port(), "may_receive": True}],
            "dispatch": {"max_tries": 2, "backoff_initial_s": 0.01, "backoff_max_s": 0.02},
        }
    )
    index = Index(settings.node.database_path)
    try:
        outbox = Outbox(index, Store(storage, index), settings)
        [item] = outbox.enqueue(
            write_mr_series(tmp_path / "r", 1, rows=8, columns=8), "DEADPACS", "test"
        )
        dispatcher = Dispatcher(outbox, settings)
        assert dispatcher.run_once() == 0
        assert outbox.counts() == {"queued": 1}
        time.sleep(0.05)
        assert dispatcher.run_once() == 0
        assert outbox.counts() == {"failed": 1}
        row = index.query("SELECT tries, last_error FROM outbox WHERE id=?", (item,))[0]
        assert row["tries"] == 2 and "not established" in row["last_error"]
    finally:
        index.close()
    config = tmp_path / "n.toml"
    config.write_text(f'[node]\nstorage = "{storage}"\n')
    status = subprocess.run(
        [sys.executable, "-m", "node.cli", "status", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert status.returncode == 0 and "failed #1 -> DEADPACS" in status.stdout
    run = subprocess.run(
        [sys.executable, "-m", "node.cli", "reprocess", "--failed", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert run.returncode == 0 and "re-queued 1" in run.stdout
    assert _outbox(storage) == [("queued", 0, None)]


def test_backoff_grows_exponentially_up_to_the_maximum():
    settings = settings_from_mapping(
        {"dispatch": {"backoff_initial_s": 10, "backoff_max_s": 100}}
    ).dispatch
    import random

    rng = random.Random(0)
    delays = [backoff_delay(t, settings, rng=rng) for t in (1, 2, 3, 4, 5, 6)]
    for tries, delay in zip((1, 2, 3, 4, 5, 6), delays):
        nominal = min(10 * 2 ** (tries - 1), 100)
        assert 0.8 * nominal <= delay <= 1.2 * nominal
