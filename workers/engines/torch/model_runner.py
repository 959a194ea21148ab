"""The model on its device: loading it (tokenizer, device, dtype, int8
quantization, an optimized model's stored format, LoRA and (IA)^3 adapters) and running
its steps: one forward pass over every running row's last token and the prompts of the
rows joining the batch."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from pathlib import Path

import torch

from shared.schema import Params
from workers.engines.base import EngineError, GenerationRequest
from workers.engines.common import build_hint, missing_model
from workers.engines.torch import attention
from workers.engines.torch.adapters import BASE_ADAPTER, Adapters
from workers.engines.torch.batch import Batch
from workers.engines.torch.row import Row
from workers.optimize import artifact, quantization
from workers.settings import WorkerSettings


class ModelRunner:
    """The loaded model, its tokenizer and what the scheduler needs to know of them."""

    def __init__(self, settings: WorkerSettings) -> None:
        """Load and warm up the model; raise EngineError when that fails."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.settings = settings
        source = settings.model_path
        if missing := missing_model(settings):
            raise EngineError(missing)
        device = self._device()
        # An optimized model's folder says how it is stored (artifact.py); None: a plain model.
        serving = artifact.serving_of(source) if Path(source).is_dir() else None
        dtype = self._dtype(device, serving)
        quantized = serving is not None and serving.get("format", "hf") != "hf"
        if quantized:
            self._check_quantized(serving, device)
        if device.type == "cpu":
            self._use_cpu_threads()
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            # Steps mix running rows and new prompts, one token per batch row (attention.py).
            if quantized:
                model = artifact.load_model(source, device, dtype, attn_implementation=attention.NAME)
            else:
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype,
                                                             attn_implementation=attention.NAME)
                model.to(device).eval()
        except Exception as exc:
            hint = "" if Path(source).is_dir() else f" (not a local directory; {build_hint(source)})"
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
        self.layers = config.num_hidden_layers

        if settings.quantize == "int8":
            model = self._quantize_int8(model, device)
        # A step's rows are tokens: the head runs on the rows whose logits are read (a
        # prompt's last token, each running row), so prompts cost no vocabulary-wide matmul per token.
        self._logit_rows: torch.Tensor | None = None
        head = model.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(self._only_logit_rows)
        self.adapters = Adapters.create(settings, model)
        if self.adapters is not None:
            model = self.adapters.model

        self.tokenizer, self.model, self.device = tokenizer, model, device
        self.decode = self._decoder(tokenizer)
        self.context = int(context)
        self.eos_ids = eos_ids
        try:
            # Warm up, and surface a device or dtype problem now rather than on a request.
            with torch.inference_mode():
                row = Row(GenerationRequest("warm-up", Params(max_tokens=1)), stream=None, prompt_ids=[0])
                self.step(Batch(1), [row])
        except Exception as exc:
            raise EngineError(f"model {source!r} failed its first forward pass on {device}: {exc}") from exc

    @staticmethod
    def _decoder(tokenizer) -> Callable[[list[int]], str]:
        """Token ids to text, special tokens skipped: what each row's detokenization calls,
        twice per token. A fast tokenizer that cleans up no spaces decodes as the tokenizers
        library does, so that is called directly (a fifth of the cost of transformers' wrapper)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", True) is False:
            return functools.partial(backend.decode, skip_special_tokens=True)
        return functools.partial(tokenizer.decode, skip_special_tokens=True)

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

    def _dtype(self, device: torch.device, serving: dict | None) -> torch.dtype:
        if self.settings.dtype == "auto":
            # CPUs run bfloat16 matmuls slowly (or emulated); fp32 is the safe default there.
            default = torch.bfloat16 if device.type == "cuda" else torch.float32
            if serving and serving.get("dtype"):
                saved = getattr(torch, serving["dtype"])
                # An optimized model is served in the dtype its job made it in (a bf16 variant stays
                # bf16 on the CPU; quantized weights load only in theirs), except that a plain fp32
                # folder (pruned on a CPU trainer, say) runs on a GPU as its base model does.
                if serving.get("format", "hf") == "hf" and saved == torch.float32:
                    return default
                return saved
            return default
        return getattr(torch, self.settings.dtype)

    def _check_quantized(self, serving: dict, device: torch.device) -> None:
        """Refuse what a model stored quantized can't be served with, before loading it."""
        name = f"model {self.settings.model_path!r} is stored quantized ({serving['format']})"
        if self.settings.quantize != "none":
            raise EngineError(f"{name}: it cannot be quantized again (unset LLMQ_QUANTIZE)")
        if self.settings.adapters_dir:
            raise EngineError(f"{name}: it cannot serve adapters (LLMQ_ADAPTERS_DIR); peft does not wrap "
                              "quantized linear layers")
        if serving["format"] == "int8_dynamic" and device.type != "cpu":
            raise EngineError(f"{name}: PyTorch dynamic INT8 runs on the CPU only (LLMQ_DEVICE=cpu)")

    def _quantize_int8(self, model, device: torch.device):
        if device.type != "cpu" or next(model.parameters()).dtype != torch.float32:
            raise EngineError("LLMQ_QUANTIZE=int8 is PyTorch dynamic quantization: it needs LLMQ_DEVICE=cpu "
                              "and float32 weights")
        if self.settings.adapters_dir:
            raise EngineError("LLMQ_QUANTIZE=int8 cannot serve adapters (LLMQ_ADAPTERS_DIR): peft does not "
                              "wrap dynamically quantized linear layers")
        return quantization.quantize_int8_dynamic(model)

    def step(self, batch: Batch, joining: list[Row]):
        """One forward pass: each running row's last token, then every token of each joining
        row's prompt, one token per batch row. The logits of each running row and of each
        prompt's last token, in that order; the joining rows' keys and values, for batch.merge."""
        running = batch.rows
        tokens = [row.tokens[-1] for row in running] + [t for row in joining for t in row.prompt_ids]
        positions = ([len(row.prompt_ids) + len(row.tokens) - 1 for row in running]
                     + [p for row in joining for p in range(len(row.prompt_ids))])
        adapters = batch.adapter_names() + [row.request.adapter for row in joining for _ in row.prompt_ids]
        ends = torch.tensor([len(row.prompt_ids) for row in joining], dtype=torch.long).cumsum(0) + len(running) - 1
        cache, prompts = batch.step_cache(joining, self.layers)
        self._logit_rows = torch.cat([torch.arange(len(running)), ends]).to(self.device) if joining else None
        try:
            logits = self.forward(torch.tensor(tokens, device=self.device)[:, None],
                                  torch.tensor(positions, device=self.device)[:, None], cache, adapters)
        finally:
            self._logit_rows = None
        return logits, prompts

    def _only_logit_rows(self, _head, args):
        if self._logit_rows is None:
            return None
        return (args[0][self._logit_rows], *args[1:])

    def forward(self, input_ids, positions, cache, adapters: list[str | None]) -> torch.Tensor:
        """Logits of each row's last position, as float32 (sampling wants the precision)."""
        kwargs = {self._cache_kwarg: cache}
        if self._keep_last_logits:
            kwargs["logits_to_keep"] = 1
        if self.adapters is not None:
            # Each row runs through its own adapter (mixed-adapter batches, adapters.py).
            kwargs["adapter_names"] = [name or BASE_ADAPTER for name in adapters]
        # No attention mask: the step cache says what each row attends (attention.py).
        out = self.model(input_ids=input_ids, position_ids=positions, use_cache=True, **kwargs)
        return out.logits[:, -1, :].float()
