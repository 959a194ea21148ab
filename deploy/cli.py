"""`llmq`: the local stack and a small client.

  llmq up            broker, Redis, gateway and the scaler with its workers (what `make up` runs)
  llmq submit TEXT   submit a prompt to a running gateway and wait for the answer
  llmq get ID        a request's record (--wait N: until it finishes); llmq cancel ID
  llmq optimize MODEL --strategy TYPE [--set KEY=VALUE ...] [--wait]   an optimization job
  llmq optimize --get JOB_ID [--wait] | --list | --cancel JOB_ID
  llmq build-model   build the tiny local model `make up` serves
  llmq schema        rewrite the request message's JSON Schema file
  llmq keys create NAME | list | revoke NAME    API keys, in the Redis at LLMQ_REDIS_URL
  llmq keys webhook-secret NAME                 the secret that signs NAME's webhooks
  llmq recommend batch | memory | training      settings from measurements on this machine
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from deploy.client import Client, ClientError, ClientSettings
from deploy.devstack import Service, ServiceError, pick_port, python_env, start_broker, start_redis
from deploy.settings import StackSettings
from scaler.settings import ScalerSettings

STATE_DIR = Path(".llmq")
TRAINER_METRICS_PORT = 9500  # the first trainer's /metrics port under `llmq up`


def _wait_ready(url: str, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise ServiceError("a process of the stack exited during start-up (see its log above)")
        if Client(url, None, timeout=2).ready():
            return
        time.sleep(0.2)
    raise ServiceError(f"the gateway was not ready within {timeout:.0f} s")


def _wait_for_a_worker(settings: StackSettings, procs: list[subprocess.Popen], timeout: float = 180) -> None:
    """Until the worker group has a member with partitions: the first request won't wait then."""
    import asyncio

    from shared.kafka import make_admin

    async def wait() -> None:
        admin = make_admin(settings)
        await admin.start()
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if any(p.poll() is not None for p in procs):
                    raise ServiceError("a process of the stack exited during start-up (see its log above)")
                for response in await admin.describe_consumer_groups([settings.consumer_group]):
                    for _error, _group, state, _type, _protocol, members in response.groups:
                        if state == "Stable" and members:
                            return
                await asyncio.sleep(0.5)
            raise ServiceError(f"no worker joined group {settings.consumer_group!r} within {timeout:.0f} s")
        finally:
            await admin.close()

    asyncio.run(wait())


