"""Per-region broker users: one least-privilege RabbitMQ user per declared region.

A regional worker may do exactly two things on the bus, and its user allows
nothing else (RabbitMQ permission regexes, per vhost):

    configure  ^$                     declare/delete nothing (queues are pre-declared)
    write      ^ingest$               publish to the `ingest` exchange only (results,
                                      heartbeats); not `scrape`, not the default exchange
    read       ^scrape\\.<region>$    consume its own queue only

Everything is applied as one RabbitMQ definitions document: the vhost, the
topology (exchanges, queues, bindings, so workers never need to declare), the
users (password hashes only) and their permissions. `apply` feeds it to
`rabbitmqctl import_definitions` on the broker's host (no management plugin
needed, no password on a command line); `export` writes the same JSON for
`rabbitmqctl import_definitions FILE` or the management UI elsewhere.

Passwords come from GEOSCRAPE_BROKER_PASSWORD_<REGION> (region upper-cased,
'-' as '_'); otherwise a new user gets a generated one, returned so the CLI
can print it once. An existing user without such a variable keeps its password.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from regions.bus import (
    DEAD_EXCHANGE,
    DEAD_QUEUE,
    INGEST_EXCHANGE,
    INGEST_QUEUE,
    SCRAPE_EXCHANGE,
    scrape_queue,
)
from regions.errors import RegionsError
from regions.settings import BROKER_PASSWORD_PREFIX, per_region_env

PASSWORD_ENV_PREFIX = BROKER_PASSWORD_PREFIX
DEFAULT_USER_PREFIX = "geoscrape-"
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"


class ProvisionError(RegionsError):
    """Broker users could not be planned or applied."""


@dataclass(frozen=True)
class Permissions:
    configure: str
    write: str
    read: str


def region_permissions(region: str) -> Permissions:
    """The least-privilege permission regexes of `region`'s worker user."""
    return Permissions(
        configure="^$",
        write=f"^{re.escape(INGEST_EXCHANGE.name)}$",
        read=f"^{re.escape(scrape_queue(region).name)}$",
    )


def password_env(region: str) -> str:
    return per_region_env(PASSWORD_ENV_PREFIX, region)


@dataclass(frozen=True)
class RegionUser:
    region: str
    name: str
    password: str | None  # None: an existing user that keeps its password
    generated: bool  # the password was generated here: show it once
    permissions: Permissions


def plan_users(
    regions: Iterable[str],
    *,
    prefix: str = DEFAULT_USER_PREFIX,
    existing: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> list[RegionUser]:
    """One user per region; passwords from the environment or generated for new users."""
    env = os.environ if environ is None else environ
    known = set(existing)
    users = []
    for region in regions:
        name = f"{prefix}{region}"
        password = env.get(password_env(region)) or None
        generated = password is None and name not in known
        if generated:
            password = secrets.token_urlsafe(24)
        users.append(RegionUser(region, name, password, generated, region_permissions(region)))
    return users


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def _exchange(name: str, kind: str, vhost: str) -> dict[str, Any]:
    return {
        "name": name,
        "vhost": vhost,
        "type": kind,
        "durable": True,
        "auto_delete": False,
        "internal": False,
        "arguments": {},
    }


def topology_definitions(regions: Iterable[str], vhost: str) -> dict[str, list[dict[str, Any]]]:
    """Exchanges, queues and bindings of regions.bus, as RabbitMQ definitions."""
    queues = [INGEST_QUEUE, DEAD_QUEUE, *(scrape_queue(r) for r in regions)]
    return {
        "exchanges": [
            _exchange(str(x.name), str(x.type), vhost)
            for x in (SCRAPE_EXCHANGE, DEAD_EXCHANGE, INGEST_EXCHANGE)
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                "arguments": dict(getattr(q, "queue_arguments", None) or {}),
            }
            for q in queues
        ],
        "bindings": [
            {
                "source": q.exchange.name,
                "vhost": vhost,
                "destination": q.name,
                "destination_type": "queue",
                "routing_key": q.routing_key or "",
                "arguments": {},
            }
            for q in queues
        ],
    }


def definitions(users: Iterable[RegionUser], regions: Iterable[str], vhost: str) -> dict[str, Any]:
    """A RabbitMQ definitions document: vhost, topology, users and permissions."""
    users = list(users)
    return {
        "vhosts": [{"name": vhost}],
        "users": [
            {
                "name": u.name,
                "password_hash": password_hash(u.password),
                "hashing_algorithm": HASHING_ALGORITHM,
                "tags": [],
                "limits": {},
            }
            for u in users
            if u.password is not None
        ],
        "permissions": [
            {
                "user": u.name,
                "vhost": vhost,
                "configure": u.permissions.configure,
                "write": u.permissions.write,
                "read": u.permissions.read,
            }
            for u in users
        ],
        **topology_definitions(regions, vhost),
    }


# --- applying with rabbitmqctl ---------------------------------------------------


def _rabbitmqctl(*args: str, stdin: str | None = None) -> str:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise ProvisionError(
            "rabbitmqctl not found: run 'geoscrape broker provision --apply' on the broker's "
            "host, or use --export FILE and import it there"
        )
    try:
        done = subprocess.run(
            [exe, *args], input=stdin, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        raise ProvisionError(f"rabbitmqctl {args[0]} timed out after 120s") from None
    if done.returncode != 0:
        detail = " ".join((done.stderr or done.stdout).split())[:400]
        raise ProvisionError(f"rabbitmqctl {args[0]} failed: {detail}")
    return done.stdout


def existing_users() -> list[str]:
    return [u["user"] for u in json.loads(_rabbitmqctl("list_users", "-q", "--formatter", "json"))]


def _permissions_of(vhost: str) -> dict[str, Permissions]:
    try:
        rows = json.loads(
            _rabbitmqctl("list_permissions", "-q", "-p", vhost, "--formatter", "json")
        )
    except ProvisionError:
        return {}  # the vhost does not exist (yet)
    return {r["user"]: Permissions(r["configure"], r["write"], r["read"]) for r in rows}


def apply(users: list[RegionUser], regions: Iterable[str], vhost: str, timeout: float = 30) -> None:
    """Import the definitions into the local broker and wait until they are in force."""
    document = definitions(users, regions, vhost)
    _rabbitmqctl("import_definitions", "--format", "json", stdin=json.dumps(document))
    # The import is asynchronous: wait until every permission reads back as planned.
    deadline = time.monotonic() + timeout
    while True:
        current = _permissions_of(vhost)
        if all(current.get(u.name) == u.permissions for u in users):
            return
        if time.monotonic() > deadline:
            raise ProvisionError(f"definitions imported but not in force after {timeout:.0f}s")
        time.sleep(0.3)
