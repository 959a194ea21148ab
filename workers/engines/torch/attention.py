"""The torch engine's attention function, registered with transformers'
AttentionInterface. A step runs one token per batch row: each running row's
last token, and every token of the prompts joining this step. Running rows
attend their generation's cache (batch.py); a prompt's tokens attend each
other, causally."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface

NAME = "llmq_step"  # the model's attn_implementation while the engine runs it


@dataclass
class StepViews:
    """One layer's keys and values per part of the step (each generation, then each
    new prompt), in the step's row order: what the step cache's layers hand the
    attention function in place of keys."""

    keys: list[torch.Tensor]  # [rows, kv heads, columns, head dim]; a prompt's: [1, kv heads, its tokens, head dim]
    values: list[torch.Tensor]
    masks: list[torch.Tensor | None]  # a generation's [rows, 1, 1, columns], True where a row has a token; None: a prompt


def attention(module, query, key: StepViews, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    sdpa = torch.nn.functional.scaled_dot_product_attention
    outputs, first = [], 0
    for keys, values, mask in zip(key.keys, key.values, key.masks):
        if mask is None:
            # A prompt: its tokens, one per row, become one sequence attending causally.
            length = keys.shape[2]
            q = query[first:first + length, :, 0].transpose(0, 1)[None]  # [1, heads, tokens, head dim]
            out = sdpa(q, keys, values, is_causal=True, scale=scaling, enable_gqa=True)
            outputs.append(out[0].transpose(0, 1)[:, :, None])
        else:
            # One query token per row: the query heads that share a key head become
            # that head's query rows (as transformers' pack_gqa), so no key is repeated.
            length, kv_heads = keys.shape[:2]
            q = query[first:first + length].reshape(length, kv_heads, -1, query.shape[-1])
            out = sdpa(q, keys, values, attn_mask=mask, scale=scaling)
            outputs.append(out.reshape(length, -1, 1, out.shape[-1]))
        first += length
    # [rows, heads, 1, head dim] -> [rows, 1, heads, head dim], as transformers' attention functions return
    return torch.cat(outputs).transpose(1, 2), None


AttentionInterface.register(NAME, attention)