def up(_args: argparse.Namespace) -> int:
    settings = StackSettings()
    services: list[Service] = []
    children: list[subprocess.Popen] = []
    scaler_settings = ScalerSettings()
    stopping = False

    def request_stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        # 1) services: the user's own if LLMQ_* points at them, else embedded ones
        overrides: dict[str, object] = {}
        if "LLMQ_KAFKA_BOOTSTRAP" not in os.environ:
            (STATE_DIR / "logs").mkdir(parents=True, exist_ok=True)
            services.append(start_broker(pick_port(9092), STATE_DIR / "logs" / "broker.log"))
            overrides["kafka_bootstrap"] = services[-1].url
        if "LLMQ_REDIS_URL" not in os.environ:
            services.append(start_redis(pick_port(6379), STATE_DIR / "redis"))
            overrides["redis_url"] = services[-1].url
        if "LLMQ_AUTH" not in os.environ:
            overrides["auth"] = False  # local mode (the banner says so)
        if "LLMQ_WEBHOOK_ALLOW_PRIVATE" not in os.environ:
            overrides["webhook_allow_private"] = True  # local mode: a receiver on this machine
        if "LLMQ_ADAPTERS_DIR" not in os.environ and settings.quantize == "none":
            # Fine-tuned adapters are served from where the trainers publish them.
            adapters = settings.registry_dir / "adapters"
            adapters.mkdir(parents=True, exist_ok=True)
            overrides["adapters_dir"] = str(adapters)
        settings = settings.model_copy(update=overrides)

        # 2) the model: build the tiny local one on first run
        if settings.engine != "echo" and settings.model == StackSettings.model_fields["model"].default:
            from workers.tinymodel import build_tiny_model

            build_tiny_model(Path(settings.model))

        # 3) gateway and scaler, with the same settings; the scaler starts the
        #    workers (at least one by default, so the first request is fast)
        env = python_env(**settings.to_env())
        # One warm worker by default, so the first request is fast (LLMQ_SCALER_MIN=0: scale to zero).
        scaler_settings = ScalerSettings(**({} if "LLMQ_SCALER_MIN" in os.environ else {"min": 1}))
        children.append(subprocess.Popen([sys.executable, "-m", "gateway.main"], env=env))
        children.append(subprocess.Popen([sys.executable, "-m", "scaler.main", "--backend", "local",
                                          "--min", str(scaler_settings.min)], env=env))
        # Trainers (fine-tuning jobs) from zero, one at most: training takes the machine's cores.
        # Their /metrics ports from 9500, clear of the workers' (each scaler counts its own).
        trainer_env = {**env, "LLMQ_METRICS_PORT": str(TRAINER_METRICS_PORT)} if scaler_settings.worker_metrics_port \
            else env
        children.append(subprocess.Popen([sys.executable, "-m", "scaler.main", "--backend", "local", "--pool",
                                          "trainers", "--min", "0", "--max", "1"], env=trainer_env))
        url = f"http://{settings.http_host}:{settings.http_port}"
        _wait_ready(url, children)
        if scaler_settings.min > 0:
            print("llmq: waiting for the first worker (model load, joining the group) ...", file=sys.stderr, flush=True)
            _wait_for_a_worker(settings, children)
        print(_banner(settings, scaler_settings, url), flush=True)

        # 4) run until Ctrl-C or a child dies
        while not stopping:
            if any(p.poll() is not None for p in children):
                print("llmq: a process of the stack exited; stopping the rest", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    except ServiceError as exc:
        print(f"llmq up: {exc}", file=sys.stderr)
        return 1
    finally:
        # The scaler stops its workers on SIGTERM; each drains (finishes its batch,
        # commits, leaves the group) within the scaler's grace period.
        for proc in children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in children:
            try:
                proc.wait(30 + scaler_settings.grace_seconds)
            except subprocess.TimeoutExpired:
                proc.kill()
        for service in reversed(services):
            service.stop()
        print("llmq: stopped", file=sys.stderr)


def _banner(settings: StackSettings, scaler_settings: ScalerSettings, url: str) -> str:
    model = "echo" if settings.engine == "echo" else f"{settings.served_model_name} ({settings.model})"
    example = json.dumps({"input": {"prompt": "Hello"}, "params": {"max_tokens": 16}})
    return f"""
llmq is up.
  gateway   {url}   (API: {url}/openapi.json, metrics: {url}/metrics)
  broker    {settings.kafka_bootstrap}   topic {settings.request_topic}
  redis     {settings.redis_url}
  workers   engine {settings.engine}, model {model}
  scaler    local, {scaler_settings.min} to {scaler_settings.max} workers from the queue's depth \
(LLMQ_SCALER_MIN, LLMQ_SCALER_MAX, ...; `scaler --help`)
  trainers  0 to 1, started when a fine-tuning job is queued; outputs in {settings.registry_dir}
  auth      {"on (keys: llmq keys create NAME)" if settings.auth else "off (local mode)"}
  webhooks  {"to any address (local mode)" if settings.webhook_allow_private else "to public addresses only"}

Try:
  curl -s -X POST {url}/v1/requests -H 'Content-Type: application/json' -d '{example}'
  curl -s '{url}/v1/requests/<id>?wait=10'

Ctrl-C stops everything.
"""


def _client(args: argparse.Namespace) -> Client:
    settings = ClientSettings()
    key = args.api_key or (settings.api_key.get_secret_value() if settings.api_key else None)
    return Client(args.url or settings.base_url, key)


def _show(view: dict, text_only: bool) -> None:
    if text_only:
        output = view.get("output") or {}
        print(output.get("text", ""))
    else:
        print(json.dumps(view, indent=2))


def _outcome(view: dict) -> int:
    """0 once succeeded; 1 for any other end, or still unfinished."""
    return 0 if view.get("status") == "succeeded" else 1


def submit(args: argparse.Namespace) -> int:
    body: dict = {"input": {"prompt": args.prompt}, "params": {"max_tokens": args.max_tokens,
                                                               "temperature": args.temperature}}
    if args.model:
        body["model"] = args.model
    client = _client(args)
    accepted = client.submit(body)
    view = client.wait_final(accepted["id"], args.wait) if args.wait > 0 else accepted
    _show(view, args.text)
    return _outcome(view) if args.wait > 0 else 0


def get(args: argparse.Namespace) -> int:
    view = _client(args).wait_final(args.id, args.wait)
    _show(view, args.text)
    return _outcome(view)


def cancel(args: argparse.Namespace) -> int:
    _show(_client(args).cancel(args.id), text_only=False)
    return 0


OPTIMIZE_POLL_SECONDS = 2.0
FINAL_JOB = ("succeeded", "failed", "cancelled")


class UsageError(ValueError):
    """A command line that can't be sent: exit 2 with this one line."""


def strategy_settings(pairs: list[str]) -> dict:
    """`--set` KEY=VALUE pairs as the strategy's settings: VALUE is read as JSON where it is
    JSON (4, 0.5, true, {"n_epochs": 2}), else as text; a dotted KEY nests (recovery.n_epochs=2)."""
    settings: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {pair!r}: give KEY=VALUE (e.g. --set sparsity=0.5)")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        *parents, last = key.split(".")
        node = settings
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {pair!r}: {name!r} is already set to a value, not settings")
        node[last] = value
    return settings


def _follow(client: Client, job: dict) -> dict:
    """The job once it ended, its status changes on stderr meanwhile."""
    shown = None
    while job["status"] not in FINAL_JOB:
        if job["status"] != shown:
            shown = job["status"]
            print(f"{job['id']}: {shown}", file=sys.stderr, flush=True)
        time.sleep(OPTIMIZE_POLL_SECONDS)
        job = client.optimization(job["id"])
    return job


def _ended(job: dict) -> int:
    """0 for a succeeded job (its served name on stderr); 1 for any other end, with its reason."""
    if job["status"] == "succeeded":
        print(f"{job['id']}: succeeded: serve it with LLMQ_MODEL={job['optimized_model']!r}", file=sys.stderr)
        return 0
    error = job.get("error") or {}
    reason = f": {error.get('code')}: {error.get('message')}" if error else ""
    print(f"llmq optimize: {job['id']} {job['status']}{reason}", file=sys.stderr)
    return 1


def optimize(args: argparse.Namespace) -> int:
    try:
        body = _optimize_body(args)
    except UsageError as exc:
        print(f"llmq optimize: {exc}", file=sys.stderr)
        return 2
    client = _client(args)
    if args.list:
        for job in client.optimizations(args.limit):
            print("\t".join(str(job.get(k) or "-") for k in ("id", "status", "model", "optimized_model"))
                  + f"\t{job['strategy']['type']}")
        return 0
    if args.cancel:
        print(json.dumps(client.cancel_optimization(args.cancel), indent=2))
        return 0
    job = client.optimization(args.get) if args.get else client.create_optimization(body)
    if args.wait:
        job = _follow(client, job)
    print(json.dumps(job, indent=2))
    return _ended(job) if args.wait or job["status"] in FINAL_JOB else 0


def _optimize_body(args: argparse.Namespace) -> dict | None:
    """The job's body for `llmq optimize MODEL ...`, or None for --get / --list / --cancel."""
    named = [flag for flag, given in (("--get", args.get), ("--list", args.list), ("--cancel", args.cancel)) if given]
    if len(named) > 1:
        raise UsageError(f"give one of {' / '.join(named)}")
    if named:
        if args.model or args.strategy:
            raise UsageError(f"{named[0]} takes no MODEL or --strategy")
        return None
    if not args.model or not args.strategy:
        raise UsageError("give the source MODEL and --strategy TYPE (or --get JOB_ID, --list, --cancel JOB_ID)")
    body: dict = {"model": args.model, "strategy": {**strategy_settings(args.set), "type": args.strategy}}
    for name in ("training_file", "validation_file", "suffix", "seed"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    return body


def build_model(args: argparse.Namespace) -> int:
    from workers.tinymodel import build_tiny_model

    print(build_tiny_model(Path(args.path), force=args.force))
    return 0


def keys(args: argparse.Namespace) -> int:
    import asyncio

    from redis.exceptions import RedisError

    from shared.apikeys import ApiKeyStore
    from shared.keys import Keys
    from shared.store import connect_redis
    from shared.webhooks import WebhookSecrets

    async def run() -> int:
        settings = StackSettings()
        redis = connect_redis(settings.redis_url)
        store = ApiKeyStore(redis, Keys(settings.redis_prefix))
        try:
            if args.action == "create":
                key = await store.create(args.name)
                secret = await WebhookSecrets(redis, store.keys).of(args.name)
                print(key)
                print(f"API key for {args.name!r}: shown once, store it now. Use: Authorization: Bearer <key>\n"
                      f"Its webhook signing secret: {secret} (again: llmq keys webhook-secret {args.name})",
                      file=sys.stderr)
            elif args.action == "webhook-secret":
                if args.name not in {entry["name"] for entry in await store.list()}:
                    print(f"no key named {args.name!r}", file=sys.stderr)
                    return 1
                print(await WebhookSecrets(redis, store.keys).of(args.name))
            elif args.action == "list":
                for entry in await store.list():
                    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry["created_at"]))
                    print(f"{entry['name']}\tcreated {created}")
            elif not await store.revoke(args.name):
                print(f"no key named {args.name!r}", file=sys.stderr)
                return 1
            return 0
        except ValueError as exc:
            print(f"llmq keys: {exc}", file=sys.stderr)
            return 1
        except (RedisError, OSError) as exc:
            print(f"llmq keys: cannot reach Redis at {settings.redis_url} ({exc}); set LLMQ_REDIS_URL",
                  file=sys.stderr)
            return 1
        finally:
            await redis.aclose()

    if args.action in ("create", "revoke", "webhook-secret") and not args.name:
        print(f"llmq keys {args.action}: give the key's NAME", file=sys.stderr)
        return 2
    return asyncio.run(run())


