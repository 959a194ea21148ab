"""Pruning strategies: `prune_l1` zeroes the smallest weights of the decoder layers' linear
layers (same shapes, stored dense), `prune_structured` removes whole attention KV groups,
MLP channels and decoder layers of a Llama-family model, chosen by their measured
importance on calibration text, so its matrices really shrink. Each may then run a short
recovery fine-tune (the job's `tune`)."""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from workers.optimize.strategies import (
    Data,
    Optimized,
    StrategyError,
    Tune,
    dtype_name,
    parameter_count,
)

CORPUS = Path(__file__).parent.parent / "data" / "corpus.txt"
CORPUS_CHARS = 16_000  # the fixed slice of the shipped corpus calibrated on without a training file
CALIBRATION_TOKENS = 8192  # at most this many tokens are run through the model to measure importance
CALIBRATION_BLOCK = 256  # tokens per calibration sequence (examples packed end to end)
CALIBRATION_BATCH = 8  # sequences per forward pass

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
L1_NOTE = ("stored dense: the zeroed weights take the same space on disk and in memory; "
           "dense kernels: no speed-up")


def _recovery(strategy, tune: Tune | None):
    """The recovery asked for, checked before any work: it needs the job's training file."""
    if strategy.recovery is not None and tune is None:
        raise StrategyError("training_file_required",
                            f"{strategy.type} with a recovery fine-tune needs a training_file to train on")
    return strategy.recovery


def _decoder_layers(model: Any) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not layers:
        raise StrategyError("not_supported", f"{type(model).__name__} has no decoder layers at model.layers")
    return layers


# ---- L1 unstructured -------------------------------------------------------------


def prune_l1(model: Any, strategy, tune: Tune | None) -> Optimized:
    recovery = _recovery(strategy, tune)
    # Only the decoder layers' linears: the embeddings are looked up row by row (zeroing by
    # magnitude would blank out whole rare tokens) and the output head scores every token,
    # so both are far more sensitive per weight; unstructured pruning of LLMs (Wanda,
    # SparseGPT) leaves them dense too.
    linears = [m for layer in _decoder_layers(model) for m in layer.modules() if isinstance(m, nn.Linear)]
    for linear in linears:
        prune.l1_unstructured(linear, "weight", amount=strategy.sparsity)
    if recovery is not None:
        # While the masks are in place, each forward computes weight = weight_orig * mask:
        # the pruned weights stay zero however the recovery moves weight_orig.
        tune(model, recovery)
    for linear in linears:
        prune.remove(linear, "weight")  # weight_orig * mask becomes the plain weight
    pruned = sum(m.weight.numel() for m in linears)
    pruned_zeros = sum(int((m.weight == 0).sum()) for m in linears)
    total = parameter_count(model)
    nonzero = sum(int(p.count_nonzero()) for p in model.parameters())
    return Optimized(model, serving={"format": "hf", "dtype": dtype_name(model)}, figures={
        "sparsity_asked": strategy.sparsity,
        "pruned_layers": len(linears),
        "pruned_layers_sparsity": round(pruned_zeros / pruned, 4),
        "model_sparsity": round(1 - nonzero / total, 4),
        "parameters": total,
        "nonzero_parameters": nonzero,
        "recovered": recovery is not None,
        "note": L1_NOTE,
    })


# ---- structured ------------------------------------------------------------------


def _check_llama_family(model: Any) -> nn.ModuleList:
    layers = _decoder_layers(model)
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ATTENTION) or \
                not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in MLP) or not hasattr(mlp, "act_fn"):
            raise StrategyError("not_supported", f"structured pruning needs a Llama-family decoder "
                                                 f"(self_attn.{{q,k,v,o}}_proj, mlp.{{gate,up,down}}_proj): "
                                                 f"{type(model).__name__} has {type(layer).__name__} layers")
    return layers


def _shape(config) -> dict:
    heads = config.num_attention_heads
    return {"layers": config.num_hidden_layers, "attention_heads": heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "intermediate_size": config.intermediate_size}


def _kept(share: float, total: int) -> int:
    """Units kept: the share rounded half up, at least one."""
    return max(1, min(total, int(share * total + 0.5)))


