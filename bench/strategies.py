"""Optimization strategies benchmark: every variant an optimization job can make of a
fine-tuned model, on the same prompts and the same torch engine, in one run, against
the original. On the tiny local model and the shipped financial-sentiment task
(workers/training/finsent.py):

  the original   the tiny model fine-tuned in full on the task's training file through
                 the trainer's own `run_job` (bench/finetune.py's `train`, a child
                 process); and a LoRA fine-tune of the base, for the LoRA rows
  the variants   made as optimization jobs make them (workers/optimize/strategies.apply,
                 artifact.save, tune.fine_tune bound to the training file for QAT and
                 recoveries), from the original (the LoRA rows from the LoRA
                 fine-tune; the chained row from an earlier variant), all in one child
                 process; a strategy this machine can't run (StrategyError) gets its row
                 with the reason instead of figures
  measured       each variant in a fresh spawned process, on the torch engine as a
                 worker starts it (WorkerSettings(model=<folder>)):
                 - tok/s at 1 and 32 concurrent (--requests-1 / --requests-32 requests,
                   bench/engine.py's workload: corpus prompts of --prompt-tokens tokens,
                   --max-tokens each, EOS masked so every variant generates the same
                   tokens), TTFT and TPOT p50/p99 at 32
                 - peak memory: the process's peak RSS (VmHWM) while the engine loads and
                   serves (the accuracy requests and both throughput lines), minus its
                   RSS before the model was loaded (torch, transformers, peft and torchao
                   imported); memory loaded: its RSS once the engine has started (model
                   loaded, one warm-up step), minus the same
                 - size on disk: the bytes of the variant's folder (served as an adapter:
                   the base model's folder + the adapter's)
                 - quality: held-out accuracy on the task (greedy chat answers through the
                   engine, exact match to the label); perplexity of the held-out examples'
                   answer tokens (label + EOS, workers/training/evaluate.loss); greedy
                   agreement: the share of the original's greedy tokens (--agreement-tokens
                   after each of the first --agreement-prompts workload prompts, EOS never
                   chosen) the variant picks, teacher-forced
                 and ratios against the original from the same run

Writes a Markdown table (printed, and --md), the rows as JSON (--json) and a chart
(--png: speed against accuracy, one point per variant; size and peak memory bars).
--short: every row on a tiny workload (a few requests and training steps), for the test.

    python -m bench.strategies [--short] [--train 300] [--heldout 90] [--epochs 6] [--lora-epochs 6]
                               [--recovery-epochs 2] [--requests-1 4] [--requests-32 64] [--max-tokens 64]
                               [--md bench/results/strategies.md] [--json ...] [--png ...]

A benchmark, never part of the tests. Targets (CPU, tiny model): one variant >= 1.3x the
original's tok/s at 32 concurrent with accuracy within 2 points; one variant <= 0.5x the
original's size on disk and peak memory with accuracy within 5 points.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import re
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench.finetune import train, write_task_files
from bench.pipeline import machine
from shared.training import registry_path, split_fine_tuned
from workers.folders import folder_bytes
from workers.tinymodel import DEFAULT_PATH, build_tiny_model

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Variant:
    key: str  # its folder's name and its key in the JSON
    label: str  # its row's name
    strategy: dict | None  # shared.optimization's strategy as a job's body gives it; None: served as trained
    source: str = "original"  # "original", "lora" (the LoRA fine-tune) or an earlier variant's key
    adapter: bool = False  # served as a LoRA adapter of the base model, by `adapter=`


def variants(recovery_epochs: int, recovery_batch: int | str = "auto") -> list[Variant]:
    recovery = {"n_epochs": recovery_epochs, "batch_size": recovery_batch}
    return [
        Variant("original", "original (full fine-tune, fp32)", None),
        Variant("int8", "int8 dynamic", {"type": "int8_dynamic"}),
        Variant("wo8", "weight-only int8", {"type": "weight_only", "bits": 8}),
        Variant("wo4", "weight-only int4", {"type": "weight_only", "bits": 4, "group_size": 32}),
        Variant("qat4", "QAT int4", {"type": "qat", "bits": 4, "group_size": 32, "training": recovery}),
        Variant("l1-50", "L1 50% + recovery", {"type": "prune_l1", "sparsity": 0.5, "recovery": recovery}),
        Variant("layers-half", "layers 4→2 + recovery",
                {"type": "prune_structured", "layers_kept": 0.5, "mlp_kept": 1.0, "recovery": recovery}),
        Variant("heads-mlp-half", "heads & MLP ½ + recovery",
                {"type": "prune_structured", "heads_kept": 0.5, "mlp_kept": 0.5, "recovery": recovery}),
        Variant("bf16", "bf16", {"type": "precision", "dtype": "bfloat16"}),
        Variant("fp16", "fp16", {"type": "precision", "dtype": "float16"}),
        Variant("lora-adapter", "LoRA, served as adapter", None, source="lora", adapter=True),
        Variant("lora-merged", "LoRA merged", {"type": "merge_lora"}, source="lora"),
        # Chained (a variant's source is an earlier variant): aimed at half the size and memory.
        Variant("layers-half-bf16", "layers 4→2 + recovery, then bf16", {"type": "precision", "dtype": "bfloat16"},
                source="layers-half"),
        Variant("layers-half-mlp-half", "layers 4→2 + recovery, then MLP ½ + recovery",
                {"type": "prune_structured", "mlp_kept": 0.5, "recovery": recovery}, source="layers-half"),
    ]


def in_child(function, *args):
    """`function(*args)` in a fresh spawned process: its memory, imports and threads its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


