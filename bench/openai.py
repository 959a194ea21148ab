"""OpenAI streaming benchmark: what the queue hop costs a streamed chat completion.

    python -m bench.openai [--levels 1,8,32] [--max-tokens 64] [--rounds 2] [--json out.json] [--keep]

One run builds the tiny model, starts its own broker (Tansu), redis-server, one
`gateway` (LLMQ_AUTH=false) and ONE torch `worker` serving that model, all on
free loopback ports, and waits until the worker has registered it. Then, for
each concurrency C (a fixed 4 x C requests per level, at least 16, at most C
in flight; the same prompts of about --prompt-tokens tokens, greedy,
--max-tokens each), the two sides take turns (llmq then direct; the next round
direct then llmq), never both at once:

  llmq     the official `openai` async client, `chat.completions.create(...,
           stream=True, stream_options={"include_usage": True})` against the
           gateway: gateway → Kafka → worker → per-request Redis Stream → SSE
  direct   the same engine (TorchEngine, the worker's settings) in this process,
           its `generate()` iterator called directly: no gateway, queue or Redis

Per request: TTFT = the call → the first non-empty content (a chunk's
`delta.content`, or an engine output's `delta`); ITL = the gaps between
successive non-empty contents (through llmq a chunk may carry several tokens:
the worker batches its writes, so tokens per chunk is reported too, and TPOT =
(last content - first) / (tokens - 1), which chunking does not change); output
tokens = the usage chunk's `completion_tokens` (direct: the result's). Per
level: output tok/s = sum(completion_tokens) / the level's wall time, and the
CPU per output token of the processes on the path (llmq: gateway, worker,
redis, broker and this client; direct: this process), what the hop costs the
two cores. With several rounds, each figure is the median of the rounds'.
Greedy decoding makes both sides' texts comparable: each request's streamed
text through llmq is checked against the direct engine's for the same prompt,
level and round. A gateway without the endpoint (404) leaves the direct side only.

Targets (this machine, tiny model): the hop adds ≤ 15 ms to TTFT p50 at 8
concurrent, and llmq's output tok/s is ≥ 0.9 x the direct engine's.
A benchmark, never part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import openai

from bench.engine import make_workload
from bench.pipeline import (Children, CpuMeter, console_script, llmq_env, log, machine, median, ms, percentile,
                            run_and_report)
from deploy.devstack import ServiceError, free_port, start_broker, start_redis, wait_for_port
from shared.schema import ChatMessage, Params
from workers import tinymodel
from workers.engines.base import GenerationRequest
from workers.engines.torch.engine import TorchEngine
from workers.settings import WorkerSettings

SIDES = ("llmq", "direct")


@dataclass
class Sample:
    """One request as its client saw it."""

    ttft: float | None = None  # seconds, the call → first non-empty content
    gaps: list[float] = field(default_factory=list)  # seconds between successive non-empty contents
    chunks: int = 0  # non-empty contents received
    last: float | None = None  # seconds, the call → the last non-empty content
    tokens: int = 0  # completion tokens, as the usage (or the result) counts them
    text: str = ""
    error: str | None = None

    def content(self, text: str, since_call: float) -> None:
        """A non-empty piece of text, `since_call` seconds after the call."""
        if self.ttft is None:
            self.ttft = since_call
        else:
            self.gaps.append(since_call - self.last)
        self.last = since_call
        self.chunks += 1
        self.text += text


@dataclass
class Level:
    """One side at one concurrency, one round."""

    side: str
    concurrency: int
    round: int
    requests: int
    wall_s: float
    tokens: int
    errors: int
    tok_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    tpot_p50_ms: float | None  # per request: (last content - first content) / (tokens - 1), chunking aside
    tokens_per_chunk: float | None
    cpu_s: dict[str, float]
    first_error: str | None = None


def summarise(side: str, concurrency: int, round_: int, samples: list[Sample], wall: float,
              cpu: dict[str, float]) -> Level:
    ok = [s for s in samples if s.error is None]
    ttfts = [s.ttft for s in ok if s.ttft is not None]
    gaps = [g for s in ok for g in s.gaps]
    tpots = [(s.last - s.ttft) / (s.tokens - 1) for s in ok if s.ttft is not None and s.tokens > 1]
    tokens, chunks = sum(s.tokens for s in ok), sum(s.chunks for s in ok)
    return Level(side, concurrency, round_, len(samples), round(wall, 3), tokens, len(samples) - len(ok),
                 round(tokens / wall, 1), ms(percentile(ttfts, 50)), ms(percentile(ttfts, 99)),
                 ms(percentile(gaps, 50)), ms(percentile(gaps, 99)), ms(percentile(tpots, 50)),
                 round(tokens / chunks, 2) if chunks else None,
                 {name: round(v, 3) for name, v in cpu.items()},
                 next((s.error for s in samples if s.error is not None), None))


# ---- the two clients -------------------------------------------------------------------


async def through_llmq(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> Sample:
    sample = Sample()
    started = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            stream=True, stream_options={"include_usage": True})
        async with stream:
            async for chunk in stream:
                content = chunk.choices[0].delta.content if chunk.choices else None
                if content:
                    sample.content(content, time.perf_counter() - started)
                if chunk.usage is not None:
                    sample.tokens = chunk.usage.completion_tokens
    except openai.APIError as exc:
        sample.error = f"{type(exc).__name__}: {exc}"[:300]
    return sample


async def direct(engine: TorchEngine, request_id: str, prompt: str, max_tokens: int) -> Sample:
    sample = Sample()
    request = GenerationRequest(request_id, Params(max_tokens=max_tokens, temperature=0),
                                messages=[ChatMessage(role="user", content=prompt)])
    started = time.perf_counter()
    async for output in engine.generate(request):
        if output.delta:
            sample.content(output.delta, time.perf_counter() - started)
        if output.result is not None:
            sample.tokens = output.result.completion_tokens
            sample.error = output.result.error
    return sample


async def run_level(one, prompts: list[str], concurrency: int, total: int) -> tuple[list[Sample], float]:
    """`total` requests, at most `concurrency` at once: a finished request's slot goes to the next."""
    slots = asyncio.Semaphore(concurrency)

    async def client(i: int) -> Sample:
        async with slots:
            return await one(i, prompts[i % len(prompts)])

    started = time.perf_counter()
    samples = await asyncio.gather(*(client(i) for i in range(total)))
    return list(samples), time.perf_counter() - started


