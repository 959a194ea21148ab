"""The loop every gateway runs for batches: it takes each active batch under a lease
in Redis (one gateway at a time; another takes over when one dies) and moves it
on a step: validate its file, enqueue its lines in bounded chunks on the bulk
lane, finalize (write the output and error files), cancel or expire it. A batch
with a webhook gets its `start` event queued once it has moved to `in_progress`,
before any later step, and its `completed` event once it ends (any final status),
before it leaves the active list; so a gateway that dies in between leaves the
event to whoever takes the batch over (the sender delivers a repeat once).

Enqueue is resumable: a chunk's records are created (only where missing), its
messages produced and acked, and only then the cursor saved. A gateway that dies
mid-chunk leaves the cursor before that chunk; whoever resumes creates nothing
twice and produces again only lines whose record is still `queued`. Such a line
may be on the topic twice; it still runs once: the claim script lets one worker
run a record and the other skip it (running under a live lease: it waits for the
lease and then finds the record final).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TypeVar

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from redis.exceptions import RedisError

from gateway.batches.files import FileStore
from gateway.batches.lines import (
    BATCH_METADATA_KEY,
    ENDPOINTS,
    Line,
    LineError,
    Place,
    RawLine,
    parse_line,
    read_lines,
)
from gateway.batches.objects import NOT_RUN, batch_object, result_line
from gateway.fine_tuning.serving import FineTunedModels, NotYours
from gateway.metrics import GatewayMetrics
from gateway.openai_compat import OpenAICall
from gateway.pacing import InteractivePacer
from gateway.settings import GatewaySettings
from shared.kafka import JSON_HEADERS
from shared.keys import Keys
from shared.schema import RequestMessage, RequestSpec
from shared.store import base_fields
from shared.store.batches import BatchStore
from shared.store.models import ServedModels
from shared.training import split_fine_tuned
from shared.webhooks import WebhookEvents

log = structlog.get_logger(__name__)
T = TypeVar("T")
MAX_ERRORS = 100  # validation errors a failed batch reports (OpenAI reports a bounded list too)
ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")


class LeaseLost(Exception):
    """Another gateway took the batch (this one stalled past its lease): stop working on it."""


@dataclass
class RunnerStats:
    lines_enqueued: int = 0
    batches_ended: int = 0


# Lines handled between two turns of the event loop: a chunk's CPU work (parsing lines,
# building records and messages, output lines) would otherwise hold up the interactive
# requests this gateway serves for the whole chunk.
LINES_PER_TURN = 32


def in_slices(items: Sequence[T]) -> Iterator[Sequence[T]]:
    """`items` in slices of LINES_PER_TURN: one Redis round trip each, so parsing its
    answer is a short turn of the event loop too."""
    return (items[i:i + LINES_PER_TURN] for i in range(0, len(items), LINES_PER_TURN))


async def taking_turns(items: Iterable[T], pacer: InteractivePacer) -> AsyncIterator[T]:
    """`items`, handing the event loop back every LINES_PER_TURN of them (and resting
    there while interactive requests are in flight: gateway/pacing.py)."""
    for index, item in enumerate(items):
        if index and index % LINES_PER_TURN == 0:
            await pacer.turn()
        yield item


def finished(batch: dict[str, str]) -> int:
    return sum(int(batch.get(name, 0)) for name in ("completed", "failed", "cancelled"))


class BatchRunner:
    def __init__(self, settings: GatewaySettings, batches: BatchStore, files: FileStore,
                 producer: AIOKafkaProducer, served: ServedModels, metrics: GatewayMetrics,
                 webhooks: WebhookEvents, fine_tuned: FineTunedModels, pacer: InteractivePacer) -> None:
        self.settings = settings
        self.pacer = pacer
        self.batches = batches
        self.keys: Keys = batches.keys
        self.files = files
        self.producer = producer
        self.served = served
        self.fine_tuned = fine_tuned
        self.metrics = metrics
        self.webhooks = webhooks
        self.owner = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self.stats = RunnerStats()
        self._closing = asyncio.Event()
        self._nudged = asyncio.Event()

    def nudge(self) -> None:
        """Look at the batches now rather than at the next poll (a batch was just created here)."""
        self._nudged.set()

    async def run(self) -> None:
        while not self._closing.is_set():
            try:
                for batch_id in await self.batches.active():
                    if self._closing.is_set():
                        break
                    await self._tick(batch_id)
            except (RedisError, OSError) as exc:  # Redis may be back on the next round
                log.warning("batches_unreadable", error=str(exc))
            try:
                async with asyncio.timeout(self.settings.batch_poll_seconds):
                    await self._nudged.wait()
            except TimeoutError:
                pass
            self._nudged.clear()

    def close(self) -> None:
        """Stop after the current chunk (its cursor saved), so a restart resumes cleanly."""
        self._closing.set()
        self._nudged.set()

    async def _hold(self, batch_id: str) -> None:
        if not await self.batches.take_lease(batch_id, self.owner, self.settings.batch_lease_seconds):
            raise LeaseLost(batch_id)

    async def _tick(self, batch_id: str) -> None:
        if not await self.batches.take_lease(batch_id, self.owner, self.settings.batch_lease_seconds):
            return  # another gateway works on it
        try:
            batch = await self.batches.get(batch_id)
            status = batch["status"] if batch else None
            if status not in ACTIVE:
                await self._ended(batch_id)
                return
            structlog.contextvars.bind_contextvars(batch_id=batch_id)
            # Step after step while the status moves (validated → enqueue at once), each step
            # on the batch as it is now; what waits on workers is looked at again next round.
            for _ in range(len(ACTIVE)):
                if not await self._start_announced(batch_id, batch):
                    break  # the broker did not take it: tried again next round
                step = {"validating": self._validate, "in_progress": self._progress, "finalizing": self._finalize,
                        "cancelling": self._cancelling}[status]
                await step(batch_id, batch)
                batch = await self.batches.get(batch_id)
                if batch is None or batch["status"] == status or batch["status"] not in ACTIVE:
                    break
                status = batch["status"]
        except LeaseLost:
            log.warning("batch_lease_lost", batch_id=batch_id)
        except FileNotFoundError:  # its input file was deleted: nothing more can be read
            await self._fail(batch_id, "input_file_missing", "the input file was deleted while the batch ran")
        except Exception:  # noqa: BLE001 - one batch's failure must not stop the others; retried next round
            log.exception("batch_step_failed", batch_id=batch_id)
        finally:
            structlog.contextvars.unbind_contextvars("batch_id")

    async def _ended(self, batch_id: str) -> None:
        """Off the active list, once its `completed` webhook event (if it asked for one) is
        queued: a gateway that dies before then leaves it listed, and whoever takes it over
        queues the event again (the sender delivers it once)."""
        batch = await self.batches.get(batch_id)
        if batch is not None and batch["status"] not in ACTIVE and not (
                await self._start_announced(batch_id, batch) and await self._announce(batch_id, "completed", batch)):
            return  # the broker did not take it: kept active, tried again next round
        await self.batches.ended(batch_id)
        await self.batches.drop_lease(batch_id, self.owner)
        self.stats.batches_ended += 1
        self.metrics.batches_ended.labels(batch["status"] if batch else "gone").inc()

    async def _start_announced(self, batch_id: str, batch: dict[str, str]) -> bool:
        """Its `start` event queued, if it has been `in_progress` (marked on its hash, so
        queued once by this gateway; again only by one taking over before the mark)."""
        if not batch.get("webhook") or not batch.get("in_progress_at") or batch.get("webhook_start_queued"):
            return True
        if not await self._announce(batch_id, "start", batch):
            return False
        await self.batches.set(batch_id, {"webhook_start_queued": 1})
        return True

    async def _announce(self, batch_id: str, kind: str, batch: dict[str, str]) -> bool:
        """Queue the batch's webhook event `kind`, the Batch object as `GET /v1/batches/{id}`
        shows it now, if its webhook asks for that event. False where the broker did not
        take it (said in the log), so the caller tries again next round."""
        if not batch.get("webhook") or kind not in batch.get("webhook_events", "").split():
            return True
        try:
            await self.webhooks.send("batch", batch_id, kind, batch["webhook"], batch.get("tenant") or None,
                                     batch_object(batch))
        except (KafkaError, TimeoutError) as exc:
            log.warning("batch_webhook_event_failed", webhook_event=kind, error=f"{type(exc).__name__}: {exc}")
            return False
        return True

    async def _fail(self, batch_id: str, code: str, message: str) -> None:
        error = {"code": code, "message": message, "param": "input_file_id", "line": None}
        await self.batches.move(batch_id, ["validating", "in_progress", "finalizing", "cancelling"], "failed",
                                {"failed_at": time.time(), "errors": json.dumps([error])})
        log.warning("batch_failed", code=code)
        await self._ended(batch_id)

    # ---- validating ---------------------------------------------------------------

    async def _validate(self, batch_id: str, batch: dict[str, str]) -> None:
        """Read the whole file once: any line the endpoint would refuse, a repeated
        custom_id, a second model, too many lines → `failed` with OpenAI's errors."""
        path = self.files.content_path(batch["input_file_id"])
        errors: list[dict] = []
        seen: set[str] = set()
        model: str | None = None
        total = 0
        async for raws, _ in read_lines(path, self.settings.batch_enqueue_chunk):
            await self._hold(batch_id)
            total += len(raws)
            if total > self.settings.batch_max_lines:
                errors.append(LineError("too_many_lines", f"the file has more than {self.settings.batch_max_lines} "
                                        "requests (LLMQ_BATCH_MAX_LINES)", raws[-1].line).entry())
                break
            async for raw in taking_turns(raws, self.pacer):
                model = self._check_line(raw, batch, seen, model, errors)
            if len(errors) >= MAX_ERRORS:
                break
        if total == 0 and not errors:
            errors.append({"code": "empty_file", "message": "the input file has no requests", "param": None,
                           "line": None})
        routed = await self._route(model, batch, errors) if not errors else None
        if not errors and not await self.served.serves(routed[0]):
            errors.append({"code": "model_not_found", "message": f"model {model!r} is not served here",
                           "param": "body.model", "line": None})
        now = time.time()
        if errors:
            await self.batches.move(batch_id, ["validating"], "failed",
                                    {"failed_at": now, "errors": json.dumps(errors[:MAX_ERRORS])})
            await self._ended(batch_id)
            log.info("batch_failed_validation", errors=len(errors))
        elif await self.batches.move(batch_id, ["validating"], "in_progress",
                                     {"in_progress_at": now, "total": total, "model": model,
                                      "run_model": routed[0], "run_adapter": routed[1]}):
            log.info("batch_validated", lines=total)

    async def _route(self, model: str, batch: dict[str, str], errors: list[dict]) -> tuple[str, str | None] | None:
        """(model, adapter) the lines run as: a fine-tuned model of the batch's key as its
        base and adapter (gateway/fine_tuning/serving.py); another key's is a model not served."""
        try:
            return await self.fine_tuned.route(model, None, batch.get("tenant") or None)
        except NotYours:
            errors.append({"code": "model_not_found", "message": f"model {model!r} is not served here",
                           "param": "body.model", "line": None})
        return None

    def _check_line(self, raw: RawLine, batch: dict[str, str], seen: set[str], model: str | None,
                    errors: list[dict]) -> str | None:
        """Check one line, adding what is wrong with it to `errors`; returns the batch's model."""
        try:
            line = parse_line(raw, batch["endpoint"], self.settings)
        except LineError as exc:
            errors.append(exc.entry())
            return model
        if line.custom_id in seen:
            errors.append(LineError("duplicate_custom_id", f"custom_id {line.custom_id!r} is used by an earlier "
                                    "line", raw.line, "custom_id").entry())
        seen.add(line.custom_id)
        if line.call.spec.adapter is not None and split_fine_tuned(line.call.spec.model or "") is not None:
            errors.append(LineError("invalid_value", "adapter: a fine-tuned model brings its own adapter; name the "
                                    "fine-tuned model or an adapter, not both", raw.line, "body.adapter").entry())
        if model is not None and line.call.spec.model != model:
            errors.append(LineError("mismatched_model", f"model {line.call.spec.model!r}: every line of a batch "
                                    f"must name the same model ({model!r})", raw.line, "body.model").entry())
            return model
        return line.call.spec.model

    # ---- in progress: enqueue, then wait for the lines --------------------------------

    async def _progress(self, batch_id: str, batch: dict[str, str]) -> None:
        if time.time() >= float(batch["expires_at"]):
            await self._expire(batch_id, batch)
        elif int(batch.get("cursor", 0)) < int(batch["total"]):
            await self._enqueue(batch_id, batch)
        elif finished(batch) >= int(batch["total"]):
            if await self.batches.move(batch_id, ["in_progress"], "finalizing", {"finalizing_at": time.time()}):
                await self._finalize(batch_id, await self.batches.get(batch_id))

    async def _enqueue(self, batch_id: str, batch: dict[str, str]) -> None:
        """Enqueue from the cursor, a chunk at a time, until done, cancelled or closing."""
        place = Place(int(batch.get("cursor_offset", 0)), int(batch.get("cursor", 0)),
                      int(batch.get("cursor_line", 1)))
        path = self.files.content_path(batch["input_file_id"])
        async for raws, after in read_lines(path, self.settings.batch_enqueue_chunk, place):
            await self._hold(batch_id)
            if (await self.batches.get(batch_id) or {}).get("status") != "in_progress":
                return  # cancelled (or gone) meanwhile: enqueue no more
            # validated already: no LineError
            lines = [parse_line(raw, batch["endpoint"], self.settings) async for raw in taking_turns(raws, self.pacer)]
            await self._enqueue_chunk(batch_id, batch, lines)
            await self.batches.set(batch_id, {"cursor": after.index, "cursor_offset": after.offset,
                                              "cursor_line": after.line})
            if self._closing.is_set():
                return

    def _line_fields(self, batch_id: str, batch: dict[str, str], line: Line, submitted_at: float,
                     ) -> tuple[str, RequestSpec, dict[str, object]]:
        """A line's id, its request (its metadata naming the batch) and its new record."""
        line_id = Keys.batch_line(batch_id, line.index)
        spec = line.call.spec
        update = {"metadata": {**spec.metadata, BATCH_METADATA_KEY: batch_id}}
        if batch.get("run_model", spec.model) != spec.model:  # a fine-tuned model: run as its base and adapter
            update.update(model=batch["run_model"], adapter=batch.get("run_adapter"))
        spec = spec.model_copy(update=update)
        record = base_fields(line_id, spec, submitted_at, "batch", batch.get("tenant") or None, "bulk")
        record.update(custom_id=line.custom_id, batch_counts=self.keys.batch(batch_id))
        return line_id, spec, record

    async def _enqueue_chunk(self, batch_id: str, batch: dict[str, str], lines: list[Line]) -> None:
        # 1) the records, where missing
        submitted_at = time.time()
        made = [self._line_fields(batch_id, batch, line, submitted_at) async for line in taking_turns(lines, self.pacer)]
        statuses = []
        for part in in_slices(made):
            statuses += await self.batches.create_lines([(line_id, record) for line_id, _, record in part],
                                                        self.keys.result_ttl_seconds)
        # 2) the messages of lines no worker has taken yet, on the bulk lane, all acked
        tenant = batch.get("tenant") or None
        sent = []
        async for (line_id, spec, _), status in taking_turns(zip(made, statuses), self.pacer):
            if status not in ("created", "queued"):
                continue  # a resumed chunk: a worker has it already
            message = RequestMessage.model_construct(
                v=1, id=line_id, tenant=tenant, submitted_at=datetime.fromtimestamp(submitted_at, timezone.utc),
                **{name: getattr(spec, name) for name in RequestSpec.model_fields})
            sent.append(await self.producer.send(self.settings.bulk_topic_name, message.to_bytes(),
                                                 key=line_id.encode(), headers=JSON_HEADERS))
        async with asyncio.timeout(self.settings.produce_timeout_seconds * 4):
            await asyncio.gather(*sent)
        self.stats.lines_enqueued += len(sent)
        self.metrics.batch_lines_enqueued.inc(len(sent))

    # ---- ending: finalize, cancel, expire -------------------------------------------------

    async def _finalize(self, batch_id: str, batch: dict[str, str]) -> None:
        output, errors = await self._write_outputs(batch_id, batch)
        if await self.batches.move(batch_id, ["finalizing"], "completed",
                                   {"completed_at": time.time(), **output, **errors}):
            log.info("batch_completed", lines=int(batch["total"]))
        await self._ended(batch_id)

    async def _cancelling(self, batch_id: str, batch: dict[str, str]) -> None:
        """Lines not yet running are cancelled (those never enqueued too); running ones
        finish; then the files of what finished, and `cancelled`."""
        if not batch.get("settled"):
            await self._settle(batch_id, batch, "cancelled", "cancelled", "batch_cancelled", leave_running=True)
            await self.batches.set(batch_id, {"settled": 1})
            batch = await self.batches.get(batch_id)
        if finished(batch) < int(batch.get("total", 0)):
            return  # running lines still finishing
        output, errors = await self._write_outputs(batch_id, batch)
        await self.batches.move(batch_id, ["cancelling"], "cancelled", {"cancelled_at": time.time(), **output, **errors})
        log.info("batch_cancelled", lines=int(batch.get("total", 0)))
        await self._ended(batch_id)

    async def _expire(self, batch_id: str, batch: dict[str, str]) -> None:
        """Past the completion window: every unfinished line ends `expired` (a failure, code
        `batch_expired`), running ones too; then the files, and `expired`."""
        await self._settle(batch_id, batch, "expired", "failed", "batch_expired", leave_running=False)
        output, errors = await self._write_outputs(batch_id, await self.batches.get(batch_id))
        await self.batches.move(batch_id, ["in_progress"], "expired", {"expired_at": time.time(), **output, **errors})
        log.info("batch_expired", lines=int(batch.get("total", 0)))
        await self._ended(batch_id)

    async def _settle(self, batch_id: str, batch: dict[str, str], status: str, counter: str, code: str,
                      leave_running: bool) -> None:
        """End every line of the batch not yet final (creating the records of lines never enqueued)."""
        total = int(batch.get("total", 0))
        if total == 0:
            return
        path = self.files.content_path(batch["input_file_id"])
        now = time.time()
        async for raws, _ in read_lines(path, self.settings.batch_enqueue_chunk):
            await self._hold(batch_id)
            made = [self._line_fields(batch_id, batch, parse_line(raw, batch["endpoint"], self.settings), now)
                    async for raw in taking_turns(raws, self.pacer) if raw.index < total]
            await self.batches.settle_lines([(line_id, record) for line_id, _, record in made], status, counter,
                                            (code, NOT_RUN[code]), leave_running, self.keys.result_ttl_seconds)

    async def _write_outputs(self, batch_id: str, batch: dict[str, str]) -> tuple[dict, dict]:
        """The output file (lines that succeeded) and the error file (the rest), streamed from
        the lines' records a chunk at a time; ({}, {}) where a file has no lines."""
        kind = ENDPOINTS[batch["endpoint"]]
        # The answer's shape needs only the endpoint's kind and the model (no spec).
        call = OpenAICall(spec=None, kind=kind, model=batch.get("model") or "", stream=False,  # type: ignore[arg-type]
                          include_usage=False)
        total = int(batch.get("total", 0))
        path = self.files.content_path(batch["input_file_id"])
        output_path = self.files.root / f".{batch_id}.output"
        error_path = self.files.root / f".{batch_id}.errors"
        async with _Spool(output_path) as output, _Spool(error_path) as errors:
            async for raws, _ in read_lines(path, self.settings.batch_enqueue_chunk):
                await self._hold(batch_id)
                raws = [raw for raw in raws if raw.index < total]
                ids = [Keys.batch_line(batch_id, raw.index) for raw in raws]
                records = [record for part in in_slices(ids) for record in await self.batches.line_records(part)]
                async for raw, line_id, record in taking_turns(zip(raws, ids, records), self.pacer):
                    ok, text = result_line(call, line_id, json.loads(raw.data)["custom_id"], record)
                    (output if ok else errors).add(text)
                await output.flush()
                await errors.flush()
        tenant = batch.get("tenant") or None
        out_meta = await self.files.adopt(output_path, f"{batch_id}_output.jsonl", tenant)
        err_meta = await self.files.adopt(error_path, f"{batch_id}_error.jsonl", tenant)
        return ({"output_file_id": out_meta["id"]} if out_meta else {},
                {"error_file_id": err_meta["id"]} if err_meta else {})


class _Spool:
    """Lines appended to a file a chunk at a time, off the event loop."""

    def __init__(self, path) -> None:
        self.path = path
        self._pending: list[bytes] = []
        self._file = None

    async def __aenter__(self) -> _Spool:
        self._file = await asyncio.to_thread(open, self.path, "wb")
        return self

    def add(self, line: bytes) -> None:
        self._pending.append(line)

    async def flush(self) -> None:
        data, self._pending = b"".join(self._pending), []
        if data:
            await asyncio.to_thread(self._file.write, data)

    async def __aexit__(self, *exc) -> None:
        await asyncio.to_thread(self._file.close)
