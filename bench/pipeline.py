"""Pipeline benchmark: gateway overhead against a bare floor, and end-to-end throughput and latency.

    python -m bench.pipeline [--tracing [--sample-ratio R ...]] [--admission] [--rounds N] [--e2e-rounds N]
                             [--duration S] [--json out.json]

One run starts its own broker (Tansu) and redis-server on free loopback ports
in a temporary directory, then measures:

1. baseline: `bench.baseline_gateway`, the floor of a gateway's work (parse
   JSON, one HSET, one acknowledged produce, 202), under closed-loop load
   from `wrk -t1 -c<connections>`; accepted (2xx) requests/s;
2. gateway: the llmq `gateway` process under the same wrk load; accepted
   requests/s and the ratio gateway/baseline. No worker runs during 1 and 2,
   so neither server shares the CPUs with one. With --tracing, also a gateway
   per --sample-ratio (head sampling, parentbased_traceidratio; 1 = every
   trace) exporting to a local OTLP sink (bench.otlp_sink, which counts the
   spans: the report checks each sampled request's span arrived); with
   --admission, also a gateway with queue admission on (LLMQ_MAX_QUEUE_DEPTH
   set above any backlog it meets). The gateways take turns each round;
3. end to end, a fresh gateway + one echo `worker` on a new topic (with
   --tracing, again for each sample ratio, all of them taking turns for
   --e2e-rounds rounds; traced / untraced is the median of the rounds):
   (a) completed requests/s: N requests submitted by 64 concurrent aiohttp
       submitters, completions counted from the `{prefix}:done` pub/sub
       channel (published in the same Lua script that writes the result, so a
       message means the result is readable);
   (b) latency at a fixed offered rate: open loop (submits on a fixed
       schedule, whatever the answers), submit → result p50/p99, both times
       taken with time.perf_counter in this process.

Only the LLMQ_* settings that wire the processes together are set; every other
setting keeps its default (or what the caller's environment says: such
overrides are printed with the results). A benchmark, never part of the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from deploy.devstack import ServiceError, free_port, python_env, start_broker, start_redis, wait_for_port

REPO = Path(__file__).resolve().parents[1]
BODY = {"input": {"prompt": "hello world from the bench"}, "params": {"max_tokens": 8}}
BODY_BYTES = json.dumps(BODY).encode()
JSON_CT = {"Content-Type": "application/json"}

# wrk posts the same body on every request. No response() callback: that would
# make wrk run Lua per response, and with one thread wrk shares the two cores
# with the servers it measures; it costs the same for both sides, but less is better.
WRK_SCRIPT = f"""
wrk.method = "POST"
wrk.body = '{json.dumps(BODY)}'
wrk.headers["Content-Type"] = "application/json"
"""

# The settings the bench sets for its llmq processes; everything else is default.
WIRING = ("LLMQ_KAFKA_BOOTSTRAP", "LLMQ_REDIS_URL", "LLMQ_REQUEST_TOPIC", "LLMQ_CONSUMER_GROUP",
          "LLMQ_REDIS_PREFIX", "LLMQ_HTTP_PORT", "LLMQ_ENGINE", "LLMQ_LOG_LEVEL", "LLMQ_AUTH")


# ---- child processes -----------------------------------------------------------


class Children:
    """Every process the bench starts, stopped in reverse order whatever happens."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.services = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        # Own session: a Ctrl-C in the terminal reaches only the bench, which then
        # stops the children in order (workers drain, gateways close their producers).
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for _name, proc in reversed(self.procs):
            self.stop(proc)
        for service in reversed(self.services):
            service.stop()

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def console_script(name: str, module: str) -> list[str]:
    """The venv's console script (`gateway`, `worker`) if present, else `python -m module`."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _with_descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    return found


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds a process and its descendants have used so far; None: this process.

    CPU per request is the steadier number on a shared machine: a noisy
    neighbour moves requests/s a lot more than it moves what each request costs.
    Descendants count, so work a server hands to a helper process is not hidden.
    """
    if pid is None:
        return time.process_time()
    total = 0
    for each in _with_descendants(pid):
        try:
            fields = _stat_fields(each)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds used by each named process between start() and stop()."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self._at_start: dict[str, float] = {}

    def start(self) -> None:
        self._at_start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        return {name: cpu_seconds(pid) - self._at_start[name] for name, pid in self.pids.items()}


def http_status(method: str, url: str, body: bytes | None = None, timeout: float = 5) -> int:
    request = urllib.request.Request(url, data=body, method=method, headers=JSON_CT)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            resp.read()
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def accepted_so_far(base: str) -> int:
    """How many submits a gateway has answered 202, from its own /metrics."""
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(r'^llmq_gateway_http_requests_total\{[^}]*code="202"[^}]*\} ([0-9.e+]+)$', text, re.M)
    return int(float(match.group(1))) if match else 0


def sink_spans(sink_url: str) -> dict[str, int]:
    """Spans the OTLP sink has received so far, by span name."""
    with urllib.request.urlopen(f"{sink_url}/stats", timeout=5) as resp:
        return json.loads(resp.read())["spans_by_name"]