def schema(_args: argparse.Namespace) -> int:
    from shared.schema import SCHEMA_PATH, write_message_schema

    write_message_schema()
    print(SCHEMA_PATH)
    return 0


def recommend(args: argparse.Namespace) -> int:
    from workers.optimize import recommend as rec

    try:
        if args.what == "batch":
            report = rec.recommend_batch(args.model, args.tpot_p99_ms, limits=args.limits,
                                         requests_per_limit=args.requests_per_limit, max_tokens=args.max_tokens,
                                         prompt_tokens=args.prompt_tokens)
            text = rec.batch_text
        elif args.what == "memory":
            report = rec.recommend_memory(args.model, args.memory_gib, context=args.context,
                                          concurrency=args.concurrency, headroom=args.headroom)
            text = rec.memory_text
        else:
            report = rec.recommend_training(Path(args.training_file), args.method, model=args.model,
                                            validation_file=Path(args.validation_file) if args.validation_file
                                            else None, measure_steps=args.measure_steps)
            text = rec.training_text
    except rec.RecommendError as exc:
        print(f"llmq recommend {args.what}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else text(report))
    return 0


def _recommend_parser(commands) -> None:
    p = commands.add_parser("recommend", help="settings from measurements on this machine: batch limit, memory, "
                                              "fine-tuning hyperparameters")
    kinds = p.add_subparsers(dest="what", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="a model folder or a registry model's served name (default: LLMQ_MODEL)")
    common.add_argument("--json", action="store_true", help="print the report as JSON")
    k = kinds.add_parser("batch", parents=[common], help="the batch limit with the highest throughput within a "
                                                         "p99 TPOT bound, from a sweep of the torch engine")
    k.add_argument("--tpot-p99-ms", type=float, required=True, help="the bound on p99 time per output token, ms")
    k.add_argument("--limits", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64],
                   help="the LLMQ_BATCH_MAX_SIZE values to measure (1 2 4 8 16 32 64)")
    k.add_argument("--requests-per-limit", type=int, default=4, help="requests per limit = this x limit (4)")
    k.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (32)")
    k.add_argument("--prompt-tokens", type=int, default=32, help="prompt tokens per request (32)")
    k = kinds.add_parser("memory", parents=[common], help="which variants of the model fit in a memory size")
    k.add_argument("--memory-gib", type=float, required=True, help="the GPU's or machine's memory, GiB")
    k.add_argument("--context", type=int, help="tokens per request (default: the model's context)")
    k.add_argument("--concurrency", type=int, help="requests at once (default: LLMQ_BATCH_MAX_SIZE)")
    k.add_argument("--headroom", type=float, default=0.1,
                   help="share of the memory kept free for activations and the runtime (0.1)")
    k = kinds.add_parser("training", parents=[common], help="fine-tuning hyperparameters and time for a file")
    k.add_argument("--training-file", required=True, help="the JSONL training file")
    k.add_argument("--validation-file", help="a JSONL validation file (default: part of the training file)")
    k.add_argument("--method", choices=["lora", "adapter", "full"], default="lora")
    k.add_argument("--measure-steps", type=int, default=10,
                   help="real optimizer steps timed, after as many warm-up ones (10)")
    p.set_defaults(run=recommend)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="llmq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="run the whole stack locally").set_defaults(run=up)
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--url", help="the gateway's base URL (LLMQ_URL; default http://127.0.0.1:$LLMQ_HTTP_PORT)")
    client.add_argument("--api-key", help="sent as `Authorization: Bearer <key>` (LLMQ_API_KEY)")
    shown = argparse.ArgumentParser(add_help=False)
    shown.add_argument("--text", action="store_true", help="print only the generated text")
    p = commands.add_parser("submit", parents=[client, shown], help="submit a prompt and wait for the result")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", help="the model to run it on (default: the workers' own)")
    p.add_argument("--max-tokens", type=int, default=32, help="most tokens to generate (32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (0)")
    p.add_argument("--wait", type=float, default=60,
                   help="seconds to wait for the result; 0: print the accepted id at once (60)")
    p.set_defaults(run=submit)
    p = commands.add_parser("get", parents=[client, shown], help="show a request's record")
    p.add_argument("id", help="the request's id")
    p.add_argument("--wait", type=float, default=0, help="seconds to wait for it to finish (0)")
    p.set_defaults(run=get)
    p = commands.add_parser("cancel", parents=[client], help="cancel a queued or running request")
    p.add_argument("id", help="the request's id")
    p.set_defaults(run=cancel)
    p = commands.add_parser("optimize", parents=[client],
                            help="create an optimization job (quantize, prune, cast, merge a LoRA), or read jobs")
    p.add_argument("model", nargs="?", help="the source model: a base model, or a fine-tuned or optimized one")
    p.add_argument("--strategy", help="int8_dynamic, weight_only, qat, prune_l1, prune_structured, precision, "
                                      "merge_lora")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a strategy setting (repeatable): bits=4, sparsity=0.5, dtype=bfloat16, recovery.n_epochs=1")
    p.add_argument("--training-file", help="what QAT and a recovery fine-tune train on (a fine-tune file's id)")
    p.add_argument("--validation-file", help="held-out examples, evaluated before and after (a file's id)")
    p.add_argument("--suffix", help="in the output's name instead of the strategy's tag")
    p.add_argument("--seed", type=int)
    p.add_argument("--wait", action="store_true", help="follow the job to its end; exit 0 only if it succeeded")
    p.add_argument("--get", metavar="JOB_ID", help="show a job (with --wait: once it ended)")
    p.add_argument("--list", action="store_true", help="this key's jobs, newest first: id, status, source, output, "
                                                       "strategy")
    p.add_argument("--limit", type=int, default=20, help="most jobs --list shows (20)")
    p.add_argument("--cancel", metavar="JOB_ID", help="cancel a job")
    p.set_defaults(run=optimize)
    p = commands.add_parser("build-model", help="build the tiny local model")
    p.add_argument("path", nargs="?", default=StackSettings.model_fields["model"].default)
    p.add_argument("--force", action="store_true")
    p.set_defaults(run=build_model)
    commands.add_parser("schema", help="rewrite shared/schemas/request-v1.schema.json").set_defaults(run=schema)
    p = commands.add_parser("keys", help="create, list or revoke API keys; print a key's webhook signing secret")
    p.add_argument("action", choices=["create", "list", "revoke", "webhook-secret"])
    p.add_argument("name", nargs="?")
    p.set_defaults(run=keys)
    _recommend_parser(commands)
    args = parser.parse_args(argv)
    try:
        sys.exit(args.run(args))
    except ClientError as exc:
        print(f"llmq {args.command}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
