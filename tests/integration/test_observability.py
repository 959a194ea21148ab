"""One trace per request across processes, JSON logs that carry its ids and no
prompt, and worker metrics — on real gateway and worker processes exporting
to a real OTLP/HTTP receiver (this test's own aiohttp server decoding the
OTLP protobuf payloads, as Jaeger's receiver does)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from prometheus_client.parser import text_string_to_metric_families

from deploy.devstack import free_port, python_env, wait_for_port
from tests.integration.helpers import submit, wait_final, wait_until

SECRET_PROMPT = "the-secret-prompt-7f3a alpha beta"


@dataclass
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict
    links: list[tuple[str, str]] = field(default_factory=list)


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind)


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[Span] = []

    async def traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            service = next(_value(a.value) for a in resource_spans.resource.attributes if a.key == "service.name")
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    self.spans.append(Span(
                        service, s.name, s.kind, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                        {a.key: _value(a.value) for a in s.attributes},
                        [(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                    ))
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def named(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]


@pytest.fixture
async def receiver():
    otlp = OtlpReceiver()
    app = web.Application()
    app.router.add_post("/v1/traces", otlp.traces)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    otlp.endpoint = f"http://127.0.0.1:{port}"
    yield otlp
    await runner.cleanup()


@pytest.fixture
def stack(settings, receiver, tmp_path):
    """Gateway and worker as real processes, tracing to the receiver, logging JSON to files."""
    yield from _stack(settings, receiver, tmp_path)


@pytest.fixture
def head_sampled_stack(settings, receiver, tmp_path):
    """The same, head sampling as deploy/k8s does it (parentbased_traceidratio) at a ratio of
    0: the gateway samples no trace it starts, so what reaches the receiver is only what a
    caller's sampled traceparent asked for."""
    yield from _stack(settings, receiver, tmp_path, OTEL_TRACES_SAMPLER="parentbased_traceidratio",
                      OTEL_TRACES_SAMPLER_ARG="0")


def _stack(settings, receiver, tmp_path, **otel):
    settings = settings.model_copy(update={"http_port": free_port(), "metrics_port": free_port(),
                                           "log_format": "json"})
    procs, logs = [], {}
    for role, module in (("gateway", "gateway.main"), ("worker", "workers.main")):
        logs[role] = tmp_path / f"{role}.log"
        env = python_env(**settings.to_env(), OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                         OTEL_SERVICE_NAME=f"llmq-{role}", OTEL_BSP_SCHEDULE_DELAY="100", **otel)
        procs.append(subprocess.Popen([sys.executable, "-m", module], env=env, stdout=subprocess.DEVNULL,
                                      stderr=open(logs[role], "w")))
    wait_for_port(settings.http_port, 30, procs[0], "gateway")
    wait_for_port(settings.metrics_port, 30, procs[1], "worker metrics")
    yield settings, f"http://127.0.0.1:{settings.http_port}", logs
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(30)


def _log_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


