"""Fine-tuning benchmark: the shipped financial-sentiment task (workers/training/finsent.py)
on the tiny local model, per method (lora, adapter = (IA)^3, full) at the trainer's
default settings but --epochs passes (0: its "auto") and --gate, all measured in one run:

  training    each method through the trainer's own `run_job`, in a spawned child process
              (its ru_maxrss is the peak memory): wall time to the published result (the
              gate passed), training tokens/s (trained tokens / time from "Training started"
              to the start of the after-training evaluation; the Trainer's periodic
              evaluations are inside it), held-out eval loss and accuracy before -> after,
              bytes of the published registry folder
  serving     the torch engine (as a worker loads it) at --concurrency concurrent greedy
              requests (--requests of --max-tokens each, EOS masked so every line generates
              the same tokens): the base model alone, the base serving the LoRA and the
              (IA)^3 outputs by `adapter=`, and an engine started on the full fine-tune by
              its served name; tokens/s and the ratio to the base
  end to end  broker + Redis + gateway + one torch worker (adapters_dir = registry/adapters)
              + one trainer, each its own process: `fine_tuning.jobs.create` (LoRA, the
              official `openai` client) -> first successful chat completion on the new model

    python -m bench.finetune [--methods lora,adapter,full] [--train 300] [--heldout 90] [--epochs 6]
                             [--gate eval_loss|accuracy]
                             [--requests 256] [--concurrency 32] [--max-tokens 32]
                             [--e2e-train 240] [--e2e-epochs 2] [--no-e2e] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import multiprocessing
import resource
import shutil
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import openai

from bench.engine import never_eos
from bench.openai import served_models
from bench.pipeline import Children, console_script, llmq_env, machine
from deploy.devstack import ServiceError, free_port, start_broker, start_redis, wait_for_port
from shared.schema import ChatMessage, Params
from shared.training import Method, TrainingMessage, fine_tuned_name, split_fine_tuned
from workers.folders import folder_bytes
from workers.tinymodel import DEFAULT_PATH, build_tiny_model
from workers.training import finsent

# ---- training, one method per child process --------------------------------------


def train_child(method: str, root: str, model: str, epochs: int | None, gate: str) -> dict:
    """Runs in a fresh spawned process, so that its ru_maxrss is this method's alone."""
    from workers.training import evaluate
    from workers.training.checkpoints import Hooks
    from workers.training.run import run_job
    from workers.training.settings import TrainerSettings

    root_path = Path(root)
    settings = TrainerSettings(model=model, files_dir=root_path / "files", registry_dir=root_path / "registry",
                               training_dir=root_path / "training", gate=gate, metrics_port=0)
    job_id = f"ftjob-{method.encode().hex():0>24}"[:30]
    hp = {"n_epochs": epochs} if epochs else {}  # unset: the trainer's "auto" (about 5400 examples seen)
    message = TrainingMessage(id=job_id, model=settings.base_model_name, training_file="file-train",
                              validation_file="file-heldout", seed=0,
                              method=Method.model_validate({"type": method, method: {"hyperparameters": hp}}),
                              fine_tuned_model=fine_tuned_name(settings.base_model_name, "finsent", job_id))
    marks: dict[str, float] = {}
    figures_calls: list[float] = []
    measured = evaluate.figures

    def timed_figures(*args, **kwargs):
        figures_calls.append(time.perf_counter())  # the 2nd call is the evaluation after training
        return measured(*args, **kwargs)

    def event(text: str, *_):
        if text.startswith("Training started"):
            marks["train_start"] = time.perf_counter()

    evaluate.figures = timed_figures
    last: dict = {}
    hooks = Hooks(progress=last.update, event=event, checkpoint=lambda _: None, should_stop=lambda: False)
    started = time.perf_counter()
    result = run_job(message, settings, hooks)
    wall = time.perf_counter() - started
    train_seconds = (figures_calls[1] - marks["train_start"]) if len(figures_calls) > 1 and marks else None
    size = folder_bytes(result.output_path) if result.output_path else None
    return {"method": method, "status": result.status, "error": result.error_message,
            "model": message.fine_tuned_model, "seconds": round(wall, 1), "steps": last.get("total_steps"),
            "train_seconds": round(train_seconds, 1) if train_seconds else None,
            "trained_tokens": result.trained_tokens,
            "train_tokens_per_s": round(result.trained_tokens / train_seconds, 1) if train_seconds else None,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "artifact_bytes": size, **result.eval}


def write_task_files(root: Path, n_train: int, n_heldout: int) -> tuple[list[dict], list[dict]]:
    """The shipped task's training and held-out files, as the trainer reads them from
    `{root}/files` (file-train, file-heldout); returns their examples."""
    (root / "files").mkdir()
    train_lines, heldout = finsent.generate(n_train, n_heldout)
    finsent.write_jsonl(root / "files" / "file-train.jsonl", train_lines)
    finsent.write_jsonl(root / "files" / "file-heldout.jsonl", heldout)
    return train_lines, heldout


