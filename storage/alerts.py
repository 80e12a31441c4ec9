"""Alerts: degraded, failed and dead runs, told to webhooks and by e-mail.

Two halves that never wait for each other:

- ``enqueue`` runs inside the writer's transaction when a run reaches a final
  status it should be told about: it only inserts rows into ``alerts`` (one
  per sink), so ingest never waits on a receiver;
- ``AlertSender`` is a thread of the ingest process that delivers the pending
  rows, retrying with backoff (1 s, doubling, at most 5 min) up to
  MAX_ATTEMPTS, logging every failure.

At most one alert per (site, region, reason) per ``alerts.every``: a reason
already alerted within that time is not enqueued again. Delivery is
at-least-once: a row is claimed before it is sent, and a sender that dies
after sending but before marking it sent sends it again after the claim lapses.
"""

from __future__ import annotations

import logging
import smtplib
import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from email.message import EmailMessage
from typing import Any, cast

import requests
from pydantic import BaseModel
from sqlalchemy import CursorResult, and_, select, update
from sqlalchemy.orm import Session, sessionmaker

from regions.messages import utcnow
from regions.site import Alerts, Email, Webhook, parse_allow_host
from storage.errors import StorageError
from storage.models import alerts

log = logging.getLogger("geoscrape.alerts")

ALERTED_STATUSES = frozenset({"degraded", "failed", "dead"})
MAX_ATTEMPTS = 12
RETRY_FIRST = 1.0
RETRY_MAX = 300.0
CLAIM_SECONDS = 120.0  # a claimed row is retried after this if its sender vanished
BATCH = 50


class AlertDeliveryError(StorageError):
    """A receiver did not take an alert."""


class Sink(BaseModel):
    """One destination, as stored with each alert row."""

    webhook: Webhook | None = None
    email: Email | None = None
    timeout: float = 10.0


def sinks_of(config: Alerts) -> list[Sink]:
    found = [Sink(webhook=hook, timeout=config.timeout) for hook in config.webhooks]
    if config.email is not None:
        found.append(Sink(email=config.email, timeout=config.timeout))
    return found


def enqueue(
    session: Session,
    *,
    site: str,
    region: str,
    run_id: str,
    status: str,
    reasons: Sequence[tuple[str, str]],  # (reason, detail)
    config: Alerts,
    now: datetime | None = None,
) -> int:
    """Insert the alerts of one run (the caller commits); returns the rows added."""
    now = now or utcnow()
    since = now - timedelta(seconds=config.every)
    added = 0
    sinks = sinks_of(config)
    for reason, detail in reasons:
        recent = session.execute(
            select(alerts.c.id)
            .where(
                alerts.c.site == site,
                alerts.c.region == region,
                alerts.c.reason == reason,
                alerts.c.created_at > since,
            )
            .limit(1)
        ).first()
        if recent is not None:
            continue
        message = {
            "site": site,
            "region": region,
            "run_id": run_id,
            "status": status,
            "reason": reason,
            "detail": detail,
            "at": now.isoformat(),
        }
        for sink in sinks:
            session.execute(
                alerts.insert().values(
                    site=site,
                    region=region,
                    reason=reason,
                    run_id=run_id,
                    sink=sink.model_dump(mode="json", by_alias=True, exclude_none=True),
                    message=message,
                    status="pending",
                    attempts=0,
                    created_at=now,
                    next_attempt_at=now,
                )
            )
            added += 1
    return added


def summary(message: dict[str, Any]) -> str:
    return (
        f"geoscrape: run {message['run_id']} of {message['site']} in {message['region']} "
        f"{message['status']}: {message['reason']}: {message['detail']}"
    )


def _webhook(sink: Sink, message: dict[str, Any]) -> None:
    assert sink.webhook is not None
    body = message if sink.webhook.format == "json" else {"text": summary(message)}
    response = requests.post(sink.webhook.url, json=body, timeout=sink.timeout)
    if not 200 <= response.status_code < 300:
        raise AlertDeliveryError(f"webhook answered HTTP {response.status_code}")


