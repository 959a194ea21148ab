"""The vLLM engine where the real vLLM cannot show it: this module runs in the
main venv, without vLLM. test_engine_contract.py runs the real vLLM (its CPU
build, in .venv-vllm) on everything an engine promises: streaming, abort, a
consumer that leaves, the batch limit, priority, stop strings, seeds, chat,
context, adapters by name.

What stays here, against stand-ins with the attribute names of the real classes
(each says which file it copies), is what a CPU vLLM cannot be made to do on
demand, or not in seconds: the start-up error when the extra is missing; engine
arguments for a GPU; start-up failures (each real start takes ~20 s or more); the
mapping of outputs and finish reasons, including vLLM's error finish; an engine
that dies (EngineDeadError) or wraps a failure (EngineGenerateError); the races
of an abort that comes before vLLM knows the request, or while it takes it; a
cancelled consumer; trace headers, sent only when vLLM exports traces; and
adapter lookup (with the refusal of an (IA)^3 adapter, on peft's own folders).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from shared.schema import ChatMessage, Params
from workers import tinymodel
from workers.engines import load_engine
from workers.engines.base import EngineError, GenerationRequest, collect
from workers.engines.vllm.adapters import AdapterError, Adapters
from workers.engines.vllm.engine import VLLM_MISSING, VllmEngine
from workers.engines.vllm.mapping import (DeltaState, cpu_omp_threads, engine_kwargs, finish_reason, kv_cache_bytes,
                                         lora_rank_bound, sampling_kwargs)
from workers.settings import WorkerSettings


def vllm_settings(**overrides) -> WorkerSettings:
    return WorkerSettings(engine="vllm", model="acme/qwen", **overrides)


# ---- stand-ins for vLLM objects (vLLM cannot run here) ------------------------


@dataclass
class CompletionOutput:
    """Stand-in for vllm.outputs.CompletionOutput (vllm/outputs.py), same attributes."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    """Stand-in for vllm.outputs.RequestOutput (vllm/outputs.py), same attributes."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None
    prompt_logprobs: list | None
    outputs: list[CompletionOutput]
    finished: bool


PROMPT_IDS = [1, 40, 41, 42, 43]


def delta(text: str, token_ids: list[int], reason: str | None = None, rid: str = "r") -> RequestOutput:
    """A DELTA-mode output: only the new text and ids, as vLLM sends with RequestOutputKind.DELTA."""
    return RequestOutput(rid, None, PROMPT_IDS, None, [CompletionOutput(0, text, token_ids, finish_reason=reason)],
                         finished=reason is not None)


class EngineDeadError(Exception):
    """Stand-in for vllm.v1.engine.exceptions.EngineDeadError."""


class EngineGenerateError(Exception):
    """Stand-in for vllm.v1.engine.exceptions.EngineGenerateError: raised bare, `from` the cause."""


@dataclass
class SamplingParams:
    """Stand-in for vllm.SamplingParams: keeps the keyword arguments it was built with."""

    kwargs: dict

    def __init__(self, **kwargs):
        self.kwargs = kwargs


VLLM = SimpleNamespace(
    SamplingParams=SamplingParams,
    RequestOutputKind=SimpleNamespace(DELTA="DELTA"),  # vllm/sampling_params.py RequestOutputKind
    LoRARequest=lambda name, int_id, path: ("LoRARequest", name, int_id, path),  # vllm/lora/request.py field order
    EngineDeadError=EngineDeadError,
    StatLoggerBase=object,
)


