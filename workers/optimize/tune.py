"""The short full fine-tune that QAT and a pruned model's recovery run: transformers'
Trainer on the job's tokenized examples, every weight trained, no checkpoints (an
optimization job that is interrupted starts again: it is minutes, not hours)."""

from __future__ import annotations

from typing import Any

from transformers import PrinterCallback, Trainer, TrainerCallback, set_seed

from shared.optimization import Recovery
from workers.training.checkpoints import Hooks
from workers.training.data import Tokenized


class _Report(TrainerCallback):
    """The run's losses to the job's progress, and its stop (cancel, lost lease) to the Trainer."""

    def __init__(self, hooks: Hooks | None) -> None:
        self.hooks = hooks
        self.stopped = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.hooks is not None and logs and "loss" in logs:
            self.hooks.progress({"step": state.global_step, "total_steps": state.max_steps, "epoch": state.epoch,
                                 "train_loss": logs["loss"], "learning_rate": logs.get("learning_rate")})

    def on_step_end(self, args, state, control, **kwargs):
        if self.hooks is not None and self.hooks.should_stop():
            self.stopped = control.should_training_stop = True


def fine_tune(model: Any, tokenizer: Any, train: list[Tokenized], recovery: Recovery, *, learning_rate: float,
              seed: int, work_dir: str, hooks: Hooks | None = None, max_batch_size: int = 8) -> bool:
    """Trains `model` in place on `train`. False: stopped by hooks.should_stop() before the end."""
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    set_seed(seed)
    batch = recovery.batch_size if recovery.batch_size != "auto" else max(1, min(max_batch_size, len(train) // 32))
    device = next(model.parameters()).device
    args = TrainingArguments(
        output_dir=work_dir, seed=seed, report_to="none", disable_tqdm=True, save_strategy="no",
        num_train_epochs=recovery.n_epochs, per_device_train_batch_size=batch,
        learning_rate=learning_rate * recovery.learning_rate_multiplier, use_cpu=device.type == "cpu",
        bf16=device.type == "cuda", logging_steps=5, logging_first_step=True, dataloader_num_workers=0)
    report = _Report(hooks)
    trainer = Trainer(model=model, args=args, processing_class=tokenizer, callbacks=[report],
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                      train_dataset=[x.features() for x in train])
    trainer.remove_callback(PrinterCallback)  # the Trainer prints each log dict when its progress bar is off
    trainer.train()
    model.eval()
    return not report.stopped
