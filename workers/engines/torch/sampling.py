"""Each row's next token from its logits, by its own parameters: greedy at
temperature 0, else temperature, top-k, top-p and a draw from the row's own
generator (so a seed gives the same text whatever shares the batch)."""

from __future__ import annotations

import torch

from workers.engines.torch.row import Row


class Sampling:
    """Per-row next-token choice: greedy, or temperature → top-k → top-p → draw."""

    def __init__(self, rows: list[Row], device: torch.device) -> None:
        params = [row.request.params for row in rows]
        self.sampled = [b for b, p in enumerate(params) if p.temperature > 0]
        if self.sampled:
            chosen = [params[b] for b in self.sampled]
            self.index = torch.tensor(self.sampled, device=device)
            self.temperature = torch.tensor([p.temperature for p in chosen], device=device)[:, None]
            self.top_k = torch.tensor([p.top_k for p in chosen], device=device)[:, None]
            self.top_p = torch.tensor([p.top_p for p in chosen], device=device)[:, None]

    def pick(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
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
