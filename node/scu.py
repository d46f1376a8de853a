"""Outgoing DICOM: C-ECHO and C-STORE to a peer, with ``TCP_NODELAY`` on the socket.

pynetdicom never disables Nagle's algorithm on its sockets; against dcmtk-based receivers
(most PACS) every C-STORE then waits ~40 ms for a delayed ACK. :func:`node.scp.set_tcp_nodelay`
is bound to ``EVT_CONN_OPEN`` of every association opened here.

Files are sent as stored (``STORE_SEND_CHUNKED_DATASET``: the encoded dataset is streamed from
the file, not decoded and re-encoded).

References
----------
DICOM PS3.7 9.1.1 (C-STORE), 9.1.5 (C-ECHO); PS3.4 Table B.2-1 (statuses).
"""

from __future__ import annotations

import logging
import re
import ssl
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import Peer, Settings, TlsSettings
from node.errors import PeerError
from node.scp import set_tcp_nodelay

logger = logging.getLogger(__name__)

# stream files as stored instead of decoding and re-encoding them
_config.STORE_SEND_CHUNKED_DATASET = True
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

_TARGET = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>[0-9]{1,5})$")
#: pynetdicom's limit of presentation contexts per association (PS3.8: odd ids 1..255)
MAX_CONTEXTS = 128


@dataclass(frozen=True)
class PeerAddress:
    """Where to send: the peer's AE title, host and TCP port (and TLS context, if any)."""

    ae_title: str
    host: str
    port: int
    #: client TLS context (:func:`client_ssl_context`); ``None``: plain TCP
    tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    @property
    def tls_args(self) -> tuple[ssl.SSLContext, str] | None:
        """pynetdicom's ``tls_args`` for ``AE.associate`` (the host name is verified)."""
        return None if self.tls is None else (self.tls, self.host)

    @classmethod
    def parse(cls, text: str) -> PeerAddress:
        """Parse ``AE@host:port`` (e.g. ``STORESCP@127.0.0.1:11113``)."""
        match = _TARGET.match(text.strip())
        if not match or not 0 < int(match["port"]) < 65536:
            raise ValueError(f"{text!r} is not AE@host:port")
        return cls(match["ae"], match["host"], int(match["port"]))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}{' (TLS)' if self.tls else ''}"


def client_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """TLS context for associations the node opens (PS3.15 B.12: TLS 1.2 or newer).

    The peer's certificate must chain to ``tls.ca`` and name the peer's host (DNS name or IP
    address in its subjectAltName); ``tls.certificate``/``tls.key``, when given, are presented
    as the node's client certificate (mutual authentication, which dcmtk and Orthanc require
    by default).
    """
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca) if tls.ca else None
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.certificate is not None and tls.key is not None:
        context.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.key))
    return context


def peer_address(peer: Peer, settings: Settings) -> PeerAddress:
    """Where to reach a configured peer, with a TLS context when the peer uses TLS."""
    return PeerAddress(
        peer.ae_title, peer.host, peer.port, client_ssl_context(settings.tls) if peer.tls else None
    )


@dataclass(frozen=True)
class SendResult:
    """Status of one instance sent by C-STORE (``status`` is ``None`` without a response)."""

    path: Path
    sop_instance_uid: str
    status: int | None
    error: str | None = None


@dataclass(frozen=True)
class _FileInfo:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def _pause_reactor(assoc: Association, timeout_s: float = 5.0) -> None:
    """Make sure the association's reactor thread is blocked before a request is sent.

    pynetdicom's ``send_c_*`` clear the reactor checkpoint and then poll ``_is_paused``, which
    the reactor sets to ``True`` just *before* its ``wait()``: a reactor that has already passed
    ``wait()`` looks paused, takes the fast response off the queue and drops it ("Received
    unexpected C-STORE service message"), and the sender hangs until the DIMSE timeout. With
    TCP_NODELAY responses arrive quickly enough to hit this often. Waiting until the reactor is
    really blocked on the checkpoint's condition closes the window.
    """
    checkpoint = assoc._reactor_checkpoint
    checkpoint.clear()
    deadline = time.monotonic() + timeout_s
    # Event.wait() registers a waiter on the event's condition while it blocks (CPython)
    while not checkpoint._cond._waiters and assoc.is_established:  # type: ignore[attr-defined]
        if time.monotonic() > deadline:
            break
        time.sleep(0.0001)


def _associate(ae: AE, peer: PeerAddress) -> Association:
    """An established association of ``ae`` with ``peer`` (TCP_NODELAY, the peer's TLS).

    Raises
    ------
    PeerError
        The association was rejected, aborted or not answered.
    """
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
        tls_args=peer.tls_args,
    )
    if not assoc.is_established:
        raise PeerError(
            f"association with {peer} was not established "
            f"({'rejected' if assoc.is_rejected else 'no answer or aborted'})"
        )
    return assoc