def _mail(sink: Sink, message: dict[str, Any]) -> None:
    email = sink.email
    assert email is not None
    host, port = parse_allow_host(email.smtp)
    mail = EmailMessage()
    mail["From"] = email.sender
    mail["To"] = ", ".join(email.to)
    mail["Subject"] = (
        f"[geoscrape] {message['site']}/{message['region']} {message['status']}: "
        f"{message['reason']}"
    )
    mail.set_content(summary(message))
    with smtplib.SMTP(host, port or 25, timeout=sink.timeout) as smtp:
        if email.starttls:
            smtp.starttls()
        if email.username is not None:
            smtp.login(email.username, email.password or "")
        smtp.send_message(mail)


# One sender per kind of sink (the Sink field that is set).
SENDERS: dict[str, Callable[[Sink, dict[str, Any]], None]] = {
    "webhook": _webhook,
    "email": _mail,
}


def deliver(sink: Sink, message: dict[str, Any]) -> None:
    """Send one alert to one sink; AlertDeliveryError when it is not taken."""
    kind = next(name for name in SENDERS if getattr(sink, name) is not None)
    try:
        SENDERS[kind](sink, message)
    except (requests.RequestException, smtplib.SMTPException, OSError) as exc:
        raise AlertDeliveryError(f"{type(exc).__name__}: {exc}"[:500]) from exc


def deliver_due(sessions: sessionmaker[Session], now: datetime | None = None) -> int:
    """Deliver every pending alert that is due; returns how many were sent."""
    now = now or utcnow()
    with sessions.begin() as session:
        due = session.execute(
            select(alerts.c.id, alerts.c.next_attempt_at)
            .where(alerts.c.status == "pending", alerts.c.next_attempt_at <= now)
            .order_by(alerts.c.id)
            .limit(BATCH)
        ).all()
    sent = 0
    for alert_id, was_due in due:
        with sessions.begin() as session:  # claim it: another ingest may be looking too
            claim = session.execute(
                update(alerts)
                .where(and_(alerts.c.id == alert_id, alerts.c.next_attempt_at == was_due))
                .values(next_attempt_at=now + timedelta(seconds=CLAIM_SECONDS))
            )
            claimed = cast(CursorResult[Any], claim).rowcount
            row = session.execute(select(alerts).where(alerts.c.id == alert_id)).one()
        if not claimed:
            continue
        try:
            deliver(Sink.model_validate(row.sink), row.message)
        except AlertDeliveryError as exc:
            attempts = row.attempts + 1
            gave_up = attempts >= MAX_ATTEMPTS
            delay = min(RETRY_FIRST * 2 ** (attempts - 1), RETRY_MAX)
            log.warning(
                "alert %d (%s/%s %s) not delivered, attempt %d%s: %s",
                alert_id,
                row.site,
                row.region,
                row.reason,
                attempts,
                ", giving up" if gave_up else f", retrying in {delay:g}s",
                exc,
            )
            values: dict[str, Any] = {
                "attempts": attempts,
                "last_error": str(exc),
                "status": "failed" if gave_up else "pending",
                "next_attempt_at": utcnow() + timedelta(seconds=delay),
            }
        else:
            sent += 1
            values = {"attempts": row.attempts + 1, "status": "sent", "sent_at": utcnow()}
        with sessions.begin() as session:
            session.execute(update(alerts).where(alerts.c.id == alert_id).values(values))
    return sent


class AlertSender(threading.Thread):
    """Delivers pending alerts every ``interval`` seconds until stopped."""

    def __init__(self, sessions: sessionmaker[Session], interval: float = 1.0) -> None:
        super().__init__(name="alert-sender", daemon=True)
        self.sessions = sessions
        self.interval = interval
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            try:
                deliver_due(self.sessions)
            except Exception as exc:  # the database away: next round
                log.warning("alert sender: %s: %s", type(exc).__name__, exc)
