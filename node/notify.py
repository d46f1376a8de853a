"""Notifications of the node: an HTTP webhook (JSON POST) and e-mail through an SMTP server.

Used for missed follow-up windows and due confirmation scans (:mod:`node.followup`). A
notification carries no patient name, ID or birth date: the patient is named by the index's
patient row and the course/study UIDs, which an authorised user resolves on the dashboard.

The SMTP password is never written in the configuration file: ``smtp_password_env`` names the
environment variable holding it.

References
----------
RFC 5321 (SMTP), RFC 3207 (STARTTLS), RFC 8259 (JSON).
"""

from __future__ import annotations

import json
import logging
import os
import smtplib
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from node.config import NotifySettings

logger = logging.getLogger(__name__)


class NotificationError(RuntimeError):
    """A notification could not be delivered on one channel; the message says where and why."""


@dataclass(frozen=True)
class Notification:
    """One message: ``kind`` (e.g. ``followup_missed``), subject, plain-text body and data.

    ``data`` is sent as the webhook's JSON body (with ``kind`` and ``subject``) and must hold no
    patient name, ID or birth date.
    """

    kind: str
    subject: str
    body: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Delivery:
    """Outcome on one channel (``webhook`` or ``email``)."""

    channel: str
    ok: bool
    detail: str


def send_webhook(url: str, notification: Notification, *, timeout_s: float = 10.0) -> int:
    """POST the notification as JSON; return the HTTP status (2xx).

    Raises
    ------
    NotificationError
        On a connection error or a non-2xx status.
    """
    payload = json.dumps(
        {"kind": notification.kind, "subject": notification.subject, **notification.data},
        sort_keys=True,
        default=str,
    ).encode()
    request = urllib.request.Request(
        url,
        data=payload,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "spine-response-node"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            status = int(response.status)
    except urllib.error.HTTPError as err:
        raise NotificationError(f"webhook {url}: HTTP {err.code}") from err
    except (urllib.error.URLError, OSError) as err:
        raise NotificationError(f"webhook {url}: {err}") from err
    if not 200 <= status < 300:
        raise NotificationError(f"webhook {url}: HTTP {status}")
    return status


def send_email(settings: NotifySettings, notification: Notification) -> None:
    """Send the notification as a plain-text e-mail through the configured SMTP server.

    Raises
    ------
    NotificationError
        On a connection, TLS, authentication or refusal error, or a missing password variable.
    """
    message = EmailMessage()
    message["From"] = settings.mail_from
    message["To"] = ", ".join(settings.mail_to)
    message["Subject"] = notification.subject
    message["X-Spine-Node-Kind"] = notification.kind
    message.set_content(notification.body)
    password = ""
    if settings.smtp_username:
        if not settings.smtp_password_env or settings.smtp_password_env not in os.environ:
            raise NotificationError(
                f"smtp: password variable {settings.smtp_password_env!r} is not set"
            )
        password = os.environ[settings.smtp_password_env]
    try:
        if settings.smtp_security == "tls":
            client: smtplib.SMTP = smtplib.SMTP_SSL(
                settings.smtp_host,
                settings.smtp_port,
                timeout=settings.smtp_timeout_s,
                context=ssl.create_default_context(),
            )
        else:
            client = smtplib.SMTP(
                settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout_s
            )
        with client:
            if settings.smtp_security == "starttls":
                client.starttls(context=ssl.create_default_context())
            if settings.smtp_username:
                client.login(settings.smtp_username, password)
            client.send_message(message)
    except (smtplib.SMTPException, OSError) as err:
        raise NotificationError(
            f"smtp {settings.smtp_host}:{settings.smtp_port}: {type(err).__name__}: {err}"
        ) from err


class Notifier:
    """Delivers notifications on every configured channel.

    Parameters
    ----------
    settings : NotifySettings
    """

    def __init__(self, settings: NotifySettings) -> None:
        self.settings = settings

    @property
    def channels(self) -> tuple[str, ...]:
        """Configured channels, ``webhook`` and/or ``email``."""
        out = []
        if self.settings.webhook_url:
            out.append("webhook")
        if self.settings.smtp_host:
            out.append("email")
        return tuple(out)

    def send(self, notification: Notification) -> list[Delivery]:
        """Deliver on every channel; a failed channel does not stop the others.

        Returns
        -------
        list of Delivery
            One per configured channel (empty when none is configured).
        """
        deliveries = []
        if self.settings.webhook_url:
            try:
                status = send_webhook(
                    self.settings.webhook_url,
                    notification,
                    timeout_s=self.settings.webhook_timeout_s,
                )
                deliveries.append(Delivery("webhook", True, f"HTTP {status}"))
            except NotificationError as err:
                logger.warning("notification %s not delivered: %s", notification.kind, err)
                deliveries.append(Delivery("webhook", False, str(err)))
        if self.settings.smtp_host:
            try:
                send_email(self.settings, notification)
                deliveries.append(Delivery("email", True, f"to {len(self.settings.mail_to)}"))
            except NotificationError as err:
                logger.warning("notification %s not delivered: %s", notification.kind, err)
                deliveries.append(Delivery("email", False, str(err)))
        return deliveries