@dataclass
class StandInAsyncLLM:
    """Stand-in for vllm.v1.engine.async_llm.AsyncLLM: generate/abort/errored/shutdown.

    Each request replays `script`; a script without a final output waits, like a
    long generation. abort() ends a request vLLM knows with a final "abort" output
    (OutputProcessor.abort_requests, vllm/v1/engine/output_processor.py) and
    ignores ids it does not know yet. `gate`, when set, holds a new request back
    before vLLM knows its id (as while it tokenizes).
    """

    script: list[RequestOutput] = field(default_factory=list)
    raises: BaseException | None = None
    gate: asyncio.Event | None = None
    errored: bool = False
    tracing: bool = False
    calls: list[dict] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    queues: dict[str, asyncio.Queue] = field(default_factory=dict)
    shutdowns: int = 0
    model_config: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(max_model_len=4096))

    async def generate(self, prompt, sampling_params, request_id, *, lora_request=None, trace_headers=None, priority=0):
        self.calls.append({"prompt": prompt, "sampling": sampling_params.kwargs, "lora": lora_request,
                           "trace_headers": trace_headers, "priority": priority})
        if self.gate is not None:
            await self.gate.wait()
        if self.raises is not None:
            raise self.raises
        queue: asyncio.Queue = asyncio.Queue()
        for output in self.script:
            queue.put_nowait(output)
        self.queues[request_id] = queue
        try:
            while True:
                output = await queue.get()
                yield output
                if output.finished:
                    return
        finally:
            self.queues.pop(request_id, None)

    async def abort(self, request_id):
        self.aborted.append(request_id)
        if (queue := self.queues.get(request_id)) is not None:
            queue.put_nowait(delta("", [], "abort", request_id))

    def shutdown(self):
        self.shutdowns += 1

    async def is_tracing_enabled(self):
        return self.tracing


@functools.cache
def tiny_tokenizer():
    # The real byte-level BPE tokenizer of the tiny model, with its chat template.
    return tinymodel._train_tokenizer()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def started(llm: StandInAsyncLLM, tokenizer=None, adapters: Adapters | None = None, tracing=False) -> VllmEngine:
    engine = VllmEngine(vllm_settings())
    engine._attach(VLLM, llm, tokenizer or tiny_tokenizer(), adapters or Adapters(None), tracing)
    return engine


def request(rid="r", prompt="Hello", **kwargs) -> GenerationRequest:
    return GenerationRequest(rid, kwargs.pop("params", Params()), prompt=prompt, **kwargs)


# ---- start-up ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_start_without_vllm_installed_says_how_to_get_it(monkeypatch):
    # None in sys.modules makes `import vllm` fail as if it were not installed,
    # also on a machine where it is; its submodules too, which an engine started
    # earlier in this process (the contract tests, in .venv-vllm) left there.
    for name in [m for m in sys.modules if m.startswith("vllm.")] + ["vllm"]:
        monkeypatch.setitem(sys.modules, name, None)
    engine = load_engine(vllm_settings())  # what LLMQ_ENGINE=vllm selects
    assert isinstance(engine, VllmEngine)
    with pytest.raises(EngineError) as raised:
        await engine.start()
    assert str(raised.value) == VLLM_MISSING
    assert "pip install 'llmq[vllm]'" in str(raised.value)


def test_importing_the_engine_does_not_import_vllm():
    code = "import sys, workers.engines.vllm.engine; print(any(m.split('.')[0] == 'vllm' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_generate_before_start_is_an_engine_error():
    with pytest.raises(EngineError, match="not started"):
        VllmEngine(vllm_settings()).generate(request())


def test_engine_args_run_the_batch_size_with_priority_scheduling():
    kwargs = engine_kwargs(vllm_settings(batch_max_size=48, dtype="bfloat16"), lora_rank=None, cuda=True)
    assert kwargs == {"model": "acme/qwen", "served_model_name": "qwen", "dtype": "bfloat16",
                      "max_num_seqs": 48, "scheduling_policy": "priority", "enable_lora": False}
    assert VllmEngine(vllm_settings(batch_max_size=48)).max_running == 48


def test_engine_args_on_vllms_cpu_backend_run_float32_eagerly_in_less_memory():
    kwargs = engine_kwargs(vllm_settings(), lora_rank=None, cuda=False)
    assert (kwargs["gpu_memory_utilization"], kwargs["enforce_eager"]) == (0.3, True)
    assert kwargs["dtype"] == "float32"  # as the torch engine's "auto" on CPU
    assert engine_kwargs(vllm_settings(), None, cuda=True)["dtype"] == "auto"
    chosen = engine_kwargs(vllm_settings(vllm_memory_utilization=0.6, vllm_enforce_eager=False), None, cuda=False)
    assert chosen["gpu_memory_utilization"] == 0.6 and "enforce_eager" not in chosen
    on_gpu = engine_kwargs(vllm_settings(vllm_enforce_eager=True), None, cuda=True)
    assert on_gpu["enforce_eager"] is True and "gpu_memory_utilization" not in on_gpu


