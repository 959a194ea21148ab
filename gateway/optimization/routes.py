"""`/v1/optimization/jobs`: a job that turns a source model (the base model, or a
fine-tuned or optimized model of the caller's key) into an optimized whole model by one
strategy. Checked (body, strategy, source, files) and, if sound, recorded `queued` and
produced to the fine-tuning topic as an OptimizationMessage, where the same trainers take
it. Read, listed (apart from fine-tuning jobs), cancelled and its events paged exactly as
a fine-tuning job is: the routes are fine-tuning's, with this kind's ids and objects."""

from __future__ import annotations

import secrets
import time
from typing import get_args

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from gateway.errors import redis_down
from gateway.fine_tuning.routes import FineTuningRoutes, JobKind, parse_job_body
from gateway.openai_compat import OpenAIError
from gateway.optimization.objects import EVENT_ID, EVENT_OBJECT, EVENT_PREFIX, job_object
from shared.optimization import (
    JOB_ID,
    OptimizationJobCreate,
    OptimizationMessage,
    StrategyType,
    optimized_name,
    root_model,
)
from shared.training import JobStatus, split_fine_tuned

log = structlog.get_logger(__name__)

PATHS = ("/v1/optimization/jobs", "/v1/optimization/jobs/{id}", "/v1/optimization/jobs/{id}/cancel",
         "/v1/optimization/jobs/{id}/events")
OPTIMIZATION = JobKind("optimization job", JOB_ID, job_object, EVENT_PREFIX, EVENT_OBJECT, EVENT_ID, "optimization")
# The strategies' `type`s: the tags of the `strategy` union in pydantic's error locations.
STRATEGY_TAGS = frozenset(get_args(StrategyType))
# Strategies whose output holds quantized weights: no strategy runs on those again (they
# would quantize or prune what is no longer a float weight); their source is named instead.
QUANTIZED = frozenset({"int8_dynamic", "weight_only", "qat"})


def parse_body(raw: bytes) -> OptimizationJobCreate:
    """The body of POST /v1/optimization/jobs; OpenAIError (400, with `param`) if refused."""
    return parse_job_body(raw, OptimizationJobCreate, STRATEGY_TAGS)


def _bad_model(message: str, code: str = "invalid_value") -> OpenAIError:
    return OpenAIError(400, f"Invalid 'model': {message}", "model", code)


class OptimizationRoutes(FineTuningRoutes):
    kind = OPTIMIZATION

    def routes(self) -> list[web.RouteDef]:
        jobs, job, cancel, events = PATHS
        return [web.post(jobs, self.create_job), web.get(jobs, self.list_jobs), web.get(job, self.get_job),
                web.post(cancel, self.cancel_job), web.get(events, self.list_events)]

    async def create_job(self, request: web.Request) -> web.Response:
        gw = self.gateway
        # 1) who, and what: the body, the source model, the files (the caller's, for fine-tuning)
        tenant = await gw.authenticate(request)
        body = parse_body(await gw.read_body(request))
        base_model = await self._check_source(body, tenant)
        training = await self._own_file(body.training_file, tenant, "training_file") \
            if body.training_file is not None else None
        validation = await self._own_file(body.validation_file, tenant, "validation_file") \
            if body.validation_file is not None else None
        # 2) the job, recorded while its files are checked
        job_id = f"optjob-{secrets.token_hex(12)}"
        structlog.contextvars.bind_contextvars(job_id=job_id)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        message = OptimizationMessage(
            id=job_id, tenant=tenant, model=body.model, base_model=base_model, strategy=body.strategy,
            training_file=body.training_file, validation_file=body.validation_file, seed=seed,
            optimized_model=optimized_name(body.model, body.suffix, body.strategy, job_id))
        fields = {"status": JobStatus.validating_files.value, "model": body.model, "base_model": base_model,
                  "strategy": body.strategy.model_dump(mode="json"), "training_file": body.training_file,
                  "validation_file": body.validation_file, "suffix": body.suffix, "seed": seed,
                  "metadata": body.metadata or None, "optimized_model": message.optimized_model}
        files = [f for f in (body.training_file, body.validation_file) if f is not None]
        try:
            await gw.training.create(job_id, tenant, fields, time.time(), index=self.kind.index)
            await gw.training.add_event(job_id, f"Created optimization job: {job_id} ({body.strategy.type} "
                                                f"of {body.model})")
            if files:
                await gw.training.add_event(job_id, f"Validating files: {', '.join(files)}")
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        return await self._queue_checked(job_id, message, training, validation)

    async def _check_source(self, body: OptimizationJobCreate, tenant: str | None) -> str:
        """The base model the source derives from; 400 (`param` model) for a source this key
        can't optimize: a model trainers don't train, a derived model not published for this
        key, a source the strategy can't take (merge_lora: a LoRA fine-tune only)."""
        model, strategy = body.model, body.strategy.type
        try:
            trainable = await self.gateway.training.trainable()
            entry = await self.gateway.training.published(model) if split_fine_tuned(model) else None
        except (RedisError, OSError) as exc:
            raise redis_down(exc) from exc
        base = root_model(model)
        if trainable and base not in trainable:
            raise _bad_model(f"{model!r} can't be optimized here (trainers' models: {', '.join(sorted(trainable))})",
                             "model_not_found")
        if split_fine_tuned(model) is None:
            if strategy == "merge_lora":
                raise _bad_model(f"{model!r} is a base model; merge_lora needs a LoRA fine-tune (its "
                                 "fine_tuned_model name)")
            return base
        if entry is None or (self.gateway.settings.auth and entry.get("tenant") != tenant):
            raise _bad_model(f"no such model: {model!r}", "model_not_found")
        method = entry.get("method", "lora")
        if strategy == "merge_lora" and method != "lora":
            raise _bad_model(f"{model!r} is not a LoRA fine-tune (its method is {method!r}); merge_lora merges a "
                             "LoRA adapter into its base")
        if entry.get("strategy") in QUANTIZED:
            raise _bad_model(f"{model!r} holds quantized weights ({entry['strategy']}); optimize its source "
                             "model instead")
        return base
