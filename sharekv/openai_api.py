"""OpenAI request bodies -> prompts and SamplingParams, and engine outputs -> OpenAI response bodies.

Shared by `sharekv batch` and the server so both accept and return exactly the same shapes.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import ValidationError

from sharekv.outputs import CompletionOutput, RequestOutput
from sharekv.protocol import ChatCompletionRequest, CompletionRequest, describe
from sharekv.sampling_params import InvalidParameter, SamplingParams
from sharekv.tokenizer import ChatTemplateError, Tokenizer

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
ENDPOINTS = (COMPLETIONS, CHAT)


@dataclass
class APIError(Exception):
    """An error returned to the client as `{"error": {...}}` with an HTTP status."""

    message: str
    status: int = 400
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    endpoint: str
    prompts: list[tuple[str | None, list[int]]]  # one entry per prompt; each yields n choices
    params: SamplingParams
    model: str | None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    user: str | None = None
    priority: int = 0  # vLLM's extension: lower runs earlier
    return_token_ids: bool = False  # vLLM's extension: choices carry token ids (prompt and generated)
    ttft_slo: float | None = None  # latency targets in seconds (the slo schedule); None: the server's default
    tpot_slo: float | None = None
    messages: list[dict] | None = None  # a chat's messages (content parts joined), for the semantic cache
    cache_category: str | None = None
    semantic_cache: bool = True  # the request allows the semantic cache


# Request fields that map one to one onto SamplingParams fields of the same name.
_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "seed", "n", "prompt_logprobs", "ignore_eos", "include_stop_str_in_output",
                    "skip_special_tokens", "stop", "stop_token_ids", "kv_eviction", "kv_budget", "kv_compress_at")


def validate_body(body: Any, endpoint: str) -> CompletionRequest | ChatCompletionRequest:
    """The body as its pydantic model; any violation is a 400 naming the parameter."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    model = ChatCompletionRequest if endpoint == CHAT else CompletionRequest
    try:
        return model.model_validate(body)
    except ValidationError as e:
        message, param = describe(e)
        raise APIError(message, param=param) from e


def sampling_params(request: CompletionRequest | ChatCompletionRequest, max_n: int = 16) -> SamplingParams:
    kwargs: dict[str, Any] = {k: v for k in _SAMPLING_FIELDS if (v := getattr(request, k)) is not None}
    if isinstance(request, ChatCompletionRequest):
        kwargs["max_tokens"] = request.max_completion_tokens or request.max_tokens
        if request.logprobs:
            kwargs["logprobs"] = request.top_logprobs or 0
    else:
        kwargs["max_tokens"] = 16 if request.max_tokens is None else request.max_tokens
        kwargs["logprobs"] = request.logprobs
    if kwargs.get("n", 1) > max_n:
        raise APIError(f"'n' must be at most {max_n}", param="n")
    try:
        return SamplingParams(**kwargs)
    except InvalidParameter as e:
        raise APIError(str(e), param=e.param) from e


def chat_messages(request: ChatCompletionRequest) -> list[dict]:
    messages = []
    for m in request.messages:
        message = m.model_dump()
        if isinstance(m.content, list):  # OpenAI's content parts: text only
            message["content"] = "".join(part.text for part in m.content)
        messages.append(message)
    return messages


def prompts(request: CompletionRequest | ChatCompletionRequest,
            tokenizer: Tokenizer | None) -> list[tuple[str | None, list[int]]]:
    """(text, token ids) of each prompt; a chat is one prompt, rendered by the model's chat template."""
    if isinstance(request, ChatCompletionRequest):
        if tokenizer is None:
            raise APIError("this model has no tokenizer, so chat is not available; use /v1/completions "
                           "with token-id prompts", param="messages")
        messages = chat_messages(request)
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ChatTemplateError as e:
            raise APIError(str(e), param="messages") from e
        return [(text, tokenizer.encode(text, add_special_tokens=False))]
    prompt = request.prompt
    items = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
    result = []
    for item in items:
        if isinstance(item, str):
            if tokenizer is None:
                raise APIError("this model has no tokenizer: send the prompt as token ids", param="prompt")
            result.append((item, tokenizer.encode(item)))
        else:
            result.append((None, list(item)))
    return result


