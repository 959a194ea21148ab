"""Adapters for the torch engine: peft folders (LoRA or (IA)^3) under
LLMQ_ADAPTERS_DIR, loaded when a request first asks for one, at most
LLMQ_MAX_ADAPTERS at once; rows of different adapters, and base rows, share a batch."""

from __future__ import annotations

import collections
import contextlib
from pathlib import Path

import structlog
import torch

from workers.engines.base import EngineError
from workers.engines.common import adapter_kind
from workers.engines.torch.row import Row
from workers.settings import WorkerSettings

log = structlog.get_logger(__name__)

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


class AdapterError(ValueError):
    """An adapter that cannot be loaded: its request's error, never the engine's."""


class Adapters:
    """The adapters folder and the adapters loaded from it, most recently used
    first; one that no running row uses is unloaded to make room."""

    def __init__(self, root: Path, limit: int, base_model) -> None:
        self.root = root
        self.limit = limit
        self.model = PeftHolder(base_model)  # what the engine calls in place of the base model
        self.loaded: collections.OrderedDict[str, None] = collections.OrderedDict()

    @classmethod
    def create(cls, settings: WorkerSettings, model) -> Adapters | None:
        if not settings.adapters_dir:
            return None
        root = Path(settings.adapters_dir)
        if not root.is_dir():
            raise EngineError(f"LLMQ_ADAPTERS_DIR {str(root)!r} is not a directory")
        return cls(root, settings.max_adapters, model)

    def ready(self, name: str | None, running: list[Row]) -> bool:
        """Make sure `name` is loaded (called in the scheduler thread). False: no slot free now.
        AdapterError: its folder can't be loaded (the request fails; the next one tries again,
        so an adapter still being copied in is served once it is whole)."""
        if name is None:
            return True
        if name in self.loaded:
            self.loaded.move_to_end(name, last=False)
            return True
        in_use = {row.request.adapter for row in running}
        idle = [n for n in reversed(self.loaded) if n not in in_use]  # least recently used first
        if len(self.loaded) >= self.limit and not idle:
            return False
        # Load before unloading, so a load that fails leaves the loaded ones as they were.
        self.model.load(name, self.root / name)
        self.loaded[name] = None
        self.loaded.move_to_end(name, last=False)
        while len(self.loaded) > self.limit:
            evicted = idle.pop(0)
            self.model.unload(evicted)
            del self.loaded[evicted]
        log.info("adapter_loaded", adapter=name, loaded=len(self.loaded))
        return True


class PeftHolder:
    """The model the engine calls when adapters are on: the base, wrapped in a peft
    PeftModel while LoRA adapters are loaded (peft's mixed-adapter forward runs each row
    through its own), with the loaded (IA)^3 adapters' scalings hooked onto its layers."""

    def __init__(self, base) -> None:
        self.base = base
        self.peft = None  # the PeftModel of the LoRA adapters, while any is loaded
        self.ia3 = IA3Scalings(base)

    def load(self, name: str, path: Path) -> None:
        try:
            kind = adapter_kind(path)
        except ValueError as exc:
            raise AdapterError(str(exc)) from exc
        if kind == "IA3":
            self.ia3.load(name, path)
        elif kind == "LORA":
            self._load_lora(name, path)
        else:  # the engine's refusal names the types it serves; this guards a folder replaced since
            raise AdapterError(f"adapter {name!r} is a peft {kind} adapter, which the torch engine cannot serve")

    def _load_lora(self, name: str, path: Path) -> None:
        from peft import PeftModel

        try:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=name).eval()
            else:
                self.peft.load_adapter(str(path), adapter_name=name)
        except Exception as exc:  # a folder peft can't read (half-copied, another model's): the request's error
            self._undo_lora(name)
            raise AdapterError(f"cannot load adapter {name!r}: {exc}") from exc

    def _undo_lora(self, name: str) -> None:
        """Take off what a failed load put on the model: peft adds an adapter's layers before
        it reads the weights, and a first load that fails leaves them on the base with no
        PeftModel to unload them by."""
        if self.peft is not None:
            if name in self.peft.peft_config:
                self._unload_lora(name)
            return
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module_name, module in list(self.base.named_modules()):
            if isinstance(module, BaseTunerLayer):
                parent, _, child = module_name.rpartition(".")
                setattr(self.base.get_submodule(parent), child, module.get_base_layer())
        self.base.__dict__.pop("peft_config", None)

    def unload(self, name: str) -> None:
        if name in self.ia3.names:
            self.ia3.unload(name)
        else:
            self._unload_lora(name)

    def _unload_lora(self, name: str) -> None:
        if len(self.peft.peft_config) > 1:
            self.peft.delete_adapter(name)
        else:
            # peft can't run a PeftModel left with no adapter: take its layers off the base.
            self.peft.unload()
            self.peft = None

    def __call__(self, adapter_names: list[str], **kwargs):
        with self.ia3.rows(adapter_names):
            if self.peft is None:  # no LoRA adapter loaded: every row is a base or (IA)^3 row
                return self.base(**kwargs)
            loras = self.peft.peft_config
            return self.peft(adapter_names=[n if n in loras else BASE_ADAPTER for n in adapter_names], **kwargs)


