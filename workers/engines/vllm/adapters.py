"""LoRA adapters for the vLLM engine: peft folders under LLMQ_ADAPTERS_DIR, looked
up by name on each request and given the int id vLLM caches their weights by;
their ranks decide the max_lora_rank vLLM starts with."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from workers.engines.common import ADAPTER_NAME, adapter_kind, adapter_refusal
from workers.engines.vllm.mapping import VLLM_LORA_RANKS


class AdapterError(ValueError):
    """A request named an adapter this worker cannot serve."""


@dataclass(frozen=True)
class Adapter:
    name: str
    lora_id: int
    path: str
    rank: int


class Adapters:
    """LoRA adapters by name: one peft `save_pretrained` folder each under `root`.

    Looked up on each request, so an adapter copied in later is served without a
    restart (if its rank fits the max_lora_rank the engine started with). Each
    name gets its int id the first time it is asked for and keeps it for the
    process's life: vLLM caches loaded weights by that id ("lora_int_id must be
    globally unique for a given adapter", vllm/lora/request.py). So replacing an
    adapter's files under the same name needs a worker restart or a new name.
    """

    def __init__(self, root: str | Path | None, max_rank: int = VLLM_LORA_RANKS[-1]) -> None:
        self.root = Path(root) if root else None
        self.max_rank = max_rank
        self._known: dict[str, Adapter] = {}

    def names(self) -> list[str]:
        """The LoRA adapters in the folder now ((IA)^3 and other peft types are refused per request)."""
        if self.root is None or not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if ADAPTER_NAME.fullmatch(p.name)
                      and (p / "adapter_config.json").is_file() and _is_lora(p))

    def ranks(self) -> list[int]:
        return [_read_rank(self.root / name) for name in self.names()]

    def resolve(self, name: str) -> Adapter:
        if (known := self._known.get(name)) is not None:
            return known
        # vLLM serves LoRA only: an (IA)^3 adapter is the torch engine's.
        if (refusal := adapter_refusal(self.root, name, engine="vllm", serves=("LORA",))) is not None:
            raise AdapterError(refusal)
        folder = self.root / name
        rank = _read_rank(folder)
        if rank > self.max_rank:
            # Refused here, before vLLM: it checks the rank only when its engine
            # process loads the weights.
            raise AdapterError(f"adapter {name!r} has rank {rank}, above this worker's max_lora_rank "
                               f"{self.max_rank} (restart the worker to serve it)")
        adapter = Adapter(name, len(self._known) + 1, str(folder), rank)  # vLLM ids start at 1
        self._known[name] = adapter
        return adapter


def _is_lora(folder: Path) -> bool:
    try:
        return adapter_kind(folder) == "LORA"
    except ValueError:
        return True  # _read_rank says what is wrong with it


def _read_rank(folder: Path) -> int:
    try:
        return int(json.loads((folder / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterError(f"adapter {folder.name!r} has no readable rank in adapter_config.json: {exc}") from exc

