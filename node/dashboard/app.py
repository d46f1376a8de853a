"""The dashboard's Flask application: server-rendered pages, no JavaScript.

Pages: worklist (studies and their state, with re-queue and re-analyse buttons), outbox and
retries, per-patient lesion timelines with trend plots (PNG rendered by
:func:`reporting.history.trend_image`), due and missed follow-ups, associations log.

Protections (issue 17, rows 14 and 15):

* ``Host`` allow-list: a request naming a host other than the bind address, ``localhost``,
  ``127.0.0.1`` or ``[::1]`` with the dashboard's port, or a configured ``allowed_hosts`` name,
  gets an empty 400 (a DNS-rebinding page in a browser cannot read the dashboard);
* login: every client logs in with the configured user and password hash (werkzeug's
  ``generate_password_hash`` format), unless ``allow_local_without_login`` is set on purpose
  (then loopback clients are let in). Without a configured login, clients that must log in get
  403 and no page content;
* login throttling (:class:`LoginThrottle`): after ``login_max_failures`` failures from a client
  address or for a user name, logins are refused with 429 and ``Retry-After`` for a lock-out that
  doubles with each further failure;
* sessions are held server-side (:class:`SessionStore`): the signed cookie carries only a random
  session id, which logout (or ``session_lifetime_s``) removes, so an old cookie is refused;
* cookies are ``HttpOnly`` and ``SameSite=Strict``, and ``Secure`` when the dashboard serves
  HTTPS itself (``certificate``/``key``), when ``secure_cookies`` is set (a TLS reverse proxy in
  front), or when the WSGI request is ``https``;
* every response carries a Content-Security-Policy restricted to ``'self'`` (no inline style or
  script; the style sheet is served by :func:`create_app`'s ``/dashboard.css``),
  ``X-Content-Type-Options: nosniff``, ``X-Frame-Options: DENY``, ``Referrer-Policy: no-referrer``
  and ``Cache-Control: no-store``.

Actions are POST forms with a per-session CSRF token. Logs name no user password and no patient
identifier (client addresses only; never the Host header or a user name).

Note: behind a reverse proxy every client looks local; keep ``allow_local_without_login = false``
there, and name the proxy's host in ``allowed_hosts``.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flask import (
    Flask,
    Request,
    Response,
    abort,
    flash,
    has_request_context,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface
from werkzeug.security import check_password_hash
from werkzeug.wrappers.response import Response as BaseResponse

from node import followup, timeline
from node.audit import (
    LOGIN,
    LOGOUT,
    MINOR_FAILURE,
    PATIENT_RECORD,
    SECURITY_ALERT,
    SUCCESS,
    USE_OF_RESTRICTED_FUNCTION,
    USER_AUTHENTICATION,
    AuditTrail,
    Code,
    NoAudit,
    Participant,
    patient_object,
)
from node.config import DashboardSection, _is_loopback
from node.dashboard.state import study_states
from node.index import Index

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DashboardActions:
    """Callbacks the running node provides for the buttons; each returns a message to show.

    ``requeue(study_uid)``: put the study's failed outputs back in the outbox.
    ``reanalyse(study_uid)``: run the analysis of the study's patient again (in the background).
    """

    requeue: Callable[[str], str] | None = None
    reanalyse: Callable[[str], str] | None = None


#: the dashboard's style sheet (served at ``/dashboard.css``: the CSP allows no inline style)
STYLE = """body { font-family: sans-serif; margin: 1em 2em; font-size: 14px; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #eee; }
.state-failed { color: #b00; font-weight: bold; }
.state-sent { color: #070; }
.state-missed { color: #b00; font-weight: bold; }
.uid { font-family: monospace; font-size: 11px; }
form.inline { display: inline; }
"""

#: headers on every response
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'none'; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _host_allowed(
    host_header: str, *, server_port: str, default_port: str, extra: tuple[str, ...], bind: str
) -> bool:
    """Whether an HTTP ``Host`` header names the dashboard (see :func:`create_app`).

    Parameters
    ----------
    host_header : str
        The header as sent (``name``, ``name:port``, ``[v6]`` or ``[v6]:port``).
    server_port : str
        The port the dashboard listens on (WSGI ``SERVER_PORT``).
    default_port : str
        The scheme's port (80 or 443), meant when the header names no port.
    extra : tuple of str
        Configured names (lower case), ``name`` (any port) or ``name:port``.
    bind : str
        The bind address.
    """
    host = host_header.strip().lower()
    if host.startswith("["):
        name, bracket, rest = host.partition("]")
        name += bracket
        port = rest[1:] if rest.startswith(":") else rest
    else:
        name, _, port = host.partition(":")
    if (
        not name
        or (port and not port.isdigit())
        or not all(c.isalnum() or c in "-._[]:" for c in name)
    ):
        return False
    if name in extra or (port and f"{name}:{port}" in extra):
        return True
    bind = bind.lower()
    local = {"localhost", "127.0.0.1", "[::1]", f"[{bind}]" if ":" in bind else bind}
    return name in local and (port or default_port) == server_port


@dataclass
class _Failures:
    count: int = 0
    locked_until: float = 0.0
    last: float = 0.0


@dataclass
class LoginThrottle:
    """Failed-login accounting per client address and per user name (thread-safe).

    After ``max_failures`` failures for a key, each further attempt is refused until the
    lock-out ends; the lock-out is ``lockout_s`` after the ``max_failures``-th failure and
    doubles with every later failure, up to ``lockout_max_s``. A success clears the user's and
    the address's counts; a key idle for ``lockout_max_s`` is forgotten.
    """

    max_failures: int = 5
    lockout_s: float = 30.0
    lockout_max_s: float = 3600.0
    clock: Callable[[], float] = time.monotonic
    _keys: dict[str, _Failures] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def retry_after(self, *keys: str) -> float:
        """Seconds until a login for these keys may be tried again (0: now)."""
        now = self.clock()
        with self._lock:
            self._forget(now)
            return max([self._keys[k].locked_until - now for k in keys if k in self._keys] + [0.0])

    def failed(self, *keys: str) -> None:
        """Count a failed login for each key."""
        now = self.clock()
        with self._lock:
            for key in keys:
                entry = self._keys.setdefault(key, _Failures())
                entry.count += 1
                entry.last = now
                if entry.count >= self.max_failures:
                    delay = self.lockout_s * 2.0 ** min(entry.count - self.max_failures, 30)
                    entry.locked_until = now + min(delay, self.lockout_max_s)

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._keys.pop(key, None)

    def _forget(self, now: float) -> None:
        if len(self._keys) < 1024:
            return
        for key in [
            k
            for k, e in self._keys.items()
            if e.locked_until <= now and now - e.last > self.lockout_max_s
        ]:
            del self._keys[key]


@dataclass
class SessionStore:
    """Logged-in sessions held server-side: ``session id -> (user, expiry)`` (thread-safe)."""

    lifetime_s: float = 43200.0
    clock: Callable[[], float] = time.monotonic
    _sessions: dict[str, tuple[str, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, user: str) -> str:
        sid = secrets.token_urlsafe(32)
        now = self.clock()
        with self._lock:
            for key in [k for k, (_, end) in self._sessions.items() if end <= now]:
                del self._sessions[key]
            self._sessions[sid] = (user, now + self.lifetime_s)
        return sid

    def user(self, sid: object) -> str | None:
        """The user of a live session id, else ``None``."""
        if not isinstance(sid, str):
            return None
        with self._lock:
            entry = self._sessions.get(sid)
            if entry is None:
                return None
            if entry[1] <= self.clock():
                del self._sessions[sid]
                return None
            return entry[0]

    def close(self, sid: object) -> None:
        if isinstance(sid, str):
            with self._lock:
                self._sessions.pop(sid, None)


class _SessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie session, ``Secure`` whenever the request came over TLS."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return bool(app.config["SESSION_COOKIE_SECURE"]) or (
            has_request_context() and request.is_secure
        )


def _client_key(req: Request) -> str:
    return f"addr:{req.remote_addr or '?'}"


def _patient_labels(index: Index) -> dict[int, str]:
    return {
        r["id"]: f"#{r['id']} {r['patient_id']}"
        for r in index.query("SELECT id, patient_id FROM patients")
    }


def _ts(value: float | None) -> str:
    if value is None:
        return ""
    return dt.datetime.fromtimestamp(float(value), dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _num(value: float | None, scale: float = 1.0) -> str:
    return "" if value is None else f"{float(value) * scale:.3g}"


def _rel(change: dict[str, Any] | None) -> str:
    if not change or change.get("relative") is None:
        return ""
    mark = "*" if change.get("beyond_repeatability") else ""
    return f" ({change['relative'] * 100:+.0f} %{mark})"


def create_app(
    index: Index,
    section: DashboardSection | None = None,
    *,
    actions: DashboardActions | None = None,
    audit: AuditTrail | None = None,
) -> Flask:
    """Build the dashboard application over a node's index.

    Parameters
    ----------
    index : Index
        The node's index (read; the timeline and follow-up tables are created if missing).
    section : DashboardSection, optional
        Access settings (default: bound to 127.0.0.1, every client logs in).
    actions : DashboardActions, optional
        Button callbacks; a button without a callback is not shown.
    audit : AuditTrail, optional
        Where logins, logouts, refused requests and patient pages viewed are recorded.

    Returns
    -------
    flask.Flask
    """
    section = section or DashboardSection()
    actions = actions or DashboardActions()
    trail = audit or NoAudit()
    timeline.ensure_schema(index)
    followup.ensure_schema(index)
    app = Flask(__name__)
    key = os.environ.get(section.secret_key_env, "") if section.secret_key_env else ""
    app.secret_key = key or secrets.token_bytes(32)
    app.session_interface = _SessionInterface()
    app.config.update(
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=section.tls or section.secure_cookies,
    )
    app.jinja_env.filters.update(ts=_ts, num=_num, rel=_rel)
    throttle = LoginThrottle(
        section.login_max_failures, section.login_lockout_s, section.login_lockout_max_s
    )
    sessions = SessionStore(section.session_lifetime_s)

    def csrf_token() -> str:
        if "csrf" not in session:
            session["csrf"] = secrets.token_urlsafe(24)
        return str(session["csrf"])

    def check_csrf() -> None:
        sent = request.form.get("csrf", "")
        if not sent or not hmac.compare_digest(sent, str(session.get("csrf", ""))):
            abort(400, description="missing or wrong form token")

    def logged_in_user() -> str | None:
        user = sessions.user(session.get("sid"))
        return user if user and section.username and user == section.username else None

    def client(user: str | None = None) -> Participant:
        """The browser's user as an audit participant."""
        name = user or logged_in_user() or "anonymous (loopback, no login)"
        return Participant(name, requestor=True, host=request.remote_addr)

    def audit_login(event_type: Code, outcome: int, user: str, description: str | None) -> None:
        trail.event(
            USER_AUTHENTICATION,
            outcome=outcome,
            action="E",
            event_types=(event_type,),
            description=description,
            participants=(client(user[:64] or "-"), trail.node()),
        )

    def authorised() -> bool:
        if section.allow_local_without_login and _is_loopback(request.remote_addr):
            return True
        return logged_in_user() is not None

    @app.before_request
    def _guard() -> BaseResponse | None:
        if not _host_allowed(
            request.environ.get("HTTP_HOST", ""),
            server_port=str(request.environ.get("SERVER_PORT", "")),
            default_port="443" if request.is_secure else "80",
            extra=section.allowed_hosts,
            bind=section.bind_address,
        ):
            logger.warning(
                "dashboard: refused a request from %s naming an unknown Host (%d characters)",
                request.remote_addr,
                len(request.environ.get("HTTP_HOST", "")),
            )
            trail.event(
                SECURITY_ALERT,
                outcome=MINOR_FAILURE,
                action="E",
                event_types=(USE_OF_RESTRICTED_FUNCTION,),
                description="dashboard request naming an unknown Host refused (DNS rebinding?)",
                participants=(client("unknown"), trail.node()),
            )
            return Response(b"", status=400, mimetype="text/plain")
        if request.endpoint in ("login", "style") or authorised():
            return None
        if section.password_hash:
            # the target is kept in the signed session, not echoed in the redirect
            session["next"] = request.path if request.method == "GET" else "/"
            return redirect(url_for("login"))
        logger.warning(
            "dashboard: refused %s %s from %s (no login configured)",
            request.method,
            request.path,
            request.remote_addr,
        )
        abort(403)
        return None

    @app.after_request
    def _security_headers(response: Response) -> Response:
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.errorhandler(403)
    def _forbidden(_err: Exception) -> tuple[str, int]:
        return "Forbidden: log in (a dashboard user and password must be configured).\n", 403

    @app.route("/dashboard.css")
    def style() -> Response:
        return Response(STYLE, mimetype="text/css")

    @app.route("/login", methods=["GET", "POST"])
    def login() -> str | BaseResponse | tuple[str, int, dict[str, str]]:
        error = ""
        if request.method == "POST":
            check_csrf()
            user = request.form.get("username", "")
            password = request.form.get("password", "")
            keys = (_client_key(request), f"user:{user[:256]}")
            wait = throttle.retry_after(*keys)
            if wait > 0:
                logger.warning("dashboard: login refused (locked out) from %s", request.remote_addr)
                audit_login(LOGIN, MINOR_FAILURE, user, "refused: locked out after failed logins")
                return (
                    "Too many failed logins: try again later.\n",
                    429,
                    {"Retry-After": str(max(1, math.ceil(wait)))},
                )
            if (
                section.password_hash
                and hmac.compare_digest(user.encode(), section.username.encode())
                and check_password_hash(section.password_hash, password)
            ):
                throttle.succeeded(*keys)
                target = str(session.get("next") or url_for("worklist"))
                sessions.close(session.get("sid"))
                session.clear()
                session["sid"] = sessions.open(user)
                session["user"] = user
                logger.info("dashboard: login from %s", request.remote_addr)
                audit_login(LOGIN, SUCCESS, user, None)
                return redirect(
                    target
                    if target.startswith("/") and not target.startswith("//")
                    else url_for("worklist")
                )
            throttle.failed(*keys)
            logger.warning("dashboard: failed login from %s", request.remote_addr)
            audit_login(LOGIN, MINOR_FAILURE, user, "wrong user name or password")
            error = "Wrong user or password." if section.password_hash else "No login configured."
        return render_template("login.html", csrf=csrf_token(), error=error)

    @app.route("/logout")
    def logout() -> BaseResponse:
        user = logged_in_user()
        if user is not None:
            audit_login(LOGOUT, SUCCESS, user, None)
        sessions.close(session.get("sid"))
        session.clear()
        return redirect(url_for("login"))

    @app.route("/")
    def worklist() -> str:
        return render_template(
            "worklist.html",
            studies=study_states(index),
            patients=_patient_labels(index),
            csrf=csrf_token(),
            can_requeue=actions.requeue is not None,
            can_reanalyse=actions.reanalyse is not None,
        )

    def _run_action(callback: Callable[[str], str] | None, study_uid: str) -> BaseResponse:
        check_csrf()
        if callback is None:
            abort(404)
        if not index.query("SELECT 1 FROM studies WHERE study_uid=?", (study_uid,)):
            abort(404)
        flash(callback(study_uid))
        return redirect(url_for("worklist"))

    @app.route("/studies/<study_uid>/requeue", methods=["POST"])
    def requeue(study_uid: str) -> BaseResponse:
        return _run_action(actions.requeue, study_uid)

    @app.route("/studies/<study_uid>/reanalyse", methods=["POST"])
    def reanalyse(study_uid: str) -> BaseResponse:
        return _run_action(actions.reanalyse, study_uid)

    @app.route("/outbox")
    def outbox() -> str:
        rows = index.query("SELECT * FROM outbox ORDER BY id DESC LIMIT 500")
        counts = {
            r[0]: r[1] for r in index.query("SELECT state, COUNT(*) FROM outbox GROUP BY state")
        }
        return render_template("outbox.html", rows=rows, counts=counts)

    @app.route("/patients")
    def patients() -> str:
        return render_template(
            "patients.html", courses=timeline.courses(index), patients=_patient_labels(index)
        )

    @app.route("/patients/<int:patient_row>")
    def patient(patient_row: int) -> str:
        labels = _patient_labels(index)
        if patient_row not in labels:
            abort(404)
        for patient_id, patient_name in index.query(
            "SELECT patient_id, patient_name FROM patients WHERE id=?", (patient_row,)
        ):
            trail.event(
                PATIENT_RECORD,
                action="R",
                participants=(client(), trail.node()),
                objects=[patient_object(str(patient_id), patient_name)],
            )
        lesions: dict[tuple[str, str], dict[str, Any]] = {}
        for point in timeline.timeline(index, patient_row):
            lesion = lesions.setdefault(
                (point.course_uid, point.tracking_uid),
                {
                    "course_uid": point.course_uid,
                    "tracking_uid": point.tracking_uid,
                    "tracking_id": point.tracking_id,
                    "vertebral_level": point.vertebral_level,
                    "points": [],
                },
            )
            lesion["points"].append(point)
        return render_template(
            "patient.html",
            label=labels[patient_row],
            patient_row=patient_row,
            lesions=list(lesions.values()),
            windows=followup.windows(index, patient_row),
            patients=labels,
        )

    @app.route("/patients/<int:patient_row>/lesions/<tracking_uid>/trend.png")
    def trend(patient_row: int, tracking_uid: str) -> Response:
        from reporting.history import trend_image

        points = timeline.timeline(index, patient_row, tracking_uid=tracking_uid)
        points = [p for p in points if p.days_since_treatment is not None]
        if not points:
            abort(404)
        course = points[-1].course_uid
        records = [p.as_record() for p in points if p.course_uid == course]
        return Response(trend_image(records, fmt="png"), mimetype="image/png")

    @app.route("/followups")
    def followups() -> str:
        return render_template(
            "followups.html", windows=followup.windows(index), patients=_patient_labels(index)
        )

    @app.route("/associations")
    def associations() -> str:
        rows = index.query("SELECT * FROM associations ORDER BY id DESC LIMIT 200")
        return render_template("associations.html", rows=rows)

    return app
