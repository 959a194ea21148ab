"""Fine-tuning benchmark: the shipped financial-sentiment task (workers/training/finsent.py)
trained on the tiny local model with each method at the trainer's default settings,
through the trainer's own `run_job`; prints the wall time and the held-out figures
(eval loss, exact-match accuracy) before and after, per method.

    python -m bench.finetune [--methods lora,adapter,full] [--train 900] [--heldout 90] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from shared.training import Method, TrainingMessage, fine_tuned_name
from workers.tinymodel import DEFAULT_PATH, build_tiny_model
from workers.training import finsent
from workers.training.checkpoints import Hooks
from workers.training.run import run_job
from workers.training.settings import TrainerSettings


def run_method(method: str, root: Path, model: Path) -> dict:
    settings = TrainerSettings(model=str(model), files_dir=root / "files", registry_dir=root / "registry",
                               training_dir=root / "training", gate="accuracy")
    job_id = f"ftjob-{method.encode().hex():0>24}"[:30]
    message = TrainingMessage(id=job_id, model=settings.base_model_name, training_file="file-train",
                              validation_file="file-heldout", method=Method(type=method), seed=0,
                              fine_tuned_model=fine_tuned_name(settings.base_model_name, "finsent", job_id))
    last: dict = {}
    hooks = Hooks(progress=last.update, event=lambda *_: None, checkpoint=lambda _: None, should_stop=lambda: False)
    started = time.perf_counter()
    result = run_job(message, settings, hooks)
    return {"method": method, "status": result.status, "error": result.error_message,
            "seconds": round(time.perf_counter() - started, 1), "steps": last.get("total_steps"),
            "trained_tokens": result.trained_tokens, **result.eval}


def report(rows: list[dict]) -> str:
    lines = [f"{'method':8} {'status':10} {'time':>7} {'steps':>6} {'loss before':>12} {'after':>7} "
             f"{'accuracy before':>16} {'after':>6}"]
    for r in rows:
        b, a = r.get("before", {}), r.get("after", {})
        lines.append(f"{r['method']:8} {r['status']:10} {r['seconds']:>6}s {r['steps'] or '-':>6} "
                     f"{b.get('eval_loss', '-'):>12} {a.get('eval_loss', '-'):>7} "
                     f"{b.get('accuracy', '-'):>16} {a.get('accuracy', '-'):>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="lora,adapter,full")
    parser.add_argument("--train", type=int, default=900)
    parser.add_argument("--heldout", type=int, default=90)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    model = build_tiny_model(DEFAULT_PATH)
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmq-bench-finetune-") as tmp:
        files = Path(tmp) / "files"
        files.mkdir()
        train, heldout = finsent.generate(args.train, args.heldout)
        finsent.write_jsonl(files / "file-train.jsonl", train)
        finsent.write_jsonl(files / "file-heldout.jsonl", heldout)
        for method in args.methods.split(","):
            rows.append(run_method(method, Path(tmp), model))
            print(report(rows[-1:]).splitlines()[-1], flush=True)
            shutil.rmtree(Path(tmp) / "training", ignore_errors=True)
    print(report(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
