"""`llmq recommend`: settings computed from measurements on this machine and from the
model's own config, never from a table: the batch limit (LLMQ_BATCH_MAX_SIZE) from a
sweep of llmq's torch engine, the memory a model and its registry variants need, and a
fine-tuning job's hyperparameters as the trainer's own "auto" rules resolve them, with
its training time from a few real optimizer steps."""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.optimization import root_model
from shared.training import REGISTRY_METADATA, Method
from workers.settings import WorkerSettings

# Bytes per element of each float dtype a variant may run in.
FLOAT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
INT4_GROUP = 32  # weights per int4 scale: torchao's IntxWeightOnlyConfig(PerGroup(32)), as the int4 strategy uses
SCALE_BYTES = 4  # a quantized weight's scale: float32
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")  # what counts as a registry folder's weights on disk


class RecommendError(Exception):
    """A recommendation that cannot be made (no such model or file, bad arguments): one line for the user."""


# ---- the model ---------------------------------------------------------------------


def resolve_model(model: str | None) -> tuple[Path, str]:
    """(folder, served name) of `model`: a local folder, the served name of a registry model
    ("tiny-llama:opt-int8-0a1b2c3d"), or the workers' own model's served name; None: the
    workers' own (LLMQ_MODEL)."""
    default = WorkerSettings(engine="torch")
    if model is None or model == default.served_model_name:
        settings = default
    else:
        settings = WorkerSettings(engine="torch", model=model)
    path = Path(settings.model_path)
    if not path.is_dir():
        if settings.fine_tuned_output:
            raise RecommendError(f"unknown model {settings.model!r}: no folder {str(path)!r} in the registry "
                                 f"(LLMQ_REGISTRY_DIR={str(settings.registry_dir)!r})")
        hint = f" (to build the tiny local model there: `llmq build-model {settings.model}`)" \
            if settings.model.startswith((".", "/")) else ""
        raise RecommendError(f"unknown model {settings.model!r}: not a local model folder nor a registry model's "
                             f"name{hint}")
    if not (path / "config.json").is_file():
        raise RecommendError(f"model folder {str(path)!r} has no config.json")
    return path, settings.served_model_name


# ---- (b) memory ----------------------------------------------------------------------


