"""Serving a published fine-tuned model by name, on the gateway's side: a request
whose `model` is a fine-tuned model of the caller's key is admitted as its base
model with the output as `adapter` (LoRA and (IA)^3 outputs, which workers of the
base model load by name), or left as it is for a full fine-tune (a worker started on
that model serves it). Another key's fine-tuned model is refused exactly as a model
nobody serves is: nothing says it exists."""

from __future__ import annotations

import time
from dataclasses import dataclass

from shared.keys import SERVED_MODELS_CACHE_SECONDS
from shared.schema import RequestSpec
from shared.store.fine_tuning import TrainingStore
from shared.training import split_fine_tuned


# Outputs that are adapters, run by the base model's workers; every other method's output
# (a full fine-tune, an optimized model) is a whole model, served under its own name.
ADAPTER_METHODS = frozenset({"lora", "adapter"})


class NotYours(Exception):
    """A fine-tuned model's name that is not published for this key (or at all)."""


class AdapterConflict(Exception):
    """A fine-tuned model named together with an `adapter` of the request's own."""


@dataclass(frozen=True)
class Published:
    name: str
    tenant: str | None
    base: str
    method: str
    output: str
    created_at: int


class FineTunedModels:
    """The published fine-tuned models, read at most once per `cache_seconds` (as the
    workers' models are); a name missing from that snapshot is read once more, so a
    model is servable as soon as its trainer published it."""

    def __init__(self, training: TrainingStore, auth: bool, cache_seconds: float = SERVED_MODELS_CACHE_SECONDS) -> None:
        self.training = training
        self.auth = auth
        self.cache_seconds = cache_seconds
        self._published: dict[str, Published] = {}
        self._read_at = float("-inf")

    async def _all(self) -> dict[str, Published]:
        if time.monotonic() - self._read_at > self.cache_seconds:
            published = await self.training.all_published()
            self._published = {name: _entry(name, entry) for name, entry in published.items()}
            self._read_at = time.monotonic()
        return self._published

    async def _find(self, name: str) -> Published | None:
        found = (await self._all()).get(name)
        if found is None:
            entry = await self.training.published(name)
            found = _entry(name, entry) if entry else None
        return found

    def _visible(self, model: Published, tenant: str | None) -> bool:
        return not self.auth or model.tenant == tenant

    async def listing(self, tenant: str | None) -> tuple[list[Published], frozenset[str]]:
        """(the fine-tuned models this key may use (with auth off, all) by name, the names of
        other keys' ones, which /v1/models must not show even where a worker serves one).
        Read afresh: listing is rare, and a model just published is listed at once."""
        self._read_at = float("-inf")
        published = (await self._all()).values()
        mine = sorted((m for m in published if self._visible(m, tenant)), key=lambda m: m.name)
        return mine, frozenset(m.name for m in published if not self._visible(m, tenant))

    async def resolve(self, spec: RequestSpec, tenant: str | None) -> RequestSpec:
        """The spec as workers run it: a fine-tuned `model` becomes its base plus `adapter`
        (a full fine-tune's name stays). Any other spec is returned as it is, unread.
        NotYours, AdapterConflict: refused."""
        if spec.model is None or split_fine_tuned(spec.model) is None:
            return spec  # not a fine-tuned name: nothing to look up on the hot path
        model, adapter = await self.route(spec.model, spec.adapter, tenant)
        return spec.model_copy(update={"model": model, "adapter": adapter})

    async def route(self, name: str, adapter: str | None, tenant: str | None) -> tuple[str, str | None]:
        """(model, adapter) that workers run for a request naming `name` and `adapter`."""
        if split_fine_tuned(name) is None:
            return name, adapter
        model = await self._find(name)
        if model is None or not self._visible(model, tenant):
            raise NotYours(name)
        if adapter is not None:
            raise AdapterConflict(name)
        if model.method not in ADAPTER_METHODS:  # a whole model (full fine-tune, optimized): its own workers
            return name, None
        return model.base, model.output


def _entry(name: str, entry: dict) -> Published:
    split = split_fine_tuned(name) or (name, name)
    return Published(name=name, tenant=entry.get("tenant") or None, base=entry.get("base") or split[0],
                     method=entry.get("method", "lora"), output=entry.get("output") or split[1],
                     created_at=int(entry.get("created_at") or 0))