def wait_accepting(base: str, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    """Until a POST is answered 202: the server is up, and its producer knows the topic."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"{what} exited with code {proc.returncode} during start-up")
        if http_status("POST", f"{base}/v1/requests", BODY_BYTES) == 202:
            return
        time.sleep(0.2)
    raise ServiceError(f"{what} did not accept a request within {timeout:.0f} s")


# ---- closed-loop load: wrk -------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    seconds: float
    requests_per_s: float  # wrk's own "Requests/sec", errors included
    non_2xx: int
    socket_errors: int
    accepted_per_s: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    server_cpu_us_per_request: float | None = None


_UNIT_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _wrk_latency(output: str, pct: str) -> float | None:
    match = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
    return round(float(match.group(1)) * _UNIT_S[match.group(2)] * 1000, 3) if match else None


def run_wrk(url: str, script: Path, connections: int, seconds: int, server_pid: int | None = None) -> WrkResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "--latency",
            "-s", str(script), url]
    meter = CpuMeter({"server": server_pid}) if server_pid else None
    if meter:
        meter.start()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=seconds + 30)
    finally:
        # Also on Ctrl-C: subprocess.run would leave wrk unreaped (a zombie) there.
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with code {proc.returncode}: {(err or out).strip()[:500]}")
    server_cpu = meter.stop()["server"] if meter else None
    match = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", out)
    if match is None:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    total, elapsed = int(match.group(1)), float(match.group(2)) * _UNIT_S[match.group(3)]
    # wrk counts status >= 400 here; a POST to either server answers 202 or an error status.
    non_2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        requests=total,
        seconds=round(elapsed, 3),
        requests_per_s=float(m.group(1)) if (m := re.search(r"Requests/sec:\s+([\d.]+)", out)) else 0.0,
        non_2xx=non_2xx,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        accepted_per_s=round((total - non_2xx) / elapsed, 1),
        latency_p50_ms=_wrk_latency(out, "50"),
        latency_p99_ms=_wrk_latency(out, "99"),
        server_cpu_us_per_request=round(server_cpu * 1e6 / total, 1) if server_cpu is not None and total else None,
    )


# ---- end to end: Python client + pub/sub completions --------------------------------


def percentile(values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil(n * pct / 100)
    return ordered[int(rank) - 1]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


class Completions:
    """Completion times (perf_counter) per request id, from the `{prefix}:done` channel."""

    def __init__(self, redis: aioredis.Redis, channel: str) -> None:
        self.redis = redis
        self.channel = channel
        self.at: dict[str, float] = {}
        self._pubsub = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._pubsub = self.redis.pubsub()
        await self._pubsub.subscribe(self.channel)
        # subscribe() only sends the command: wait for Redis' confirmation, so
        # that no completion published after this returns can be missed.
        while True:
            message = await self._pubsub.get_message(timeout=5)
            if message is not None and message["type"] == "subscribe":
                break
        self._task = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        async for message in self._pubsub.listen():
            if message["type"] == "message":
                # Stamp on receipt; ids may arrive before their POST's answer does.
                self.at.setdefault(message["data"], time.perf_counter())

    async def wait_for(self, ids: list[str], timeout: float) -> int:
        """Until every id completed or `timeout` passed; how many completed."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self._task.done():
                self._task.result()  # the subscription failed: raise its error
            if all(i in self.at for i in ids):
                break
            await asyncio.sleep(0.02)
        return sum(i in self.at for i in ids)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._pubsub is not None:
            await self._pubsub.aclose()


async def post(http: aiohttp.ClientSession, url: str) -> tuple[int, str | None]:
    async with http.post(url, data=BODY_BYTES, headers=JSON_CT) as resp:
        payload = await resp.read()
        return resp.status, json.loads(payload)["id"] if resp.status == 202 else None


async def wait_worker(http, url: str, done: Completions, timeout: float = 60) -> float:
    """Seconds until a probe request completes: the worker has joined the group and works."""
    started = time.perf_counter()
    deadline = started + timeout
    while time.perf_counter() < deadline:
        _status, request_id = await post(http, url)
        if request_id is not None and await done.wait_for([request_id], min(5, deadline - time.perf_counter())):
            return time.perf_counter() - started
        if request_id is None:
            await asyncio.sleep(0.2)
    raise ServiceError(f"no probe request completed within {timeout:.0f} s (is the worker running?)")


async def throughput(http, url: str, done: Completions, redis, prefix: str, meter: CpuMeter,
                     total: int, concurrency: int, max_seconds: float) -> dict:
    """(a) As fast as `concurrency` closed-loop submitters can: completed requests/s end to end."""
    ids: list[str] = []
    refused: dict[int, int] = {}
    issued = 0

    async def submitter() -> None:
        nonlocal issued
        while issued < total and time.perf_counter() < stop_at:
            issued += 1
            status, request_id = await post(http, url)
            if request_id is not None:
                ids.append(request_id)
            else:
                refused[status] = refused.get(status, 0) + 1

    meter.start()
    first_submit = time.perf_counter()
    stop_at = first_submit + max_seconds
    await asyncio.gather(*(submitter() for _ in range(concurrency)))
    submitted_s = time.perf_counter() - first_submit
    completed = await done.wait_for(ids, timeout=30)
    cpu = meter.stop()
    last = max((done.at[i] for i in ids if i in done.at), default=first_submit)

    # Belt and braces: the results are really in Redis, and they succeeded.
    async with redis.pipeline(transaction=False) as pipe:
        for request_id in ids:
            pipe.hget(f"{prefix}:req:{request_id}", "status")
        statuses = await pipe.execute()
    return {
        "submitted": issued,
        "accepted": len(ids),
        "refused": refused,
        "accepted_per_s": round(len(ids) / submitted_s, 1),
        "completed": completed,
        "succeeded_in_redis": sum(s == "succeeded" for s in statuses),
        "seconds": round(last - first_submit, 3),
        "completed_per_s": round(completed / (last - first_submit), 1) if completed else 0.0,
        # Where the CPU went, per completed request: what caps requests/s on a small machine.
        "cpu_ms_per_request": {name: round(sec * 1000 / max(completed, 1), 3) for name, sec in cpu.items()},
    }


async def latency(http, url: str, done: Completions, redis, prefix: str, rate: float, seconds: float) -> dict:
    """(b) Open loop at `rate`/s: submit → result latency, same clock for both ends."""
    count = int(rate * seconds)
    sent: dict[str, float] = {}
    accepted_after: list[float] = []
    lateness: list[float] = []  # how far behind schedule each submit went out: the client's own health
    refused = 0

    async def one(scheduled: float) -> None:
        nonlocal refused
        submit = time.perf_counter()
        lateness.append(submit - scheduled)
        status, request_id = await post(http, url)
        if request_id is None:
            refused += 1
            return
        sent[request_id] = submit
        accepted_after.append(time.perf_counter() - submit)

    tasks = []
    start = time.perf_counter() + 0.05
    for i in range(count):
        scheduled = start + i / rate
        if (delay := scheduled - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(scheduled)))
    await asyncio.gather(*tasks)
    ids = list(sent)
    completed = await done.wait_for(ids, timeout=15)
    latencies = [done.at[i] - sent[i] for i in ids if i in done.at]

    # Where the time goes, from the record's own wall-clock stamps: the gateway's
    # submitted_at, the worker's started_at (claim) and finished_at (result).
    async with redis.pipeline(transaction=False) as pipe:
        for request_id in ids:
            pipe.hmget(f"{prefix}:req:{request_id}", "submitted_at", "started_at", "finished_at")
        stamps = [tuple(map(float, s)) for s in await pipe.execute() if all(s)]
    to_claim = [started - submitted for submitted, started, _ in stamps]
    to_finish = [finished - started for _, started, finished in stamps]

    return {
        "offered": count,
        "offered_per_s": rate,
        "accepted": len(ids),
        "refused": refused,
        "completed": completed,
        "p50_ms": ms(percentile(latencies, 50)),
        "p90_ms": ms(percentile(latencies, 90)),
        "p99_ms": ms(percentile(latencies, 99)),
        "max_ms": ms(max(latencies, default=None)),
        "accept_p50_ms": ms(percentile(accepted_after, 50)),
        "accept_p99_ms": ms(percentile(accepted_after, 99)),
        "gateway_to_claim_p50_ms": ms(percentile(to_claim, 50)),
        "gateway_to_claim_p99_ms": ms(percentile(to_claim, 99)),
        "claim_to_result_p50_ms": ms(percentile(to_finish, 50)),
        "client_lateness_p99_ms": ms(percentile(lateness, 99)),
    }


