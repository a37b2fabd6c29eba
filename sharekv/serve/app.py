"""The OpenAI-compatible HTTP API (FastAPI) over the background engine loop."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sharekv.cache import frontend
from sharekv.cache.semantic import CacheHit, Probe
from sharekv.config import SemanticCacheArgs, ServerArgs, parse_bytes
from sharekv.engine import LLMEngine
from sharekv.openai_api import (
    CHAT,
    COMPLETIONS,
    APIError,
    ParsedRequest,
    StreamFormatter,
    new_request_id,
    parse_and_check,
    response_body,
)
from sharekv.outputs import RequestOutput
from sharekv.protocol import ChatCompletionRequest, CompletionRequest, openapi_operation, openapi_schemas
from sharekv.serve.async_engine import AsyncEngine, EngineDead, QueueFull
from sharekv.serve.metrics import ServerMetrics
from sharekv.serve.pd import DecodeRole, PrefillRole

logger = logging.getLogger("sharekv.serve")
RETRY_AFTER_SECONDS = 1


def _error(status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    return JSONResponse(APIError(message, status, type_, param, code).body(), status_code=status, headers=headers)


async def _read_json(request: Request, limit: int) -> object:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(f"the request body is larger than {limit} bytes", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(f"the request body is larger than {limit} bytes", status=413)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON: {e}") from e


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(obj: object) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class APIKeyMiddleware:
    """Requires `Authorization: Bearer KEY` on /v1/* (as OpenAI and vLLM do); /health and /metrics stay open.
    Plain ASGI, so streaming responses and disconnect detection pass through untouched."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = _error(401, "Incorrect API key provided. Send it as 'Authorization: Bearer KEY'.",
                                  "invalid_request_error", code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(engine: LLMEngine, server: ServerArgs, cache_args: SemanticCacheArgs | None = None,
              engine_thread: bool = True) -> FastAPI:
    """The server's app. Its engine loop runs on a thread of its own, or (`engine_thread` False) on the
    thread that calls `app.state.async_engine.run()` once the app has started (`serve`)."""
    server.validate()
    model_name = server.served_model_name or engine.model_name
    metrics = ServerMetrics(model_name)
    metrics.describe_cache(engine.args.block_size, engine.args.kv_cache_dtype, engine.num_blocks)
    cache_args = cache_args or SemanticCacheArgs()
    cache = frontend.open_cache(cache_args)
    if cache is not None:
        cache.listeners.append(metrics.observe_cache_lookup)
    runner = AsyncEngine(engine, metrics, server.max_waiting_requests)
    body_limit = parse_bytes(server.max_request_body)
    decode_role = DecodeRole(engine, runner, metrics, server.prefill_url, server.api_key) \
        if server.role == "decode" else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.calibrate_step_time()  # before the first request: the step-time model and /metrics need it
        if decode_role is not None:
            await decode_role.start()
        runner.start(own_thread=engine_thread)
        logger.info("serving %s (KV pool %d tokens, schedule %s%s)", model_name, engine.num_kv_tokens,
                    engine.args.schedule, "" if server.role == "both" else f", role {server.role}")
        yield
        runner.stop()
        if decode_role is not None:
            await decode_role.close()
        if cache is not None:
            cache.close()

    app = FastAPI(title="sharekv", version="0.1.0", lifespan=lifespan)

    def openapi() -> dict:
        # Routes read the body themselves (to bound its size), so the models join the document here.
        if app.openapi_schema is None:
            FastAPI.openapi(app)
            app.openapi_schema.setdefault("components", {}).setdefault("schemas", {}).update(openapi_schemas())
        return app.openapi_schema

    app.openapi = openapi
    app.state.async_engine = runner
    app.state.metrics = metrics
    app.state.semantic_cache = cache

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail), "invalid_request_error", headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        logger.exception("request failed")
        return _error(500, f"internal error: {type(e).__name__}", "internal_error")

    if server.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=server.api_key)

    @app.get("/health")
    async def health() -> Response:
        if runner.error is not None:
            return _error(503, f"the engine stopped: {runner.error}", "internal_error")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        if cache is not None:
            metrics.observe_cache(cache)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "sharekv", "root": engine.model_dir,
                                            "max_model_len": engine.max_model_len}]}

    def overloaded(e: QueueFull) -> APIError:
        return APIError(f"the server is overloaded ({e}); retry later", status=503, type="server_error",
                        code="overloaded")

    async def generate(request: Request, endpoint: str) -> Response:
        try:
            runner.check_room()
        except QueueFull as e:
            raise overloaded(e) from e
        body = await _read_json(request, body_limit)
        parsed = parse_and_check(body, endpoint, engine, server.max_n, server.max_tokens_limit)
        if parsed.model is not None and parsed.model != model_name:
            raise APIError(f"The model `{parsed.model}` does not exist.", status=404, param="model",
                           code="model_not_found")
        request_id = new_request_id(endpoint)
        probe: Probe | None = None
        if cache is not None and frontend.cacheable(parsed, cache_args):
            tenant = frontend.tenant_of(parsed, server.api_key)
            probe = await asyncio.to_thread(frontend.probe, cache, parsed, model_name, cache_args, tenant)
            if probe.hit is not None:
                return _cached_response(parsed, request_id, probe.hit)
        cache_headers = {} if cache is None else {frontend.HEADER: "miss" if probe is not None else "bypass"}
        queue: asyncio.Queue = asyncio.Queue()
        ids = [f"{request_id}-{i}" for i in range(len(parsed.prompts))]
        arrival = time.monotonic()
        handovers = [None] * len(ids)
        if decode_role is not None:  # the prompts run on the prefill server first
            handovers = await decode_role.prefill_all(ids, [t for _, t in parsed.prompts], parsed.params)
        added = 0
        try:
            for engine_id, (text, token_ids), handover in zip(ids, parsed.prompts, handovers, strict=True):
                runner.add(engine_id, token_ids, parsed.params, text, parsed.user, parsed.priority, queue,
                           parsed.ttft_slo, parsed.tpot_slo, handover=handover, arrival_time=arrival)
                added += 1
        except (QueueFull, EngineDead) as e:
            for engine_id in ids:
                runner.abort(engine_id)
            if decode_role is not None:
                decode_role.release(handovers[added:])
            if isinstance(e, EngineDead):
                raise APIError(str(e), status=503, type="server_error") from e
            raise overloaded(e) from e
        index = {engine_id: i for i, engine_id in enumerate(ids)}

        def abort_all() -> None:
            for engine_id in ids:
                runner.abort(engine_id)

        final: list[RequestOutput | None] = [None] * len(index)
        # Wait for the first output before answering, so a request the slo schedule refuses gets a 503
        # (streaming included); give up and stop generating if the client goes away first.
        waiter = _collect(queue, index, final) if not parsed.stream else _next_output(queue)
        watcher = asyncio.ensure_future(_disconnected(request))
        collector = asyncio.ensure_future(waiter)
        try:
            await asyncio.wait({watcher, collector}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not collector.done():
                collector.cancel()
                abort_all()
        if collector.cancelled():
            return Response(status_code=499)  # the client is gone; nobody reads this
        try:
            first = collector.result()
        except APIError:
            abort_all()
            raise
        if not parsed.stream:
            body = response_body(parsed, final, model_name, request_id)
            if cache is not None:
                body["semantic_cache"] = frontend.hit_field(None)
                await _store(probe, final)
            return JSONResponse(body, headers=cache_headers)
        if first.rejected:
            abort_all()
            raise _refused()
        return StreamingResponse(_stream(parsed, request_id, queue, index, final, first, probe),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache", **cache_headers})

    async def _store(probe: Probe | None, final: list[RequestOutput]) -> None:
        """After a miss, keep the answer (the probe already holds its embedding)."""
        answer = frontend.stored_answer(final) if probe is not None else None
        if answer is not None:
            await asyncio.to_thread(cache.insert, probe, answer)

    def _cached_response(parsed: ParsedRequest, request_id: str, hit: CacheHit) -> Response:
        outputs = frontend.outputs_from_hit(hit, parsed, f"{request_id}-0")
        marker = frontend.hit_field(hit)
        headers = {frontend.HEADER: "hit"}
        if not parsed.stream:
            body = response_body(parsed, outputs, model_name, request_id)
            body["semantic_cache"] = marker
            return JSONResponse(body, headers=headers)

        async def chunks() -> AsyncIterator[str]:
            formatter = StreamFormatter(parsed, model_name, request_id)
            usage_chunk = formatter.usage_chunk(outputs)
            for chunk in [*formatter.first_chunks(), *formatter.chunks(0, outputs[0]),
                          *([usage_chunk] if usage_chunk is not None else [])]:
                yield _sse(chunk | {"semantic_cache": marker})
            yield "data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", **headers})

    def _refused() -> APIError:
        return APIError("the request cannot meet its time-to-first-token target (ttft_slo) on this server "
                        "now; retry later or with a longer target", status=503, type="server_error",
                        code="slo_unattainable")

    async def _next_output(queue: asyncio.Queue) -> RequestOutput:
        out = await queue.get()
        if isinstance(out, EngineDead):
            raise APIError(str(out), status=500, type="internal_error")
        return out

    async def _collect(queue: asyncio.Queue, index: dict[str, int], final: list[RequestOutput | None]) -> None:
        while any(o is None for o in final):
            out = await _next_output(queue)
            if out.rejected:
                raise _refused()
            if out.finished:
                final[index[out.request_id]] = out

    async def _stream(parsed: ParsedRequest, request_id: str, queue: asyncio.Queue, index: dict[str, int],
                      final: list[RequestOutput | None], first: RequestOutput,
                      probe: Probe | None) -> AsyncIterator[str]:
        formatter = StreamFormatter(parsed, model_name, request_id)
        out: RequestOutput | EngineDead = first
        try:
            for chunk in formatter.first_chunks():
                yield _sse(chunk)
            while True:
                if isinstance(out, EngineDead) or out.rejected:
                    error = _refused() if not isinstance(out, EngineDead) else APIError(
                        str(out), status=500, type="internal_error")
                    yield _sse(error.body())
                    return
                for chunk in formatter.chunks(index[out.request_id], out):
                    yield _sse(chunk)
                if out.finished:
                    final[index[out.request_id]] = out
                if all(o is not None for o in final):
                    break
                out = await queue.get()
            usage_chunk = formatter.usage_chunk(final)
            if usage_chunk is not None:
                yield _sse(usage_chunk)
            yield "data: [DONE]\n\n"
            await _store(probe, final)
        finally:
            # Reached early when the client disconnects (the response task is cancelled): stop generating.
            for engine_id, i in index.items():
                if final[i] is None:
                    runner.abort(engine_id)

    @app.post("/v1/cache/invalidate")
    async def invalidate(request: Request) -> dict:
        """Removes semantic-cache entries by id, user (tenant) and/or category."""
        if cache is None:
            raise APIError("this server runs without a semantic cache (start it with --semantic-cache PATH)",
                           status=404, code="cache_disabled")
        body = await _read_json(request, body_limit)
        fields = {"id": int, "user": str, "category": str}
        if not isinstance(body, dict) or not any(k in body for k in fields):
            raise APIError("send at least one of 'id', 'user', 'category'")
        for name, kind in fields.items():
            if name in body and (not isinstance(body[name], kind) or isinstance(body[name], bool)):
                raise APIError(f"'{name}' must be a {kind.__name__}", param=name)
        user = body.get("user")
        removed = await asyncio.to_thread(cache.invalidate, body.get("id"), None if user is None else f"user:{user}",
                                          body.get("category"))
        return {"object": "cache.invalidation", "invalidated": removed}

    if server.role == "prefill":
        PrefillRole(engine, runner, metrics).add_routes(app, lambda request: _read_json(request, body_limit))

    @app.post(COMPLETIONS, openapi_extra=openapi_operation(CompletionRequest))
    async def completions(request: Request) -> Response:
        return await generate(request, COMPLETIONS)

    @app.post(CHAT, openapi_extra=openapi_operation(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await generate(request, CHAT)

    return app


def serve(engine: LLMEngine, server: ServerArgs, cache_args: SemanticCacheArgs | None = None) -> None:
    import uvicorn

    if server.host not in ("127.0.0.1", "localhost", "::1") and not server.api_key:
        logger.warning("binding to %s without --api-key: anyone who can reach this port can use the model",
                       server.host)
    # The step loop runs on this thread, which loaded the model (`AsyncEngine.run` says why), and HTTP on
    # another; Ctrl-C or SIGTERM here stops both.
    engine.calibrate_step_time()
    app = build_app(engine, server, cache_args, engine_thread=False)
    http = uvicorn.Server(uvicorn.Config(app, host=server.host, port=server.port, log_level="info",
                                         timeout_graceful_shutdown=5))
    http_thread = threading.Thread(target=http.run, name="sharekv-http", daemon=True)

    def drain(signum: int, frame: object) -> None:
        """The first SIGTERM or Ctrl-C stops HTTP taking requests; the step loop finishes what is in flight
        and HTTP's shutdown then stops it. Raising here instead could land mid-step and lose the step's
        tokens (a stream in flight ended in an error). A second signal stops at once."""
        if http.should_exit:
            raise KeyboardInterrupt
        http.should_exit = True

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    http_thread.start()
    runner = app.state.async_engine
    try:
        while not runner.started.wait(0.2):  # start-up: the model is loaded; only the app may still fail
            if not http_thread.is_alive():
                raise SystemExit(1)
        runner.run()
    except KeyboardInterrupt:
        pass
    finally:
        http.should_exit = True
        http_thread.join()