# ---- making the variants (one child process) ----------------------------------------


def make_child(root: str, sources: dict[str, str], plan: list[Variant]) -> dict[str, dict]:
    """Every variant with a strategy, made and saved as an optimization job makes it;
    {key: {"status": "ok", "folder", "figures", "seconds"} or {"status", "reason"}}."""
    from transformers import AutoTokenizer

    from shared.optimization import STRATEGY
    from workers.optimize import artifact, strategies
    from workers.optimize.tune import fine_tune
    from workers.training.data import load_file
    from workers.training.settings import TrainerSettings

    files, out = Path(root) / "files", Path(root) / "variants"
    tokenizer = AutoTokenizer.from_pretrained(sources["original"])
    data = strategies.Data(*(load_file(files, name, tokenizer, 10**6, "invalid_training_file")
                             for name in ("file-train", "file-heldout")))
    learning_rate = TrainerSettings().full_learning_rate  # what a job's QAT and recoveries train at

    def tune(model, recovery) -> None:
        fine_tune(model, tokenizer, data.train, recovery, learning_rate=learning_rate, seed=0,
                  work_dir=str(Path(root) / "tune"))

    made = {key: {"status": "ok", "folder": folder} for key, folder in sources.items()}
    for v in plan:
        if v.strategy is None:
            continue
        source = made.get(v.source, {"status": "failed"})
        if source["status"] != "ok":
            made[v.key] = {"status": "skipped", "reason": f"its source ({v.source}) was not made"}
            continue
        started = time.perf_counter()
        try:
            model = _load_source(v.source, sources, source["folder"])
            strategy = STRATEGY.validate_python(v.strategy)
            optimized = strategies.apply(strategy, model, tokenizer, data=data, tune=tune)
            meta = {"job_id": f"bench-{v.key}", "model": v.key, "base_model": "tiny-llama", "source_model": v.source,
                    "method": "optimization", "strategy": v.strategy, "eval": {}}
            folder = artifact.save(optimized, tokenizer, out / v.key, meta)
        except strategies.StrategyError as exc:
            made[v.key] = {"status": exc.code.replace("_", " "), "reason": str(exc)}
            continue
        except Exception as exc:  # noqa: BLE001 - one broken strategy is its row's failure, not the run's
            traceback.print_exc()
            made[v.key] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
            continue
        made[v.key] = {"status": "ok", "folder": str(folder), "figures": optimized.figures,
                       "seconds": round(time.perf_counter() - started, 1)}
    return made


