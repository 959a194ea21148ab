"""The running batch: the rows decoding together, left-padded so every row's
next token lands in the last column (as TGI's CausalLM batch is), with their
attention mask and KV cache. Rows join after their prefill and leave as they finish."""

from __future__ import annotations

import torch

from workers.engines.torch.kv_cache import batch_cache
from workers.engines.torch.row import Row
from workers.engines.torch.sampling import Sampling


class Batch:
    """The running rows, their shared left-padded KV cache and attention mask."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.rows: list[Row] = []
        self.cache = None  # a DynamicCache whose layers are KVLayer
        self.mask: torch.Tensor | None = None
        self._sampling: Sampling | None = None  # rebuilt when the rows change

    def adapter_names(self) -> list[str | None]:
        return [row.request.adapter for row in self.rows]

    def sampling(self, device: torch.device) -> Sampling:
        if self._sampling is None:
            self._sampling = Sampling(self.rows, device)
        return self._sampling

    def merge(self, rows: list[Row], cache, mask: torch.Tensor) -> None:
        """Add freshly prefilled rows (their cache and mask) to the batch."""
        if self.cache is None:
            self.cache = batch_cache(len(cache.layers), self.max_rows)
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


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