def train(method: str, root: Path, model: Path, args) -> dict:
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(train_child, method, str(root), str(model), args.epochs, args.gate).result()


# ---- serving cost of each output ---------------------------------------------------


async def _throughput(engine, prompts: list[list[dict]], args, adapter: str | None) -> dict:
    from workers.engines.base import GenerationRequest

    slots = asyncio.Semaphore(args.concurrency)
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        messages = [ChatMessage(**m) for m in prompts[i % len(prompts)]]
        request = GenerationRequest(f"r{i}", Params(max_tokens=args.max_tokens, temperature=0),
                                    messages=messages, adapter=adapter)
        async with slots:
            async for output in engine.generate(request):
                if output.result is not None:
                    if output.result.error:
                        raise RuntimeError(output.result.error)
                    tokens += output.result.completion_tokens

    await one(0)  # warm: the first request loads the adapter, outside the timed part
    tokens = 0
    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.requests)))
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


async def _engine(**settings):
    from workers.engines import load_engine
    from workers.settings import WorkerSettings

    engine = load_engine(WorkerSettings(engine="torch", **settings))
    await engine.start()
    # With adapters_dir set, engine.model holds the base; LoRA layers never replace its lm_head.
    never_eos(getattr(engine.model, "base", engine.model), engine.tokenizer.eos_token_id)
    return engine


async def serving(rows: list[dict], root: Path, model: Path, prompts: list, args) -> list[dict]:
    registry = root / "registry"
    names = {r["method"]: r["model"] for r in rows if r["status"] == "succeeded"}
    common = {"batch_max_size": args.concurrency, "registry_dir": registry}
    lines = []
    (registry / "adapters").mkdir(parents=True, exist_ok=True)  # no adapter trained: none served
    engine = await _engine(model=str(model), adapters_dir=str(registry / "adapters"), **common)
    try:
        lines.append({"serving": "base", **await _throughput(engine, prompts, args, None)})
        for method in ("lora", "adapter"):
            if method in names:
                output = split_fine_tuned(names[method])[1]
                lines.append({"serving": method, **await _throughput(engine, prompts, args, output)})
    finally:
        await engine.close()
    if "full" in names:
        engine = await _engine(model=names["full"], **common)
        try:
            lines.append({"serving": "full", **await _throughput(engine, prompts, args, None)})
        finally:
            await engine.close()
    for line in lines:
        line["vs_base"] = round(line["tokens_per_s"] / lines[0]["tokens_per_s"], 2)
    return lines


# ---- end to end: jobs.create -> first chat on the new model ------------------------


def start_stack(children: Children, tmp: Path, model: Path) -> str:
    children.services.append(broker := start_broker(free_port(), tmp / "broker.log"))
    children.services.append(redis_service := start_redis(free_port(), tmp / "redis"))
    stack = {"run": uuid.uuid4().hex[:8], "bootstrap": broker.url, "redis_url": redis_service.url}
    port = free_port()
    registry = tmp / "e2e-registry"
    (registry / "adapters").mkdir(parents=True)
    env = {**llmq_env(stack, "finetune", port), "LLMQ_ENGINE": "torch", "LLMQ_MODEL": str(model),
           "LLMQ_FILES_DIR": str(tmp / "e2e-files"), "LLMQ_REGISTRY_DIR": str(registry),
           "LLMQ_ADAPTERS_DIR": str(registry / "adapters"), "LLMQ_TRAINING_DIR": str(tmp / "e2e-training"),
           "LLMQ_METRICS_PORT": "0"}
    gateway = children.spawn("gateway", console_script("gateway", "gateway.main"), env)
    children.spawn("worker", console_script("worker", "workers.main"), env)
    children.spawn("trainer", console_script("trainer", "workers.training.main"), env)
    base = f"http://127.0.0.1:{port}"
    wait_for_port(port, 60, gateway, "gateway")
    deadline = time.monotonic() + 120
    while not served_models(base):
        if time.monotonic() > deadline:
            raise ServiceError("no torch worker registered within 120 s")
        time.sleep(0.2)
    return base


def _jsonl(lines: list[dict]) -> io.BytesIO:
    return io.BytesIO(b"".join(json.dumps(line).encode() + b"\n" for line in lines))