def _make_ae(calling_ae: str, *, timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    return ae


def echo(peer: PeerAddress, *, calling_ae: str = "SPINENODE", timeout_s: float = 30.0) -> int:
    """C-ECHO a peer; returns the response status.

    Raises
    ------
    PeerError
        The association was rejected or aborted, or no response arrived.
    """
    ae = _make_ae(calling_ae, timeout_s=timeout_s)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, peer)
    try:
        _pause_reactor(assoc)
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or "Status" not in status:
        raise PeerError(f"no C-ECHO response from {peer}")
    return int(status.Status)


def read_file_info(path: Path) -> _FileInfo:
    """SOP Class/Instance and transfer syntax of a DICOM file (header only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    meta = ds.file_meta
    return _FileInfo(
        path=path,
        sop_class_uid=str(meta.get("MediaStorageSOPClassUID") or ds.SOPClassUID),
        sop_instance_uid=str(meta.get("MediaStorageSOPInstanceUID") or ds.SOPInstanceUID),
        transfer_syntax_uid=str(meta.TransferSyntaxUID),
    )


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files given directly, plus every file under given folders (sorted)."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        else:
            out.append(p)
    return out


def send_files(
    paths: Sequence[Path],
    peer: PeerAddress,
    *,
    calling_ae: str = "SPINENODE",
    timeout_s: float = 60.0,
    on_result: Callable[[SendResult], None] | None = None,
) -> list[SendResult]:
    """C-STORE files to a peer over as few associations as the contexts allow.

    Parameters
    ----------
    paths : sequence of Path
        DICOM Part 10 files. Unreadable ones get a result with ``status=None`` and an error.
    peer : PeerAddress
        The receiver.
    calling_ae : str
        Our AE title.
    timeout_s : float
        ACSE/DIMSE/network/connection timeouts (s).
    on_result : callable, optional
        Called right after each response (e.g. to record it durably before the next send).

    Returns
    -------
    list of SendResult
        One per file, in order of sending.

    Raises
    ------
    PeerError
        The association could not be established (nothing was sent).
    """
    results: list[SendResult] = []

    def record(result: SendResult) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    infos: list[_FileInfo] = []
    for path in paths:
        try:
            infos.append(read_file_info(Path(path)))
        except (InvalidDicomError, OSError, AttributeError, KeyError, ValueError) as err:
            record(SendResult(Path(path), "", None, f"unreadable: {type(err).__name__}"))
    # group into associations of at most MAX_CONTEXTS (sop class, transfer syntax) contexts
    batches: list[list[_FileInfo]] = []
    contexts: list[set[tuple[str, str]]] = []
    for info in infos:
        key = (info.sop_class_uid, info.transfer_syntax_uid)
        for batch, keys in zip(batches, contexts):
            if key in keys or len(keys) < MAX_CONTEXTS // 2:
                keys.add(key)
                batch.append(info)
                break
        else:
            batches.append([info])
            contexts.append({key})
    for batch, keys in zip(batches, contexts):
        _send_batch(batch, keys, peer, calling_ae, timeout_s, record)
    return results


def _send_batch(
    batch: list[_FileInfo],
    keys: set[tuple[str, str]],
    peer: PeerAddress,
    calling_ae: str,
    timeout_s: float,
    record: Callable[[SendResult], None],
) -> None:
    ae = _make_ae(calling_ae, timeout_s=timeout_s)
    requested = []
    for sop_class, ts in sorted(keys):
        # the stored syntax in a context of its own: a receiver that prefers another syntax
        # (pynetdicom picks implicit VR from a list) must not leave us a context the file does
        # not match; the other uncompressed syntax is offered in a second context
        requested.append(build_context(sop_class, [ts]))
        for other in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if other != ts:
                requested.append(build_context(sop_class, [other]))
    ae.requested_contexts = requested[:MAX_CONTEXTS]
    assoc = _associate(ae, peer)
    try:
        for info in batch:
            if not assoc.is_established:
                record(
                    SendResult(
                        info.path, info.sop_instance_uid, None, "association ended before sending"
                    )
                )
                continue
            try:
                _pause_reactor(assoc)
                rsp = assoc.send_c_store(info.path)
            except (ValueError, RuntimeError, OSError) as err:
                # no accepted context for this file, or a transport failure
                record(
                    SendResult(
                        info.path, info.sop_instance_uid, None, f"{type(err).__name__}: not sent"
                    )
                )
                continue
            status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
            record(
                SendResult(
                    info.path,
                    info.sop_instance_uid,
                    status,
                    None if status is not None else "no response",
                )
            )
    finally:
        if assoc.is_established:
            assoc.release()