# ---- the stack ---------------------------------------------------------------------------


def served_models(base: str) -> list[str]:
    try:
        with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as resp:
            return [card["id"] for card in json.loads(resp.read())["data"]]
    except OSError:
        return []


def start_stack(children: Children, tmp: Path, model_dir: Path) -> tuple[str, str, dict[str, int | None]]:
    """Broker, redis, one gateway and one torch worker; (gateway URL, served model name, pids)."""
    broker = start_broker(free_port(), tmp / "broker.log")
    children.services.append(broker)
    redis_service = start_redis(free_port(), tmp / "redis")
    children.services.append(redis_service)
    stack = {"run": uuid.uuid4().hex[:8], "bootstrap": broker.url, "redis_url": redis_service.url}
    port = free_port()
    env = {**llmq_env(stack, "openai", port), "LLMQ_ENGINE": "torch", "LLMQ_MODEL": str(model_dir),
           "LLMQ_METRICS_PORT": "0",
           # Every round repeats the same greedy prompts: the result cache would answer them.
           "LLMQ_CACHE_TTL_SECONDS": "0"}
    gateway = children.spawn("gateway", console_script("gateway", "gateway.main") + ["--port", str(port)], env)
    worker = children.spawn("worker", console_script("worker", "workers.main"), env)
    base = f"http://127.0.0.1:{port}"
    wait_for_port(port, 60, gateway, "gateway")
    name = WorkerSettings(engine="torch", model=str(model_dir)).served_model_name
    deadline = time.monotonic() + 120
    while name not in served_models(base):
        if worker.poll() is not None:
            raise ServiceError(f"the worker exited with code {worker.returncode} during start-up")
        if time.monotonic() > deadline:
            raise ServiceError(f"the worker did not register {name!r} within 120 s")
        time.sleep(0.2)
    pids = {"gateway": gateway.pid, "worker": worker.pid, "redis": redis_service.proc.pid,
            "broker": broker.proc.pid, "bench": None}
    return base, name, pids


# ---- the run -----------------------------------------------------------------------------


def requests_at(args: argparse.Namespace, concurrency: int) -> int:
    return max(concurrency * args.requests_per_slot, args.min_requests)