def _load_source(key: str, sources: dict[str, str], folder: str):
    from workers.optimize import artifact

    if key == "lora":  # merge_lora's source: the peft model of the LoRA fine-tune
        from peft import PeftModel

        return PeftModel.from_pretrained(artifact.load_model(sources["base"]), folder)
    return artifact.load_model(folder)


# ---- measuring one variant (a fresh child process each) -----------------------------


def _proc_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def measure_child(job: dict) -> dict:
    """One variant served and measured; job: folder, adapter (name) and adapters_dir, base,
    files, work (bench.engine.Workload), requests, agreement settings, references."""
    # Every library any variant loads, imported before the baseline RSS: their code is not
    # the model's memory (nor a quantized variant's cost).
    import peft  # noqa: F401
    import torchao.quantization  # noqa: F401
    from torch.ao.quantization import quantize_dynamic  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    from workers.engines.torch.engine import TorchEngine  # noqa: F401
    from workers.optimize import artifact, quantization  # noqa: F401

    before = _proc_kib("VmRSS")
    # Resets the peak RSS (VmHWM) to the current RSS (Linux's clear_refs, value 5).
    Path("/proc/self/clear_refs").write_text("5")
    try:
        return asyncio.run(_measure(job, before))
    except Exception as exc:  # noqa: BLE001 - the row says why it has no figures
        traceback.print_exc()
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}


async def _measure(job: dict, rss_before_kib: int) -> dict:
    from bench.engine import bench_llmq, never_eos
    from workers.engines.torch.engine import TorchEngine
    from workers.settings import WorkerSettings

    settings = WorkerSettings(engine="torch", model=job["folder"], adapters_dir=job.get("adapters_dir"),
                              batch_max_size=32, batch_max_tokens=10**9)
    engine = TorchEngine(settings)
    started = time.perf_counter()
    await engine.start()
    row: dict = {"engine_start_s": round(time.perf_counter() - started, 2),
                 "loaded_mib": round((_proc_kib("VmRSS") - rss_before_kib) / 1024, 1)}
    adapter, work = job.get("adapter"), job["work"]
    try:
        row["accuracy"] = await chat_accuracy(engine, job["heldout"], adapter)
        # With adapters_dir set, engine.model holds the base; LoRA layers never replace its lm_head.
        hook = never_eos(getattr(engine.model, "base", engine.model), engine.tokenizer.eos_token_id)
        await bench_llmq(engine, work, 2, 2, "warm-up", adapter)
        for c in (1, 32):
            line = await bench_llmq(engine, work, c, job["requests"][c], f"{c} concurrent", adapter)
            row[f"c{c}"] = {"requests": line.requests, "tokens": line.tokens, "seconds": round(line.seconds, 2),
                            "tok_s": round(line.tokens_per_s, 1), **{
                                k: round(getattr(line, k) * 1000, 2) for k in ("ttft_p50", "ttft_p99", "tpot_p50",
                                                                               "tpot_p99")
                                if getattr(line, k) is not None}}
        row["peak_mib"] = round((_proc_kib("VmHWM") - rss_before_kib) / 1024, 1)
        model, tokenizer = engine.model, engine.tokenizer
        served = getattr(model, "base", model)  # with adapters_dir set, the base under the adapters
        row["dtype"] = str(next(served.parameters()).dtype).removeprefix("torch.")
    finally:
        await engine.close()
    hook.remove()
    row.update(quality(job, model, tokenizer))
    return row