async def wrk_throughput(url: str, done: Completions, args: argparse.Namespace) -> dict:
    """Completed requests/s with wrk submitting (closed loop, `--connections`) instead of the
    Python submitters: wrk is C and costs the 2 cores far less per request, so more of them
    is left to the gateway and the worker. Completed/s = completions seen on the done
    channel / (last completion - start), after the backlog has drained."""
    script = Path(tempfile.mkdtemp(prefix="llmq-bench-wrk-")) / "post.lua"
    script.write_text(WRK_SCRIPT)
    seen_before = len(done.at)
    start = time.perf_counter()
    result = await asyncio.to_thread(run_wrk, url, script, args.connections, args.duration)
    accepted = result.requests - result.non_2xx - result.socket_errors
    # Drain: until every accepted request completed, or nothing completed for 5 s.
    last_count, last_progress = -1, time.perf_counter()
    while len(done.at) - seen_before < accepted and time.perf_counter() - last_progress < 5:
        if len(done.at) != last_count:
            last_count, last_progress = len(done.at), time.perf_counter()
        await asyncio.sleep(0.05)
    completed = len(done.at) - seen_before
    last = max(list(done.at.values())[seen_before:], default=start)
    return {"accepted": accepted, "completed": completed,
            "completed_per_s": round(completed / (last - start), 1) if last > start else 0.0}


async def end_to_end(base: str, redis_url: str, prefix: str, pids: dict[str, int | None],
                     args: argparse.Namespace) -> dict:
    url = f"{base}/v1/requests"
    redis = aioredis.from_url(redis_url, decode_responses=True)
    done = Completions(redis, f"{prefix}:done")
    connector = aiohttp.TCPConnector(limit=max(args.submitters, 64))  # a pooled connection per submitter
    try:
        await done.start()  # subscribed before the first submit
        async with aiohttp.ClientSession(connector=connector) as http:
            result = {"worker_ready_s": round(await wait_worker(http, url, done), 2)}
            result["throughput"] = await throughput(http, url, done, redis, prefix, CpuMeter(pids),
                                                    args.requests, args.submitters, args.duration)
            result["latency"] = await latency(http, url, done, redis, prefix, args.rate, args.latency_duration)
            result["throughput_wrk"] = await wrk_throughput(url, done, args)
            return result
    finally:
        await done.close()
        await redis.aclose()


