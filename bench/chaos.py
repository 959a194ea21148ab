"""Chaos benchmark: a steady load through faults, and what the users of it saw.

    python -m bench.chaos [--requests N] [--rate R] [--json out.json] [--keep]

One run starts its own broker (Tansu), a persistent redis-server (append-only
file, so a restart keeps the records), a `gateway` process and two echo
`worker` processes, all on free loopback ports. N requests (default 2,000)
are submitted at a steady R per second (default 20), each by a task of its
own (open loop: the schedule does not wait for answers). A client that gets a
503, or no answer, retries after the Retry-After it was given, as a client
should; the retries are counted. After a calm start, a fault script runs, one
fault per step:

  1. SIGKILL worker A, start a new A (an orchestrator restarting a crashed pod)
  2. SIGTERM worker B, wait for it to drain and exit, start a new B
  3. stop Redis (SIGTERM), start it again on the same port and directory
  4. pause the broker (SIGSTOP) for a few seconds, then SIGCONT
  5. scale down fast under running requests: workers C and D join, a few long
     requests start, then D, C and B get SIGTERM one second apart (newest
     first, as the scaler steps 4 -> 3 -> 2 -> 1), and B is started again;
     partitions move while the long requests still run

Then the load runs on to its end, and the bench waits for every accepted
request to end. The report, from the Redis records and the workers' logs:

  accepted / succeeded / failed   the record's final status (failed with reasons)
  lost                            accepted, but not final after the drain (must be 0)
  run twice to completion         ids whose result write was reached by two runs: the workers'
                                  `request_finished` log events (one per run that got as far as
                                  writing its result, written or not) counted per id (must be 0)
  written twice                   of those, ids written by both (the Lua write forbids it)
  started more than once          record `attempts` > 1: runs begun again after a crash or a
                                  rebalance; expected for what SIGKILL interrupts
  refused but ran                 records of ids never accepted that ran anyway (a 503 must
                                  mean "never runs"); refused ones are left `cancelled`
  latency                         submit (first attempt, retries included) → the record's
                                  `finished_at`, per phase: calm vs each fault's window

A benchmark, never part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.pipeline import JSON_CT, Children, console_script, llmq_env, log, machine, ms, percentile
from bench.scaler import _log_events, _ts
from deploy.devstack import ServiceError, free_port, start_broker, start_redis
from shared.keys import Keys
from shared.store import connect_redis

FINAL = ("succeeded", "failed", "cancelled", "expired")


@dataclass
class Fault:
    name: str
    at: float  # seconds after the load started
    took: float = 0.0  # how long the fault lasted (down, paused, draining)
    note: str = ""
    replacement: str | None = None  # log name of the worker started in its place
    serving_after: float | None = None  # fault began -> that worker was given partitions


@dataclass
class Submit:
    index: int
    first_attempt: float  # time.time(), comparable with the worker's finished_at
    request_id: str | None = None
    attempts: int = 0
    refused: Counter = field(default_factory=Counter)  # 503 type / "no answer" -> count
    gave_up: str | None = None


class Stack:
    """The services and llmq processes of one run, and the faults done to them."""

    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.children = Children(tmp)
        self.generation = Counter()  # how many processes of each worker name were started
        self.long_ids: list[str] = []  # the scale-down step's long requests, accounted like the load's

    def start(self) -> None:
        self.broker = start_broker(free_port(), self.tmp / "broker.log")
        self.redis = start_redis(free_port(), self.tmp / "redis", persistent=True)
        self.children.services += [self.broker, self.redis]
        self.info = {"run": uuid.uuid4().hex[:8], "bootstrap": self.broker.url, "redis_url": self.redis.url}
        port = free_port()
        self.env = {**llmq_env(self.info, "chaos", port),
                    "LLMQ_ECHO_TOKEN_DELAY_MS": str(self.args.token_delay_ms),
                    "LLMQ_LOG_LEVEL": "info", "LLMQ_LOG_FORMAT": "json",  # request_finished events are counted
                    "LLMQ_METRICS_PORT": "0"}
        self.prefix = self.env["LLMQ_REDIS_PREFIX"]
        self.url = f"http://127.0.0.1:{port}"
        self.gateway = self.children.spawn("gateway", console_script("gateway", "gateway.main"), self.env)
        self.workers = {name: self.spawn_worker(name) for name in ("a", "b")}

    def spawn_worker(self, name: str):
        self.generation[name] += 1
        # worker-*.log, the file names bench.scaler's log reader takes
        self.last_spawned = f"worker-{name}-{self.generation[name]}"
        return self.children.spawn(self.last_spawned, console_script("worker", "workers.main"), self.env)

    def close(self, keep: bool) -> None:
        if hasattr(self, "broker"):
            self.broker.resume()  # a stopped process ignores SIGTERM until it is continued
        self.children.stop_all()
        if keep:
            log(f"logs kept in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def joined(self) -> int:
        """How many workers have been given partitions at least once (from their logs)."""
        return len({path for path, event in _log_events(self.tmp) if event.get("event") == "partitions_assigned"})

    # ---- the faults ----------------------------------------------------------------

    async def kill_worker(self, fault: Fault) -> None:
        proc = self.workers["a"]
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)
        await asyncio.sleep(self.args.restart_after)
        self.workers["a"] = self.spawn_worker("a")
        fault.took = self.args.restart_after
        fault.replacement = self.last_spawned

    async def stop_worker(self, fault: Fault) -> None:
        proc = self.workers["b"]
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(proc.wait, self.args.grace)
        except subprocess.TimeoutExpired:  # past its grace period: killed, as an orchestrator would
            proc.kill()
            code = f"killed after {self.args.grace:g} s grace"
        fault.took = time.monotonic() - started
        fault.note = f"exit code {code}"
        self.workers["b"] = self.spawn_worker("b")
        fault.replacement = self.last_spawned

    async def restart_redis(self, fault: Fault) -> None:
        await asyncio.to_thread(self.redis.stop)  # SIGTERM: the append-only file is flushed
        await asyncio.sleep(self.args.redis_down)
        port = self.redis.port
        self.children.services.remove(self.redis)
        self.redis = await asyncio.to_thread(start_redis, port, self.tmp / "redis", 10.0, True)
        self.children.services.append(self.redis)
        fault.took = self.args.redis_down

    async def scale_down(self, fault: Fault) -> None:
        joined = self.joined()
        extra = [self.spawn_worker(name) for name in ("c", "d")]
        deadline = time.monotonic() + 90
        while self.joined() < joined + 2:
            if time.monotonic() > deadline:
                raise ServiceError("workers C and D did not join within 90 s")
            await asyncio.sleep(0.2)
        words = self.args.long_words
        body = json.dumps({"input": {"prompt": " ".join(["long"] * words)}, "params": {"max_tokens": words}}).encode()
        async with aiohttp.ClientSession() as http:
            for _ in range(self.args.long_requests):
                async with http.post(f"{self.url}/v1/requests", data=body, headers=JSON_CT) as resp:
                    if resp.status == 202:
                        self.long_ids.append((await resp.json())["id"])
        await asyncio.sleep(1.0)  # running now, spread over the four workers
        started = time.monotonic()
        stopping = [extra[1], extra[0], self.workers["b"]]
        for proc in stopping:
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(1.0)
        codes = []
        for proc in stopping:
            try:
                codes.append(await asyncio.to_thread(proc.wait, self.args.grace))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append("killed")
        fault.took = time.monotonic() - started
        fault.note = (f"{len(self.long_ids)} requests of {words} tokens running; D, C, B stopped 1 s apart, "
                      f"exit codes {codes}")
        self.workers["b"] = self.spawn_worker("b")
        fault.replacement = self.last_spawned

    async def pause_broker(self, fault: Fault) -> None:
        self.broker.pause()
        try:
            await asyncio.sleep(self.args.broker_pause)
        finally:
            self.broker.resume()
        fault.took = self.args.broker_pause


# ---- the load ------------------------------------------------------------------------


async def submit(http: aiohttp.ClientSession, url: str, body: bytes, item: Submit, give_up_after: float) -> None:
    """POST until a 202, retrying a 503 or a lost answer after the Retry-After the gateway gave."""
    while True:
        item.attempts += 1
        retry_after = 1.0
        try:
            async with http.post(url, data=body, headers=JSON_CT) as resp:
                payload = await resp.read()
                if resp.status == 202:
                    item.request_id = json.loads(payload)["id"]
                    return
                if resp.status != 503:
                    item.gave_up = f"HTTP {resp.status}"
                    return
                item.refused[json.loads(payload)["error"]["type"]] += 1
                retry_after = float(resp.headers.get("Retry-After", "1"))
        except (aiohttp.ClientError, asyncio.TimeoutError):
            item.refused["no answer"] += 1
        if time.time() - item.first_attempt > give_up_after:
            item.gave_up = "kept refusing"
            return
        await asyncio.sleep(retry_after)


async def load(stack: Stack, args: argparse.Namespace, faults: list[Fault]) -> tuple[list[Submit], float]:
    """The steady load and, beside it, the fault script. Returns the submits and the load's start (time.time())."""
    body = json.dumps({"input": {"prompt": " ".join(["word"] * args.words)},
                       "params": {"max_tokens": args.words}}).encode()
    url = f"{stack.url}/v1/requests"
    items: list[Submit] = []
    steps = [("worker SIGKILL + restart", stack.kill_worker), ("worker SIGTERM + restart", stack.stop_worker),
             ("Redis restart", stack.restart_redis), ("broker paused", stack.pause_broker),
             ("scale-down 4 -> 1 under long requests", stack.scale_down)]

    async def fault_script(start: float) -> None:
        for i, (name, action) in enumerate(steps):
            at = args.calm + i * args.gap
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            fault = Fault(name, round(time.monotonic() - start, 2))
            faults.append(fault)
            log(f"t={fault.at:.0f} s: {name}")
            await action(fault)

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), timeout=timeout) as http:
        start, wall_start = time.monotonic(), time.time()
        script = asyncio.create_task(fault_script(start))
        tasks = []
        for i in range(args.requests):
            await asyncio.sleep(max(0.0, start + i / args.rate - time.monotonic()))
            item = Submit(i, time.time())
            items.append(item)
            tasks.append(asyncio.create_task(submit(http, url, body, item, args.give_up_after)))
            if script.done():
                script.result()  # a fault step failed: stop here with its error
        await asyncio.gather(*tasks)
        await script
    return items, wall_start