async def chat_accuracy(engine, heldout: list[dict], adapter: str | None) -> float:
    """Exact-match accuracy of the engine's greedy answers to the held-out chat examples."""
    from shared.schema import ChatMessage, Params
    from workers.engines.base import GenerationRequest
    from workers.training.evaluate import SHORT_ANSWER_TOKENS

    slots = asyncio.Semaphore(32)

    async def one(i: int, example: dict) -> bool:
        *question, answer = example["messages"]
        request = GenerationRequest(f"acc{i}", Params(max_tokens=SHORT_ANSWER_TOKENS, temperature=0),
                                    messages=[ChatMessage(**m) for m in question], adapter=adapter)
        async with slots:
            async for output in engine.generate(request):
                if output.result is not None:
                    if output.result.error:
                        raise RuntimeError(output.result.error)
                    return output.result.text.strip() == answer["content"].strip()
        raise RuntimeError("the engine ended a request without a result")

    hits = await asyncio.gather(*(one(i, x) for i, x in enumerate(heldout)))
    return round(sum(hits) / len(hits), 4)


def quality(job: dict, model, tokenizer) -> dict:
    """Plain forward passes (transformers' own attention, not the engine's step attention):
    greedy agreement with the references, then the held-out answers' perplexity."""
    import torch

    from bench.engine import agreement, greedy_continuations, never_eos
    from workers.training import evaluate
    from workers.training.data import load_file

    if job.get("adapter"):  # the served model is the engine's adapter wrapper: the same weights, as peft loads them
        from peft import PeftModel

        from workers.optimize import artifact

        model = PeftModel.from_pretrained(artifact.load_model(job["base"]), job["adapter_folder"]).eval()
    else:
        model.set_attn_implementation("sdpa")
    work, n = job["work"], job["agreement_prompts"]
    prompts = work.prompts[:n]
    hook = never_eos(model, tokenizer.eos_token_id)  # as the references were made: EOS never chosen
    out: dict = {}
    with torch.inference_mode():
        if job.get("make_reference"):
            out["reference"] = greedy_continuations(model, prompts, job["agreement_tokens"])
        out["agreement"] = {name: round(agreement(model, seqs, [len(p) for p in prompts])[0], 4)
                            for name, seqs in job["references"].items()}
    hook.remove()
    heldout = load_file(Path(job["files"]), "file-heldout", tokenizer, 10**6, "invalid_validation_file")
    out.update(evaluate.loss(model, tokenizer, heldout, 16))
    return out


# ---- the run -------------------------------------------------------------------------


def measure_all(plan: list[Variant], made: dict[str, dict], sources: dict[str, str], root: Path, work,
                heldout: list[dict], args) -> list[dict]:
    rows: list[dict] = []
    references: dict[str, list] = {}
    for v in plan:
        row = {"key": v.key, "variant": v.label, "strategy": v.strategy, "source": v.source}
        state = made.get(v.key) or {"status": "ok", "folder": sources[v.source]}
        if state["status"] != "ok":
            rows.append(row | {"status": state["status"], "reason": state.get("reason")})
            print(json.dumps(rows[-1]), flush=True)
            continue
        job = {"folder": state["folder"], "files": str(root / "files"), "work": work, "heldout": heldout,
               "base": sources["base"], "requests": {1: args.requests_1, 32: args.requests_32},
               "agreement_prompts": args.agreement_prompts, "agreement_tokens": args.agreement_tokens,
               # the merged LoRA is also held to the adapter it was merged from
               "references": {k: references[k] for k in ("original", "lora-adapter") if k in references},
               "make_reference": v.key in ("original", "lora-adapter")}
        if v.adapter:
            adapter_folder = Path(state["folder"])
            job |= {"folder": sources["base"], "adapters_dir": str(adapter_folder.parent),
                    "adapter": adapter_folder.name, "adapter_folder": str(adapter_folder)}
            size = folder_bytes(sources["base"], state["folder"])
        else:
            size = folder_bytes(state["folder"])
        measured = in_child(measure_child, job)
        if "reference" in measured:
            references[v.key] = measured.pop("reference")
        row |= {"status": measured.pop("status", "ok"), "size_bytes": size, "make_seconds": state.get("seconds"),
                "figures": state.get("figures"), **measured}
        rows.append(row)
        print(json.dumps({k: row[k] for k in row if k not in ("figures", "strategy")}), flush=True)
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Each measured row against the original's figures from the same run."""
    original = rows[0]
    if original.get("status") != "ok":
        return
    for row in rows:
        if row.get("status") != "ok":
            continue
        row["vs_original"] = {
            "tok_s_1": round(row["c1"]["tok_s"] / original["c1"]["tok_s"], 2),
            "tok_s_32": round(row["c32"]["tok_s"] / original["c32"]["tok_s"], 2),
            "size": round(row["size_bytes"] / original["size_bytes"], 2),
            "peak_memory": round(row["peak_mib"] / original["peak_mib"], 2),
            "loaded_memory": round(row["loaded_mib"] / original["loaded_mib"], 2),
            "accuracy_points": round(100 * (row["accuracy"] - original["accuracy"]), 1),
            "perplexity": round(row["perplexity"] / original["perplexity"], 2)}


