"""The model on its device: loading it (tokenizer, device, dtype, int8
quantization, LoRA adapters) and running its forward passes, a prefill of newly
admitted rows and one decode step of the running batch."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch

from workers.engines.base import EngineError
from workers.engines.torch import attention
from workers.engines.torch.adapters import BASE_ADAPTER, Adapters
from workers.engines.torch.batch import Batch
from workers.engines.torch.kv_cache import prefill_cache
from workers.engines.torch.row import Row
from workers.settings import WorkerSettings


class ModelRunner:
    """The loaded model, its tokenizer and what the scheduler needs to know of them."""

    def __init__(self, settings: WorkerSettings) -> None:
        """Load and warm up the model; raise EngineError when that fails."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings = settings
        source = settings.model
        build_hint = f"to build the tiny local model there, run `python -m workers.tinymodel {source}`"
        # A path that is plainly local and missing would otherwise be tried as
        # a hub name: a slow, confusing failure (or a surprise download).
        if source.startswith((".", "/")) and not Path(source).is_dir():
            raise EngineError(f"model directory {source!r} does not exist; {build_hint}")
        device = self._device()
        dtype = self._dtype(device)
        if device.type == "cpu":
            self._use_cpu_threads()
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            # Decode steps attend generation by generation (attention.py); prefills run transformers' SDPA.
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attention.NAME)
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
        # transformers 5 renamed forward's `past_key_values` to `cache`
        # (the old name warns, and goes in 5.40); 4.x knows only the old one.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._keep_last_logits = "logits_to_keep" in params

        if settings.quantize == "int8":
            model = self._quantize_int8(model, device)
        self.adapters = Adapters.create(settings, model)
        if self.adapters is not None:
            model = self.adapters.model

        self.tokenizer, self.model, self.device = tokenizer, model, device
        self.context = int(context)
        self.eos_ids = eos_ids
        # Padding is masked out, so any id works when the tokenizer has no pad.
        self.pad_id = next((i for i in (tokenizer.pad_token_id, *sorted(eos_ids)) if i is not None), 0)
        try:
            # Warm up, and surface a device or dtype problem now rather than on a request.
            with torch.inference_mode():
                ids = torch.tensor([[self.pad_id]], device=device)
                self.forward(ids, None, torch.zeros_like(ids), prefill_cache(), [None])
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

    @staticmethod
    def _use_cpu_threads() -> None:
        """Run the model's ops on all cores but one, unless OMP_NUM_THREADS says otherwise.

        The spare core is the event loop's: it turns outputs into deltas and
        serves Kafka while the scheduler thread runs the model (vLLM's CPU
        backend reserves one the same way). Giving the model every core makes
        each op wait for a thread the event loop (or another process) holds,
        which on a small machine costs more than the extra core brings.
        """
        if "OMP_NUM_THREADS" in os.environ:
            return
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores - 1))

    def _dtype(self, device: torch.device) -> torch.dtype:
        if self.settings.dtype == "auto":
            # CPUs run bfloat16 matmuls slowly (or emulated); fp32 is the safe default there.
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.settings.dtype)

    def _quantize_int8(self, model, device: torch.device):
        if device.type != "cpu" or next(model.parameters()).dtype != torch.float32:
            raise EngineError("LLMQ_QUANTIZE=int8 is PyTorch dynamic quantization: it needs LLMQ_DEVICE=cpu "
                              "and float32 weights")
        if self.settings.adapters_dir:
            raise EngineError("LLMQ_QUANTIZE=int8 cannot serve LoRA adapters (LLMQ_ADAPTERS_DIR): peft does "
                              "not wrap dynamically quantized linear layers")
        # Weights stored as int8, activations quantized per batch on the fly:
        # the linear layers are most of a decode step's time and memory.
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

    def prefill(self, rows: list[Row]):
        """Run the rows' prompts together; each row's last logits, their cache and mask."""
        width = max(len(row.prompt_ids) for row in rows)
        # Left padding, so every row's next token lands in the last column.
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids)
            mask[b, width - len(row.prompt_ids):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        # Each row's positions count its own tokens, as if it ran alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # The attention mask in 4D, as transformers' SDPA mask is (causal, padding hidden):
        # transformers builds none for a custom attention function.
        causal = torch.ones((width, width), dtype=torch.bool, device=self.device).tril()
        mask_4d = causal[None, None] & mask.bool()[:, None, None, :]
        cache = prefill_cache()
        adapters = [row.request.adapter for row in rows]
        return self.forward(input_ids, mask_4d, positions, cache, adapters), cache, mask

    def decode(self, batch: Batch) -> torch.Tensor:
        """One step over every running row: each row's last token in, its next logits out."""
        rows = batch.rows
        last = torch.tensor([[row.tokens[-1]] for row in rows], device=self.device)
        positions = torch.tensor([[len(row.prompt_ids) + len(row.tokens) - 1] for row in rows], device=self.device)
        # No attention mask: each generation's is in the decode cache (attention.py).
        return self.forward(last, None, positions, batch.decode_cache(), batch.adapter_names())

    def forward(self, input_ids, mask, positions, cache, adapters: list[str | None]) -> torch.Tensor:
        """Logits of each row's last position, as float32 (sampling wants the precision)."""
        kwargs = {self._cache_kwarg: cache}
        if self._keep_last_logits:
            kwargs["logits_to_keep"] = 1  # the prefill's other positions' logits are never read
        if self.adapters is not None:
            # peft runs each row through its own adapter (mixed-adapter batches).
            kwargs["adapter_names"] = [name or BASE_ADAPTER for name in adapters]
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
        return out.logits[:, -1, :].float()
