"""OpenAI's Batch API over a real stack (broker, Redis, gateway, workers), driven by
the official `openai` client: a batch runs end to end, is cancelled midway, is
refused for a bad file, is private to its API key, and survives its gateway
being killed mid-enqueue."""

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
from aiokafka import AIOKafkaConsumer, TopicPartition

from deploy.devstack import free_port, python_env
from shared.keys import Keys
from shared.store import connect_redis
from tests.conftest import isolated_settings, serve_gateway
from tests.integration.helpers import api_keys

FINAL = {"completed", "failed", "cancelled", "expired"}


def _client(base_url: str, api_key: str = "unused: auth is off") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=api_key, max_retries=0)


def _jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _chat_lines(count: int, model: str = "echo", max_tokens: int | None = None) -> list[dict]:
    body = {"max_tokens": max_tokens} if max_tokens else {}
    return [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": model, "messages": [{"role": "user", "content": f"hello {i}"}], **body}}
            for i in range(count)]


async def _upload(client: openai.AsyncOpenAI, lines: list[dict] | bytes) -> str:
    data = lines if isinstance(lines, bytes) else _jsonl(lines)
    made = await client.files.create(file=("batch.jsonl", io.BytesIO(data)), purpose="batch")
    return made.id


async def _run_batch(client: openai.AsyncOpenAI, lines: list[dict] | bytes,
                     endpoint: str = "/v1/chat/completions"):
    file_id = await _upload(client, lines)
    return await client.batches.create(input_file_id=file_id, endpoint=endpoint, completion_window="24h",
                                       metadata={"job": "test"})


async def _wait_batch(client: openai.AsyncOpenAI, batch_id: str, timeout: float = 60, until=FINAL):
    deadline = time.monotonic() + timeout
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in until:
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch still {batch.status} after {timeout} s: {batch}")
        await asyncio.sleep(0.2)


async def _lines_of(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines() if line]


async def _bulk_messages(settings) -> int:
    """How many messages the bulk topic holds (its end offsets, from a probe in no group)."""
    probe = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await probe.start()
    try:
        partitions = probe.partitions_for_topic(settings.bulk_topic_name) or set()
        if not partitions:
            await probe.client.force_metadata_update()
            partitions = probe.partitions_for_topic(settings.bulk_topic_name) or set()
        ends = await probe.end_offsets([TopicPartition(settings.bulk_topic_name, p) for p in partitions])
        return sum(ends.values())
    finally:
        await probe.stop()


# ---- end to end ------------------------------------------------------------------


async def test_a_batch_runs_end_to_end_with_the_openai_client(gateway, start_worker, http):
    await start_worker()
    client = _client(gateway.url)
    created = await _run_batch(client, _chat_lines(25))
    assert created.status == "validating" and created.endpoint == "/v1/chat/completions"
    assert created.metadata == {"job": "test"} and created.completion_window == "24h"

    batch = await _wait_batch(client, created.id)
    assert batch.status == "completed", batch
    assert batch.request_counts.total == 25 and batch.request_counts.completed == 25
    assert batch.request_counts.failed == 0
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at and batch.error_file_id is None
    output = await _lines_of(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in output) == sorted(f"req-{i}" for i in range(25))
    for line in output:
        number = line["custom_id"].split("-")[1]
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == f"user: hello {number}"  # the echo engine's answer

    output_file = await client.files.retrieve(batch.output_file_id)
    assert output_file.purpose == "batch_output" and output_file.bytes > 0
    # Each line is a request of the same key on the bulk lane, readable as any other.
    async with http.get(f"{gateway.url}/v1/requests/{batch.id}-0") as resp:
        line_record = await resp.json()
    assert line_record["lane"] == "bulk" and line_record["status"] == "succeeded"
    assert [b.id async for b in client.batches.list()] == [batch.id]
    async with http.get(f"{gateway.url}/metrics") as resp:
        metrics = await resp.text()
    assert "llmq_gateway_batch_lines_enqueued_total 25.0" in metrics
    assert 'llmq_gateway_batches_ended_total{status="completed"} 1.0' in metrics
    await client.close()


async def test_a_completions_batch_on_the_torch_engine(gateway, start_worker, tiny_model_dir):
    await start_worker(engine="torch", model=str(tiny_model_dir), torch_dtype="float32")
    client = _client(gateway.url)
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"model": str(tiny_model_dir), "prompt": f"count {i}", "max_tokens": 4, "temperature": 0}}
             for i in range(3)]
    created = await _run_batch(client, lines, endpoint="/v1/completions")
    batch = await _wait_batch(client, created.id, timeout=120)
    assert batch.status == "completed" and batch.request_counts.completed == 3, batch
    output = await _lines_of(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in output) == ["c0", "c1", "c2"]
    for line in output:
        body = line["response"]["body"]
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 4
        assert body["choices"][0]["text"]  # the model's (random-weight) tokens
    await client.close()


