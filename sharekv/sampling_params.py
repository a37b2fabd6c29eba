"""Per-request sampling settings, with vLLM's names and defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from sharekv.kv.eviction import NONE, POLICIES, KVBudget

# A request's seed seeds a torch generator, which takes 64 bits (vLLM checks the same range).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
TOP_K_ALL = 2**31 - 1


class InvalidParameter(ValueError):
    """A request setting out of range; `param` names it (OpenAI's error field of the same name)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k alternatives per generated token (the sampled one is always given)
    # top-k alternatives at each prompt position (the prompt's own token always given); the prompt is then
    # computed in full, not read from the prefix cache, as in vLLM
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # KV eviction for this request (sharekv's extension): a policy of kv/eviction.py or "none", and the KV
    # it keeps (tokens, or the fraction kept); unset, the engine's --kv-eviction and --kv-budget apply
    kv_eviction: str | None = None
    kv_budget: int | float | str | None = None
    # compress once this many prompt tokens are computed; the rest of the prompt then reads the compressed
    # KV (kvpress's context and question); unset: when the prompt is done
    kv_compress_at: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1 or self.top_k > TOP_K_ALL:
            self.top_k = 0  # a k past any vocabulary keeps every token, as disabled does
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        checks = [
            ("n", self.n >= 1, "n must be at least 1"),
            ("temperature", self.temperature >= 0.0, "temperature must be >= 0"),
            ("top_p", 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "top_k must be -1 (disabled), 0 (disabled) or positive"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "repetition_penalty must be > 0"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             "prompt_logprobs must be in [0, 20]"),
            ("kv_compress_at", self.kv_compress_at is None or self.kv_compress_at >= 1,
             "kv_compress_at must be at least 1"),
            ("seed", self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
             "seed must fit in a signed 64-bit integer"),
        ]
        for param, ok, message in checks:
            if not ok:
                raise InvalidParameter(param, f"{message}, got {getattr(self, param)!r}")
        if self.kv_eviction not in (None, NONE, *POLICIES):
            raise InvalidParameter("kv_eviction", f"kv_eviction must be none or one of {', '.join(POLICIES)}, "
                                                  f"got {self.kv_eviction!r}")
        if self.kv_budget is not None:
            try:
                KVBudget.parse(self.kv_budget)
            except ValueError as e:
                raise InvalidParameter("kv_budget", str(e)) from None
        if any(not s for s in self.stop):
            raise InvalidParameter("stop", "stop strings must be non-empty")
