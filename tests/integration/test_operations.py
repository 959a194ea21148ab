"""The operational endpoints a deployment scrapes and reads."""

from __future__ import annotations

from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.helpers import submit


async def test_openapi_document_is_served(gateway, http):
    async with http.get(f"{gateway.url}/openapi.json") as resp:
        assert resp.status == 200
        document = await resp.json()
    validate(document)
    assert "post" in document["paths"]["/v1/requests"]


async def test_metrics_count_requests_by_endpoint_and_status(gateway, http):
    await submit(http, gateway.url, {"input": {"prompt": "count me"}})
    async with http.post(f"{gateway.url}/v1/requests", data=b"nope", headers={"Content-Type": "application/json"}):
        pass
    async with http.get(f"{gateway.url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    post = (("endpoint", "/v1/requests"), ("method", "POST"))
    assert samples[("llmq_gateway_http_requests_total", tuple(sorted(post + (("code", "202"),))))] == 1
    assert samples[("llmq_gateway_http_requests_total", tuple(sorted(post + (("code", "400"),))))] == 1
    assert samples[("llmq_gateway_requests_enqueued_total", ())] == 1
