"""The torch engine: a transformers causal LM run by our own continuous-batching scheduler.

One scheduler thread owns the model. Each iteration of its loop:
  1) drops aborted requests (their last output says finish_reason "abort");
  2) admits waiting requests while the batch has room (LLMQ_BATCH_MAX_SIZE rows,
     LLMQ_BATCH_MAX_TOKENS of prompt + max_tokens), prefills them together and
     merges their KV cache into the running batch's;
  3) runs one decode step over every running row, with per-row sampling;
  4) hands each request its delta; finished rows leave the batch at once.

Why our own scheduler rather than transformers' `generate_batch` /
`init_continuous_batching`: with its defaults it ran at 0.30-0.41x a padded static
batch on these CPUs (`bench/engine.py`, README), and below the static batch
on an H200 too (REFERENCE), while this scheduler runs above the static batch.

The running batch is left-padded (as TGI's CausalLM batch is): every row's
next token lands in the last column. Its KV cache (_KVLayer) is written in
place in preallocated storage: a joining row is written right-aligned, a
leaving row is overwritten by the last one, and columns of padding every row
shares are trimmed, so memory stays bounded by rows x longest sequence (x2
spare room).

The event loop never waits on the model: outputs cross from the scheduler
thread with one `call_soon_threadsafe` per step, so Kafka heartbeats go on.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import inspect
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from shared.settings import Settings
from workers.engines.base import EngineError, GenerationOutput, GenerationRequest, GenerationResult
from workers.engines.common import adapter_refusal, prompt_ids

log = structlog.get_logger(__name__)

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


@dataclass
class _Row:
    """One request's state in the scheduler."""

    request: GenerationRequest
    stream: _Stream
    prompt_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (cut at a stop string when one ends the request)
    emitted: int = 0  # characters of `text` already sent as deltas
    prefix_offset: int = 0  # incremental detokenization (as in TGI / vLLM)
    read_offset: int = 0
    finish_reason: str | None = None
    error: str | None = None
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def budget(self) -> int:
        """Tokens this row may hold in the KV cache at most."""
        return len(self.prompt_ids) + self.request.params.max_tokens


