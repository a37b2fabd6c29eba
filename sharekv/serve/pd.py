"""Prefill/decode disaggregation over two `sharekv serve` processes on one machine (`--role`).

The decode server is the one clients talk to. For each request it reserves host slots in its swap space,
which lives in a shared-memory file (`kv/shared_tier.py`), and posts the prompt to the prefill server's
`/pd/prefill`. The prefill server runs the prompt to its first token, copies the prompt's KV blocks
straight into those slots (a strided copy per run of consecutive blocks: no serialization, no socket for
the KV), and answers with the first token. The decode server then starts the sequence as one swapped out there
resumes: the slots are copied into its blocks and it decodes from the first token on (`LLMEngine.
add_handed_over`). Greedy tokens are those of one server doing both. Both servers must run the same model
and KV format (checked at start-up against `/pd/info`), and both count the bytes handed over in /metrics.

When the decode server's swap space has no room for a prompt, it runs that prompt itself (counted).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import httpx
from fastapi import FastAPI, Request

from sharekv.engine import LLMEngine
from sharekv.kv.block_pool import cdiv
from sharekv.kv.handover import FirstToken, Handoff, Handover
from sharekv.kv.shared_tier import SharedHostTier
from sharekv.openai_api import APIError
from sharekv.outputs import RequestOutput
from sharekv.sampling_params import InvalidParameter, SamplingParams
from sharekv.serve.async_engine import AsyncEngine, EngineDead
from sharekv.serve.metrics import ServerMetrics

logger = logging.getLogger("sharekv.serve")
INFO = "/pd/info"
PREFILL = "/pd/prefill"


def kv_identity(engine: LLMEngine) -> dict:
    """What must be equal on both sides for a slot to mean the same bytes to both."""
    return {"kv_namespace": engine.kv_namespace, "swap_layout": [
        [list(shape), str(dtype)] for shape, dtype in engine.runner.kv_cache.host_layout(1)]}


def prefill_params(params: SamplingParams) -> SamplingParams:
    """The prefill server's part of a request: its first token, sampled as the whole request would."""
    return dataclasses.replace(params, max_tokens=1, stop=[], stop_token_ids=[])


def check_handover(engine: LLMEngine, params: SamplingParams) -> None:
    try:
        engine.check_handover(params, "a request served by a prefill and a decode server")
    except InvalidParameter as e:
        raise APIError(str(e), param=e.param) from e


class PrefillRole:
    """The prefill server's `/pd/*` routes."""

    def __init__(self, engine: LLMEngine, runner: AsyncEngine, metrics: ServerMetrics) -> None:
        self.engine, self.runner, self.metrics = engine, runner, metrics
        self._tier: SharedHostTier | None = None  # the decode server's swap space, mapped at its first request

    def host(self, path: str, num_slots: int) -> list:
        if self._tier is None or self._tier.path != path:  # (a restarted decode server has a new file)
            try:
                self._tier = SharedHostTier(path, self.engine.runner.kv_cache.host_layout(num_slots))
            except (OSError, ValueError) as e:
                raise APIError(f"cannot map the decode server's KV file: {e}", param="kv_file") from e
        return self._tier.tensors

    def add_routes(self, app: FastAPI, read_json) -> None:
        @app.get(INFO)
        async def info() -> dict:
            return {"role": "prefill", **kv_identity(self.engine)}

        @app.post(PREFILL)
        async def prefill(request: Request) -> dict:
            body = await read_json(request)
            try:
                token_ids = [int(t) for t in body["prompt_token_ids"]]
                params = SamplingParams(**body["params"])
                slots = [[int(s) for s in seq_slots] for seq_slots in body["slots"]]
                host = self.host(str(body["kv_file"]), int(body["num_slots"]))
            except (KeyError, TypeError, ValueError) as e:
                raise APIError(f"malformed prefill request: {e}") from e
            try:
                self.engine.check_request(token_ids, params)
                check_handover(self.engine, params)
            except InvalidParameter as e:
                raise APIError(str(e), param=e.param) from e
            if len(slots) != params.n:
                raise APIError("one slot list per sequence", param="slots")
            handoff = Handoff(host, slots)
            queue: asyncio.Queue = asyncio.Queue()
            out: RequestOutput | EngineDead | None = None
            request_id = f"pd-{body.get('request_id', id(handoff))}"
            try:
                self.runner.add(request_id, token_ids, prefill_params(params), None, None, 0, queue,
                                handoff=handoff)
            except EngineDead as e:
                raise APIError(str(e), status=503, type="server_error") from e
            try:
                out = await queue.get()
                while not (isinstance(out, EngineDead) or out.finished):
                    out = await queue.get()
            finally:
                if not (isinstance(out, RequestOutput) and out.finished):  # the decode server went away
                    self.runner.abort(request_id)
            if isinstance(out, EngineDead):
                raise APIError(str(out), status=500, type="internal_error")
            if out.rejected:
                raise APIError("the prefill server refused the request (slo)", status=503, type="server_error",
                               code="slo_unattainable")
            self.metrics.kv_transfer_bytes.inc(handoff.bytes)
            self.metrics.kv_transfer_seconds.inc(handoff.seconds)
            self.metrics.kv_transfers.inc()
            return {"first": [handoff.first[i].to_json() for i in range(params.n)], "bytes": handoff.bytes,
                    "seconds": handoff.seconds}


