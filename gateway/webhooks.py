"""The webhook sender: delivers the events queued on the webhooks topic, signed
(Standard Webhooks), one at a time in order per subject (a request, or a batch)
and different subjects concurrently, retried with exponential back-off, and given up to the webhook
dead-letter topic with the reason.

It is a member of its own consumer group (LLMQ_WEBHOOK_CONSUMER_GROUP), so every
gateway runs one and they share the events. Offsets are committed only up to the
lowest undelivered event of each partition: a sender that stops, or dies, mid-retry
leaves its events to be delivered again by the next owner, with the same
`webhook-id`. Each event's end (delivered, given up) is written on its subject's
hash first (the request's record, or the batch's hash), so an event delivered once
is not POSTed again after a restart.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque

import aiohttp
import structlog
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from gateway.metrics import GatewayMetrics
from gateway.settings import GatewaySettings
from shared.kafka import JSON_HEADERS, make_consumer, make_producer, start_with_retry
from shared.offsets import OffsetTracker
from shared.store import RequestStore
from shared.webhooks import (
    EventError,
    GuardedResolver,
    WebhookEventMessage,
    WebhookSecrets,
    WebhookUrlError,
    check_webhook_url,
    parse_event,
    signed_headers,
)

log = structlog.get_logger(__name__)

USER_AGENT = "llmq-webhooks/1"
# How long a fetch waits on the broker for new events: Kafka answers as soon as some
# arrive, the dev broker waits this out, so it bounds an event's wait there.
FETCH_MAX_WAIT_MS = 20
MAX_ANSWER_BYTES = 4096  # read of a receiver's answer, so a connection is reused; the rest is not wanted


class WebhookSender:
    def __init__(self, settings: GatewaySettings, store: RequestStore, secrets: WebhookSecrets,
                 metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.store = store
        self.secrets = secrets
        self.metrics = metrics
        self.offsets = OffsetTracker()
        self.consumer = None
        self.producer = None
        self.session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(settings.webhook_concurrency)
        # By the hash of the events' subject (Keys.webhook_holder): a request's id and a
        # batch's could be alike, their hashes cannot.
        self._lanes: dict[str, deque[tuple[TopicPartition, int, WebhookEventMessage]]] = {}
        self._lane_tasks: dict[str, asyncio.Task] = {}
        self._paused = False
        self._closed = False
        self._failed: BaseException | None = None  # a lane's unexpected error: the sender stops on it

    # ---- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self.producer = make_producer(s)
        await start_with_retry(self.producer, "webhook producer")
        self.consumer = make_consumer(s, group_id=s.webhook_consumer_group, max_poll_records=500,
                                      fetch_max_wait_ms=FETCH_MAX_WAIT_MS)
        self.consumer.subscribe([s.webhook_topic], listener=_Rebalance(self))
        await start_with_retry(self.consumer, "webhook consumer")
        # The guarded resolver refuses non-public answers at connect time; with private
        # addresses allowed (local development) aiohttp's own resolver is enough.
        resolver = None if s.webhook_allow_private else GuardedResolver()
        connector = aiohttp.TCPConnector(limit=s.webhook_concurrency, resolver=resolver)
        self.session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": USER_AGENT})
        log.info("webhook_sender_started", topic=s.webhook_topic, group=s.webhook_consumer_group)

    async def run(self) -> None:
        try:
            await self.start()
            while self._failed is None:
                await self._fetch()
                await self.commit()
            raise self._failed
        finally:
            await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._lane_tasks.values():
            task.cancel()
        await asyncio.gather(*self._lane_tasks.values(), return_exceptions=True)
        if self.consumer is not None:
            await self.commit()
            await self.consumer.stop()
        if self.producer is not None:
            await self.producer.stop()
        if self.session is not None:
            await self.session.close()
        log.info("webhook_sender_stopped", pending=self.offsets.in_flight)

    # ---- fetching --------------------------------------------------------------

    async def _fetch(self) -> None:
        """Take events while fewer than LLMQ_WEBHOOK_MAX_PENDING wait; pause the fetch at that many."""
        full = self.offsets.in_flight >= self.settings.webhook_max_pending
        if full and not self._paused:
            self.consumer.pause(*self.consumer.assignment())
        elif self._paused and not full:
            self.consumer.resume(*self.consumer.paused())
        self._paused = full
        fetched = await self.consumer.getmany(timeout_ms=500 if not full else 200, max_records=500)
        for records in fetched.values():
            for record in records:
                await self._accept(record)

    async def _accept(self, record) -> None:
        tp = TopicPartition(record.topic, record.partition)
        self.offsets.track(tp, record.offset)
        try:
            event = parse_event(record.value)
        except EventError as exc:
            await self._dead_letter(record.value, record.key, f"not a webhook event: {exc}", 0, None)
            self.offsets.finish(tp, record.offset)
            return
        holder, _ = self.store.keys.webhook_holder(event.subject, event.subject_id)
        lane = self._lanes.setdefault(holder, deque())
        lane.append((tp, record.offset, event))
        if holder not in self._lane_tasks:
            task = asyncio.create_task(self._drain(holder), name=f"llmq-webhook-{holder}")
            self._lane_tasks[holder] = task
            task.add_done_callback(self._lane_ended)

    async def _drain(self, holder: str) -> None:
        """One subject's events, one at a time, in the order they were queued."""
        lane = self._lanes[holder]
        try:
            while lane:
                tp, offset, event = lane[0]
                await self._deliver(event)
                lane.popleft()
                self.offsets.finish(tp, offset)
        finally:
            self._lanes.pop(holder, None)
            self._lane_tasks.pop(holder, None)

    async def stop_lanes(self, partitions: set[TopicPartition]) -> None:
        """Stop the deliveries of events on `partitions` (a subject's events share one)."""
        tasks = [self._lane_tasks[holder] for holder, lane in self._lanes.items()
                 if lane and lane[0][0] in partitions and holder in self._lane_tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _lane_ended(self, task: asyncio.Task) -> None:
        """A lane that failed (a bug, not a receiver's failure: those are retried) stops the
        sender; its events stay uncommitted for the next sender to own the partition."""
        if not task.cancelled() and task.exception() is not None:
            log.error("webhook_lane_failed", lane=task.get_name(), error=repr(task.exception()))
            self._failed = self._failed or task.exception()

    async def commit(self) -> None:
        await self.offsets.commit(self.consumer, "webhook")

    # ---- one event -------------------------------------------------------------

    async def _deliver(self, event: WebhookEventMessage) -> None:
        """POST the event until the receiver takes it (2xx) or its retry window ends."""
        # 1) an event that ended already (a redelivery) is not sent again; nor is a `start`
        #    that reached the topic after its request's `completed` (a cancel raced the start)
        if await self._ended(event):
            self.metrics.webhook_deliveries.labels("skipped").inc()
            return
        deadline = await self._first_attempt(event) + self.settings.webhook_retry_seconds
        attempt = 0
        while True:
            attempt += 1
            # 2) where the URL points is checked at every attempt: DNS may have changed
            try:
                await check_webhook_url(event.url, self.settings.webhook_allow_private)
            except WebhookUrlError as exc:
                await self._give_up(event, f"webhook URL refused: {exc}", attempt - 1, None)
                return
            status, error = await self._post(event)
            delivered = error is None
            await self._record(event, {
                "webhook_status_code": status if status is not None else "", "webhook_error": error or "",
                **({f"webhook_{event.type}": "delivered"} if delivered else {}),
            }, attempts=1)
            if delivered:
                self.metrics.webhook_deliveries.labels("delivered").inc()
                self.metrics.webhook_lag.observe(max(time.time() - event.created_at, 0.0))
                return
            # 3) back off (exponential, full jitter) unless the window would end first
            self.metrics.webhook_deliveries.labels("failed_attempt").inc()
            pause = random.uniform(0, min(self.settings.webhook_backoff_max_seconds,
                                          self.settings.webhook_backoff_seconds * 2 ** (attempt - 1)))
            if time.time() + pause > deadline:
                await self._give_up(event, f"{error}; retried {attempt} times over "
                                           f"LLMQ_WEBHOOK_RETRY_SECONDS={self.settings.webhook_retry_seconds:g}",
                                    attempt, status)
                return
            log.info("webhook_retry", **event.log_fields(), webhook_event=event.type, attempt=attempt, error=error,
                     pause_seconds=round(pause, 3))
            await asyncio.sleep(pause)

    async def _ended(self, event: WebhookEventMessage) -> bool:
        holder, _ = self.store.keys.webhook_holder(event.subject, event.subject_id)
        try:
            if await self.store.webhook_state(holder, event.type):
                return True
            return event.type == "start" and bool(await self.store.webhook_state(holder, "completed"))
        except (RedisError, OSError) as exc:
            log.warning("webhook_state_unreadable", **event.log_fields(), error=str(exc))
            return False  # deliver: at least once

    async def _first_attempt(self, event: WebhookEventMessage) -> float:
        """The retry window runs from the first attempt, recorded so that a restart (or
        another sender taking the partition over) does not start it again, and not from
        the event, which may have waited while no sender ran."""
        holder, ttl = self.store.keys.webhook_holder(event.subject, event.subject_id)
        try:
            return await self.store.webhook_first_attempt(holder, ttl, event.type, time.time())
        except (RedisError, OSError) as exc:
            log.warning("webhook_state_unreadable", **event.log_fields(), error=str(exc))
            return time.time()

    async def _post(self, event: WebhookEventMessage) -> tuple[int | None, str | None]:
        """One attempt: (the answer's status code, None where it was a 2xx, else why it failed)."""
        body = event.body()
        try:
            secret = await self.secrets.of(event.tenant)
        except (RedisError, OSError) as exc:
            return None, f"the signing secret is unreadable ({type(exc).__name__})"
        headers = signed_headers(secret, event.id, body)
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout_seconds)
        async with self._slots:
            started = time.perf_counter()
            try:
                # Redirects are never followed: one could lead to an address the guard refuses.
                async with self.session.post(event.url, data=body, headers=headers, allow_redirects=False,
                                             timeout=timeout) as resp:
                    await resp.content.read(MAX_ANSWER_BYTES)
                    status = resp.status
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                return None, f"no answer ({type(exc).__name__}: {exc})"[:500]
            finally:
                self.metrics.webhook_attempt_duration.observe(time.perf_counter() - started)
        if 200 <= status < 300:
            return status, None
        if 300 <= status < 400:
            return status, f"answered {status} (redirects are not followed)"
        return status, f"answered {status}"

    async def _give_up(self, event: WebhookEventMessage, reason: str, attempts: int, status: int | None) -> None:
        """To the dead-letter topic with the reason, then on the record."""
        await self._dead_letter(event.to_bytes(), event.subject_id.encode(), reason, attempts, status)
        await self._record(event, {f"webhook_{event.type}": "given_up", "webhook_error": reason})
        self.metrics.webhook_deliveries.labels("given_up").inc()
        log.warning("webhook_given_up", **event.log_fields(), webhook_event=event.type, reason=reason)

    async def _dead_letter(self, value: bytes | None, key: bytes | None, reason: str, attempts: int,
                           status: int | None) -> None:
        headers = [*JSON_HEADERS, ("llmq-dlq-reason", reason.encode()[:1024]),
                   ("llmq-webhook-attempts", str(attempts).encode()),
                   ("llmq-webhook-status", str(status or "").encode())]
        while True:  # the event stays uncommitted until the dead-letter topic has it
            try:
                await self.producer.send_and_wait(self.settings.webhook_dlq_topic, value, key=key, headers=headers)
                return
            except KafkaError as exc:
                if not exc.retriable:  # refused for good (too large, say): said, and passed over
                    log.error("webhook_dead_letter_refused", reason=reason, error=f"{type(exc).__name__}: {exc}")
                    return
                log.warning("webhook_dead_letter_failed", error=str(exc))
                await asyncio.sleep(1.0)

    async def _record(self, event: WebhookEventMessage, fields: dict, attempts: int = 0) -> None:
        """On the hash of the event's subject: the request's record, or the batch's hash."""
        holder, ttl = self.store.keys.webhook_holder(event.subject, event.subject_id)
        try:
            await self.store.record_webhook(holder, ttl, fields, attempts)
        except (RedisError, OSError) as exc:
            # Only the record's account is lost; the delivery itself stands.
            log.warning("webhook_record_failed", **event.log_fields(), error=str(exc))


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, sender: WebhookSender) -> None:
        self.sender = sender

    async def on_partitions_revoked(self, revoked):
        # Commit what is delivered, and stop the deliveries of these partitions: the next
        # owner delivers them again, in order (an end already recorded makes that a no-op).
        await self.sender.commit()
        await self.sender.stop_lanes(set(revoked))
        self.sender.offsets.forget(revoked)

    async def on_partitions_assigned(self, assigned):
        if self.sender._paused:
            self.sender.consumer.pause(*assigned)
