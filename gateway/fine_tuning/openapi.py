"""The `/v1/fine_tuning/jobs` operations of the gateway's OpenAPI document, in
OpenAI's shapes (fine_tuning.job, .event, .checkpoint, lists, OpenAI's error body),
with llmq's methods and hyperparameters from the same pydantic models that check them."""

from __future__ import annotations

from gateway.fine_tuning.objects import CHECKPOINT_ID, EVENT_ID, OPENAI_HYPERPARAMETERS
from gateway.fine_tuning.routes import CHECKPOINT_PAGE, EVENT_PAGE, JOB_PAGE
from gateway.openapi_shapes import NULLABLE_INT as _NULLABLE_INT
from gateway.openapi_shapes import NULLABLE_STR as _NULLABLE_STR
from gateway.openapi_shapes import error_response as _error
from gateway.openapi_shapes import list_of as _list
from gateway.openapi_shapes import ok_response as _ok
from gateway.openapi_shapes import query_param as _query
from shared.training import JOB_ID, JobCreate, JobStatus

_REF = "#/components/schemas/{model}"
_NULLABLE_OBJECT = {"type": ["object", "null"]}
_AUTO_OR_NUMBER = {"anyOf": [{"const": "auto"}, {"type": "number"}]}

JOB = {"type": "object", "required": [
    "id", "object", "created_at", "model", "organization_id", "result_files", "status", "training_file",
    "hyperparameters", "seed"],
    "properties": {
        "id": {"type": "string", "pattern": JOB_ID.pattern}, "object": {"const": "fine_tuning.job"},
        "created_at": {"type": "integer"}, "finished_at": _NULLABLE_INT, "model": {"type": "string"},
        "fine_tuned_model": {**_NULLABLE_STR, "description": "The served name of the output (what `model` names "
                             "to use it); null until the job succeeded."},
        "organization_id": {"type": "string", "description": "The API key's name (`llmq` with auth off)."},
        "result_files": {"type": "array", "items": {"type": "string"}},
        "status": {"enum": [s.value for s in JobStatus]},
        "training_file": {"type": "string"}, "validation_file": _NULLABLE_STR,
        "hyperparameters": {"type": "object", "properties": {n: _AUTO_OR_NUMBER for n in OPENAI_HYPERPARAMETERS}},
        "method": {"type": "object", "required": ["type"],
                   "properties": {"type": {"enum": ["lora", "adapter", "full"]}},
                   "description": "`{type, <type>: {hyperparameters}}`: every hyperparameter of the method."},
        "trained_tokens": _NULLABLE_INT,
        "error": {"type": ["object", "null"], "required": ["code", "message"], "properties": {
            "code": {"type": "string"}, "message": {"type": "string"}, "param": _NULLABLE_STR}},
        "seed": {"type": "integer"}, "estimated_finish": _NULLABLE_INT,
        "integrations": {"type": ["array", "null"], "maxItems": 0},
        "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
        "user_provided_suffix": _NULLABLE_STR,
        "progress": {**_NULLABLE_OBJECT, "description": "llmq's: the trainer's last step: `step`, `total_steps`, "
                     "`epoch`, `train_loss`, `eval_loss`, `learning_rate`, `tokens_per_second`, `eta_seconds`."},
        "eval": {**_NULLABLE_OBJECT, "description": "llmq's: quality figures on the validation data before and "
                 "after training."},
    }}
EVENT = {"type": "object", "required": ["id", "object", "created_at", "level", "message"], "properties": {
    "id": {"type": "string", "pattern": EVENT_ID.pattern}, "object": {"const": "fine_tuning.job.event"},
    "created_at": {"type": "integer"}, "level": {"enum": ["info", "warn", "error"]}, "message": {"type": "string"},
    "type": {"enum": ["message", "metrics"]}, "data": {"type": "object"}}}
CHECKPOINT = {"type": "object", "required": [
    "id", "object", "created_at", "fine_tuned_model_checkpoint", "step_number", "metrics", "fine_tuning_job_id"],
    "properties": {
        "id": {"type": "string", "pattern": CHECKPOINT_ID.pattern}, "object": {"const": "fine_tuning.job.checkpoint"},
        "created_at": {"type": "integer"}, "fine_tuned_model_checkpoint": {"type": "string"},
        "step_number": {"type": "integer"}, "metrics": {"type": "object", "additionalProperties": {"type": "number"}},
        "fine_tuning_job_id": {"type": "string"}}}


def page_params(bounds: tuple[int, int], after: str) -> list[dict]:
    default, most = bounds
    return [_query("after", {"type": "string"}, after),
            _query("limit", {"type": "integer", "minimum": 1, "maximum": most}, f"Page size (default {default}).")]


