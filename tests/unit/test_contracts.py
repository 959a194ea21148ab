"""The published contracts stay true: the message JSON Schema file matches the
code, it accepts what workers accept, and the OpenAPI document is valid."""

import json

import jsonschema
import pytest
from openapi_spec_validator import validate

from gateway.openapi import openapi_document
from shared.schema import SCHEMA_PATH, MessageError, message_json_schema, parse_message


def test_schema_file_is_up_to_date():
    assert json.loads(SCHEMA_PATH.read_text()) == message_json_schema(), "run `make schema`"


@pytest.mark.parametrize("message", [
    {"v": 1, "id": "svc:1", "input": {"prompt": "hi"}},
    {"v": 1, "id": "a.b-c_d", "model": "m", "adapter": "x", "input": {"messages": [{"role": "user", "content": "hi"}]},
     "params": {"max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": 40, "stop": ["\n"], "seed": 7},
     "priority": 1, "deadline": "2030-01-01T00:00:00Z", "reply_topic": "replies", "metadata": {"k": "v"},
     "submitted_at": "2026-01-01T00:00:00+00:00"},
])
def test_valid_messages_pass_schema_and_parser(message):
    jsonschema.validate(message, json.loads(SCHEMA_PATH.read_text()))
    assert parse_message(json.dumps(message).encode()).id == message["id"]


@pytest.mark.parametrize("message", [
    {"v": 2, "id": "x", "input": {"prompt": "hi"}},
    {"v": 1, "id": "has/slash", "input": {"prompt": "hi"}},
    {"v": 1, "id": "x" * 129, "input": {"prompt": "hi"}},
    {"v": 1, "id": "x", "input": {"prompt": "hi"}, "unknown": True},
    {"v": 1, "id": "x", "input": {"prompt": "hi"}, "params": {"max_tokens": 0}},
    {"v": 1, "input": {"prompt": "hi"}},
])
def test_invalid_messages_fail_schema_and_parser(message):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(message, json.loads(SCHEMA_PATH.read_text()))
    with pytest.raises(MessageError):
        parse_message(json.dumps(message).encode())


def test_openapi_document_is_valid_openapi_3_1():
    document = openapi_document()
    validate(document)
    assert set(document["paths"]) >= {"/v1/requests", "/v1/requests/{id}", "/healthz", "/readyz", "/metrics"}


def test_every_setting_is_documented_in_the_readme():
    from pathlib import Path

    from shared.settings import Settings

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    missing = [f"LLMQ_{name.upper()}" for name in Settings.model_fields if f"LLMQ_{name.upper()}" not in readme]
    assert missing == []