class _Stream:
    """The asyncio side of one request: outputs arrive here from the scheduler thread."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[GenerationOutput] = asyncio.Queue()


class TorchEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_name = settings.served_model_name
        self.max_running = settings.batch_max_size
        self.max_batch_tokens = settings.batch_max_tokens
        self.model = None
        self.tokenizer = None
        self.adapters = None
        self._thread: threading.Thread | None = None
        self._wakeup = threading.Condition()
        self._arrived: list[_Row] = []  # new requests, guarded by _wakeup
        self._waiting: collections.deque[_Row] = collections.deque()  # the scheduler thread's own
        self._aborted: set[str] = set()  # guarded by _wakeup
        self._closing = False
        self._failure: BaseException | None = None  # why the scheduler thread died
        self.running = 0  # rows in the batch (read by the worker's metrics)

    # ---- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._run, name="llmq-torch-scheduler", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        self.model = self.tokenizer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = self.settings.model
        build_hint = f"to build the tiny local model there, run `python -m workers.tinymodel {source}`"
        # A path that is plainly local and missing would otherwise be tried as
        # a hub name: a slow, confusing failure (or a surprise download).
        if source.startswith((".", "/")) and not Path(source).is_dir():
            raise EngineError(f"model directory {source!r} does not exist; {build_hint}")
        device = self._device()
        dtype = self._dtype(device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
            model.to(device).eval()
        except Exception as exc:
            hint = "" if Path(source).is_dir() else f" (not a local directory; {build_hint})"
            raise EngineError(f"cannot load model {source!r}: {exc}{hint}") from exc

        config = model.config.get_text_config()
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if not context:
            raise EngineError(f"model {source!r}: its config does not say how long its context is")
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        # transformers 5 renamed forward's `past_key_values` to `cache`
        # (the old name warns, and goes in 5.40); 4.x knows only the old one.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keep_last_logits = "logits_to_keep" in params

        if self.settings.quantize == "int8":
            model = self._quantize_int8(model, device)
        self.adapters = _Adapters.create(self.settings, model)
        if self.adapters is not None:
            model = self.adapters.model

        self.tokenizer, self.model, self.device = tokenizer, model, device
        self.context = int(context)
        self.eos_ids = eos_ids
        # Padding is masked out, so any id works when the tokenizer has no pad.
        self.pad_id = next((i for i in (tokenizer.pad_token_id, *sorted(eos_ids)) if i is not None), 0)
        try:
            # Warm up, and surface a device or dtype problem now rather than on a request.
            with torch.inference_mode():
                ids = torch.tensor([[self.pad_id]], device=device)
                self._forward(ids, torch.ones_like(ids), torch.zeros_like(ids), self._new_cache(), [None])
        except Exception as exc:
            raise EngineError(f"model {source!r} failed its first forward pass on {device}: {exc}") from exc

    def _device(self) -> torch.device:
        name = self.settings.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            return torch.device(name)
        except RuntimeError as exc:
            raise EngineError(f"bad LLMQ_DEVICE {self.settings.device!r}: {exc}") from exc

    def _dtype(self, device: torch.device) -> torch.dtype:
        if self.settings.dtype == "auto":
            # CPUs run bfloat16 matmuls slowly (or emulated); fp32 is the safe default there.
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.settings.dtype)

    def _quantize_int8(self, model, device: torch.device):
        if device.type != "cpu" or next(model.parameters()).dtype != torch.float32:
            raise EngineError("LLMQ_QUANTIZE=int8 is PyTorch dynamic quantization: it needs LLMQ_DEVICE=cpu "
                              "and float32 weights")
        if self.settings.adapters_dir:
            raise EngineError("LLMQ_QUANTIZE=int8 cannot serve LoRA adapters (LLMQ_ADAPTERS_DIR): peft does "
                              "not wrap dynamically quantized linear layers")
        # Weights stored as int8, activations quantized per batch on the fly:
        # the linear layers are most of a decode step's time and memory.
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    # ---- the asyncio side --------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if self._thread is None or self._failure is not None:
            raise EngineError(f"the torch engine is not running ({self._failure!r})")
        row = _Row(request, _Stream())
        with self._wakeup:
            self._arrived.append(row)
            self._wakeup.notify()
        finished = False
        try:
            while True:
                output = await row.stream.queue.get()
                if output.request_id == "" and self._failure is not None:
                    raise EngineError(f"the torch engine's scheduler died: {self._failure!r}")
                finished = output.finished
                yield output
                if finished:
                    return
        finally:
            if not finished:  # the caller went away: stop spending steps on it
                self._abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        self._abort(request_id)

    def _abort(self, request_id: str) -> None:
        # Not a coroutine: generate()'s finally may run where nothing can be awaited.
        with self._wakeup:
            self._aborted.add(request_id)
            self._wakeup.notify()

    @staticmethod
    def _deliver(outputs: list[tuple[_Stream, GenerationOutput]]) -> None:
        """Hand outputs to their requests' event loops: one hop per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, output in outputs:
            by_loop.setdefault(stream.loop, []).append((stream.queue, output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop is closed: nobody is reading those requests
                pass

    # ---- the scheduler thread ----------------------------------------------

    def _run(self) -> None:
        batch = _Batch(self.max_running)
        try:
            with torch.inference_mode():
                while self._step(batch):
                    pass
        except BaseException as exc:  # noqa: BLE001 - any failure here kills the engine
            log.exception("torch_scheduler_died")
            self._failure = exc
            with self._wakeup:
                rows = batch.rows + list(self._waiting) + self._arrived
                self._arrived = []
            died = GenerationOutput("")  # an empty id marks "the engine died" for generate()
            self._deliver([(row.stream, died) for row in rows])

    def _step(self, batch: _Batch) -> bool:
        """One scheduler iteration; False when the engine is closing."""
        outputs: list[tuple[_Stream, GenerationOutput]] = []
        # 1) take new arrivals and aborts; sleep while there is nothing to do.
        #    Only this hand-over holds the lock: tokenizing and loading adapters
        #    happen outside it, so generate() never waits on them.
        with self._wakeup:
            while not (self._closing or batch.rows or self._waiting or self._arrived):
                self._wakeup.wait()
            if self._closing:
                return False
            aborted, self._aborted = self._aborted, set()
            self._waiting.extend(self._arrived)
            self._arrived = []
        if aborted:
            for row in [*self._waiting, *batch.rows]:
                if row.request.request_id in aborted and row.finish_reason is None:
                    self._finish(row, "abort", outputs)
            self._waiting = collections.deque(row for row in self._waiting if row.finish_reason is None)
            batch.drop_finished()
        admitted = self._admit(batch, outputs)

        # 2) prefill the admitted rows together, then merge them into the batch
        if admitted:
            logits, cache, mask = self._prefill(admitted)
            self._sample_and_append(admitted, logits, _Sampling(admitted, self.device), outputs)
            batch.merge(admitted, cache, mask)
            batch.drop_finished()

        # 3) one decode step over every running row
        if batch.rows:
            last = torch.tensor([[row.tokens[-1]] for row in batch.rows], device=self.device)
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=-1)
            positions = torch.tensor([[len(row.prompt_ids) + len(row.tokens) - 1] for row in batch.rows],
                                     device=self.device)
            logits = self._forward(last, batch.mask, positions, batch.cache, batch.adapter_names())
            self._sample_and_append(batch.rows, logits, batch.sampling(self.device), outputs)
            batch.drop_finished()
        self.running = len(batch.rows)

        # 4) hand out this step's news
        if outputs:
            self._deliver(outputs)
        return True

    def _admit(self, batch: _Batch, outputs: list) -> list[_Row]:
        """Waiting rows that fit the batch now. Invalid ones finish here."""
        admitted: list[_Row] = []
        tokens = batch.tokens()
        while self._waiting and len(batch.rows) + len(admitted) < self.max_running:
            row = self._waiting[0]
            if not row.prompt_ids and row.error is None:
                self._prepare(row)
            if row.error is not None:
                self._waiting.popleft()
                self._finish(row, "error", outputs)
                continue
            # A row alone in an empty batch always runs (it fits the context,
            # checked in _prepare), so an oversized request can't wait forever.
            if (batch.rows or admitted) and tokens + row.budget > self.max_batch_tokens:
                break
            if self.adapters is not None and not self.adapters.ready(row.request.adapter, batch.rows + admitted):
                break  # every adapter slot is in use by running rows: wait for one to free
            self._waiting.popleft()
            tokens += row.budget
            admitted.append(row)
        return admitted

    def _prepare(self, row: _Row) -> None:
        """Tokenize and check a request; sets row.error when it cannot run. Never truncates."""
        request = row.request
        root = self.adapters.root if self.adapters is not None else None
        if request.adapter and (refusal := adapter_refusal(root, request.adapter)):
            row.error = refusal
            return
        try:
            row.prompt_ids = prompt_ids(self.tokenizer, request.prompt, request.messages)
        except Exception as exc:  # a chat template may reject a conversation
            row.error = f"cannot tokenize the input: {exc}"
            return
        if not row.prompt_ids:
            row.error = "the prompt is empty after tokenization"
            return
        max_tokens = request.params.max_tokens
        if max_tokens >= self.context:
            row.error = f"max_tokens={max_tokens} does not fit the model's context of {self.context} tokens"
        elif row.budget > self.context:
            row.error = (f"the prompt is {len(row.prompt_ids)} tokens; with max_tokens={max_tokens} it needs "
                         f"{row.budget}, more than the model's context of {self.context} tokens "
                         f"(shorten the prompt or lower max_tokens)")
        elif request.params.seed is not None:
            # Each row draws from its own stream, so a seed gives the same
            # text whichever requests share its batch.
            row.generator = torch.Generator(self.device).manual_seed(request.params.seed)

    def _prefill(self, rows: list[_Row]):
        width = max(len(row.prompt_ids) for row in rows)
        # Left padding, so every row's next token lands in the last column.
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
            mask[b, width - len(row.prompt_ids):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        # Each row's positions count its own tokens, as if it ran alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        adapters = [row.request.adapter for row in rows]
        return self._forward(input_ids, mask, positions, cache, adapters), cache, mask

    def _sample_and_append(self, rows: list[_Row], logits: torch.Tensor, sampling: _Sampling, outputs: list) -> None:
        next_ids = sampling.pick(logits, rows).tolist()
        now = time.time()
        for row, token in zip(rows, next_ids):
            row.first_token_at = row.first_token_at or now
            row.tokens.append(token)  # EOS too: it was generated, and counts (as in vLLM)
            self._detokenize(row)
            params = row.request.params
            if params.stop and self._cut_at_stop(row):
                self._finish(row, "stop", outputs)
            elif token in self.eos_ids or len(row.tokens) >= params.max_tokens:
                # The last token may end in half a character: the text says so (U+FFFD),
                # as decoding all the tokens at once would.
                self._detokenize(row, final=True)
                self._finish(row, "stop" if token in self.eos_ids else "length", outputs)
            else:
                # Hold back what could be the start of a stop string, so a
                # stream never shows text the final result cuts off.
                holdback = max((len(s) for s in params.stop), default=1) - 1
                visible = len(row.text) - holdback
                if visible > row.emitted:
                    delta, row.emitted = row.text[row.emitted:visible], visible
                    outputs.append((row.stream, GenerationOutput(row.request.request_id, delta, len(row.tokens))))

    def _detokenize(self, row: _Row, final: bool = False) -> None:
        """Append the newest token's text, decoding only a short window (O(1) per step).

        Byte-level tokenizers split a character across tokens; decoding from
        `prefix_offset` and holding text back while it ends in U+FFFD gives
        the same text as decoding everything at once (TGI's decode_token).
        """
        decode = self.tokenizer.decode
        before = decode(row.tokens[row.prefix_offset:row.read_offset], skip_special_tokens=True)
        after = decode(row.tokens[row.prefix_offset:], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            row.text += after[len(before):]
            row.prefix_offset, row.read_offset = row.read_offset, len(row.tokens)

    @staticmethod
    def _cut_at_stop(row: _Row) -> bool:
        """Whether a stop string has appeared; cuts the text before it if so."""
        stops = row.request.params.stop
        # Earlier steps found none, so a new one ends in the text's tail.
        start = max(0, row.emitted - max(len(s) for s in stops))
        cuts = [i for i in (row.text.find(s, start) for s in stops) if i >= 0]
        if not cuts:
            return False
        row.text = row.text[:min(cuts)]
        return True

    def _finish(self, row: _Row, reason: str, outputs: list) -> None:
        row.finish_reason = reason
        row.finished_at = time.time()
        if reason == "error":
            result = GenerationResult(row.request.request_id, finish_reason="error", prompt_tokens=len(row.prompt_ids),
                                      error=row.error)
        else:
            result = GenerationResult(row.request.request_id, row.text, reason, len(row.prompt_ids), len(row.tokens),
                                      first_token_at=row.first_token_at, finished_at=row.finished_at)
        delta = row.text[row.emitted:] if reason != "error" else ""
        outputs.append((row.stream, GenerationOutput(row.request.request_id, delta, len(row.tokens), result)))

    @staticmethod
    def _new_cache():
        # Plain full-attention layers, which _KVLayer takes over at merge.
        return DynamicCache()

    def _forward(self, input_ids, mask, positions, cache, adapters: list[str | None]) -> torch.Tensor:
        """Logits of each row's last position, as float32 (sampling wants the precision)."""
        kwargs = {self._cache_kwarg: cache}
        if self._keep_last_logits:
            kwargs["logits_to_keep"] = 1  # the prefill's other positions' logits are never read
        if self.adapters is not None:
            # peft runs each row through its own adapter (mixed-adapter batches).
            kwargs["adapter_names"] = [name or BASE_ADAPTER for name in adapters]
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return out.logits[:, -1, :].float()


def _put_all(items: list[tuple[asyncio.Queue, GenerationOutput]]) -> None:
    for queue, output in items:
        queue.put_nowait(output)


class _Batch:
    """The running rows, their shared left-padded KV cache and attention mask."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.rows: list[_Row] = []
        self.cache = None  # a DynamicCache whose layers are _KVLayer
        self.mask: torch.Tensor | None = None
        self._sampling: _Sampling | None = None  # rebuilt when the rows change

    def tokens(self) -> int:
        return sum(row.budget for row in self.rows)

    def adapter_names(self) -> list[str | None]:
        return [row.request.adapter for row in self.rows]

    def sampling(self, device: torch.device) -> _Sampling:
        if self._sampling is None:
            self._sampling = _Sampling(self.rows, device)
        return self._sampling

    def merge(self, rows: list[_Row], cache, mask: torch.Tensor) -> None:
        """Add freshly prefilled rows (their cache and mask) to the batch."""
        if self.cache is None:
            self.cache = DynamicCache()
            self.cache.layers = [_KVLayer(self.max_rows) for _ in cache.layers]
            self.mask = mask.new_zeros((0, 0))
        for layer, new in zip(self.cache.layers, cache.layers):
            layer.add_rows(new.keys, new.values)
        width = max(self.mask.shape[1], mask.shape[1])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.rows += rows
        self._sampling = None

    def drop_finished(self) -> None:
        """Finished rows leave: the last running rows move into their places."""
        keep = [b for b, row in enumerate(self.rows) if row.finish_reason is None]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
        else:
            count = len(keep)
            holes = [b for b in range(count) if self.rows[b].finish_reason is not None]
            movers = [b for b in keep if b >= count]
            order = list(range(count))
            for hole, mover in zip(holes, movers):
                order[hole] = mover
            self.rows = [self.rows[b] for b in order]
            self.mask = self.mask[order]
            # Columns that are padding in every remaining row hold nothing: trim them.
            first = int(self.mask.any(dim=0).nonzero()[0])
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.move_rows(movers, holes, count)
                layer.trim_left(first)
        self._sampling = None


class _KVLayer(DynamicLayer):
    """One layer's keys and values for the running batch, written in place.

    transformers' DynamicLayer grows by torch.cat, which copies the whole cache
    at every decode step: 13% of the scheduler thread's time at 32 rows
    (py-spy over bench/engine.py). Here the storage has room for `max_rows`
    rows and spare columns: a step writes one column, trimming shared padding
    moves `start`, a leaving row is overwritten by the last one, and only
    running out of columns copies (into twice the room, so rarely).

    The storage starts zeroed: columns a row never wrote hold finite values,
    which the attention mask hides (uninitialized memory may hold NaN, which
    masking does not hide: 0 x NaN is NaN).
    """

    def __init__(self, max_rows: int) -> None:
        super().__init__()
        self.max_rows = max_rows
        self.k_store: torch.Tensor | None = None  # [max_rows, heads, columns, head_dim]
        self.v_store: torch.Tensor | None = None
        self.rows = self.start = self.end = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        count = key_states.shape[-2]
        self._make_room(0, count)
        self.k_store[:self.rows, :, self.end:self.end + count] = key_states
        self.v_store[:self.rows, :, self.end:self.end + count] = value_states
        self.end += count
        return self._view()

    def get_seq_length(self) -> int:
        return self.end - self.start

    def add_rows(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append rows whose keys end at the batch's last column (left-padded to it)."""
        if self.k_store is None:
            shape = (self.max_rows, keys.shape[1], 0, keys.shape[3])
            self.k_store, self.v_store = keys.new_zeros(shape), values.new_zeros(shape)
        length = keys.shape[-2]
        wider = max(0, length - (self.end - self.start))
        self._make_room(wider, 0)
        self.start -= wider
        added = slice(self.rows, self.rows + keys.shape[0])
        self.k_store[added, :, self.end - length:self.end] = keys
        self.v_store[added, :, self.end - length:self.end] = values
        self.rows += keys.shape[0]
        self._view()

    def move_rows(self, sources: list[int], targets: list[int], rows: int) -> None:
        if sources:
            columns = slice(self.start, self.end)
            self.k_store[targets, :, columns] = self.k_store[sources, :, columns]
            self.v_store[targets, :, columns] = self.v_store[sources, :, columns]
        self.rows = rows
        self._view()

    def trim_left(self, columns: int) -> None:
        self.start += columns
        self._view()

    def _make_room(self, left: int, right: int) -> None:
        """Make sure `left` free columns precede `start` and `right` follow `end`."""
        if self.start >= left and self.end + right <= self.k_store.shape[2]:
            return
        width = self.end - self.start
        needed = left + width + right
        columns = max(64, 2 * needed)
        offset = left + (columns - needed) // 4  # most of the spare room goes right, where decoding grows
        shape = (*self.k_store.shape[:2], columns, self.k_store.shape[3])
        k_store, v_store = self.k_store.new_zeros(shape), self.v_store.new_zeros(shape)
        k_store[:self.rows, :, offset:offset + width] = self.k_store[:self.rows, :, self.start:self.end]
        v_store[:self.rows, :, offset:offset + width] = self.v_store[:self.rows, :, self.start:self.end]
        self.k_store, self.v_store = k_store, v_store
        self.start, self.end = offset, offset + width

    def _view(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = self.k_store[:self.rows, :, self.start:self.end]
        self.values = self.v_store[:self.rows, :, self.start:self.end]
        return self.keys, self.values


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class _Sampling:
    """Per-row next-token choice: greedy, or temperature → top-k → top-p → draw."""

    def __init__(self, rows: list[_Row], device: torch.device) -> None:
        params = [row.request.params for row in rows]
        self.sampled = [b for b, p in enumerate(params) if p.temperature > 0]
        if self.sampled:
            chosen = [params[b] for b in self.sampled]
            self.index = torch.tensor(self.sampled, device=device)
            self.temperature = torch.tensor([p.temperature for p in chosen], device=device)[:, None]
            self.top_k = torch.tensor([p.top_k for p in chosen], device=device)[:, None]
            self.top_p = torch.tensor([p.top_p for p in chosen], device=device)[:, None]

    def pick(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        next_ids = logits.argmax(dim=-1)
        if not self.sampled:
            return next_ids
        scaled = logits[self.index] / self.temperature
        # Sorted once, descending; stable so ties order the same every run.
        sorted_logits, order = scaled.sort(dim=-1, descending=True, stable=True)
        rank = torch.arange(scaled.shape[-1], device=scaled.device)[None, :]
        sorted_logits = sorted_logits.masked_fill((self.top_k > 0) & (rank >= self.top_k), float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # Nucleus: keep the smallest head whose mass reaches top_p (the first
        # token always stays). Skipped at 1.0, where float rounding in the
        # cumsum would otherwise drop a few tail tokens.
        before = probs.cumsum(dim=-1) - probs
        probs = probs.masked_fill((self.top_p < 1) & (before >= self.top_p), 0.0)
        for j, b in enumerate(self.sampled):
            draw = torch.multinomial(probs[j], 1, generator=rows[b].generator)
            next_ids[b] = order[j, draw]
        return next_ids


class _Adapters:
    """PEFT LoRA adapters from LLMQ_ADAPTERS_DIR, loaded on first use, at most LLMQ_MAX_ADAPTERS at once.

    Loaded adapters are kept most-recently-used first; one that no running row
    uses is unloaded to make room.
    """

    def __init__(self, root: Path, limit: int, base_model) -> None:
        self.root = root
        self.limit = limit
        self.model = _PeftHolder(base_model)  # what the engine calls in place of the base model
        self.loaded: collections.OrderedDict[str, None] = collections.OrderedDict()

    @classmethod
    def create(cls, settings: Settings, model) -> _Adapters | None:
        if not settings.adapters_dir:
            return None
        root = Path(settings.adapters_dir)
        if not root.is_dir():
            raise EngineError(f"LLMQ_ADAPTERS_DIR {str(root)!r} is not a directory")
        return cls(root, settings.max_adapters, model)

    def ready(self, name: str | None, running: list[_Row]) -> bool:
        """Make sure `name` is loaded (called in the scheduler thread). False: no slot free now."""
        if name is None:
            return True
        if name in self.loaded:
            self.loaded.move_to_end(name, last=False)
            return True
        in_use = {row.request.adapter for row in running}
        idle = [n for n in reversed(self.loaded) if n not in in_use]  # least recently used first
        if len(self.loaded) >= self.limit and not idle:
            return False
        # Load before unloading: peft keeps at least one adapter on its model.
        self.model.load(name, self.root / name)
        self.loaded[name] = None
        self.loaded.move_to_end(name, last=False)
        while len(self.loaded) > self.limit:
            evicted = idle.pop(0)
            self.model.unload(evicted)
            del self.loaded[evicted]
        log.info("adapter_loaded", adapter=name, loaded=len(self.loaded))
        return True


class _PeftHolder:
    """The model the engine calls when adapters are on: the base until the first
    adapter loads, then the PeftModel wrapping it."""

    def __init__(self, base) -> None:
        self.base = base
        self.peft = None

    def load(self, name: str, path: Path) -> None:
        from peft import PeftModel

        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=name).eval()
        else:
            self.peft.load_adapter(str(path), adapter_name=name)

    def unload(self, name: str) -> None:
        self.peft.delete_adapter(name)

    def __call__(self, adapter_names: list[str], **kwargs):
        if self.peft is None:  # no adapter loaded yet: every row is a base row
            return self.base(**kwargs)
        return self.peft(adapter_names=adapter_names, **kwargs)
