"""The dashboard's Flask application: server-rendered pages, no JavaScript.

Pages: worklist (studies and their state, with re-queue and re-analyse buttons), outbox and
retries, per-patient lesion timelines with trend plots (PNG rendered by
:func:`reporting.history.trend_image`), due and missed follow-ups, associations log.

Access (:func:`_authorised`): a client on a loopback address is let in without login when
``allow_local_without_login`` (the default; the dashboard is bound to 127.0.0.1 by default);
any other client must log in with the configured user and password hash (werkzeug's
``generate_password_hash`` format). Without a configured login, non-local clients get 403 and no
page content. Actions are POST forms with a per-session CSRF token.

Note: behind a reverse proxy every client looks local; set ``allow_local_without_login = false``
there.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import (
    Flask,
    Response,
    abort,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from werkzeug.security import check_password_hash
from werkzeug.wrappers.response import Response as BaseResponse

from node import followup, timeline
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
) -> Flask:
    """Build the dashboard application over a node's index.

    Parameters
    ----------
    index : Index
        The node's index (read; the timeline and follow-up tables are created if missing).
    section : DashboardSection, optional
        Access settings (default: local only, no login).
    actions : DashboardActions, optional
        Button callbacks; a button without a callback is not shown.

    Returns
    -------
    flask.Flask
    """
    section = section or DashboardSection()
    actions = actions or DashboardActions()
    timeline.ensure_schema(index)
    followup.ensure_schema(index)
    app = Flask(__name__)
    key = os.environ.get(section.secret_key_env, "") if section.secret_key_env else ""
    app.secret_key = key or secrets.token_bytes(32)
    app.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Strict")
    app.jinja_env.filters.update(ts=_ts, num=_num, rel=_rel)

    def csrf_token() -> str:
        if "csrf" not in session:
            session["csrf"] = secrets.token_urlsafe(24)
        return str(session["csrf"])

    def check_csrf() -> None:
        sent = request.form.get("csrf", "")
        if not sent or not hmac.compare_digest(sent, str(session.get("csrf", ""))):
            abort(400, description="missing or wrong form token")

    def authorised() -> bool:
        if section.allow_local_without_login and _is_loopback(request.remote_addr):
            return True
        return bool(section.username) and session.get("user") == section.username

    @app.before_request
    def _guard() -> BaseResponse | None:
        if request.endpoint in ("login", "static") or authorised():
            return None
        if section.password_hash:
            # the target is kept in the signed session, not echoed in the redirect
            session["next"] = request.path if request.method == "GET" else "/"
            return redirect(url_for("login"))
        logger.warning(
            "dashboard: refused %s %s from non-local %s",
            request.method,
            request.path,
            request.remote_addr,
        )
        abort(403)
        return None

    @app.after_request
    def _no_cache(response: Response) -> Response:
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        return response

    @app.errorhandler(403)
    def _forbidden(_err: Exception) -> tuple[str, int]:
        return "Forbidden: log in, or use the dashboard from the node's host.\n", 403

    @app.route("/login", methods=["GET", "POST"])
    def login() -> str | BaseResponse:
        error = ""
        if request.method == "POST":
            check_csrf()
            user = request.form.get("username", "")
            password = request.form.get("password", "")
            if (
                section.password_hash
                and hmac.compare_digest(user, section.username)
                and check_password_hash(section.password_hash, password)
            ):
                target = str(session.get("next") or url_for("worklist"))
                session.clear()
                session["user"] = user
                return redirect(
                    target
                    if target.startswith("/") and not target.startswith("//")
                    else url_for("worklist")
                )
            logger.warning("dashboard: failed login from %s", request.remote_addr)
            error = "Wrong user or password." if section.password_hash else "No login configured."
        return render_template("login.html", csrf=csrf_token(), error=error)

    @app.route("/logout")
    def logout() -> BaseResponse:
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
