"""Which requests run: new ones wait in priority order (lower first, then in
arrival order) and join the running batch while it has room
(LLMQ_BATCH_MAX_SIZE rows, LLMQ_BATCH_MAX_TOKENS of prompt + max_tokens);
aborted ones finish where they are. It holds no model: the engine
hands in how to tokenize a request and load its adapter."""

from __future__ import annotations

import collections
from collections.abc import Callable

from workers.engines.torch.adapters import AdapterError, Adapters
from workers.engines.torch.row import Output, Row


class Scheduler:
    def __init__(self, max_rows: int, max_tokens: int) -> None:
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.waiting: collections.deque[Row] = collections.deque()

    def enqueue(self, arrived: list[Row]) -> None:
        """Add new requests to the waiting queue: by priority, lower first; in arrival
        order within a priority (the sort is stable)."""
        if arrived:
            self.waiting = collections.deque(sorted([*self.waiting, *arrived], key=lambda row: row.request.priority))

    def abort(self, request_ids: set[str], running: list[Row]) -> list[Output]:
        """Finish the waiting and running rows these ids name ("abort"), and drop the
        waiting ones; the batch drops its own."""
        outputs = [row.finish("abort") for row in [*self.waiting, *running]
                   if row.request.request_id in request_ids and row.finish_reason is None]
        self.waiting = collections.deque(row for row in self.waiting if row.finish_reason is None)
        return outputs

    def admit(self, running: list[Row], prepare: Callable[[Row], None],
              adapters: Adapters | None) -> tuple[list[Row], list[Output]]:
        """Waiting rows that fit beside `running` now, and the last outputs of those that cannot run.

        `prepare` tokenizes and checks a row when it first reaches the head of
        the queue, setting row.error when it cannot run; `adapters` loads a
        row's adapter when a slot is free.
        """
        admitted: list[Row] = []
        refused: list[Output] = []
        tokens = sum(row.budget for row in running)
        while self.waiting and len(running) + len(admitted) < self.max_rows:
            row = self.waiting[0]
            if not row.prompt_ids and row.error is None:
                prepare(row)
            if row.error is not None:
                self.waiting.popleft()
                refused.append(row.finish("error"))
                continue
            # A row alone in an empty batch always runs (prepare checked it fits
            # the context), so an oversized request can't wait forever.
            if (running or admitted) and tokens + row.budget > self.max_tokens:
                break
            try:
                if adapters is not None and not adapters.ready(row.request.adapter, running + admitted):
                    break  # every adapter slot is in use by running rows: wait for one to free
            except AdapterError as exc:  # its folder can't be loaded: this request's error alone
                row.error = str(exc)
                continue
            self.waiting.popleft()
            tokens += row.budget
            admitted.append(row)
        return admitted, refused