async def test_cancel_mid_batch_ends_cancelled_with_counts_that_add_up(gateway, start_worker, http):
    await start_worker(echo_token_delay_ms=20, max_in_flight=8)  # a few at a time, so most are still queued
    client = _client(gateway.url)
    total = 200
    created = await _run_batch(client, _chat_lines(total))
    await _wait_batch(client, created.id, until={"in_progress"})
    while (await client.batches.retrieve(created.id)).request_counts.completed < 2:
        await asyncio.sleep(0.1)

    cancelling = await client.batches.cancel(created.id)
    assert cancelling.status in ("cancelling", "cancelled")
    batch = await _wait_batch(client, created.id)
    assert batch.status == "cancelled" and batch.cancelled_at, batch
    counts = batch.request_counts.model_dump()  # OpenAI's three, and llmq's `cancelled`
    assert counts["completed"] >= 2 and counts["cancelled"] > 0, counts
    assert counts["completed"] + counts["failed"] + counts["cancelled"] == total
    output = await _lines_of(client, batch.output_file_id)
    errors = await _lines_of(client, batch.error_file_id)
    assert len(output) == counts["completed"] and len(output) + len(errors) == total
    assert sorted(line["custom_id"] for line in output + errors) == sorted(f"req-{i}" for i in range(total))
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    await client.close()


async def test_a_batch_past_its_window_expires_with_its_unfinished_lines_failed(gateway, start_worker):
    await start_worker(echo_token_delay_ms=20, max_in_flight=4)
    client = _client(gateway.url)
    total = 100
    created = await _run_batch(client, _chat_lines(total))
    await _wait_batch(client, created.id, until={"in_progress"})
    while (await client.batches.retrieve(created.id)).request_counts.completed < 2:
        await asyncio.sleep(0.1)
    # 24 hours pass: the window's end, moved to now (the only thing this test changes by hand)
    redis = connect_redis(gateway.settings.redis_url)
    await redis.hset(Keys.of(gateway.settings).batch(created.id), "expires_at", time.time())
    await redis.aclose()

    batch = await _wait_batch(client, created.id)
    assert batch.status == "expired" and batch.expired_at, batch
    counts = batch.request_counts.model_dump()
    assert counts["completed"] >= 2 and counts["failed"] > 0 and counts["cancelled"] == 0, counts
    assert counts["completed"] + counts["failed"] == total
    output = await _lines_of(client, batch.output_file_id)
    errors = await _lines_of(client, batch.error_file_id)
    assert len(output) == counts["completed"] and len(errors) == counts["failed"]
    assert sorted(line["custom_id"] for line in output + errors) == sorted(f"req-{i}" for i in range(total))
    assert {line["error"]["code"] for line in errors} == {"batch_expired"}
    assert all(line["response"] is None for line in errors)
    await client.close()


# ---- refused files ---------------------------------------------------------------

BAD_FILES = {
    "malformed JSONL": (_jsonl(_chat_lines(2)) + b'{"custom_id": "x", not json\n', "invalid_json_line", 3),
    "a duplicate custom_id": (_jsonl(_chat_lines(2) + _chat_lines(1)), "duplicate_custom_id", 3),
    "a line for another endpoint": (
        _jsonl(_chat_lines(1) + [{**_chat_lines(1)[0], "custom_id": "other", "url": "/v1/completions"}]),
        "mismatched_endpoint", 2),
    "a body the endpoint refuses": (
        _jsonl(_chat_lines(1) + [{**_chat_lines(1)[0], "custom_id": "b", "body": {"model": "echo", "messages": [],
                                                                                  "n": 3}}]),
        "unsupported_parameter", 2),
    "a second model": (_jsonl(_chat_lines(1) + [{**_chat_lines(1, model="other")[0], "custom_id": "m"}]),
                       "mismatched_model", 2),
    "too many lines": (_jsonl(_chat_lines(6)), "too_many_lines", 6),
    "a line over 4 MiB": (_jsonl(_chat_lines(1)) + b'{"custom_id": "' + b"x" * (5 << 20) + b'"}\n'
                          + _jsonl(_chat_lines(2)[1:]), "line_too_long", 2),
}


@pytest.mark.parametrize("name", BAD_FILES)
async def test_a_bad_file_fails_the_batch_and_enqueues_nothing(broker, redis_server, name):
    settings = isolated_settings(broker, redis_server, batch_max_lines=5)
    data, code, line = BAD_FILES[name]
    async with serve_gateway(settings) as gateway:
        client = _client(gateway.url)
        created = await _run_batch(client, data)
        batch = await _wait_batch(client, created.id)
        assert batch.status == "failed" and batch.failed_at, batch
        assert (batch.errors.data[0].code, batch.errors.data[0].line) == (code, line), batch.errors
        assert batch.errors.data[0].message
        assert batch.request_counts.total == 0 and batch.output_file_id is None
        await client.close()
    assert await _bulk_messages(settings) == 0


