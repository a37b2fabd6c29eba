"""Run token-id cases through NVIDIA kvpress, in its own protocol: the context prefilled in one pass with a
press, then the question at positions continuing from the context's length, then greedy decoding.

Runs under the Python of a separate venv that has kvpress (it never imports sharekv; kvpress pins an older
transformers than sharekv's):
    KVPRESS_PYTHON peer_kvpress.py WORKLOAD.json RESULT.json
The workload holds {"model" (an HF directory or a .gguf file), "presses": [{"name": "snapkv" |
"streaming_llm" | "pyramidkv" | "none", "compression_ratio", and the press's settings}], "cases":
[{"context": ids, "question": ids}], "max_new_tokens"}. The result holds, per press and case, the kept
(layer, KV head) positions (recovered by matching the compressed cache's keys to the full cache's) and the
greedy answer's token ids;
RESULT.pt holds the question's log-probabilities (rows for its positions but the last) per press and case.
`sharekv bench kv-fidelity --kvpress-python PATH` writes the workload, runs this, and reads the result.
"""

import contextlib
import json
import os
import sys
import time


def load_model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32}
    if os.path.isfile(path):
        kwargs["gguf_file"] = os.path.basename(path)
        path = os.path.dirname(path)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def press_context(spec: dict, model):
    """The press's hooks on the model while the context is prefilled ("none": the full cache)."""
    from kvpress import PyramidKVPress, SnapKVPress, StreamingLLMPress

    if spec["name"] == "none":
        return contextlib.nullcontext()
    kinds = {"snapkv": SnapKVPress, "streaming_llm": StreamingLLMPress, "pyramidkv": PyramidKVPress}
    settings = {k: v for k, v in spec.items() if k != "name"}
    return kinds[spec["name"]](**settings)(model)


def kept_positions(full, compressed: list) -> list:
    """Per layer and KV head, the positions of the full cache whose keys the compressed keys ([kv_heads, n,
    d] per layer) are."""
    kept = []
    for full_layer, keys in zip(full.layers, compressed, strict=True):
        heads = []
        for h in range(keys.shape[0]):
            same = (keys[h][:, None, :] == full_layer.keys[0, h][None, :, :]).all(-1)
            heads.append(sorted(same.float().argmax(-1).tolist()))
        kept.append(heads)
    return kept


def main(workload_path: str, result_path: str) -> None:
    import torch
    from transformers import DynamicCache

    with open(workload_path) as f:
        work = json.load(f)
    model = load_model(work["model"])
    results, logprobs = [], []
    with torch.inference_mode():
        for spec in work["presses"]:
            runs, rows = [], []
            for case in work["cases"]:
                context = torch.tensor([case["context"]])
                question = torch.tensor([case["question"]])
                full = DynamicCache()
                model.model(input_ids=context, past_key_values=full)
                start = time.perf_counter()
                cache = DynamicCache()
                with press_context(spec, model):
                    model.model(input_ids=context, past_key_values=cache)
                compressed = [layer.keys[0].clone() for layer in cache.layers]
                n = context.shape[1]
                pos = torch.arange(n, n + question.shape[1])[None]
                if len({layer.keys.shape[2] for layer in cache.layers}) == 1:
                    logits = model(input_ids=question, past_key_values=cache, position_ids=pos).logits[0].float()
                else:  # per-layer budgets: transformers makes one mask for every layer (its issue #35168), so
                    # the question goes a token at a time, whose single query needs none
                    logits = torch.cat([model(input_ids=question[:, i:i + 1], past_key_values=cache,
                                              position_ids=pos[:, i:i + 1]).logits[0].float()
                                        for i in range(question.shape[1])])
                tokens = [int(logits[-1].argmax())]
                for i in range(work["max_new_tokens"] - 1):
                    step = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                                 position_ids=torch.tensor([[n + question.shape[1] + i]]))
                    tokens.append(int(step.logits[0, -1].argmax()))
                seconds = time.perf_counter() - start
                kept = None if spec["name"] == "none" else kept_positions(full, compressed)
                runs.append({"kept": kept, "answer": tokens, "seconds": seconds})
                rows.append(logits[:-1].log_softmax(-1))
            results.append(runs)
            logprobs.append(rows)
    with open(result_path, "w") as f:
        json.dump({"runs": results}, f)
    torch.save(logprobs, os.path.splitext(result_path)[0] + ".pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