def test_engine_args_with_adapters_enable_lora():
    kwargs = engine_kwargs(vllm_settings(max_adapters=3), lora_rank=32)
    assert (kwargs["enable_lora"], kwargs["max_loras"], kwargs["max_lora_rank"]) == (True, 3, 32)


# ---- params, finish reasons, outputs ---------------------------------------------

# Field names of vllm.SamplingParams (vllm/sampling_params.py), to catch a misspelt key.
SAMPLING_PARAMS_FIELDS = {"n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature",
                          "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens",
                          "min_tokens", "logprobs", "prompt_logprobs", "detokenize", "skip_special_tokens",
                          "spaces_between_special_tokens", "include_stop_str_in_output", "output_kind"}


def test_params_map_to_sampling_params():
    params = Params(max_tokens=7, temperature=0.3, top_p=0.9, top_k=40, stop=["\n\n", "END"], seed=11)
    assert sampling_kwargs(params) == {"max_tokens": 7, "temperature": 0.3, "top_p": 0.9, "top_k": 40,
                                       "stop": ["\n\n", "END"], "seed": 11}
    assert set(sampling_kwargs(params)) <= SAMPLING_PARAMS_FIELDS


def test_default_params_keep_vllm_conventions_for_off():
    # llmq's top_k 0 is "off", which is vLLM's own value for off; temperature 0 is greedy in both.
    kwargs = sampling_kwargs(Params(temperature=0.0))
    assert (kwargs["top_k"], kwargs["temperature"], kwargs["seed"], kwargs["stop"]) == (0, 0.0, None, [])


@pytest.mark.parametrize("vllm_reason, llmq_reason", [
    ("stop", "stop"), ("length", "length"), ("abort", "abort"), ("error", "error"),
    ("repetition", "stop"), (None, "stop"), ("something-new", "stop"),
])
def test_finish_reasons(vllm_reason, llmq_reason):
    assert finish_reason(vllm_reason) == llmq_reason


def test_deltas_become_outputs_and_the_last_carries_the_result():
    state = DeltaState("r")
    outputs = [state.update(delta("Hel", [10, 11]), now=100.0),
               state.update(delta("", [12]), now=101.0),  # an incomplete character: no text yet
               state.update(delta("lo!", [13], "stop"), now=102.0)]
    assert [(o.delta, o.completion_tokens, o.finished) for o in outputs] == [
        ("Hel", 2, False), ("", 3, False), ("lo!", 4, True)]
    result = outputs[-1].result
    assert (result.text, result.finish_reason, result.error) == ("Hello!", "stop", None)
    assert (result.prompt_tokens, result.completion_tokens) == (len(PROMPT_IDS), 4)
    assert (result.first_token_at, result.finished_at) == (100.0, 102.0)


def test_length_and_abort_finishes_keep_the_text_so_far():
    state = DeltaState("r")
    state.update(delta("one two", [5, 6]), now=1.0)
    assert state.update(delta(" three", [7], "length"), now=2.0).result.finish_reason == "length"
    aborted = DeltaState("a")
    aborted.update(delta("par", [5]), now=1.0)
    result = aborted.update(delta("", [], "abort"), now=2.0).result
    assert (result.text, result.finish_reason, result.completion_tokens, result.error) == ("par", "abort", 1, None)


def test_a_vllm_error_finish_is_an_error_result():
    result = DeltaState("r").update(delta("", [], "error"), now=1.0).result
    assert result.finish_reason == "error" and "vLLM could not finish" in result.error


# ---- chat --------------------------------------------------------------------


# ---- adapters ------------------------------------------------------------------


def make_adapter(root, name, rank=8):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return folder


def test_adapters_resolve_to_stable_ids_and_their_folder(tmp_path):
    make_adapter(tmp_path, "sql")
    make_adapter(tmp_path, "legal-v2", rank=16)
    (tmp_path / "notes").mkdir()  # not an adapter: no adapter_config.json
    adapters = Adapters(tmp_path, max_rank=16)
    assert adapters.names() == ["legal-v2", "sql"]
    assert sorted(adapters.ranks()) == [8, 16]
    sql = adapters.resolve("sql")
    assert (sql.name, sql.lora_id, sql.path) == ("sql", 1, str(tmp_path / "sql"))
    assert adapters.resolve("legal-v2").lora_id == 2
    assert adapters.resolve("sql").lora_id == 1


