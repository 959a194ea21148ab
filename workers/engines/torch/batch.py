"""The running batch: the rows decoding together, in generations. A generation
is the rows that joined at about the same time, left-padded so every row's
next token lands in its last column (as TGI's CausalLM batch is), with its own
attention mask and KV cache. Rows join after the step that ran their prompt
and leave as they finish."""

from __future__ import annotations

import torch

from workers.engines.torch.kv_cache import PromptLayer, generation_cache, step_cache
from workers.engines.torch.row import Row
from workers.engines.torch.sampling import Sampling

# New rows start a generation of their own when the youngest one is this many
# columns wider than their prompts. A decode step's attention reads every
# column of a generation for each of its rows, so one batch-wide padding would
# make each row read as many as the oldest row holds (twice its own, on
# average, with max_tokens spread over 16-256); each generation costs one more
# attention call per layer, so they span this much rather than one step each.
GENERATION_SPAN = 64


class Generation:
    """Rows that joined at about the same time: their left-padded KV cache and attention mask."""

    def __init__(self, max_rows: int, layers: int) -> None:
        self.rows: list[Row] = []
        self.cache = generation_cache(layers, max_rows)
        self.mask: torch.Tensor | None = None  # [rows, columns], 1 where a row has a token

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    def add(self, row: Row, prompt: list[PromptLayer]) -> None:
        """Add a row whose prompt just ran (its keys and values, layer by layer)."""
        # Its first token is chosen: it may write max_tokens - 1 more columns.
        room = row.request.params.max_tokens - 1
        for layer, new in zip(self.cache.layers, prompt):
            layer.add_rows(new.keys, new.values, room)
        mask = torch.ones((1, new.keys.shape[2]), dtype=torch.long, device=new.keys.device)
        if self.mask is None:
            self.mask = mask
        else:
            width = max(self.width, mask.shape[1])
            self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.rows.append(row)

    def drop_finished(self) -> None:
        """Finished rows leave: the last running rows move into their places."""
        keep = [b for b, row in enumerate(self.rows) if row.finish_reason is None]
        if len(keep) == len(self.rows) or not keep:
            self.rows = [self.rows[b] for b in keep]
            return
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


class Batch:
    """The running rows, generation by generation (the oldest first)."""

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max_rows
        self.generations: list[Generation] = []
        self.rows: list[Row] = []  # every generation's rows, in the order the model sees them
        self._sampling: Sampling | None = None  # rebuilt when the rows change

    def adapter_names(self) -> list[str | None]:
        return [row.request.adapter for row in self.rows]

    def sampling(self, device: torch.device) -> Sampling:
        if self._sampling is None:
            self._sampling = Sampling(self.rows, device)
        return self._sampling

    def merge(self, rows: list[Row], prompts: list[list[PromptLayer]]) -> None:
        """Add rows whose prompts just ran to the youngest generation, or to a new one when it is too wide."""
        for row, prompt in zip(rows, prompts):
            if not self.generations or self.generations[-1].width - len(row.prompt_ids) > GENERATION_SPAN:
                self.generations.append(Generation(self.max_rows, len(prompt)))
            self.generations[-1].add(row, prompt)
        self._rows_changed()

    def drop_finished(self) -> None:
        if all(row.finish_reason is None for row in self.rows):
            return
        for generation in self.generations:
            generation.drop_finished()
        self.generations = [generation for generation in self.generations if generation.rows]
        self._rows_changed()

    def step_cache(self, joining: list[Row], layers: int):
        """The cache for the next step, which runs the running rows' last tokens and the
        joining rows' prompts; and the joining rows' layers, for merge() after the step.
        Each generation's mask gains the step's column."""
        masks = []
        for generation in self.generations:
            generation.mask = torch.cat([generation.mask, generation.mask.new_ones((len(generation.rows), 1))], dim=-1)
            masks.append(generation.mask.bool()[:, None, None, :])
        prompts = [[PromptLayer(len(row.prompt_ids)) for _ in range(layers)] for row in joining]
        return step_cache([generation.cache for generation in self.generations], masks, prompts), prompts

    def _rows_changed(self) -> None:
        self.rows = [row for generation in self.generations for row in generation.rows]
        self._sampling = None


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
