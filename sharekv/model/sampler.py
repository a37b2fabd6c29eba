"""Turn a batch of logits into next tokens, each row with its own sampling settings, in batched tensor ops."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sharekv.sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]  # of each sampled token, from the model's raw distribution
    top_logprobs: list[dict[int, float] | None]


def _penalize(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Repetition penalty over prompt and output tokens; presence and frequency penalties over output."""
    rows = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0
            or s.params.presence_penalty or s.params.frequency_penalty]
    if not rows:
        return
    vocab = logits.shape[1]
    device = logits.device
    for i in rows:  # one vectorised update per penalised row; never a loop over tokens
        p = seqs[i].params
        out_counts = torch.bincount(torch.tensor(seqs[i].output_token_ids, dtype=torch.long, device=device),
                                    minlength=vocab)[:vocab].to(logits.dtype)
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = out_counts > 0
            seen[torch.tensor(seqs[i].token_ids[:seqs[i].prompt_len], dtype=torch.long, device=device)] = True
            penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
            row.copy_(torch.where(seen, penalized, row))
        row -= p.frequency_penalty * out_counts + p.presence_penalty * (out_counts > 0).to(logits.dtype)


def _truncate(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens outside each row's top-k / top-p / min-p set with -inf."""
    vocab = logits.shape[1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    positions = torch.arange(vocab, device=logits.device)[None, :]
    drop = positions >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # top-p: drop a token once the mass of the tokens before it already reaches p (keep at least one)
    top_p = torch.where(top_p >= 1.0, torch.full_like(top_p, float("inf")), top_p)  # 1.0: no rounding losses
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    drop |= probs < (min_p * probs[:, 0])[:, None]
    drop[:, 0] = False
    sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_idx, sorted_logits)


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        raw_logprobs = logits.log_softmax(dim=-1)
        _penalize(logits, seqs)
        params = [s.params for s in seqs]
        greedy = torch.tensor([p.greedy for p in params], device=self.device)
        tokens = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            tokens = torch.where(greedy, tokens, self._sample(logits, seqs))
        chosen = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
        top: list[dict[int, float] | None] = [None] * len(seqs)
        wanted = [i for i, p in enumerate(params) if p.logprobs]
        if wanted:
            k = max(params[i].logprobs for i in wanted)
            values, indices = raw_logprobs[wanted].topk(k, dim=-1)
            for row, i in enumerate(wanted):
                n = params[i].logprobs
                top[i] = dict(zip(indices[row, :n].tolist(), values[row, :n].tolist(), strict=True))
        return SamplerOutput(tokens.tolist(), chosen.tolist(), top)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [s.params for s in seqs]
        temperature = torch.tensor([p.temperature or 1.0 for p in params], device=self.device)
        logits = logits / temperature[:, None]
        if any(p.top_k or p.top_p < 1.0 or p.min_p for p in params):
            logits = _truncate(
                logits,
                torch.tensor([p.top_k for p in params], device=self.device),
                torch.tensor([p.top_p for p in params], device=self.device),
                torch.tensor([p.min_p for p in params], device=self.device),
            )
        probs = logits.softmax(dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p. A seeded sequence draws its noise
        # from its own generator, so its tokens do not depend on what else is in the batch.
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, seq in enumerate(seqs):
            if seq.generator is not None:
                noise[i].exponential_(generator=seq.generator)
        return (probs / noise).argmax(dim=-1)
