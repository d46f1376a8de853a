"""Fault catalogue of issue 17, dashboard rows 14 and 15, probed over real HTTP(S) on 127.0.0.1.

Row 14: a request naming a foreign ``Host`` (DNS rebinding) must get an empty 400, and the patient
pages need a login on loopback too unless ``allow_local_without_login`` is set on purpose.
Row 15: failed logins are throttled (429 + ``Retry-After``) per client address and per user name;
logout invalidates the session server-side (an old cookie is refused); cookies are ``Secure``
over TLS and always ``HttpOnly`` + ``SameSite=Strict``; every response carries the security
headers.

Every network call has a socket timeout, so each test is bounded in time.
"""

from __future__ import annotations

import datetime as dt
import http.client
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from werkzeug.security import generate_password_hash

from node.config import DashboardSection, settings_from_mapping
from node.dashboard import DashboardServer, create_app
from node.index import Index
from tests.node.dicom_factory import PATIENT_ID, PHI_TOKENS
from tests.node.test_followup import add_mr_study

STUDY = "2.25.1701"
USER, PASSWORD = "onc", "s3cret-Passw0rd"
HASH = generate_password_hash(PASSWORD, method="pbkdf2:sha256:20000")
TIMEOUT_S = 10.0


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    db = Index(tmp_path / "index.sqlite3")
    add_mr_study(db, STUDY, dt.date(2026, 1, 5))
    yield db
    db.close()


def _serve(index: Index, section: DashboardSection, tls: ssl.SSLContext | None = None):  # noqa: ANN202
    app = create_app(index, section)
    if tls is None:  # (the call of the code before issue 17, so that each test fails alone)
        return DashboardServer(app, "127.0.0.1", 0).start()
    return DashboardServer(app, "127.0.0.1", 0, tls=tls).start()


def _request(
    server: DashboardServer,
    path: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: str | None = None,
    tls: bool = False,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    host, port = server.address
    conn: http.client.HTTPConnection
    if tls:
        conn = http.client.HTTPSConnection(
            host, port, timeout=TIMEOUT_S, context=ssl._create_unverified_context()
        )
    else:
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def _no_phi(body: bytes) -> None:
    text = body.decode("latin-1")
    for token in (*PHI_TOKENS, STUDY):
        assert token not in text


def _session_cookie(headers: http.client.HTTPMessage) -> str:
    (cookie,) = [c for c in headers.get_all("Set-Cookie") or [] if c.startswith("session=")]
    return cookie


def _cookie_value(set_cookie: str) -> str:
    return set_cookie.split(";", 1)[0]


def _login_form(server: DashboardServer, *, tls: bool = False) -> tuple[str, str]:
    """GET /login: (cookie header value, CSRF token)."""
    status, headers, body = _request(server, "/login", tls=tls)
    assert status == 200
    token = body.decode().split('name="csrf" value="')[1].split('"')[0]
    return _cookie_value(_session_cookie(headers)), token


def _post_login(
    server: DashboardServer, cookie: str, token: str, user: str, password: str
) -> tuple[int, http.client.HTTPMessage, bytes]:
    from urllib.parse import urlencode

    return _request(
        server,
        "/login",
        method="POST",
        headers={"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"},
        body=urlencode({"csrf": token, "username": user, "password": password}),
    )


# --- row 14 ---------------------------------------------------------------------------------


def test_row14_foreign_host_header_gets_an_empty_400(index: Index) -> None:
    """DNS rebinding: a page of attacker.example resolving to 127.0.0.1 must read nothing, even
    with ``allow_local_without_login`` on; the node's own names still work."""
    section = DashboardSection(allow_local_without_login=True, allowed_hosts=("node.example",))
    server = _serve(index, section)
    try:
        port = server.address[1]
        for host in ("attacker.example", f"attacker.example:{port}", f"localhost:{port + 1}", ""):
            for path in ("/", "/patients/1", "/login", "/nope"):
                status, headers, body = _request(server, path, headers={"Host": host})
                assert (status, body) == (400, b""), (host, path)
                assert headers["X-Frame-Options"] == "DENY"
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "node.example"):
            status, _, body = _request(server, "/", headers={"Host": host})
            assert status == 200, host
            assert PATIENT_ID.encode() in body  # the page the foreign Host must not get
    finally:
        server.stop()