def job_body_schema() -> tuple[dict, dict]:
    """(the body's schema, the schemas it refers to)."""
    schema = JobCreate.model_json_schema(ref_template=_REF)
    defs = schema.pop("$defs")
    schema["properties"]["integrations"] = {"type": ["array", "null"], "maxItems": 0,
                                            "description": "OpenAI's integrations are not offered: none may be given."}
    schema["description"] = (
        "OpenAI's body. `method.type` is `lora` (the default; OpenAI's `supervised` is read as it), `adapter` "
        "((IA)^3) or `full`; only the chosen type's settings may be given. `hyperparameters` beside `method` is "
        "OpenAI's older form, refused when `method` is given too. An (IA)^3 `feedforward_modules` entry must be "
        "in its `target_modules`.")
    return schema, defs


def job_operator(key: list):
    """op(summary, operationId, responses, **more): an operation asking for `key` (the Bearer
    key's security requirement, or none), answering 401 and 503 as every job operation does."""
    unauthorized = _error("No API key, or an unknown or revoked one (when auth is on).")
    unavailable = _error("Redis or the broker is unreachable.")

    def op(summary: str, operation_id: str, responses: dict, **more) -> dict:
        return {"summary": summary, "operationId": operation_id, "security": key,
                "responses": {**responses, "401": unauthorized, "503": unavailable}, **more}

    return op


def job_paths(op, prefix: str, noun: str, stem: str, job: dict, event: dict, job_id_pattern: str,
              read: str, openai: bool = False) -> dict:
    """The operations every kind of trainer job has: list, read, cancel, events. `noun`
    ("fine-tuning"), `stem` of the operation ids ("FineTuning"), `read`: what reading returns."""
    no_job = _error("No such job, or another API key's.")
    job_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "pattern": job_id_pattern}}
    whose = " (OpenAI)" if openai else ""
    return {
        prefix: {"get": op(f"List this key's {noun} jobs, newest first{whose}", f"list{stem}Jobs", {
            "200": _ok("A page of jobs.", _list(job)),
            "400": _error("`limit` out of range."),
        }, parameters=page_params(JOB_PAGE, "The id of the last job of the previous page."))},
        f"{prefix}/{{id}}": {"get": op(f"Read a {noun} job{whose}", f"retrieve{stem}Job",
                                       {"200": _ok(read, job), "404": no_job}, parameters=[job_id])},
        f"{prefix}/{{id}}/cancel": {"post": op(f"Cancel a {noun} job{whose}", f"cancel{stem}Job", {
            "200": _ok("`cancelled` (it had not started, or was cancelled before), or `running` with the "
                       "cancel asked of its trainer, which ends it `cancelled` within a step.", job),
            "404": no_job,
            "409": _error("The job already ended `succeeded` or `failed`."),
        }, parameters=[job_id])},
        f"{prefix}/{{id}}/events": {"get": op(f"List a {noun} job's events, newest first{whose}",
                                              f"list{stem}Events", {
            "200": _ok("A page of events.", _list(event)),
            "400": _error("`limit` out of range, or `after` is not an event of this job."),
            "404": no_job,
        }, parameters=[job_id, *page_params(EVENT_PAGE, "The id of the last event of the previous page.")])},
    }


def fine_tuning_paths(key: list) -> dict:
    """The operations, each asking for `key` (the Bearer key's security requirement, or none)."""
    op = job_operator(key)
    body, _ = job_body_schema()
    paths = job_paths(op, "/v1/fine_tuning/jobs", "fine-tuning", "FineTuning", JOB, EVENT, JOB_ID.pattern,
                      "The job, with llmq's `progress` and `eval`.", openai=True)
    paths["/v1/fine_tuning/jobs"]["post"] = op("Create a fine-tuning job (OpenAI)", "createFineTuningJob", {
        "200": _ok("The job: `queued` (on the fine-tuning topic for a trainer), or `failed` at once with "
                   "`error.code` `invalid_training_file` / `invalid_validation_file` naming the line a "
                   "trainer would refuse.", JOB),
        "400": _error("Not valid JSON; a parameter missing, unknown or out of range (`param` names it); "
                      "settings that don't go together (`invalid_combination`); `integrations` "
                      "(`unsupported_parameter`); a file that is not the caller's or not uploaded with "
                      "purpose `fine-tune` (`param`: training_file or validation_file); a `model` trainers "
                      "don't train (`model_not_found`) or a fine-tuned one."),
        "413": _error("The body is over LLMQ_MAX_BODY_BYTES."),
        "415": _error("Content-Type is not application/json."),
    }, requestBody={"required": True, "content": {"application/json": {"schema": body}}})
    job_id = paths["/v1/fine_tuning/jobs/{id}"]["get"]["parameters"][0]
    paths["/v1/fine_tuning/jobs/{id}/checkpoints"] = {"get": op(
        "List a fine-tuning job's checkpoints, newest first (OpenAI)", "listFineTuningJobCheckpoints", {
            "200": _ok("A page of checkpoints.", _list(CHECKPOINT)),
            "400": _error("`limit` out of range, or `after` is not a checkpoint of this job."),
            "404": _error("No such job, or another API key's."),
        }, parameters=[job_id, *page_params(CHECKPOINT_PAGE, "The id of the last checkpoint of the previous page.")])}
    return paths


def fine_tuning_defs() -> dict:
    return job_body_schema()[1]
