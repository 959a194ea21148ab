"""OpenAI's fine-tuning API on a real gateway, broker and Redis, driven by the official
`openai` client: a job is checked, recorded and put on the fine-tuning topic; it is
listed, read, cancelled; bad bodies, files and content are refused as OpenAI does;
jobs are private to their API key; and a published fine-tuned model is served by
name to its owner only.

No trainer runs here (the end-to-end tests train for real): where a test needs what a
trainer writes (a checkpoint, progress, a published model), it writes it with the
same TrainingStore calls a trainer makes, and says so."""

from __future__ import annotations

import io
import json
import time

import openai
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from deploy.devstack import free_port, start_broker
from shared.keys import Keys
from shared.store import connect_redis
from shared.store.fine_tuning import TrainingStore
from shared.training import JOB_ID, fine_tuned_name, parse_message
from tests.conftest import isolated_settings, serve_gateway
from tests.integration.helpers import api_keys, wait_until

BASE = "tiny-base"
CHAT = {"messages": [{"role": "user", "content": "Is the market up?"}, {"role": "assistant", "content": "Yes."}]}
PROMPT = {"prompt": "Sentiment: great results ->", "completion": " positive"}


@pytest.fixture
def settings(broker, redis_server):
    """The conftest's isolated settings, with a fine-tuning topic of this test's own."""
    isolated = isolated_settings(broker, redis_server)
    return isolated.model_copy(update={"fine_tuning_topic": f"{isolated.request_topic}.ft"})


def _client(base_url: str, api_key: str = "unused: auth is off") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0)


def _jsonl(lines: list[dict | str]) -> bytes:
    return b"".join((line if isinstance(line, str) else json.dumps(line)).encode() + b"\n" for line in lines)


async def _upload(client: openai.AsyncOpenAI, lines: list[dict | str], purpose: str = "fine-tune") -> str:
    made = await client.files.create(file=("train.jsonl", io.BytesIO(_jsonl(lines))), purpose=purpose)
    assert made.purpose == purpose
    return made.id


def _training(settings) -> tuple[TrainingStore, object]:
    redis = connect_redis(settings.redis_url)
    return TrainingStore(redis, Keys.of(settings), settings.training_ttl_seconds), redis


