"""The published contracts stay true: the message JSON Schema file matches the
code, it accepts what workers accept, and the OpenAPI document is valid."""

import json

import jsonschema
import pytest
from openapi_spec_validator import validate

from deploy.settings import StackSettings
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


@pytest.mark.parametrize(("input_", "reason"), [
    ({"messages": [{"role": "tool", "content": "x"}]}, "input.messages.0.role: Input should be"),
    ({"messages": []}, "input.messages: List should have at least 1 item"),
    ("Hello", "input: give `prompt` (a string) or `messages`"),
    ({"prompt": 42}, "input.prompt: Input should be a valid string"),
])
def test_a_dead_lettered_message_says_which_input_field_is_wrong(input_, reason):
    with pytest.raises(MessageError) as refused:
        parse_message(json.dumps({"v": 1, "id": "x", "input": input_}).encode())
    assert str(refused.value).startswith(reason)


def test_openapi_document_is_valid_openapi_3_1():
    document = openapi_document()
    validate(document)
    assert set(document["paths"]) >= {"/v1/requests", "/v1/requests/{id}", "/healthz", "/readyz", "/metrics"}


def test_openapi_document_says_which_calls_need_the_bearer_key():
    document = openapi_document()
    assert document["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": "An llmq API key (`llmq keys create NAME`)."}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            assert (operation.get("security") == [{"apiKey": []}]) == path.startswith("/v1/"), (path, operation)
    # A gateway with API keys off (LLMQ_AUTH=false) says that none is needed.
    keyless = openapi_document(auth=False)
    assert "securitySchemes" not in keyless["components"]
    assert all(not operation.get("security") for operations in keyless["paths"].values()
               for operation in operations.values())


def test_every_setting_is_documented_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    from workers.training.settings import TrainerSettings

    fields = set(StackSettings.model_fields) | set(TrainerSettings.model_fields)
    missing = [f"LLMQ_{name.upper()}" for name in sorted(fields) if f"LLMQ_{name.upper()}" not in readme]
    assert missing == []


async def test_kafka_security_settings_reach_every_aiokafka_client():
    """SASL/TLS settings are passed through as aiokafka takes them (no broker with
    SASL runs here: aiokafka's own constructors validate the combination)."""
    import ssl

    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from shared.kafka import connection_options, make_admin

    plain = connection_options(StackSettings())
    assert plain == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "PLAINTEXT"}

    secure = StackSettings(kafka_bootstrap="kafka.example:9096", kafka_security_protocol="SASL_SSL",
                      kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="llmq",
                      kafka_sasl_password="s3cret")
    options = connection_options(secure)
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("llmq", "s3cret")
    assert isinstance(options["ssl_context"], ssl.SSLContext)
    AIOKafkaProducer(**options)  # aiokafka refuses a bad combination in its constructor
    AIOKafkaConsumer(**options)
    make_admin(secure)
    # The password never shows in the settings' repr (logs), but children get it.
    assert "s3cret" not in repr(secure)
    assert secure.to_env()["LLMQ_KAFKA_SASL_PASSWORD"] == "s3cret"