def _calibration_ids(model: Any, data: Data | None, tokenizer: Any) -> torch.Tensor:
    """[sequences, CALIBRATION_BLOCK] token ids: the job's training examples packed end to
    end, or, without them, a fixed slice of the shipped corpus."""
    if data is not None and data.train:
        ids = [t for item in data.train for t in item.input_ids]
    else:
        if tokenizer is None:
            from transformers import AutoTokenizer

            # The registry's model folders (and a base model's path) hold the tokenizer too.
            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
        # verbose=False: the slice is longer than the context on purpose (it is cut into blocks).
        ids = tokenizer(CORPUS.read_text(encoding="utf-8")[:CORPUS_CHARS], verbose=False).input_ids
    ids = ids[:CALIBRATION_TOKENS]
    block = min(CALIBRATION_BLOCK, len(ids))
    if block == 0:
        raise StrategyError("invalid_data", "no calibration tokens to measure importance on")
    return torch.tensor(ids[:len(ids) // block * block]).view(-1, block)


class _Importance:
    """Forward hooks that measure, over the calibration tokens, each decoder layer's
    - MLP channels: mean |act_fn(gate) * up| (the input of down_proj) times the norm of the
      channel's column of down_proj: the expected size of what the channel adds to the
      residual stream (activation alone ignores how strongly down_proj passes it on);
    - KV groups: the mean norm of what the group's query heads add to the residual stream
      through o_proj (each head's slice of o_proj applied to its attention output), so a
      group counts by its effect, not by its raw activations;
    - layer: ShortGPT's block influence, 1 - cosine similarity of the layer's input and
      output hidden states per token: a layer that barely turns the residual stream is the
      one whose removal changes least (ShortGPT found this ranks layers better than
      perplexity-after-removal, at the cost of one forward pass)."""

    def __init__(self, layers: nn.ModuleList, shape: dict):
        self.shape, self.tokens = shape, 0
        n = len(layers)
        self.channels = [torch.zeros(shape["intermediate_size"], dtype=torch.float64) for _ in range(n)]
        self.heads = [torch.zeros(shape["attention_heads"], dtype=torch.float64) for _ in range(n)]
        self.influence = torch.zeros(n, dtype=torch.float64)
        self.handles = []
        for i, layer in enumerate(layers):
            self.handles += [layer.mlp.down_proj.register_forward_pre_hook(self._mlp_hook(i)),
                             layer.self_attn.o_proj.register_forward_pre_hook(self._attention_hook(i)),
                             layer.register_forward_hook(self._layer_hook(i), with_kwargs=True)]

    def _mlp_hook(self, i: int):
        def hook(module, args):
            x = args[0].detach().float().flatten(0, -2)
            self.channels[i] += x.abs().sum(0).double().cpu()
        return hook

    def _attention_hook(self, i: int):
        heads, dim = self.shape["attention_heads"], self.shape["head_dim"]

        def hook(module, args):
            x = args[0].detach().float().flatten(0, -2).view(-1, heads, dim)  # [tokens, heads, head_dim]
            w = module.weight.detach().float().view(-1, heads, dim)  # [hidden, heads, head_dim]
            # Each head's share of o_proj's output, one head at a time ([tokens, hidden] each,
            # not [tokens, heads, hidden] at once: that is large for a real model).
            norms = [(x[:, h] @ w[:, h].T).norm(dim=-1).sum() for h in range(heads)]
            self.heads[i] += torch.stack(norms).double().cpu()
        return hook

    def _layer_hook(self, i: int):
        def hook(module, args, kwargs, output):
            x = (args[0] if args else kwargs["hidden_states"]).detach().float()
            y = (output[0] if isinstance(output, tuple) else output).detach().float()
            cos = nn.functional.cosine_similarity(x.flatten(0, -2), y.flatten(0, -2), dim=-1)
            self.influence[i] += (1 - cos).sum().double().cpu()
            if i == 0:
                self.tokens += cos.numel()
        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def _measure(model: Any, layers: nn.ModuleList, shape: dict, ids: torch.Tensor) -> _Importance:
    importance = _Importance(layers, shape)
    device, training = next(model.parameters()).device, model.training
    model.eval()
    try:
        for batch in ids.split(CALIBRATION_BATCH):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        importance.close()
        model.train(training)
    for layer, channels in zip(layers, importance.channels):
        channels *= layer.mlp.down_proj.weight.detach().float().norm(dim=0).double().cpu()
    return importance


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """The indices of the k highest scores, in their original order."""
    return sorted(scores.topk(k).indices.tolist())


def _rows(weight: torch.Tensor, index: list[int], unit: int = 1, dim: int = 0) -> torch.Tensor:
    """The given units (runs of `unit` rows, or columns for dim=1) of a weight, in order."""
    rows = [u * unit + j for u in index for j in range(unit)]
    return weight.index_select(dim, torch.tensor(rows, device=weight.device)).clone()


def _slice_layer(state: dict, prefix: str, groups: list[int], channels: list[int], shape: dict) -> None:
    """The layer's weights (in `state`, under `prefix`) cut to the kept KV groups and MLP channels."""
    dim = shape["head_dim"]
    per_group = shape["attention_heads"] // shape["kv_heads"]
    q_unit, kv_unit = per_group * dim, dim  # query heads of a group are adjacent: head h uses KV head h // per_group
    for name, unit, dim_ in (("self_attn.q_proj", q_unit, 0), ("self_attn.k_proj", kv_unit, 0),
                             ("self_attn.v_proj", kv_unit, 0), ("self_attn.o_proj", q_unit, 1)):
        state[f"{prefix}{name}.weight"] = _rows(state[f"{prefix}{name}.weight"], groups, unit, dim_)
        if dim_ == 0 and f"{prefix}{name}.bias" in state:
            state[f"{prefix}{name}.bias"] = _rows(state[f"{prefix}{name}.bias"], groups, unit)
    for name, dim_ in (("mlp.gate_proj", 0), ("mlp.up_proj", 0), ("mlp.down_proj", 1)):
        state[f"{prefix}{name}.weight"] = _rows(state[f"{prefix}{name}.weight"], channels, 1, dim_)
        if dim_ == 0 and f"{prefix}{name}.bias" in state:
            state[f"{prefix}{name}.bias"] = _rows(state[f"{prefix}{name}.bias"], channels)


def _pruned_state(model: Any, layers_kept: list[int], groups: dict, channels: dict, shape: dict) -> dict:
    """The model's state dict without the removed layers (the kept ones renumbered) and with
    each kept layer's matrices cut."""
    pattern = re.compile(r"^(model\.layers\.)(\d+)\.(.*)$")
    renumber = {old: new for new, old in enumerate(layers_kept)}
    state = {}
    for key, value in model.state_dict().items():
        match = pattern.match(key)
        if match is None:
            state[key] = value
        elif int(match[2]) in renumber:
            state[f"{match[1]}{renumber[int(match[2])]}.{match[3]}"] = value
    for old, new in renumber.items():
        _slice_layer(state, f"model.layers.{new}.", groups[old], channels[old], shape)
    return state


def _pruned_config(config, layers_kept: list[int], n_groups: int, n_channels: int, shape: dict):
    config = copy.deepcopy(config)
    per_group = shape["attention_heads"] // shape["kv_heads"]
    config.num_attention_heads = n_groups * per_group
    config.num_key_value_heads = n_groups
    config.head_dim = shape["head_dim"]  # no longer hidden_size // num_attention_heads
    config.intermediate_size = n_channels
    config.num_hidden_layers = len(layers_kept)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in layers_kept]
    return config


def _build(model: Any, config, state: dict) -> Any:
    """A fresh model of the pruned config holding the cut weights: a plain HF model, so
    save_pretrained / from_pretrained (and the workers' engines) treat it like any other."""
    from transformers import AutoModelForCausalLM

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    with torch.device(device):
        pruned = AutoModelForCausalLM.from_config(config, dtype=dtype)
    pruned.load_state_dict(state, strict=True)
    pruned.generation_config = copy.deepcopy(model.generation_config)
    pruned.name_or_path = model.name_or_path
    return pruned.eval()


def _units(scores: Iterable[torch.Tensor], keep: int, group: int = 1) -> dict[int, list[int]]:
    """Per layer, the `keep` most important units (a unit: `group` adjacent scores summed)."""
    return {i: _top(s.view(-1, group).sum(-1), keep) for i, s in enumerate(scores)}


def prune_structured(model: Any, strategy, data: Data | None, tune: Tune | None, tokenizer: Any = None) -> Optimized:
    """`tokenizer` tokenizes the corpus slice calibrated on without training examples;
    without it, the model's folder's tokenizer is loaded."""
    recovery = _recovery(strategy, tune)
    layers = _check_llama_family(model)
    before = _shape(model.config)
    if before["attention_heads"] % before["kv_heads"]:
        raise StrategyError("not_supported", "attention heads are not a whole number of KV groups")
    n_groups = _kept(strategy.heads_kept, before["kv_heads"])
    n_channels = _kept(strategy.mlp_kept, before["intermediate_size"])
    n_layers = _kept(strategy.layers_kept, before["layers"])
    if (n_groups, n_channels, n_layers) == (before["kv_heads"], before["intermediate_size"], before["layers"]):
        raise StrategyError("invalid_strategy", f"the shares kept round to the whole model ({before['kv_heads']} "
                                                f"KV groups, {before['layers']} layers): nothing would be pruned")
    parameters_before = parameter_count(model)
    importance = _measure(model, layers, before, _calibration_ids(model, data, tokenizer))
    per_group = before["attention_heads"] // before["kv_heads"]
    groups = _units(importance.heads, n_groups, per_group)
    channels = _units(importance.channels, n_channels)
    layers_kept = _top(importance.influence, n_layers)
    config = _pruned_config(model.config, layers_kept, n_groups, n_channels, before)
    pruned = _build(model, config, _pruned_state(model, layers_kept, groups, channels, before))
    if recovery is not None:
        tune(pruned, recovery)
    return Optimized(pruned, serving={"format": "hf", "dtype": dtype_name(pruned)}, figures={
        "parameters_before": parameters_before,
        "parameters_after": parameter_count(pruned),
        "shape_before": before,
        "shape_after": _shape(pruned.config),
        "layers_removed": [i for i in range(before["layers"]) if i not in layers_kept],
        "block_influence": [round(x, 4) for x in (importance.influence / max(importance.tokens, 1)).tolist()],
        "calibration_tokens": importance.tokens,
        "importance": {"mlp_channels": "mean |act_fn(gate)*up| x |down_proj column|",
                       "kv_groups": "mean norm of the group's heads' output through o_proj",
                       "layers": "block influence (1 - cos(input, output))"},
        "recovered": recovery is not None,
    })
