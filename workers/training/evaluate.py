"""A model's figures on a job's validation examples, taken before and after training:
eval loss (mean over answer tokens) and its perplexity, and, when every answer is
a short label, exact-match accuracy of greedy answers. The quality gate reads them."""

from __future__ import annotations

import math
from typing import Any

from workers.training.data import Tokenized

SHORT_ANSWER_TOKENS = 8  # answers up to this long are labels: accuracy is worth measuring


def figures(model: Any, tokenizer: Any, examples: list[Tokenized], batch_size: int = 16) -> dict:
    figures = {"n_eval": len(examples), **loss(model, tokenizer, examples, batch_size)}
    answer_tokens = [len(x.input_ids) - x.prompt_len - 1 for x in examples]  # less EOS
    if max(answer_tokens) <= SHORT_ANSWER_TOKENS:
        figures["accuracy"] = accuracy(model, tokenizer, examples, max(answer_tokens) + 1)
    return figures


def loss(model: Any, tokenizer: Any, examples: list[Tokenized], batch_size: int) -> dict:
    import torch
    from transformers import DataCollatorForSeq2Seq

    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate([x.features() for x in examples[start:start + batch_size]]).to(model.device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # Summed over answer tokens, so every token weighs the same whatever its batch.
            shifted = batch["labels"][:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=-100, reduction="sum").item()
            count += int((shifted != -100).sum())
    mean = total / max(count, 1)
    return {"eval_loss": round(mean, 4), "perplexity": round(math.exp(min(mean, 50.0)), 3)}


def accuracy(model: Any, tokenizer: Any, examples: list[Tokenized], max_new_tokens: int) -> float:
    import torch

    right = 0
    model.eval()
    with torch.no_grad():
        for x in examples:
            prompt = torch.tensor([x.input_ids[:x.prompt_len]], device=model.device)
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            answer = tokenizer.decode(out[0, x.prompt_len:], skip_special_tokens=True)
            right += answer.strip() == x.completion.strip()
    return round(right / len(examples), 4)
