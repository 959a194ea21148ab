"""`/v1/fine_tuning/jobs`: OpenAI's fine-tuning API. A job is checked (body,
hyperparameters, model, files and every line of their content) and, if sound,
recorded `queued` and produced to the fine-tuning topic, where a trainer takes it;
a file a trainer would refuse fails the job at once, naming the line. Jobs belong
to the API key that made them: any other key gets a 404, as for requests."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from gateway.errors import redis_down
from gateway.fine_tuning.objects import (
    CHECKPOINT_ID,
    EVENT_ID,
    checkpoint_object,
    cursor_index,
    event_object,
    job_object,
)
from gateway.fine_tuning.validation import ContentError, check_file
from gateway.openai_compat import OpenAIError
from shared.training import JOB_ID, JobCreate, JobStatus, TrainingMessage, fine_tuned_name, split_fine_tuned

if TYPE_CHECKING:
    from gateway.app import Gateway

log = structlog.get_logger(__name__)

PATHS = ("/v1/fine_tuning/jobs", "/v1/fine_tuning/jobs/{id}", "/v1/fine_tuning/jobs/{id}/cancel",
         "/v1/fine_tuning/jobs/{id}/events", "/v1/fine_tuning/jobs/{id}/checkpoints")
PURPOSE = "fine-tune"
# OpenAI's defaults and bounds of `limit`: (default, most) per list.
JOB_PAGE = (20, 100)
EVENT_PAGE = (20, 100)
CHECKPOINT_PAGE = (10, 100)
# Parts of a pydantic error's location that name a union's member, not a field.
_FIELD = re.compile(r"^[a-z_][a-z0-9_]*$")
Body = TypeVar("Body", bound=BaseModel)
_TYPE_TAGS = {"int", "float", "str", "bool", "list", "dict", "none"}


@dataclass(frozen=True)
class JobKind:
    """What tells the jobs the trainers run apart on the gateway's side: fine-tuning jobs
    (OpenAI's) and optimization jobs share the store, the checks and the flow, not their
    ids, objects or per-key lists."""

    noun: str  # "fine-tuning job", in errors and logs
    job_id: re.Pattern
    job_object: Callable[[dict], dict]
    event_prefix: str
    event_object: str
    event_id: re.Pattern
    index: str  # TrainingStore's per-key list

    def not_found(self, job_id: str) -> OpenAIError:
        return OpenAIError(404, f"No such {self.noun}: '{job_id}'", "id", "not_found")


FINE_TUNING = JobKind("fine-tuning job", JOB_ID, job_object, "ftevent", "fine_tuning.job.event", EVENT_ID,
                      "fine_tuning")


def _limit(request: web.Request, default: int, maximum: int) -> int:
    raw = request.query.get("limit", str(default))
    if not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise OpenAIError(400, f"Invalid 'limit': must be 1 to {maximum}", "limit", "invalid_value")
    return int(raw)


def _param(error: dict, top_level: tuple[str, ...], tags: Collection[str] = ()) -> str | None:
    """The body parameter a validation error is about, dotted (`method.lora.hyperparameters.rank`)."""
    parts = [str(p) for p in error["loc"]
             if isinstance(p, str) and _FIELD.match(p) and p not in _TYPE_TAGS and p not in tags]
    if parts:
        return ".".join(parts)
    # A check across fields (the body's own): the parameter its message names first.
    named = [(error["msg"].find(name), name) for name in top_level if name in error["msg"]]
    return min(named)[1] if named else None


def parse_job_body(raw: bytes, body: type[Body] = JobCreate, tags: Collection[str] = ()) -> Body:
    """A job's body (by default POST /v1/fine_tuning/jobs's); OpenAIError (400, with `param`) if refused.
    `tags`: the body's discriminated unions' tags, which pydantic puts in an error's location
    though no parameter has their name."""
    try:
        return body.model_validate_json(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        if error["type"] == "json_invalid":
            raise OpenAIError(400, "the body is not valid JSON", None, "invalid_json") from None
        param = _param(error, tuple(body.model_fields), tags)
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing":
            raise OpenAIError(400, f"Missing required parameter: '{param}'.", param,
                              "missing_required_parameter") from None
        if error["type"] == "extra_forbidden":
            raise OpenAIError(400, f"Unrecognized request argument supplied: {param}", param,
                              "unknown_parameter") from None
        # A check across parameters (a method's settings, the two forms of hyperparameters)
        # says so by its code: no JSON Schema of the body states it.
        code = "invalid_value" if error["type"] != "value_error" else \
            "unsupported_parameter" if param == "integrations" else "invalid_combination"
        raise OpenAIError(400, f"Invalid '{param}': {message}" if param else message, param, code) from None


class FineTuningRoutes:
    kind = FINE_TUNING

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def routes(self) -> list[web.RouteDef]:
        jobs, job, cancel, events, checkpoints = PATHS
        return [web.post(jobs, self.create_job), web.get(jobs, self.list_jobs), web.get(job, self.get_job),
                web.post(cancel, self.cancel_job), web.get(events, self.list_events),
                web.get(checkpoints, self.list_checkpoints)]

    # ---- create --------------------------------------------------------------------

    async def create_job(self, request: web.Request) -> web.Response:
        gw = self.gateway
        # 1) who, and what: the body, the base model, the files (the caller's, for fine-tuning)
        tenant = await gw.authenticate(request)
        body = parse_job_body(await gw.read_body(request))
        await self._check_model(body.model)
        training = await self._own_file(body.training_file, tenant, "training_file")
        validation = await self._own_file(body.validation_file, tenant, "validation_file") \
            if body.validation_file is not None else None
        # 2) the job, recorded while its files are checked
        job_id = f"ftjob-{secrets.token_hex(12)}"
        structlog.contextvars.bind_contextvars(job_id=job_id)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        message = TrainingMessage(id=job_id, tenant=tenant, model=body.model, training_file=body.training_file,
                                  validation_file=body.validation_file, method=body.method, seed=seed,
                                  fine_tuned_model=fine_tuned_name(body.model, body.suffix, job_id))
        fields = {"status": JobStatus.validating_files.value, "model": body.model,
                  "training_file": body.training_file, "validation_file": body.validation_file,
                  "method": body.method.model_dump(mode="json", exclude_none=True),
                  "hyperparameters": body.method.hyperparameters.model_dump(mode="json"),
                  "suffix": body.suffix, "seed": seed, "metadata": body.metadata or None,
                  "fine_tuned_model": message.fine_tuned_model}
        try:
            await gw.training.create(job_id, tenant, fields, time.time())
            await gw.training.add_event(job_id, f"Created fine-tuning job: {job_id}")
            await gw.training.add_event(job_id, "Validating training file: " + body.training_file + (
                f" and validation file: {body.validation_file}" if body.validation_file else ""))
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        return await self._queue_checked(job_id, message, training, validation)

    async def _queue_checked(self, job_id: str, message, training: dict | None,
                             validation: dict | None) -> web.Response:
        """The recorded job's files checked line by line (off the event loop), then the job
        queued and produced, or failed naming the line; answered with the job as it then is."""
        problem = await self._check_content(training, validation)
        if problem is not None:
            await self._fail(job_id, problem.as_error(), problem.message)
        else:
            await self._enqueue(job_id, message)
        return web.json_response(self.kind.job_object(await self._get(job_id)))

    async def _check_model(self, model: str) -> None:
        """400 for a model trainers don't train (when they registered what they do) or a
        fine-tuned one (training on top of an output is not offered)."""
        if split_fine_tuned(model) is not None:
            raise OpenAIError(400, f"Invalid 'model': {model!r} is a fine-tuned model; fine-tuning a fine-tuned "
                              "model is not offered yet, name its base model", "model", "invalid_value")
        try:
            trainable = await self.gateway.training.trainable()
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        if trainable and model not in trainable:
            raise OpenAIError(400, f"The model {model!r} can't be fine-tuned here (trainable: "
                              f"{', '.join(sorted(trainable))})", "model", "model_not_found")

    async def _own_file(self, file_id: str, tenant: str | None, param: str) -> dict:
        """The file's metadata if it is the caller's and meant for fine-tuning; 400 naming `param` otherwise."""
        gw = self.gateway
        meta = await gw.files.meta(file_id)
        if meta is None or (gw.settings.auth and meta.get("tenant") != tenant):
            raise OpenAIError(400, f"Invalid '{param}': no such file: '{file_id}'", param, f"invalid_{param}")
        if meta["purpose"] != PURPOSE:
            raise OpenAIError(400, f"Invalid '{param}': file '{file_id}' has purpose {meta['purpose']!r}; upload it "
                              f"with purpose {PURPOSE!r}", param, f"invalid_{param}")
        return meta

    async def _check_content(self, training: dict, validation: dict | None) -> ContentError | None:
        for meta, param in ((training, "training_file"), (validation, "validation_file")):
            if meta is None:
                continue
            try:
                _, problem = await asyncio.to_thread(check_file, self.gateway.files.content_path(meta["id"]),
                                                     meta["id"], param)
            except OSError as exc:  # deleted since its metadata was read, or unreadable
                reason = "the file was deleted" if isinstance(exc, FileNotFoundError) else "the file can't be read"
                problem = ContentError(f"invalid_{param}", f"{param} {meta['id']}: {reason}", param)
            if problem is not None:
                return problem
        return None

    async def _fail(self, job_id: str, error: dict, message: str) -> None:
        try:
            await self.gateway.training.end(job_id, None, JobStatus.failed, {"error": error})
            await self.gateway.training.add_event(job_id, f"Job failed: {message}", level="error")
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        log.info("training_job_failed_validation", kind=self.kind.index, code=error["code"])

    async def _enqueue(self, job_id: str, message: BaseModel) -> None:
        """`queued`, then on the topic: queued first, as a trainer may claim the job as soon
        as it reads it. A broker that doesn't ack fails the job (a late delivery finds it
        final and is skipped) and answers 503: nothing is left to run that the client was
        told was refused."""
        gw = self.gateway
        try:
            if not await gw.training.queue(job_id):
                return  # cancelled while its files were checked: nothing to run
            await gw.training.add_event(job_id, "Files validated, moving job to queued state")
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        try:
            await gw.produce(gw.settings.fine_tuning_topic, job_id, message.model_dump_json().encode())
        except Exception as exc:
            log.warning("broker_unavailable", error=repr(exc))
            try:
                await gw.training.end(job_id, None, JobStatus.failed, {"error": {
                    "code": "broker_unavailable", "message": "the queue was unreachable; the job was not queued",
                    "param": None}})
            except (RedisError, OSError):
                log.warning("job_cleanup_failed")
            raise OpenAIError(503, "the queue is unreachable; the job was not queued", None, "broker_unavailable",
                              "server_error", {"Retry-After": "1"}) from exc
        log.info("training_job_queued", kind=self.kind.index)

    # ---- read, list, cancel --------------------------------------------------------

    async def _get(self, job_id: str) -> dict:
        try:
            job = await self.gateway.training.get(job_id)
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        if job is None:  # expired in between
            raise self.kind.not_found(job_id)
        return job

    async def _owned_job(self, request: web.Request) -> dict:
        gw = self.gateway
        tenant = await gw.authenticate(request)
        job_id = request.match_info["id"]
        if not self.kind.job_id.match(job_id):
            raise self.kind.not_found(job_id)
        job = await self._get(job_id)
        if gw.settings.auth and job.get("tenant") != tenant:
            raise self.kind.not_found(job_id)
        return job

    async def get_job(self, request: web.Request) -> web.Response:
        return web.json_response(self.kind.job_object(await self._owned_job(request)))

    async def list_jobs(self, request: web.Request) -> web.Response:
        gw = self.gateway
        tenant = await gw.authenticate(request)
        limit = _limit(request, *JOB_PAGE)
        try:
            jobs, more = await gw.training.page(tenant, request.query.get("after"), limit, self.kind.index)
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        return web.json_response(_page([self.kind.job_object(j) for j in jobs], more))

    async def cancel_job(self, request: web.Request) -> web.Response:
        """A job not started yet is cancelled at once; a running one is asked to stop (its
        trainer ends it `cancelled` within a step); an ended one can't be (409)."""
        job = await self._owned_job(request)
        job_id = str(job["id"])
        training = self.gateway.training
        try:
            status = await training.cancel(job_id)
            if status is None:
                raise self.kind.not_found(job_id)
            if status == JobStatus.cancelled.value and job["status"] != status:
                await training.add_event(job_id, "Job cancelled before it started")
            elif status == JobStatus.running.value and not job.get("cancel_requested"):
                await training.add_event(job_id, "Cancellation requested; the trainer stops at its next step")
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        if status in (JobStatus.succeeded.value, JobStatus.failed.value):
            raise OpenAIError(409, f"The job already ended {status}; it can't be cancelled", None,
                              "job_not_cancellable")
        log.info("training_job_cancel", kind=self.kind.index, status=status)
        return web.json_response(self.kind.job_object(await self._get(job_id)))

    async def list_events(self, request: web.Request) -> web.Response:
        job = await self._owned_job(request)
        job_id = str(job["id"])
        limit = _limit(request, *EVENT_PAGE)
        after = request.query.get("after")
        before = None
        if after is not None:
            before = cursor_index(self.kind.event_id, job_id, after)
            if before is None:
                raise OpenAIError(400, f"Invalid 'after': {after!r} is not an event of this job", "after",
                                  "invalid_value")
        try:
            events, more = await self.gateway.training.events(job_id, before, limit)
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        return web.json_response(_page([event_object(job_id, e, self.kind.event_prefix, self.kind.event_object)
                                        for e in events], more))

    async def list_checkpoints(self, request: web.Request) -> web.Response:
        """Newest first, as OpenAI lists them."""
        job = await self._owned_job(request)
        job_id = str(job["id"])
        limit = _limit(request, *CHECKPOINT_PAGE)
        try:
            saved = await self.gateway.training.checkpoints(job_id)
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        end = len(saved)
        after = request.query.get("after")
        if after is not None:
            end = cursor_index(CHECKPOINT_ID, job_id, after)
            if end is None:
                raise OpenAIError(400, f"Invalid 'after': {after!r} is not a checkpoint of this job", "after",
                                  "invalid_value")
        indexes = list(range(min(end, len(saved)) - 1, -1, -1))
        data = [checkpoint_object(job, i, saved[i]) for i in indexes[:limit]]
        return web.json_response(_page(data, len(indexes) > limit))


def _page(data: list[dict], more: bool) -> dict:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}