async def _read_topic(settings, topic: str, count: int, timeout: float = 20) -> list:
    """The first `count` messages of `topic`, read from the start in no group."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    found = []
    try:
        deadline = time.monotonic() + timeout
        while len(found) < count and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                found.extend(records)
    finally:
        await consumer.stop()
    assert len(found) >= count, f"{len(found)} of {count} messages on {topic}"
    return found


async def _topic_size(settings, topic: str) -> int:
    probe = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await probe.start()
    try:
        partitions = probe.partitions_for_topic(topic) or set()
        if not partitions:
            await probe.client.force_metadata_update()
            partitions = probe.partitions_for_topic(topic) or set()
        assert partitions, f"no topic {topic}"
        ends = await probe.end_offsets([TopicPartition(topic, p) for p in partitions])
        return sum(ends.values())
    finally:
        await probe.stop()


# ---- a job is created, queued, on the topic, and readable ---------------------------------


async def test_a_job_is_queued_on_the_topic_and_reads_in_openais_shapes(settings):
    async with serve_gateway(settings) as gateway:
        client = _client(gateway.url)
        file_id = await _upload(client, [CHAT, PROMPT, CHAT])
        job = await client.fine_tuning.jobs.create(model=BASE, training_file=file_id, suffix="demo",
                                                   hyperparameters={"n_epochs": 2}, metadata={"team": "risk"})
        assert JOB_ID.match(job.id) and job.object == "fine_tuning.job"
        assert job.status == "queued" and job.model == BASE and job.training_file == file_id
        assert job.fine_tuned_model is None and job.finished_at is None and job.error is None
        assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == "auto"
        assert job.method.type == "lora" and job.user_provided_suffix == "demo"
        assert job.metadata == {"team": "risk"} and job.result_files == [] and isinstance(job.seed, int)
        assert job.model_extra["progress"] is None and job.model_extra["eval"] is None

        # The job's message, as a trainer reads it.
        [record] = await _read_topic(settings, settings.fine_tuning_topic, 1)
        message = parse_message(record.value)
        assert record.key == job.id.encode() and message.id == job.id
        assert message.model == BASE and message.training_file == file_id and message.seed == job.seed
        assert message.fine_tuned_model == fine_tuned_name(BASE, "demo", job.id)
        assert message.method.type == "lora" and message.method.hyperparameters.n_epochs == 2
        assert dict(record.headers)["content-type"] == b"application/json"

        assert (await client.fine_tuning.jobs.retrieve(job.id)).model_dump() == job.model_dump()
        second = await client.fine_tuning.jobs.create(model=BASE, training_file=file_id, seed=7,
                                                      method={"type": "adapter"})
        assert second.seed == 7 and second.method.type == "adapter"
        assert [j.id async for j in client.fine_tuning.jobs.list()] == [second.id, job.id]  # newest first
        page = await client.fine_tuning.jobs.list(limit=1)
        assert [j.id for j in page.data] == [second.id] and page.has_more
        assert [j.id async for j in client.fine_tuning.jobs.list(after=second.id)] == [job.id]

        events = [e async for e in client.fine_tuning.jobs.list_events(job.id)]
        assert [e.message for e in events] == ["Files validated, moving job to queued state",
                                               f"Validating training file: {file_id}",
                                               f"Created fine-tuning job: {job.id}"]
        assert all(e.object == "fine_tuning.job.event" and e.level == "info" for e in events)
        older = await client.fine_tuning.jobs.list_events(job.id, after=events[0].id, limit=1)
        assert [e.id for e in older.data] == [events[1].id] and older.has_more

        # What a trainer writes (simulated here with its own store calls; the trainer is tested elsewhere).
        training, redis = _training(settings)
        await training.set(job.id, {"progress": {"step": 3, "total_steps": 10, "epoch": 0.6, "train_loss": 1.5}})
        for step in (5, 10):
            await training.add_checkpoint(job.id, {"step": step, "path": f"/ckpt/{step}",
                                                   "metrics": {"train_loss": 1.0 / step}})
        await redis.aclose()
        assert (await client.fine_tuning.jobs.retrieve(job.id)).model_extra["progress"]["step"] == 3
        checkpoints = [c async for c in client.fine_tuning.jobs.checkpoints.list(job.id)]
        assert [c.step_number for c in checkpoints] == [10, 5]  # newest first
        assert checkpoints[0].fine_tuning_job_id == job.id and checkpoints[0].object == "fine_tuning.job.checkpoint"
        assert checkpoints[0].metrics.train_loss == pytest.approx(0.1) and checkpoints[0].metrics.step == 10
        assert checkpoints[0].fine_tuned_model_checkpoint == f"{fine_tuned_name(BASE, 'demo', job.id)}:ckpt-step-10"
        after = await client.fine_tuning.jobs.checkpoints.list(job.id, after=checkpoints[0].id)
        assert [c.step_number for c in after.data] == [5]
        await client.close()


async def test_cancelling_a_queued_job_ends_it_cancelled(settings):
    async with serve_gateway(settings) as gateway:
        client = _client(gateway.url)
        job = await client.fine_tuning.jobs.create(model=BASE, training_file=await _upload(client, [PROMPT]))
        cancelled = await client.fine_tuning.jobs.cancel(job.id)
        assert cancelled.status == "cancelled" and cancelled.finished_at is not None
        assert (await client.fine_tuning.jobs.retrieve(job.id)).status == "cancelled"
        assert (await client.fine_tuning.jobs.cancel(job.id)).status == "cancelled"  # again: the same answer
        events = [e.message async for e in client.fine_tuning.jobs.list_events(job.id)]
        assert events[0] == "Job cancelled before it started" and events.count(events[0]) == 1

        failed = await client.fine_tuning.jobs.create(model=BASE, training_file=await _upload(client, ["nope"]))
        with pytest.raises(openai.ConflictError):
            await client.fine_tuning.jobs.cancel(failed.id)
        await client.close()


async def test_cancelling_a_running_job_asks_its_trainer_to_stop(settings):
    async with serve_gateway(settings) as gateway:
        client = _client(gateway.url)
        job = await client.fine_tuning.jobs.create(model=BASE, training_file=await _upload(client, [PROMPT]))
        # A trainer takes the job (simulated with the trainer's own store calls; the trainer is tested elsewhere).
        training, redis = _training(settings)
        assert await training.claim(job.id, "trainer-1", 60) == 1
        asked = await client.fine_tuning.jobs.cancel(job.id)
        assert asked.status == "running" and asked.finished_at is None
        assert await training.renew(job.id, "trainer-1", 60) == (True, True)  # what its trainer reads next
        await client.fine_tuning.jobs.cancel(job.id)  # asked twice: one event
        events = [e.message async for e in client.fine_tuning.jobs.list_events(job.id)]
        assert sum("Cancellation requested" in m for m in events) == 1
        await redis.aclose()
        await client.close()


# ---- refused: content, bodies, models, files ---------------------------------------------


async def test_a_file_a_trainer_would_refuse_fails_the_job_at_once_naming_the_line(settings):
    async with serve_gateway(settings) as gateway:
        client = _client(gateway.url)
        bad_line = await _upload(client, [CHAT, "", PROMPT, {"prompt": "no answer"}])
        job = await client.fine_tuning.jobs.create(model=BASE, training_file=bad_line)
        assert job.status == "failed" and job.finished_at is not None
        assert job.error.code == "invalid_training_file" and job.error.param == "training_file"
        assert "line 4" in job.error.message and "completion" in job.error.message
        [last, *_] = [e async for e in client.fine_tuning.jobs.list_events(job.id)]
        assert last.level == "error" and "line 4" in last.message

        not_jsonl = await _upload(client, ["{\"messages\": [", CHAT])
        job = await client.fine_tuning.jobs.create(model=BASE, training_file=not_jsonl)
        assert job.status == "failed" and "line 1: not JSON" in job.error.message

        empty_answer = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}
        job = await client.fine_tuning.jobs.create(model=BASE, training_file=await _upload(client, [CHAT]),
                                                   validation_file=await _upload(client, [empty_answer]))
        assert job.status == "failed" and job.error.code == "invalid_validation_file"
        assert job.error.param == "validation_file" and "line 1" in job.error.message
        assert await _topic_size(settings, settings.fine_tuning_topic) == 0  # nothing for a trainer to run
        await client.close()


async def test_bad_bodies_models_and_files_get_a_400_naming_the_parameter(settings):
    async with serve_gateway(settings) as gateway:
        client = _client(gateway.url)
        file_id = await _upload(client, [CHAT])

        async def refused(param: str, **body) -> openai.BadRequestError:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.fine_tuning.jobs.create(**{"model": BASE, "training_file": file_id, **body})
            assert caught.value.param == param, caught.value.body
            assert caught.value.type == "invalid_request_error"
            return caught.value

        await refused("hyperparameters.n_epochs", hyperparameters={"n_epochs": 100})
        await refused("method.lora.hyperparameters.rank", method={"type": "lora", "lora": {"hyperparameters": {
            "rank": 0}}})
        await refused("method.type", method={"type": "dpo"})
        await refused("suffix", suffix="Not A Suffix!")
        await refused("integrations", integrations=[{"type": "wandb", "wandb": {"project": "p"}}])
        await refused("training_file", training_file="file-" + "0" * 32)
        await refused("validation_file", validation_file="nope")
        batch_file = await _upload(client, [{"custom_id": "a", "method": "POST", "url": "/v1/completions",
                                             "body": {"model": BASE, "prompt": "x"}}], purpose="batch")
        await refused("training_file", training_file=batch_file)
        deleted = await _upload(client, [CHAT])
        await client.files.delete(deleted)
        await refused("training_file", training_file=deleted)
        await refused("model", model=fine_tuned_name(BASE, None, "ftjob-" + "a" * 24))
        with pytest.raises(openai.BadRequestError) as caught:  # a fine-tuning file is not a batch's input
            await client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
        assert caught.value.param == "input_file_id"
        with pytest.raises(openai.BadRequestError) as caught:
            await client.files.create(file=("x.jsonl", io.BytesIO(_jsonl([CHAT]))), purpose="assistants")
        assert caught.value.param == "purpose"

        # Once trainers registered what they train, only those models are taken.
        training, redis = _training(settings)
        await training.register_trainable([BASE])
        await redis.aclose()
        error = await refused("model", model="some-other-model")
        assert error.code == "model_not_found" and BASE in error.message
        assert (await client.fine_tuning.jobs.create(model=BASE, training_file=file_id)).status == "queued"
        assert [j.status async for j in client.fine_tuning.jobs.list()] == ["queued"]  # nothing else was made
        await client.close()


# ---- per key -------------------------------------------------------------------------------


async def test_another_key_cannot_see_cancel_or_train_on_a_job_or_its_file(settings):
    settings = settings.model_copy(update={"auth": True})
    keys = api_keys(settings, "alice", "bob")
    async with serve_gateway(settings) as gateway:
        alice, bob = _client(gateway.url, keys["alice"]), _client(gateway.url, keys["bob"])
        file_id = await _upload(alice, [CHAT])
        job = await alice.fine_tuning.jobs.create(model=BASE, training_file=file_id)
        assert job.organization_id == "alice"
        for call in (bob.fine_tuning.jobs.retrieve, bob.fine_tuning.jobs.cancel, bob.fine_tuning.jobs.list_events,
                     bob.fine_tuning.jobs.checkpoints.list):
            with pytest.raises(openai.NotFoundError):
                await call(job.id)
        with pytest.raises(openai.BadRequestError) as caught:
            await bob.fine_tuning.jobs.create(model=BASE, training_file=file_id)
        assert caught.value.param == "training_file"
        assert [j async for j in bob.fine_tuning.jobs.list()] == []
        assert (await alice.fine_tuning.jobs.retrieve(job.id)).status == "queued"  # untouched by bob's cancel
        with pytest.raises(openai.AuthenticationError):
            await _client(gateway.url, "llmq_not-a-key").fine_tuning.jobs.list()
        await alice.close()
        await bob.close()


# ---- serving a published model by name -----------------------------------------------------


async def test_a_published_model_is_served_by_name_to_its_owner_only(settings, http):
    settings = settings.model_copy(update={"auth": True})
    keys = api_keys(settings, "alice", "bob")
    job_id = "ftjob-" + "ab" * 12
    lora, full = fine_tuned_name(BASE, "sent", job_id), fine_tuned_name(BASE, "whole", job_id)
    # What a trainer publishes on success (simulated: the trainer is tested elsewhere).
    training, redis = _training(settings)
    for name, method in ((lora, "lora"), (full, "full")):
        await training.publish(name, {"tenant": "alice", "base": BASE, "method": method,
                                      "output": name.partition(":")[2], "job": job_id, "created_at": 1_700_000_000})
    await redis.aclose()
    async with serve_gateway(settings) as gateway:
        def as_(who: str) -> dict:
            return {"Authorization": f"Bearer {keys[who]}"}

        async def submit(who: str, **body) -> tuple[int, dict]:
            async with http.post(f"{gateway.url}/v1/requests", headers=as_(who),
                                 json={"input": {"prompt": "Sentiment: fine ->"}, **body}) as resp:
                return resp.status, await resp.json()

        # The owner's request runs as the base model with the output as its adapter.
        status, accepted = await submit("alice", model=lora)
        assert status == 202, accepted
        async with http.get(f"{gateway.url}/v1/requests/{accepted['id']}", headers=as_("alice")) as resp:
            record = await resp.json()
        assert record["model"] == BASE and record["adapter"] == "ft-sent-abababab"
        [message] = await _read_topic(settings, settings.request_topic, 1)
        sent = json.loads(message.value)
        assert sent["id"] == accepted["id"] and sent["model"] == BASE and sent["adapter"] == "ft-sent-abababab"
        status, accepted = await submit("alice", model=full)  # a whole model: a worker started on it serves it
        async with http.get(f"{gateway.url}/v1/requests/{accepted['id']}", headers=as_("alice")) as resp:
            record = await resp.json()
        assert status == 202 and record["model"] == full and record["adapter"] is None
        status, refused = await submit("alice", model=lora, adapter="another")
        assert status == 422 and refused["error"]["field"] == "adapter"

        # Another key: exactly what a model nobody published gets.
        never = fine_tuned_name(BASE, "sent", "ftjob-" + "cd" * 12)
        status, refused = await submit("bob", model=lora)
        status_never, refused_never = await submit("bob", model=never)
        assert status == status_never == 422 and refused["error"]["type"] == "model_not_found"
        assert refused["error"]["message"].replace(lora, never) == refused_never["error"]["message"]
        bob = _client(gateway.url, keys["bob"])
        with pytest.raises(openai.NotFoundError) as caught:
            await bob.chat.completions.create(model=lora, messages=[{"role": "user", "content": "hi"}])
        assert caught.value.code == "model_not_found"

        # /v1/models lists them for their owner only.
        alice = _client(gateway.url, keys["alice"])
        listed = {m.id: m async for m in alice.models.list()}
        assert {lora, full} <= set(listed) and listed[lora].owned_by == "alice"
        assert listed[lora].created == 1_700_000_000
        assert not {lora, full} & {m.id async for m in bob.models.list()}
        await alice.close()
        await bob.close()


async def test_a_published_model_is_served_to_everyone_with_auth_off(settings, http):
    training, redis = _training(settings)
    name = fine_tuned_name(BASE, None, "ftjob-" + "ef" * 12)
    await training.publish(name, {"tenant": None, "base": BASE, "method": "adapter", "output": name.partition(":")[2],
                                  "job": "ftjob-" + "ef" * 12, "created_at": 1_700_000_000})
    await redis.aclose()
    async with serve_gateway(settings) as gateway:
        client = _client(gateway.url)
        assert name in {m.id async for m in client.models.list()}
        await client.close()
        async with http.post(f"{gateway.url}/v1/requests", json={"model": name, "input": {"prompt": "x"}}) as resp:
            accepted = await resp.json()
        async with http.get(f"{gateway.url}/v1/requests/{accepted['id']}") as resp:
            record = await resp.json()
        assert record["model"] == BASE and record["adapter"] == name.partition(":")[2]



async def test_batch_lines_naming_a_published_model_run_as_its_base_and_adapter(settings, http):
    settings = settings.model_copy(update={"auth": True})
    keys = api_keys(settings, "alice", "bob")
    job_id = "ftjob-" + "12" * 12
    name = fine_tuned_name(BASE, "batch", job_id)
    # What a trainer publishes on success (simulated: the trainer is tested elsewhere).
    training, redis = _training(settings)
    await training.publish(name, {"tenant": "alice", "base": BASE, "method": "lora", "output": name.partition(":")[2],
                                  "job": job_id, "created_at": 1_700_000_000})
    await redis.aclose()
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": name, "prompt": f"line {i}"}} for i in range(2)]
    async with serve_gateway(settings) as gateway:
        alice, bob = _client(gateway.url, keys["alice"]), _client(gateway.url, keys["bob"])
        batch = await alice.batches.create(input_file_id=await _upload(alice, lines, "batch"),
                                           endpoint="/v1/completions", completion_window="24h")

        async def line_record() -> dict | None:
            async with http.get(f"{gateway.url}/v1/requests/{batch.id}-1",
                                headers={"Authorization": f"Bearer {keys['alice']}"}) as resp:
                return await resp.json() if resp.status == 200 else None

        await wait_until(line_record, what="the batch's lines recorded")
        record = await line_record()
        assert record["model"] == BASE and record["adapter"] == name.partition(":")[2] and record["lane"] == "bulk"
        assert (await alice.batches.retrieve(batch.id)).model == name

        theirs = await bob.batches.create(input_file_id=await _upload(bob, lines, "batch"),
                                          endpoint="/v1/completions", completion_window="24h")

        async def failed():
            return (await bob.batches.retrieve(theirs.id)).status == "failed"

        await wait_until(failed, what="bob's batch refused")
        [error] = (await bob.batches.retrieve(theirs.id)).errors.data
        assert error.code == "model_not_found" and error.param == "body.model"
        await alice.close()
        await bob.close()


async def test_a_job_the_broker_does_not_take_is_refused_503_and_ends_failed(settings, tmp_path):
    broker = start_broker(free_port(), tmp_path / "broker.log")  # this test's own, so it can kill it
    settings = settings.model_copy(update={"kafka_bootstrap": broker.url, "produce_timeout_seconds": 1.0})
    try:
        async with serve_gateway(settings) as gateway:
            client = _client(gateway.url)
            file_id = await _upload(client, [CHAT])
            broker.kill()
            with pytest.raises(openai.InternalServerError) as caught:
                await client.fine_tuning.jobs.create(model=BASE, training_file=file_id)
            assert caught.value.status_code == 503 and caught.value.code == "broker_unavailable"
            # Nothing a trainer could run was left behind: the job it recorded ended failed.
            [job] = [j async for j in client.fine_tuning.jobs.list()]
            assert job.status == "failed" and job.error.code == "broker_unavailable"
            await client.close()
    finally:
        broker.kill()


async def test_a_job_cancelled_while_its_files_are_checked_is_never_queued(settings):
    # The store's step between checking and queuing, on the real Redis: a big file takes a
    # while to check, and a cancel that lands meanwhile must win.
    training, redis = _training(settings)
    job_id = "ftjob-" + "9" * 24
    await training.create(job_id, None, {"status": "validating_files", "model": BASE}, time.time())
    assert await training.cancel(job_id) == "cancelled"
    assert not await training.queue(job_id)
    assert (await training.get(job_id))["status"] == "cancelled"
    other = "ftjob-" + "8" * 24
    await training.create(other, None, {"status": "validating_files", "model": BASE}, time.time())
    assert await training.queue(other) and (await training.get(other))["status"] == "queued"
    await redis.aclose()
