"""The torch engine: a transformers causal LM run by our own batched decode loop.

Why our own loop rather than `model.generate`: `generate` takes one set of
sampling params per call, but a micro-batch mixes requests with their own
temperature, top_p, top_k, seed, stop strings and max_tokens. The loop here is
one padded forward pass per step over the whole batch, with per-row sampling
and per-row finish. transformers' own continuous batching (`generate_batch`)
would handle the mix, but REFERENCE measured it 17x slower than a padded static
batch on these CPUs. Rows that finish early ride along until the batch is done
(micro-batching); continuous batching is a later step.

Everything heavy runs in a worker thread (`asyncio.to_thread`), so the
worker's event loop keeps heart-beating Kafka while a batch runs.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shared.settings import Settings
from workers.engines.base import EngineError, GenerationRequest, GenerationResult


@dataclass
class _Row:
    """One request's state in the decode loop."""

    index: int  # position in the batch (and in the results)
    request: GenerationRequest
    prompt_ids: list[int]
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    text: str | None = None  # set when a stop string cut the text
    finish_reason: str | None = None
    first_token_at: float | None = None
    finished_at: float | None = None


class TorchEngine:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model_name = settings.served_model_name
        self.model = None
        self.tokenizer = None
        # One batch at a time: the model and its memory are not shared.
        self._lock = asyncio.Lock()

    # ---- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    async def close(self) -> None:
        self.model = self.tokenizer = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = self.settings.model
        build_hint = f"to build the tiny local model there, run `python -m workers.tinymodel {source}`"
        # A path that is plainly local and missing would otherwise be tried as
        # a hub name: a slow, confusing failure (or a surprise download).
        if source.startswith((".", "/")) and not Path(source).is_dir():
            raise EngineError(f"model directory {source!r} does not exist; {build_hint}")
        device = self._device()
        dtype = self._dtype(device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
            model.to(device).eval()
        except Exception as exc:
            hint = "" if Path(source).is_dir() else f" (not a local directory; {build_hint})"
            raise EngineError(f"cannot load model {source!r}: {exc}{hint}") from exc

        config = model.config.get_text_config()
        context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        if not context:
            raise EngineError(f"model {source!r}: its config does not say how long its context is")
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)

        self.tokenizer, self.model, self.device = tokenizer, model, device
        self.context = int(context)
        self.eos_ids = eos_ids
        # Padding is masked out, so any id works when the tokenizer has no pad.
        self.pad_id = next((i for i in (tokenizer.pad_token_id, *sorted(eos_ids)) if i is not None), 0)
        # transformers 5 renamed forward's `past_key_values` to `cache`
        # (the old name warns, and goes in 5.40); 4.x knows only the old one.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keep_last_logits = "logits_to_keep" in params
        try:
            # Warm up, and surface a device or dtype problem now rather than on a request.
            with torch.inference_mode():
                self._forward(torch.tensor([[self.pad_id]], device=device),
                              torch.ones(1, 1, dtype=torch.long, device=device),
                              torch.zeros(1, 1, dtype=torch.long, device=device), self._new_cache())
        except Exception as exc:
            raise EngineError(f"model {source!r} failed its first forward pass on {device}: {exc}") from exc

    def _device(self) -> torch.device:
        name = self.settings.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            return torch.device(name)
        except RuntimeError as exc:
            raise EngineError(f"bad LLMQ_DEVICE {self.settings.device!r}: {exc}") from exc

    def _dtype(self, device: torch.device) -> torch.dtype:
        if self.settings.dtype == "auto":
            # CPUs run bfloat16 matmuls slowly (or emulated); fp32 is the safe default there.
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.settings.dtype)

    # ---- generation --------------------------------------------------------

    async def generate(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        if self.model is None:
            raise EngineError("the torch engine is not started")
        async with self._lock:
            return await asyncio.to_thread(self._generate, batch)

    @torch.inference_mode()
    def _generate(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(batch)
        rows: list[_Row] = []
        for index, request in enumerate(batch):
            prompt_ids, error = self._admit(request)
            if error:
                results[index] = GenerationResult(request.request_id, finish_reason="error",
                                                  prompt_tokens=len(prompt_ids), error=error)
                continue
            generator = None
            if request.params.seed is not None:
                # Each row draws from its own stream, so a seed gives the same
                # text whichever requests share its batch.
                generator = torch.Generator(self.device).manual_seed(request.params.seed)
            rows.append(_Row(index, request, prompt_ids, generator))
        if rows:
            self._decode(rows)
        for row in rows:
            text = row.text if row.text is not None else self._decode_text(row.tokens)
            results[row.index] = GenerationResult(row.request.request_id, text, row.finish_reason,
                                                  len(row.prompt_ids), len(row.tokens),
                                                  first_token_at=row.first_token_at, finished_at=row.finished_at)
        return results

    def _admit(self, request: GenerationRequest) -> tuple[list[int], str | None]:
        """The request's prompt ids, or why it cannot run. Never truncates."""
        if request.adapter:
            return [], f"the torch engine does not serve adapters (asked for {request.adapter!r})"
        try:
            prompt_ids = self._encode(request)
        except Exception as exc:  # a chat template may reject a conversation
            return [], f"cannot tokenize the input: {exc}"
        if not prompt_ids:
            return [], "the prompt is empty after tokenization"
        max_tokens = request.params.max_tokens
        if max_tokens >= self.context:
            return prompt_ids, (f"max_tokens={max_tokens} does not fit the model's context "
                                f"of {self.context} tokens")
        if len(prompt_ids) + max_tokens > self.context:
            return prompt_ids, (f"the prompt is {len(prompt_ids)} tokens; with max_tokens={max_tokens} it needs "
                                f"{len(prompt_ids) + max_tokens}, more than the model's context of "
                                f"{self.context} tokens (shorten the prompt or lower max_tokens)")
        return prompt_ids, None

    def _encode(self, request: GenerationRequest) -> list[int]:
        tokenizer = self.tokenizer
        if request.prompt is not None:
            return tokenizer(request.prompt).input_ids
        messages = [m.model_dump() for m in request.messages or []]
        if tokenizer.chat_template:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            # The template writes its own special tokens (BOS); adding them
            # again would double them.
            return tokenizer(text, add_special_tokens=False).input_ids
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return tokenizer(text).input_ids

    def _decode(self, rows: list[_Row]) -> None:
        device = self.device
        width = max(len(row.prompt_ids) for row in rows)
        # Left padding, so every row's next token lands in the last column.
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
            mask[b, width - len(row.prompt_ids):] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        # Each row's positions count its own tokens, as if it ran alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._new_cache()
        logits = self._forward(input_ids, mask, positions, cache)
        sampling = _Sampling(rows, device)
        for _ in range(max(row.request.params.max_tokens for row in rows)):
            next_ids = sampling.pick(logits, rows)
            now = time.time()
            for row, token in zip(rows, next_ids.tolist()):
                if row.finish_reason is None:
                    self._append(row, token)
                    row.first_token_at = row.first_token_at or now
                    if row.finish_reason is not None:
                        row.finished_at = now
            if all(row.finish_reason for row in rows):
                break
            # Finished rows ride along (micro-batching); their positions are
            # clamped so they never run past the context, which live rows
            # cannot reach (checked at admission).
            positions = (positions[:, -1:] + 1).clamp(max=self.context - 1)
            mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
            logits = self._forward(next_ids[:, None], mask, positions, cache)

    def _append(self, row: _Row, token: int) -> None:
        params = row.request.params
        row.tokens.append(token)  # EOS too: it was generated, and counts (as in vLLM)
        if token in self.eos_ids:
            row.finish_reason = "stop"
            return
        if params.stop and self._stopped(row):
            row.finish_reason = "stop"
            return
        if len(row.tokens) >= params.max_tokens:
            row.finish_reason = "length"

    def _stopped(self, row: _Row) -> bool:
        """Whether the newest token completed a stop string; cuts the text if so."""
        stops = row.request.params.stop
        # Earlier steps found no stop, so a new one ends in the last few tokens:
        # every token is at least one byte, plus slack for a character split
        # across tokens. Decoding only that tail keeps a step O(1).
        window = max(len(s.encode()) for s in stops) + 8
        tail = self._decode_text(row.tokens[-window:])
        if not any(s in tail for s in stops):
            return False
        text = self._decode_text(row.tokens)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut < 0:  # the tail decoded differently from the whole; not a stop
            return False
        row.text = text[:cut]
        return True

    def _decode_text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _forward(self, input_ids, mask, positions, cache) -> torch.Tensor:
        """Logits of each row's last position, as float32 (sampling wants the precision)."""
        kwargs = {self._cache_kwarg: cache}
        if self._keep_last_logits:
            kwargs["logits_to_keep"] = 1  # the prefill's other positions' logits are never read
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return out.logits[:, -1, :].float()


class _Sampling:
    """Per-row next-token choice: greedy, or temperature → top-k → top-p → draw."""

    def __init__(self, rows: list[_Row], device: torch.device) -> None:
        params = [row.request.params for row in rows]
        self.sampled = [b for b, p in enumerate(params) if p.temperature > 0]
        if self.sampled:
            chosen = [params[b] for b in self.sampled]
            self.index = torch.tensor(self.sampled, device=device)
            self.temperature = torch.tensor([p.temperature for p in chosen], device=device)[:, None]
            self.top_k = torch.tensor([p.top_k for p in chosen], device=device)[:, None]
            self.top_p = torch.tensor([p.top_p for p in chosen], device=device)[:, None]

    def pick(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
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
            if rows[b].finish_reason is None:
                draw = torch.multinomial(probs[j], 1, generator=rows[b].generator)
                next_ids[b] = order[j, draw]
        return next_ids
