"""What a scheduled step costs on a hardware profile, without running it: the FLOPs and bytes of
`model/cost.py` over the step's chunks, with the prefix groups the kernels would form
(`plan_prefix_sharing`), timed by the profile's roofline. Attention is split as the kernels split it: the
paged per-row kernel (decodes and prefix-group members: it reads KV) and whole prefill chunks (each a
matrix product over its context)."""

from __future__ import annotations

import numpy as np

from sharekv.config import EngineArgs
from sharekv.model.config import ModelConfig
from sharekv.model.cost import ModelShapes, attended_pairs, step_cost
from sharekv.model.kv_cache import kv_bytes_per_block
from sharekv.model.runner import DTYPES, SharingRule, plan_prefix_sharing
from sharekv.sched.output import SchedulerOutput
from sharekv.sim.hardware import HardwareProfile, StepWork


class StepCostModel:
    def __init__(self, config: ModelConfig, args: EngineArgs, profile: HardwareProfile) -> None:
        dtype = DTYPES[args.dtype]
        self.config = config
        self.profile = profile
        self.block_size = args.block_size
        self.block_bytes = kv_bytes_per_block(config, args.block_size, dtype, args.kv_cache_dtype, args.kv_group_size)
        self.shapes = ModelShapes.of(config, dtype.itemsize, self.block_bytes // args.block_size)
        self.share_prefixes = args.prefix_shared_attention and config.sliding_window is None
        self.sharing = SharingRule.for_backend(args.native_kernels)  # as the runner plans

    def work(self, step: SchedulerOutput) -> StepWork:
        chunks = step.chunks
        starts = [c.kv_start for c in chunks]
        counts = [len(c.token_ids) for c in chunks]
        decodes = sum(1 for n in counts if n == 1)
        sharing = plan_prefix_sharing([c.block_table for c in chunks], starts, counts, self.block_size,
                                      self.share_prefixes, self.sharing.max_chunk,
                                      min_members=self.sharing.min_members)
        read = sharing.kv_slots_read(starts, counts, decodes, self.block_size)
        rows = sum(1 for c in chunks if c.samples) + sum(c.prompt_logits[1] for c in chunks if c.prompt_logits)
        s, n = np.asarray(starts, dtype=np.int64), np.asarray(counts, dtype=np.int64)
        window = self.config.sliding_window
        cost = step_cost(self.shapes, s, n, rows, read, window)
        whole = ~sharing.paged(decodes)  # prefill chunks that run as chunks
        chunk_flops = 2.0 * attended_pairs(s[whole], n[whole], window) * self.shapes.attention_macs_per_pair
        chunk_kv = float((s + n)[whole].sum() * self.shapes.kv_bytes_per_token)
        swapped = len(step.swap_out) + len(step.swap_in)
        return StepWork(tokens=int(n.sum()), sequences=len(chunks), prefill_chunks=int(whole.sum()),
                        linear_flops=cost.linear_flops, weight_bytes=cost.weight_bytes,
                        lm_head_flops=cost.lm_head_flops, lm_head_bytes=cost.lm_head_bytes,
                        paged_attention_flops=cost.attention_flops - chunk_flops,
                        paged_kv_bytes=cost.kv_bytes - chunk_kv,
                        chunk_attention_flops=chunk_flops, chunk_kv_bytes=chunk_kv,
                        swap_bytes=float(swapped * self.block_bytes))

    def seconds(self, step: SchedulerOutput) -> float:
        return self.profile.seconds(self.work(step))
