"""`sharekv batch`: run an OpenAI Batch API input file (JSONL) through the engine.

Every valid line is handed to the engine before the first step, so the scheduler sees the whole batch.
Results are appended to the output file as each line finishes and flushed at once, so an interrupted job
loses nothing it finished; rerunning with the same output file skips the custom_ids already there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

from tqdm.auto import tqdm

from sharekv.cache import frontend
from sharekv.cache.semantic import Probe, SemanticCache
from sharekv.config import EngineArgs, SemanticCacheArgs
from sharekv.engine import LLMEngine
from sharekv.kv.prefix_forest import PrefixForest
from sharekv.model.checkpoint import Checkpoint
from sharekv.model.kv_cache import kv_bytes_for_tokens
from sharekv.model.runner import DTYPES
from sharekv.openai_api import APIError, ParsedRequest, parse_and_check, parse_request, response_body, usage
from sharekv.outputs import RequestOutput


@dataclass
class BatchSummary:
    requests: int = 0  # lines completed in this run
    skipped: int = 0  # lines already in the output file from an earlier run
    errors: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    cache_hits: int = 0  # lines answered from the semantic cache (no engine work; not in the token counts)
    wall_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return (self.prompt_tokens + self.generated_tokens) / self.wall_seconds if self.wall_seconds else 0.0


@dataclass
class _Line:
    number: int
    custom_id: str
    parsed: ParsedRequest
    request_ids: list[str]
    outputs: dict[str, RequestOutput]
    probe: Probe | None = None  # the semantic cache's lookup, to store the answer under


def read_lines(input_path: str) -> list[tuple[int, str]]:
    """The input file's lines, numbered from 1."""
    with open(input_path) as f:
        return list(enumerate(f.read().splitlines(), start=1))


def line_prompts(raw: str, checkpoint: Checkpoint) -> ParsedRequest | None:
    """A line's request as parsed without an engine (for sizing and sharding a job), or None if it does not
    parse; the engine checks it again when the line runs."""
    try:
        record = json.loads(raw)
        return parse_request(record.get("body"), record.get("url"), checkpoint.tokenizer)
    except (ValueError, AttributeError, APIError):
        return None


def job_kv_tokens(lines: list[tuple[int, str]], checkpoint: Checkpoint, context_len: int, block_size: int) -> int:
    """KV tokens that hold a whole batch at once when shared prefixes are stored once: the distinct prompt
    tokens (a prefix tree over every prompt) plus each continuation's longest output and a partial block.
    Lines that do not parse count nothing (they never run)."""
    prompts, outputs = [], 0
    for _, raw in lines:
        parsed = line_prompts(raw, checkpoint)
        if parsed is None:
            continue
        for _, ids in parsed.prompts:
            prompts.append(ids)
            longest = max(0, context_len - len(ids))
            outputs += parsed.params.n * (min(parsed.params.max_tokens or longest, longest) + block_size)
    return PrefixForest(prompts).distinct_tokens + outputs


def engine_for_job(args: EngineArgs, lines: list[tuple[int, str]]) -> LLMEngine:
    """The engine for a batch's lines. Without `kv_cache_memory` the pool is sized to the job (at most the
    default, which follows free memory and the cgroup limit), not to the machine."""
    checkpoint = Checkpoint.open(args.model)
    if args.kv_cache_memory is None:
        context = min(args.max_model_len or checkpoint.config.max_position_embeddings,
                      checkpoint.config.max_position_embeddings)
        tokens = job_kv_tokens(lines, checkpoint, context, args.block_size)
        job_bytes = kv_bytes_for_tokens(checkpoint.config, args.block_size, DTYPES[args.dtype], tokens,
                                        args.kv_cache_dtype, args.kv_group_size)
        args = dataclasses.replace(args, kv_cache_memory=str(min(args.kv_cache_bytes(), job_bytes)))
    return LLMEngine(args, checkpoint)


def done_keys(output_path: str) -> set[str]:
    """What an earlier run answered: custom_ids that succeeded, and `line:N` for lines that got an error
    record (errors are keyed by line, so a duplicate id's error never hides the original's result).
    A torn last line from a crash is cut off."""
    if not os.path.exists(output_path):
        return set()
    with open(output_path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            data = data[:data.rfind(b"\n") + 1]
    done = set()
    for raw in data.splitlines():
        record = json.loads(raw)
        done.add(f"line:{record['line']}" if "line" in record else record["custom_id"])
    return done


def _error_record(custom_id: str, error: APIError, line: int) -> dict:
    """A request the engine refused, answered as the API would (status and OpenAI error body)."""
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": error.status, "request_id": f"req_{uuid.uuid4().hex}", "body": error.body()},
            "error": None, "line": line}


def _parse_line(raw: str, engine: LLMEngine) -> tuple[str, ParsedRequest]:
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e}") from e
    if not isinstance(record, dict) or not isinstance(record.get("custom_id"), str):
        raise ValueError("each line must be an object with a string 'custom_id'")
    custom_id = record["custom_id"]
    if record.get("method", "POST") != "POST":
        raise _LineError(custom_id, APIError("'method' must be POST", param="method"))
    try:
        parsed = parse_and_check(record.get("body"), record.get("url"), engine)
    except APIError as e:
        raise _LineError(custom_id, e) from e
    return custom_id, parsed