async def create_to_first_chat(base: str, args) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    train_lines, heldout = finsent.generate(args.e2e_train, 45, seed=1)
    files = [await client.files.create(file=(name, _jsonl(lines)), purpose="fine-tune")
             for name, lines in (("train.jsonl", train_lines), ("heldout.jsonl", heldout))]
    from workers.training.settings import TrainerSettings

    # The name the trainer trains (the gateway also lists the worker's model path).
    model = TrainerSettings(model=args.model_path).base_model_name
    question = heldout[0]["messages"][:-1]
    started = time.perf_counter()
    job = await client.fine_tuning.jobs.create(
        model=model, training_file=files[0].id, validation_file=files[1].id, suffix="finsent", seed=7,
        method={"type": "lora", "lora": {"hyperparameters": {"n_epochs": args.e2e_epochs}}})
    succeeded_at, tries = None, 0
    while time.perf_counter() - started < args.e2e_timeout:
        if succeeded_at is None:
            job = await client.fine_tuning.jobs.retrieve(job.id)
            if job.status in ("failed", "cancelled"):
                raise RuntimeError(f"the e2e job {job.status}: {job.error}")
            if job.status != "succeeded":
                await asyncio.sleep(0.2)
                continue
            succeeded_at = time.perf_counter() - started
        tries += 1
        try:
            answer = await client.chat.completions.create(model=job.fine_tuned_model, messages=question,
                                                          max_tokens=8, temperature=0)
        except openai.APIStatusError:
            await asyncio.sleep(0.1)
            continue
        return {"seconds_to_first_chat": round(time.perf_counter() - started, 1),
                "seconds_to_succeeded": round(succeeded_at, 1), "chat_tries": tries,
                "trained_tokens": job.trained_tokens, "answer": answer.choices[0].message.content,
                "train": args.e2e_train, "epochs": args.e2e_epochs}
    raise RuntimeError(f"no chat answer from the new model within {args.e2e_timeout} s")


def end_to_end(tmp: Path, model: Path, args) -> dict:
    children = Children(tmp)
    try:
        base = start_stack(children, tmp, model)
        return asyncio.run(create_to_first_chat(base, args))
    except Exception:
        for name in ("gateway", "worker", "trainer"):
            print(f"--- {name} log ---\n{children.log_tail(name)}", flush=True)
        raise
    finally:
        children.stop_all()


# ---- the report --------------------------------------------------------------------


def _cell(value, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def report(result: dict) -> str:
    rows, serve = result["training"], {s["serving"]: s for s in result.get("serving", [])}
    out = ["| method | status | time to gate | train tok/s | peak RSS | eval loss | accuracy | artifact "
           "| serving tok/s | vs base |", "|---|---|---:|---:|---:|---|---|---:|---:|---:|"]
    base = serve.get("base")
    if base:
        out.append(f"| base | - | - | - | - | - | - | - | {base['tokens_per_s']} | 1.00 |")
    for r in rows:
        b, a, s = r.get("before", {}), r.get("after", {}), serve.get(r["method"], {})
        out.append(
            f"| {r['method']} | {r['status']} | {r['seconds']} s | {_cell(r.get('train_tokens_per_s'))} "
            f"| {_cell(r.get('peak_rss_mib'), '{:,.0f} MiB')} "
            f"| {_cell(b.get('eval_loss'))} → {_cell(a.get('eval_loss'))} "
            f"| {_cell(b.get('accuracy'))} → {_cell(a.get('accuracy'))} "
            f"| {_cell(r.get('artifact_bytes'), '{:,} B')} | {_cell(s.get('tokens_per_s'))} "
            f"| {_cell(s.get('vs_base'), '{:.2f}')} |")
    if e2e := result.get("end_to_end"):
        out.append(f"\nLoRA job through the stack ({e2e['train']} examples, {e2e['epochs']} epochs): "
                   f"jobs.create → succeeded {e2e['seconds_to_succeeded']} s, → first chat on the new model "
                   f"{e2e['seconds_to_first_chat']} s ({e2e['chat_tries']} chat tries)")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="lora,adapter,full")
    parser.add_argument("--train", type=int, default=300, help="training examples per method")
    parser.add_argument("--heldout", type=int, default=90)
    parser.add_argument("--epochs", type=int, default=6, help="0: the trainer's auto (about 5400 examples seen)")
    parser.add_argument("--gate", default="eval_loss", choices=["eval_loss", "accuracy"])
    parser.add_argument("--requests", type=int, default=256, help="serving: requests per line")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--e2e-train", type=int, default=240, help="examples of the end-to-end LoRA job")
    parser.add_argument("--e2e-epochs", type=int, default=2)
    parser.add_argument("--e2e-timeout", type=float, default=300)
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end stack")
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    model = build_tiny_model(DEFAULT_PATH)
    result: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, "training": []}
    with tempfile.TemporaryDirectory(prefix="llmq-bench-finetune-") as tmp:
        root = Path(tmp)
        _, heldout = write_task_files(root, args.train, args.heldout)
        for method in args.methods.split(","):
            result["training"].append(row := train(method, root, model, args))
            print(json.dumps(row), flush=True)
            shutil.rmtree(root / "training", ignore_errors=True)
        prompts = [line["messages"][:-1] for line in heldout]
        result["serving"] = asyncio.run(serving(result["training"], root, model, prompts, args))
        print(json.dumps(result["serving"]), flush=True)
        if not args.no_e2e:
            args.model_path = str(model)
            result["end_to_end"] = end_to_end(root, model, args)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
