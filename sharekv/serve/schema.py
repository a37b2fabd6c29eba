"""JSON schemas of the request bodies, for the server's OpenAPI document (`/openapi.json`).

They describe what clients may send; parsing and validation live in `sharekv.openai_api`, which gives
every violation an OpenAI-shaped 400 naming the parameter.
"""

from __future__ import annotations

from sharekv.sampling_params import SEED_MAX, SEED_MIN

_STOP = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 16}]}
_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}

_SAMPLING = {
    "model": {"type": "string"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer"},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
    "n": {"type": "integer", "minimum": 1},
    "seed": {"type": "integer", "minimum": SEED_MIN, "maximum": SEED_MAX},
    "stop": _STOP,
    "stop_token_ids": {"type": "array", "items": {"type": "integer"}},
    "ignore_eos": {"type": "boolean"},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "user": {"type": "string"},
    "priority": {"type": "integer"},
    "return_token_ids": {"type": "boolean"},
    "prompt_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
}

COMPLETION_REQUEST = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        "prompt": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
                             _TOKENS, {"type": "array", "items": _TOKENS, "minItems": 1}]},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        **_SAMPLING,
    },
}

CHAT_REQUEST = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        "messages": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["role", "content"],
            "properties": {"role": {"type": "string", "enum": ["system", "user", "assistant"]},
                           "content": {"type": "string"}}}},
        "max_completion_tokens": {"type": "integer", "minimum": 1},
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
        **_SAMPLING,
    },
}

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}


def openapi_extra(request_schema: dict) -> dict:
    error = {"content": {"application/json": {"schema": ERROR}}}
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}},
        "responses": {
            "200": {"description": "the completion, or a text/event-stream of chunks when stream is true"},
            "400": {"description": "invalid request", **error},
            "401": {"description": "missing or wrong API key", **error},
            "404": {"description": "unknown model", **error},
            "413": {"description": "request body too large", **error},
            "503": {"description": "too many requests waiting; retry after Retry-After seconds", **error},
        },
    }
