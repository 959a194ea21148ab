"""What a trainer counts: Prometheus gauges of the job in hand (step, losses,
learning rate, speed, time left) and counters of jobs by how they ended, in a
registry of its own served on LLMQ_METRICS_PORT."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from shared.metrics import ServedMetrics

# Progress values (workers/training/run.py reports them) and the gauge each sets.
GAUGES = {
    "step": "Optimizer steps done in the job in hand.",
    "total_steps": "Optimizer steps the job in hand will take.",
    "epoch": "Epochs done (fractional) in the job in hand.",
    "train_loss": "Latest training loss of the job in hand.",
    "eval_loss": "Latest evaluation loss of the job in hand.",
    "learning_rate": "Current learning rate of the job in hand.",
    "tokens_per_second": "Training tokens per second of the job in hand.",
    "eta_seconds": "Estimated seconds until the job in hand finishes training.",
}


class TrainerMetrics(ServedMetrics):
    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.jobs = Counter("llmq_trainer_jobs_total", "Fine-tuning jobs ended here, by status.", ["status"],
                            registry=r)
        self.started_jobs = Counter("llmq_trainer_jobs_started_total", "Training runs started (resumes included).",
                                    registry=r)
        self.gauges = {name: Gauge(f"llmq_trainer_{name}", doc, registry=r) for name, doc in GAUGES.items()}
        self._ended: dict[str, int] = {}

    def started(self) -> None:
        self.started_jobs.inc()
        for gauge in self.gauges.values():
            gauge.set(0)

    def progress(self, values: dict) -> None:
        """Called from the training thread (prometheus_client's metrics are thread-safe)."""
        for name, gauge in self.gauges.items():
            if isinstance(values.get(name), int | float):
                gauge.set(values[name])

    def ended(self, status: str) -> None:
        self.jobs.labels(status).inc()
        self._ended[status] = self._ended.get(status, 0) + 1

    def counts(self) -> dict[str, int]:
        """Jobs ended here by status, for the trainer's stop line."""
        return {f"jobs_{status}": n for status, n in self._ended.items()}
