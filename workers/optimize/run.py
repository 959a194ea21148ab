"""One optimization job's run, start to end, in the calling thread: load its source model
(the base, a whole model from the registry, or the base with a fine-tune's adapter), read
its files, evaluate, apply its strategy (strategies.py; QAT and pruning's recovery train
through tune.py), evaluate the result and save it in the registry's `models/` folder
(artifact.py). No Kafka, no Redis: the trainer service calls `run_optimization` and records
what it reports, as it does fine-tuning's `run_job`."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from transformers import set_seed

from shared.optimization import OptimizationMessage, Recovery, root_model
from shared.training import REGISTRY_METADATA, split_fine_tuned
from workers.folders import folder_bytes
from workers.optimize import artifact, strategies
from workers.optimize.strategies import Data, StrategyError
from workers.optimize.tune import fine_tune
from workers.training import evaluate
from workers.training.checkpoints import Hooks
from workers.training.data import TrainingFileError, load_file, split_heldout
from workers.training.model import load_tokenizer, resolve_device
from workers.training.run import JobFailed, JobResult
from workers.training.settings import TrainerSettings

__all__ = ["run_optimization"]


class Stopped(Exception):
    """The job's short fine-tune was stopped before its end (a cancel, a lost lease, SIGTERM)."""


def run_optimization(message: OptimizationMessage, settings: TrainerSettings, hooks: Hooks) -> JobResult:
    """Runs `message`'s job to its end. What the job's owner can act on (a bad file, a source
    or strategy this model or machine can't take, a full disk) is a failed JobResult; a stop
    is a "stopped" one (the service knows why); anything else is raised."""
    try:
        return _Run(message, settings, hooks).run()
    except (TrainingFileError, StrategyError, JobFailed) as exc:
        hooks.event(str(exc), "error", {"code": exc.code})
        return JobResult("failed", exc.code, str(exc))
    except Stopped:
        hooks.event("Optimization stopped before its end", "info", {})
        return JobResult("stopped")


class _Run:
    def __init__(self, message: OptimizationMessage, settings: TrainerSettings, hooks: Hooks):
        self.message, self.settings, self.hooks = message, settings, hooks
        self.device = resolve_device(settings.device)
        self.tokenizer: Any = None
        self.data: Data | None = None

    def run(self) -> JobResult:
        m = self.message
        # 1) the source model and the job's data
        if m.base_model != self.settings.base_model_name or root_model(m.model) != m.base_model:
            raise JobFailed("model_not_available", f"this trainer's model is {self.settings.base_model_name!r}; "
                                                   f"{m.model!r} does not derive from it")
        self.tokenizer = load_tokenizer(self.settings.model)
        model = self._source()
        self.data = self._data(model.config.max_position_embeddings)
        heldout = self.data.heldout if self.data else []
        before = self._evaluate(model, heldout, "before")
        # 2) the strategy (a short fine-tune inside, for QAT and a recovery)
        self.hooks.event(f"Applying {m.strategy.type}", "info", {"strategy": m.strategy.type})
        set_seed(m.seed)
        trains = self.data is not None and bool(self.data.train)
        optimized = strategies.apply(m.strategy, model, self.tokenizer, data=self.data,
                                     tune=self._tune if trains else None)
        if self.hooks.should_stop():
            raise Stopped
        # 3) figures after, and the artifact in the registry (no quality gate: the figures are the point)
        after = self._evaluate(optimized.model, heldout, "after")
        eval_figures = {"before": before, "after": after} if before is not None else {}
        target = Path(self.settings.registry_dir) / "models" / split_fine_tuned(m.optimized_model)[1]
        figures = self._save(optimized, target, eval_figures)
        self.hooks.event(f"Saved {m.optimized_model} ({figures['size_bytes']} bytes)", "info", {"path": str(target)})
        return JobResult("succeeded", eval=eval_figures, figures=figures, output_path=str(target))

    def _source(self) -> Any:
        """The source model, float weights on the trainer's device: the base; a whole model from
        the registry (a full fine-tune or an optimized model); or the base with a fine-tune's
        adapter, left a peft model for merge_lora and merged into the base for anything else."""
        import torch
        from transformers import AutoModelForCausalLM

        m, registry = self.message, Path(self.settings.registry_dir)
        if m.model == m.base_model:
            return AutoModelForCausalLM.from_pretrained(self.settings.model, dtype=torch.float32).to(self.device)
        output = split_fine_tuned(m.model)[1]
        if (registry / "models" / output).is_dir():
            return artifact.load_model(registry / "models" / output, self.device)
        if (registry / "adapters" / output).is_dir():
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(self.settings.model, dtype=torch.float32).to(self.device)
            tuned = PeftModel.from_pretrained(base, registry / "adapters" / output)
            return tuned if m.strategy.type == "merge_lora" else tuned.merge_and_unload()
        raise JobFailed("model_not_found", f"the registry has no model {output!r} (the source {m.model!r}); was it "
                                           "deleted?")

    def _data(self, context: int) -> Data | None:
        """The job's examples: train from training_file, held out from validation_file, else a
        share of training_file (by the seed); None without files."""
        m, files = self.message, self.settings.files_dir
        max_tokens = self.settings.max_sequence_tokens or context
        train = load_file(files, m.training_file, self.tokenizer, max_tokens, "invalid_training_file") \
            if m.training_file else []
        if m.validation_file:
            return Data(train, load_file(files, m.validation_file, self.tokenizer, max_tokens,
                                         "invalid_validation_file"))
        if train:
            return Data(*split_heldout(train, self.settings.heldout_fraction, m.seed))
        return None

    def _evaluate(self, model: Any, heldout: list, when: str) -> dict | None:
        if not heldout:
            return None
        found = evaluate.figures(model, self.tokenizer, heldout)
        self.hooks.event(f"Evaluation {when}: eval loss {found['eval_loss']}", "info", found)
        return found

    def _tune(self, model: Any, recovery: Recovery) -> None:
        """strategies.Tune: the short full fine-tune, at the trainer's full fine-tune learning rate."""
        done = fine_tune(model, self.tokenizer, self.data.train, recovery,
                         learning_rate=self.settings.full_learning_rate, seed=self.message.seed,
                         work_dir=str(Path(self.settings.training_dir) / self.message.id), hooks=self.hooks)
        if not done:
            raise Stopped

    def _save(self, optimized: strategies.Optimized, target: Path, eval_figures: dict) -> dict:
        """Saves the artifact; its figures with its size on disk, which llmq-model.json then records too."""
        m = self.message
        meta = {"job_id": m.id, "model": m.optimized_model, "base_model": m.base_model, "source_model": m.model,
                "method": "optimization", "strategy": m.strategy.model_dump(mode="json"), "eval": eval_figures,
                "figures": dict(optimized.figures), "created_at": int(time.time())}
        try:
            artifact.save(optimized, self.tokenizer, target, meta)
            figures = {**optimized.figures, "size_bytes": folder_bytes(target)}
            record = json.loads((target / REGISTRY_METADATA).read_text())
            # Replaced whole (a reader sees the old file or the new, never half of one).
            staged = target / f".{REGISTRY_METADATA}.tmp"
            staged.write_text(json.dumps({**record, "figures": figures}, indent=2) + "\n")
            os.replace(staged, target / REGISTRY_METADATA)
        except (OSError, SafetensorError) as exc:
            raise JobFailed("publish_failed", f"could not write the output to the registry: {exc}") from exc
        return figures
