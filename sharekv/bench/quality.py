"""`sharekv bench quality`: does sharekv compute what the model computes? Perplexity of held texts and greedy
continuations against transformers on the same weights.

The pieces are meant to be reused (the KV-compression work compares its runs with these):
`teacher_forced` gives next-token distributions at every position of a text computed through the engine
(paged KV cache, chunked prefill), `teacher_forced_transformers` the same from transformers, and `compare`
reads two runs side by side: top-1 agreement, mean KL divergence, largest |delta log-prob| of the text's tokens.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from dataclasses import dataclass
from importlib import resources

import torch

from sharekv.bench.report import pyplot, save_figure, write_result
from sharekv.config import EngineArgs
from sharekv.llm import LLM
from sharekv.sampling_params import SamplingParams

HELD_TEXTS = ("story", "article", "letter", "notes")  # sharekv/assets/held_texts/*.txt, written for this project


def held_text(name: str) -> str:
    return resources.files("sharekv.assets").joinpath(f"held_texts/{name}.txt").read_text()


@dataclass
class TeacherForced:
    """A text's tokens and, for every token after the first, the model's log-distribution given those before."""

    token_ids: list[int]
    logprobs: torch.Tensor  # [len(token_ids) - 1, vocab]: row i is log p(. | token_ids[:i + 1])

    def target_logprobs(self) -> torch.Tensor:
        """Log-probability of each actual next token."""
        return self.logprobs.gather(1, torch.tensor(self.token_ids[1:])[:, None]).squeeze(1)

    def perplexity(self) -> float:
        return float(torch.exp(-self.target_logprobs().double().mean()))


def teacher_forced(llm: LLM, sequences: list[list[int]], params: SamplingParams | None = None
                   ) -> list[TeacherForced]:
    """Distributions at every position, computed through the engine as prompts (chunked prefill over the
    paged KV cache; the prompt is computed, never read from the prefix cache). `params` may set the
    request's KV eviction (e.g. compress after a context, then read the rest of the text over it)."""
    engine = llm.engine
    params = params or SamplingParams(temperature=0.0, max_tokens=1)
    ids = [f"teacher-forced-{i}-{time.monotonic_ns()}" for i in range(len(sequences))]
    for request_id, tokens in zip(ids, sequences, strict=True):
        engine.add_request(request_id, tokens, params, keep_prompt_distributions=True)
    done = {}
    while any(r not in done for r in ids):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [TeacherForced(tokens, done[r].prompt_distributions.float())
            for r, tokens in zip(ids, sequences, strict=True)]


def transformers_model(path: str, dtype: str = "float32"):
    """transformers' own loading of the same model: an HF directory or a GGUF file (its GGUF path)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": getattr(torch, dtype)}
    if os.path.isfile(path):
        kwargs["gguf_file"] = os.path.basename(path)
        path = os.path.dirname(path)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def teacher_forced_transformers(model, sequences: list[list[int]]) -> list[TeacherForced]:
    runs = []
    with torch.inference_mode():
        for tokens in sequences:
            logits = model(torch.tensor([tokens])).logits[0, :-1].float()
            runs.append(TeacherForced(tokens, logits.log_softmax(-1)))
    return runs


@dataclass
class Fidelity:
    """How far a candidate run is from a reference run over the same texts."""

    positions: int
    top1_agreement: float  # share of positions whose most likely next token is the same
    mean_kl: float  # KL(reference || candidate) per position, nats
    p99_kl: float
    max_abs_logprob_delta: float  # over the texts' actual next tokens
    nll_delta: float  # mean negative log-likelihood of the texts' tokens, candidate minus reference
    reference_perplexity: float
    candidate_perplexity: float

    @property
    def perplexity_relative_delta(self) -> float:
        return abs(self.candidate_perplexity - self.reference_perplexity) / self.reference_perplexity


def compare(reference: list[TeacherForced], candidate: list[TeacherForced]) -> Fidelity:
    ref = torch.cat([r.logprobs for r in reference]).double()
    cand = torch.cat([c.logprobs for c in candidate]).double()
    targets_ref = torch.cat([r.target_logprobs() for r in reference])
    targets_cand = torch.cat([c.target_logprobs() for c in candidate])
    kl = (ref.exp() * (ref - cand)).sum(-1)

    def perplexity(targets: torch.Tensor) -> float:
        return float(torch.exp(-targets.double().mean()))

    return Fidelity(
        positions=len(ref),
        top1_agreement=float((ref.argmax(-1) == cand.argmax(-1)).double().mean()),
        mean_kl=float(kl.mean()),
        p99_kl=float(kl.quantile(0.99)),
        max_abs_logprob_delta=float((targets_ref - targets_cand).abs().max()),
        nll_delta=float((targets_ref - targets_cand).double().mean()),
        reference_perplexity=perplexity(targets_ref),
        candidate_perplexity=perplexity(targets_cand),
    )


def greedy_agreement(reference: list[list[int]], candidate: list[list[int]]) -> dict:
    """Identical continuations, and the share of positions before the first divergence."""
    matched = []
    for ref, cand in zip(reference, candidate, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(ref, cand, strict=False)) if a != b), min(len(ref), len(cand)))
        matched.append(same / max(len(ref), 1))
    return {"identical": sum(r == c for r, c in zip(reference, candidate, strict=True)), "total": len(reference),
            "mean_matched_prefix": sum(matched) / len(matched)}


def _greedy_prompts(llm: LLM, texts: list[str]) -> list[list[int]]:
    """Chat questions about each text when the model has a chat template, else each text's opening."""
    tok = llm.get_tokenizer()
    if tok.chat_template is not None:
        questions = ["Summarize this text in one sentence.", "What is the text about?"]
        return [tok.encode(tok.apply_chat_template([{"role": "user", "content": f"{text}\n\n{q}"}]),
                           add_special_tokens=False) for text in texts for q in questions]
    return [tok.encode(text.split(".")[0] + ".") for text in texts]


