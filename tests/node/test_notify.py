"""Notifications (issue 9): webhook to a local HTTP receiver, e-mail to a local SMTP receiver
(aiosmtpd), both on 127.0.0.1 with free ports; failures are reported per channel."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from node.notify import (
    Notification,
    NotificationError,
    Notifier,
    NotifySettings,
    send_email,
    send_webhook,
)


class HttpReceiver:
    """A local webhook endpoint recording every POST (``status`` is what it answers)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.received = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "json": json.loads(body)}
                )
                self.send_response(receiver.status)
                self.end_headers()
                receiver.received.set()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SmtpReceiver:
    """aiosmtpd handler keeping every message."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.received = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(
            {
                "from": envelope.mail_from,
                "to": list(envelope.rcpt_tos),
                "message": message_from_bytes(envelope.content),
            }
        )
        self.received.set()
        return "250 OK"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def http_receiver() -> Iterator[HttpReceiver]:
    receiver = HttpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def smtp_receiver() -> Iterator[tuple[SmtpReceiver, int]]:
    handler = SmtpReceiver()
    port = _free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    yield handler, port
    controller.stop()


NOTE = Notification(
    kind="followup_missed",
    subject="Missed follow-up MRI: patient row 3",
    body="The window passed.",
    data={"patient_row": 3, "window": "6-12 weeks"},
)


def test_webhook_posts_json(http_receiver: HttpReceiver) -> None:
    assert send_webhook(http_receiver.url, NOTE) == 200
    request = http_receiver.requests[0]
    assert request["path"] == "/hook"
    assert request["headers"]["Content-Type"] == "application/json"
    assert request["json"] == {
        "kind": "followup_missed",
        "subject": NOTE.subject,
        "patient_row": 3,
        "window": "6-12 weeks",
    }


def test_webhook_error_status_raises(http_receiver: HttpReceiver) -> None:
    http_receiver.status = 503
    with pytest.raises(NotificationError, match="HTTP 503"):
        send_webhook(http_receiver.url, NOTE)


def test_email_delivered(smtp_receiver: tuple[SmtpReceiver, int]) -> None:
    handler, port = smtp_receiver
    settings = NotifySettings(
        smtp_host="127.0.0.1",
        smtp_port=port,
        mail_from="node@test",
        mail_to=("onc@test", "rad@test"),
    )
    send_email(settings, NOTE)
    (mail,) = handler.messages
    assert mail["from"] == "node@test" and mail["to"] == ["onc@test", "rad@test"]
    assert mail["message"]["Subject"] == NOTE.subject
    assert mail["message"]["X-Spine-Node-Kind"] == "followup_missed"
    assert "The window passed." in mail["message"].get_payload()


def test_notifier_reports_each_channel(
    http_receiver: HttpReceiver, smtp_receiver: tuple[SmtpReceiver, int]
) -> None:
    handler, port = smtp_receiver
    notifier = Notifier(
        NotifySettings(
            webhook_url=http_receiver.url,
            smtp_host="127.0.0.1",
            smtp_port=port,
            mail_to=("onc@test",),
        )
    )
    assert notifier.channels == ("webhook", "email")
    assert [(d.channel, d.ok) for d in notifier.send(NOTE)] == [("webhook", True), ("email", True)]
    # a dead SMTP server fails its channel only
    dead = Notifier(
        NotifySettings(
            webhook_url=http_receiver.url,
            smtp_host="127.0.0.1",
            smtp_port=_free_port(),
            smtp_timeout_s=2,
            mail_to=("onc@test",),
        )
    )
    deliveries = dead.send(NOTE)
    assert [(d.channel, d.ok) for d in deliveries] == [("webhook", True), ("email", False)]
    assert "Connection refused" in deliveries[1].detail or "Errno" in deliveries[1].detail
    assert len(http_receiver.requests) == 2 and len(handler.messages) == 1


def test_settings_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="http"):
        NotifySettings(webhook_url="ftp://x")
    with pytest.raises(ValueError, match="mail_to"):
        NotifySettings(smtp_host="127.0.0.1")
    with pytest.raises(NotificationError, match="password variable"):
        send_email(
            NotifySettings(
                smtp_host="127.0.0.1",
                mail_to=("a@b",),
                smtp_username="u",
                smtp_password_env="SPINE_NODE_TEST_UNSET_VARIABLE",
            ),
            NOTE,
        )