async def measure(args: argparse.Namespace, base: str, model: str, model_dir: Path, prompts: list[str],
                  pids: dict[str, int | None], children: Children) -> tuple[list[Level], dict]:
    # The worker's own settings: the same LLMQ_* environment, and the engine and model it was given.
    engine = TorchEngine(WorkerSettings(engine="torch", model=str(model_dir)))
    await engine.start()
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
    counter = iter(range(10**9))

    def llmq_one(_i: int, prompt: str):
        return through_llmq(client, model, prompt, args.max_tokens)

    def direct_one(_i: int, prompt: str):
        return direct(engine, f"direct-{next(counter)}", prompt, args.max_tokens)

    ones = {"llmq": llmq_one, "direct": direct_one}
    levels: list[Level] = []
    texts: dict[tuple[str, int, int], list[str]] = {}
    try:
        # Warm-up, both sides: the first request through a fresh stack pays for
        # connections, the topic's metadata and the worker's first batch.
        warm = await through_llmq(client, model, prompts[0], args.max_tokens)
        llmq_ok = warm.error is None
        if not llmq_ok:
            log(f"llmq: POST /v1/chat/completions failed ({warm.error}); measuring the direct engine only")
        else:
            await run_level(llmq_one, prompts, 2, 4)
        await run_level(direct_one, prompts, 2, 4)

        for r in range(args.rounds):
            for c in args.levels:
                order = SIDES if r % 2 == 0 else SIDES[::-1]  # each side goes first every other round
                for side in order:
                    if side == "llmq" and not llmq_ok:
                        continue
                    if children.procs and any(p.poll() is not None for _n, p in children.procs):
                        raise ServiceError("a child process exited during the run")
                    meter = CpuMeter(pids)
                    meter.start()
                    samples, wall = await run_level(ones[side], prompts, c, requests_at(args, c))
                    level = summarise(side, c, r + 1, samples, wall, meter.stop())
                    levels.append(level)
                    texts[(side, c, r + 1)] = [s.text if s.error is None else None for s in samples]
                    log(f"round {r + 1} {side} at {c}: {level.tok_per_s:.0f} tok/s, TTFT p50 {level.ttft_p50_ms} ms, "
                        f"ITL p50 {level.itl_p50_ms} ms, {level.tokens_per_chunk} tokens/chunk, "
                        f"errors {level.errors}")
    finally:
        await client.close()
        await engine.close()

    # Greedy: each llmq text against the direct engine's for the same request slot.
    compared = mismatched = 0
    examples = []
    for (side, c, r), llmq_texts in texts.items():
        if side != "llmq":
            continue
        for i, (a, b) in enumerate(zip(llmq_texts, texts[("direct", c, r)])):
            if a is None or b is None:
                continue
            compared += 1
            if a != b:
                mismatched += 1
                if len(examples) < 3:
                    at = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                    examples.append({"concurrency": c, "round": r, "request": i, "first_difference_at_char": at,
                                     "llmq": a[max(0, at - 20):at + 40], "direct": b[max(0, at - 20):at + 40]})
    return levels, {"llmq_served": llmq_ok, "compared": compared, "mismatched": mismatched, "examples": examples}


def run(args: argparse.Namespace, children: Children, tmp: Path) -> dict:
    info = machine()
    model_dir = tinymodel.build_tiny_model(tmp / "tiny-llama")
    from transformers import AutoTokenizer

    # Prompts of about --prompt-tokens tokens from the model's own corpus, fixed seed.
    work = make_workload(AutoTokenizer.from_pretrained(model_dir), max(requests_at(args, c) for c in args.levels),
                         args.prompt_tokens)
    log(f"starting broker, redis, gateway and a torch worker in {tmp}")
    base, model, pids = start_stack(children, tmp, model_dir)
    levels, check = asyncio.run(measure(args, base, model, model_dir, work.texts, pids, children))
    info["loadavg_at_end"] = os.getloadavg()
    return {
        "machine": info,
        "config": {"levels": args.levels, "requests_per_level": [requests_at(args, c) for c in args.levels],
                   "max_tokens": args.max_tokens, "prompt_tokens": args.prompt_tokens, "rounds": args.rounds,
                   "model": model, "engine": "torch", "workers": 1,
                   "env_overrides": {k: v for k, v in sorted(os.environ.items()) if k.startswith("LLMQ_")}},
        "levels": [asdict(level) for level in levels],
        "correctness": check,
    }


# ---- the report ----------------------------------------------------------------------------


def _med(levels: list[dict], key: str) -> float | None:
    values = [level[key] for level in levels if level[key] is not None]
    return median(values) if values else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def cpu_table(levels: list[int], by: dict[tuple[str, int], list[dict]]) -> list[str]:
    """CPU ms per output token of each process: where the hop's cost lands on the shared cores
    (during direct, the idle gateway, worker and broker still poll)."""
    names = list(next(iter(by.values()))[0]["cpu_s"])
    lines = [f"| C | path | CPU ms per output token: {' / '.join(names)} (bench: this process, the openai "
             "client or the direct engine) |", "|---|---|---|"]
    for c in levels:
        for side in SIDES:
            runs = [r for r in by.get((side, c), []) if r["tokens"]]
            if runs:
                per = [median([r["cpu_s"][name] * 1000 / r["tokens"] for r in runs]) for name in names]
                lines.append(f"| {c} | {side} | {' / '.join(f'{v:.2f}' for v in per)} |")
    return lines


