"""The echo engine: no model, answers with the prompt. For pipeline tests and
benchmarks, where the queue, not the model, is what's measured.

Tokens are whitespace-separated words; `max_tokens` cuts the answer to that
many. `LLMQ_ECHO_TOKEN_DELAY_MS` simulates generation time per token.
"""

from __future__ import annotations

import asyncio
import time

from shared.settings import Settings
from workers.engines.base import GenerationRequest, GenerationResult


class EchoEngine:
    def __init__(self, settings: Settings) -> None:
        self.model_name = settings.served_model_name
        self.token_delay = settings.echo_token_delay_ms / 1000

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def generate(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        started = time.time()
        results = [self._echo(request) for request in batch]
        if self.token_delay:
            # A batch takes as long as its longest member, as on a real engine.
            await asyncio.sleep(self.token_delay * max(r.completion_tokens for r in results))
        for result in results:
            result.first_token_at = started + self.token_delay
            result.finished_at = started + self.token_delay * result.completion_tokens
        return results

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