class _LineError(Exception):
    def __init__(self, custom_id: str, error: APIError) -> None:
        super().__init__(error.message)
        self.custom_id = custom_id
        self.error = error


def run_batch(engine: LLMEngine, input_path: str, output_path: str, use_tqdm: bool = True,
              cache: SemanticCache | None = None, cache_args: SemanticCacheArgs | None = None) -> BatchSummary:
    """Run the file's lines, appending each result to `output_path` as it finishes; lines already answered
    there are skipped. With a semantic cache, a line whose request was answered before (by this job, an
    earlier one or a server on the same cache file) is answered from it before the engine starts; the
    others are stored as they finish."""
    summary = BatchSummary()
    start = time.perf_counter()
    done = done_keys(output_path)
    with open(output_path, "a") as out:
        for record in batch_records(engine, read_lines(input_path), done, summary, use_tqdm, cache, cache_args):
            write_record(out, record)
    summary.wall_seconds = time.perf_counter() - start
    return summary


def write_record(out: TextIO, record: dict) -> None:
    """One result line, flushed at once: a crash loses nothing finished."""
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()


def batch_records(engine: LLMEngine, lines: list[tuple[int, str]], done: set[str], summary: BatchSummary,
                  use_tqdm: bool = False, cache: SemanticCache | None = None,
                  cache_args: SemanticCacheArgs | None = None) -> Iterator[dict]:
    """The output records of numbered input lines, each as soon as it is known (errors and cache hits
    before the engine starts, results as their requests finish), counted in `summary`. Lines whose key is
    in `done` (`done_keys`) are skipped."""
    cache_args = cache_args or SemanticCacheArgs()

    def result(custom_id: str, parsed: ParsedRequest, outputs: list[RequestOutput], model: str,
               cache_field: dict | None) -> dict:
        body = response_body(parsed, outputs, model)
        if cache_field is not None:
            body["semantic_cache"] = cache_field
        summary.requests += 1
        if cache_field is None or not cache_field["hit"]:  # a hit ran none of its tokens
            u = usage(outputs)
            summary.prompt_tokens += u["prompt_tokens"]
            summary.cached_tokens += u["prompt_tokens_details"]["cached_tokens"]
            summary.generated_tokens += u["completion_tokens"]
        return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
                "response": {"status_code": 200, "request_id": body["id"], "body": body}, "error": None}

    pending: dict[str, _Line] = {}  # engine request id -> its line
    seen: set[str] = set()
    for number, raw in lines:
        if not raw.strip():
            continue
        try:
            custom_id, parsed = _parse_line(raw, engine)
        except _LineError as e:
            if f"line:{number}" not in done:
                summary.errors += 1
                yield _error_record(e.custom_id, e.error, number)
            seen.add(e.custom_id)
            continue
        except ValueError as e:
            if f"line:{number}" not in done:
                summary.errors += 1
                yield {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": None, "response": None,
                       "error": {"code": "invalid_request", "message": str(e)}, "line": number}
            continue
        if custom_id in seen:
            if f"line:{number}" not in done:
                summary.errors += 1
                yield _error_record(custom_id, APIError(f"duplicate custom_id {custom_id!r}", param="custom_id"),
                                    number)
            continue
        seen.add(custom_id)
        if custom_id in done:
            summary.skipped += 1
            continue
        model = parsed.model or engine.model_name
        probe = None
        if cache is not None and frontend.cacheable(parsed, cache_args):
            probe = frontend.probe(cache, parsed, model, cache_args, frontend.tenant_of(parsed, None))
            if probe.hit is not None:
                summary.cache_hits += 1
                yield result(custom_id, parsed, frontend.outputs_from_hit(probe.hit, parsed, custom_id), model,
                             frontend.hit_field(probe.hit))
                continue
        line = _Line(number, custom_id, parsed, [], {}, probe)
        for k, (text, ids) in enumerate(parsed.prompts):
            request_id = f"{custom_id}#{k}#{uuid.uuid4().hex[:8]}"
            engine.add_request(request_id, ids, parsed.params, prompt=text)
            line.request_ids.append(request_id)
            pending[request_id] = line

    lines_left = len({id(line) for line in pending.values()})
    with tqdm(total=lines_left, desc="batch", unit="req", disable=not use_tqdm) as bar:
        while engine.has_unfinished_requests():
            for output in engine.step():
                if not output.finished:
                    continue
                line = pending.pop(output.request_id)
                line.outputs[output.request_id] = output
                if len(line.outputs) < len(line.request_ids):
                    continue
                outputs = [line.outputs[r] for r in line.request_ids]
                yield result(line.custom_id, line.parsed, outputs, line.parsed.model or engine.model_name,
                             None if cache is None else frontend.hit_field(None))
                answer = frontend.stored_answer(outputs) if line.probe is not None else None
                if answer is not None:
                    cache.insert(line.probe, answer)
                bar.update(1)
