"""The vLLM engine: vLLM's `AsyncLLM` run inside the worker process.

vLLM already does what base.py asks for (continuous batching, per-request
deltas, abort, multi-LoRA, priority), so this is a thin adapter: llmq's
request becomes vLLM's prompt, SamplingParams and LoRARequest (mapping.py,
adapters.py), and vLLM's RequestOutputs become llmq's GenerationOutputs.

Written against vLLM 0.11 and checked against its later `main`; the files read
are named where the API shape is not obvious. vllm is an optional extra,
imported only in `start()`.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from workers.engines.base import EngineError, GenerationOutput, GenerationRequest
from workers.engines.common import context_refusal, missing_model, prompt_ids
from workers.engines.vllm.adapters import AdapterError, Adapters
from workers.engines.vllm.mapping import (DeltaState, cpu_omp_threads, engine_kwargs, error_text, kv_cache_bytes,
                                         lora_rank_bound, sampling_kwargs)
from workers.settings import WorkerSettings

VLLM_MISSING = "LLMQ_ENGINE=vllm needs the vllm extra: pip install 'llmq[vllm]' (a CUDA machine)"


def _import_vllm() -> SimpleNamespace:
    """The few vLLM names this engine uses (paths as of vLLM 0.11 and its main)."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind, SamplingParams
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.engine.exceptions import EngineDeadError
        from vllm.v1.metrics.loggers import StatLoggerBase
    except ImportError as exc:
        raise EngineError(VLLM_MISSING) from exc
    except Exception as exc:  # installed but broken (no CUDA runtime, mismatched torch)
        raise EngineError(f"vllm is installed but cannot be imported: {exc}") from exc
    return SimpleNamespace(AsyncEngineArgs=AsyncEngineArgs, AsyncLLM=AsyncLLM, LoRARequest=LoRARequest,
                           SamplingParams=SamplingParams, RequestOutputKind=RequestOutputKind,
                           EngineDeadError=EngineDeadError, StatLoggerBase=StatLoggerBase)


