"""The OpenAI request bodies as pydantic models: one definition gives the validation (strict JSON types,
ranges), the 400 that names the offending parameter, and the server's `/openapi.json`. `sharekv batch`
validates its lines with the same models. Fields follow OpenAI's API, plus vLLM's extensions (`top_k`,
`min_p`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`, `priority`, `return_token_ids`,
`prompt_logprobs`, ...) and sharekv's latency targets (`ttft_slo`, `tpot_slo`) and KV eviction (`kv_eviction`,
`kv_budget`, `kv_compress_at`). Unknown fields are ignored,
as vLLM does.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.json_schema import models_json_schema

from sharekv.sampling_params import SEED_MAX, SEED_MIN

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
MAX_STOP_STRINGS = 16


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    model: str | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, description="-1 or 0: disabled")
    min_p: float | None = Field(None, ge=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    n: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="who sent it: the unit of the fair schedule")
    priority: int | None = Field(0, description="lower runs earlier (vLLM's extension)")
    return_token_ids: bool | None = Field(False, description="choices carry prompt and generated token ids")
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    ttft_slo: float | None = Field(None, gt=0, description="seconds to the first token (the slo schedule's target)")
    tpot_slo: float | None = Field(None, gt=0, description="seconds per output token after the first (slo "
                                                           "schedule)")
    kv_eviction: str | None = Field(None, description="KV eviction policy: streaming_llm, snapkv, h2o, or none")
    kv_budget: int | float | None = Field(None, gt=0, description="KV kept under eviction: tokens, or the "
                                                                   "fraction kept (0.5)")
    kv_compress_at: int | None = Field(None, ge=1, description="compress once this many prompt tokens are "
                                                               "computed; the rest reads the compressed KV")
    cache_category: str | None = Field(None, description="the semantic cache's category for this request "
                                                         "(default: the nearest by its examples)")
    semantic_cache: bool | None = Field(None, description="false: never answer from, nor store in, the "
                                                          "semantic cache")


class CompletionRequest(_SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    model_config = ConfigDict(strict=True, extra="allow")  # name, tool_calls, ... reach the chat template
    role: str = Field(description="system, user, assistant, ...: whatever the model's chat template knows")
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI for max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


# What a field that accepts several shapes must be, for errors where every shape failed.
_SHAPES = {
    "prompt": "a string, a list of strings, a list of token ids (>= 0), or a list of token-id lists",
    "stop": f"a string or a list of at most {MAX_STOP_STRINGS} strings",
    "messages": "a non-empty list of messages, each with a string role and content that is a string or a "
                "list of text parts",
}


def describe(error: ValidationError) -> tuple[str, str | None]:
    """The first problem of a validation error as (message, the top-level parameter it concerns)."""
    errors = error.errors(include_url=False)
    loc = errors[0]["loc"]
    param = str(loc[0]) if loc else None
    if param in _SHAPES and sum(1 for e in errors if e["loc"][:1] == loc[:1]) > 1:
        return f"'{param}' must be {_SHAPES[param]}", param
    where = ".".join(str(part) for part in loc) if loc else "the request body"
    return f"'{where}': {errors[0]['msg']}", param


def openapi_schemas() -> dict:
    """The request and error models as OpenAPI components (`#/components/schemas/NAME`)."""
    _, top = models_json_schema([(m, "validation") for m in (CompletionRequest, ChatCompletionRequest, ErrorResponse)],
                                ref_template="#/components/schemas/{model}")
    return top["$defs"]


def openapi_operation(request_model: type[BaseModel]) -> dict:
    """A generation route's request body and responses, for FastAPI's `openapi_extra`."""
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    return {
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{request_model.__name__}"}}}},
        "responses": {
            "200": {"description": "the completion, or a text/event-stream of chunks when stream is true"},
            "400": {"description": "invalid request", **error},
            "401": {"description": "missing or wrong API key", **error},
            "404": {"description": "unknown model", **error},
            "413": {"description": "request body too large", **error},
            "503": {"description": "too many requests waiting; retry after Retry-After seconds", **error},
        },
    }
