"""The DICOM listener: pynetdicom C-ECHO and C-STORE SCP with thin handlers.

The C-STORE handler hands the encoded bytes to :meth:`node.store.Store.accept` and turns the
outcome into a status via :func:`node.errors.store_status`; it never decodes pixels or analyses.
Association policy: the called AE title must be ours, the calling AE title must belong to a
configured peer allowed to send (unless switched off), finite ACSE/DIMSE/network timeouts, a
bounded PDU size, an association limit, optional TLS 1.2+.

``TCP_NODELAY`` is set on every accepted socket (:func:`set_tcp_nodelay`, bound to
``EVT_CONN_OPEN``): dcmtk-based peers otherwise stall ~40 ms per message on Nagle's algorithm
combined with delayed ACKs.

References
----------
DICOM PS3.4 Annex B (Storage Service Class), PS3.7 9.1.1 (C-STORE), PS3.8 (upper layer),
PS3.15 B.12 (TLS profile).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    KeyObjectSelectionDocumentStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    ParametricMapStorage,
    RTBeamsTreatmentRecordStorage,
    RTDoseStorage,
    RTPlanStorage,
    RTStructureSetStorage,
    RTTreatmentSummaryRecordStorage,
    SegmentationStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from node.audit import (
    INSTANCES_TRANSFERRED,
    MINOR_FAILURE,
    NODE_AUTHENTICATION,
    ROLE_DESTINATION,
    ROLE_SOURCE,
    SECURITY_ALERT,
    SERIOUS_FAILURE,
    SUCCESS,
    AuditTrail,
    NoAudit,
    Participant,
    received_patients,
    transfer_messages,
)
from node.config import Settings
from node.errors import (
    FAILURE_UNABLE_TO_PROCESS,
    NodeError,
    OutOfResourcesError,
    StoreOutcome,
    store_status,
)
from node.incoming import (
    IncomingPolicy,
    discard_orphans,
    discard_unfinished,
    install,
    refusal,
    uninstall,
)
from node.index import Index
from node.store import Store, StoreResult

logger = logging.getLogger(__name__)

# pynetdicom logs query/response identifiers by default (patient names and IDs).
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
# Received datasets go to a temporary file as their fragments arrive instead of being collected
# in memory: a multi-frame Enhanced MR or DCE object can be hundreds of MB.
_config.STORE_RECV_CHUNKED_DATASET = True

#: SOP classes the node stores (issue 2 scope)
STORAGE_SOP_CLASSES: tuple[str, ...] = (
    MRImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    CTImageStorage,
    EnhancedCTImageStorage,
    RTStructureSetStorage,
    RTPlanStorage,
    RTDoseStorage,
    SegmentationStorage,
    ParametricMapStorage,
    ComprehensiveSRStorage,
    Comprehensive3DSRStorage,
    # treatment records date the course (processing.course: first fraction delivered); without
    # them the date is the plan's approval date, marked estimated
    RTBeamsTreatmentRecordStorage,
    RTTreatmentSummaryRecordStorage,
    # IHE IOCM rejection notes (node.rejection) and other key object selections
    KeyObjectSelectionDocumentStorage,
)
#: uncompressed and the common compressed transfer syntaxes; data is stored as received
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)


#: Sleep (s) of pynetdicom's DUL thread when it has nothing to do (its default is 1 ms). Each
#: C-STORE waits in this loop several times (data arriving, response to send); at 1 ms that
#: halves the ingest rate on loopback. The cost is more wake-ups of idle associations, which
#: ``network_timeout_s`` bounds.
DUL_LOOP_DELAY_S = 0.0001


def set_tcp_nodelay(event: evt.Event) -> None:
    """``EVT_CONN_OPEN`` handler: disable Nagle's algorithm on the association's socket.

    Also shortens the association's DUL polling delay to :data:`DUL_LOOP_DELAY_S`.
    """
    dul = event.assoc.dul
    sock = dul.socket.socket if dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    dul._run_loop_delay = DUL_LOOP_DELAY_S


#: connections beyond ``max_associations`` the listener keeps open while they have not sent
#: their A-ASSOCIATE-RQ (each for at most ``acse_timeout_s``); a connection beyond that is closed
#: at once
PENDING_CONNECTIONS = 64
#: A-ASSOCIATE-RJ result, source, reason: rejected-transient, service provider (presentation),
#: local limit exceeded (PS3.8 9.3.4)
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)

#: largest PDU (bytes of its variable field) read from a peer before the association is
#: established: an A-ASSOCIATE-RQ is a few kB (user identity tokens included)
MAX_ASSOCIATE_PDU_BYTES = 1024 * 1024


class PduTooLongError(OSError):
    """A peer declared a PDU longer than the node reads (the connection is closed)."""


def limit_pdu_length(assoc_socket: Any, max_bytes: int) -> None:
    """Make ``assoc_socket`` (pynetdicom's ``AssociationSocket`` of one connection) refuse to read
    a PDU declared longer than ``max_bytes``, before buffering any of it.

    pynetdicom's DUL reads a PDU's 6-byte header, then ``recv(<declared length>)`` into memory,
    whatever the length (issue 17, rows 2-3: 4 GB declared by an A-ASSOCIATE-RQ before any
    authentication, 2 GB by a P-DATA-TF). A wrap of that one method: the DUL treats the
    ``OSError`` as the transport closing (Evt17), so the connection is dropped and nothing is
    buffered. ``max_bytes`` is the node's maximum PDU length (PS3.8 9.3.1: a peer must not send
    longer P-DATA-TF PDUs) or :data:`MAX_ASSOCIATE_PDU_BYTES`, whichever is larger.
    """
    read = assoc_socket.recv

    def recv(nr_bytes: int) -> bytearray:
        if nr_bytes > max_bytes:
            raise PduTooLongError(
                f"peer declared a PDU of {nr_bytes} bytes; at most {max_bytes} are read"
            )
        return cast(bytearray, read(nr_bytes))

    assoc_socket.recv = recv


def _guard_thread(thread: Any, what: str, after_failure: Callable[[], None]) -> None:
    """Wrap the target of a pynetdicom thread not yet started (its ``_target``, set by
    ``Thread.__init__``) so that an exception ends it as one logged warning and
    ``after_failure()`` instead of an uncaught thread exception (issue 17, fuzz run)."""
    target = getattr(thread, "_target", None)
    if target is None or thread.is_alive():
        return

    def run() -> None:
        try:
            target()
        except Exception as err:  # the thread's boundary: log it, clean up, end the thread
            logger.warning(
                "%s (%s: %s); connection dropped", what, type(err).__name__, str(err)[:120]
            )
            try:
                after_failure()
            except Exception:  # noqa: BLE001 - best effort on a broken association
                pass

    thread._target = run


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS context of the listener (``None`` when TLS is off): TLS >= 1.2, client certs."""
    tls = settings.tls
    if not tls.enabled:
        return None
    context = ssl.create_default_context(
        ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca) if tls.ca else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.key))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_NONE
    return context


class NodeAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved off the accept thread.

    pynetdicom wraps each accepted socket in TLS inside ``get_request``, that is in the thread
    that accepts every connection, with no timeout: one client that connects and never starts the
    handshake blocks every later association for as long as it stays connected (issue 17, row 1).
    Here the accept thread only accepts; the handshake runs in the connection's own thread
    (``process_request_thread``), bounded by ``handshake_timeout_s``, and a connection that does
    not complete it in time is closed and recorded. Subclassed rather than forked: the two methods
    are pynetdicom's (socketserver's) documented extension points, and the rest is unchanged.
    """

    #: bound (s) of a client's TLS handshake; set by :meth:`StorageSCP.start`
    handshake_timeout_s: float = 30.0
    #: called with the client's address and the error of a failed handshake (the audit trail)
    on_handshake_failed: Callable[[str, str], None] | None = None

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client_socket, address = self.socket.accept()
        if len(self.active_associations) >= self.ae.maximum_associations:
            # every thread the node allows is taken (mostly by connections that have not said
            # who they are): no thread for this one; socketserver skips an OSError here
            client_socket.close()
            logger.warning(
                "connection from %s closed: %d open already",
                address[0],
                len(self.active_associations),
            )
            raise OSError("too many open connections")
        return client_socket, address

    def process_request_thread(
        self,
        request: socket.socket | tuple[bytes, socket.socket],
        client_address: tuple[str, int] | str,
    ) -> None:
        if self.ssl_context is not None and isinstance(request, socket.socket):
            try:
                request.settimeout(self.handshake_timeout_s)
                request = self.ssl_context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (OSError, ValueError) as err:  # ssl.SSLError and socket.timeout are OSErrors
                host = client_address[0] if isinstance(client_address, tuple) else client_address
                logger.warning(
                    "TLS handshake from %s failed or timed out after %.0f s: %s",
                    host,
                    self.handshake_timeout_s,
                    type(err).__name__,
                )
                self.shutdown_request(request)
                if self.on_handshake_failed is not None:
                    self.on_handshake_failed(str(host), type(err).__name__)
                return
        super().process_request_thread(request, client_address)


@dataclass
class _AssociationState:
    index_id: int
    #: the pynetdicom Association (a thread): its end without an end event is found by sweep()
    assoc: Any = None
    n_ok: int = 0
    n_warning: int = 0
    n_failed: int = 0
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


def store_event(
    store: Store, event: evt.Event, *, calling_ae: str | None, association_id: int | None
) -> StoreResult:
    """Store the dataset of a C-STORE request (an ``EVT_C_STORE`` event) through ``store``.

    Used by the listener and by C-GET sub-operations (:mod:`node.priors`). With pynetdicom's
    ``_config.STORE_RECV_CHUNKED_DATASET`` the dataset is already in a file
    (``event.dataset_path``), moved into the store; otherwise the encoded bytes are written.

    Raises
    ------
    NodeError
        The store refused the instance (mapped to a DIMSE status by :func:`store_status`).
    """
    request = cast(C_STORE, event.request)
    transfer_syntax = str(event.context.transfer_syntax)
    sop_class = str(request.AffectedSOPClassUID)
    sop_instance = str(request.AffectedSOPInstanceUID)
    if getattr(request, "_dataset_path", None) is not None:
        # refused while arriving (node.incoming): the disk's low-water mark, a full disk or the
        # size limit; the transfer was completed into nothing, the peer gets 0xA700
        reason = refusal(getattr(request, "_dataset_file", None))
        if reason is not None:
            raise OutOfResourcesError(reason)
        return store.accept_file(
            event.dataset_path,
            transfer_syntax_uid=transfer_syntax,
            request_sop_class_uid=sop_class,
            request_sop_instance_uid=sop_instance,
            calling_ae=calling_ae,
            association_id=association_id,
        )
    meta = b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta)
    return store.accept(
        event.encoded_dataset(include_meta=False),
        meta,
        transfer_syntax_uid=transfer_syntax,
        request_sop_class_uid=sop_class,
        request_sop_instance_uid=sop_instance,
        calling_ae=calling_ae,
        association_id=association_id,
    )


class StorageSCP:
    """The node's listener.

    Parameters
    ----------
    settings : Settings
        Validated settings (AE title, address, peers, timeouts, TLS).
    store : Store
        Where received instances go.
    index : Index
        Where associations are recorded.
    on_stored : callable, optional
        Called with the :class:`~node.store.StoreResult` of every newly stored instance (the
        stability monitor); must be quick.
    audit : AuditTrail, optional
        Where instances received and associations refused are recorded (default: nowhere).
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        index: Index,
        on_stored: Callable[[StoreResult], None] | None = None,
        *,
        audit: AuditTrail | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.index = index
        self.on_stored = on_stored
        self.audit = audit or NoAudit()
        self._server: ThreadedAssociationServer | None = None
        self._states: dict[int, _AssociationState] = {}
        self._states_lock = threading.Lock()
        self._peer_addresses = self._resolve_peer_hosts()
        self.ae = self._make_ae()

    def _resolve_peer_hosts(self) -> dict[str, set[str] | None]:
        """Calling AE title -> the IP addresses it may connect from (``None``: any host)."""
        allowed: dict[str, set[str] | None] = {}
        for peer in self.settings.peers:
            if not peer.may_send:
                continue
            if peer.host == "*":
                allowed[peer.ae_title] = None
                continue
            try:
                infos = socket.getaddrinfo(peer.host, None, proto=socket.IPPROTO_TCP)
                addresses = {str(info[4][0]) for info in infos}
            except socket.gaierror:
                logger.warning(
                    "peer %s: host %r does not resolve; only the literal is allowed",
                    peer.ae_title,
                    peer.host,
                )
                addresses = {peer.host}
            if peer.ae_title in allowed and allowed[peer.ae_title] is None:
                continue  # another entry of this AE title already allows any host
            allowed[peer.ae_title] = (allowed.get(peer.ae_title) or set()) | addresses
        return allowed

    def _make_ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.require_called_aet = True
        if node.reject_unknown_calling_ae:
            ae.require_calling_aet = list(self.settings.calling_ae_titles)
        # the node counts associations itself, from their A-ASSOCIATE-RQ (_on_requested):
        # pynetdicom's own limit counts every open connection, so that sockets that never send
        # an A-ASSOCIATE-RQ would lock real peers out until their ACSE timeout (issue 17, row 5);
        # its limit stays as a bound of the connection threads, PENDING_CONNECTIONS above
        ae.maximum_associations = node.max_associations + PENDING_CONNECTIONS
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.maximum_pdu_size = node.maximum_pdu_size
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        return ae

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> tuple[str, int]:
        """Start listening (non-blocking); returns the bound ``(host, port)``."""
        node = self.settings.node
        install(
            self.ae,
            IncomingPolicy(
                self.store.incoming_dir,
                low_water_bytes=self.store.low_water_bytes,
                max_dataset_bytes=int(node.max_dataset_mb * 1e6),
            ),
        )
        handlers: list[EventHandlerType] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_ended, ["released"]),
            (evt.EVT_ABORTED, self._on_ended, ["aborted"]),
            (evt.EVT_CONN_CLOSE, self._on_ended, ["closed"]),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        # AE.start_server(block=False) with the node's server class: make_server, then
        # serve_forever in a daemon thread, registered with the AE (which its shutdown expects)
        server = self.ae.make_server(
            (node.bind_address, node.port),
            evt_handlers=handlers,
            ssl_context=server_ssl_context(self.settings),
            server_class=NodeAssociationServer,
        )
        assert isinstance(server, NodeAssociationServer)
        server.handshake_timeout_s = node.acse_timeout_s
        server.on_handshake_failed = self._audit_handshake_failure
        threading.Thread(
            target=server.serve_forever, name="AcceptorServer-node", daemon=True
        ).start()
        self.ae._servers.append(server)
        self._server = server
        host, port = server.server_address[:2]
        return str(host), int(port)

    def stop(self) -> None:
        """Stop accepting, wait for running associations to end (bounded by their timeouts)."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()
        uninstall(self.ae)

    @property
    def server(self) -> ThreadedAssociationServer | None:
        """The running pynetdicom server (for tests and status)."""
        return self._server

    # -- association bookkeeping ----------------------------------------------------------------
    def _peer(self, event: evt.Event) -> tuple[str, str, int]:
        requestor = event.assoc.requestor
        return str(requestor.ae_title).strip(), str(requestor.address), int(requestor.port)

    def _on_conn_open(self, event: evt.Event) -> None:
        set_tcp_nodelay(event)
        dul = event.assoc.dul
        if dul.socket is not None:
            limit = max(self.settings.node.maximum_pdu_size, MAX_ASSOCIATE_PDU_BYTES)
            limit_pdu_length(dul.socket, limit)
        self._guard_network_thread(dul)
        self._guard_association_thread(event.assoc)

    def _guard_association_thread(self, assoc: Any) -> None:
        """Catch what pynetdicom's association thread raises on a malformed A-ASSOCIATE-RQ.

        Its acceptor negotiation raises on some requests (a presentation context without an
        abstract syntax: the fuzz run of ``make bench``), ending the thread with an uncaught
        exception. The network thread is stopped and its socket closed, so that the connection
        does not wait for the network timeout.
        """

        def end_connection() -> None:
            assoc.dul.kill_dul()
            if assoc.dul.socket is not None:
                assoc.dul.socket.close()

        _guard_thread(assoc, "association thread failed on a malformed request", end_connection)

    def _guard_network_thread(self, dul: Any) -> None:
        """Catch what pynetdicom's network thread raises on a malformed PDU.

        pynetdicom's state machine logs an exception in an action and re-raises it (e.g. an
        A-ABORT with an invalid source, a command set without Command Field, an event invalid in
        the state: the fuzz run of ``make bench``), which ends the thread with an uncaught
        exception and the association without an end event. The unfinished dataset's file is
        removed; the association thread ends as before (it closes the socket when its network
        thread is gone) and :meth:`sweep` closes its books.
        """

        def drop_partial_file() -> None:
            discard_unfinished(dul.assoc)

        _guard_thread(
            dul, "association's network thread failed on a malformed PDU", drop_partial_file
        )

    def _associations_requested(self, assoc: Any, calling: str) -> tuple[int, int]:
        """Live associations other than ``assoc`` that have sent their A-ASSOCIATE-RQ, in all
        and from ``calling``: counted from pynetdicom's live association threads, so that an
        association whose network thread died (no end event: the fuzz run of ``make bench``
        found PDUs that do this) stops counting when its thread ends."""
        server = self._server
        total = same_peer = 0
        for other in server.active_associations if server is not None else []:
            request = other.requestor.primitive
            if other is assoc or request is None:
                continue  # this one, or a connection that has not sent its A-ASSOCIATE-RQ
            if other.is_released or other.is_aborted or other.is_rejected:
                continue
            total += 1
            same_peer += str(request.calling_ae_title).strip() == calling
        return total, same_peer

    def sweep(self) -> None:
        """Close the books of associations that ended without an end event.

        When a PDU makes pynetdicom's network thread raise (an A-ABORT with an invalid source, a
        command set without Command Field, an event invalid in the state), the association
        thread ends without EVT_ABORTED/EVT_CONN_CLOSE: its index row stays open and a dataset
        it was receiving stays in ``tmp/incoming``. Run at every A-ASSOCIATE-RQ and association
        end; records the association as ``failed`` and removes the orphaned files.
        """
        with self._states_lock:
            dead = [
                (key, state)
                for key, state in self._states.items()
                if state.assoc is not None and not state.assoc.is_alive()
            ]
            for key, _ in dead:
                del self._states[key]
        for _, state in dead:
            self._close_books(state, "failed")
            logger.warning(
                "association %d ended without an end event (its network thread failed)",
                state.index_id,
            )
        removed = discard_orphans()
        if removed:
            logger.warning("removed %d partial file(s) of associations that failed", removed)

    def _on_requested(self, event: evt.Event) -> None:
        """Reject beyond the association limits, and a known calling AE title connecting from a
        host it is not configured on.

        The limits count associations from their A-ASSOCIATE-RQ (``max_associations``, and
        ``max_associations_per_peer`` per calling AE title): local limit exceeded (PS3.8 9.3.4:
        result 2, source 3, reason 2). DICOM has no "wrong host" reason, so that A-ASSOCIATE-RJ
        says "calling AE title not recognised" (result 1, source 1, reason 3), as for an
        unknown title.
        """
        assoc = event.assoc
        request = assoc.requestor.primitive
        assert request is not None  # EVT_REQUESTED: the A-ASSOCIATE-RQ has arrived
        calling = str(request.calling_ae_title).strip()
        node = self.settings.node
        self.sweep()
        total, same_peer = self._associations_requested(assoc, calling)
        per_peer = node.max_associations_per_peer or node.max_associations
        over = total >= node.max_associations or same_peer >= per_peer
        if over:
            assoc.acse.send_reject(*LOCAL_LIMIT_EXCEEDED)
            assoc.is_rejected = True
            self.index.add_event(
                "association_rejected",
                detail=f"calling AE {calling!r}: local limit exceeded ({total} associations, "
                f"{same_peer} of this peer)",
            )
            logger.warning(
                "association from %r rejected: local limit (%d open, %d of this peer)",
                calling,
                total,
                same_peer,
            )
            self._audit_rejection(event, "local limit exceeded")
            assoc.kill()
            return
        if not node.reject_unknown_calling_ae:
            return
        if calling not in self._peer_addresses:
            return  # unknown titles are rejected by pynetdicom's own check
        allowed = self._peer_addresses[calling]
        host = str(assoc.requestor.address)
        if allowed is None or host in allowed or host.removeprefix("::ffff:") in allowed:
            return
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        assoc.is_rejected = True
        index_id = self.index.open_association(
            "in", calling, host, int(assoc.requestor.port), outcome="rejected"
        )
        self.index.add_event(
            "association_rejected", detail=f"calling AE {calling!r} from unexpected host {host}"
        )
        logger.warning(
            "association %d from %r at %s rejected: not the peer's configured host",
            index_id,
            calling,
            host,
        )
        self._audit_rejection(event, "calling AE title from a host it is not configured on")
        assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        ae_title, host, port = self._peer(event)
        index_id = self.index.open_association("in", ae_title, host, port)
        with self._states_lock:
            self._states[id(event.assoc)] = _AssociationState(index_id, assoc=event.assoc)
        logger.info("association %d accepted from %s at %s:%d", index_id, ae_title, host, port)

    def _on_rejected(self, event: evt.Event) -> None:
        ae_title, host, port = self._peer(event)
        index_id = self.index.open_association("in", ae_title, host, port, outcome="rejected")
        self.index.add_event("association_rejected", detail=f"calling AE {ae_title!r} from {host}")
        logger.warning("association %d from %r at %s:%d rejected", index_id, ae_title, host, port)
        self._audit_rejection(event, "called or calling AE title not accepted")

    # -- audit trail ------------------------------------------------------------------------------
    def _audit_rejection(self, event: evt.Event, reason: str) -> None:
        """A Security Alert (Node Authentication) for an association the node refused."""
        request = event.assoc.requestor
        peer = Participant(str(request.ae_title).strip(), requestor=True, host=str(request.address))
        self._security_alert(peer, f"association rejected: {reason}")

    def _audit_handshake_failure(self, host: str, error: str) -> None:
        peer = Participant("unknown", requestor=True, host=host)
        self._security_alert(peer, f"TLS handshake failed or timed out: {error}")

    def _security_alert(self, peer: Participant, description: str) -> None:
        self.audit.event(
            SECURITY_ALERT,
            outcome=MINOR_FAILURE,
            event_types=(NODE_AUTHENTICATION,),
            action="E",
            description=description,
            participants=(peer, self.audit.node()),
        )

    def _audit_received(self, state: _AssociationState, outcome: str) -> None:
        """DICOM Instances Transferred (action C), per patient, for an association that ended."""
        if state.n_ok == 0 and state.n_warning == 0 and state.n_failed == 0:
            return
        assoc = state.assoc
        requestor = assoc.requestor if assoc is not None else None
        source = Participant(
            str(requestor.ae_title).strip() if requestor is not None else "unknown",
            requestor=True,
            role=ROLE_SOURCE,
            host=str(requestor.address) if requestor is not None else None,
        )
        failed = state.n_failed > 0 or outcome != "released"
        description = (
            f"{state.n_ok} stored, {state.n_warning} with warnings, {state.n_failed} refused; "
            f"association {outcome}"
        )
        messages = transfer_messages(
            received_patients(self.index, state.index_id),
            source=source,
            destination=self.audit.node(ROLE_DESTINATION),
            action="C",
            outcome=MINOR_FAILURE if failed else SUCCESS,
            description=description if failed else None,
            source_id=self.audit.source_id,
            site_id=self.audit.site_id,
        )
        if not messages:  # nothing was stored: the refusals alone
            self.audit.event(
                INSTANCES_TRANSFERRED,
                outcome=SERIOUS_FAILURE,
                action="C",
                description=description,
                participants=(source, self.audit.node(ROLE_DESTINATION)),
            )
        for message in messages:
            self.audit.record(message, outcome=MINOR_FAILURE if failed else SUCCESS)

    def _close_books(self, state: _AssociationState, outcome: str) -> None:
        """Record the end of an association in the index, with its counts, and in the audit
        trail."""
        self.index.close_association(
            state.index_id,
            outcome=outcome,
            n_ok=state.n_ok,
            n_warning=state.n_warning,
            n_failed=state.n_failed,
        )
        try:
            self._audit_received(state, outcome)
        except Exception as err:  # the audit trail must not break the listener's books
            logger.error("audit: association %d not recorded: %s", state.index_id, err)

    def _on_ended(self, event: evt.Event, outcome: str) -> None:
        # a dataset still arriving when the association ended (peer aborted or vanished): its
        # file goes now, not at restart (an association whose network thread died has no end
        # event: sweep() finds those)
        if discard_unfinished(event.assoc):
            logger.warning("association ended (%s) mid-dataset: partial file removed", outcome)
        with self._states_lock:
            state = self._states.pop(id(event.assoc), None)
        if state is None:
            return
        self._close_books(state, outcome)
        logger.info(
            "association %d %s: %d stored, %d warnings, %d failed",
            state.index_id,
            outcome,
            state.n_ok,
            state.n_warning,
            state.n_failed,
        )
        self.sweep()

    # -- services -------------------------------------------------------------------------------
    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_store(self, event: evt.Event) -> int:
        request = cast(C_STORE, event.request)  # an EVT_C_STORE handler gets C-STORE requests
        state = self._states.get(id(event.assoc))
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        result: StoreResult | None = None
        try:
            result = store_event(
                self.store,
                event,
                calling_ae=calling_ae,
                association_id=state.index_id if state else None,
            )
            status = store_status(result.outcome)
        except NodeError as err:
            status = store_status(err)
            logger.warning(
                "C-STORE of %s from %s refused (0x%04X): %s",
                request.AffectedSOPInstanceUID,
                calling_ae,
                status,
                err,
            )
        except Exception as err:  # the status mapper's catch-all: the peer must get an answer
            status = FAILURE_UNABLE_TO_PROCESS
            logger.error(
                "C-STORE of %s failed unexpectedly: %s",
                request.AffectedSOPInstanceUID,
                type(err).__name__,
            )
        if state is not None:
            with state.lock:
                if status == 0:
                    state.n_ok += 1
                elif status & 0xF000 == 0xB000:
                    state.n_warning += 1
                else:
                    state.n_failed += 1
        if result is not None and result.outcome is StoreOutcome.STORED and self.on_stored:
            self.on_stored(result)
        return status
