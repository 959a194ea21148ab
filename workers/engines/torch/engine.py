"""TorchEngine: requests come in on the asyncio side (generate, abort); one
scheduler thread owns the model and runs the continuous batch a step at a time.
Outputs cross back with one `call_soon_threadsafe` per step, so the event loop,
and with it Kafka's heartbeats, never waits on the model.

llmq schedules the batch itself because transformers' own continuous batching
(`generate_batch` / `init_continuous_batching`, with its defaults) runs slower
than a padded static batch, see the README's engine benchmark; this scheduler
runs faster than the static batch.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import AsyncIterator

import structlog
import torch

from workers.engines.base import EngineError, GenerationOutput, GenerationRequest
from workers.engines.common import adapter_refusal, context_refusal, prompt_ids
from workers.engines.torch.batch import Batch
from workers.engines.torch.model_runner import ModelRunner
from workers.engines.torch.row import Output, Row, Stream
from workers.engines.torch.sampling import Sampling
from workers.engines.torch.scheduler import Scheduler
from workers.settings import WorkerSettings

log = structlog.get_logger(__name__)


class TorchEngine:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.model_name = settings.served_model_name
        self.max_running = settings.batch_max_size
        self.runner: ModelRunner | None = None
        self.scheduler = Scheduler(settings.batch_max_size, settings.batch_max_tokens)  # the thread's own
        self._thread: threading.Thread | None = None
        self._wakeup = threading.Condition()
        self._arrived: list[Row] = []  # new requests, guarded by _wakeup
        self._aborted: set[str] = set()  # guarded by _wakeup
        self._closing = False
        self._failure: BaseException | None = None  # why the scheduler thread died
        self.running = 0  # rows in the batch (read by the worker's metrics)
        self.threads: int | None = None  # intra-op threads the scheduler thread runs the model on

    # What tests and the benchmark reach into: the loaded model and its parts.
    @property
    def model(self):
        return self.runner.model if self.runner else None

    @property
    def tokenizer(self):
        return self.runner.tokenizer if self.runner else None

    @property
    def context(self) -> int | None:
        return self.runner.context if self.runner else None

    @property
    def adapters(self):
        return self.runner.adapters if self.runner else None

    # ---- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        self.runner = await asyncio.to_thread(ModelRunner, self.settings)
        self._thread = threading.Thread(target=self._run, name="llmq-torch-scheduler", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self.runner is not None:
            self.runner.model = self.runner.tokenizer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---- the asyncio side --------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if self._thread is None or self._failure is not None:
            raise EngineError(f"the torch engine is not running ({self._failure!r})")
        row = Row(request, Stream())
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
    def _deliver(outputs: list[Output]) -> None:
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
        batch = Batch(self.max_running)
        self.threads = torch.get_num_threads()  # as this thread sees it (set per thread in torch)
        try:
            with torch.inference_mode():
                while self._step(batch):
                    pass
        except BaseException as exc:  # noqa: BLE001 - any failure here kills the engine
            log.exception("torch_scheduler_died")
            self._failure = exc
            with self._wakeup:
                rows = batch.rows + list(self.scheduler.waiting) + self._arrived
                self._arrived = []
            died = GenerationOutput("")  # an empty id marks "the engine died" for generate()
            self._deliver([(row.stream, died) for row in rows])

    def _step(self, batch: Batch) -> bool:
        """One scheduler iteration; False when the engine is closing."""
        runner, outputs = self.runner, []
        # 1) take new arrivals and aborts; aborted rows finish with "abort"
        aborted = self._take_arrivals(batch)
        if aborted is None:
            return False
        if aborted:
            outputs += self.scheduler.abort(aborted, batch.rows)
            batch.drop_finished()
        # 2) admit the waiting rows that fit
        admitted, refused = self.scheduler.admit(batch.rows, self._prepare, runner.adapters)
        outputs += refused
        # 3) one step: every running row's next token, and the admitted rows' prompts with
        #    their first token (as vLLM's chunked prefill shares the decode step); the
        #    admitted rows join the batch, finished rows leave at once
        if batch.rows or admitted:
            running = batch.rows
            logits, prompts = runner.step(batch, admitted)
            outputs += self._next_tokens(running, logits[:len(running)], batch.sampling(runner.device))
            outputs += self._next_tokens(admitted, logits[len(running):], Sampling(admitted, runner.device))
            batch.merge(admitted, prompts)
            batch.drop_finished()
        self.running = len(batch.rows)
        # 4) hand out this step's news
        if outputs:
            self._deliver(outputs)
        return True

    def _take_arrivals(self, batch: Batch) -> set[str] | None:
        """Move new requests to the waiting queue; the ids aborted since the last step
        (None: the engine is closing). Sleeps while there is nothing to do.

        Only this hand-over holds the lock: tokenizing and loading adapters
        happen outside it, so generate() never waits on them.
        """
        with self._wakeup:
            while not (self._closing or batch.rows or self.scheduler.waiting or self._arrived):
                self._wakeup.wait()
            if self._closing:
                return None
            aborted, self._aborted = self._aborted, set()
            self.scheduler.enqueue(self._arrived)
            self._arrived = []
        return aborted

    def _prepare(self, row: Row) -> None:
        """Tokenize and check a request; sets row.error when it cannot run. Never truncates."""
        runner, request = self.runner, row.request
        root = runner.adapters.root if runner.adapters is not None else None
        if request.adapter and (refusal := adapter_refusal(root, request.adapter)):
            row.error = refusal
            return
        try:
            row.prompt_ids = prompt_ids(runner.tokenizer, request.prompt, request.messages)
        except Exception as exc:  # a chat template may reject a conversation
            row.error = f"cannot tokenize the input: {exc}"
            return
        if not row.prompt_ids:
            row.error = "the prompt is empty after tokenization"
            return
        if refusal := context_refusal(len(row.prompt_ids), request.params.max_tokens, runner.context):
            row.error = refusal
        elif request.params.seed is not None:
            # Each row draws from its own stream, so a seed gives the same
            # text whichever requests share its batch.
            row.generator = torch.Generator(runner.device).manual_seed(request.params.seed)

    def _next_tokens(self, rows: list[Row], logits: torch.Tensor, sampling: Sampling) -> list[Output]:
        """Each row's next token, sampled and appended; the outputs that makes."""
        next_ids = sampling.pick(logits, rows).tolist()
        now = time.time()
        outputs = [row.add_token(token, self.runner.decode, self.runner.eos_ids, now)
                   for row, token in zip(rows, next_ids)]
        return [output for output in outputs if output is not None]


def _put_all(items: list[tuple[asyncio.Queue, GenerationOutput]]) -> None:
    for queue, output in items:
        queue.put_nowait(output)