@pytest.mark.parametrize("name", ["nope", "notes"])
def test_unknown_adapters_are_refused(tmp_path, name):
    (tmp_path / "notes").mkdir()  # a folder, but no adapter_config.json
    with pytest.raises(AdapterError, match=f"^unknown adapter {name!r}$"):
        Adapters(tmp_path).resolve(name)


@pytest.mark.parametrize("name", ["../outside", ".hidden", "sub/inner", "", "a b"])
def test_adapter_names_that_are_not_one_folder_name_are_refused(tmp_path, name):
    root = tmp_path / "adapters"
    make_adapter(root, ".hidden")
    make_adapter(root / "sub", "inner")
    make_adapter(root, "a b")
    make_adapter(tmp_path, "outside")  # beside the adapters folder: reachable only by a path
    with pytest.raises(AdapterError, match=re.escape(f"invalid adapter name {name!r}")):
        Adapters(root).resolve(name)


def test_no_adapters_dir_refuses_every_adapter():
    with pytest.raises(AdapterError, match=r"serves no adapters \(LLMQ_ADAPTERS_DIR is not set\); asked for 'sql'"):
        Adapters(None).resolve("sql")


def test_an_adapter_above_the_started_rank_is_refused(tmp_path):
    make_adapter(tmp_path, "big", rank=64)
    with pytest.raises(AdapterError, match="rank 64, above this worker's max_lora_rank 16"):
        Adapters(tmp_path, max_rank=16).resolve("big")


def test_an_ia3_adapter_is_refused_and_left_out_of_the_rank_bound(adapters_dir):
    # peft's own folders (conftest): LoRA style-a/-b, (IA)^3 tone-a/-b, prompt-tuned.
    adapters = Adapters(adapters_dir, max_rank=8)
    assert adapters.names() == ["style-a", "style-b"]
    assert adapters.ranks() == [8, 8]
    with pytest.raises(AdapterError, match=re.escape(
            "adapter 'tone-a' is an (IA)^3 adapter; the vllm engine serves LoRA adapters only")):
        adapters.resolve("tone-a")
    with pytest.raises(AdapterError, match=re.escape(
            "adapter 'prompt-tuned' is a peft PROMPT_TUNING adapter; the vllm engine serves LoRA adapters only")):
        adapters.resolve("prompt-tuned")


@pytest.mark.asyncio
async def test_an_ia3_adapter_request_is_that_requests_error_and_never_reaches_vllm(adapters_dir):
    llm = StandInAsyncLLM(script=[delta("ok", [7], "stop")])
    engine = started(llm, adapters=Adapters(adapters_dir, max_rank=8))
    refused = await collect(engine, request("ia3", adapter="tone-a"))
    served = await collect(engine, request("lora", adapter="style-a"))
    assert refused.finish_reason == "error"
    assert refused.error == "adapter 'tone-a' is an (IA)^3 adapter; the vllm engine serves LoRA adapters only"
    assert served.text == "ok"
    assert [call["lora"][1] for call in llm.calls] == ["style-a"]


@pytest.mark.parametrize("ranks, bound", [([], 16), ([8], 8), ([4, 8], 8), ([8, 20], 32), ([300], 320), ([600], 512)])
def test_lora_rank_bound_is_the_smallest_vllm_allows(ranks, bound):
    assert lora_rank_bound(ranks) == bound


# ---- the engine's control flow, on the stand-in AsyncLLM -----------------------


@pytest.mark.asyncio
async def test_a_prompt_streams_deltas_to_a_result():
    llm = StandInAsyncLLM(script=[delta("Hi", [7]), delta(" there", [8, 9], "stop")])
    engine = started(llm, tracing=True)
    req = request(params=Params(max_tokens=3, temperature=0.0), priority=-5,
                  trace_headers={"traceparent": "00-ab-cd-01"})
    outputs = [o async for o in engine.generate(req)]
    assert [o.delta for o in outputs] == ["Hi", " there"]
    assert (outputs[-1].result.text, outputs[-1].result.finish_reason) == ("Hi there", "stop")
    [call] = llm.calls
    assert call["prompt"] == {"prompt_token_ids": tiny_tokenizer().encode("Hello")}
    assert call["sampling"]["output_kind"] == "DELTA" and call["sampling"]["max_tokens"] == 3
    assert (call["priority"], call["trace_headers"], call["lora"]) == (-5, {"traceparent": "00-ab-cd-01"}, None)