async def test_one_request_is_one_trace_across_gateway_and_worker(stack, receiver, http):
    settings, base, logs = stack
    topic = settings.request_topic
    request_id = await submit(http, base, {"input": {"prompt": SECRET_PROMPT}, "params": {"max_tokens": 8}})
    assert (await wait_final(http, base, request_id))["status"] == "succeeded"

    await wait_until(lambda: asyncio.sleep(0, bool(receiver.named("write result"))), 15, "the worker's spans")
    await wait_until(lambda: asyncio.sleep(0, bool(receiver.named("GET /v1/requests/{id}"))), 15, "the poll span")

    [server] = [s for s in receiver.named("POST /v1/requests") if s.attributes.get("llmq.request_id") == request_id]
    [publish] = receiver.named(f"publish {topic}")
    [process] = receiver.named(f"process {topic}")
    [generate] = receiver.named("text_completion echo")
    [write] = receiver.named("write result")
    [batch] = receiver.named(f"process batch {topic}")

    assert {server.service, publish.service} == {"llmq-gateway"}
    assert {process.service, generate.service, write.service, batch.service} == {"llmq-worker"}
    trace_id = server.trace_id
    assert {s.trace_id for s in (publish, process, generate, write)} == {trace_id}
    # gateway server span → PRODUCER → (Kafka headers) → CONSUMER process → engine, result write
    assert publish.parent_id == server.span_id and publish.kind == 4  # SPAN_KIND_PRODUCER
    assert process.parent_id == publish.span_id and process.kind == 5  # SPAN_KIND_CONSUMER
    assert generate.parent_id == process.span_id and write.parent_id == process.span_id
    assert (trace_id, publish.span_id) in batch.links
    assert batch.attributes["messaging.batch.message_count"] == 1

    assert publish.attributes["messaging.system"] == "kafka"
    assert publish.attributes["messaging.destination.name"] == topic
    assert process.attributes["llmq.request_id"] == request_id
    assert process.attributes["messaging.kafka.offset"] >= 0
    assert process.attributes["llmq.queue_seconds"] >= 0
    assert generate.attributes["gen_ai.request.model"] == "echo"
    assert generate.attributes["gen_ai.usage.input_tokens"] == 3
    assert generate.attributes["gen_ai.usage.output_tokens"] == 3
    assert generate.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    polls = [s for s in receiver.named("GET /v1/requests/{id}") if s.attributes.get("llmq.request_id") == request_id]
    assert polls

    # JSON logs: the worker's line about the request carries its ids; no prompt anywhere.
    worker_lines = _log_lines(logs["worker"])
    [finished] = [line for line in worker_lines if line["event"] == "request_finished"]
    assert finished["request_id"] == request_id
    assert finished["trace_id"] == trace_id and finished["span_id"] == process.span_id
    assert finished["level"] == "info" and "timestamp" in finished
    for path in logs.values():
        assert SECRET_PROMPT not in path.read_text()


async def test_every_log_line_is_json_that_names_its_service_and_says_why_things_failed(stack, http):
    settings, base, logs = stack
    async with http.post(f"{base}/v1/requests", json={"input": {"prompt": 42}}) as resp:
        assert resp.status == 422
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        for key, value in ((b"junk-1", b'{"v": 1, "id": "junk-1"}'),
                           (b"over", json.dumps({"v": 1, "id": "over", "input": {"prompt": "p"},
                                                 "params": {"max_tokens": 100000}}).encode())):
            await producer.send_and_wait(settings.request_topic, value, key=key)
    finally:
        await producer.stop()
    assert (await wait_final(http, base, "over", not_yet_recorded=True))["status"] == "failed"

    async def dead_lettered() -> bool:
        return any(line["event"] == "message_dead_lettered" for line in _log_lines(logs["worker"]))

    await wait_until(dead_lettered, 15, "the dead letter's log line")
    lines = {role: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
             for role, path in logs.items()}  # every line parses: no plain-text or progress-bar lines
    assert {line["service"] for line in lines["gateway"]} == {"llmq-gateway"}
    assert {line["service"] for line in lines["worker"]} == {"llmq-worker"}
    assert len({line["worker"] for line in lines["worker"]}) == 1
    [refused] = [line for line in lines["gateway"] if line["event"] == "request_refused" and line["method"] == "POST"]
    assert (refused["status"], refused["type"], refused["field"]) == (422, "invalid_request", "input.prompt")
    [dead] = [line for line in lines["worker"] if line["event"] == "message_dead_lettered"]
    assert (dead["key"], dead["request_id"]) == ("junk-1", "junk-1") and dead["reason"].startswith("input:")
    [failed] = [line for line in lines["worker"] if line["event"] == "request_finished" and line["request_id"] == "over"]
    assert (failed["status"], failed["error_type"]) == ("failed", "invalid_request")
    assert failed["error"] == "params.max_tokens: must be at most 4096"


