"""The node's web dashboard (Flask, server-rendered): worklist, outbox, lesion timelines with
trend plots, follow-ups and associations; see :mod:`node.dashboard.app`.

``spine-node serve`` runs it with :func:`start_dashboard` on the configured local port.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from node.audit import AuditTrail
from node.config import DashboardSection
from node.dashboard.app import DashboardActions, create_app
from node.dashboard.state import StudyState, outbox_reason, study_states, worklist_text

if TYPE_CHECKING:
    from wsgiref.types import WSGIApplication

    from node.dispatch import Outbox
    from node.index import Index
    from node.protocols import Analyser, DashboardHost, ReanalyseHost

logger = logging.getLogger(__name__)

__all__ = [
    "DashboardActions",
    "DashboardSection",
    "DashboardServer",
    "StudyState",
    "create_app",
    "reanalyse_action",
    "requeue_failed_outputs",
    "start_dashboard",
    "tls_context",
    "worklist_text",
    "study_states",
]


class _Handler(WSGIRequestHandler):
    """Werkzeug's request handler with a socket timeout: a silent client frees its thread."""

    timeout = 30


def tls_context(certificate: str | Path, key: str | Path) -> ssl.SSLContext:
    """A server TLS context (TLS 1.2 minimum) from a PEM certificate chain and key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(certificate), str(key))
    return context


class DashboardServer:
    """A WSGI app served by werkzeug's threaded server in a daemon thread.

    Parameters
    ----------
    app : WSGI application
        E.g. the Flask app of :func:`node.dashboard.app.create_app`.
    host : str
        Bind address (default loopback).
    port : int
        TCP port; 0 picks a free one (see :attr:`address`).
    tls : ssl.SSLContext, optional
        Serve HTTPS (see :func:`tls_context`). The TLS handshake runs in the connection's own
        thread, under the handler's socket timeout, not in the accept loop.
    """

    def __init__(
        self,
        app: WSGIApplication,
        host: str = "127.0.0.1",
        port: int = 8080,
        *,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        try:
            self._server: BaseWSGIServer = make_server(
                host, port, app, threaded=True, request_handler=_Handler
            )
        except SystemExit as err:  # werkzeug exits the process when the port is taken
            raise OSError(f"dashboard cannot listen on {host}:{port} (in use?)") from err
        if tls is not None:
            # werkzeug would wrap with do_handshake_on_connect=True: the handshake would then run
            # in accept(), where one silent client blocks every other (issue 17, row 1)
            self._server.socket = tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
            self._server.ssl_context = tls  # werkzeug then sets wsgi.url_scheme to https
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dashboard", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        scheme = "http" if self._server.ssl_context is None else "https"
        return f"{scheme}://{host}:{port}"

    def start(self) -> DashboardServer:
        self._thread.start()
        logger.info("dashboard on %s", self.url)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def requeue_failed_outputs(outbox: Outbox, index: Index, study_uid: str) -> str:
    """Re-queue the failed outbox items of a study's analysis (a ``requeue`` action).

    Parameters
    ----------
    outbox : node.dispatch.Outbox
    index : node.index.Index
    study_uid : str

    Returns
    -------
    str
        The message shown on the dashboard.
    """
    ids = [
        r[0]
        for r in index.query(
            "SELECT id FROM outbox WHERE state='failed' AND reason=?", (outbox_reason(study_uid),)
        )
    ]
    n = outbox.requeue(ids) if ids else 0
    index.add_event("outbox_requeued", study_uid=study_uid, detail=f"{n} object(s) from dashboard")
    return f"{n} object(s) of study {study_uid} queued again"


def reanalyse_action(service: ReanalyseHost, worker: Analyser) -> Callable[[str], str]:
    """A ``reanalyse(study_uid) -> str`` action running the analysis in the node's scheduler.

    Parameters
    ----------
    service : node.protocols.ReanalyseHost
        The node's ``index`` and ``scheduler`` (a thread of its pool runs the analysis, which
        itself runs in the worker's child process).
    worker : node.protocols.Analyser
        The node's :class:`node.worker.AnalysisWorker`.

    Notes
    -----
    An ``analysis_requeued`` event marks the study *analysing* on the worklist until the
    worker records the outcome.
    """
    from node.analysis import patient_of_study

    def reanalyse(study_uid: str) -> str:
        patient_row = patient_of_study(service.index, study_uid)
        if patient_row is None:
            return f"study {study_uid} has no patient in the index: nothing to analyse"
        service.index.add_event("analysis_requeued", study_uid=study_uid, detail="from dashboard")
        service.scheduler.add_job(
            run, args=[patient_row, study_uid], id=f"reanalyse-{study_uid}", replace_existing=True
        )
        return f"analysis of study {study_uid} queued"

    def run(patient_row: int, study_uid: str) -> None:
        outcome = worker.analyse(patient_row, study_uid=study_uid)
        if outcome.get("state") == "coalesced":
            service.index.add_event(
                "analysis_coalesced",
                study_uid=study_uid,
                detail="covered by the patient's queued analysis",
            )

    return reanalyse


def start_dashboard(
    service: DashboardHost,
    *,
    reanalyse: Callable[[str], str] | None = None,
    audit: AuditTrail | None = None,
) -> DashboardServer | None:
    """Serve the dashboard of a running :class:`node.service.NodeService` (``None`` if disabled).

    Parameters
    ----------
    service : node.protocols.DashboardHost
        The node's ``settings``, ``index`` and ``outbox``.
    reanalyse : callable, optional
        ``reanalyse(study_uid) -> str``, e.g. ``reanalyse_action(service, worker)``; without it
        no re-analyse button is shown.
    audit : AuditTrail, optional
        The node's audit trail (logins, logouts, patient pages viewed, refused requests).
    """
    section = service.settings.dashboard
    if not section.enabled:
        return None
    actions = DashboardActions(
        requeue=lambda uid: requeue_failed_outputs(service.outbox, service.index, uid),
        reanalyse=reanalyse,
    )
    if not section.password_hash and not section.allow_local_without_login:
        logger.warning(
            "dashboard: no login configured (username, password_hash) and "
            "allow_local_without_login is false: every page answers 403"
        )
    if section.bind_address in ("0.0.0.0", "::") and not section.allowed_hosts:
        logger.warning(
            "dashboard: bound to every interface but no allowed_hosts: requests naming this "
            "host by another name than localhost get 400; list the names clients use"
        )
    app = create_app(service.index, section, actions=actions, audit=audit)
    tls = (
        tls_context(section.certificate, section.key)
        if section.certificate is not None and section.key is not None
        else None
    )
    return DashboardServer(app, section.bind_address, section.port, tls=tls).start()