async def test_a_file_over_the_limit_is_refused_at_upload(broker, redis_server):
    settings = isolated_settings(broker, redis_server, max_file_bytes=2048)
    async with serve_gateway(settings) as gateway:
        client = _client(gateway.url)
        with pytest.raises(openai.APIStatusError) as refused:
            await _upload(client, _chat_lines(100))
        assert refused.value.status_code == 413
        assert [f async for f in client.files.list()] == []
        await _upload(client, _chat_lines(2))  # a small one still goes in
        await client.close()


# ---- isolation -----------------------------------------------------------------------


async def test_another_key_cannot_see_a_file_or_batch(settings, start_worker):
    settings = settings.model_copy(update={"auth": True})
    keys = api_keys(settings, "alice", "bob")
    await start_worker()
    async with serve_gateway(settings) as gateway:
        alice, bob = _client(gateway.url, keys["alice"]), _client(gateway.url, keys["bob"])
        created = await _run_batch(alice, _chat_lines(3))
        batch = await _wait_batch(alice, created.id)
        assert batch.status == "completed"
        for file_id in (created.input_file_id, batch.output_file_id):
            with pytest.raises(openai.NotFoundError):
                await bob.files.retrieve(file_id)
            with pytest.raises(openai.NotFoundError):
                await bob.files.content(file_id)
            with pytest.raises(openai.NotFoundError):
                await bob.files.delete(file_id)
        with pytest.raises(openai.NotFoundError):
            await bob.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            await bob.batches.cancel(batch.id)
        with pytest.raises(openai.NotFoundError):
            await bob.batches.create(input_file_id=created.input_file_id, endpoint="/v1/chat/completions",
                                     completion_window="24h")
        assert [b async for b in bob.batches.list()] == [] and [f async for f in bob.files.list()] == []
        assert len(await _lines_of(alice, batch.output_file_id)) == 3  # still there for its owner
        with pytest.raises(openai.AuthenticationError):
            await _client(gateway.url, "llmq_not-a-key").batches.list()
        await alice.close()
        await bob.close()


# ---- a gateway killed mid-enqueue -----------------------------------------------------


class GatewayProcess:
    """A `python -m gateway.main` child on its own port."""

    def __init__(self, settings, log_path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = python_env(**settings.model_copy(update={"http_port": self.port}).to_env())
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway.main"], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    async def ready(self, http) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                async with http.get(f"{self.url}/healthz") as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"gateway not up:\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


async def test_a_gateway_killed_mid_enqueue_is_resumed_by_another(broker, redis_server, tmp_path, http,
                                                                  spawn_worker):
    settings = isolated_settings(broker, redis_server, batch_enqueue_chunk=10, batch_lease_seconds=2,
                                 batch_poll_seconds=0.2, files_dir=tmp_path / "files")
    total = 3000
    redis = connect_redis(settings.redis_url)
    batch_key = Keys.of(settings).batch
    first = GatewayProcess(settings, tmp_path / "gateway-1.log")
    second = None
    try:
        await first.ready(http)
        client = _client(first.url)
        created = await _run_batch(client, _chat_lines(total))
        # SIGKILL it once part of the batch is enqueued (no worker runs yet)
        deadline = time.monotonic() + 60
        while int(await redis.hget(batch_key(created.id), "cursor") or 0) == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        first.kill()
        cursor = int(await redis.hget(batch_key(created.id), "cursor") or 0)
        assert 0 < cursor < total, cursor
        await client.close()

        second = GatewayProcess(settings, tmp_path / "gateway-2.log")
        await second.ready(http)
        spawn_worker(settings)
        client = _client(second.url)
        batch = await _wait_batch(client, created.id, timeout=240)
        assert batch.status == "completed", batch
        assert batch.request_counts.completed == total and batch.request_counts.failed == 0
        output = await _lines_of(client, batch.output_file_id)
        custom_ids = [line["custom_id"] for line in output]
        assert len(custom_ids) == total and set(custom_ids) == {f"req-{i}" for i in range(total)}
        # each line ran once: one attempt on every record
        async with redis.pipeline(transaction=False) as pipe:
            for index in range(total):
                pipe.hmget(Keys.of(settings).request(f"{created.id}-{index}"), "attempts", "status")
            records = await pipe.execute()
        assert {tuple(record) for record in records} == {("1", "succeeded")}
        await client.close()
    finally:
        first.kill()
        if second is not None:
            second.kill()
        await redis.aclose()
