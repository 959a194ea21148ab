"""The vLLM engine: vLLM's `AsyncLLM` run inside the worker process.

vLLM already does what base.py asks for (continuous batching, per-request
deltas, abort, multi-LoRA, priority), so this is a thin adapter: llmq's
request becomes vLLM's prompt, SamplingParams and LoRARequest, and vLLM's
RequestOutputs become llmq's GenerationOutputs. The mapping is plain
functions over plain data so it is tested here, where vLLM cannot run.

Written against vLLM 0.11 and checked against its later `main`; the files read
are named where the API shape is not obvious. vllm is an optional extra,
imported only in `start()`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from shared.schema import Params
from shared.settings import Settings
from workers.engines.base import EngineError, GenerationOutput, GenerationRequest, GenerationResult
from workers.engines.common import ADAPTER_NAME, adapter_refusal, prompt_ids

VLLM_MISSING = "LLMQ_ENGINE=vllm needs the vllm extra: pip install 'llmq[vllm]' (a CUDA machine)"

# vLLM's FinishReason strings (vllm/v1/engine/__init__.py FINISH_REASON_STRINGS:
# "stop", "length", "abort", and on later versions "error", "repetition").
# "repetition" is vLLM cutting off a looping answer: a stop, to the client.
_FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "abort", "error": "error", "repetition": "stop"}

# vllm/config/lora.py: max_lora_rank must be one of these (MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_LORA_RANK = 16  # vLLM's own default, for a worker that starts with no adapters yet


# ---- pure mapping ------------------------------------------------------------


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


class AdapterError(ValueError):
    """A request named an adapter this worker cannot serve."""


@dataclass(frozen=True)
class Adapter:
    name: str
    lora_id: int
    path: str
    rank: int


class Adapters:
    """LoRA adapters by name: one peft `save_pretrained` folder each under `root`.

    Looked up on each request, so an adapter copied in later is served without a
    restart (if its rank fits the max_lora_rank the engine started with). Each
    name gets its int id the first time it is asked for and keeps it for the
    process's life: vLLM caches loaded weights by that id ("lora_int_id must be
    globally unique for a given adapter", vllm/lora/request.py). So replacing an
    adapter's files under the same name needs a worker restart or a new name.
    """

    def __init__(self, root: str | Path | None, max_rank: int = VLLM_LORA_RANKS[-1]) -> None:
        self.root = Path(root) if root else None
        self.max_rank = max_rank
        self._known: dict[str, Adapter] = {}

    def names(self) -> list[str]:
        if self.root is None or not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if ADAPTER_NAME.fullmatch(p.name)
                      and (p / "adapter_config.json").is_file())

    def ranks(self) -> list[int]:
        return [_read_rank(self.root / name) for name in self.names()]

    def resolve(self, name: str) -> Adapter:
        if (known := self._known.get(name)) is not None:
            return known
        if (refusal := adapter_refusal(self.root, name)) is not None:
            raise AdapterError(refusal)
        folder = self.root / name
        rank = _read_rank(folder)
        if rank > self.max_rank:
            # Refused here, before vLLM: it checks the rank only when its engine
            # process loads the weights.
            raise AdapterError(f"adapter {name!r} has rank {rank}, above this worker's max_lora_rank "
                               f"{self.max_rank} (restart the worker to serve it)")
        adapter = Adapter(name, len(self._known) + 1, str(folder), rank)  # vLLM ids start at 1
        self._known[name] = adapter
        return adapter


def _read_rank(folder: Path) -> int:
    try:
        return int(json.loads((folder / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"adapter {folder.name!r} has no readable rank in adapter_config.json: {exc}") from exc


def engine_kwargs(settings: Settings, lora_rank: int | None) -> dict[str, Any]:
    """Keyword arguments of vllm.AsyncEngineArgs (vllm/engine/arg_utils.py)."""
    kwargs: dict[str, Any] = {
        "model": settings.model,
        "served_model_name": settings.served_model_name,
        "dtype": settings.dtype,  # llmq's choices are a subset of vLLM's
        "max_num_seqs": settings.batch_max_size,
        # vLLM refuses a non-zero priority under its default "fcfs" ("Got priority ...
        # but Priority scheduling is not enabled."); lower runs first in both.
        "scheduling_policy": "priority",
        "enable_lora": lora_rank is not None,
    }
    if lora_rank is not None:
        kwargs["max_loras"] = settings.max_adapters
        kwargs["max_lora_rank"] = lora_rank
    return kwargs


def _import_vllm() -> SimpleNamespace:
    """The few vLLM names this engine uses (paths as of vLLM 0.11 and its main)."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind, SamplingParams
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError as exc:
        raise EngineError(VLLM_MISSING) from exc
    except Exception as exc:  # installed but broken (no CUDA runtime, mismatched torch)
        raise EngineError(f"vllm is installed but cannot be imported: {exc}") from exc
    return SimpleNamespace(AsyncEngineArgs=AsyncEngineArgs, AsyncLLM=AsyncLLM, LoRARequest=LoRARequest,
                           SamplingParams=SamplingParams, RequestOutputKind=RequestOutputKind,
                           EngineDeadError=EngineDeadError)


# ---- the engine ----------------------------------------------------------------


class VllmEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_name = settings.served_model_name
        # vLLM decodes up to max_num_seqs at once; that is what we configure it with.
        self.max_running = settings.batch_max_size
        self._vllm: SimpleNamespace | None = None
        self._engine: Any = None  # vllm AsyncLLM
        self._tokenizer: Any = None
        self._adapters = Adapters(None)
        self._tracing = False
        self._running: set[str] = set()
        self._abort_requested: set[str] = set()

    @property
    def running(self) -> int:
        # vLLM schedules what it is handed; its own queue is not visible from here.
        return len(self._running)

    # ---- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        vllm = _import_vllm()
        # 1) Adapters present now decide the LoRA rank bound vLLM reserves memory for.
        adapters_dir = self.settings.adapters_dir
        if adapters_dir and not Path(adapters_dir).is_dir():
            raise EngineError(f"LLMQ_ADAPTERS_DIR {adapters_dir!r} is not a directory")
        try:
            lora_rank = lora_rank_bound(Adapters(adapters_dir).ranks()) if adapters_dir else None
        except AdapterError as exc:
            raise EngineError(str(exc)) from exc
        # 2) Built in the event loop's thread, as vLLM's own API server does: the
        # load blocks the loop, but the worker joins Kafka only after start().
        try:
            engine = vllm.AsyncLLM.from_engine_args(vllm.AsyncEngineArgs(**engine_kwargs(self.settings, lora_rank)))
        except Exception as exc:
            raise EngineError(f"vLLM could not load {self.settings.model!r}: {exc}") from exc
        # 3) get_tokenizer() is a coroutine in 0.11 and a plain method on later
        # versions (vllm/v1/engine/async_llm.py).
        try:
            tokenizer = engine.get_tokenizer()
            if inspect.isawaitable(tokenizer):
                tokenizer = await tokenizer
        except Exception as exc:
            engine.shutdown()
            raise EngineError(f"vLLM has no tokenizer for {self.settings.model!r}: {exc}") from exc
        tracing = await engine.is_tracing_enabled()
        self._attach(vllm, engine, tokenizer, Adapters(adapters_dir, lora_rank or 0), tracing)

    def _attach(self, vllm: SimpleNamespace, engine: Any, tokenizer: Any, adapters: Adapters,
                tracing: bool = False) -> None:
        self._vllm, self._engine, self._tokenizer, self._adapters = vllm, engine, tokenizer, adapters
        # vLLM exports its own spans only with an otlp_traces_endpoint, which this
        # engine does not set; like vLLM's API server (serving_engine.py
        # _get_trace_headers), hand it trace headers only when it traces.
        self._tracing = tracing

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()

    # ---- requests ----------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if self._engine is None:
            raise EngineError("the vllm engine is not started")
        # Registered now, not when the iterator first runs, so an abort that comes
        # before then is not lost.
        self._running.add(request.request_id)
        return self._generate(request)

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        vllm, engine, request_id = self._vllm, self._engine, request.request_id
        state = DeltaState(request_id)
        try:
            if request_id in self._abort_requested:
                yield state.end("abort", time.time())
                return
            # 1) The request in vLLM's terms; what vLLM cannot accept is this request's error.
            try:
                prompt, sampling, lora = self._to_vllm(request)
            except Exception as exc:
                yield state.fail(error_text(exc), time.time())
                return
            # 2) Run it. vLLM's generate raises a ValueError for a prompt longer than the
            # model's context and EngineGenerateError for other request-level failures:
            # both are this request's error. EngineDeadError is the engine's.
            try:
                trace_headers = (request.trace_headers or None) if self._tracing else None
                stream = engine.generate(prompt, sampling, request_id, lora_request=lora,
                                         trace_headers=trace_headers, priority=request.priority)
                async with aclosing(stream):
                    async for output in stream:
                        update = state.update(output, time.time())
                        if update.result is None and request_id in self._abort_requested:
                            # The abort came while vLLM did not know the id yet (it was
                            # still tokenizing), so it was ignored: ask again.
                            await engine.abort(request_id)
                        yield update
            except (GeneratorExit, asyncio.CancelledError):
                # The consumer went away. vLLM's generate aborts on cancel itself (and on
                # GeneratorExit from later versions); aborting a finished id is a no-op.
                if state.result is None and not engine.errored:
                    await engine.abort(request_id)
                raise
            except vllm.EngineDeadError as exc:
                raise EngineError(f"the vLLM engine died: {exc}") from exc
            except Exception as exc:
                if engine.errored:
                    raise EngineError(f"the vLLM engine died: {error_text(exc)}") from exc
                yield state.fail(error_text(exc), time.time())
            if state.result is None:
                raise EngineError(f"vLLM ended request {request_id!r} without a final output")
        finally:
            self._running.discard(request_id)
            self._abort_requested.discard(request_id)

    def _to_vllm(self, request: GenerationRequest) -> tuple[Any, Any, Any]:
        vllm = self._vllm
        if request.prompt is not None:
            prompt: Any = request.prompt  # vLLM tokenizes it, adding BOS as the model expects
        else:
            # A TokensPrompt (vllm/inputs): vLLM takes the rendered ids as they are.
            prompt = {"prompt_token_ids": prompt_ids(self._tokenizer, messages=request.messages)}
        sampling = vllm.SamplingParams(**sampling_kwargs(request.params), output_kind=vllm.RequestOutputKind.DELTA)
        lora = None
        if request.adapter:
            adapter = self._adapters.resolve(request.adapter)
            lora = vllm.LoRARequest(adapter.name, adapter.lora_id, adapter.path)
        return prompt, sampling, lora

    async def abort(self, request_id: str) -> None:
        if self._engine is None or request_id not in self._running:
            return
        self._abort_requested.add(request_id)
        # vLLM answers with a final output whose finish_reason is "abort"
        # (OutputProcessor.abort_requests, vllm/v1/engine/output_processor.py).
        await self._engine.abort(request_id)
