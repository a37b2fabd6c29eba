"""Offline API with vLLM's shapes: `LLM(model=...)`, `generate`, `chat`."""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from typing import Any

from tqdm.auto import tqdm

from sharekv.config import EngineArgs
from sharekv.engine import LLMEngine
from sharekv.outputs import RequestOutput
from sharekv.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


class LLM:
    """An engine for offline batches. Keyword arguments are `EngineArgs` fields; the schedule defaults to
    `global`, which plans each batch as a whole."""

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        unknown = set(engine_args) - set(EngineArgs.field_names())
        if unknown:
            raise TypeError(f"unknown engine arguments: {sorted(unknown)}")
        engine_args.setdefault("schedule", "global")
        self.engine = LLMEngine(EngineArgs(model=model, **engine_args))
        self._counter = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            tokenizer = self.engine.tokenizer
            if tokenizer is None:
                raise ValueError("this model has no tokenizer.json: pass prompts as lists of token ids")
            return prompt, tokenizer.encode(prompt)
        return None, list(prompt)

    def generate(self, prompts: PromptType | SequenceABC[PromptType],
                 sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of the prompts."""
        if isinstance(prompts, str | dict) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        encoded = [self._prompt_ids(p) for p in prompts]
        for (_, ids), p in zip(encoded, params_list, strict=True):
            self.engine.check_request(ids, p)  # fail before anything runs
        request_ids = []
        for (text, ids), p in zip(encoded, params_list, strict=True):
            request_id = str(self._counter)
            self._counter += 1
            self.engine.add_request(request_id, ids, p, prompt=text)
            request_ids.append(request_id)
        return self._run(request_ids, use_tqdm)

    def reset_prefix_cache(self) -> bool:
        """Forget all cached KV (as vLLM's `LLM.reset_prefix_cache`); False while requests are in flight."""
        return self.engine.reset_prefix_cache()

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             chat_template: str | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt, chat_template)
            # The template writes the special tokens itself (e.g. BOS), so encoding must not add them again.
            prompts.append({"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), desc="requests", disable=not use_tqdm, unit="req") as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[r] for r in request_ids]