class DecodeRole:
    """The decode server's side: reserve slots, have the prefill server fill them, hand over."""

    def __init__(self, engine: LLMEngine, runner: AsyncEngine, metrics: ServerMetrics, prefill_url: str,
                 api_key: str | None) -> None:
        if not engine.scheduler.swap.num_slots:
            raise ValueError("--role decode receives prompts' KV in its swap space: give it --swap-space")
        self.engine, self.runner, self.metrics = engine, runner, metrics
        self.url = prefill_url.rstrip("/")
        self.tier: SharedHostTier | None = None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=httpx.Timeout(None, connect=10))

    async def start(self) -> None:
        """Check the prefill server (refusing one whose KV would not fit this server's slots), then move the
        swap space into shared memory."""
        try:
            r = await self.http.get(INFO)
            r.raise_for_status()
        except httpx.HTTPError as e:
            raise RuntimeError(f"no prefill server answers at {self.url}: {e}") from e
        theirs, ours = r.json(), kv_identity(self.engine)
        if theirs.get("role") != "prefill" or {k: theirs.get(k) for k in ours} != ours:
            raise RuntimeError(f"the server at {self.url} is not a prefill server with this model and KV format "
                               f"(its KV: {theirs.get('kv_namespace')}; here: {ours['kv_namespace']})")
        self.tier = self.engine.runner.kv_cache.share_swap_space()
        logger.info("decode role: prompts run at %s; their KV arrives in %s (%d slots, %.1f MiB)", self.url,
                    self.tier.path, self.engine.scheduler.swap.num_slots, self.tier.nbytes / 2**20)

    async def close(self) -> None:
        await self.http.aclose()
        if self.tier is not None:
            self.tier.unlink()

    async def prefill(self, request_id: str, token_ids: list[int], params: SamplingParams) -> Handover | None:
        """The prompt run on the prefill server and its KV in this server's slots, or None if the swap space
        has no room for it now (then this server runs it)."""
        check_handover(self.engine, params)
        per_seq = cdiv(len(token_ids), self.engine.args.block_size)
        scheduler = self.engine.scheduler

        def reserve() -> list[list[int]] | None:
            taken = scheduler.reserve_slots(per_seq * params.n)
            return None if taken is None else [taken[i:i + per_seq] for i in range(0, len(taken), per_seq)]

        def release(slots: list[list[int]] | None) -> None:
            if slots is not None:
                scheduler.release_slots([s for seq_slots in slots for s in seq_slots])

        slots = await self.runner.call(reserve, undo=release)
        if slots is None:
            self.metrics.local_prefills.inc()
            return None
        try:
            body = {"request_id": request_id, "prompt_token_ids": token_ids, "params": dataclasses.asdict(params),
                    "kv_file": self.tier.path, "num_slots": scheduler.swap.num_slots, "slots": slots}
            try:
                r = await self.http.post(PREFILL, json=body)
            except httpx.HTTPError as e:
                raise APIError(f"the prefill server at {self.url} is unreachable: {e}", status=503,
                               type="server_error", code="prefill_unavailable") from e
            if r.status_code != 200:
                error = _error_of(r)
                raise APIError(error.get("message", r.text), status=r.status_code if r.status_code < 500 else 502,
                               type=error.get("type", "server_error"), param=error.get("param"),
                               code=error.get("code"))
            reply = r.json()
        except Exception:
            await self.runner.call(lambda: release(slots))  # back before the error is answered
            raise
        except BaseException:  # cancelled: give them back without waiting
            self.runner.submit(lambda: release(slots))
            raise
        self.metrics.kv_transfer_bytes.inc(reply["bytes"])
        self.metrics.kv_transfer_seconds.inc(reply["seconds"])
        self.metrics.kv_transfers.inc()
        return Handover(slots, [FirstToken.from_json(f) for f in reply["first"]])


    async def prefill_all(self, request_ids: list[str], prompts: list[list[int]],
                          params: SamplingParams) -> list[Handover | None]:
        """`prefill` of every prompt of a request at once; if one fails (or the request is cancelled), the
        slots of those that succeeded go back before the error is raised."""
        tasks = [asyncio.ensure_future(self.prefill(i, p, params)) for i, p in zip(request_ids, prompts, strict=True)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException as e:
            for t in tasks:
                if not t.done():
                    t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            held = [t.result() for t in tasks if not t.cancelled() and t.exception() is None]
            if isinstance(e, Exception):  # back before the error is answered, as `prefill` does
                await self.runner.call(lambda: self._release_now(held))
            else:
                self.release(held)
            raise

    def release(self, handovers: list[Handover | None]) -> None:
        """Give back the slots of handovers that will not be added (the engine thread does it)."""
        if any(h is not None for h in handovers):
            self.runner.submit(lambda: self._release_now(handovers))

    def _release_now(self, handovers: list[Handover | None]) -> None:
        """`release` on the engine thread."""
        slots = [s for h in handovers if h is not None for seq_slots in h.slots for s in seq_slots]
        if slots:
            self.engine.scheduler.release_slots(slots)


def _error_of(response: httpx.Response) -> dict:
    try:
        return response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return {}
