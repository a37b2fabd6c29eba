"""A live sharekv server on 127.0.0.1 in a background thread, for the server tests."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import uvicorn

from sharekv.bench.serve import free_port
from sharekv.config import EngineArgs, SemanticCacheArgs, ServerArgs
from sharekv.engine import LLMEngine
from sharekv.serve.app import build_app
from tests.conftest import DEMO_MODEL

ENGINE = dict(model=DEMO_MODEL, kv_cache_memory="64MiB", max_num_batched_tokens=256)


@contextlib.contextmanager
def live_server(engine: dict | None = None, cache: SemanticCacheArgs | None = None,
                **server: object) -> Iterator[tuple[str, object]]:
    """Yields the base URL (http://127.0.0.1:PORT) and the app (whose state holds the engine)."""
    llm_engine = LLMEngine(EngineArgs(**(ENGINE | (engine or {}))))
    app = build_app(llm_engine, ServerArgs(**({"api_key": None} | server)), cache)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