@pytest.mark.asyncio
async def test_trace_headers_go_to_vllm_only_when_it_traces():
    llm = StandInAsyncLLM(script=[delta("ok", [7], "stop")])
    await collect(started(llm, tracing=False), request(trace_headers={"traceparent": "00-ab-cd-01"}))
    assert llm.calls[0]["trace_headers"] is None


@pytest.mark.asyncio
async def test_an_adapter_becomes_a_lora_request(tmp_path):
    make_adapter(tmp_path, "sql")
    llm = StandInAsyncLLM(script=[delta("ok", [7], "stop")])
    await collect(started(llm, adapters=Adapters(tmp_path, max_rank=16)), request(adapter="sql"))
    assert llm.calls[0]["lora"] == ("LoRARequest", "sql", 1, str(tmp_path / "sql"))


@pytest.mark.asyncio
async def test_a_prompt_too_long_is_that_requests_error_and_the_engine_goes_on():
    too_long = ValueError("The decoder prompt (length 9000) is longer than the maximum model length of 4096.")
    llm = StandInAsyncLLM(raises=too_long)
    engine = started(llm)
    result = await collect(engine, request())
    assert (result.finish_reason, result.error) == ("error", str(too_long))
    llm.raises, llm.script = None, [delta("fine", [7], "stop")]
    assert (await collect(engine, request("r2"))).text == "fine"


@pytest.mark.asyncio
async def test_a_wrapped_request_failure_reports_its_cause():
    try:
        raise EngineGenerateError() from RuntimeError("KV load failed")
    except EngineGenerateError as exc:
        wrapped = exc
    result = await collect(started(StandInAsyncLLM(raises=wrapped)), request())
    assert result.error == "KV load failed"


@pytest.mark.asyncio
async def test_a_dead_engine_is_an_engine_error():
    with pytest.raises(EngineError, match="engine died"):
        await collect(started(StandInAsyncLLM(raises=EngineDeadError("EngineCore encountered an issue."))), request())
    llm = StandInAsyncLLM(raises=RuntimeError("socket closed"), errored=True)
    with pytest.raises(EngineError, match="engine died"):
        await collect(started(llm), request())


@pytest.mark.asyncio
async def test_abort_before_the_request_runs_never_reaches_vllm():
    llm = StandInAsyncLLM(script=[delta("ok", [7], "stop")])
    engine = started(llm)
    stream = engine.generate(request())
    await engine.abort("r")
    [only] = [o async for o in stream]
    assert only.result.finish_reason == "abort" and llm.calls == []


@pytest.mark.asyncio
async def test_abort_while_vllm_is_still_taking_the_request_is_sent_again():
    llm = StandInAsyncLLM(script=[delta("Hel", [7])], gate=asyncio.Event())
    engine = started(llm)
    stream = engine.generate(request())
    first = asyncio.create_task(anext(stream))
    await asyncio.sleep(0.01)  # the request is inside vLLM's generate, its id not known yet
    await engine.abort("r")
    llm.gate.set()
    assert (await first).delta == "Hel"
    rest = [o async for o in stream]
    assert rest[-1].result.finish_reason == "abort"
    assert llm.aborted == ["r", "r"]


@pytest.mark.asyncio
async def test_a_cancelled_consumer_aborts_the_request():
    llm = StandInAsyncLLM(script=[delta("par", [7])])
    engine = started(llm)

    async def consume():
        async for _ in engine.generate(request()):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert llm.aborted == ["r"]


@pytest.mark.asyncio
async def test_close_shuts_vllm_down_once():
    llm = StandInAsyncLLM()
    engine = started(llm)
    await engine.close()
    await engine.close()
    assert llm.shutdowns == 1


# ---- start(), with vLLM's entry points stood in -----------------------------------


