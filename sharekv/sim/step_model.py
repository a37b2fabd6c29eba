"""What a scheduled step costs on a hardware profile, without running it: the FLOPs and bytes of
`model/cost.py` over the step's chunks, with the prefix groups the kernels would form
(`plan_prefix_sharing`), timed by the profile's roofline."""

from __future__ import annotations

import numpy as np

from sharekv.config import EngineArgs
from sharekv.model.config import ModelConfig
from sharekv.model.cost import ModelShapes, step_cost
from sharekv.model.kv_cache import kv_bytes_per_block
from sharekv.model.runner import DTYPES, SHARED_CHUNK_MAX_TOKENS, plan_prefix_sharing
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
        # the native kernels' limit; the portable path shares decodes only
        self.max_shared_chunk = SHARED_CHUNK_MAX_TOKENS if args.native_kernels else 1

    def work(self, step: SchedulerOutput) -> StepWork:
        chunks = step.chunks
        starts = [c.kv_start for c in chunks]
        counts = [len(c.token_ids) for c in chunks]
        decodes = sum(1 for n in counts if n == 1)
        sharing = plan_prefix_sharing([c.block_table for c in chunks], starts, counts, self.block_size,
                                      self.share_prefixes, self.max_shared_chunk)
        read = sharing.kv_slots_read(starts, counts, decodes, self.block_size)
        rows = sum(1 for c in chunks if c.samples) + sum(c.prompt_logits[1] for c in chunks if c.prompt_logits)
        cost = step_cost(self.shapes, np.asarray(starts), np.asarray(counts), rows, read, self.config.sliding_window)
        swapped = len(step.swap_out) + len(step.swap_in)
        return StepWork(cost, len(chunks), float(swapped * self.block_bytes))

    def seconds(self, step: SchedulerOutput) -> float:
        return self.profile.seconds(self.work(step))