def _verdict(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def report(result: dict) -> str:
    m, cfg, check = result["machine"], result["config"], result["correctness"]
    by = {}
    for level in result["levels"]:
        by.setdefault((level["side"], level["concurrency"]), []).append(level)
    rounds = f"median of {cfg['rounds']} rounds" if cfg["rounds"] > 1 else "1 round"
    lines = [
        f"machine: {m['nproc']} CPUs ({m['cpu_model']}), python {m['python']}, "
        f"load average at start {m['loadavg_at_start'][0]:.2f}, at end {m['loadavg_at_end'][0]:.2f}",
        f"model {cfg['model']} (torch engine, 1 worker), prompts of {cfg['prompt_tokens']} tokens as one user "
        f"message, max_tokens {cfg['max_tokens']}, greedy; "
        + ", ".join(f"{n} requests at C={c}" for c, n in zip(cfg["levels"], cfg["requests_per_level"])) + f"; {rounds}",
        "",
        "| C | path | TTFT p50 / p99 ms | ITL p50 / p99 ms | TPOT p50 ms | tokens per chunk | output tok/s | "
        "CPU ms per token (path) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in cfg["levels"]:
        for side in SIDES:
            runs = by.get((side, c))
            if not runs:
                lines.append(f"| {c} | {side} | not served | | | | | |")
                continue
            # The processes on the path: through llmq every one (this one is its client), direct only this one.
            cpu = median([(sum(r["cpu_s"].values()) if side == "llmq" else r["cpu_s"]["bench"]) * 1000 / r["tokens"]
                          for r in runs if r["tokens"]] or [0])
            errors = sum(r["errors"] for r in runs)
            lines.append(
                f"| {c} | {side}{f' ({errors} errors)' if errors else ''} | "
                f"{_fmt(_med(runs, 'ttft_p50_ms'))} / {_fmt(_med(runs, 'ttft_p99_ms'))} | "
                f"{_fmt(_med(runs, 'itl_p50_ms'))} / {_fmt(_med(runs, 'itl_p99_ms'))} | "
                f"{_fmt(_med(runs, 'tpot_p50_ms'))} | "
                f"{_fmt(_med(runs, 'tokens_per_chunk'), 2)} | {_fmt(_med(runs, 'tok_per_s'), 0)} | {cpu:.2f} |")
    if not check["llmq_served"]:
        lines += ["", "llmq: the gateway does not serve POST /v1/chat/completions yet; direct engine only."]
        return "\n".join(lines)

    lines += ["", "| C | queue hop: TTFT p50 llmq − direct | target | throughput llmq / direct | target |",
              "|---|---|---|---|---|"]
    for c in cfg["levels"]:
        pairs = [(a, b) for a in by.get(("llmq", c), []) for b in by.get(("direct", c), []) if a["round"] == b["round"]]
        hops = [a["ttft_p50_ms"] - b["ttft_p50_ms"] for a, b in pairs
                if a["ttft_p50_ms"] is not None and b["ttft_p50_ms"] is not None]
        ratios = [a["tok_per_s"] / b["tok_per_s"] for a, b in pairs if b["tok_per_s"]]
        hop, ratio = (median(hops) if hops else None), (median(ratios) if ratios else None)
        hop_target = "—" if c != 8 else f"≤ 15 ms ({_verdict(hop is not None and hop <= 15)})"
        ratio_target = f"≥ 0.90 ({_verdict(ratio is not None and ratio >= 0.9)})"
        lines.append(f"| {c} | {_fmt(hop)} ms | {hop_target} | {_fmt(ratio, 2)} | {ratio_target} |")
    lines += ["", *cpu_table(cfg["levels"], by)]
    lines += ["", f"greedy text, llmq vs direct (same prompt, level, round): {check['mismatched']} mismatches "
                  f"of {check['compared']} compared"]
    for example in check["examples"]:
        lines.append(f"  mismatch: {example}")
    return "\n".join(lines)


def levels_arg(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError("comma-separated whole numbers, such as 1,8,32") from exc
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("at least one level, each ≥ 1")
    return levels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.openai", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=levels_arg, default=[1, 8, 32], help="concurrency levels (1,8,32)")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request (64)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="tokens of each prompt's text (32)")
    parser.add_argument("--requests-per-slot", type=int, default=4, help="requests per level = this x C ... (4)")
    parser.add_argument("--min-requests", type=int, default=16, help="... but at least this many (16)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each side first every other round (2)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (child logs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def report_with_peer(result: dict) -> str:
        peer = "installed, not measured by this bench yet" if importlib.util.find_spec("vllm") else "not installed here"
        return f"{report(result)}\nvLLM peer: {peer}"

    return run_and_report(lambda children, tmp: run(args, children, tmp), report_with_peer, args.json, args.keep,
                          prefix="llmq-bench-openai-")

if __name__ == "__main__":
    sys.exit(main())