def test_row14_loopback_needs_a_login_by_default(index: Index) -> None:
    assert DashboardSection().allow_local_without_login is False
    with_login = _serve(index, DashboardSection(username=USER, password_hash=HASH))
    without_login = _serve(index, DashboardSection())
    try:
        for path in ("/", "/outbox", "/patients", "/patients/1", "/followups", "/associations"):
            status, headers, body = _request(with_login, path)
            assert status == 302 and headers["Location"] == "/login", path
            _no_phi(body)
            status, _, body = _request(without_login, path)
            assert status == 403, path
            _no_phi(body)
    finally:
        with_login.stop()
        without_login.stop()


# --- row 15 ---------------------------------------------------------------------------------


def test_row15_failed_logins_are_throttled(index: Index) -> None:
    """30 wrong passwords in a burst: the first ``login_max_failures`` are answered, the rest
    get 429 with Retry-After, the right password included, until the lock-out ends."""
    section = DashboardSection(
        username=USER, password_hash=HASH, login_max_failures=5, login_lockout_s=1.5
    )
    server = _serve(index, section)
    try:
        cookie, token = _login_form(server)
        statuses = []
        for _ in range(30):
            status, headers, body = _post_login(server, cookie, token, USER, "wrong")
            statuses.append(status)
            _no_phi(body)
            if status == 429:
                assert 1 <= int(headers["Retry-After"]) <= 2
        assert statuses == [200] * 5 + [429] * 25
        # locked out: the right password is refused too, and so is another user from this address
        assert _post_login(server, cookie, token, USER, PASSWORD)[0] == 429
        assert _post_login(server, cookie, token, "someone", "x")[0] == 429
        time.sleep(1.6)
        status, headers, _ = _post_login(server, cookie, token, USER, PASSWORD)
        assert status == 302 and headers["Location"] == "/"
    finally:
        server.stop()


def test_row15_throttle_per_user_name_and_backoff() -> None:
    """Per user name from any address, per address for any name; the lock-out doubles up to
    its maximum (a fake clock)."""
    from node.dashboard.app import LoginThrottle

    now = [0.0]
    throttle = LoginThrottle(3, 10.0, 35.0, clock=lambda: now[0])
    for i in range(3):
        throttle.failed(f"addr:10.0.0.{i}", "user:onc")  # three addresses, one user
    assert throttle.retry_after("addr:10.0.0.9", "user:onc") == 10.0
    assert throttle.retry_after("addr:10.0.0.9", "user:other") == 0.0
    throttle.failed("addr:10.0.0.9", "user:onc")
    assert throttle.retry_after("user:onc") == 20.0
    throttle.failed("addr:10.0.0.9", "user:onc")
    assert throttle.retry_after("user:onc") == 35.0  # capped
    now[0] = 36.0
    assert throttle.retry_after("user:onc") == 0.0
    throttle.succeeded("user:onc")
    throttle.failed("user:onc")
    assert throttle.retry_after("user:onc") == 0.0  # counting starts again after a success


def test_row15_old_session_cookie_is_refused_after_logout(index: Index) -> None:
    server = _serve(index, DashboardSection(username=USER, password_hash=HASH))
    try:
        cookie, token = _login_form(server)
        status, headers, _ = _post_login(server, cookie, token, USER, PASSWORD)
        assert status == 302
        logged_in = _cookie_value(_session_cookie(headers))
        status, _, body = _request(server, "/", headers={"Cookie": logged_in})
        assert status == 200 and PATIENT_ID.encode() in body
        assert _request(server, "/logout", headers={"Cookie": logged_in})[0] == 302
        # the cookie captured before the logout, replayed
        status, headers, body = _request(server, "/", headers={"Cookie": logged_in})
        assert status == 302 and headers["Location"] == "/login"
        _no_phi(body)
        # the pre-login cookie never was a login
        assert _request(server, "/", headers={"Cookie": cookie})[0] == 302
    finally:
        server.stop()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed")
    d = tmp_path_factory.mktemp("dashboard-tls")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],  # fmt: skip
        cwd=d,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return d / "cert.pem", d / "key.pem"


