"""Arrival traces for `sharekv bench serve`: synthetic bursty traffic or a BurstGPT CSV.

Synthetic: Gamma inter-arrival times (shape < 1 is burstier than Poisson, 1 is Poisson), Zipf-distributed
prompt and response lengths, users of Zipf-distributed popularity (a few heavy users, many light ones),
multi-turn sessions whose every turn extends the previous turn's prompt, so a server with a prefix cache
can reuse the earlier turns, and optionally system prompts that many requests start with (of Zipf
popularity). Prompts are token ids, so lengths are exact for any model.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass

import numpy as np

TOKEN_RANGE = (16, 1000)  # ids every supported model's vocabulary holds


@dataclass
class TraceRequest:
    send_at: float  # seconds after the start; a later session turn also waits for the turn before it
    prompt: list[int]
    max_tokens: int
    user: str
    session: int | None = None  # requests of one session are sent one after another


@dataclass
class SyntheticTrace:
    num_requests: int = 120
    rate: float = 4.0  # requests per second
    gamma_shape: float = 0.5  # burstiness: coefficient of variation 1/sqrt(shape)
    prompt_len: tuple[int, int] = (16, 512)
    output_len: tuple[int, int] = (8, 128)
    zipf_a: float = 1.2  # length skew: most requests short, a few long
    num_users: int = 8
    user_zipf_a: float = 1.2  # the first user sends most requests
    session_fraction: float = 0.3  # share of requests that are turns of multi-turn sessions
    turns: int = 3
    shared_prefixes: int = 0  # system prompts; each request (a session: its first turn) starts with one
    shared_prefix_len: int = 0
    vocab_size: int = TOKEN_RANGE[1]  # prompt ids stay below it (a model with a smaller vocabulary)
    seed: int = 0


def _bounded_zipf(rng: np.random.Generator, a: float, low: int, high: int, size: int) -> np.ndarray:
    """Zipf over [low, high]: P(low + k) proportional to 1 / (k + 1)^a."""
    ranks = np.arange(1, high - low + 2, dtype=np.float64)
    p = ranks ** -a
    return low + rng.choice(len(ranks), size=size, p=p / p.sum())


def synthetic_trace(spec: SyntheticTrace) -> list[TraceRequest]:
    rng = np.random.default_rng(spec.seed)
    ids = (TOKEN_RANGE[0], min(TOKEN_RANGE[1], spec.vocab_size))
    n = spec.num_requests
    gaps = rng.gamma(spec.gamma_shape, 1.0 / (spec.rate * spec.gamma_shape), size=n)
    send_at = np.cumsum(gaps) - gaps[0]
    prompt_lens = _bounded_zipf(rng, spec.zipf_a, *spec.prompt_len, n)
    output_lens = _bounded_zipf(rng, spec.zipf_a, *spec.output_len, n)
    users = _bounded_zipf(rng, spec.user_zipf_a, 0, spec.num_users - 1, n)
    num_sessions = int(n * spec.session_fraction) // spec.turns
    # Which arrival slots are turns of which session; a session's turns take its slots in time order.
    kinds = [s for s in range(num_sessions) for _ in range(spec.turns)] + [None] * (n - num_sessions * spec.turns)
    kinds = [kinds[i] for i in rng.permutation(n)]
    session_user = {s: f"user{users[i]}" for i, s in enumerate(kinds) if s is not None}
    systems = [rng.integers(*ids, size=spec.shared_prefix_len).tolist() for _ in range(spec.shared_prefixes)]
    system_of = _bounded_zipf(rng, spec.user_zipf_a, 0, spec.shared_prefixes - 1, n) if systems else None
    history: dict[int, list[int]] = {}
    requests = []
    for i, session in enumerate(kinds):
        prompt = rng.integers(*ids, size=int(prompt_lens[i])).tolist()
        user = f"user{users[i]}"
        if systems and (session is None or session not in history):
            prompt = systems[system_of[i]] + prompt
        if session is not None:
            prompt = history.get(session, []) + prompt
            history[session] = prompt
            user = session_user[session]
        requests.append(TraceRequest(float(send_at[i]), prompt, int(output_lens[i]), user, session))
    return requests


def burstgpt_trace(path: str, time_scale: float = 1.0, max_requests: int | None = None,
                   max_prompt_len: int = 1024, max_output_len: int = 512, seed: int = 0) -> list[TraceRequest]:
    """Requests from a CSV in the BurstGPT layout (Timestamp, Model, Request tokens, Response tokens,
    Total tokens, Log Type). Timestamps are divided by `time_scale` (2 = twice as fast); failed requests
    (0 response tokens) are skipped; lengths are capped to fit a small model. The model name is the user."""
    rng = np.random.default_rng(seed)
    requests: list[TraceRequest] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"Timestamp", "Request tokens", "Response tokens"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} is not in the BurstGPT layout: no column {', '.join(sorted(missing))}")
        start = None
        for row in reader:
            response = int(float(row["Response tokens"]))
            if response <= 0:
                continue
            t = float(row["Timestamp"])
            start = t if start is None else start
            prompt_len = max(1, min(int(float(row["Request tokens"])), max_prompt_len))
            requests.append(TraceRequest((t - start) / time_scale, rng.integers(*TOKEN_RANGE, size=prompt_len).tolist(),
                                         min(response, max_output_len), row.get("Model") or "trace"))
            if max_requests is not None and len(requests) >= max_requests:
                break
    return requests