# ---- the run ----------------------------------------------------------------------


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": model,
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
    }


def llmq_env(stack: dict, tag: str, port: int) -> dict[str, str]:
    """The wiring for one llmq process (or the baseline); every other setting stays default."""
    return python_env(
        LLMQ_KAFKA_BOOTSTRAP=stack["bootstrap"],
        LLMQ_REDIS_URL=stack["redis_url"],
        LLMQ_REQUEST_TOPIC=f"bench.{stack['run']}.{tag}",
        LLMQ_CONSUMER_GROUP=f"bench-{stack['run']}-{tag}",
        LLMQ_REDIS_PREFIX=f"bench-{stack['run']}-{tag}",
        LLMQ_HTTP_PORT=str(port),
        LLMQ_ENGINE="echo",
        LLMQ_LOG_LEVEL="warning",
        LLMQ_AUTH="false",  # the local mode of `make up`; keys are cached in-process when on
    )


def traced(env: dict[str, str], service: str, sink_url: str | None, ratio: float = 1.0) -> dict[str, str]:
    """`env` with OpenTelemetry export to the bench's OTLP sink turned on; with a
    `ratio` below 1, head sampling as a deployment sets it (the gateway decides by
    trace id, the worker follows its parent)."""
    if sink_url is None:
        return env
    env = {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": sink_url, "OTEL_SERVICE_NAME": service}
    if ratio < 1:
        env |= {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": str(ratio)}
    return env


def ratio_key(ratio: float) -> str:
    return f"{ratio:g}"


def sampled_note(ratio: float) -> str:
    return " (every trace sampled)" if ratio >= 1 else f" ({ratio:g} of traces sampled)"


def spans_all_arrived(spans: int, accepted: int, ratio: float) -> tuple[str, bool]:
    """The expected count of one span per sampled request, and whether `spans` meets it:
    all of them, or with sampling within 5 standard deviations of ratio x accepted."""
    if ratio >= 1:
        return "all", spans >= accepted
    slack = 5 * (accepted * ratio * (1 - ratio)) ** 0.5
    return f"≈ {ratio:g} × accepted", abs(spans - ratio * accepted) <= slack


def run_load(args: argparse.Namespace, children: Children, stack: dict, tmp: Path) -> dict:
    """1 + 2: baseline and gateway under the same wrk load, no worker running
    (with --tracing, also the gateway exporting its traces to the OTLP sink)."""
    base_port, gw_port = free_port(), free_port()
    baseline = children.spawn("baseline", [sys.executable, "-m", "bench.baseline_gateway", "--port", str(base_port)],
                              llmq_env(stack, "baseline", base_port))
    gateway = children.spawn("gateway-load", console_script("gateway", "gateway.main") + ["--port", str(gw_port)],
                             llmq_env(stack, "load", gw_port))
    servers = {"baseline": (baseline, f"http://127.0.0.1:{base_port}"),
               "gateway": (gateway, f"http://127.0.0.1:{gw_port}")}
    for i, ratio in enumerate(stack["sample_ratios"]):
        traced_port = free_port()
        env = traced(llmq_env(stack, f"load-traced-{i}", traced_port), "llmq-gateway", stack["sink_url"], ratio)
        proc = children.spawn(f"gateway-traced-{i}",
                              console_script("gateway", "gateway.main") + ["--port", str(traced_port)], env)
        servers[f"gateway_traced_{i}"] = (proc, f"http://127.0.0.1:{traced_port}")
    if args.admission:
        # Admission on (LagReader polling the lag once a second, a check per submit), with a
        # bound no backlog here reaches: what it costs, never what it refuses.
        port = free_port()
        env = {**llmq_env(stack, "load-admission", port), "LLMQ_MAX_QUEUE_DEPTH": str(10**9)}
        proc = children.spawn("gateway-admission", console_script("gateway", "gateway.main") + ["--port", str(port)],
                              env)
        servers["gateway_admission"] = (proc, f"http://127.0.0.1:{port}")
    for name, (proc, url) in servers.items():
        wait_accepting(url, proc, name)

    script = tmp / "post.lua"
    script.write_text(WRK_SCRIPT)
    results: dict = {name: [] for name in servers}
    # Alternate the two sides, so that a noisy neighbour's drift hits both alike.
    for r in range(args.rounds):
        for name, (proc, url) in servers.items():
            if args.warmup > 0:
                run_wrk(f"{url}/v1/requests", script, args.connections, args.warmup)
            result = run_wrk(f"{url}/v1/requests", script, args.connections, args.duration, proc.pid)
            results[name].append(asdict(result))
            log(f"round {r + 1} {name}: {result.accepted_per_s:.0f} accepted/s, "
                f"{result.server_cpu_us_per_request} µs CPU/request, p50 {result.latency_p50_ms} ms, "
                f"non-2xx {result.non_2xx}")
    accepted_traced = [accepted_so_far(servers[f"gateway_traced_{i}"][1]) for i in range(len(stack["sample_ratios"]))]
    # Stopped before the end-to-end phase, so they don't share the CPUs with it.
    for proc, _url in servers.values():
        children.stop(proc)  # a traced gateway flushes its spans on the way out
    spans = sink_spans(stack["sink_url"]) if stack["sample_ratios"] else {}
    results["traced_gateways"] = {
        ratio_key(ratio): {
            "runs": results.pop(f"gateway_traced_{i}"),
            "accepted": accepted_traced[i],
            "publish_spans_at_sink": spans.get(f"publish bench.{stack['run']}.load-traced-{i}", 0),
        } for i, ratio in enumerate(stack["sample_ratios"])}
    return results


def run_e2e(args: argparse.Namespace, children: Children, stack: dict, tag: str = "e2e",
            sink_url: str | None = None, ratio: float = 1.0) -> dict:
    """3: a fresh gateway and one echo worker, on a fresh topic (no backlog from the load phase);
    with `sink_url`, both export their traces there, sampled at `ratio`."""
    port = free_port()
    env = llmq_env(stack, tag, port)
    gateway = children.spawn(f"gateway-{tag}", console_script("gateway", "gateway.main") + ["--port", str(port)],
                             traced(env, "llmq-gateway", sink_url, ratio))
    worker = children.spawn(f"worker-{tag}", console_script("worker", "workers.main"),
                            traced(env, "llmq-worker", sink_url, ratio))
    url = f"http://127.0.0.1:{port}"
    wait_accepting(url, gateway, "e2e gateway")
    log("waiting for the worker to join its group")
    pids = {"gateway": gateway.pid, "worker": worker.pid, "bench client": None,
            "redis": stack["redis_pid"], "broker": stack["broker_pid"]}
    result = asyncio.run(end_to_end(url, stack["redis_url"], env["LLMQ_REDIS_PREFIX"], pids, args))
    if worker.poll() is not None:
        raise ServiceError(f"the worker exited with code {worker.returncode}")
    log(f"{tag}: {result['throughput']['completed_per_s']:.0f} completed/s, "
        f"latency p50 {result['latency']['p50_ms']} ms")
    accepted = accepted_so_far(url)
    children.stop(gateway)  # each flushes its spans on the way out
    children.stop(worker)
    if sink_url:
        spans, topic = sink_spans(sink_url), env["LLMQ_REQUEST_TOPIC"]
        result["spans"] = {"accepted": accepted, "publish_spans_at_sink": spans.get(f"publish {topic}", 0),
                           "process_spans_at_sink": spans.get(f"process {topic}", 0)}
    return result


def run_e2e_rounds(args: argparse.Namespace, children: Children, stack: dict) -> dict:
    """3, untraced and at each sample ratio, taking turns round by round so that a noisy
    neighbour's drift hits them alike; the first untraced run is the one reported in full."""
    untraced: list[dict] = []
    traced_runs: dict[str, list[dict]] = {ratio_key(ratio): [] for ratio in stack["sample_ratios"]}
    rounds = args.e2e_rounds if stack["sample_ratios"] else 1
    for r in range(rounds):
        untraced.append(run_e2e(args, children, stack, f"e2e-{r}"))
        for i, ratio in enumerate(stack["sample_ratios"]):
            traced_runs[ratio_key(ratio)].append(
                run_e2e(args, children, stack, f"e2e-traced-{i}-{r}", stack["sink_url"], ratio))
    return {"e2e": untraced[0], "e2e_untraced_runs": untraced, "e2e_traced": traced_runs}


def run(args: argparse.Namespace, children: Children, tmp: Path) -> dict:
    info = machine()
    # Children inherit this environment: say so when it changes what is measured
    # (an LLMQ_* setting off its default, or OTEL_* turning tracing on).
    overrides = {k: v for k, v in sorted(os.environ.items())
                 if k.startswith(("LLMQ_", "OTEL_")) and k not in WIRING}
    log(f"starting broker and redis in {tmp}")
    broker = start_broker(free_port(), tmp / "broker.log")
    children.services.append(broker)
    redis_service = start_redis(free_port(), tmp / "redis")
    children.services.append(redis_service)
    stack = {"run": uuid.uuid4().hex[:8], "bootstrap": broker.url, "redis_url": redis_service.url,
             "broker_pid": broker.proc.pid, "redis_pid": redis_service.proc.pid, "sink_url": None,
             "sample_ratios": args.sample_ratio if args.tracing else []}
    if args.tracing:
        sink_port = free_port()
        sink = children.spawn("otlp-sink", [sys.executable, "-m", "bench.otlp_sink", "--port", str(sink_port)],
                              python_env())
        stack["sink_url"] = f"http://127.0.0.1:{sink_port}"
        wait_for_port(sink_port, 30, sink, "OTLP sink")

    result: dict = {
        "machine": info,
        "config": {
            "phases": args.phases, "duration_s": args.duration, "warmup_s": args.warmup,
            "connections": args.connections, "rounds": args.rounds, "load_generator": "wrk -t1 (closed loop)",
            "worker_during_load": False, "e2e_requests": args.requests, "e2e_submitters": args.submitters,
            "latency_rate_per_s": args.rate, "latency_duration_s": args.latency_duration,
            "env_overrides": overrides, "tracing_compared": args.tracing,
            "trace_sample_ratios": stack["sample_ratios"], "e2e_rounds": args.e2e_rounds,
            "admission_compared": args.admission,
        },
    }
    if args.phases in ("all", "load"):
        result.update(run_load(args, children, stack, tmp))
    if args.phases in ("all", "e2e"):
        result.update(run_e2e_rounds(args, children, stack))
    info["loadavg_at_end"] = os.getloadavg()
    return result


# ---- the report -------------------------------------------------------------------


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass
class Row:
    metric: str
    value: object
    target: str = "—"
    ok: bool | None = None

    @property
    def verdict(self) -> str:
        return "—" if self.ok is None else ("pass" if self.ok else "FAIL")


def load_rows(result: dict) -> list[Row]:
    cfg = result["config"]
    load = f"wrk -t1 -c{cfg['connections']}, {cfg['duration_s']:g} s" + (
        f", median of {cfg['rounds']}" if cfg["rounds"] > 1 else "") + ", no worker"
    out = []
    for name in ("baseline", "gateway"):
        runs = result[name]
        out += [
            Row(f"{name} accepted req/s ({load})", f"{median([r['accepted_per_s'] for r in runs]):.0f}"),
            Row(f"{name} latency p50 / p99 (wrk)", f"{median([r['latency_p50_ms'] or 0 for r in runs]):.1f} / "
                                                   f"{median([r['latency_p99_ms'] or 0 for r in runs]):.1f} ms"),
            Row(f"{name} CPU per request (server process)",
                f"{median([r['server_cpu_us_per_request'] or 0 for r in runs]):.0f} µs"),
        ]
    base = median([r["accepted_per_s"] for r in result["baseline"]])
    gw = median([r["accepted_per_s"] for r in result["gateway"]])
    ratio = gw / base if base else 0.0
    errors = sum(r["non_2xx"] + r["socket_errors"] for name in ("baseline", "gateway") for r in result[name])
    out += [
        Row("gateway / baseline (accepted req/s)", f"{ratio:.2f}", "≥ 0.80", ratio >= 0.80),
        Row("non-2xx + socket errors under wrk load", errors, "0", errors == 0),
    ]
    for key, traced_gw in result.get("traced_gateways", {}).items():
        out += traced_gateway_rows(float(key), traced_gw, result["gateway"], load)
    if "gateway_admission" in result:
        admission_rate = median([r["accepted_per_s"] for r in result["gateway_admission"]])
        admission_ratio = admission_rate / gw if gw else 0.0
        out += [
            Row(f"gateway with admission on (LLMQ_MAX_QUEUE_DEPTH) accepted req/s ({load})", f"{admission_rate:.0f}"),
            Row("gateway with admission on CPU per request",
                f"{median([r['server_cpu_us_per_request'] or 0 for r in result['gateway_admission']]):.0f} µs"),
            Row("gateway admission on / off (accepted req/s)", f"{admission_ratio:.2f}"),
        ]
    return out


def traced_gateway_rows(ratio: float, traced_gw: dict, untraced_runs: list[dict], load: str) -> list[Row]:
    """The gateway at one sample ratio against the untraced gateway of the same rounds:
    the ratio of medians, and each round's own ratio (the range)."""
    runs = traced_gw["runs"]
    rate, plain = median([r["accepted_per_s"] for r in runs]), median([r["accepted_per_s"] for r in untraced_runs])
    ratio_of_medians = rate / plain if plain else 0.0
    target = TRACED_GATEWAY_TARGET if ratio < 1 else None
    return [
        Row(f"gateway with tracing on{sampled_note(ratio)} accepted req/s ({load})", f"{rate:.0f}"),
        Row(f"gateway{sampled_note(ratio)} CPU per request (server process)",
            f"{median([r['server_cpu_us_per_request'] or 0 for r in runs]):.0f} µs"),
        Row(f"gateway traced{sampled_note(ratio)} / untraced (accepted req/s)",
            f"{ratio_of_medians:.2f}{per_round(runs, untraced_runs, lambda r: r['accepted_per_s'])}",
            f"≥ {target:.2f}" if target else "—", ratio_of_medians >= target if target else None),
        Row(f"traced gateway{sampled_note(ratio)}: publish spans at the OTLP sink / requests accepted",
            f"{traced_gw['publish_spans_at_sink']} / {traced_gw['accepted']}",
            *spans_all_arrived(traced_gw["publish_spans_at_sink"], traced_gw["accepted"], ratio)),
    ]


# Traced / untraced targets with head sampling below 1 (at 1, every trace, the figure is reported).
TRACED_GATEWAY_TARGET = 0.95
TRACED_E2E_TARGET = 0.90


def per_round(traced_runs: list[dict], untraced_runs: list[dict], rate: Callable[[dict], float]) -> str:
    """" (lo–hi per round)": each round's traced / untraced, when there was more than one."""
    ratios = [rate(t) / rate(u) for t, u in zip(traced_runs, untraced_runs) if rate(u)]
    return f" ({min(ratios):.2f}–{max(ratios):.2f} per round)" if len(ratios) > 1 else ""


def e2e_rows(result: dict) -> list[Row]:
    cfg, nproc = result["config"], result["machine"]["nproc"]
    t, lat, w = result["e2e"]["throughput"], result["e2e"]["latency"], result["e2e"]["throughput_wrk"]
    cpu = t["cpu_ms_per_request"]
    cpu_total = sum(cpu.values())
    # wrk counts only the answers it read before its time ran out; requests still in
    # flight then were accepted too, so completions may exceed its count.
    lost = (t["accepted"] - t["completed"]) + (lat["accepted"] - lat["completed"]) + max(0, w["accepted"] - w["completed"])
    p50 = lat["p50_ms"]
    return [
        Row(f"e2e completed req/s ({t['accepted']} requests, {cfg['e2e_submitters']} submitters, 1 echo worker)",
            f"{t['completed_per_s']:.0f}", "≥ 1000", t["completed_per_s"] >= 1000),
        Row("e2e submit rate reached (accepted req/s)", f"{t['accepted_per_s']:.0f}"),
        Row(f"e2e completed req/s, wrk -t1 -c{cfg['connections']} submitting for {cfg['duration_s']} s "
            f"({w['completed']} of {w['accepted']} accepted)", f"{w['completed_per_s']:.0f}", "≥ 1000",
            w["completed_per_s"] >= 1000),
        Row("e2e CPU per completed request, by process",
            " · ".join(f"{name} {v:.2f}" for name, v in cpu.items()) + f" = {cpu_total:.2f} ms"),
        Row(f"e2e ceiling from CPU alone ({nproc} cores / CPU per request)",
            f"{nproc * 1000 / cpu_total:.0f} req/s" if cpu_total else "—"),
        Row(f"e2e latency p50 submit→result (open loop {lat['offered_per_s']:g}/s)", f"{p50} ms", "≤ 15 ms",
            p50 is not None and p50 <= 15),
        Row("e2e latency p90 / p99 / max", f"{lat['p90_ms']} / {lat['p99_ms']} / {lat['max_ms']} ms"),
        Row("  of which: POST answered (202) p50 / p99", f"{lat['accept_p50_ms']} / {lat['accept_p99_ms']} ms"),
        Row("  of which: gateway record → worker claim p50 / p99",
            f"{lat['gateway_to_claim_p50_ms']} / {lat['gateway_to_claim_p99_ms']} ms"),
        Row("  of which: worker claim → result p50", f"{lat['claim_to_result_p50_ms']} ms"),
        Row("client lateness vs schedule p99 (the client's own health)", f"{lat['client_lateness_p99_ms']} ms"),
        Row("accepted but never completed (e2e)", lost, "0", lost == 0),
        Row("succeeded in Redis / accepted (e2e throughput)", f"{t['succeeded_in_redis']} / {t['accepted']}",
            "all", t["succeeded_in_redis"] == t["accepted"]),
    ]


def tracing_rows(result: dict) -> list[Row]:
    untraced = result["e2e_untraced_runs"]
    rounds = len(untraced)
    plain = median([u["throughput"]["completed_per_s"] for u in untraced])
    out = []
    if rounds > 1:
        out.append(Row(f"e2e completed req/s untraced, median of {rounds} rounds", f"{plain:.0f}"))
    for key, runs in result["e2e_traced"].items():
        ratio = float(key)
        rate = median([t["throughput"]["completed_per_s"] for t in runs])
        ratio_of_medians = rate / plain if plain else 0.0
        spans = [t["spans"] for t in runs]
        at_sink = sum(min(s["publish_spans_at_sink"], s["process_spans_at_sink"]) for s in spans)
        accepted = sum(s["accepted"] for s in spans)
        target = TRACED_E2E_TARGET if ratio < 1 else None
        out += [
            Row(f"e2e completed req/s with tracing on{sampled_note(ratio)} (gateway + worker exporting)"
                + (f", median of {rounds} rounds" if rounds > 1 else ""), f"{rate:.0f}"),
            Row(f"e2e traced{sampled_note(ratio)} / untraced (completed req/s)",
                f"{ratio_of_medians:.2f}"
                f"{per_round(runs, untraced, lambda r: r['throughput']['completed_per_s'])}",
                f"≥ {target:.2f}" if target else "—", ratio_of_medians >= target if target else None),
            Row(f"e2e CPU per completed request with tracing on{sampled_note(ratio)}, gateway · worker "
                "(untraced in brackets)",
                f"{median_cpu(runs, 'gateway'):.3f} ({median_cpu(untraced, 'gateway'):.3f}) · "
                f"{median_cpu(runs, 'worker'):.3f} ({median_cpu(untraced, 'worker'):.3f}) ms"),
            Row(f"e2e latency p50 with tracing on{sampled_note(ratio)}",
                f"{median([t['latency']['p50_ms'] or 0 for t in runs]):.2f} ms"),
            Row(f"e2e traced{sampled_note(ratio)}: publish / process spans at the OTLP sink / requests accepted",
                " + ".join(f"{s['publish_spans_at_sink']} / {s['process_spans_at_sink']} / {s['accepted']}"
                           for s in spans),
                *spans_all_arrived(at_sink, accepted, ratio)),
        ]
    return out


def median_cpu(runs: list[dict], process: str) -> float:
    """Median CPU ms per completed request of one process over end-to-end runs."""
    return median([r["throughput"]["cpu_ms_per_request"][process] for r in runs])


def report(result: dict) -> tuple[str, list[Row]]:
    m, cfg = result["machine"], result["config"]
    table = ((load_rows(result) if "gateway" in result else []) + (e2e_rows(result) if "e2e" in result else [])
             + (tracing_rows(result) if result.get("e2e_traced") else []))
    lines = [
        f"machine: {m['nproc']} CPUs ({m['cpu_model']}), python {m['python']}, "
        f"load average at start {m['loadavg_at_start'][0]:.2f}, at end {m['loadavg_at_end'][0]:.2f}",
        "settings: llmq defaults" + (f", with environment overrides {cfg['env_overrides']}"
                                     if cfg["env_overrides"] else " (no LLMQ_*/OTEL_* overrides beyond the wiring)"),
    ]
    if "gateway" in result:
        lines.append("wrk runs: no worker running (neither for the baseline nor for the gateway)")
    if "e2e" in result:
        lines.append(f"e2e: 1 gateway + 1 echo worker; worker ready {result['e2e']['worker_ready_s']} s after start")
    lines += [
        "",
        "| metric | value | target | result |",
        "|---|---|---|---|",
        *(f"| {r.metric} | {r.value} | {r.target} | {r.verdict} |" for r in table),
    ]
    return "\n".join(lines), table


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _whole_seconds(text: str) -> int:
    seconds = int(text)
    if seconds < 1:
        raise argparse.ArgumentTypeError("at least 1 second")
    return seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # Whole seconds: wrk takes no fractions.
    parser.add_argument("--duration", type=_whole_seconds, default=10,
                        help="seconds of each measured wrk run; also caps the e2e throughput submits (10)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (32)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of wrk warm-up before each run, 0 for none (2)")
    parser.add_argument("--rounds", type=int, default=1, help="baseline/gateway wrk rounds, alternated (1)")
    parser.add_argument("--requests", type=int, default=5000, help="e2e throughput: requests to submit (5000)")
    parser.add_argument("--submitters", type=int, default=64, help="e2e throughput: concurrent submitters (64)")
    parser.add_argument("--rate", type=float, default=200.0, help="e2e latency: offered requests/s (200)")
    parser.add_argument("--latency-duration", type=float, default=10.0, help="e2e latency: seconds (10)")
    parser.add_argument("--phases", choices=["all", "load", "e2e"], default="all",
                        help="load: wrk baseline vs gateway only; e2e: gateway + worker only (all)")
    parser.add_argument("--tracing", action="store_true",
                        help="also run the gateway (and e2e) with OpenTelemetry export to a local OTLP sink")
    parser.add_argument("--sample-ratio", type=float, action="append",
                        help="with --tracing: the share of traces sampled (parentbased_traceidratio), 1 = every one, "
                             "0 = none (what an unsampled request costs); repeat it to compare several in one run (1)")
    parser.add_argument("--e2e-rounds", type=int, default=1,
                        help="with --tracing: end-to-end rounds, untraced and each sample ratio taking turns (1)")
    parser.add_argument("--admission", action="store_true",
                        help="also run the gateway with queue admission on (LLMQ_MAX_QUEUE_DEPTH) under the wrk load")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (child logs)")
    args = parser.parse_args(argv)
    args.sample_ratio = args.sample_ratio or [1.0]
    if any(not 0 <= ratio <= 1 for ratio in args.sample_ratio):
        parser.error("--sample-ratio: a share in [0, 1]")
    return args


def _interrupt(_signum, _frame) -> None:
    # SIGTERM as Ctrl-C, so that main's `finally` stops every child either way.
    # Re-sent as SIGINT rather than raised here: inside asyncio.run, SIGINT
    # cancels the main task cleanly instead of interrupting whichever task runs.
    os.kill(os.getpid(), signal.SIGINT)


def run_and_report(run: Callable[[Children, Path], dict], report: Callable[[dict], str], json_path: Path | None,
                   keep: bool = False, prefix: str = "llmq-bench-") -> int:
    """A benchmark's whole run: `run(children, tmp)` in with_children, its report
    printed, its result also written to `json_path` when given."""

    def body(children: Children, tmp: Path) -> None:
        result = run(children, tmp)
        print(report(result), flush=True)
        if json_path:
            json_path.write_text(json.dumps(result, indent=2) + "\n")

    return with_children(body, keep, prefix)


def with_children(body: Callable[[Children, Path], None], keep: bool = False, prefix: str = "llmq-bench-") -> int:
    """Run `body(children, tmp)` in a fresh temporary directory, then stop every child
    it started, whatever happens; the exit status: 0, 1 (a child failed: its log's
    last lines printed, the directory kept) or 130 (interrupted)."""
    # Ctrl-C works even when started from a script as a background job (which
    # inherits SIGINT ignored); SIGTERM does the same as Ctrl-C.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    children = Children(tmp)
    try:
        body(children, tmp)
        return 0
    except (ServiceError, subprocess.SubprocessError, RuntimeError) as exc:
        keep = True  # the children's logs say why
        print(f"bench: {exc}", file=sys.stderr)
        for name, _proc in children.procs:
            if tail := children.log_tail(name):
                print(f"--- {name}.log (last lines) ---\n{tail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        children.stop_all()
        if keep:
            print(f"bench: logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None and args.phases != "e2e":
        print("bench: wrk not found (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2

    def body(children: Children, tmp: Path) -> None:
        result = run(args, children, tmp)
        text, table = report(result)
        print(text, flush=True)
        if args.json:
            result["table"] = [asdict(r) | {"result": r.verdict} for r in table]
            args.json.write_text(json.dumps(result, indent=2) + "\n")

    return with_children(body, args.keep)


if __name__ == "__main__":
    sys.exit(main())