def targets(rows: list[dict]) -> dict:
    """The issue's two targets: the best variant for each, and whether it reaches it."""
    ok = [r for r in rows[1:] if r.get("status") == "ok" and "vs_original" in r]
    fast = [r for r in ok if r["vs_original"]["accuracy_points"] >= -2]
    small = [r for r in ok if r["vs_original"]["accuracy_points"] >= -5]
    best_fast = max(fast, key=lambda r: r["vs_original"]["tok_s_32"], default=None)
    best_small = min(small, key=lambda r: max(r["vs_original"]["size"], r["vs_original"]["peak_memory"]), default=None)
    return {
        "speed": best_fast and {"variant": best_fast["variant"], **best_fast["vs_original"],
                                "reached": best_fast["vs_original"]["tok_s_32"] >= 1.3},
        "size": best_small and {"variant": best_small["variant"], **best_small["vs_original"],
                                "reached": max(best_small["vs_original"]["size"],
                                               best_small["vs_original"]["peak_memory"]) <= 0.5}}


# ---- the report ----------------------------------------------------------------------

COLUMNS = ["variant", "size on disk", "memory loaded", "peak memory", "tok/s at 1", "tok/s at 32", "TTFT p50 / p99 at 32",
           "TPOT p50 / p99 at 32", "held-out accuracy", "perplexity", "greedy agreement", "note"]


