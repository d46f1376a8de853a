"""Issue 17, storage and index rows: a damaged, truncated or deleted index, a stored file deleted
behind the node's back, file modes under a permissive umask, and ``spine-node verify`` /
``rebuild-index`` (docs/operations.md, "If the index is damaged").

Every test uses a real SQLite index and real files; the start-up rows start a real
``spine-node serve`` process. Each test is bounded in time (subprocess and network timeouts).
"""

from __future__ import annotations

import os
import random
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.config import settings_from_mapping
from node.errors import NodeError
from node.index import Index
from node.scu import PeerAddress, send_files
from node.service import NodeService
from node.store import Store, uid_hash
from tests.node.dicom_factory import write_mr_series
from tests.node.fixtures import REPO, NodeProcess, write_config

pytestmark = pytest.mark.network

#: bound of every spine-node subprocess (s)
COMMAND_TIMEOUT_S = 60


def _cli(*args: str, timeout_s: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run ``spine-node ARGS`` (bounded in time; a node that starts instead of refusing is
    killed at the timeout and the test fails)."""
    try:
        return subprocess.run(
            [sys.executable, "-m", "node.cli", *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"spine-node {' '.join(args)} still running after {timeout_s} s: {err}")


def _serve_refused(config: Path, timeout_s: float = 30.0) -> str:
    """Start ``spine-node serve``; assert it refuses (exit != 0, within ``timeout_s``) with a
    one-line message and no traceback; return the message."""
    done = _cli("serve", "--config", str(config), timeout_s=timeout_s)
    assert done.returncode != 0
    assert "listening on" not in done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    return lines[0]


@pytest.fixture
def stored_node(tmp_path: Path, node_factory: type[NodeProcess]) -> Iterator[tuple[Path, Path]]:
    """A node process that received 12 instances and was stopped: ``(config, storage)``."""
    storage = tmp_path / "storage"
    # no dashboard: these rows are about the store and the index
    config = write_config(
        tmp_path / "node.toml", storage=storage, extra="[dashboard]\nenabled = false"
    )
    files = write_mr_series(tmp_path / "in", 12, rows=32, columns=32)
    node = node_factory(config)
    port = node.start()
    results = send_files(
        files, PeerAddress("SPINENODE", "127.0.0.1", port), calling_ae="PYSCU", timeout_s=10
    )
    assert [r.status for r in results] == [0] * 12
    assert node.stop() == 0
    yield config, storage


def _instance_count(storage: Path) -> int:
    index = Index(storage / "index.sqlite3")
    try:
        return int(index.query("SELECT COUNT(*) FROM instances")[0][0])
    finally:
        index.close()


def _recover_and_check(config: Path, storage: Path, expected: int) -> None:
    """``rebuild-index`` then ``verify``: consistent, every acknowledged instance indexed."""
    rebuilt = _cli("rebuild-index", "--config", str(config))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert f"{expected} instance(s) re-indexed" in rebuilt.stdout
    verified = _cli("verify", "--config", str(config))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "consistent" in verified.stdout
    assert _instance_count(storage) == expected


# -- row 10: random pages written into the middle of the index --------------------------------
def test_row10_damaged_index_refuses_to_start_and_rebuild_recovers(stored_node):
    config, storage = stored_node
    database = storage / "index.sqlite3"
    # the pages of the data tables (the schema page stays intact, so the file still opens:
    # the node used to start on it and acknowledge stores)
    with sqlite3.connect(database) as db:
        page = db.execute("PRAGMA page_size").fetchone()[0]
        roots = [
            r[0]
            for r in db.execute(
                "SELECT rootpage FROM sqlite_master WHERE name IN ('instances', 'instances_study')"
            )
        ]
    db.close()
    assert len(roots) == 2 and 1 not in roots
    rng = random.Random(17)
    with open(database, "r+b") as fh:
        for number in roots:
            fh.seek((number - 1) * page)
            fh.write(rng.randbytes(page))
    message = _serve_refused(config)
    assert str(database) in message
    assert "damaged" in message
    assert "spine-node rebuild-index" in message
    _recover_and_check(config, storage, 12)
    backups = list(storage.glob("index.sqlite3.before-rebuild-*"))
    assert backups and stat.S_IMODE(backups[0].stat().st_mode) == 0o600


# -- row 11: index deleted while stored files exist -------------------------------------------
def test_row11_missing_or_new_index_with_stored_files_refuses_to_start(stored_node):
    config, storage = stored_node
    for suffix in ("", "-wal", "-shm"):
        (storage / f"index.sqlite3{suffix}").unlink(missing_ok=True)
    message = _serve_refused(config)
    assert "missing" in message and "spine-node rebuild-index" in message
    assert not (storage / "index.sqlite3").exists()
    # an empty index made meanwhile (e.g. by another command) is refused the same way
    Index(storage / "index.sqlite3").close()
    message = _serve_refused(config)
    assert "records no instance" in message and "spine-node rebuild-index" in message
    _recover_and_check(config, storage, 12)


# -- row 13: index truncated ------------------------------------------------------------------
def test_row13_truncated_index_refuses_cleanly(stored_node):
    config, storage = stored_node
    database = storage / "index.sqlite3"
    with open(database, "r+b") as fh:
        fh.truncate(50)  # inside the 100-byte header: not a database any more
    message = _serve_refused(config)
    assert str(database) in message and "spine-node rebuild-index" in message
    _recover_and_check(config, storage, 12)


def test_healthy_store_starts_and_verifies(stored_node, node_factory):
    config, storage = stored_node
    node = node_factory(config)
    node.start()
    assert node.stop() == 0
    verified = _cli("verify", "--config", str(config))
    assert verified.returncode == 0, verified.stdout
    assert "12 indexed instance(s), 12 stored file(s)" in verified.stdout


# -- row 12: a stored file deleted behind the node's back, the same instance sent again -------
def _service(storage: Path) -> NodeService:
    svc = NodeService(
        settings_from_mapping(
            {
                "node": {
                    "port": 0,
                    "storage": str(storage),
                    "disk_low_water_mb": 0,
                    "network_timeout_s": 10,
                },
                "peers": [{"ae_title": "PYSCU"}],
                "dashboard": {"enabled": False},
            }
        )
    )
    svc.start()
    return svc


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_row12_missing_stored_file_is_stored_again_not_acknowledged_as_duplicate(tmp_path, damage):
    files = write_mr_series(tmp_path / "in", 3, rows=32, columns=32)
    svc = _service(tmp_path / "storage")
    try:
        assert svc.address is not None
        peer = PeerAddress("SPINENODE", "127.0.0.1", svc.address[1])
        assert [r.status for r in send_files(files, peer, calling_ae="PYSCU", timeout_s=10)] == [
            0,
            0,
            0,
        ]
        rows = svc.index.query("SELECT sop_instance_uid, path FROM instances ORDER BY path")
        victim = svc.store.root / rows[0]["path"]
        original = victim.read_bytes()
        if damage == "delete":
            victim.unlink()
        else:
            victim.write_bytes(original[: len(original) // 2])
        again = send_files(files, peer, calling_ae="PYSCU", timeout_s=10)
        assert [r.status for r in again] == [0, 0, 0]
        assert victim.read_bytes() == original  # the node holds what it acknowledged
        events = svc.index.events("missing_file")
        assert [e["sop_instance_uid"] for e in events] == [rows[0]["sop_instance_uid"]]
        assert len(svc.index.events()) > 0
        # the two intact instances stayed plain duplicates
        assert svc.index.query("SELECT COUNT(*) FROM instances")[0][0] == 3
    finally:
        svc.stop()
    verified = _cli("verify", "--storage", str(tmp_path / "storage"))
    assert verified.returncode == 0, verified.stdout


def test_row12_import_batch_restores_a_missing_file(tmp_path):
    files = write_mr_series(tmp_path / "in", 2, rows=16, columns=16)
    index = Index(tmp_path / "storage" / "index.sqlite3")
    store = Store(tmp_path / "storage", index)
    try:
        for attempt in range(2):
            with store.import_batch(calling_ae="IMPORT") as batch:
                for path in files:
                    batch.add_file(
                        path,
                        transfer_syntax_uid="1.2.840.10008.1.2.1",
                        request_sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                        request_sop_instance_uid=_sop_uid(path),
                    )
            outcomes = [result for _path, result in batch.outcomes()]
            assert all(not isinstance(r, Exception) for r in outcomes), outcomes
            if attempt == 0:
                stored = outcomes[0].path
                stored.unlink()
        assert stored.exists()
        assert [e["kind"] for e in index.events("missing_file")] == ["missing_file"]
        assert outcomes[0].outcome.name == "STORED"
        assert outcomes[1].outcome.name == "ALREADY_STORED"
    finally:
        index.close()


def _sop_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# -- row 16: file modes whatever the umask ----------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_row16_storage_is_owner_only_whatever_the_umask(tmp_path, umask):
    files = write_mr_series(tmp_path / "in", 2, rows=16, columns=16)
    old = os.umask(umask)
    try:
        svc = _service(tmp_path / "storage")
        try:
            assert svc.address is not None
            peer = PeerAddress("SPINENODE", "127.0.0.1", svc.address[1])
            assert [r.status for r in send_files(files, peer, calling_ae="PYSCU")] == [0, 0]
            root = svc.store.root
            database = svc.index.path
            modes = {
                p.name: stat.S_IMODE(p.stat().st_mode)
                for p in (database, *database.parent.glob("index.sqlite3-*"))
            }
            stored = [p for p in (root / "instances").rglob("*") if p.is_file()]
            assert len(stored) == 2
            assert stat.S_IMODE(root.stat().st_mode) == 0o700
            assert modes and all(mode == 0o600 for mode in modes.values()), modes
            assert {stat.S_IMODE(p.stat().st_mode) for p in stored} == {0o600}
            # the audit trail holds patient IDs and names too
            audit_log = root / "audit" / "audit.log"
            assert stat.S_IMODE(audit_log.stat().st_mode) == 0o600
            assert stat.S_IMODE(audit_log.parent.stat().st_mode) == 0o700
        finally:
            svc.stop()
    finally:
        os.umask(old)


def test_row16_existing_permissive_store_is_tightened(tmp_path):
    storage = tmp_path / "storage"
    storage.mkdir(mode=0o755)
    os.chmod(storage, 0o755)
    Index(storage / "index.sqlite3").close()
    os.chmod(storage / "index.sqlite3", 0o644)
    index = Index(storage / "index.sqlite3")
    try:
        Store(storage, index)
        assert stat.S_IMODE(storage.stat().st_mode) == 0o700
        assert stat.S_IMODE((storage / "index.sqlite3").stat().st_mode) == 0o600
    finally:
        index.close()


# -- spine-node verify ------------------------------------------------------------------------
def test_verify_lists_missing_orphaned_and_changed_files_and_repairs_missing(stored_node):
    config, storage = stored_node
    index = Index(storage / "index.sqlite3")
    try:
        rows = index.query("SELECT sop_instance_uid, path FROM instances ORDER BY path")
    finally:
        index.close()
    missing, changed = storage / rows[0]["path"], storage / rows[1]["path"]
    missing.unlink()
    data = bytearray(changed.read_bytes())
    data[-1] ^= 0xFF  # same size, other content: only the hash tells
    changed.write_bytes(bytes(data))
    orphan = storage / "instances" / uid_hash("1.2.3") / uid_hash("1.2.3.4") / "x.dcm"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"not indexed")

    report = _cli("verify", "--config", str(config))
    assert report.returncode == 1
    assert f"missing  {rows[0]['sop_instance_uid']} {rows[0]['path']}" in report.stdout
    assert f"changed  {rows[1]['sop_instance_uid']} {rows[1]['path']} (sha256 differs)" in (
        report.stdout
    )
    assert f"orphaned {orphan.relative_to(storage)}" in report.stdout
    assert "integrity ok" in report.stdout

    repaired = _cli("verify", "--config", str(config), "--repair")
    assert "repaired: 1 row(s)" in repaired.stdout
    assert repaired.returncode == 1  # changed and orphaned files remain, listed only
    index = Index(storage / "index.sqlite3")
    try:
        assert index.instance(rows[0]["sop_instance_uid"]) is None
        events = index.events("verify_repair")
        assert [e["sop_instance_uid"] for e in events] == [rows[0]["sop_instance_uid"]]
    finally:
        index.close()
    changed.unlink()
    orphan.unlink()
    final = _cli("verify", "--config", str(config), "--repair")
    assert final.returncode == 0, final.stdout
    assert "consistent" in final.stdout


def test_verify_refuses_a_damaged_index_without_traceback(stored_node):
    config, storage = stored_node
    with open(storage / "index.sqlite3", "r+b") as fh:
        fh.truncate(50)
    report = _cli("verify", "--config", str(config))
    assert report.returncode == 1
    assert "Traceback" not in report.stderr and "damaged" in report.stderr


def test_rebuild_index_keeps_events_and_study_state(stored_node):
    config, storage = stored_node
    index = Index(storage / "index.sqlite3")
    try:
        index.add_event("probe_event", detail="kept")
        before = {r["study_uid"]: r["state"] for r in index.query("SELECT * FROM studies")}
    finally:
        index.close()
    _recover_and_check(config, storage, 12)
    index = Index(storage / "index.sqlite3")
    try:
        assert [e["detail"] for e in index.events("probe_event")] == ["kept"]
        assert len(index.events("index_rebuilt")) == 1
        after = {r["study_uid"]: r["state"] for r in index.query("SELECT * FROM studies")}
        assert after == before
        assert index.check_integrity(full=True) == []
    finally:
        index.close()
    with sqlite3.connect(storage / "index.sqlite3") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] >= 1


def test_rebuild_sets_aside_files_it_cannot_index(tmp_path):
    from node.commands.rebuild_index import rebuild
    from node.service import open_checked_index

    storage = tmp_path / "storage"
    stray = storage / "instances" / "a" / "b.dcm"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"not DICOM")
    with pytest.raises(NodeError, match="is missing but"):
        open_checked_index(storage / "index.sqlite3", storage)
    result = rebuild(storage / "index.sqlite3", storage)
    assert result.indexed == 0 and len(result.unreadable) == 1
    assert not stray.exists()
    assert len(list((storage / "quarantine").glob("rebuild-*.dcm"))) == 1
    open_checked_index(storage / "index.sqlite3", storage).close()  # starts again