class VllmEngine:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.model_name = settings.served_model_name
        # vLLM decodes up to max_num_seqs at once; that is what we configure it with.
        self.max_running = settings.batch_max_size
        self._vllm: SimpleNamespace | None = None
        self._engine: Any = None  # vllm AsyncLLM
        self._tokenizer: Any = None
        self._adapters = Adapters(None)
        self._tracing = False
        self._context: int | None = None
        self._running: set[str] = set()
        self._scheduled = 0  # requests in vLLM's running batch at its last step
        self._abort_requested: set[str] = set()

    @property
    def running(self) -> int:
        # What vLLM's scheduler ran at its last step (it reports it each step), of the
        # requests still here; the rest it holds wait in its queue.
        return min(self._scheduled, len(self._running))

    # ---- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        if missing := missing_model(self.settings):
            raise EngineError(missing)  # before vLLM takes it for a hub name
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
        import torch  # loaded by vllm already

        cuda = torch.cuda.is_available()
        if not cuda:
            self._run_the_model_in_the_engine_core()
        args = engine_kwargs(self.settings, lora_rank, cuda=cuda)
        try:
            # What AsyncLLM.from_engine_args does, with the KV cache sized in between.
            config = vllm.AsyncEngineArgs(**args).create_engine_config()
            if not cuda and self.settings.vllm_memory_utilization is None:
                self._size_cpu_kv_cache(config)
            engine = vllm.AsyncLLM.from_vllm_config(config, stat_loggers=[self._batch_reporter(vllm.StatLoggerBase)])
        except Exception as exc:
            raise EngineError(f"vLLM could not load {self.settings.model_path!r}: {exc}") from exc
        # 3) get_tokenizer() is a coroutine in 0.11 and a plain method on later
        # versions (vllm/v1/engine/async_llm.py).
        try:
            tokenizer = engine.get_tokenizer()
            if inspect.isawaitable(tokenizer):
                tokenizer = await tokenizer
        except Exception as exc:
            engine.shutdown()
            raise EngineError(f"vLLM has no tokenizer for {self.settings.model_path!r}: {exc}") from exc
        tracing = await engine.is_tracing_enabled()
        self._attach(vllm, engine, tokenizer, Adapters(adapters_dir, lora_rank or 0), tracing,
                     context=engine.model_config.max_model_len)
        # vLLM's import leaves a traceback whose frames include this call's, so this frame
        # and its locals outlive the call: without this the engine is freed only at the
        # interpreter's exit, where AsyncLLM.__del__ fails on modules already torn down.
        del engine

    @staticmethod
    def _run_the_model_in_the_engine_core() -> None:
        """On vLLM's CPU backend, the model runs in vLLM's EngineCore process, not in a
        worker process of its own, unless the operator set VLLM_ENABLE_V1_MULTIPROCESSING.

        By default the EngineCore process spawns that worker (vllm/platforms/cpu.py turns
        the "uni" executor into "mp" unless VLLM_ENABLE_V1_MULTIPROCESSING=0): a third
        interpreter importing torch and vLLM again, 12-15 s of a worker's start here. With
        0 the EngineCore runs the model itself (vLLM's UniProcExecutor). The EngineCore is
        still a process of its own (AsyncLLM always starts one), so a step never blocks
        this process's event loop. What the spawned worker had and this way has not is
        vLLM's OpenMP set-up: its thread count (the CPUs less one vLLM keeps for its
        scheduler and front end) is set here (OMP_NUM_THREADS, read when the EngineCore
        loads torch); its thread pinning is not. Without the count, torch took every CPU
        and a step waited on any thread whose CPU another process held (throughput fell
        to a fifth on this shared machine). Measured: README, Performance."""
        if "VLLM_ENABLE_V1_MULTIPROCESSING" in os.environ:
            return
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("OMP_NUM_THREADS", str(cpu_omp_threads(len(os.sched_getaffinity(0)))))

    def _size_cpu_kv_cache(self, config: Any) -> None:
        """On vLLM's CPU backend, a KV cache for LLMQ_BATCH_MAX_TOKENS tokens (what the
        setting bounds on the torch engine too), unless VLLM_CPU_KVCACHE_SPACE sized it
        already. Left to vLLM, it runs a warm-up forward pass to measure its own memory and
        takes the rest of the 30 %: 3 GiB and ~17 s of the start here, on the tiny model."""
        cache, model = config.cache_config, config.model_config
        if cache.kv_cache_memory_bytes is not None:
            return
        cache.kv_cache_memory_bytes = kv_cache_bytes(
            self.settings.batch_max_tokens, model.max_model_len, model.get_num_layers(config.parallel_config),
            model.get_num_kv_heads(config.parallel_config), model.get_head_size(), model.dtype.itemsize,
            cache.block_size or 16)

    def _batch_reporter(self, base: type) -> type:
        """A vLLM stat logger (vllm/v1/metrics/loggers.py) that keeps the size of the
        scheduler's running batch, which vLLM reports after every step."""
        engine = self

        class BatchReporter(base):
            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any) -> None:
                if scheduler_stats is not None:
                    engine._scheduled = scheduler_stats.num_running_reqs

            def log_engine_initialized(self) -> None:
                pass

        return BatchReporter

    def _attach(self, vllm: SimpleNamespace, engine: Any, tokenizer: Any, adapters: Adapters,
                tracing: bool = False, context: int | None = None) -> None:
        self._vllm, self._engine, self._tokenizer, self._adapters = vllm, engine, tokenizer, adapters
        self._context = context  # the model's context in tokens (None: not checked here)
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
        # Tokenized here, as the torch engine does, so that a request that does not fit the
        # context is refused in the torch engine's words: vLLM would refuse a long prompt in
        # its own, and cut a fitting prompt's max_tokens short without saying so.
        # A TokensPrompt (vllm/inputs): vLLM takes the ids as they are.
        ids = prompt_ids(self._tokenizer, request.prompt, request.messages)
        if self._context is not None and (refusal := context_refusal(len(ids), request.params.max_tokens,
                                                                     self._context)):
            raise ValueError(refusal)
        prompt = {"prompt_token_ids": ids}
        sampling = vllm.SamplingParams(**self._sampling_kwargs(request), output_kind=vllm.RequestOutputKind.DELTA)
        lora = None
        if request.adapter:
            adapter = self._adapters.resolve(request.adapter)
            lora = vllm.LoRARequest(adapter.name, adapter.lora_id, adapter.path)
        return prompt, sampling, lora

    def _sampling_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        """vllm.SamplingParams keywords of a request (a subclass may add some: bench/engine.py
        adds ignore_eos, so every engine generates the tokens it is asked for)."""
        return sampling_kwargs(request.params)

    async def abort(self, request_id: str) -> None:
        if self._engine is None or request_id not in self._running:
            return
        self._abort_requested.add(request_id)
        # vLLM answers with a final output whose finish_reason is "abort"
        # (OutputProcessor.abort_requests, vllm/v1/engine/output_processor.py).
        await self._engine.abort(request_id)
