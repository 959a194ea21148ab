"""The torch engine's attention function, registered with transformers'
AttentionInterface: a decode step attends each generation of the running
batch (batch.py) over its own columns; everything else is transformers' SDPA."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "llmq_generations"  # the model's attn_implementation while the engine runs it


@dataclass
class GenerationViews:
    """One layer's keys, values and mask per generation, in the running batch's row order
    (what the decode cache's layers hand the attention function in place of keys)."""

    keys: list[torch.Tensor]  # [rows, kv heads, columns, head dim], each generation its own columns
    values: list[torch.Tensor]
    masks: list[torch.Tensor]  # [rows, 1, 1, columns], True where a row has a token


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if not isinstance(key, GenerationViews):  # a prefill: its mask came in 4D, from ModelRunner.prefill
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    outputs, first = [], 0
    for keys, values, mask in zip(key.keys, key.values, key.masks):
        rows, kv_heads = keys.shape[:2]
        # One query token per row: the query heads that share a key head become
        # that head's query rows (as transformers' pack_gqa), so no key is repeated.
        q = query[first:first + rows].reshape(rows, kv_heads, -1, query.shape[-1])
        out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
        outputs.append(out.reshape(rows, -1, 1, out.shape[-1]))
        first += rows
    # [rows, heads, 1, head dim] -> [rows, 1, heads, head dim], as transformers' attention functions return
    return torch.cat(outputs).transpose(1, 2), None


AttentionInterface.register(NAME, attention)