@dataclass
class Shape:
    """What memory depends on, counted from a model's config (built on the meta device: no weights read)."""

    parameters: int  # every parameter, tied ones once (= sum(p.numel()) of the loaded model)
    linear_weights: int  # elements of the linear layers' weights (what int8 / int4 quantization stores)
    linear_rows: int  # their output channels (one int8 scale each)
    layers: int
    kv_heads: int
    head_dim: int
    context: int

    def kv_bytes_per_token(self, dtype: str) -> int:
        """Keys and values of one token in every layer: 2 x layers x kv_heads x head_dim x bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * FLOAT_BYTES[dtype]


def model_shape(folder: Path) -> Shape:
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        raise RecommendError(f"cannot build the model of {str(folder)!r} from its config: "
                             f"{str(exc).splitlines()[0] if str(exc) else exc!r}") from exc
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # A head tied to the embedding is the embedding's table: quantization leaves it as it is.
    linears = {id(m.weight): m.weight for m in model.modules()
               if isinstance(m, nn.Linear) and id(m.weight) not in embeddings}
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    context = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None) or 0
    return Shape(parameters=sum(p.numel() for p in model.parameters()),
                 linear_weights=sum(w.numel() for w in linears.values()),
                 linear_rows=sum(w.shape[0] for w in linears.values()),
                 layers=text.num_hidden_layers, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                 head_dim=head_dim, context=int(context))


@dataclass
class Variant:
    name: str
    weights_bytes: int
    kv_dtype: str  # the dtype the KV cache is kept in (the variant's compute dtype)
    kv_bytes_per_token: int
    source: str  # "computed: ..." or "measured: ..." (how weights_bytes was found)
    parameters: int
    need_bytes: int = 0  # weights + KV for the context x concurrency asked about
    fits: bool = False
    max_concurrency: int = 0  # most requests of the context asked about whose KV fits beside the weights


def dtype_variants(shape: Shape) -> list[Variant]:
    """The model in each dtype, its weights' bytes computed from the parameter count. int8 and
    int4 quantize the linear layers' weights (with their scales) and keep the rest, and the KV
    cache, in float32 (the CPU's compute dtype: LLMQ_QUANTIZE=int8 runs float32 models)."""
    rest = shape.parameters - shape.linear_weights
    variants = [Variant(dtype, shape.parameters * size, dtype, shape.kv_bytes_per_token(dtype),
                        f"computed: {shape.parameters:,} parameters x {size} bytes", shape.parameters)
                for dtype, size in FLOAT_BYTES.items()]
    int8 = shape.linear_weights + shape.linear_rows * SCALE_BYTES + rest * 4
    variants.append(Variant("int8", int8, "float32", shape.kv_bytes_per_token("float32"),
                            f"computed: {shape.linear_weights:,} linear weights x 1 byte + a float32 scale per "
                            f"output channel ({shape.linear_rows:,}); {rest:,} others x 4 bytes", shape.parameters))
    groups = math.ceil(shape.linear_weights / INT4_GROUP)
    int4 = math.ceil(shape.linear_weights / 2) + groups * SCALE_BYTES + rest * 4
    variants.append(Variant("int4", int4, "float32", shape.kv_bytes_per_token("float32"),
                            f"computed: {shape.linear_weights:,} linear weights x 0.5 byte + a float32 scale per "
                            f"group of {INT4_GROUP}; {rest:,} others x 4 bytes", shape.parameters))
    return variants


def registry_variants(registry: Path, base: str) -> list[Variant]:
    """The registry's whole models derived from `base` (optimized ones, full fine-tunes): their
    weights as stored on disk, their KV cache from their own config (structured pruning changes it)."""
    variants = []
    for meta_path in sorted((Path(registry) / "models").glob(f"*/{REGISTRY_METADATA}")):
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue  # a folder being written, or not llmq's: nothing to measure
        name = meta.get("model") or meta_path.parent.name
        if root_model(str(meta.get("base_model") or name)) != base and root_model(name) != base:
            continue
        folder = meta_path.parent
        try:
            shape = model_shape(folder)
        except RecommendError:
            continue  # a folder whose config transformers can't build: no figures to give for it
        dtype = (meta.get("serving") or {}).get("dtype", "float32")
        dtype = dtype if dtype in FLOAT_BYTES else "float32"
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.suffix in WEIGHT_FILES)
        variants.append(Variant(name, size, dtype, shape.kv_bytes_per_token(dtype),
                                f"measured: weights on disk in {folder}", shape.parameters))
    return variants


