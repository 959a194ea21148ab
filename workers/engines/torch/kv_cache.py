"""The KV cache: each generation of the running batch keeps one KVLayer per
layer, which writes keys and values in place in preallocated storage instead
of concatenating them at every step; a step's cache splits the step's new keys
among the generations and the prompts joining the batch."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from workers.engines.torch.attention import StepViews


def generation_cache(layers: int, max_rows: int) -> DynamicCache:
    """One generation's cache: one KVLayer per model layer."""
    cache = DynamicCache()
    cache.layers = [KVLayer(max_rows) for _ in range(layers)]
    return cache


def step_cache(generations: list[DynamicCache], masks: list[torch.Tensor], prompts: list[list[PromptLayer]]):
    """The cache a step runs with: per model layer, the generations' KVLayers (their
    rows first, in this order), then the layer of each prompt joining the batch."""
    cache = DynamicCache()
    layers = len(generations[0].layers) if generations else len(prompts[0])
    cache.layers = [SplitLayer([g.layers[i] for g in generations] + [p[i] for p in prompts],
                               masks + [None] * len(prompts)) for i in range(layers)]
    return cache


class SplitLayer(DynamicLayer):
    """One model layer across a step's parts: each new key goes to its row's
    generation or prompt; attention gets every part's keys (attention.py)."""

    def __init__(self, parts: list[KVLayer | PromptLayer], masks: list[torch.Tensor | None]) -> None:
        super().__init__()
        self.parts, self.masks = parts, masks
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        sizes = [part.rows for part in self.parts]
        views = [part.update(k, v) for part, k, v in zip(self.parts, key_states.split(sizes), value_states.split(sizes))]
        grouped = StepViews([k for k, _ in views], [v for _, v in views], self.masks)
        return grouped, grouped

    def get_seq_length(self) -> int:
        return max(part.get_seq_length() for part in self.parts)


class PromptLayer(DynamicLayer):
    """One layer's keys and values of a prompt joining the batch, one token per row of
    the step that runs it; a generation takes them in after the step."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.rows = length  # rows of the step it takes
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # [tokens, kv heads, 1, head dim] -> [1, kv heads, tokens, head dim]: one row, as a generation stores it
        self.keys, self.values = key_states.transpose(0, 2), value_states.transpose(0, 2)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.rows


class KVLayer(DynamicLayer):
    """One layer's keys and values for one generation, written in place.

    transformers' DynamicLayer grows by torch.cat, which copies the whole cache
    at every decode step, a large share of a step at many rows (see the README's
    engine benchmark). Here the storage has room for the columns its rows may
    still write (each row's max_tokens) and spare rows: a step writes one
    column, trimming shared padding moves `start`, a leaving row is overwritten
    by the last one, and only a joining row that needs more room copies (into
    four times the rows, at most `max_rows`, so rarely: at 128 concurrent,
    doubling from one row copied 2.5 GB per benchmark run).

    The storage is left uninitialized, except that the padding inside the
    window [start, end) is zeroed: attention reads those columns, and while the
    mask hides them, it does not hide NaN (0 x NaN is NaN), which uninitialized
    memory may hold. Zeroing whole new storage instead cost as much as the copies.
    """

    def __init__(self, max_rows: int) -> None:
        super().__init__()
        self.max_rows = max_rows
        self.k_store: torch.Tensor | None = None  # [row capacity, heads, columns, head_dim]
        self.v_store: torch.Tensor | None = None
        self.rows = self.start = self.end = 0
        self.room = 0  # columns after `end` that its rows may still write
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        count = key_states.shape[-2]
        self._make_room(0, count, self.rows)
        self.room = max(0, self.room - count)
        self.k_store[:self.rows, :, self.end:self.end + count] = key_states
        self.v_store[:self.rows, :, self.end:self.end + count] = value_states
        self.end += count
        return self._view()

    def get_seq_length(self) -> int:
        return self.end - self.start

    def add_rows(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        """Append rows whose keys end at the generation's last column (left-padded to it),
        which may write `room` more columns."""
        if self.k_store is None:
            shape = (0, keys.shape[1], 0, keys.shape[3])
            self.k_store, self.v_store = keys.new_empty(shape), values.new_empty(shape)
        length = keys.shape[-2]
        wider = max(0, length - (self.end - self.start))
        self.room = max(self.room, room)
        self._make_room(wider, self.room, self.rows + keys.shape[0])
        self.start -= wider
        added = slice(self.rows, self.rows + keys.shape[0])
        for store, new in ((self.k_store, keys), (self.v_store, values)):
            store[:self.rows, :, self.start:self.start + wider] = 0  # the older rows' new left padding
            store[added, :, self.start:self.end - length] = 0  # the added rows' left padding
            store[added, :, self.end - length:self.end] = new
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

    def _make_room(self, left: int, right: int, rows: int) -> None:
        """Make sure `left` free columns precede `start`, `right` follow `end`, and `rows` rows fit."""
        capacity, columns = self.k_store.shape[0], self.k_store.shape[2]
        if self.start >= left and self.end + right <= columns and rows <= capacity:
            return
        if rows > capacity:
            capacity = min(self.max_rows, max(rows, 4 * capacity, 8))
        width = self.end - self.start
        needed = left + width + max(right, self.room)
        if needed > columns:
            columns = max(needed + max(16, needed // 4), 2 * columns)
        # Spare columns go left, for joining rows with longer prompts than the generation is wide.
        offset = columns - needed + left
        shape = (capacity, self.k_store.shape[1], columns, self.k_store.shape[3])
        k_store, v_store = self.k_store.new_empty(shape), self.v_store.new_empty(shape)
        k_store[:self.rows, :, offset:offset + width] = self.k_store[:self.rows, :, self.start:self.end]
        v_store[:self.rows, :, offset:offset + width] = self.v_store[:self.rows, :, self.start:self.end]
        self.k_store, self.v_store = k_store, v_store
        self.start, self.end = offset, offset + width

    def _view(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = self.k_store[:self.rows, :, self.start:self.end]
        self.values = self.v_store[:self.rows, :, self.start:self.end]
        return self.keys, self.values