class IA3Scalings:
    """Loaded (IA)^3 adapters, applied per batch row: each targeted linear layer gets a
    forward hook that multiplies its output (keys, values) or, for feed-forward layers,
    its input by the vector of the row's adapter, and by ones for every other row.

    Written here because peft has no mixed-batch (IA)^3: its IA3 layers take no
    `adapter_names` and scale every row by the active adapter, and a PeftModel can't hold
    LoRA and (IA)^3 adapters together. The vectors are read with peft's own loader, and
    applied as its IA3 layers apply them (peft/tuners/ia3/layer.py), so a row's text is
    what peft's PeftModel gives for that adapter alone.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.names: list[str] = []  # loaded adapters; row index i + 1 in each layer's table
        self.layers: dict[tuple[str, bool], _ScaledLayer] = {}  # (module name, feed-forward): its hook
        self.index: torch.Tensor | None = None  # this step's table row per batch row; None: no (IA)^3 row

    def load(self, name: str, path: Path) -> None:
        from peft.utils import load_peft_weights

        try:
            weights = load_peft_weights(str(path), device="cpu")
        except Exception as exc:
            raise AdapterError(f"cannot load adapter {name!r}: {exc}") from exc
        vectors = {self._target(name, key, vector): vector for key, vector in weights.items()}
        for (module, feedforward), vector in vectors.items():
            key = (module, feedforward)
            if key not in self.layers:
                self.layers[key] = _ScaledLayer(self, self._linear(module), feedforward)
            self.layers[key].vectors[name] = vector.flatten().float()
        self.names.append(name)
        self._rebuild()

    def unload(self, name: str) -> None:
        self.names.remove(name)
        for layer in self.layers.values():
            layer.vectors.pop(name, None)
        self._rebuild()

    def _target(self, name: str, key: str, vector: torch.Tensor) -> tuple[str, bool]:
        """(module name, feed-forward) of one saved vector: peft saves a feed-forward layer's
        as (1, in_features), any other's as (out_features, 1)."""
        if not key.endswith(".ia3_l"):
            raise AdapterError(f"adapter {name!r}: {key!r} is not an (IA)^3 vector")
        module = key.removeprefix("base_model.model.").removesuffix(".ia3_l")
        linear = self._linear(module, name)
        if tuple(vector.shape) == (1, linear.in_features):
            return module, True
        if tuple(vector.shape) == (linear.out_features, 1):
            return module, False
        raise AdapterError(f"adapter {name!r}: its vector for {module!r} has shape {tuple(vector.shape)}, "
                           f"which does not fit this model's layer ({linear.in_features} -> {linear.out_features})")

    def _linear(self, module: str, adapter: str = "") -> torch.nn.Linear:
        try:
            layer = self.model.get_submodule(module)
        except AttributeError:
            raise AdapterError(f"adapter {adapter!r} scales {module!r}, which this model has not") from None
        if hasattr(layer, "get_base_layer"):  # wrapped by a loaded LoRA adapter: the linear inside
            layer = layer.get_base_layer()
        if not isinstance(layer, torch.nn.Linear):
            raise AdapterError(f"adapter {adapter!r} scales {module!r}, a {type(layer).__name__}; "
                               f"the torch engine serves (IA)^3 on linear layers only")
        return layer

    def _rebuild(self) -> None:
        for key in [key for key, layer in self.layers.items() if not layer.vectors]:
            self.layers.pop(key).remove()
        for layer in self.layers.values():
            layer.rebuild(self.names)

    @contextlib.contextmanager
    def rows(self, adapter_names: list[str]):
        """Scale each batch row by its adapter's vectors during one forward pass."""
        slots = {name: i + 1 for i, name in enumerate(self.names)}
        if self.layers and any(name in slots for name in adapter_names):
            device = next(iter(self.layers.values())).table.device
            self.index = torch.tensor([slots.get(name, 0) for name in adapter_names], device=device)
        try:
            yield
        finally:
            self.index = None


class _ScaledLayer:
    """One linear layer's (IA)^3 hook and table: row 0 ones (base and LoRA rows), row i
    the vector of the i-th loaded adapter (ones where that adapter leaves the layer alone)."""

    def __init__(self, owner: IA3Scalings, linear: torch.nn.Linear, feedforward: bool) -> None:
        self.owner = owner
        self.feedforward = feedforward
        self.size = linear.in_features if feedforward else linear.out_features
        self.device = linear.weight.device
        self.vectors: dict[str, torch.Tensor] = {}
        self.table = torch.ones(1, self.size, device=self.device)
        self.handle = (linear.register_forward_pre_hook(self._scale_input) if feedforward
                       else linear.register_forward_hook(self._scale_output))

    def rebuild(self, names: list[str]) -> None:
        ones = torch.ones(self.size)
        self.table = torch.stack([ones, *(self.vectors.get(n, ones).cpu() for n in names)]).to(self.device)

    def remove(self) -> None:
        self.handle.remove()

    def _scaling(self, x: torch.Tensor) -> torch.Tensor | None:
        index = self.owner.index
        if index is None:
            return None
        # One vector per batch row, broadcast over its positions.
        return self.table[index].view(x.shape[0], *[1] * (x.dim() - 2), self.size)

    def _scale_input(self, _linear, args):
        x = args[0]
        if (scaling := self._scaling(x)) is None:
            return None
        return ((x.to(scaling.dtype) * scaling).to(x.dtype), *args[1:])

    def _scale_output(self, _linear, _args, out):
        if (scaling := self._scaling(out)) is None:
            return None
        return (out * scaling).to(out.dtype)