async def test_a_producer_s_traceparent_is_joined(stack, receiver, http):
    settings, base, _ = stack
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await producer.start()
    try:
        value = json.dumps({"v": 1, "id": "traced-elsewhere", "input": {"prompt": "p"}}).encode()
        await producer.send_and_wait(settings.request_topic, value, key=b"traced-elsewhere",
                                     headers=[("traceparent", f"00-{trace_id}-{parent}-01".encode())])
    finally:
        await producer.stop()
    assert (await wait_final(http, base, "traced-elsewhere", not_yet_recorded=True))["status"] == "succeeded"
    await wait_until(lambda: asyncio.sleep(0, bool(receiver.named(f"process {settings.request_topic}"))), 15,
                     "the process span")
    [process] = receiver.named(f"process {settings.request_topic}")
    assert (process.trace_id, process.parent_id) == (trace_id, parent)


async def test_head_sampling_traces_a_request_everywhere_or_nowhere(head_sampled_stack, receiver, http):
    """An unsampled request makes no span in the gateway or the worker (the worker follows the
    flag in the message headers), yet its log lines still name its trace id; a caller's sampled
    traceparent is followed by both, one whole trace."""
    settings, base, logs = head_sampled_stack
    topic = settings.request_topic
    plain = await submit(http, base, {"input": {"prompt": "not sampled"}, "params": {"max_tokens": 8}})
    trace_id, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    async with http.post(f"{base}/v1/requests", json={"input": {"prompt": "sampled"}, "params": {"max_tokens": 8}},
                         headers={"traceparent": f"00-{trace_id}-{parent}-01"}) as resp:
        assert resp.status == 202
        sampled = (await resp.json())["id"]
    for request_id in (plain, sampled):
        assert (await wait_final(http, base, request_id))["status"] == "succeeded"
    await wait_until(lambda: asyncio.sleep(0, bool(receiver.named("write result"))), 15, "the worker's spans")
    await asyncio.sleep(0.5)  # the unsampled request's spans, if any were wrongly made, had as long

    [server] = [s for s in receiver.named("POST /v1/requests")]
    [publish] = receiver.named(f"publish {topic}")
    [process] = receiver.named(f"process {topic}")
    [write] = receiver.named("write result")
    assert (server.trace_id, server.parent_id) == (trace_id, parent)
    assert {s.trace_id for s in (publish, process, write)} == {trace_id}
    assert process.attributes["llmq.request_id"] == sampled
    assert all(s.attributes.get("llmq.request_id") != plain for s in receiver.spans)
    # the unsampled request's log line still has a trace id, one that no exported span has
    [finished] = [line for line in _log_lines(logs["worker"])
                  if line["event"] == "request_finished" and line["request_id"] == plain]
    assert len(finished["trace_id"]) == 32 and finished["trace_id"] not in {s.trace_id for s in receiver.spans}


async def test_worker_metrics_count_what_it_served(stack, http):
    settings, base, _ = stack
    ids = [await submit(http, base, {"input": {"prompt": f"a b c {i}"}}) for i in range(3)]
    for request_id in ids:
        assert (await wait_final(http, base, request_id))["status"] == "succeeded"
    async with http.get(f"http://127.0.0.1:{settings.metrics_port}/metrics") as resp:
        text = await resp.text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("llmq_worker_requests_total", (("status", "succeeded"),))] == 3
    assert samples[("llmq_worker_generation_tokens_total", ())] == 12
    assert samples[("llmq_worker_prompt_tokens_total", ())] == 12
    for histogram in ("llmq_worker_e2e_request_latency_seconds", "llmq_worker_request_queue_time_seconds",
                      "llmq_worker_time_to_first_token_seconds", "llmq_worker_time_per_output_token_seconds"):
        assert samples[(f"{histogram}_count", ())] == 3, histogram
    assert samples[("llmq_worker_batch_size_count", ())] >= 1
    assert samples[("llmq_worker_num_requests_running", ())] == 0
