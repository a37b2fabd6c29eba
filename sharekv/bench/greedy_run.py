"""One timed greedy `LLM.generate`, as every benchmark runs its requests: exactly `max_tokens` each."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sharekv.llm import LLM
from sharekv.model.cost import CostLog
from sharekv.outputs import RequestOutput
from sharekv.sampling_params import SamplingParams


@dataclass
class GreedyRun:
    outputs: list[RequestOutput]
    wall_seconds: float
    prompt_tokens: int
    output_tokens: int
    costs: CostLog  # the run's steps: FLOPs and bytes, for its roofline floor

    def figures(self) -> dict:
        """Throughput figures and each request's tokens (the greedy-match check compares these)."""
        wall = self.wall_seconds
        return {
            "requests": len(self.outputs),
            "wall_seconds": wall,
            "requests_per_second": len(self.outputs) / wall,
            "tokens_per_second": (self.prompt_tokens + self.output_tokens) / wall,
            "input_tokens_per_second": self.prompt_tokens / wall,
            "output_tokens_per_second": self.output_tokens / wall,
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "token_ids": [o.outputs[0].token_ids for o in self.outputs],
        }


def greedy_generate(llm: LLM, prompts: list[list[int]], max_tokens: list[int], use_tqdm: bool = True,
                    ignore_eos: bool = True) -> GreedyRun:
    """Greedy decoding, by default with EOS ignored so every policy and engine does the same amount of work
    (with real EOS, engines whose greedy tokens agree still stop at the same places)."""
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=ignore_eos) for n in max_tokens]
    with llm.engine.runner.recording_costs() as costs:
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=use_tqdm)
        wall = time.perf_counter() - start
    return GreedyRun(outputs, wall, sum(len(p) for p in prompts), sum(len(o.outputs[0].token_ids) for o in outputs),
                     costs)