def run_quality_bench(args: EngineArgs, out_path: str, texts: list[str] | None = None,
                      max_new_tokens: int = 48) -> dict:
    texts = [held_text(name) for name in HELD_TEXTS] if texts is None else texts
    llm = LLM(**dataclasses.asdict(args))
    tok = llm.get_tokenizer()
    if tok is None:
        raise ValueError("bench quality needs a model with a tokenizer (it reads held texts)")
    limit = llm.engine.max_model_len - 1
    sequences = [tok.encode(t)[:limit] for t in texts]
    start = time.perf_counter()
    ours = teacher_forced(llm, sequences)
    ours_seconds = time.perf_counter() - start
    prompts = _greedy_prompts(llm, texts)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, ignore_eos=True)
    ours_greedy = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    model_path = llm.engine.model_dir
    del llm
    model = transformers_model(model_path, args.dtype)
    model.generation_config.eos_token_id = None
    start = time.perf_counter()
    theirs = teacher_forced_transformers(model, sequences)
    theirs_seconds = time.perf_counter() - start
    theirs_greedy = []
    with torch.inference_mode():
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
            theirs_greedy.append(out[0, len(p):].tolist())
    fidelity = compare(theirs, ours)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "model": model_path,
        "dtype": args.dtype,
        "texts": [{"tokens": len(s), "perplexity_sharekv": o.perplexity(), "perplexity_transformers": t.perplexity()}
                  for s, o, t in zip(sequences, ours, theirs, strict=True)],
        "fidelity_vs_transformers": dataclasses.asdict(fidelity)
        | {"perplexity_relative_delta": fidelity.perplexity_relative_delta},
        "greedy_vs_transformers": greedy_agreement(theirs_greedy, ours_greedy) | {"max_new_tokens": max_new_tokens},
        "teacher_forced_seconds": {"sharekv": ours_seconds, "transformers": theirs_seconds},
        "per_position_logprob_delta": [float(d) for d in
                                       (torch.cat([o.target_logprobs() for o in ours])
                                        - torch.cat([t.target_logprobs() for t in theirs])).tolist()],
    }
    return write_result(result, out_path, _plot)


def _plot(result: dict, path: str) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [f"text {i + 1}\n({t['tokens']} tokens)" for i, t in enumerate(result["texts"])]
    x = range(len(names))
    left.bar([i - 0.2 for i in x], [t["perplexity_sharekv"] for t in result["texts"]], 0.4, label="sharekv")
    left.bar([i + 0.2 for i in x], [t["perplexity_transformers"] for t in result["texts"]], 0.4,
             label="transformers", color="tab:gray")
    left.set_xticks(list(x), names)
    left.set_ylabel("perplexity")
    left.legend()
    right.plot(result["per_position_logprob_delta"], lw=0.8)
    right.set_xlabel("position (texts concatenated)")
    right.set_ylabel("log-prob: sharekv - transformers")
    fid = result["fidelity_vs_transformers"]
    fig.suptitle(f"{os.path.basename(result['model'])}: top-1 agreement {fid['top1_agreement']:.4f}, "
                 f"mean KL {fid['mean_kl']:.2e}")
    save_figure(fig, path)
