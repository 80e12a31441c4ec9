"""Exchanges, queues and connection settings of the geoscrape bus (RabbitMQ).

Topology (all durable, all messages persistent):

    exchange "scrape" (direct) --routing key <region>--> queue "scrape.<region>"
    queue "scrape.<region>" --dead-letter--> exchange "scrape.dlx" (fanout) --> "scrape.dead"
    exchange "ingest" (direct) --routing key "ingest"--> queue "ingest"

Queue arguments must be identical wherever a queue is declared, or RabbitMQ
refuses the declaration (PRECONDITION_FAILED); so every declaration goes
through the functions below.

Only central components declare (`geoscrape broker provision`, ingest, the
dispatcher). A regional worker runs as a least-privilege broker user that may
not declare anything: it checks the topology passively (which needs no
permission) and consumes a `no_declare` queue (see docs/REGIONS.md).
"""

from __future__ import annotations

from collections.abc import Iterable

from kombu import Connection, Exchange, Queue

from regions.errors import BrokerUnavailable
from regions.settings import settings

SCRAPE_EXCHANGE = Exchange("scrape", type="direct", durable=True)
DEAD_EXCHANGE = Exchange("scrape.dlx", type="fanout", durable=True)
INGEST_EXCHANGE = Exchange("ingest", type="direct", durable=True)
INGEST_ROUTING_KEY = "ingest"
# The Celery task name of a crawl job (its dead letters are recognised by it).
CRAWL_TASK = "geoscrape.crawl"

DEAD_QUEUE = Queue("scrape.dead", exchange=DEAD_EXCHANGE, routing_key="", durable=True)
INGEST_QUEUE = Queue(
    "ingest", exchange=INGEST_EXCHANGE, routing_key=INGEST_ROUTING_KEY, durable=True
)


def broker_url() -> str:
    return settings().broker_url


def scrape_queue_name(region: str) -> str:
    return f"scrape.{region}"


def scrape_queue(region: str, *, no_declare: bool = False) -> Queue:
    """The queue a region's workers consume; rejected jobs go to scrape.dead.

    ``no_declare``: for consumers without the configure permission (workers).
    """
    return Queue(
        scrape_queue_name(region),
        exchange=SCRAPE_EXCHANGE,
        routing_key=region,
        durable=True,
        queue_arguments={"x-dead-letter-exchange": DEAD_EXCHANGE.name},
        no_declare=no_declare,
    )


def connect(url: str | None = None) -> Connection:
    """A kombu connection with publisher confirms on (no silent publish loss);
    TLS for amqps:// URLs (regions.tls)."""
    from regions.tls import ssl_options

    url = url or broker_url()
    return Connection(
        url,
        ssl=ssl_options(url) or False,
        transport_options={"confirm_publish": True},
        connect_timeout=5,
        heartbeat=30,
    )


def declare_topology(connection: Connection, regions: Iterable[str]) -> None:
    """Declare every exchange and queue (idempotent)."""
    channel = connection.default_channel
    for queue in [INGEST_QUEUE, DEAD_QUEUE, *(scrape_queue(r) for r in regions)]:
        queue(channel).declare()


def missing_topology(connection: Connection, regions: Iterable[str]) -> list[str]:
    """Names of the queues a worker of `regions` needs that do not exist yet.

    Passive declares need no permission, so a least-privilege worker can ask.
    """
    from amqp.exceptions import NotFound

    missing = []
    for name in [INGEST_QUEUE.name, *(scrape_queue_name(r) for r in regions)]:
        try:
            with connection.channel() as channel:
                channel.queue_declare(queue=name, passive=True)
        except NotFound:  # the broker closes the channel; the next name gets a new one
            missing.append(name)
    return missing


def queue_depth(connection: Connection, name: str) -> tuple[int, int] | None:
    """(ready messages, consumers) of queue `name`, or None if it does not exist."""
    from amqp.exceptions import NotFound

    try:
        with connection.channel() as channel:
            _, messages, consumers = channel.queue_declare(queue=name, passive=True)
    except NotFound:
        return None
    return int(messages), int(consumers)


def publish_ingest(producer_connection: Connection, body: dict[str, object]) -> None:
    """Publish one ingest message, persistent and confirmed by the broker.

    Nothing is declared here: workers may only write to the `ingest` exchange,
    whose queue central components declared beforehand.
    """
    producer = producer_connection.Producer(serializer="json")
    publish = producer_connection.ensure(producer, producer.publish, max_retries=10)
    publish(
        body,
        exchange=INGEST_EXCHANGE,
        routing_key=INGEST_ROUTING_KEY,
        delivery_mode=2,
        retry=True,
    )


BROKER_HINT = (
    "start RabbitMQ with 'docker compose up -d rabbitmq', or install the distribution "
    "package (apt-get install rabbitmq-server) and run 'rabbitmq-server -detached'; "
    "point geoscrape at it with GEOSCRAPE_BROKER_URL"
)
LOGIN_HINT = (
    "check the user and password in GEOSCRAPE_BROKER_URL (a region's user is created by "
    "'geoscrape broker provision --apply')"
)
VHOST_HINT = (
    "the vhost (the URL's path; '//' is the default vhost '/') must exist and the user needs "
    "permissions on it: rabbitmqctl add_vhost NAME; rabbitmqctl set_permissions -p NAME USER ..."
)
TLS_HINT = (
    "check GEOSCRAPE_BROKER_CA / GEOSCRAPE_BROKER_CERT / GEOSCRAPE_BROKER_KEY and that the "
    "broker's certificate names the host in the URL (docs/REGIONS.md)"
)


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


def _causes(exc: BaseException) -> list[BaseException]:
    """`exc` and the exceptions it was raised from (kombu wraps py-amqp's)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def classify_broker_error(url: str, exc: BaseException) -> BrokerUnavailable:
    """The BrokerUnavailable subclass for `exc`, with the advice that fits it."""
    import ssl

    from amqp.exceptions import AccessRefused, NotAllowed

    from regions.errors import (
        BrokerLoginRefused,
        BrokerTLSError,
        BrokerUnreachable,
        BrokerVhostMissing,
    )

    where = redact(url)
    for cause in _causes(exc):
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        if isinstance(cause, AccessRefused) or "ACCESS_REFUSED" in reason:
            return BrokerLoginRefused(
                f"RabbitMQ at {where} refused the login ({reason}): {LOGIN_HINT}"
            )
        if isinstance(cause, NotAllowed) or "NOT_ALLOWED" in reason:
            return BrokerVhostMissing(
                f"RabbitMQ at {where}: vhost not usable ({reason}): {VHOST_HINT}"
            )
        if isinstance(cause, ssl.SSLError):
            return BrokerTLSError(f"TLS with RabbitMQ at {where} failed ({reason}): {TLS_HINT}")
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return BrokerUnreachable(f"cannot reach RabbitMQ at {where} ({reason}): {BROKER_HINT}")


def check_broker(url: str | None = None) -> None:
    """Raise a BrokerUnavailable subclass, with advice that fits, if RabbitMQ can't be used."""
    from regions.tls import ssl_options

    url = url or broker_url()
    ssl_options(url)  # bad TLS settings are their own error, not "unreachable"
    try:
        with connect(url) as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:  # socket errors, auth errors, unknown vhost...
        raise classify_broker_error(url, exc) from exc
