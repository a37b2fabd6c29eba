"""OpenAI request bodies -> prompts and SamplingParams, and engine outputs -> OpenAI response bodies.

Shared by `sharekv batch` and the server so both accept and return exactly the same shapes.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from sharekv.outputs import CompletionOutput, RequestOutput
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


# body field -> (SamplingParams field, accepted types)
_NUMERIC = {
    "temperature": ("temperature", (int, float)),
    "top_p": ("top_p", (int, float)),
    "top_k": ("top_k", (int,)),
    "min_p": ("min_p", (int, float)),
    "presence_penalty": ("presence_penalty", (int, float)),
    "frequency_penalty": ("frequency_penalty", (int, float)),
    "repetition_penalty": ("repetition_penalty", (int, float)),
    "seed": ("seed", (int,)),
    "n": ("n", (int,)),
    "prompt_logprobs": ("prompt_logprobs", (int,)),  # vLLM's extension
}
_FLAGS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")


def _typed(body: dict, key: str, types: tuple[type, ...]) -> Any:
    value = body[key]
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise APIError(f"'{key}' must be {names}, got {type(value).__name__}", param=key)
    return value


def sampling_params_from_body(body: dict, endpoint: str, max_n: int = 16) -> SamplingParams:
    kwargs: dict[str, Any] = {}
    for key, (field_name, types) in _NUMERIC.items():
        if body.get(key) is not None:
            kwargs[field_name] = _typed(body, key, types)
    for key in _FLAGS:
        if body.get(key) is not None:
            kwargs[key] = _typed(body, key, (bool,))
    if endpoint == CHAT:
        limit_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        kwargs["max_tokens"] = _typed(body, limit_key, (int,)) if body.get(limit_key) is not None else None
        if body.get("logprobs"):
            top = body.get("top_logprobs")
            kwargs["logprobs"] = 0 if top is None else _typed(body, "top_logprobs", (int,))
    else:
        kwargs["max_tokens"] = _typed(body, "max_tokens", (int,)) if body.get("max_tokens") is not None else 16
        if body.get("logprobs") is not None:
            kwargs["logprobs"] = _typed(body, "logprobs", (int,))
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
            raise APIError("'stop' must be a string or a list of at most 16 strings", param="stop")
        kwargs["stop"] = stop
    if body.get("stop_token_ids") is not None:
        ids = body["stop_token_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise APIError("'stop_token_ids' must be a list of integers", param="stop_token_ids")
        kwargs["stop_token_ids"] = ids
    if kwargs.get("n", 1) > max_n:
        raise APIError(f"'n' must be at most {max_n}", param="n")
    try:
        return SamplingParams(**kwargs)
    except InvalidParameter as e:
        raise APIError(str(e), param=e.param) from e


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in value)


def prompts_from_body(body: dict, endpoint: str, tokenizer: Tokenizer | None) -> list[tuple[str | None, list[int]]]:
    if endpoint == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise APIError("'messages' must be a non-empty list of message objects", param="messages")
        if tokenizer is None:
            raise APIError("this model has no tokenizer, so chat is not available; use /v1/completions "
                           "with token-id prompts", param="messages")
        messages = [_flatten_content(m) for m in messages]
        try:
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ChatTemplateError as e:
            raise APIError(str(e), param="messages") from e
        return [(text, tokenizer.encode(text, add_special_tokens=False))]
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_token_list(prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_token_list(p) for p in prompt):
        items = prompt
    else:
        raise APIError("'prompt' must be a string, a list of strings, a list of token ids, or a list of "
                       "token-id lists", param="prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            if tokenizer is None:
                raise APIError("this model has no tokenizer: send the prompt as token ids", param="prompt")
            prompts.append((item, tokenizer.encode(item)))
        else:
            prompts.append((None, list(item)))
    return prompts


def _flatten_content(message: dict) -> dict:
    """Accept OpenAI's content-part lists (text parts only) as well as plain strings."""
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise APIError("only text content parts are supported", param="messages")
            texts.append(part.get("text", ""))
        return {**message, "content": "".join(texts)}
    if content is not None and not isinstance(content, str):
        raise APIError("message content must be a string or a list of text parts", param="messages")
    if not isinstance(message.get("role"), str):
        raise APIError("every message needs a string 'role'", param="messages")
    return message


def _optional(body: dict, key: str, types: tuple[type, ...], default: Any) -> Any:
    return default if body.get(key) is None else _typed(body, key, types)


def parse_request(body: Any, endpoint: str, tokenizer: Tokenizer | None, max_n: int = 16) -> ParsedRequest:
    if endpoint not in ENDPOINTS:
        raise APIError(f"unsupported url {endpoint!r}; use {' or '.join(ENDPOINTS)}", param="url")
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    params = sampling_params_from_body(body, endpoint, max_n)
    prompts = prompts_from_body(body, endpoint, tokenizer)
    model = _optional(body, "model", (str,), None)
    options = _optional(body, "stream_options", (dict,), {})
    return ParsedRequest(endpoint, prompts, params, model, stream=_optional(body, "stream", (bool,), False),
                         include_usage=bool(options.get("include_usage")),
                         user=_optional(body, "user", (str,), None), priority=_optional(body, "priority", (int,), 0),
                         return_token_ids=_optional(body, "return_token_ids", (bool,), False))


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