def recommend_memory(model: str | None, memory_gib: float, *, context: int | None = None,
                     concurrency: int | None = None, headroom: float = 0.1) -> dict:
    """Which variants of the model fit in `memory_gib` GiB with `concurrency` requests of
    `context` tokens each, keeping a `headroom` share free for activations and the runtime."""
    if memory_gib <= 0:
        raise RecommendError("--memory-gib must be more than 0")
    if not 0 <= headroom < 1:
        raise RecommendError("--headroom is a share of the memory: from 0 to below 1")
    folder, name = resolve_model(model)
    shape = model_shape(folder)
    context = shape.context if context is None else context
    concurrency = WorkerSettings(engine="torch").batch_max_size if concurrency is None else concurrency
    if context < 1 or concurrency < 1:
        raise RecommendError("--context and --concurrency must be at least 1")
    usable = memory_gib * 2**30 * (1 - headroom)
    variants = dtype_variants(shape) + registry_variants(WorkerSettings(engine="torch").registry_dir, root_model(name))
    for v in variants:
        per_request = v.kv_bytes_per_token * context
        v.need_bytes = v.weights_bytes + per_request * concurrency
        v.fits = v.need_bytes <= usable
        v.max_concurrency = max(0, int((usable - v.weights_bytes) // per_request))
    return {"model": name, "path": str(folder), "memory_gib": memory_gib, "headroom": headroom,
            "usable_bytes": int(usable), "context": context, "concurrency": concurrency, "shape": asdict(shape),
            "variants": [asdict(v) for v in variants]}


def memory_text(report: dict) -> str:
    s = report["shape"]
    mib = lambda b: f"{b / 2**20:,.1f}"
    lines = [f"model {report['model']} ({report['path']}): {s['parameters']:,} parameters, {s['layers']} layers, "
             f"{s['kv_heads']} KV heads x {s['head_dim']} head dim, context {s['context']}",
             f"memory {report['memory_gib']:g} GiB, {report['headroom']:.0%} kept free for activations and the "
             f"runtime: {mib(report['usable_bytes'])} MiB for weights and KV cache",
             f"KV cache: 2 x {s['layers']} layers x {s['kv_heads']} KV heads x {s['head_dim']} x bytes per token, "
             f"x {report['context']} tokens x {report['concurrency']} concurrent requests", "",
             "| variant | weights MiB | KV per token | need MiB | fits | most concurrent at this context | weights |",
             "|---|---|---|---|---|---|---|"]
    for v in report["variants"]:
        lines.append(f"| {v['name']} | {mib(v['weights_bytes'])} | {v['kv_bytes_per_token']:,} B ({v['kv_dtype']}) | "
                     f"{mib(v['need_bytes'])} | {'yes' if v['fits'] else 'no'} | {v['max_concurrency']:,} | "
                     f"{v['source']} |")
    return "\n".join(lines)


# ---- (a) the batch limit ---------------------------------------------------------------


@dataclass
class BatchRow:
    limit: int
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    tpot_p99_ms: float | None


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile (the same rule as the engine benchmark's)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def workload_prompts(tokenizer, n: int, prompt_tokens: int, seed: int = 0) -> list[str]:
    """`n` prompts of `prompt_tokens` tokens cut from the shipped corpus (fixed seed): text any
    tokenizer reads, the same on every run."""
    from workers import tinymodel

    rng = random.Random(seed)
    words = tinymodel.CORPUS.read_text().split()
    prompts = []
    for _ in range(n):
        start = rng.randrange(len(words) - 4 * prompt_tokens)
        ids = tokenizer(" ".join(words[start:start + 4 * prompt_tokens])).input_ids[:prompt_tokens]
        prompts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return prompts


def never_eos(model, eos: int | None):
    """Masks EOS in the head's output, so every request generates exactly max_tokens and each
    line measures the same work (here, and in the benchmarks)."""
    def hook(_module, _inputs, output):
        if eos is not None:
            output[..., eos] = float("-inf")
        return output
    return model.get_output_embeddings().register_forward_hook(hook)


async def _measure(engine, limit: int, prompts: list[str], total: int, max_tokens: int) -> BatchRow:
    """`total` requests, at most `limit` at once: a finished request's slot goes to the next."""
    from shared.schema import Params
    from workers.engines.base import GenerationRequest

    ttfts, tpots, tokens = [], [], 0
    slots = asyncio.Semaphore(limit)

    async def one(i: int) -> None:
        nonlocal tokens
        request = GenerationRequest(f"recommend-{limit}-{i}", Params(max_tokens=max_tokens, temperature=0),
                                    prompt=prompts[i % len(prompts)])
        async with slots:
            submitted, first = time.perf_counter(), None
            async for output in engine.generate(request):
                if first is None and output.completion_tokens:
                    first = time.perf_counter()
                if output.result is not None:
                    n = output.result.completion_tokens
                    tokens += n
                    ttfts.append(first - submitted)
                    if n > 1:
                        tpots.append((time.perf_counter() - first) / (n - 1))

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    seconds = time.perf_counter() - started
    ms = lambda v: None if v is None else v * 1000
    return BatchRow(limit, total, tokens, seconds, tokens / seconds, ms(percentile(ttfts, 0.5)),
                    ms(percentile(ttfts, 0.99)), ms(percentile(tpots, 0.5)), ms(percentile(tpots, 0.99)))


async def sweep_batch(folder: Path, limits: list[int], requests_per_limit: int, max_tokens: int,
                      prompt_tokens: int) -> tuple[list[BatchRow], str]:
    """(a row per limit, the device in words): each batch limit on llmq's torch engine, started as a worker starts it (LLMQ_* settings
    from the environment, LLMQ_BATCH_MAX_SIZE the limit), with `limit x requests_per_limit`
    requests of `max_tokens` tokens each, at most `limit` at once."""
    from transformers.utils.logging import disable_progress_bar

    from workers.engines.torch.engine import TorchEngine

    disable_progress_bar()  # a bar per limit's model load would bury the table
    rows, prompts, device = [], None, ""
    for limit in limits:
        engine = TorchEngine(WorkerSettings(engine="torch", model=str(folder), batch_max_size=limit))
        await engine.start()
        try:
            never_eos(engine.model, engine.tokenizer.eos_token_id)
            if prompts is None:
                prompts = workload_prompts(engine.tokenizer, max(limits) * requests_per_limit, prompt_tokens)
            await _measure(engine, min(limit, 2), prompts, min(limit, 2), max_tokens)  # warm-up
            rows.append(await _measure(engine, limit, prompts, limit * requests_per_limit, max_tokens))
            device = _device_name(str(engine.runner.device), engine.threads)
        finally:
            await engine.close()
    return rows, device


def choose_limit(rows: list[BatchRow], tpot_p99_ms: float) -> tuple[BatchRow | None, str]:
    """The row of highest throughput whose p99 TPOT is within the bound, and why."""
    within = [r for r in rows if r.tpot_p99_ms is not None and r.tpot_p99_ms <= tpot_p99_ms]
    if within:
        best = max(within, key=lambda r: r.tokens_per_s)
        return best, (f"the highest throughput ({best.tokens_per_s:,.0f} tok/s) among the limits whose p99 TPOT "
                      f"stays within {tpot_p99_ms:g} ms ({best.tpot_p99_ms:.2f} ms at {best.limit})")
    smallest = min(rows, key=lambda r: r.limit)
    p99 = "unmeasured" if smallest.tpot_p99_ms is None else f"{smallest.tpot_p99_ms:.2f} ms"
    return None, (f"none: no limit keeps p99 TPOT within {tpot_p99_ms:g} ms; the smallest, {smallest.limit}, "
                  f"has a p99 TPOT of {p99}")


def recommend_batch(model: str | None, tpot_p99_ms: float, *, limits: list[int], requests_per_limit: int = 4,
                    max_tokens: int = 32, prompt_tokens: int = 32) -> dict:
    if tpot_p99_ms <= 0:
        raise RecommendError("--tpot-p99-ms must be more than 0")
    if not limits or min(limits) < 1 or requests_per_limit < 1 or max_tokens < 2 or prompt_tokens < 1:
        raise RecommendError("limits and --requests-per-limit must be at least 1, --max-tokens at least 2 "
                             "(TPOT is the time per token after the first)")
    from workers.engines.base import EngineError

    folder, name = resolve_model(model)
    try:
        rows, device = asyncio.run(sweep_batch(folder, sorted(set(limits)), requests_per_limit, max_tokens, prompt_tokens))
    except EngineError as exc:
        raise RecommendError(str(exc).splitlines()[0]) from exc
    best, why = choose_limit(rows, tpot_p99_ms)
    return {"model": name, "path": str(folder), "device": device,
            "tpot_p99_ms_bound": tpot_p99_ms, "requests_per_limit": requests_per_limit, "max_tokens": max_tokens,
            "prompt_tokens": prompt_tokens, "rows": [asdict(r) for r in rows],
            "choice": best.limit if best else None, "reason": why,
            "setting": f"LLMQ_BATCH_MAX_SIZE={best.limit}" if best else None}


def _device_name(device: str, threads: int | None = None) -> str:
    """The device in words: the GPU's name, or the CPU with the threads the model ran on."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    threads = threads or torch.get_num_threads()
    return f"cpu ({threads} thread{'s' if threads > 1 else ''})"


def batch_text(report: dict) -> str:
    f = lambda v: "" if v is None else f"{v:.2f}"
    lines = [f"model {report['model']} on {report['device']}, llmq's torch engine; per limit: limit x "
             f"{report['requests_per_limit']} requests, at most limit at once, prompts of {report['prompt_tokens']} "
             f"tokens, {report['max_tokens']} output tokens each", "",
             "| LLMQ_BATCH_MAX_SIZE | requests | tokens | tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['limit']} | {r['requests']} | {r['tokens']:,} | {r['tokens_per_s']:,.0f} | "
                     f"{f(r['ttft_p50_ms'])} / {f(r['ttft_p99_ms'])} | {f(r['tpot_p50_ms'])} / {f(r['tpot_p99_ms'])} |")
    lines += ["", f"choice: {report['reason']}"]
    lines.append(f"use: {report['setting']}" if report["setting"] else "use: no setting meets the bound on this "
                 "hardware; relax the bound, or use a faster variant or device")
    return "\n".join(lines)


# ---- (c) fine-tuning --------------------------------------------------------------------


def _step_clock():
    """A TrainerCallback noting when training begins and when each optimizer step ends."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.begin, self.ends = 0.0, []

        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    return StepClock()


def recommend_training(training_file: Path, method: str = "lora", *, model: str | None = None,
                       validation_file: Path | None = None, measure_steps: int = 10) -> dict:
    """The hyperparameters the trainer would use for this file (its "auto" rules, with why),
    the optimizer steps and tokens they make, and the time they take at a step time measured
    on this machine (the median of `measure_steps` real steps after as many warm-up ones)."""
    if measure_steps < 1:
        raise RecommendError("--measure-steps must be at least 1")
    for kind, path in (("training", training_file), ("validation", validation_file)):
        if path is not None and not Path(path).is_file():
            raise RecommendError(f"{kind} file {str(path)!r} not found")
        if path is not None and Path(path).suffix != ".jsonl":
            raise RecommendError(f"{kind} file {str(path)!r}: fine-tuning files are JSONL, named *.jsonl")
    folder, name = resolve_model(model)
    # Checked before these imports: the Trainer's take seconds, and a typo should not wait on them.
    from workers.training.data import TrainingFileError, load_file, split_heldout
    from workers.training.model import load_base, resolve_device, trainable
    from workers.training.run import explain_hyperparameters
    from workers.training.settings import TrainerSettings

    settings = TrainerSettings(model=str(folder))
    device = resolve_device(settings.device)
    base, tokenizer = load_base(str(folder), device)
    max_tokens = settings.max_sequence_tokens or base.config.max_position_embeddings
    try:
        items = load_file(training_file.parent, training_file.stem, tokenizer, max_tokens, "invalid_training_file")
        if validation_file is None:
            train, heldout = split_heldout(items, settings.heldout_fraction, seed=0)
        else:
            train = items
            heldout = load_file(validation_file.parent, validation_file.stem, tokenizer, max_tokens,
                                "invalid_validation_file")
    except TrainingFileError as exc:
        raise RecommendError(str(exc)) from exc
    job_method = Method.model_validate({"type": method})
    hp, why = explain_hyperparameters(job_method, settings, len(train))
    # The Trainer's own count: batches per epoch, then optimizer steps of gradient_accumulation_steps each.
    batches = math.ceil(len(train) / hp["batch_size"])
    steps = max(1, math.ceil(batches / hp["gradient_accumulation_steps"])) * hp["n_epochs"]
    tokens_per_epoch = sum(len(x.input_ids) for x in train)
    model_to_train = trainable(base, job_method)
    measured = _measure_run(model_to_train, tokenizer, train, heldout, hp, settings, device, measure_steps)
    # A run: its steps; an evaluation and a checkpoint every LLMQ_CHECKPOINT_STEPS steps; the figures
    # before and after training.
    periodic = steps // settings.checkpoint_steps
    estimate = {"warm_up": measured["warm_up_seconds"], "steps": measured["seconds_per_step"] * steps,
                "evaluations_and_checkpoints": periodic * (measured["eval_seconds"] + measured["checkpoint_seconds"]),
                "figures_before_and_after": 2 * measured["figures_seconds"]}
    lengths = sorted(len(x.input_ids) for x in train)
    return {"model": name, "path": str(folder), "device": _device_name(device), "method": method,
            "training_file": str(training_file), "lines": len(items) if validation_file is None else len(train),
            "train_examples": len(train), "heldout_examples": len(heldout),
            "heldout_from": "the training file" if validation_file is None else str(validation_file),
            "tokens_per_example": {"mean": round(tokens_per_epoch / len(train), 1), "min": lengths[0],
                                   "max": lengths[-1]},
            "hyperparameters": hp, "reasoning": why,
            "trainable_parameters": sum(p.numel() for p in model_to_train.parameters() if p.requires_grad),
            "steps": steps, "tokens": tokens_per_epoch * hp["n_epochs"],
            "checkpoint_steps": settings.checkpoint_steps, "measured": measured, "estimate_seconds": estimate,
            "estimated_seconds": sum(estimate.values())}


def _measure_run(model, tokenizer, train, heldout, hp, settings, device: str, n: int) -> dict:
    """The parts of a job's run, timed on this machine with the trainer's own code: 2n real optimizer
    steps, the first n a warm-up (their time beyond n steady ones is the run's one-off warm-up) and the
    median of the last n the steady step, with its tokens/s; the Trainer's periodic evaluation and
    checkpoint (each once); and the held-out figures taken before and after training."""
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    from workers.training import evaluate
    from workers.training.checkpoints import Hooks
    from workers.training.run import build_trainer

    clock = _step_clock()
    with tempfile.TemporaryDirectory(prefix="llmq-recommend-") as work_dir:
        # Nobody is told of this run's progress, and it is never stopped.
        hooks = Hooks(progress=lambda _data: None, event=lambda *_args: None, checkpoint=lambda _data: None,
                      should_stop=lambda: False)
        trainer, _ = build_trainer(model, tokenizer, train, heldout, hp, settings=settings, work_dir=Path(work_dir),
                                   seed=0, device=device, hooks=hooks)
        trainer.args.max_steps = 2 * n
        # Checkpoints and evaluations are timed on their own below, not inside the steps.
        trainer.args.save_strategy, trainer.args.eval_strategy = SaveStrategy.NO, IntervalStrategy.NO
        trainer.add_callback(clock)
        trainer.train()
        seen = int(trainer.state.num_input_tokens_seen)
        started = time.perf_counter()
        trainer.evaluate()
        evaluated = time.perf_counter()
        trainer._save_checkpoint(trainer.model, trial=None)  # what the Trainer runs at each save step
        saved = time.perf_counter()
        evaluate.figures(trainer.model, tokenizer, heldout)
        figured = time.perf_counter()
    # The first steps of a run are slow (seen here on CPU: five of about 3 s before 0.1 s ones, in a
    # job's own run too): they are the run's warm-up, counted once. Of the steady ones the median: on
    # a machine shared with other work one step can take many times the others.
    step = statistics.median(b - a for a, b in zip(clock.ends[n - 1:], clock.ends[n:]))
    warm_up = max(0.0, clock.ends[n - 1] - clock.begin - n * step)
    return {"steps": n, "seconds_per_step": step, "tokens_per_s": (seen / len(clock.ends)) / step,
            "warm_up_seconds": warm_up,
            "eval_seconds": evaluated - started, "checkpoint_seconds": saved - evaluated,
            "figures_seconds": figured - saved}


def training_text(report: dict) -> str:
    hp, why = report["hyperparameters"], report["reasoning"]
    t = report["tokens_per_example"]
    lines = [f"{report['training_file']}: {report['lines']} lines; the trainer trains on {report['train_examples']} "
             f"and evaluates on {report['heldout_examples']} (held out from {report['heldout_from']}); "
             f"tokens per example (model {report['model']}'s tokenizer): mean {t['mean']}, min {t['min']}, "
             f"max {t['max']}", "", f"method {report['method']}: what the trainer would use, and why"]
    for name, value in hp.items():
        reason = "the job's default (no auto rule)" if why[name] == "given" else why[name]
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        lines.append(f"  {name:<28} {shown:<10}  {reason}")
    m, e = report["measured"], report["estimate_seconds"]
    lines += [f"  {'trainable parameters':<28} {report['trainable_parameters']:,}", "",
              f"steps: ceil({report['train_examples']} / batch {hp['batch_size']} / accumulation "
              f"{hp['gradient_accumulation_steps']}) x {hp['n_epochs']} epochs = {report['steps']:,} optimizer steps, "
              f"{report['tokens']:,} training tokens",
              f"measured on {report['device']} with the trainer's own code: {m['seconds_per_step'] * 1000:,.1f} ms "
              f"per optimizer step ({m['tokens_per_s']:,.0f} tok/s; the median of {m['steps']} real steps after "
              f"{m['steps']} warm-up ones, which took {m['warm_up_seconds']:.1f} s more than steady ones), an "
              f"evaluation {m['eval_seconds']:.2f} s and a checkpoint {m['checkpoint_seconds']:.2f} s (each every "
              f"{report['checkpoint_steps']} steps: LLMQ_CHECKPOINT_STEPS), the held-out figures "
              f"{m['figures_seconds']:.2f} s (before and after training)",
              f"estimated training time: {_duration(report['estimated_seconds'])} = warm-up "
              f"{_duration(e['warm_up'])} + steps {_duration(e['steps'])} + evaluations and checkpoints "
              f"{_duration(e['evaluations_and_checkpoints'])} + figures {_duration(e['figures_before_and_after'])} "
              f"(loading the model and publishing not included)"]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"

