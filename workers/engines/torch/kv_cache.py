"""The KV cache: a prefill's is transformers' own DynamicCache; the running
batch's is one KVLayer per layer, which writes keys and values in place in
preallocated storage instead of concatenating them at every step."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


def prefill_cache() -> DynamicCache:
    """A cache for one prefill: plain full-attention layers, copied into the batch's at merge."""
    return DynamicCache()


def batch_cache(layers: int, max_rows: int) -> DynamicCache:
    """The running batch's cache: one KVLayer per model layer."""
    cache = DynamicCache()
    cache.layers = [KVLayer(max_rows) for _ in range(layers)]
    return cache


class KVLayer(DynamicLayer):
    """One layer's keys and values for the running batch, written in place.

    transformers' DynamicLayer grows by torch.cat, which copies the whole cache
    at every decode step, a large share of a step at many rows (see the README's
    engine benchmark). Here the storage has room for `max_rows` rows and spare
    columns: a step writes one column, trimming shared padding moves `start`, a
    leaving row is overwritten by the last one, and only running out of columns
    copies (into twice the room, so rarely).

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
