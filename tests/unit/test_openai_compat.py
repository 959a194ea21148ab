"""OpenAI bodies become the llmq specs they mean, anything llmq cannot honour is refused by
name, and the answers built are what the official `openai` client parses. The client talks
to an httpx2 MockTransport here (the gateway's OpenAI routes are not part of this module),
so what it sends and what it reads are the real SDK's own."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import httpx2
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from gateway.openai_compat import (
    SSE_DONE,
    OpenAIError,
    StreamChunks,
    completion_response,
    limit_error,
    openai_param,
    parse_openai_body,
    sse,
    view_error,
)
from shared.schema import ErrorDetail, Output, Params, RequestView, Status, Timings, Usage

USER = [{"role": "user", "content": "Hi"}]
SUBMITTED = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def parse(kind, **body):
    return parse_openai_body(kind, json.dumps(body).encode())


def chat(**body):
    return parse("chat", **{"model": "m", "messages": USER, **body})


def refusal(kind, raw: bytes) -> OpenAIError:
    with pytest.raises(OpenAIError) as refused:
        parse_openai_body(kind, raw)
    return refused.value


def sdk(respond, max_retries=0, sent=None) -> openai.OpenAI:
    """The official client; every HTTP request it makes is answered by `respond` (and kept in `sent`)."""
    def handler(request: httpx2.Request) -> httpx2.Response:
        if sent is not None:
            sent.append(request)
        return respond(request)
    return openai.OpenAI(base_url="http://llmq.test/v1", api_key="unused", max_retries=max_retries,
                         http_client=httpx2.Client(transport=httpx2.MockTransport(handler)))


def view(status=Status.succeeded, text="Hello", finish_reason="stop", error=None):
    succeeded = status is Status.succeeded
    return RequestView(
        id="r1", status=status, model="echo" if succeeded else None,
        output=Output(text=text, finish_reason=finish_reason) if succeeded else None,
        usage=Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5) if succeeded else None,
        error=error, timings=Timings(submitted_at=SUBMITTED),
    )


# ---- requests ------------------------------------------------------------------

def test_a_plain_chat_keeps_llmq_defaults():
    call = chat()
    assert (call.kind, call.model, call.stream, call.include_usage) == ("chat", "m", False, False)
    assert call.spec.model == "m"
    assert call.spec.input.messages[0].model_dump() == {"role": "user", "content": "Hi"}
    assert call.spec.params == Params()
    assert call.spec.metadata == {}


@pytest.mark.parametrize("max_tokens", [{}, {"max_tokens": None}])
def test_a_completion_generates_16_tokens_unless_told_as_openai_does(max_tokens):
    call = parse("completion", model="m", prompt="Once", **max_tokens)
    assert (call.kind, call.spec.input.prompt, call.spec.params.max_tokens) == ("completion", "Once", 16)


def test_max_completion_tokens_wins_and_its_name_is_used_for_limit_errors():
    call = chat(max_tokens=50, max_completion_tokens=40)
    assert call.spec.params.max_tokens == 40
    refused = limit_error(call, call.spec.over_limits(max_prompt_chars=1000, max_tokens=30))
    assert (refused.status, refused.param, refused.code) == (400, "max_completion_tokens", "invalid_value")
    assert refused.message == "max_completion_tokens: must be at most 30"
    assert chat(max_tokens=50).spec.params.max_tokens == 50


@pytest.mark.parametrize(("kind", "body", "param"), [
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x" * 11}]}, "messages"),
    ("completion", {"model": "m", "prompt": "x" * 11}, "prompt"),
])
def test_a_prompt_over_the_limit_is_reported_as_openai_context_length_exceeded(kind, body, param):
    call = parse(kind, **body)
    refused = limit_error(call, call.spec.over_limits(max_prompt_chars=10, max_tokens=1000))
    assert (refused.status, refused.param, refused.code) == (400, param, "context_length_exceeded")


def test_sampling_parameters_carry_over():
    call = chat(temperature=0, top_p=0.9, top_k=40.0, seed=7, stop="\n\n")
    assert call.spec.params.model_dump() == {"max_tokens": 256, "temperature": 0.0, "top_p": 0.9, "top_k": 40,
                                             "stop": ["\n\n"], "seed": 7}


def test_text_parts_are_joined_and_developer_is_the_system_role():
    call = chat(messages=[
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "refusal": None, "tool_calls": None},
    ])
    assert [m.model_dump() for m in call.spec.input.messages] == [
        {"role": "system", "content": "Be brief.\nBe kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_user_metadata_and_llmq_extras_reach_the_spec():
    call = chat(user="alice", metadata={"job": "nightly"}, priority=-5, adapter="fr", deadline="2030-01-01T00:00:00Z")
    assert call.spec.metadata == {"job": "nightly", "user": "alice"}
    assert (call.spec.priority, call.spec.adapter) == (-5, "fr")
    assert call.spec.deadline == datetime(2030, 1, 1, tzinfo=timezone.utc)


def test_include_usage_needs_a_stream():
    call = chat(stream=True, stream_options={"include_usage": True})
    assert (call.stream, call.include_usage) == (True, True)
    assert chat(stream=True, stream_options=None).include_usage is False


def test_the_defaults_frameworks_always_send_are_accepted():
    call = chat(frequency_penalty=0, presence_penalty=0.0, logprobs=False, top_logprobs=None, n=1, logit_bias={},
                tools=[], tool_choice="none", parallel_tool_calls=None, response_format={"type": "text"},
                service_tier="auto", store=False, modalities=["text"], reasoning_effort=None, stream_options=None,
                prediction=None, audio=None, web_search_options=None, functions=None, function_call=None,
                prompt_cache_key="tenant-7")
    assert call.spec.params == Params()
    completion = parse("completion", model="m", prompt="x", echo=False, best_of=1, suffix=None, n=1, logprobs=None,
                       frequency_penalty=0, presence_penalty=0, logit_bias=None)
    assert completion.spec.params == Params(max_tokens=16)


def test_what_the_official_client_sends_is_understood():
    sent = []
    client = sdk(lambda r: httpx2.Response(200, text=sse(StreamChunks(chat(), "x", 0, "m").first()).decode()),
                 sent=sent)
    client.chat.completions.create(
        model="m", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_completion_tokens=5, temperature=0.2, stop="END", seed=3, n=1, frequency_penalty=0, user="alice",
        metadata={"k": "v"}, stream=True, stream_options={"include_usage": True},
    ).close()
    call = parse_openai_body("chat", sent[0].content)
    assert (call.model, call.stream, call.include_usage) == ("m", True, True)
    assert call.spec.params.model_dump() == {"max_tokens": 5, "temperature": 0.2, "top_p": 1.0, "top_k": 0,
                                             "stop": ["END"], "seed": 3}
    assert call.spec.metadata == {"k": "v", "user": "alice"}
    assert [m.role for m in call.spec.input.messages] == ["system", "user"]


def test_a_reply_appended_to_the_conversation_is_accepted_back():
    """Clients append `choices[0].message` as they got it; its null fields must not be refused."""
    reply = ChatCompletion.model_validate(completion_response(chat(), "r1", view(text="Hello"))).choices[0].message
    sent = []
    answer = completion_response(chat(), "r2", view())
    sdk(lambda r: httpx2.Response(200, json=answer), sent=sent).chat.completions.create(
        model="m", messages=[*USER, reply, {"role": "user", "content": "More"}])
    call = parse_openai_body("chat", sent[0].content)
    assert [(m.role, m.content) for m in call.spec.input.messages] == [
        ("user", "Hi"), ("assistant", "Hello"), ("user", "More")]


BASE = {"chat": {"model": "m", "messages": USER}, "completion": {"model": "m", "prompt": "x"}}


@pytest.mark.parametrize(("kind", "change", "param", "code"), [
    # wrong types and values
    ("chat", {"model": None}, "model", "missing_required_parameter"),
    ("chat", {"messages": None}, "messages", "missing_required_parameter"),
    ("chat", {"messages": []}, "messages", "invalid_value"),
    ("chat", {"temperature": 2.5}, "temperature", "invalid_value"),
    ("chat", {"temperature": "hot"}, "temperature", "invalid_type"),
    ("chat", {"top_p": 0}, "top_p", "invalid_value"),
    ("chat", {"max_tokens": 0}, "max_tokens", "invalid_value"),
    ("chat", {"max_tokens": 4.5}, "max_tokens", "invalid_type"),
    ("chat", {"stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
    ("chat", {"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "invalid_value"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "invalid_type"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    # llmq's own bounds, named as OpenAI parameters
    ("chat", {"seed": -1}, "seed", "invalid_value"),
    ("chat", {"deadline": "2030-01-01T00:00:00"}, "deadline", "invalid_value"),
    ("chat", {"metadata": {str(i): "v" for i in range(17)}}, "metadata", "invalid_value"),
    # OpenAI's, not implemented, with a value that would change the output
    ("chat", {"n": 2}, "n", "unsupported_parameter"),
    ("chat", {"n": True}, "n", "unsupported_parameter"),
    ("chat", {"frequency_penalty": 0.5}, "frequency_penalty", "unsupported_parameter"),
    ("chat", {"logprobs": True}, "logprobs", "unsupported_parameter"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported_parameter"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format", "unsupported_parameter"),
    ("chat", {"stream": True, "stream_options": {"include_obfuscation": True}},
     "stream_options.include_obfuscation", "unsupported_value"),
    ("chat", {"messages": [{"role": "tool", "content": "42", "tool_call_id": "c"}]}, "messages.0.role",
     "unsupported_value"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type", "unsupported_value"),
    ("chat", {"messages": [{"role": "user", "content": "Hi", "name": "bob"}]}, "messages.0.name",
     "unsupported_parameter"),
    ("completion", {"prompt": ["a", "b"]}, "prompt", "unsupported_value"),
    ("completion", {"prompt": [1, 2, 3]}, "prompt", "unsupported_value"),
    ("completion", {"echo": True}, "echo", "unsupported_parameter"),
    ("completion", {"best_of": 3}, "best_of", "unsupported_parameter"),
    ("completion", {"suffix": "end"}, "suffix", "unsupported_parameter"),
    # neither OpenAI's nor llmq's
    ("chat", {"temprature": 0}, "temprature", "unknown_parameter"),
    ("completion", {"max_completion_tokens": 5}, "max_completion_tokens", "unknown_parameter"),
    ("chat", {"messages": [{"role": "user", "content": "Hi", "mood": "happy"}]}, "messages.0.mood",
     "unknown_parameter"),
])
def test_refusals_name_the_openai_parameter(kind, change, param, code):
    body = {k: v for k, v in {**BASE[kind], **change}.items() if v is not None}
    refused = refusal(kind, json.dumps(body).encode())
    assert (refused.status, refused.param, refused.code) == (400, param, code)
    assert param in refused.message
    assert refused.body() == {"error": {"message": refused.message, "type": "invalid_request_error",
                                        "param": param, "code": code}}


@pytest.mark.parametrize(("raw", "code"), [(b'{"model": ', "invalid_json"), (b"\xff", "invalid_json"),
                                           (b'["m"]', "invalid_type")])
def test_a_body_that_is_not_a_json_object_is_refused(raw, code):
    refused = refusal("chat", raw)
    assert (refused.status, refused.param, refused.code) == (400, None, code)


@pytest.mark.parametrize(("field", "param"), [
    ("params.max_tokens", "max_tokens"), ("params.temperature", "temperature"), ("input.prompt", "prompt"),
    ("input.messages", "messages"), ("input.messages.2.content", "messages.2.content"), ("deadline", "deadline"),
])
def test_llmq_fields_map_back_to_openai_parameters(field, param):
    assert openai_param(field) == param


# ---- answers -------------------------------------------------------------------

def test_a_chat_answer_is_a_chat_completion_to_the_client():
    call = chat()
    body = completion_response(call, "r1", view(text="Hello there", finish_reason="length"))
    parsed = ChatCompletion.model_validate(body)
    assert (parsed.id, parsed.object, parsed.model, parsed.created) == (
        "chatcmpl-r1", "chat.completion", "echo", int(SUBMITTED.timestamp()))
    [choice] = parsed.choices
    assert (choice.index, choice.message.role, choice.message.content, choice.finish_reason) == (
        0, "assistant", "Hello there", "length")
    assert (parsed.usage.prompt_tokens, parsed.usage.completion_tokens, parsed.usage.total_tokens) == (3, 2, 5)

    through_sdk = sdk(lambda r: httpx2.Response(200, json=body)).chat.completions.create(model="m", messages=USER)
    assert through_sdk.choices[0].message.content == "Hello there"
    assert through_sdk.usage.total_tokens == 5


def test_a_completion_answer_is_a_completion_to_the_client():
    call = parse("completion", model="alias", prompt="Once")
    answered = view(text=" upon a time")
    answered.model = None  # a record without the model falls back to the name the client gave
    body = completion_response(call, "r1", answered)
    parsed = Completion.model_validate(body)
    assert (parsed.id, parsed.object, parsed.model) == ("cmpl-r1", "text_completion", "alias")
    assert [(c.index, c.text, c.finish_reason) for c in parsed.choices] == [(0, " upon a time", "stop")]
    assert parsed.usage.completion_tokens == 2
    through_sdk = sdk(lambda r: httpx2.Response(200, json=body)).completions.create(model="alias", prompt="Once")
    assert through_sdk.choices[0].text == " upon a time"


def stream_of(chunks: list[dict]) -> callable:
    body = b"".join(sse(c) for c in chunks) + SSE_DONE
    return lambda r: httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"})


def test_a_chat_stream_with_usage_reads_back_through_the_client():
    call = chat(stream=True, stream_options={"include_usage": True})
    chunks = StreamChunks(call, "r1", 1_900_000_000, "echo")
    sent = [chunks.first(), chunks.delta("Hel"), chunks.delta("lo"), chunks.final("length"),
            chunks.usage(Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5))]
    for chunk in sent:
        parsed = ChatCompletionChunk.model_validate(chunk)
        assert (parsed.id, parsed.object, parsed.created, parsed.model) == (
            "chatcmpl-r1", "chat.completion.chunk", 1_900_000_000, "echo")
    assert all("usage" in c and c["usage"] is None for c in sent[:-1])

    got = list(sdk(stream_of(sent)).chat.completions.create(model="m", messages=USER, stream=True,
                                                            stream_options={"include_usage": True}))
    assert len(got) == 5
    assert got[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "Hello"
    assert [c.choices[0].finish_reason for c in got[:4]] == [None, None, None, "length"]
    assert (got[-1].choices, got[-1].usage.total_tokens) == ([], 5)


def test_a_stream_without_usage_has_no_usage_field():
    chunks = StreamChunks(chat(stream=True), "r1", 1, "m")
    sent = [chunks.first(), chunks.delta("Hi"), chunks.final("stop")]
    assert not any("usage" in c for c in sent)
    got = list(sdk(stream_of(sent)).chat.completions.create(model="m", messages=USER, stream=True))
    assert [c.choices[0].finish_reason for c in got] == [None, None, "stop"]
    assert all(c.usage is None for c in got)


def test_a_completion_stream_reads_back_through_the_client():
    call = parse("completion", model="m", prompt="Once", stream=True, stream_options={"include_usage": True})
    chunks = StreamChunks(call, "r1", 1, "echo")
    sent = [chunks.first(), chunks.delta(" upon"), chunks.delta(" a time"), chunks.final("stop"),
            chunks.usage(Usage(prompt_tokens=1, completion_tokens=3, total_tokens=4))]
    # OpenAI's own Completion type requires a finish_reason, which only the last text chunk has
    # (OpenAI's stream sends null before that too); the client does not validate chunks.
    assert Completion.model_validate(sent[3]).choices[0].finish_reason == "stop"
    got = list(sdk(stream_of(sent)).completions.create(model="m", prompt="Once", stream=True,
                                                       stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" and c.id == "cmpl-r1" for c in got)
    assert "".join(c.choices[0].text for c in got if c.choices) == " upon a time"
    assert (got[-1].choices, got[-1].usage.total_tokens) == ([], 4)


def test_an_error_mid_stream_is_raised_by_the_client():
    chunks = StreamChunks(chat(stream=True), "r1", 1, "m")
    failure = view_error(view(Status.failed, error=ErrorDetail(type="generation_failed", message="engine died")))
    body = sse(chunks.first()) + sse(chunks.delta("Hel")) + sse(failure.body())
    stream = sdk(lambda r: httpx2.Response(200, content=body, headers={"content-type": "text/event-stream"}))
    with pytest.raises(openai.APIError, match="engine died"):
        list(stream.chat.completions.create(model="m", messages=USER, stream=True))


def test_sse_frames():
    assert sse({"a": "x\ny"}) == b'data: {"a":"x\\ny"}\n\n'
    assert sse("[DONE]") == SSE_DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize(("ended", "status", "code", "type_", "sdk_error"), [
    (view(Status.cancelled), 409, "cancelled", "invalid_request_error", openai.ConflictError),
    (view(Status.expired, error=ErrorDetail(type="deadline_exceeded", message="late")), 504, "deadline_exceeded",
     "server_error", openai.InternalServerError),
    (view(Status.failed, error=ErrorDetail(type="too_many_attempts", message="killed 3 workers")), 500,
     "too_many_attempts", "server_error", openai.InternalServerError),
    (view(Status.failed, error=ErrorDetail(type="model_not_found", message="no such model")), 404,
     "model_not_found", "invalid_request_error", openai.NotFoundError),
    (view(Status.failed, error=ErrorDetail(type="prompt_too_large", message="too long")), 400,
     "context_length_exceeded", "invalid_request_error", openai.BadRequestError),
])
def test_a_request_that_ended_without_a_result_is_an_openai_error(ended, status, code, type_, sdk_error):
    with pytest.raises(OpenAIError) as raised:
        completion_response(chat(), "r1", ended)
    error = raised.value
    assert (error.status, error.code, error.type) == (status, code, type_)
    sent = []
    with pytest.raises(sdk_error) as seen:
        client = sdk(lambda r: httpx2.Response(status, json=error.body(), headers=error.headers), 2, sent)
        client.chat.completions.create(model="m", messages=USER)
    assert (seen.value.code, seen.value.type) == (code, type_)
    assert len(sent) == 1  # the SDK's automatic retries (409 and 5xx) would send it again


def test_a_generation_failure_is_a_retryable_server_error():
    error = view_error(view(Status.failed, error=ErrorDetail(type="generation_failed", message="CUDA error")))
    assert (error.status, error.type, error.code, error.message, error.headers) == (
        500, "server_error", "generation_failed", "CUDA error", {})
    assert view_error(view()) is None
    with pytest.raises(ValueError):
        view_error(view(Status.running))