def test_row15_cookies_secure_over_tls(index: Index, certificate: tuple[Path, Path]) -> None:
    from node.dashboard import tls_context

    cert, key = certificate
    section = DashboardSection(username=USER, password_hash=HASH, certificate=cert, key=key)
    server = _serve(index, section, tls=tls_context(cert, key))
    try:
        assert server.url.startswith("https://127.0.0.1:")
        # a client that connects and never starts the handshake does not block the others
        with socket.create_connection(server.address, timeout=TIMEOUT_S):
            started = time.monotonic()
            status, headers, _ = _request(server, "/login", tls=True)
            assert status == 200 and time.monotonic() - started < 5
        flags = [f.strip().lower() for f in _session_cookie(headers).split(";")[1:]]
        assert {"secure", "httponly", "samesite=strict"} <= set(flags)
    finally:
        server.stop()
    # plain HTTP: HttpOnly and SameSite=Strict; Secure when a TLS proxy says the request was https
    client = create_app(index, DashboardSection()).test_client()
    flags = client.get("/login").headers["Set-Cookie"].lower()
    assert "httponly" in flags and "samesite=strict" in flags and "secure" not in flags
    client = create_app(index, DashboardSection()).test_client()
    flags = client.get("/login", base_url="https://localhost").headers["Set-Cookie"].lower()
    assert re.search(r";\s*secure", flags)
    # a TLS reverse proxy in front: secure_cookies
    client = create_app(index, DashboardSection(secure_cookies=True)).test_client()
    assert re.search(r";\s*secure", client.get("/login").headers["Set-Cookie"].lower())


def test_row15_security_headers_on_every_response(index: Index) -> None:
    from node.dashboard.app import SECURITY_HEADERS

    section = DashboardSection(username=USER, password_hash=HASH, login_max_failures=1)
    server = _serve(index, section)
    try:
        cookie, token = _login_form(server)
        responses = [
            _request(server, "/login"),
            _request(server, "/dashboard.css"),
            _request(server, "/"),  # 302 to the login
            _request(server, "/", headers={"Host": "attacker.example"}),  # 400
            _post_login(server, cookie, token, USER, "wrong"),  # 200, counted
            _post_login(server, cookie, token, USER, "wrong"),  # 429
        ]
        assert [r[0] for r in responses] == [200, 200, 302, 400, 200, 429]
        for status, headers, _ in responses:
            for name, value in SECURITY_HEADERS.items():
                assert headers[name] == value, (status, name)
        csp = SECURITY_HEADERS["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    finally:
        server.stop()
    # a 403 and a 404 too
    client = create_app(index, DashboardSection(allow_local_without_login=True)).test_client()
    no_login = create_app(index, DashboardSection()).test_client()
    for response in (client.get("/patients/99"), no_login.get("/")):
        assert response.status_code in (403, 404)
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Referrer-Policy"] == "no-referrer"


def test_dashboard_settings_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="allowed_hosts"):
        DashboardSection(allowed_hosts=("evil/x",))
    with pytest.raises(ValueError, match="certificate and key go together"):
        DashboardSection(certificate=tmp_path / "c.pem")
    with pytest.raises(ValueError, match="does not exist"):
        DashboardSection(certificate=tmp_path / "c.pem", key=tmp_path / "k.pem")
    with pytest.raises(ValueError, match="login_lockout_max_s"):
        DashboardSection(login_lockout_s=60, login_lockout_max_s=10)
    settings = settings_from_mapping(
        {
            "node": {"storage": str(tmp_path / "s")},
            "dashboard": {"allowed_hosts": ["Node.Example:8443"]},
        }
    )
    assert settings.dashboard.allowed_hosts == ("node.example:8443",)
