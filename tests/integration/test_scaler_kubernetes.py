"""The Kubernetes backend: the scaler's decisions become GET/PATCH calls on a
Deployment's scale subresource, made by the official Kubernetes client.

No cluster can run here, so the API server is a stand-in: a small aiohttp
server on loopback serving /apis/apps/v1/namespaces/{ns}/deployments/{name}/scale
the way the Kubernetes API does (a Scale object; merge patches of spec.replicas;
404 Status for an unknown Deployment). Everything else is real: the client, the
broker, the lag reader and the daemon's loop.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web
from aiokafka import AIOKafkaProducer
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException

from scaler.backends.kubernetes import KubernetesBackend
from scaler.daemon import Scaler
from scaler.settings import ScalerSettings
from shared.kafka import ensure_topics

SCALE_PATH = "/apis/apps/v1/namespaces/{namespace}/deployments/{name}/scale"


class FakeApiServer:
    """The scale subresource of Deployments, as the Kubernetes API serves it."""

    def __init__(self, deployments: dict[tuple[str, str], int]) -> None:
        self.replicas = dict(deployments)
        self.calls: list[tuple[str, str, dict | None, str | None]] = []  # method, path, body, content type
        app = web.Application()
        app.router.add_route("GET", SCALE_PATH, self.get)
        app.router.add_route("PATCH", SCALE_PATH, self.patch)
        self.runner = web.AppRunner(app)
        self.url = ""

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        await self.runner.cleanup()

    def _scale(self, namespace: str, name: str) -> dict:
        replicas = self.replicas[(namespace, name)]
        return {"kind": "Scale", "apiVersion": "autoscaling/v1",
                "metadata": {"name": name, "namespace": namespace, "resourceVersion": str(len(self.calls))},
                "spec": {"replicas": replicas},
                "status": {"replicas": replicas, "selector": f"app={name}"}}

    def _not_found(self, namespace: str, name: str) -> web.Response:
        return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                  "message": f'deployments.apps "{name}" not found', "code": 404}, status=404)

    async def get(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["namespace"], request.match_info["name"]
        self.calls.append(("GET", request.path, None, None))
        if (ns, name) not in self.replicas:
            return self._not_found(ns, name)
        return web.json_response(self._scale(ns, name))

    async def patch(self, request: web.Request) -> web.Response:
        ns, name = request.match_info["namespace"], request.match_info["name"]
        body = await request.json()
        self.calls.append(("PATCH", request.path, body, request.content_type))
        if (ns, name) not in self.replicas:
            return self._not_found(ns, name)
        if request.content_type not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            return web.json_response({"kind": "Status", "code": 415, "message": "unsupported patch type"}, status=415)
        self.replicas[(ns, name)] = body["spec"]["replicas"]
        return web.json_response(self._scale(ns, name))

    def patched(self) -> list[int]:
        return [body["spec"]["replicas"] for method, _, body, _ in self.calls if method == "PATCH"]


@pytest.fixture
async def api_server():
    server = FakeApiServer({("llmq", "llmq-worker"): 0})
    await server.start()
    yield server
    await server.close()


def _backend(server: FakeApiServer, name: str = "llmq-worker") -> KubernetesBackend:
    return KubernetesBackend(name, "llmq", k8s.ApiClient(k8s.Configuration(host=server.url)))


async def test_backend_reads_and_patches_the_scale_subresource(api_server):
    backend = _backend(api_server)
    try:
        assert await backend.current() == 0
        await backend.scale(3)
        assert await backend.current() == 3
        path = "/apis/apps/v1/namespaces/llmq/deployments/llmq-worker/scale"
        assert api_server.calls == [
            ("GET", path, None, None),
            ("PATCH", path, {"spec": {"replicas": 3}}, api_server.calls[1][3]),
            ("GET", path, None, None),
        ]
        assert api_server.calls[1][3] in ("application/merge-patch+json", "application/strategic-merge-patch+json")
    finally:
        await backend.close()


async def test_unknown_deployment_fails_at_start(api_server):
    backend = _backend(api_server, name="nope")
    try:
        with pytest.raises(ApiException) as caught:
            await backend.start()
        assert caught.value.status == 404
    finally:
        await backend.close()


async def _queue(settings, count: int) -> None:
    await ensure_topics(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=20, enable_idempotence=False)
    await producer.start()
    try:
        sent = [await producer.send(settings.request_topic, json.dumps({"n": i}).encode(), partition=i % 4)
                for i in range(count)]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


async def test_decisions_become_scale_calls(settings, api_server, tmp_path):
    # 35 requests queued, no worker consumes: 0 -> 1 (activation), 2, 4 (doubling), never above
    # 4 partitions; then the queue is drained (committed) and it steps down to zero.
    await _queue(settings, 35)
    clock = [0.0]
    scaler_settings = ScalerSettings(backend="kubernetes", min=0, max=8, target_per_worker=10,
                                     stabilization_seconds=5, idle_seconds=10, state_dir=tmp_path)
    scaler = Scaler(settings, scaler_settings, _backend(api_server), clock=lambda: clock[0])
    try:
        await scaler.start()
        reasons = []
        for _ in range(4):
            reasons.append((await scaler.tick()).reason)
            clock[0] += 1
        assert api_server.patched() == [1, 2, 4]
        assert reasons == ["activation", "scale_up", "scale_up", "steady"]

        # The workers (elsewhere, in the cluster) finished everything: the group committed the ends.
        from aiokafka import AIOKafkaConsumer, TopicPartition

        group = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=settings.consumer_group,
                                 enable_auto_commit=False)
        await group.start()
        try:
            tps = [TopicPartition(settings.request_topic, p) for p in range(4)]
            group.assign(tps)
            await group.commit({tp: 9 if tp.partition < 3 else 8 for tp in tps})
        finally:
            await group.stop()
        for _ in range(20):
            await scaler.tick()
            clock[0] += 1
        # One step per decision after the window, the last one after the idle period.
        assert api_server.patched() == [1, 2, 4, 3, 2, 1, 0]
        assert scaler.last_decision.depth == 0
    finally:
        await scaler.close()
    # the Deployment keeps its replicas when the scaler stops
    assert api_server.replicas[("llmq", "llmq-worker")] == 0


async def test_dry_run_reads_but_never_patches(settings, api_server, tmp_path):
    await _queue(settings, 12)
    lines: list[str] = []
    scaler_settings = ScalerSettings(backend="kubernetes", min=0, max=8, dry_run=True, state_dir=tmp_path)
    scaler = Scaler(settings, scaler_settings, _backend(api_server), echo=lines.append)
    try:
        await scaler.start()
        for _ in range(3):
            await scaler.tick()
    finally:
        await scaler.close()
    assert api_server.patched() == []
    assert {c[0] for c in api_server.calls} == {"GET"}
    assert lines[0] == "depth=12 current=0 desired=1 reason=activation target=2 partitions=4 (dry run: not acting)"