class StandInEngineArgs(dict):
    """Stand-in for vllm.AsyncEngineArgs (vllm/engine/arg_utils.py): its keywords, and the
    VllmConfig create_engine_config() makes of them, with the attributes start() reads
    (vllm/config/: cache_config, model_config, parallel_config); the tiny model's shape."""

    def create_engine_config(self):
        model = SimpleNamespace(max_model_len=2048, dtype=SimpleNamespace(itemsize=2), get_head_size=lambda: 64,
                                get_num_layers=lambda parallel: 4, get_num_kv_heads=lambda parallel: 2)
        return SimpleNamespace(args=self, model_config=model, parallel_config=SimpleNamespace(),
                               cache_config=SimpleNamespace(kv_cache_memory_bytes=None, block_size=128))


def stand_in_vllm(llm: StandInAsyncLLM, tokenizer, *, async_tokenizer: bool, fails: Exception | None = None):
    """The names start() takes from vllm, standing in for AsyncLLM.from_vllm_config
    and AsyncEngineArgs (vllm/v1/engine/async_llm.py, vllm/engine/arg_utils.py)."""
    built = {}

    async def get_tokenizer_async():  # vLLM 0.11: a coroutine
        return tokenizer

    def from_vllm_config(vllm_config, stat_loggers=None):
        if fails is not None:
            raise fails
        built["args"] = vllm_config.args
        built["config"] = vllm_config
        built["stat_loggers"] = stat_loggers
        llm.get_tokenizer = get_tokenizer_async if async_tokenizer else (lambda: tokenizer)  # later: a method
        return llm

    return SimpleNamespace(**vars(VLLM), AsyncEngineArgs=StandInEngineArgs,
                           AsyncLLM=SimpleNamespace(from_vllm_config=from_vllm_config)), built


