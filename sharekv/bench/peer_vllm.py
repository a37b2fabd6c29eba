"""Run a token-id workload through vLLM, timing generation only (start-up not counted).

Runs under the Python of a separate venv that has vLLM (it never imports sharekv):
    VLLM_PYTHON peer_vllm.py WORKLOAD.json RESULT.json
The workload file holds {"model", "dtype", "prompts", "max_tokens", and optionally "num_blocks",
"ignore_eos" (default true) and "stop_token_ids" (the EOS ids, for runs that stop at EOS: the tokenizer is
not loaded, so vLLM would not know them)}.
`sharekv bench throughput --vllm-python PATH` writes the workload, runs this, and reads the result.
"""

import json
import sys
import time


def main(workload_path: str, result_path: str) -> None:
    from vllm import LLM, SamplingParams

    with open(workload_path) as f:
        work = json.load(f)
    kwargs = {}
    if work.get("num_blocks"):
        kwargs["num_gpu_blocks_override"] = work["num_blocks"]
    llm = LLM(model=work["model"], dtype=work["dtype"], enable_prefix_caching=True, skip_tokenizer_init=True,
              max_model_len=work.get("max_model_len", 2048), seed=0, **kwargs)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=work.get("ignore_eos", True),
                             stop_token_ids=work.get("stop_token_ids"), detokenize=False)
              for m in work["max_tokens"]]
    prompts = [{"prompt_token_ids": p} for p in work["prompts"]]
    llm.generate(prompts[:2], params[:2])  # warm-up, like the sharekv run
    llm.reset_prefix_cache()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    with open(result_path, "w") as f:
        json.dump({"wall_seconds": wall, "token_ids": [list(o.outputs[0].token_ids) for o in outputs]}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
