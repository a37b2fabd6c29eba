"""Request bodies as pydantic models: strict JSON types, ranges, the parameter named in the 400, and one
definition behind both the validation and /openapi.json."""

from __future__ import annotations

import pytest

from sharekv.openai_api import CHAT, COMPLETIONS, APIError, parse_request
from sharekv.protocol import ChatCompletionRequest, CompletionRequest, openapi_schemas


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x", "stream": "yes"}, "stream"),  # no coercion of strings into booleans
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),  # nor into integers
    ({"prompt": "x", "n": True}, "n"),  # nor booleans into integers
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "seed": 2**64}, "seed"),
    ({"prompt": "x", "stop": ["a"] * 17}, "stop"),
    ({"prompt": "x", "stop": [1]}, "stop"),
    ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt": "x", "stream_options": {"include_usage": 1}}, "stream_options"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], [-1]]}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({}, "prompt"),
])
def test_completion_errors_name_the_parameter(body, param):
    with pytest.raises(APIError) as e:
        parse_request(body, COMPLETIONS, None)
    assert e.value.status == 400 and e.value.param == param and e.value.message


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": "true"}, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_chat_errors_name_the_parameter(body, param):
    with pytest.raises(APIError) as e:
        parse_request(body, CHAT, None)
    assert e.value.param == param


def test_valid_bodies_map_onto_sampling_params():
    parsed = parse_request({"prompt": [[5, 6], [7]], "n": 2, "stop": "END", "max_tokens": None, "top_k": -1,
                            "ignore_eos": True, "priority": -1, "user": "u", "unknown_field": {"ignored": 1}},
                           COMPLETIONS, None)
    assert parsed.prompts == [(None, [5, 6]), (None, [7])]
    p = parsed.params
    assert (p.n, p.stop, p.max_tokens, p.top_k, p.ignore_eos) == (2, ["END"], 16, 0, True)
    assert (parsed.priority, parsed.user, parsed.stream) == (-1, "u", False)
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi", "name": "x"}],
                                                 "max_tokens": 3, "max_completion_tokens": 5})
    assert chat.messages[0].model_dump()["name"] == "x"  # extra message fields reach the chat template


def test_openapi_components_come_from_the_models():
    schemas = openapi_schemas()
    assert {"CompletionRequest", "ChatCompletionRequest", "ChatMessage", "ErrorResponse"} <= set(schemas)
    props = schemas["CompletionRequest"]["properties"]
    assert props["temperature"]["anyOf"][0]["minimum"] == 0
    assert CompletionRequest.model_fields.keys() == props.keys()
    text = str(schemas)
    assert "#/$defs" not in text  # every reference resolves inside the OpenAPI document
