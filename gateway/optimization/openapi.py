"""The `/v1/optimization/jobs` operations of the gateway's OpenAPI document: the job's
body from the same pydantic model that checks it (each strategy and its settings), the
`optimization.job` object and its events, in the shapes fine-tuning's operations use."""

from __future__ import annotations

from gateway.fine_tuning.openapi import job_operator, job_paths
from gateway.openapi_shapes import NULLABLE_INT as _NULLABLE_INT
from gateway.openapi_shapes import NULLABLE_STR as _NULLABLE_STR
from gateway.openapi_shapes import error_response as _error
from gateway.openapi_shapes import ok_response as _ok
from gateway.optimization.objects import EVENT_ID
from shared.optimization import JOB_ID, OptimizationJobCreate
from shared.training import JobStatus

_REF = "#/components/schemas/{model}"
_NULLABLE_OBJECT = {"type": ["object", "null"]}

JOB = {"type": "object", "required": ["object", "id", "model", "strategy", "status", "seed", "created_at"],
       "properties": {
           "object": {"const": "optimization.job"}, "id": {"type": "string", "pattern": JOB_ID.pattern},
           "model": {"type": "string", "description": "The source model."},
           "strategy": {"type": "object", "required": ["type"], "description": "The strategy and every setting."},
           "status": {"enum": [s.value for s in JobStatus]},
           "optimized_model": {**_NULLABLE_STR, "description": "The served name of the output (what `model` names "
                               "to use it; a worker started with LLMQ_MODEL set to it serves it); null until the "
                               "job succeeded."},
           "training_file": _NULLABLE_STR, "validation_file": _NULLABLE_STR,
           "eval": {**_NULLABLE_OBJECT, "description": "Quality on held-out examples `before` and `after`: "
                    "`eval_loss`, `perplexity`, `n_eval`, `accuracy` (short answers)."},
           "figures": {**_NULLABLE_OBJECT, "description": "What the strategy did, measured on its output: "
                       "parameters, shapes, sparsity, `size_bytes` on disk."},
           "error": {"type": ["object", "null"], "required": ["code", "message"], "properties": {
               "code": {"type": "string"}, "message": {"type": "string"}, "param": _NULLABLE_STR}},
           "seed": {"type": "integer"},
           "metadata": {"type": ["object", "null"], "additionalProperties": {"type": "string"}},
           "user_provided_suffix": _NULLABLE_STR,
           "progress": {**_NULLABLE_OBJECT, "description": "The short fine-tune's last step (QAT, a recovery)."},
           "created_at": {"type": "integer"}, "finished_at": _NULLABLE_INT, "estimated_finish": _NULLABLE_INT,
       }}
EVENT = {"type": "object", "required": ["id", "object", "created_at", "level", "message"], "properties": {
    "id": {"type": "string", "pattern": EVENT_ID.pattern}, "object": {"const": "optimization.job.event"},
    "created_at": {"type": "integer"}, "level": {"enum": ["info", "warn", "error"]}, "message": {"type": "string"},
    "type": {"enum": ["message", "metrics"]}, "data": {"type": "object"}}}
def job_body_schema() -> tuple[dict, dict]:
    """(the body's schema, the schemas it refers to)."""
    schema = OptimizationJobCreate.model_json_schema(ref_template=_REF)
    defs = schema.pop("$defs")
    schema["description"] = (
        "`strategy.type` picks the strategy; its settings sit beside it. `training_file` is required for `qat` "
        "and for pruning with a `recovery`. `model` is a base model trainers train, or a fine-tuned or optimized "
        "model of the caller's key; `merge_lora` needs a LoRA fine-tune; a quantized model is not optimized "
        "again.")
    return schema, defs


def optimization_paths(key: list) -> dict:
    """The operations, each asking for `key` (the Bearer key's security requirement, or none)."""
    op = job_operator(key)
    body, _ = job_body_schema()
    paths = job_paths(op, "/v1/optimization/jobs", "optimization", "Optimization", JOB, EVENT, JOB_ID.pattern,
                      "The job, with its `eval` and `figures` once it ran.")
    paths["/v1/optimization/jobs"]["post"] = op("Create an optimization job", "createOptimizationJob", {
        "200": _ok("The job: `queued` (on the fine-tuning topic for a trainer), or `failed` at once with "
                   "`error.code` `invalid_training_file` / `invalid_validation_file` naming the line a "
                   "trainer would refuse.", JOB),
        "400": _error("Not valid JSON; a parameter missing, unknown or out of range, or an unknown "
                      "strategy (`param` names it); a file that is not the caller's or not uploaded with "
                      "purpose `fine-tune`; a source `model` this key can't optimize (`model_not_found`) "
                      "or the strategy can't take."),
        "413": _error("The body is over LLMQ_MAX_BODY_BYTES."),
        "415": _error("Content-Type is not application/json."),
    }, requestBody={"required": True, "content": {"application/json": {"schema": body}}})
    return paths


def optimization_defs() -> dict:
    return job_body_schema()[1]
