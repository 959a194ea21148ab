"""The echo engine: no model, answers with the prompt. For pipeline tests and
benchmarks, where the queue, not the model, is what's measured.

Tokens are whitespace-separated words; `max_tokens` cuts the answer to that
many. `LLMQ_ECHO_TOKEN_DELAY_MS` simulates generation time per token. Each
request runs on its own, as in a continuous batch: a short one never waits
for a long one, and abort() stops one at its next token.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import re
import time
from collections.abc import AsyncIterator

from workers.engines.base import GenerationOutput, GenerationRequest, GenerationResult
from workers.settings import WorkerSettings

_TOKEN = re.compile(r"\s*\S+")


class EchoEngine:
    def __init__(self, settings: WorkerSettings) -> None:
        self.model_name = settings.served_model_name
        self.max_running = settings.batch_max_size
        self.token_delay = settings.echo_token_delay_ms / 1000
        self.running = 0
        self._aborted: set[str] = set()
        self._live: set[str] = set()
        self._slots = PrioritySlots(self.max_running)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def abort(self, request_id: str) -> None:
        if request_id in self._live:
            self._aborted.add(request_id)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        request_id = request.request_id
        result = self._echo(request)
        started = time.time()
        if not self.token_delay:
            result.first_token_at = result.finished_at = started
            yield GenerationOutput(request_id, result.text, result.completion_tokens, result)
            return
        self._live.add(request_id)
        try:
            await self._slots.acquire(request.priority)
        except BaseException:
            self._live.discard(request_id)
            raise
        self.running += 1
        try:
            pieces = _TOKEN.findall(result.text)
            for count, piece in enumerate(pieces[:-1], start=1):
                await asyncio.sleep(self.token_delay)
                result.first_token_at = result.first_token_at or time.time()
                if request_id in self._aborted:
                    result.text, result.finish_reason = "".join(pieces[:count - 1]), "abort"
                    result.completion_tokens, result.finished_at = count - 1, time.time()
                    yield GenerationOutput(request_id, "", count - 1, result)
                    return
                yield GenerationOutput(request_id, piece, count)
            await asyncio.sleep(self.token_delay)
            result.finished_at = time.time()
            result.first_token_at = result.first_token_at or result.finished_at
            last = result.text[len("".join(pieces[:-1])):]
            yield GenerationOutput(request_id, last, result.completion_tokens, result)
        finally:
            self.running -= 1
            self._slots.release()
            self._live.discard(request_id)
            self._aborted.discard(request_id)

    @staticmethod
    def _echo(request: GenerationRequest) -> GenerationResult:
        if request.prompt is not None:
            text = request.prompt
        else:
            text = "\n".join(f"{m.role}: {m.content}" for m in request.messages or [])
        words = text.split()
        limit = request.params.max_tokens
        for stop in request.params.stop:
            cut = text.find(stop)
            if cut >= 0 and len(text[:cut].split()) <= limit:
                answer = text[:cut]
                return GenerationResult(request.request_id, answer, "stop", len(words), len(answer.split()))
        if len(words) <= limit:
            return GenerationResult(request.request_id, text, "stop", len(words), len(words))
        return GenerationResult(request.request_id, " ".join(words[:limit]), "length", len(words), limit)


class PrioritySlots:
    """`size` slots; a freed slot goes to the waiter of lowest priority, then the
    earliest. (asyncio.Semaphore hands slots out in arrival order only.)"""

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiting: list[tuple[int, int, asyncio.Future]] = []  # a heap
        self._arrival = itertools.count()

    async def acquire(self, priority: int) -> None:
        if self.free and not self._waiting:
            self.free -= 1
            return
        slot = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._arrival), slot))
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():  # given a slot just as it was cancelled
                self.release()
            raise

    def release(self) -> None:
        while self._waiting:
            slot = heapq.heappop(self._waiting)[2]
            if not slot.done():  # a cancelled waiter's future is done
                slot.set_result(None)
                return
        self.free += 1
