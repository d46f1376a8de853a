"""The durable outbox and its dispatcher: C-STORE results to configured destinations, with retries.

:meth:`Outbox.enqueue` copies the files into the storage folder (``outbox/``) and adds one row per
file to the index's ``outbox`` table. :class:`Dispatcher` (an APScheduler interval job) sends the
due rows of each destination over one association, records every instance's final DICOM status
right after its response, and on failure schedules the next try with exponential back-off and
jitter: ``delay = min(initial * 2**(tries-1), max) * U(0.8, 1.2)``. The state lives in the index,
so a restart loses nothing; rows left ``sending`` by a killed process are put back to ``queued``.
After ``max_tries`` an item is ``failed`` (still listed; :meth:`Outbox.requeue` puts it back).

States: ``queued`` -> ``sending`` -> ``sent`` | ``queued`` (retry) | ``failed``.

References
----------
DICOM PS3.4 Table B.2-1 (C-STORE statuses: warnings mean the peer stored the instance);
mercure ``dispatch/retry.py`` (retries, next_retry_at).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from node.audit import ROLE_DESTINATION, ROLE_SOURCE, AuditTrail, NoAudit, Participant
from node.config import DispatchSettings, Peer, Settings
from node.errors import PeerError, is_success_or_warning
from node.index import Index
from node.scu import SendResult, peer_address, read_file_info, send_files
from node.store import Store

logger = logging.getLogger(__name__)


class Outbox:
    """The queue of instances to send (rows of the index's ``outbox`` table).

    Parameters
    ----------
    index : Index
        The node's index.
    store : Store
        The storage folder (files are copied into ``outbox/`` first).
    settings : Settings
        For the destination names (peers with ``may_receive``).
    """

    def __init__(self, index: Index, store: Store, settings: Settings) -> None:
        self.index = index
        self.store = store
        self.settings = settings

    def enqueue(self, paths: Sequence[Path], destination: str, reason: str) -> list[int]:
        """Queue files for sending to a configured destination; returns the outbox ids.

        Parameters
        ----------
        paths : sequence of Path
            DICOM Part 10 files. Files outside the storage folder are first copied durably
            into ``<storage>/outbox/``.
        destination : str
            Name of a peer with ``may_receive = true``.
        reason : str
            Why (e.g. ``"analysis <study uid>"``); shown by ``spine-node status``. No PHI.

        Raises
        ------
        KeyError
            Unknown destination, or one that may not receive.
        """
        peer = self.settings.peer(destination)
        if not peer.may_receive:
            raise KeyError(f"peer {destination!r} is not configured with may_receive = true")
        rows = []
        for path in paths:
            path = Path(path).resolve()
            info = read_file_info(path)
            if not path.is_relative_to(self.store.root):
                path = copy_into_outbox(self.store, path)
            rows.append((str(path), info.sop_instance_uid, info.sop_class_uid, peer.name, reason))
        now = time.time()
        ids = []
        with self.index.transaction() as db:
            for row in rows:
                cur = db.execute(
                    "INSERT INTO outbox (path, sop_instance_uid, sop_class_uid, destination,"
                    " reason, state, tries, next_attempt, created, updated)"
                    " VALUES (?,?,?,?,?,'queued',0,?,?,?)",
                    (*row, now, now, now),
                )
                ids.append(int(cur.lastrowid or 0))
        logger.info("queued %d instance(s) for %s (%s)", len(ids), peer.name, reason)
        return ids

    def requeue(self, ids: Sequence[int] | None = None) -> int:
        """Put failed items (all, or the given ids) back in the queue with zero tries."""
        now = time.time()
        with self.index.transaction() as db:
            if ids is None:
                cur = db.execute(
                    "UPDATE outbox SET state='queued', tries=0, next_attempt=?, updated=?"
                    " WHERE state='failed'",
                    (now, now),
                )
            else:
                cur = db.executemany(
                    "UPDATE outbox SET state='queued', tries=0, next_attempt=?, updated=?"
                    " WHERE id=? AND state IN ('failed','queued')",
                    [(now, now, i) for i in ids],
                )
            return int(cur.rowcount)

    def recover_claims(self) -> int:
        """Put rows left ``sending`` by a killed process back to ``queued`` (start-up)."""
        with self.index.transaction() as db:
            cur = db.execute(
                "UPDATE outbox SET state='queued', updated=? WHERE state='sending'", (time.time(),)
            )
            count = int(cur.rowcount)
        if count:
            logger.warning(
                "%d outbox item(s) were being sent when the node stopped: re-queued", count
            )
        return count

    def counts(self) -> dict[str, int]:
        """Number of outbox items per state."""
        return {
            r[0]: r[1]
            for r in self.index.query("SELECT state, COUNT(*) FROM outbox GROUP BY state")
        }


def backoff_delay(
    tries: int, settings: DispatchSettings, *, rng: random.Random | None = None
) -> float:
    """Seconds before the next try after ``tries`` failed ones (exponential, with ±20 % jitter)."""
    base = min(settings.backoff_initial_s * 2 ** max(0, tries - 1), settings.backoff_max_s)
    return base * (rng or random).uniform(0.8, 1.2)


class Dispatcher:
    """Sends due outbox items; :meth:`run_once` is scheduled every ``poll_interval_s``.

    Parameters
    ----------
    outbox : Outbox
        The queue.
    settings : Settings
        Destinations (peers) and the retry policy.
    """

    def __init__(
        self, outbox: Outbox, settings: Settings, *, audit: AuditTrail | None = None
    ) -> None:
        self.outbox = outbox
        self.index = outbox.index
        self.settings = settings
        self.audit = audit or NoAudit()
        self._running = threading.Lock()

    @property
    def calling_ae(self) -> str:
        """Our AE title towards destinations."""
        return self.settings.dispatch.calling_ae_title or self.settings.node.ae_title

    def run_once(self) -> int:
        """Send every due item (grouped per destination); returns how many were acknowledged."""
        if not self._running.acquire(blocking=False):
            return 0
        try:
            sent = 0
            due = self.index.query(
                "SELECT DISTINCT destination FROM outbox WHERE state='queued' AND next_attempt<=?",
                (time.time(),),
            )
            for row in due:
                sent += self._send_destination(row[0])
            return sent
        finally:
            self._running.release()

    def _claim(self, destination: str) -> list[tuple[int, Path, int]]:
        now = time.time()
        with self.index.transaction() as db:
            rows = db.execute(
                "SELECT id, path, tries FROM outbox WHERE state='queued' AND destination=?"
                " AND next_attempt<=? ORDER BY id LIMIT ?",
                (destination, now, self.settings.dispatch.batch_size),
            ).fetchall()
            db.executemany(
                "UPDATE outbox SET state='sending', updated=? WHERE id=?",
                [(now, r[0]) for r in rows],
            )
        return [(int(r[0]), Path(r[1]), int(r[2])) for r in rows]

    def _audit_delivery(self, peer: Peer, paths: list[Path], acknowledged: set[str]) -> None:
        """DICOM Instances Transferred (action R), per patient, for one delivery attempt."""
        try:
            self.audit.files_transferred(
                paths,
                acknowledged,
                source=self.audit.node(ROLE_SOURCE, requestor=True),
                destination=Participant(
                    peer.ae_title, requestor=False, role=ROLE_DESTINATION, host=peer.host
                ),
                action="R",
                noun="result instance(s)",
            )
        except Exception as err:  # the audit trail must not stop the delivery's books
            logger.error("audit: delivery to %s not recorded: %s", peer.ae_title, err)

    def _failed_try(self, item_id: int, tries: int, status: int | None, error: str) -> None:
        tries += 1
        policy = self.settings.dispatch
        now = time.time()
        if tries >= policy.max_tries:
            state, next_attempt = "failed", now
        else:
            state, next_attempt = "queued", now + backoff_delay(tries, policy)
        with self.index.transaction() as db:
            db.execute(
                "UPDATE outbox SET state=?, tries=?, next_attempt=?, last_status=?, last_error=?,"
                " updated=? WHERE id=?",
                (state, tries, next_attempt, status, error, now, item_id),
            )
        if state == "failed":
            logger.error("outbox item %d failed after %d tries: %s", item_id, tries, error)

    def _send_destination(self, destination: str) -> int:
        try:
            peer = self.settings.peer(destination)
        except KeyError:
            items = self._claim(destination)
            for item_id, _path, tries in items:
                self._failed_try(item_id, tries, None, "destination not in the configuration")
            return 0
        items = self._claim(destination)
        if not items:
            return 0
        by_path = {str(path): (item_id, tries) for item_id, path, tries in items}
        acknowledged_paths: set[str] = set()
        done: set[int] = set()
        acknowledged = 0
        assoc_id = self.index.open_association("out", peer.ae_title, peer.host, peer.port)
        n_ok = n_warn = n_fail = 0

        def on_result(result: SendResult) -> None:
            nonlocal acknowledged, n_ok, n_warn, n_fail
            item_id, tries = by_path[str(result.path)]
            done.add(item_id)
            if is_success_or_warning(result.status):
                with self.index.transaction() as db:
                    db.execute(
                        "UPDATE outbox SET state='sent', tries=?, last_status=?, last_error=NULL,"
                        " updated=? WHERE id=?",
                        (tries + 1, result.status, time.time(), item_id),
                    )
                acknowledged += 1
                acknowledged_paths.add(str(result.path))
                if result.status == 0:
                    n_ok += 1
                else:
                    n_warn += 1
            else:
                n_fail += 1
                self._failed_try(
                    item_id,
                    tries,
                    result.status,
                    result.error or f"status 0x{result.status or 0:04X}",
                )

        address = peer_address(peer, self.settings)
        outcome = "released"
        try:
            send_files(
                [p for _i, p, _t in items],
                address,
                calling_ae=self.calling_ae,
                timeout_s=self.settings.node.dimse_timeout_s,
                on_result=on_result,
            )
        except PeerError as err:
            outcome = "failed"
            logger.warning("dispatch to %s: %s", address, err)
            for item_id, _path, tries in items:
                if item_id not in done:
                    self._failed_try(item_id, tries, None, str(err))
        finally:
            # anything not answered (e.g. the association dropped) is retried later
            for item_id, _path, tries in items:
                if item_id not in done and outcome != "failed":
                    self._failed_try(item_id, tries, None, "not sent")
            self.index.close_association(
                assoc_id, outcome=outcome, n_ok=n_ok, n_warning=n_warn, n_failed=n_fail
            )
            self._audit_delivery(peer, [p for _i, p, _t in items], acknowledged_paths)
        if acknowledged:
            logger.info("dispatched %d instance(s) to %s", acknowledged, address)
        return acknowledged


def copy_into_outbox(store: Store, path: Path) -> Path:
    """Durably copy a produced file into ``<storage>/outbox/`` (named by its content hash)."""
    data = Path(path).read_bytes()
    kept = store.outbox_dir / f"{hashlib.sha256(data).hexdigest()[:32]}.dcm"
    if not kept.exists():
        store.write_durably(data, kept)
    return kept