def table(rows: list[dict]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 2) + "---|"]
    for r in rows:
        if r.get("status") != "ok":
            cells = [r["variant"], *["-"] * (len(COLUMNS) - 2), f"{r['status']}: {r.get('reason') or ''}"]
        else:
            x = r.get("vs_original", {})
            c32 = r["c32"]
            cells = [r["variant"],
                     f"{r['size_bytes'] / 2**20:.1f} MiB ({x.get('size', 0):.2f}x)",
                     f"{r['loaded_mib']:,.0f} MiB ({x.get('loaded_memory', 0):.2f}x)",
                     f"{r['peak_mib']:,.0f} MiB ({x.get('peak_memory', 0):.2f}x)",
                     f"{r['c1']['tok_s']:,.0f} ({x.get('tok_s_1', 0):.2f}x)",
                     f"{c32['tok_s']:,.0f} ({x.get('tok_s_32', 0):.2f}x)",
                     f"{c32.get('ttft_p50', 0):.0f} / {c32.get('ttft_p99', 0):.0f} ms",
                     f"{c32.get('tpot_p50', 0):.1f} / {c32.get('tpot_p99', 0):.1f} ms",
                     f"{r['accuracy']:.3f} ({x.get('accuracy_points', 0):+.1f} pts)",
                     f"{r['perplexity']:.3f}",
                     f"{r['agreement'].get('original', 1.0):.1%}",
                     note(r)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def note(row: dict) -> str:
    parts = [f"served {row.get('dtype')}"]
    if row["key"] == "lora-merged" and "lora-adapter" in row.get("agreement", {}):
        parts.append(f"agreement with the adapter: {row['agreement']['lora-adapter']:.1%}")
    figures = row.get("figures") or {}
    if "parameters" in figures:
        parts.append(f"{figures['parameters']:,} parameters")
    if row.get("make_seconds") is not None:
        parts.append(f"made in {row['make_seconds']} s")
    return "; ".join(parts)


def chart(rows: list[dict], path: Path) -> None:
    """Left: tok/s at 32 against held-out accuracy, one labelled point per variant; right:
    size on disk and peak memory against the original's, per variant."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok" and "vs_original" in r]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(15, 7), gridspec_kw={"width_ratios": [1.1, 1]})
    points = [(r["vs_original"]["tok_s_32"], 100 * r["accuracy"]) for r in ok]
    xs, ys = [x for x, _ in points], [y for _, y in points]
    near_x, near_y = 0.03 * (max(xs) - min(xs) or 1), 0.03 * (max(ys) - min(ys) or 1)
    for n, (r, (x, y)) in enumerate(zip(ok, points), start=1):
        speed.scatter(x, y, s=40, color="black" if r["key"] == "original" else "tab:blue",
                      label=f"{n}  {r['variant']}")
        # Points that (nearly) coincide get their numbers stacked instead of printed over each other.
        stacked = sum(abs(x - px) < near_x and abs(y - py) < near_y for px, py in points[:n - 1])
        speed.annotate(str(n), (x, y), textcoords="offset points", xytext=(5, 3 + 10 * stacked), fontsize=9)
    speed.axvline(1.0, color="grey", lw=0.8, ls=":")
    speed.axvline(1.3, color="tab:green", lw=0.8, ls="--", label="1.3x target")
    speed.set_xlabel("tok/s at 32 concurrent, x the original")
    speed.set_ylabel("held-out accuracy, %")
    speed.set_title("speed against quality")
    speed.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, fontsize=8, frameon=False)
    labels = [f"{r['variant']}  {n}" for n, r in enumerate(ok, start=1)]
    at = range(len(ok))
    for shift, key, name in ((-0.27, "size", "size on disk"), (0, "loaded_memory", "memory loaded"),
                             (0.27, "peak_memory", "peak memory serving")):
        memory.barh([y + shift for y in at], [r["vs_original"][key] for r in ok], height=0.27, label=name)
    memory.set_yticks(list(at), labels, fontsize=8)
    memory.invert_yaxis()
    memory.axvline(1.0, color="grey", lw=0.8, ls=":")
    memory.axvline(0.5, color="tab:green", lw=0.8, ls="--", label="0.5x target")
    memory.set_xlabel("x the original")
    memory.set_title("size on disk and memory")
    memory.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8, frameon=False)
    unavailable = [f"{r['variant']}: {r['status']}" for r in rows if r.get("status") != "ok"]
    if unavailable:
        fig.text(0.01, 0.01, "no figures: " + "; ".join(unavailable), fontsize=8)
    fig.tight_layout(rect=(0, 0.04 if unavailable else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- main ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.strategies", description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="every row on a tiny workload (for the test)")
    parser.add_argument("--train", type=int, default=300, help="training examples")
    parser.add_argument("--heldout", type=int, default=90, help="held-out examples (accuracy, perplexity)")
    parser.add_argument("--epochs", type=int, default=6, help="the original's full fine-tune")
    parser.add_argument("--lora-epochs", type=int, default=6, help="the LoRA fine-tune")
    parser.add_argument("--recovery-epochs", type=int, default=2, help="QAT's and each recovery's fine-tune")
    parser.add_argument("--requests-1", type=int, default=4, help="requests of the line at 1 concurrent")
    parser.add_argument("--requests-32", type=int, default=64, help="requests of the line at 32 concurrent")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64,
                        help="tokens each request generates (0: bench/engine.py's draw from 16-256)")
    parser.add_argument("--agreement-prompts", type=int, default=16)
    parser.add_argument("--agreement-tokens", type=int, default=32)
    parser.add_argument("--md", type=Path, default=RESULTS / "strategies.md")
    parser.add_argument("--json", type=Path, default=RESULTS / "strategies.json")
    parser.add_argument("--png", type=Path, default=RESULTS / "strategies.png")
    args = parser.parse_args(argv)
    args.gate = "eval_loss"  # bench.finetune.train's: the original must beat the base to be published
    args.recovery_batch = "auto"  # a job's default
    if args.short:  # a few optimizer steps each: the full fine-tunes at batch 1, QAT and recoveries at 16
        args.train, args.heldout, args.epochs, args.lora_epochs, args.recovery_epochs = 32, 9, 1, 1, 1
        args.recovery_batch = 16
        args.requests_1, args.requests_32, args.agreement_prompts, args.agreement_tokens = 1, 4, 2, 8
        args.max_tokens = 8
    return args


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoTokenizer

    from bench.engine import make_workload

    args = parse_args(argv)
    started = time.perf_counter()
    base = build_tiny_model(DEFAULT_PATH)
    plan = variants(args.recovery_epochs, args.recovery_batch)
    result: dict = {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="llmq-bench-strategies-") as tmp:
        root = Path(tmp)
        _, heldout = write_task_files(root, args.train, args.heldout)
        sources = {"base": str(base)}
        result["fine_tunes"] = []
        for method, epochs in (("full", args.epochs), ("lora", args.lora_epochs)):
            trained = train(method, root, base, argparse.Namespace(epochs=epochs, gate=args.gate))  # a child
            print(json.dumps(trained), flush=True)
            result["fine_tunes"].append(trained)
            if trained["status"] != "succeeded":
                raise SystemExit(f"the {method} fine-tune {trained['status']}: {trained['error']}")
            named = split_fine_tuned(trained["model"])
            sources["original" if method == "full" else "lora"] = str(registry_path(root / "registry", method,
                                                                                    named[1]))
        made = in_child(make_child, str(root), sources, plan)
        work = make_workload(AutoTokenizer.from_pretrained(base), max(args.requests_32, args.agreement_prompts),
                             args.prompt_tokens)
        if args.max_tokens:
            work.max_tokens = [args.max_tokens] * len(work.max_tokens)
        result["rows"] = measure_all(plan, made, sources, root, work, heldout, args)
    result["targets"] = targets(result["rows"])
    result["wall_seconds"] = round(time.perf_counter() - started, 1)
    write_report(result, args)
    return result


def write_report(result: dict, args) -> None:
    text = table(result["rows"])
    t = result["targets"]
    lines = [text, ""]
    if t["speed"]:
        s = t["speed"]
        lines.append(f"speed target (>= 1.3x tok/s at 32, accuracy within 2 points): {s['variant']}, "
                     f"{s['tok_s_32']:.2f}x, {s['accuracy_points']:+.1f} points: "
                     f"{'reached' if s['reached'] else 'not reached'}")
    if t["size"]:
        s = t["size"]
        lines.append(f"size target (<= 0.5x size on disk and peak memory, accuracy within 5 points): "
                     f"{s['variant']}, size {s['size']:.2f}x, peak memory {s['peak_memory']:.2f}x "
                     f"(loaded {s['loaded_memory']:.2f}x), "
                     f"{s['accuracy_points']:+.1f} points: {'reached' if s['reached'] else 'not reached'}")
    lines.append(f"\nwall time {result['wall_seconds']} s; {result['machine']['nproc']} cores "
                 f"({result['machine']['cpu_model']}), load average at start "
                 f"{', '.join(f'{x:.2f}' for x in result['machine']['loadavg_at_start'])}")
    report = "\n".join(lines)
    print("\n" + report)
    for path, content in ((args.md, report + "\n"), (args.json, json.dumps(result, indent=2, default=str) + "\n")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    chart(result["rows"], args.png)
    print(f"\nwrote {args.md}, {args.json}, {args.png}")


if __name__ == "__main__":
    main()
