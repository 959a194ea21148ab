"""Fine-tuning jobs end to end over a real stack (broker, Redis, gateway, trainer,
torch worker), driven by the official `openai` client: a LoRA job on the shipped
sentiment task learns and is served by name beside the base model; a job is
cancelled midway; the quality gate refuses a job that learned nothing; a trainer
SIGKILLed mid-job is resumed from its checkpoint by another; and jobs and models
are private to their API key."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import sys
import time

import openai
import pytest

from deploy.devstack import free_port, python_env, start_redis
from scaler.backends.local import LocalBackend
from scaler.daemon import Scaler
from scaler.settings import ScalerSettings
from shared.keys import Keys
from shared.store import connect_redis
from shared.store.fine_tuning import TrainingStore
from tests.conftest import isolated_settings, serve_gateway
from tests.integration.helpers import api_keys
from workers.training.finsent import generate
from workers.training.service import TrainingWorker
from workers.training.settings import TrainerSettings

FINAL = {"succeeded", "failed", "cancelled"}


def _jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def trainer_settings(settings, **overrides) -> TrainerSettings:
    """A trainer's settings on the test's services, topic and registry."""
    shared = settings.model_dump(include=set(TrainerSettings.model_fields) & set(type(settings).model_fields))
    shared.pop("metrics_port", None)
    return TrainerSettings(**{**shared, "metrics_port": 0, **overrides})


@pytest.fixture
def stack_settings(broker, redis_server, tiny_model_dir, tmp_path):
    registry = tmp_path / "registry"
    (registry / "adapters").mkdir(parents=True)
    return isolated_settings(broker, redis_server, engine="torch", model=str(tiny_model_dir), auth=True,
                             registry_dir=registry, adapters_dir=str(registry / "adapters"))


@pytest.fixture
async def stack(stack_settings, tmp_path):
    """Gateway + torch worker + in-process trainer; yields (gateway, keys, trainer settings)."""
    from workers.worker import Worker

    keys = api_keys(stack_settings, "alice", "bob")
    tsettings = trainer_settings(stack_settings, training_dir=tmp_path / "training", checkpoint_steps=5,
                                 training_lease_seconds=6)
    worker = Worker(stack_settings)
    trainer = TrainingWorker(tsettings, name="trainer-1")
    tasks = [asyncio.create_task(worker.run()), asyncio.create_task(trainer.run())]
    try:
        async with serve_gateway(stack_settings) as gw:
            yield gw, keys, tsettings
    finally:
        worker.stop()
        trainer.stop()
        await asyncio.gather(*tasks, return_exceptions=True)


def _client(url: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


async def _upload(client: openai.AsyncOpenAI, lines: list[dict], name: str = "train.jsonl") -> str:
    made = await client.files.create(file=(name, io.BytesIO(_jsonl(lines))), purpose="fine-tune")
    return made.id


async def _wait_job(client: openai.AsyncOpenAI, job_id: str, until=FINAL, timeout: float = 240, check=None):
    deadline = time.monotonic() + timeout
    while True:
        job = await client.fine_tuning.jobs.retrieve(job_id)
        if job.status in until and (check is None or check(job)):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job still {job.status} after {timeout} s: {job}")
        await asyncio.sleep(0.3)


async def _events(client: openai.AsyncOpenAI, job_id: str) -> list:
    """Every event of a job, oldest first (the API pages them newest first)."""
    return [e async for e in client.fine_tuning.jobs.list_events(job_id, limit=20)][::-1]


async def _create(client, train, heldout, **method_hyperparameters):
    training_file = await _upload(client, train)
    validation_file = await _upload(client, heldout, "heldout.jsonl")
    hyperparameters = {"n_epochs": 3, "batch_size": 8, **method_hyperparameters}
    return await client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=training_file, validation_file=validation_file, suffix="finsent",
        seed=7, method={"type": "lora", "lora": {"hyperparameters": hyperparameters}})


async def _events_once_closed(client: openai.AsyncOpenAI, job_id: str) -> list:
    """Every event, once the closing one is there: the trainer writes it just after the status it reports."""
    deadline = time.monotonic() + 10
    while True:
        events = await _events(client, job_id)
        if any(e.message == "The job has successfully completed" for e in events) or time.monotonic() > deadline:
            return events
        await asyncio.sleep(0.1)


# ---- end to end ------------------------------------------------------------------


async def test_a_lora_job_learns_and_its_model_is_served_by_name(stack):
    gw, keys, _ = stack
    alice, bob = _client(gw.url, keys["alice"]), _client(gw.url, keys["bob"])
    train, heldout = generate(240, 45, seed=1)
    created = await _create(alice, train, heldout)
    assert created.status in ("validating_files", "queued") and created.model == "tiny-llama"

    job = await _wait_job(alice, created.id)
    assert job.status == "succeeded", job
    assert job.fine_tuned_model.startswith("tiny-llama:ft-finsent-") and job.trained_tokens > 0
    figures = job.model_extra["eval"]
    assert figures["after"]["eval_loss"] < figures["before"]["eval_loss"]
    assert figures["after"]["accuracy"] > figures["before"]["accuracy"] + 0.2, figures  # learned, not chance

    events = await _events_once_closed(alice, created.id)
    messages = [e.message for e in events]
    assert any("Training started" in m for m in messages) and any("(attempt 1)" in m for m in messages) and "The job has successfully completed" in messages
    assert any(e.data and "train_loss" in (e.data or {}) for e in events), messages  # step events with losses
    checkpoints = [c async for c in alice.fine_tuning.jobs.checkpoints.list(created.id)]
    assert checkpoints and all(c.step_number > 0 for c in checkpoints)

    # Served by name, beside the base model, to its owner only.
    assert job.fine_tuned_model in [m.id async for m in alice.models.list()]
    assert job.fine_tuned_model not in [m.id async for m in bob.models.list()]
    sentence = heldout[0]["messages"][:-1]
    tuned, base = await asyncio.gather(
        alice.chat.completions.create(model=job.fine_tuned_model, messages=sentence, max_tokens=8, temperature=0),
        alice.chat.completions.create(model="tiny-llama", messages=sentence, max_tokens=8, temperature=0))
    assert tuned.model == job.fine_tuned_model and base.model == "tiny-llama"
    assert tuned.choices[0].message.content != base.choices[0].message.content
    # The served model answers the held-out set as the trainer measured it (same tokens, greedy).
    answers = await asyncio.gather(*(alice.chat.completions.create(
        model=job.fine_tuned_model, messages=line["messages"][:-1], max_tokens=8, temperature=0) for line in heldout))
    right = sum(a.choices[0].message.content == line["messages"][-1]["content"] for a, line in zip(answers, heldout))
    assert abs(right / len(heldout) - figures["after"]["accuracy"]) <= 2 / len(heldout), (right, figures)

    # Another key sees nothing of it.
    with pytest.raises(openai.NotFoundError):
        await bob.fine_tuning.jobs.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        await bob.chat.completions.create(model=job.fine_tuned_model, messages=sentence, max_tokens=3)
    assert [j.id async for j in bob.fine_tuning.jobs.list()] == []
    await alice.close()
    await bob.close()


async def test_a_running_job_is_cancelled_and_keeps_its_checkpoint(stack):
    gw, keys, _ = stack
    alice = _client(gw.url, keys["alice"])
    train, heldout = generate(240, 30, seed=2)
    created = await _create(alice, train, heldout, n_epochs=20)
    await _wait_job(alice, created.id, until={"running"},
                    check=lambda j: (j.model_extra.get("progress") or {}).get("step", 0) >= 6)
    cancelled = await alice.fine_tuning.jobs.cancel(created.id)
    assert cancelled.status in ("running", "cancelled")
    job = await _wait_job(alice, created.id, timeout=60)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    checkpoints = [c async for c in alice.fine_tuning.jobs.checkpoints.list(created.id)]
    assert checkpoints, "the last checkpoint is kept"
    total = job.model_extra["progress"]["total_steps"]
    assert max(c.step_number for c in checkpoints) < total  # stopped early, not run to the end
    await alice.close()


async def test_the_quality_gate_refuses_a_job_that_learned_nothing(stack):
    gw, keys, _ = stack
    alice = _client(gw.url, keys["alice"])
    train, heldout = generate(48, 24, seed=3)
    created = await _create(alice, train, heldout, n_epochs=1, learning_rate_multiplier=0.0)
    job = await _wait_job(alice, created.id)
    assert job.status == "failed" and job.error.code == "quality_gate", job
    assert job.fine_tuned_model is None
    assert not [m.id async for m in alice.models.list() if ":ft-" in m.id]
    await alice.close()


# ---- a trainer killed mid-job ------------------------------------------------------


def _spawn_trainer(settings: TrainerSettings, log_path) -> subprocess.Popen:
    env = python_env(**settings.to_env())
    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "workers.training.main"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


@pytest.mark.timeout(600)  # two trainer processes, each loading torch and the model
async def test_a_trainer_killed_mid_job_is_resumed_by_another_from_its_checkpoint(
        broker, redis_server, tiny_model_dir, tmp_path):
    settings = isolated_settings(broker, redis_server, engine="torch", model=str(tiny_model_dir),
                                 registry_dir=tmp_path / "registry")
    tsettings = trainer_settings(settings, training_dir=tmp_path / "training", checkpoint_steps=4,
                                 training_lease_seconds=5)
    redis = connect_redis(settings.redis_url)
    store = TrainingStore(redis, Keys.of(settings), settings.training_ttl_seconds)
    first = _spawn_trainer(tsettings, tmp_path / "trainer-1.log")
    second = None
    try:
        async with serve_gateway(settings) as gw:
            client = _client(gw.url, "unused: auth is off")
            train, heldout = generate(160, 24, seed=4)
            created = await _create(client, train, heldout, n_epochs=2)
            # Killed once it has a checkpoint and has trained past it.
            await _wait_job(client, created.id, until={"running"}, timeout=180,
                            check=lambda j: (j.model_extra.get("progress") or {}).get("step", 0) >= 6)
            assert await store.checkpoints(created.id)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            second = _spawn_trainer(tsettings, tmp_path / "trainer-2.log")
            job = await _wait_job(client, created.id, timeout=300)
            assert job.status == "succeeded", job
            record = await store.get(created.id)
            assert int(record["attempts"]) == 2
            messages = [e.message for e in await _events_once_closed(client, created.id)]
            assert any("(attempt 2)" in m for m in messages), messages
            assert "Training resumed" in messages, "\n".join(messages)  # from its checkpoint, not from step 0
            assert messages.count("The job has successfully completed") == 1
            await client.close()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)
        await redis.aclose()


# ---- Redis restarting mid-job ------------------------------------------------------


async def test_training_goes_on_while_redis_restarts_and_its_progress_catches_up(broker, tiny_model_dir, tmp_path):
    """Redis of its own (persistent, as deploy/ runs it), stopped for a few seconds mid-job."""
    port = free_port()
    redis_dir = tmp_path / "redis"
    redis_service = start_redis(port, redis_dir, persistent=True)
    settings = isolated_settings(broker, redis_service, engine="torch", model=str(tiny_model_dir),
                                 registry_dir=tmp_path / "registry")
    tsettings = trainer_settings(settings, training_dir=tmp_path / "training", checkpoint_steps=4,
                                 training_lease_seconds=30)
    trainer = TrainingWorker(tsettings, name="trainer-1")
    task = asyncio.create_task(trainer.run())
    try:
        async with serve_gateway(settings) as gw:
            client = _client(gw.url, "unused: auth is off")
            train, heldout = generate(160, 24, seed=5)
            created = await _create(client, train, heldout, n_epochs=4)
            running = await _wait_job(client, created.id, until={"running"}, timeout=120,
                                      check=lambda j: (j.model_extra.get("progress") or {}).get("step", 0) >= 2)
            step_before = running.model_extra["progress"]["step"]
            redis_service.stop()
            await asyncio.sleep(4)  # the run goes on; its writes wait
            assert not task.done()
            redis_service = start_redis(port, redis_dir, persistent=True)
            job = await _wait_job(client, created.id, timeout=240)
            assert job.status == "succeeded", job
            assert job.model_extra["progress"]["step"] > step_before
            messages = [e.message for e in await _events_once_closed(client, created.id)]
            # Events from while Redis was away were kept and written once it was back.
            steps = [m for m in messages if m.startswith("Step ")]
            numbers = [int(m.split()[1].split("/")[0]) for m in steps]
            assert numbers == sorted(numbers) and numbers[-1] >= job.model_extra["progress"]["total_steps"] - 5
            assert messages.count("The job has successfully completed") == 1
            await client.close()
    finally:
        trainer.stop()
        await asyncio.gather(task, return_exceptions=True)
        redis_service.stop()


# ---- the trainers' scaler pool ---------------------------------------------------------


@pytest.mark.timeout(600)  # a trainer process started by the scaler, loading torch and the model
async def test_the_trainers_scaler_starts_a_trainer_for_a_queued_job_and_stops_it_when_idle(
        broker, redis_server, tiny_model_dir, tmp_path, monkeypatch):
    settings = isolated_settings(broker, redis_server, engine="torch", model=str(tiny_model_dir),
                                 registry_dir=tmp_path / "registry", log_format="json")
    # What a trainer reads beyond the stack's settings, from the environment its scaler hands on.
    monkeypatch.setenv("LLMQ_TRAINING_DIR", str(tmp_path / "training"))
    scaler_settings = ScalerSettings(pool="trainers", backend="local", min=0, max=1, target_per_worker=1,
                                     poll_interval_seconds=0.2, stabilization_seconds=1, idle_seconds=2,
                                     grace_seconds=30, state_dir=tmp_path / "state",
                                     worker_log_dir=tmp_path / "trainers", worker_metrics_port=0)
    backend = LocalBackend(settings, scaler_settings)
    scaler = Scaler(settings, scaler_settings, backend)
    task = asyncio.create_task(scaler.run())
    try:
        async with serve_gateway(settings) as gw:
            client = _client(gw.url, "unused: auth is off")
            await asyncio.sleep(1)
            assert backend.workers == []  # nothing queued: no trainer
            train, heldout = generate(48, 12, seed=6)
            created = await _create(client, train, heldout, n_epochs=1)
            job = await _wait_job(client, created.id, timeout=240)
            assert job.status == "succeeded", job
            assert scaler.stats.peak_workers == 1 and backend.started == 1
            started = [line for path in (tmp_path / "trainers").glob("*.log")
                       for line in path.read_text().splitlines() if '"trainer_started"' in line]
            assert len(started) == 1 and json.loads(started[0])["group"] == settings.trainer_group
            deadline = time.monotonic() + 60
            while backend.workers and time.monotonic() < deadline:  # idle again: back to zero
                await asyncio.sleep(0.2)
            assert backend.workers == [] and backend.stopped == 1
            await client.close()
    finally:
        scaler.stop()
        await asyncio.wait_for(task, 60)
