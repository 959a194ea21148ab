"""Fixtures that start the real services: the Tansu Kafka-protocol broker and
redis-server, each on a free port with a temporary directory, once per test
session. Each test gets its own topic, consumer group and Redis key prefix,
so tests never see each other's requests."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import ClientSession, web

from deploy.devstack import Service, free_port, start_broker, start_redis
from deploy.settings import StackSettings
from gateway.app import Gateway
from tests.integration.helpers import WorkerProcess
from workers.worker import Worker


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny Llama checkpoint (built once per run, a few seconds on CPU)."""
    from workers import tinymodel

    return tinymodel.build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def adapters_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """Adapters of the tiny model made with peft and saved with `save_pretrained`, what a
    worker's LLMQ_ADAPTERS_DIR holds: two LoRA (`style-a`, `style-b`), two (IA)^3
    (`tone-a`, `tone-b`, what fine-tuning's `adapter` method trains) and a prompt-tuning
    one (`prompt-tuned`, a peft type no engine serves)."""
    import torch
    from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def save(name: str, seed: int, config) -> None:
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        model = get_peft_model(base, config)
        if isinstance(config, IA3Config):
            # (IA)^3 vectors start at ones (no change): move them so the adapter changes the output.
            with torch.no_grad():
                for param_name, param in model.named_parameters():
                    if "ia3_l" in param_name:
                        param.copy_(torch.empty_like(param).uniform_(0.0, 2.0))
        model.save_pretrained(root / name)

    root = tmp_path_factory.mktemp("adapters")
    for seed, name in ((1, "style-a"), (2, "style-b")):
        # init_lora_weights=False: B starts random, not zero, so the adapter changes the output.
        save(name, seed, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"],
                                    init_lora_weights=False))
    for seed, name in ((3, "tone-a"), (4, "tone-b")):
        # Fine-tuning's `adapter` method's modules (shared/training.py).
        save(name, seed, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]))
    save("prompt-tuned", 5, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    return root


@pytest.fixture(scope="session")
def broker(tmp_path_factory) -> Service:
    service = start_broker(free_port(), tmp_path_factory.mktemp("broker") / "broker.log")
    yield service
    service.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Service:
    service = start_redis(free_port(), tmp_path_factory.mktemp("redis"))
    yield service
    service.stop()


def isolated_settings(broker: Service, redis_server: Service, **overrides) -> StackSettings:
    """StackSettings on the test services with a topic, group and Redis prefix of their own."""
    tag = uuid.uuid4().hex[:8]
    return StackSettings(**{
        "kafka_bootstrap": broker.url,
        "redis_url": redis_server.url,
        "request_topic": f"llmq.requests.{tag}",
        "dlq_topic": f"llmq.requests.{tag}.dlq",
        "consumer_group": f"llmq-workers-{tag}",
        "webhook_topic": f"llmq.webhooks.{tag}",
        "webhook_dlq_topic": f"llmq.webhooks.{tag}.dlq",
        "webhook_consumer_group": f"llmq-webhooks-{tag}",
        # No webhook sender unless a test asks (tests/integration/test_webhooks.py): each is one
        # more group member per gateway, whose join takes seconds on the dev broker, and a
        # gateway stopped while it joins waits for it. `llmq up` (tests/e2e) runs the default.
        "webhook_sender": False,
        "redis_prefix": f"llmq-{tag}",
        "files_dir": Path(tempfile.gettempdir()) / f"llmq-files-{tag}",  # not the checkout's .llmq/files
        "registry_dir": Path(tempfile.gettempdir()) / f"llmq-registry-{tag}",
        "fine_tuning_topic": f"llmq.fine_tuning.{tag}",
        "trainer_group": f"llmq-trainers-{tag}",
        "request_partitions": 4,
        "engine": "echo",
        "session_timeout_ms": 6000,
        "log_format": "console",
        "auth": False,  # tests/integration/test_auth.py turns it on
        "metrics_port": 0,  # tests that scrape a worker give it a free port
        **overrides,
    })


@pytest.fixture
def settings(broker: Service, redis_server: Service) -> StackSettings:
    return isolated_settings(broker, redis_server)


@asynccontextmanager
async def serve_gateway(settings: StackSettings) -> AsyncIterator[Gateway]:
    """A real gateway on a loopback port; `gateway.url` is its base URL. Served as
    `gateway.main` serves it (aiohttp's TestServer would cancel handlers whose
    client hangs up, which production's run_app does not)."""
    gw = Gateway(settings)
    runner = web.AppRunner(gw.app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    gw.url = f"http://{host}:{port}"
    try:
        yield gw
    finally:
        await runner.cleanup()


@pytest.fixture
async def gateway(settings: StackSettings) -> AsyncIterator[Gateway]:
    async with serve_gateway(settings) as gw:
        yield gw


@pytest.fixture
async def secured(auth_settings: StackSettings) -> AsyncIterator[Gateway]:
    """A gateway with API keys on; the module's `auth_settings` fixture says how."""
    async with serve_gateway(auth_settings) as gw:
        yield gw


@pytest.fixture
async def http() -> AsyncIterator[ClientSession]:
    async with ClientSession() as session:
        yield session


@pytest.fixture
async def start_worker(settings: StackSettings) -> AsyncIterator[Callable[..., Worker]]:
    """Starts in-process workers (each its own consumer); all are stopped after the test."""
    running: list[tuple[Worker, asyncio.Task]] = []

    async def start(name: str | None = None, **overrides) -> Worker:
        worker = Worker(settings.model_copy(update=overrides), name=name)
        task = asyncio.create_task(worker.run())
        running.append((worker, task))
        while not worker.assignment():
            if task.done():
                task.result()
            await asyncio.sleep(0.05)
        return worker

    yield start
    for worker, _ in running:
        worker.stop()
    await asyncio.gather(*(task for _, task in running), return_exceptions=True)


@pytest.fixture
def spawn_worker(tmp_path):
    """Starts worker processes; any still running after the test is killed."""
    workers: list[WorkerProcess] = []

    def spawn(settings, name: str = "worker") -> WorkerProcess:
        worker = WorkerProcess(settings, tmp_path / f"{name}-{len(workers)}.log")
        workers.append(worker)
        return worker

    yield spawn
    for worker in workers:
        worker.close()
