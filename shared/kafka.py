"""Kafka clients as llmq configures them, and the request topics' set-up."""

from __future__ import annotations

import asyncio

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from shared.settings import ServiceSettings

log = structlog.get_logger(__name__)

JSON_HEADERS = [("content-type", b"application/json")]


def connection_options(settings: ServiceSettings) -> dict:
    """Where the brokers are and how to authenticate: the same for every aiokafka client."""
    options: dict = dict(bootstrap_servers=settings.kafka_bootstrap,
                         security_protocol=settings.kafka_security_protocol)
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(cafile=settings.kafka_ssl_cafile,
                                                    certfile=settings.kafka_ssl_certfile,
                                                    keyfile=settings.kafka_ssl_keyfile)
    if settings.kafka_security_protocol.startswith("SASL"):
        password = settings.kafka_sasl_password
        options.update(sasl_mechanism=settings.kafka_sasl_mechanism,
                       sasl_plain_username=settings.kafka_sasl_username,
                       sasl_plain_password=password.get_secret_value() if password else None)
    return options


def make_admin(settings: ServiceSettings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**connection_options(settings))


def make_producer(settings: ServiceSettings, **overrides) -> AIOKafkaProducer:
    # acks="all" and no idempotence: the dev broker (Tansu) answers InitProducerId
    # with an error, and workers dedupe by id anyway.
    options = dict(
        **connection_options(settings),
        acks="all",
        linger_ms=settings.producer_linger_ms,
        enable_idempotence=False,
        request_timeout_ms=int(settings.produce_timeout_seconds * 1000),
        retry_backoff_ms=100,
    )
    options.update(overrides)
    return AIOKafkaProducer(**options)


def make_consumer(settings: ServiceSettings, group_id: str | None = None, **options) -> AIOKafkaConsumer:
    """A member of the workers' consumer group (or of `group_id`); `options` tune its fetching."""
    return AIOKafkaConsumer(
        **connection_options(settings),
        group_id=group_id or settings.consumer_group,
        enable_auto_commit=False,  # offsets are committed only for finished work
        auto_offset_reset="earliest",
        **options,
    )


# How long fetched records the application hasn't taken may hold up the next fetch: see below.
PREFETCH_BACKOFF_SECONDS = 0.005


def shorten_prefetch_backoff(consumer: AIOKafkaConsumer, seconds: float = PREFETCH_BACKOFF_SECONDS) -> bool:
    """Make a started consumer's fetcher hold up new fetches for `seconds` at most.

    aiokafka's fetcher sends no fetch to a broker while a partition it leads holds
    fetched records the application hasn't taken yet, for up to its `prefetch_backoff`
    (0.1 s, which AIOKafkaConsumer doesn't expose). A worker leaves bulk records there
    whenever bulk is at its share, so an interactive request produced meanwhile waited
    up to 100 ms to be fetched (measured in `python -m bench.batch`: 50-108 ms of the
    slowest interactive calls' 118). With a few ms, the next fetch names the partitions
    that hold nothing, the interactive ones, and the buffered bulk records keep their
    place. The attribute is aiokafka's own (checked by tests/unit/test_kafka_client.py);
    False, with a warning, where an aiokafka version lacks it."""
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is None or not hasattr(fetcher, "_prefetch_backoff"):
        log.warning("prefetch_backoff_not_set", detail="this aiokafka's fetcher has no _prefetch_backoff: "
                    "an interactive request may wait up to 100 ms behind fetched bulk records")
        return False
    fetcher._prefetch_backoff = seconds
    return True


async def ensure_topics(settings: ServiceSettings) -> None:
    """Create the request topics (both lanes), the webhooks topic, their dead-letter
    topics and the fine-tuning topic if they don't exist yet.

    Auto-creation on first produce would give the broker's default partition
    count, which caps how many workers can share the load.
    """
    admin = make_admin(settings)
    await admin.start()
    try:
        topics = [
            *(NewTopic(topic, settings.request_partitions, 1) for topic in settings.lane_topics),
            NewTopic(settings.dlq_topic, 1, 1),
            NewTopic(settings.webhook_topic, settings.request_partitions, 1),
            NewTopic(settings.webhook_dlq_topic, 1, 1),
            NewTopic(settings.fine_tuning_topic, settings.fine_tuning_partitions, 1),
        ]
        try:
            await admin.create_topics(topics)
        except TopicAlreadyExistsError:
            pass
    finally:
        await admin.close()


async def start_with_retry(client, what: str, attempts: int = 30, delay: float = 1.0) -> None:
    """Start a Kafka client, retrying while the broker is still coming up."""
    for attempt in range(1, attempts + 1):
        try:
            await client.start()
            return
        except KafkaConnectionError as exc:
            if attempt == attempts:
                raise
            log.warning("kafka_unreachable", client=what, attempt=attempt, error=str(exc))
            await asyncio.sleep(delay)