async def wait_ready(stack: Stack, timeout: float = 90) -> None:
    """Until the gateway accepts, and both workers have joined the group (a probe each way)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            for name, proc in [("gateway", stack.gateway), *stack.workers.items()]:
                if proc.poll() is not None:
                    raise ServiceError(f"{name} exited with code {proc.returncode} during start-up")
            try:
                async with http.get(f"{stack.url}/readyz") as resp:
                    ready = resp.status == 200
            except aiohttp.ClientError:
                ready = False
            if ready and stack.joined() == 2:
                return
            await asyncio.sleep(0.2)
    raise ServiceError(f"gateway ready and 2 workers joined: not within {timeout:.0f} s")


async def read_records(stack: Stack, ids: list[str]) -> dict[str, dict]:
    redis = connect_redis(stack.redis.url)
    keys = Keys(stack.prefix)
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for request_id in ids:
                pipe.hgetall(keys.request(request_id))
            return dict(zip(ids, await pipe.execute()))
    finally:
        await redis.aclose()


async def stored_ids(stack: Stack) -> list[str]:
    redis = connect_redis(stack.redis.url)
    prefix = Keys(stack.prefix).request("")
    try:
        return [key[len(prefix):] async for key in redis.scan_iter(match=f"{prefix}*", count=1000)]
    finally:
        await redis.aclose()


async def drain(stack: Stack, ids: list[str], quiet_for: float) -> dict[str, dict]:
    """Records of `ids` once all are final, or once none has become final for `quiet_for` seconds."""
    last_final, last_progress = -1, time.monotonic()
    while True:
        records = await read_records(stack, ids)
        final = sum(r.get("status") in FINAL for r in records.values())
        if final == len(ids) or time.monotonic() - last_progress > quiet_for:
            return records
        if final != last_final:
            last_final, last_progress = final, time.monotonic()
        await asyncio.sleep(0.5)


# ---- the run and its report -----------------------------------------------------------


async def run(args: argparse.Namespace, stack: Stack) -> dict:
    info = machine()
    stack.start()
    log(f"waiting for the gateway and 2 workers (logs in {stack.tmp})")
    await wait_ready(stack)
    faults: list[Fault] = []
    log(f"load: {args.requests} requests at {args.rate:g}/s; faults from t={args.calm:g} s every {args.gap:g} s")
    items, load_start = await load(stack, args, faults)
    accepted = {item.request_id: item for item in items if item.request_id}
    log(f"load done: {len(accepted)} accepted; waiting for them to end")
    records = await drain(stack, list(accepted) + stack.long_ids, args.quiet_for)

    # Everything Redis holds under this run's prefix: did a refused request run? The
    # gateway cancels what it refuses, so a worker skips it; one that a worker claimed
    # in the instant between the broker's late ack and that cancel runs, but its
    # result is discarded (the record stays cancelled).
    others = await read_records(stack, sorted(set(await stored_ids(stack)) - set(accepted) - set(stack.long_ids)))
    refused_delivered = [i for i, r in others.items() if r.get("status") != "cancelled"]
    refused_discarded = [i for i, r in others.items() if r.get("status") == "cancelled" and int(r.get("attempts", 0))]

    events = _log_events(stack.tmp)
    finishes = Counter(event["request_id"] for _, event in events if event.get("event") == "request_finished")
    written = Counter(event["request_id"] for _, event in events
                      if event.get("event") == "request_finished" and event.get("written"))
    for fault in faults:
        assigned = [_ts(event) for path, event in events
                    if path.stem == fault.replacement and event.get("event") == "partitions_assigned"]
        if assigned:
            fault.serving_after = round(min(assigned) - (load_start + fault.at), 1)

    statuses = Counter(r.get("status", "missing") for r in records.values())
    reasons = Counter(f"{r.get('status')}: {r.get('error_type')}: {r.get('error_message')}"
                      for r in records.values() if r.get("status") in ("failed", "expired", "cancelled"))
    attempts = Counter(int(r.get("attempts", 0)) for r in records.values() if r)

    # Latency by the phase its first attempt fell in: calm, then each fault until the next.
    # The calm phase stops `settle` seconds before the first fault, so that none of its
    # requests is still in flight when that fault hits; those of the last seconds get a row.
    def latency(name: str, begin: float, end: float = float("inf")) -> dict:
        seconds = [float(records[i]["finished_at"]) - item.first_attempt for i, item in accepted.items()
                   if begin <= item.first_attempt - load_start < end and records[i].get("finished_at")]
        return {"phase": name, "from_s": begin, "requests": len(seconds), "p50_ms": ms(percentile(seconds, 50)),
                "p99_ms": ms(percentile(seconds, 99)), "max_ms": ms(max(seconds, default=None))}

    settle = min(5.0, args.calm / 2)
    bounds = [("no fault (calm)", 0.0), ("calm, in flight at the first fault", args.calm - settle)]
    bounds += [(f.name, f.at) for f in faults]
    phases = [latency(name, begin, bounds[n + 1][1] if n + 1 < len(bounds) else float("inf"))
              for n, (name, begin) in enumerate(bounds)]
    retried = [item for item in items if sum(item.refused.values())]
    return {
        "machine": info,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "faults": [vars(f) for f in faults],
        "submitted": len(items),
        "long_requests": len(stack.long_ids),
        "accepted": len(accepted),
        "gave_up": Counter(item.gave_up for item in items if item.gave_up),
        "submits_retried": len(retried),
        "refusals": sum((item.refused for item in items), Counter()),
        "statuses": statuses,
        "failure_reasons": reasons,
        "lost": sum(r.get("status") not in FINAL for r in records.values()),
        "run_twice_to_completion": sum(n > 1 for n in finishes.values()),
        "written_twice": sum(n > 1 for n in written.values()),
        "finish_events_seen": sum(finishes.values()),
        "attempts": attempts,
        "refused_but_delivered": len(refused_delivered),
        "refused_run_and_discarded": len(refused_discarded),
        "refused_left_cancelled": len(others),
        "phases": phases,
        "fault_window": latency("fault window", args.calm),
    }


def describe(fault: dict) -> str:
    parts = [f"{fault['took']:.1f} s"] + ([fault["note"]] if fault["note"] else [])
    if fault["serving_after"] is not None:
        parts.append(f"its replacement first given partitions {fault['serving_after']:.1f} s after it began")
    return ", ".join(parts)


def report(result: dict) -> str:
    cfg, m = result["config"], result["machine"]
    calm = result["phases"][0]
    window = result["fault_window"]
    fail = result["statuses"].get("failed", 0) + result["statuses"].get("expired", 0)
    refusals = ", ".join(f"{n} {k}" for k, n in result["refusals"].most_common()) or "none"
    attempts = ", ".join(f"{n} × {k}" for k, n in sorted(result["attempts"].items()))
    rows = [
        ("requests submitted", result["submitted"], f"+ {result['long_requests']} long ones in the scale-down"),
        ("accepted (202)", result["accepted"], "all, after retries"),
        ("submits retried after a 503 / no answer", f"{result['submits_retried']} ({refusals})", ""),
        ("given up by the client", sum(result["gave_up"].values()), "0"),
        ("succeeded", result["statuses"].get("succeeded", 0), "= accepted + long ones"),
        ("failed / expired", fail, "0"),
        ("lost (accepted, never final)", result["lost"], "0"),
        ("run twice to completion", result["run_twice_to_completion"], "0"),
        ("written twice", result["written_twice"], "0"),
        ("record attempts (runs begun per request)", attempts, "> 1 only where SIGKILL cut a run"),
        ("refused (503) but run to a result", result["refused_but_delivered"], "0"),
        ("refused (503), started by a worker, result discarded", result["refused_run_and_discarded"],
         "rare: the broker acked just after the gateway's timeout"),
        (f"e2e p50 / p99 / max, no fault ({calm['requests']} requests)",
         f"{calm['p50_ms']} / {calm['p99_ms']} / {calm['max_ms']} ms", ""),
        (f"e2e p50 / p99 / max, fault window ({window['requests']} requests)",
         f"{window['p50_ms']} / {window['p99_ms']} / {window['max_ms']} ms", ""),
    ]
    rows += [(f"  submitted in phase \"{p['phase']}\" (from t={p['from_s']:.0f} s, {p['requests']} requests)",
              f"{p['p50_ms']} / {p['p99_ms']} / {p['max_ms']} ms", "") for p in result["phases"][1:]]
    lines = [
        f"machine: {m['nproc']} CPUs ({m['cpu_model']}), load average at start {m['loadavg_at_start'][0]:.2f}",
        f"load: {cfg['requests']} requests at {cfg['rate']:g}/s, echo {cfg['words']} tokens at "
        f"{cfg['token_delay_ms']:g} ms/token, 2 workers, 1 gateway; e2e = first submit attempt → record finished_at",
        "faults: " + "; ".join(f"t={f['at']:.0f} s {f['name']} ({describe(f)})" for f in result["faults"]),
        "",
        "| metric | value | expected |",
        "|---|---|---|",
        *(f"| {name} | {value} | {expected} |" for name, value, expected in rows),
    ]
    if result["failure_reasons"]:
        lines += ["", "failure reasons:", *(f"  {n} × {why}" for why, n in result["failure_reasons"].most_common())]
    if not result["finish_events_seen"]:
        lines += ["", "note: no `request_finished` events in the worker logs, so 'run twice' could not be counted"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests to submit (2000)")
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second, steady (20)")
    parser.add_argument("--words", type=int, default=8, help="prompt words = echo tokens per request (8)")
    parser.add_argument("--token-delay-ms", type=float, default=20.0, help="echo engine time per token (20)")
    parser.add_argument("--calm", type=float, default=25.0, help="seconds of load before the first fault (25)")
    parser.add_argument("--gap", type=float, default=15.0, help="seconds between faults (15)")
    parser.add_argument("--restart-after", type=float, default=2.0, help="killed worker restarted after (2 s)")
    parser.add_argument("--grace", type=float, default=30.0, help="SIGTERMed worker's grace period (30 s)")
    parser.add_argument("--redis-down", type=float, default=3.0, help="seconds Redis stays down (3)")
    parser.add_argument("--broker-pause", type=float, default=8.0, help="seconds the broker stays paused (8)")
    parser.add_argument("--long-requests", type=int, default=6,
                        help="long requests running through the scale-down step (6)")
    parser.add_argument("--long-words", type=int, default=300,
                        help="their tokens (300: 6 s at the default token delay)")
    parser.add_argument("--give-up-after", type=float, default=60.0, help="a client stops retrying after (60 s)")
    parser.add_argument("--quiet-for", type=float, default=30.0,
                        help="after the load, stop waiting once nothing has ended for this long (30 s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (child logs)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM as Ctrl-C, so that `finally` stops every child either way.
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    stack = Stack(args, Path(tempfile.mkdtemp(prefix="llmq-chaos-")))
    finished = False
    try:
        result = asyncio.run(run(args, stack))
        print(report(result), flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        finished = True
    finally:
        stack.close(keep=args.keep or not finished)  # a failed run keeps the children's logs
    return 0


if __name__ == "__main__":
    sys.exit(main())
