"""LoRA adapters for the torch engine: peft folders under LLMQ_ADAPTERS_DIR,
loaded when a request first asks for one, at most LLMQ_MAX_ADAPTERS at once;
rows of different adapters share a batch through peft's mixed-adapter forward."""

from __future__ import annotations

import collections
from pathlib import Path

import structlog

from workers.engines.base import EngineError
from workers.engines.torch.row import Row
from workers.settings import WorkerSettings

log = structlog.get_logger(__name__)

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


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
        """Make sure `name` is loaded (called in the scheduler thread). False: no slot free now."""
        if name is None:
            return True
        if name in self.loaded:
            self.loaded.move_to_end(name, last=False)
            return True
        in_use = {row.request.adapter for row in running}
        idle = [n for n in reversed(self.loaded) if n not in in_use]  # least recently used first
        if len(self.loaded) >= self.limit and not idle:
            return False
        # Load before unloading: peft keeps at least one adapter on its model.
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
    """The model the engine calls when adapters are on: the base until the first
    adapter loads, then the PeftModel wrapping it."""

    def __init__(self, base) -> None:
        self.base = base
        self.peft = None

    def load(self, name: str, path: Path) -> None:
        from peft import PeftModel

        if self.peft is None:
            self.peft = PeftModel.from_pretrained(self.base, str(path), adapter_name=name).eval()
        else:
            self.peft.load_adapter(str(path), adapter_name=name)

    def unload(self, name: str) -> None:
        self.peft.delete_adapter(name)

    def __call__(self, adapter_names: list[str], **kwargs):
        if self.peft is None:  # no adapter loaded yet: every row is a base row
            return self.base(**kwargs)
        return self.peft(adapter_names=adapter_names, **kwargs)