def parse_request(body: Any, endpoint: str, tokenizer: Tokenizer | None, max_n: int = 16) -> ParsedRequest:
    if endpoint not in ENDPOINTS:
        raise APIError(f"unsupported url {endpoint!r}; use {' or '.join(ENDPOINTS)}", param="url")
    request = validate_body(body, endpoint)
    params = sampling_params(request, max_n)
    options = request.stream_options
    return ParsedRequest(endpoint, prompts(request, tokenizer), params, request.model, stream=bool(request.stream),
                         include_usage=bool(options and options.include_usage), user=request.user,
                         priority=request.priority or 0, return_token_ids=bool(request.return_token_ids),
                         ttft_slo=request.ttft_slo, tpot_slo=request.tpot_slo,
                         messages=chat_messages(request) if isinstance(request, ChatCompletionRequest) else None,
                         cache_category=request.cache_category, semantic_cache=request.semantic_cache is not False)


class RequestChecker(Protocol):
    tokenizer: Tokenizer | None

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None: ...


def parse_and_check(body: Any, endpoint: str, engine: RequestChecker, max_n: int = 16,
                    max_tokens_limit: int | None = None) -> ParsedRequest:
    """Parse a request and make sure the engine can run every prompt of it (context length, token ids).
    With `max_tokens_limit`, a larger max_tokens is refused and a missing one is set to the limit."""
    parsed = parse_request(body, endpoint, engine.tokenizer, max_n)
    params = parsed.params
    if max_tokens_limit is not None:
        if params.max_tokens is not None and params.max_tokens > max_tokens_limit:
            raise APIError(f"max_tokens must be at most {max_tokens_limit} on this server", param="max_tokens")
        params.max_tokens = params.max_tokens or max_tokens_limit
    try:
        for _, ids in parsed.prompts:
            engine.check_request(ids, params)
    except InvalidParameter as e:
        raise APIError(str(e), param=e.param) from e
    return parsed


def _completion_logprobs(choice: CompletionOutput) -> dict | None:
    if choice.logprobs is None:
        return None
    tokens, token_logprobs, top = [], [], []
    for token_id, entry in zip(choice.token_ids, choice.logprobs, strict=False):
        tokens.append(entry[token_id].decoded_token or str(token_id))
        token_logprobs.append(entry[token_id].logprob)
        top.append({(lp.decoded_token or str(tid)): lp.logprob for tid, lp in entry.items() if lp.rank is not None})
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(choice: CompletionOutput) -> dict | None:
    if choice.logprobs is None:
        return None

    def item(tid: int, lp) -> dict:
        text = lp.decoded_token or str(tid)
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode())}

    content = []
    for token_id, entry in zip(choice.token_ids, choice.logprobs, strict=False):
        content.append({**item(token_id, entry[token_id]),
                        "top_logprobs": [item(t, lp) for t, lp in entry.items() if lp.rank is not None]})
    return {"content": content}


def _prompt_logprobs(out: RequestOutput) -> list[dict | None] | None:
    """vLLM's shape: None for the first prompt token, then {token id: {logprob, rank, decoded_token}}."""
    if out.prompt_logprobs is None:
        return None
    return [None if entry is None else
            {str(tid): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
             for tid, lp in entry.items()} for entry in out.prompt_logprobs]


def usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def response_body(parsed: ParsedRequest, outputs: list[RequestOutput], model: str,
                  request_id: str | None = None) -> dict:
    """The OpenAI response object for finished outputs (one RequestOutput per prompt)."""
    created = int(time.time())
    n = parsed.params.n
    choices = []
    for p, out in enumerate(outputs):
        for c in out.outputs:
            index = p * n + c.index
            if parsed.endpoint == CHAT:
                choices.append({"index": index, "message": {"role": "assistant", "content": c.text},
                                "logprobs": _chat_logprobs(c), "finish_reason": c.finish_reason,
                                "stop_reason": c.stop_reason})
            else:
                choices.append({"index": index, "text": c.text, "logprobs": _completion_logprobs(c),
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
            if parsed.return_token_ids:
                choices[-1] |= {"prompt_token_ids": out.prompt_token_ids, "token_ids": c.token_ids}
            if parsed.params.prompt_logprobs is not None:
                choices[-1]["prompt_logprobs"] = _prompt_logprobs(out)
    rid, obj = request_id or new_request_id(parsed.endpoint), _kind(parsed.endpoint)[1]
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
            "usage": usage(outputs)}


def _kind(endpoint: str) -> tuple[str, str]:
    """(id prefix, object name) of a non-streaming response."""
    return ("chatcmpl", "chat.completion") if endpoint == CHAT else ("cmpl", "text_completion")


def new_request_id(endpoint: str) -> str:
    return f"{_kind(endpoint)[0]}-{uuid.uuid4().hex}"


class StreamFormatter:
    """Turns the growing outputs of one streaming request into OpenAI's chunk objects (sent as SSE).

    Each chunk carries one choice's new text. While a choice may still hit a stop string, the last
    characters that could begin one are held back, so text that the stop string later cuts is never sent.
    """

    def __init__(self, parsed: ParsedRequest, model: str, request_id: str) -> None:
        self.parsed = parsed
        self.model = model
        self.request_id = request_id
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if parsed.endpoint == CHAT else "text_completion"
        self.holdback = max((len(s) for s in parsed.params.stop), default=1) - 1
        self._sent: dict[int, tuple[int, int]] = {}  # choice index -> (characters, tokens) sent
        self._done: set[int] = set()

    def _chunk(self, choices: list[dict], usage_value: dict | None = None) -> dict:
        chunk = {"id": self.request_id, "object": self.object, "created": self.created, "model": self.model,
                 "choices": choices}
        if self.parsed.include_usage:
            chunk["usage"] = usage_value
        return chunk

    def first_chunks(self) -> list[dict]:
        """Chat streams open with the assistant's role, one chunk per choice."""
        if self.parsed.endpoint != CHAT:
            return []
        total = len(self.parsed.prompts) * self.parsed.params.n
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(total)]

    def chunks(self, prompt_index: int, out: RequestOutput) -> list[dict]:
        """Chunks for what is new in `out`, the latest output of the request's `prompt_index`-th prompt."""
        result = []
        for c in out.outputs:
            index = prompt_index * self.parsed.params.n + c.index
            if index in self._done:
                continue
            sent_chars, sent_tokens = self._sent.get(index, (0, 0))
            finished = c.finish_reason is not None
            end = len(c.text) if finished or not self.parsed.params.stop else max(sent_chars,
                                                                                   len(c.text) - self.holdback)
            text = c.text[sent_chars:end]
            new_tokens = len(c.token_ids) - sent_tokens
            if not text and not finished and not (new_tokens and (c.logprobs is not None
                                                                   or self.parsed.return_token_ids)):
                continue
            self._sent[index] = (end, len(c.token_ids))
            logprobs = None if c.logprobs is None else c.logprobs[sent_tokens:len(c.token_ids)]
            part = dataclasses.replace(c, token_ids=c.token_ids[sent_tokens:], logprobs=logprobs)
            choice: dict[str, Any] = {"index": index}
            if self.parsed.endpoint == CHAT:
                choice["delta"] = {"content": text} if text else {}
                choice["logprobs"] = _chat_logprobs(part)
            else:
                choice["text"] = text
                choice["logprobs"] = _completion_logprobs(part)
            choice["finish_reason"] = c.finish_reason
            choice["stop_reason"] = c.stop_reason
            if self.parsed.return_token_ids:
                if not sent_tokens:  # the prompt's ids once, with the choice's first chunk
                    choice["prompt_token_ids"] = out.prompt_token_ids
                choice["token_ids"] = part.token_ids
            if finished:
                self._done.add(index)
            result.append(self._chunk([choice]))
        return result

    def usage_chunk(self, outputs: list[RequestOutput]) -> dict | None:
        """The last chunk, with no choices and the usage, when the client asked for it."""
        return self._chunk([], usage(outputs)) if self.parsed.include_usage else None
