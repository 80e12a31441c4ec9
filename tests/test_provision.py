"""Per-region broker users: `geoscrape broker provision` and what the users may do.

Each test provisions users with a unique prefix into its own vhost and deletes
them afterwards. The checks talk to the real RabbitMQ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from amqp.exceptions import AccessRefused
from kombu import Connection, Exchange, Queue

from regions.bus import INGEST_QUEUE, SCRAPE_EXCHANGE, connect, publish_ingest, scrape_queue
from regions.provision import password_hash, region_permissions

CONFIG = """\
regions:
  eu: {}
  us: {}
  asia-east: {}
sites:
  - name: s
    start_urls: ["http://127.0.0.1:9/"]
    regions: [eu]
    extract: {fields: {title: {css: "title::text"}}}
"""


def rabbitmqctl(*args: str) -> str:
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def prefix() -> Iterator[str]:
    """A unique user-name prefix; every user with it is deleted afterwards."""
    prefix = f"gst{uuid.uuid4().hex[:8]}-"
    yield prefix
    users = json.loads(rabbitmqctl("list_users", "-q", "--formatter", "json"))
    for user in users:
        if user["user"].startswith(prefix):
            rabbitmqctl("delete_user", user["user"])


def provision(tmp_path: Path, url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "sites.yaml"
    config.write_text(CONFIG)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "geoscrape.cli",
            "broker",
            "provision",
            "--config",
            str(config),
            *args,
        ],
        env={**os.environ, "GEOSCRAPE_BROKER_URL": url, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


def as_user(vhost_url: str, user: str, password: str) -> str:
    vhost = vhost_url.rsplit("/", 1)[1]
    return f"amqp://{user}:{password}@127.0.0.1:5672/{vhost}"


def test_permission_regexes_are_exact() -> None:
    p = region_permissions("asia-east")
    assert (p.configure, p.write, p.read) == ("^$", "^ingest$", r"^scrape\.asia\-east$")


def test_password_hash_is_rabbitmqs_sha256_scheme() -> None:
    # base64(salt + sha256(salt + password)), salt 4 bytes: checked against a known value.
    assert password_hash("s3cret", salt=b"\x01\x02\x03\x04") == (
        "AQIDBLq/hWyT4GNQ5SjFtltSvLoQIZIQIckdYAqRUvj04Npv"
    )


def test_eu_user_can_only_consume_its_queue_and_publish_results(
    tmp_path: Path, vhost_url: str, prefix: str
) -> None:
    done = provision(
        tmp_path, vhost_url, "--apply", "--user-prefix", prefix,
        GEOSCRAPE_BROKER_PASSWORD_EU="eu-pass-1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"{prefix}eu: created" in done.stdout
    # Passwords of us and asia-east were generated and are shown once.
    shown = dict(line.split("\t") for line in done.stdout.splitlines() if "\t" in line)
    assert sorted(shown) == [f"{prefix}asia-east", f"{prefix}us"]

    # Central side (guest): one job waiting in scrape.eu and one in scrape.us.
    with Connection(vhost_url) as admin:
        producer = admin.Producer()
        for region in ("eu", "us"):
            producer.publish({"job": region}, exchange=SCRAPE_EXCHANGE, routing_key=region)

    eu = as_user(vhost_url, f"{prefix}eu", "eu-pass-1")
    # Allowed: take its own job, publish a result to ingest.
    with Connection(eu) as conn:
        message = scrape_queue("eu", no_declare=True)(conn.default_channel).get(no_ack=False)
        assert message is not None and message.payload == {"job": "eu"}
        message.ack()
    with connect(eu) as conn:
        publish_ingest(conn, {"kind": "test", "n": 1})

    # Refused: another region's queue, the job exchange, the default exchange, declaring.
    refused = []
    with pytest.raises(AccessRefused) as exc, Connection(eu) as conn:
        scrape_queue("us", no_declare=True)(conn.default_channel).get()
    refused.append(str(exc.value))
    with pytest.raises(AccessRefused) as exc, connect(eu) as conn:
        conn.Producer().publish({"job": "forged"}, exchange=SCRAPE_EXCHANGE, routing_key="us")
    refused.append(str(exc.value))
    with pytest.raises(AccessRefused) as exc, connect(eu) as conn:
        conn.Producer().publish({"job": "forged"}, exchange="", routing_key="scrape.us")
    refused.append(str(exc.value))
    with pytest.raises(AccessRefused) as exc, Connection(eu) as conn:
        Queue("eu-private", Exchange("ingest", "direct"), "x")(conn.default_channel).declare()
    refused.append(str(exc.value))
    with pytest.raises(AccessRefused) as exc, Connection(eu) as conn:
        conn.default_channel.queue_declare("eu-only", exclusive=True, auto_delete=True)
    refused.append(str(exc.value))
    assert all("ACCESS_REFUSED" in r for r in refused), refused

    # Nothing else moved: us's job still waits, the one result reached ingest.
    with Connection(vhost_url) as admin:
        channel = admin.default_channel
        assert channel.queue_declare("scrape.us", passive=True).message_count == 1
        assert channel.queue_declare("scrape.eu", passive=True).message_count == 0
        assert channel.queue_declare(INGEST_QUEUE.name, passive=True).message_count == 1


def test_provision_is_idempotent_and_keeps_passwords(
    tmp_path: Path, vhost_url: str, prefix: str
) -> None:
    first = provision(tmp_path, vhost_url, "--apply", "--user-prefix", prefix)
    assert first.returncode == 0, first.stderr
    passwords = dict(line.split("\t") for line in first.stdout.splitlines() if "\t" in line)
    assert len(passwords) == 3

    again = provision(tmp_path, vhost_url, "--apply", "--user-prefix", prefix)
    assert again.returncode == 0, again.stderr
    assert "\t" not in again.stdout  # no password generated or shown a second time
    assert again.stdout.count("exists, password unchanged") == 3

    vhost = vhost_url.rsplit("/", 1)[1]
    perms = json.loads(rabbitmqctl("list_permissions", "-q", "-p", vhost, "--formatter", "json"))
    ours = sorted(
        (p["user"], p["configure"], p["write"], p["read"])
        for p in perms
        if p["user"].startswith(prefix)
    )
    assert ours == [
        (f"{prefix}asia-east", "^$", "^ingest$", r"^scrape\.asia\-east$"),
        (f"{prefix}eu", "^$", "^ingest$", r"^scrape\.eu$"),
        (f"{prefix}us", "^$", "^ingest$", r"^scrape\.us$"),
    ]
    # The first passwords still work, and the topology was declared for the workers.
    with Connection(as_user(vhost_url, f"{prefix}us", passwords[f"{prefix}us"])) as conn:
        conn.ensure_connection(max_retries=1)
        assert conn.default_channel.queue_declare("scrape.us", passive=True).message_count == 0

    # A password from the environment replaces the old one.
    changed = provision(
        tmp_path,
        vhost_url,
        "--apply",
        "--user-prefix",
        prefix,
        GEOSCRAPE_BROKER_PASSWORD_US="new-us",
    )
    assert changed.returncode == 0, changed.stderr
    assert f"{prefix}us: password set from GEOSCRAPE_BROKER_PASSWORD_US" in changed.stdout
    rabbitmqctl("authenticate_user", f"{prefix}us", "new-us")


def test_exported_definitions_import_into_a_working_setup(
    tmp_path: Path, vhost_url: str, prefix: str
) -> None:
    # Export for a vhost that does not exist yet; import creates it with everything in it.
    vhost = f"geoscrape-test-{uuid.uuid4().hex[:10]}"
    target = tmp_path / "definitions.json"
    done = provision(
        tmp_path, vhost_url, "--export", str(target), "--vhost", vhost, "--user-prefix", prefix,
        GEOSCRAPE_BROKER_PASSWORD_EU="eu-pass", GEOSCRAPE_BROKER_PASSWORD_US="us-pass",
        GEOSCRAPE_BROKER_PASSWORD_ASIA_EAST="asia-pass",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    document = json.loads(target.read_text())
    assert "eu-pass" not in target.read_text()  # hashes only
    assert sorted(q["name"] for q in document["queues"]) == [
        "ingest", "scrape.asia-east", "scrape.dead", "scrape.eu", "scrape.us"
    ]  # fmt: skip
    try:
        # As the CLI says: `rabbitmqctl import_definitions --format json < FILE`.
        imported = subprocess.run(
            ["rabbitmqctl", "import_definitions", "--format", "json"],
            input=target.read_text(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert imported.returncode == 0, imported.stderr
        rabbitmqctl("authenticate_user", f"{prefix}eu", "eu-pass")
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")  # the central user
        eu = f"amqp://{prefix}eu:eu-pass@127.0.0.1:5672/{vhost}"
        with Connection(f"amqp://guest:guest@127.0.0.1:5672/{vhost}") as admin:
            admin.Producer().publish({"job": 1}, exchange=SCRAPE_EXCHANGE, routing_key="eu")
        with Connection(eu) as conn:
            message = scrape_queue("eu", no_declare=True)(conn.default_channel).get(no_ack=True)
            assert message is not None and message.payload == {"job": 1}
        with pytest.raises(AccessRefused), Connection(eu) as conn:
            scrape_queue("us", no_declare=True)(conn.default_channel).get()
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=60)


def test_provision_refuses_apply_and_export_together(tmp_path: Path, vhost_url: str) -> None:
    done = provision(tmp_path, vhost_url, "--apply", "--export", str(tmp_path / "d.json"))
    assert done.returncode == 2
    assert done.stderr.strip() == "error: give --apply or --export, not both"
