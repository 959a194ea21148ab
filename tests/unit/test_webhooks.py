"""The webhook pieces that need no services: where a URL may point (literal
addresses only: no DNS is reachable here, the integration tests resolve
`localhost`), Standard Webhooks signatures, the payload's bound, and the event
message's subjects (a request's, a batch's)."""

from __future__ import annotations

import json

import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from shared.schema import Output, RequestView, Status, Timings, WebhookDeliveries
from shared.webhooks import (
    EventError,
    WebhookEventMessage,
    WebhookUrlError,
    _bounded,
    check_webhook_url,
    new_secret,
    parse_event,
    signed_headers,
)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://[::1]:8080/x", "http://[::ffff:127.0.0.1]/", "http://10.0.0.1/",
    "http://172.16.5.4/", "http://192.168.1.1/", "http://169.254.169.254/latest/meta-data",
    "http://[fe80::1]/", "http://100.64.0.1/", "http://0.0.0.0/", "http://224.0.0.1/", "http://240.0.0.1/",
    "http://[fc00::1]/", "https://user:pass@93.184.216.34/", "ftp://93.184.216.34/",
])
async def test_non_public_and_malformed_urls_are_refused(url):
    with pytest.raises(WebhookUrlError):
        await check_webhook_url(url, allow_private=False)


@pytest.mark.parametrize("url", ["https://93.184.216.34/hook", "http://[2606:4700::6810:85e5]:8443/x?y=1"])
async def test_public_addresses_pass(url):
    await check_webhook_url(url, allow_private=False)


async def test_the_setting_allows_private_addresses_but_not_other_schemes():
    await check_webhook_url("http://127.0.0.1:9000/hook", allow_private=True)
    with pytest.raises(WebhookUrlError):
        await check_webhook_url("file:///etc/passwd", allow_private=True)


def test_a_signature_verifies_with_standardwebhooks_and_only_with_its_secret():
    secret, other = new_secret(), new_secret()
    event = WebhookEventMessage(id="r1.completed", type="completed", request_id="r1", url="https://a.example/h",
                                created_at=1_700_000_000.0, data={"id": "r1", "status": "succeeded"})
    body = event.body()
    headers = signed_headers(secret, event.id, body)
    payload = Webhook(secret).verify(body, headers)
    assert payload == {"type": "request.completed", "timestamp": "2023-11-14T22:13:20Z",
                       "data": {"id": "r1", "status": "succeeded"}}
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)


def test_an_output_too_large_for_the_payload_is_left_out():
    view = RequestView(id="r1", status=Status.succeeded, output=Output(text="x" * 10_000, finish_reason="length"),
                       timings=Timings(), webhook=WebhookDeliveries(url="https://a.example/h", events=["completed"]))
    data = json.loads(view.model_dump_json())
    assert _bounded(data, 100_000) == data
    bounded = _bounded(data, 4096)
    assert bounded["output"] == {"text": "", "finish_reason": "length", "truncated": True}
    assert len(json.dumps(bounded)) < 4096


def test_an_event_without_a_subject_is_a_requests_and_a_requests_is_written_without_one():
    """The event message grew `subject` within version 1: what senders and producers from
    before batches had webhooks wrote and read still means the same."""
    before = b'{"v":1,"id":"r1.start","type":"start","request_id":"r1","url":"https://a.example/h",' \
             b'"tenant":null,"created_at":1.0,"data":{}}'
    event = parse_event(before)
    assert (event.subject, event.subject_id) == ("request", "r1")
    assert json.loads(event.body())["type"] == "request.start"
    assert event.to_bytes() == before  # a request's event is written as before: no `subject`


def test_a_batch_event_names_its_subject_and_is_typed_batch():
    event = WebhookEventMessage(id="batch_1.completed", type="completed", subject="batch", subject_id="batch_1",
                                url="https://a.example/h", created_at=1.0, data={"status": "cancelled"})
    written = json.loads(event.to_bytes())
    assert written["subject"] == "batch" and written["request_id"] == "batch_1"
    assert parse_event(event.to_bytes()) == event
    assert json.loads(event.body()) == {"type": "batch.completed", "timestamp": "1970-01-01T00:00:01Z",
                                        "data": {"status": "cancelled"}}
    with pytest.raises(EventError):
        parse_event(event.to_bytes().replace(b'"batch"', b'"file"'))  # an unknown subject: dead-lettered
