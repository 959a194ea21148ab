"""What decides whether two requests share a result-cache entry (shared/store/cache.py
`cache_key`): the API key and what decides the output, nothing else."""

from __future__ import annotations

from shared.schema import RequestMessage, SubmitRequest
from shared.store.cache import cache_key

GREEDY = {"input": {"prompt": "A queue is"}, "params": {"max_tokens": 8, "temperature": 0}}


def key(tenant: str | None = "alice", **changes) -> str | None:
    return cache_key(SubmitRequest.model_validate({**GREEDY, **changes}), tenant)


def test_only_deterministic_requests_have_a_key():
    assert key() is not None
    assert key(params={"temperature": 0.7}) is None
    assert key(params={"temperature": 0.7, "seed": 3}) is not None


def test_the_api_key_and_what_decides_the_output_change_the_key():
    others = [key("bob"), key(None), key(model="echo"), key(adapter="style-a"), key(input={"prompt": "A queue"}),
              key(input={"messages": [{"role": "user", "content": "A queue is"}]}),
              key(params={"max_tokens": 9, "temperature": 0}),
              key(params={"max_tokens": 8, "temperature": 0, "seed": 1}),
              key(params={"max_tokens": 8, "temperature": 0, "stop": ["."]})]
    assert len({key(), *others}) == len(others) + 1


def test_when_and_how_it_runs_does_not():
    assert key(priority=5, metadata={"job": "7"}, deadline="2999-01-01T00:00:00Z", id="mine") == key()
    assert key(params={"temperature": 0.0, "max_tokens": 8.0, "top_p": 1, "top_k": 0, "stop": []}) == key()


def test_the_worker_computes_the_key_the_gateway_looks_up():
    message = RequestMessage.model_validate({**GREEDY, "v": 1, "id": "r1", "tenant": "alice",
                                             "submitted_at": "2026-01-01T00:00:00Z"})
    assert cache_key(message, message.tenant) == key()