@pytest.fixture
def on_cpu(monkeypatch):
    """start() as on vLLM's CPU backend; what it sets in the environment is undone after."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})


@pytest.mark.asyncio
@pytest.mark.parametrize("async_tokenizer", [True, False])
async def test_start_builds_vllm_from_the_settings(tmp_path, monkeypatch, tokenizer, async_tokenizer, on_cpu):
    from workers.engines.vllm import engine as vllm_engine

    make_adapter(tmp_path, "sql", rank=8)
    make_adapter(tmp_path, "legal", rank=20)
    llm = StandInAsyncLLM(script=[delta("ok", [7], "stop")])
    vllm, built = stand_in_vllm(llm, tokenizer, async_tokenizer=async_tokenizer)
    monkeypatch.setattr(vllm_engine, "_import_vllm", lambda: vllm)
    engine = VllmEngine(vllm_settings(adapters_dir=str(tmp_path), max_adapters=2, batch_max_size=16))
    await engine.start()
    args = built["args"]
    assert (args["max_num_seqs"], args["enable_lora"], args["max_loras"], args["max_lora_rank"]) == (16, True, 2, 32)
    req = GenerationRequest("r", Params(), messages=[ChatMessage(role="user", content="hi")], adapter="legal")
    assert (await collect(engine, req)).text == "ok"
    assert llm.calls[0]["lora"][1:3] == ("legal", 1)
    await engine.close()
    assert llm.shutdowns == 1


@pytest.mark.asyncio
async def test_on_cpu_the_kv_cache_holds_batch_max_tokens_and_the_model_runs_in_the_engine_core(
        monkeypatch, tokenizer, on_cpu):
    import os

    from workers.engines.vllm import engine as vllm_engine

    vllm, built = stand_in_vllm(StandInAsyncLLM(), tokenizer, async_tokenizer=True)
    monkeypatch.setattr(vllm_engine, "_import_vllm", lambda: vllm)
    engine = VllmEngine(vllm_settings(batch_max_tokens=10_000))
    await engine.start()
    # 10,000 tokens: 79 blocks of 128, and one more; each token a K and a V of 2 heads x 64 per layer, in bf16
    assert built["config"].cache_config.kv_cache_memory_bytes == 80 * 128 * 2 * 4 * 2 * 64 * 2
    # The model runs in vLLM's EngineCore process, on vLLM's thread count: the CPUs but one.
    assert (os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"], os.environ["OMP_NUM_THREADS"]) == ("0", "3")
    await engine.close()


@pytest.mark.asyncio
async def test_on_cpu_a_memory_share_or_vllms_own_kv_setting_leaves_the_kv_cache_to_vllm(
        monkeypatch, tokenizer, on_cpu):
    from workers.engines.vllm import engine as vllm_engine

    vllm, built = stand_in_vllm(StandInAsyncLLM(), tokenizer, async_tokenizer=True)
    monkeypatch.setattr(vllm_engine, "_import_vllm", lambda: vllm)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    engine = VllmEngine(vllm_settings(vllm_memory_utilization=0.5))
    await engine.start()
    assert built["config"].cache_config.kv_cache_memory_bytes is None
    assert built["args"]["gpu_memory_utilization"] == 0.5
    import os

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"  # the operator's choice stands
    assert "OMP_NUM_THREADS" not in os.environ  # vLLM's own worker process sets its threads
    await engine.close()


def test_the_model_keeps_one_cpu_free_for_vllms_scheduler_as_vllm_does():
    assert [cpu_omp_threads(n) for n in (1, 2, 16)] == [1, 1, 15]


def test_the_kv_cache_holds_at_least_one_request_of_the_whole_context():
    assert kv_cache_bytes(100, 2048, 1, 1, 1, 1, block_size=16) == (2048 + 16) * 2
    assert kv_cache_bytes(5000, 2048, 1, 1, 1, 1, block_size=16) == (313 + 1) * 16 * 2


@pytest.mark.asyncio
async def test_a_missing_model_directory_says_how_to_build_it(tmp_path):
    # Before vLLM is imported, which would take a local path that isn't there for a hub name.
    with pytest.raises(EngineError, match=r"does not exist; .*python -m workers\.tinymodel"):
        await VllmEngine(WorkerSettings(engine="vllm", model=str(tmp_path / "nope"))).start()


@pytest.mark.asyncio
async def test_a_model_vllm_cannot_load_is_an_engine_error(monkeypatch, tokenizer, on_cpu):
    from workers.engines.vllm import engine as vllm_engine

    vllm, _ = stand_in_vllm(StandInAsyncLLM(), tokenizer, async_tokenizer=True,
                            fails=RuntimeError("CUDA out of memory"))
    monkeypatch.setattr(vllm_engine, "_import_vllm", lambda: vllm)
    with pytest.raises(EngineError, match="could not load 'acme/qwen': CUDA out of memory"):
        await VllmEngine(vllm_settings()).start()


@pytest.mark.asyncio
async def test_a_missing_adapters_dir_stops_start(tmp_path, monkeypatch, tokenizer):
    from workers.engines.vllm import engine as vllm_engine

    vllm, built = stand_in_vllm(StandInAsyncLLM(), tokenizer, async_tokenizer=True)
    monkeypatch.setattr(vllm_engine, "_import_vllm", lambda: vllm)
    with pytest.raises(EngineError, match="LLMQ_ADAPTERS_DIR .* is not a directory"):
        await VllmEngine(vllm_settings(adapters_dir=str(tmp_path / "missing"))).start()
    assert built == {}


@pytest.mark.asyncio
async def test_running_is_what_vllms_scheduler_reported_of_the_requests_still_here(monkeypatch, tokenizer, on_cpu):
    from workers.engines.vllm import engine as vllm_engine

    vllm, built = stand_in_vllm(StandInAsyncLLM(), tokenizer, async_tokenizer=True)
    monkeypatch.setattr(vllm_engine, "_import_vllm", lambda: vllm)
    engine = VllmEngine(vllm_settings())
    await engine.start()
    (reporter_class,) = built["stat_loggers"]  # vLLM makes one per engine core and calls it each step
    reporter = reporter_class(None, 0)
    streams = [engine.generate(GenerationRequest(str(i), Params(), prompt="hi")) for i in range(4)]
    reporter.record(SimpleNamespace(num_running_reqs=3), None)
    assert engine.running == 3  # the fourth waits in vLLM's queue
    reporter.record(SimpleNamespace(num_running_reqs=9), None)  # a step behind: some have left since
    assert engine.running == 4
    reporter.record(None, None)  # a step without scheduler stats changes nothing
    assert engine.running == 4
    for stream in streams:
        await stream.aclose()
    await engine.close()
