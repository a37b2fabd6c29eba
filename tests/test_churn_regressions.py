"""Regressions for defects that come from requests ending, aborting or racing in ways the other tests do
not drive. Each was first reproduced with the scheduler (or engine) alone."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from sharekv import EngineArgs, SamplingParams
from sharekv.engine import LLMEngine
from sharekv.kv.manager import KVCacheManager
from sharekv.kv.swap import SwapSpace
from sharekv.sched.output import SchedulerOutput
from sharekv.sched.registry import make_scheduler
from sharekv.sequence import Sequence
from tests.conftest import DEMO_MODEL, assert_engine_clean

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def _seq(seq_id: int, tokens: list[int], user: str | None = None, max_tokens: int = 4) -> Sequence:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return Sequence(seq_id=seq_id, request_id=str(seq_id), index=0, token_ids=list(tokens), prompt_len=len(tokens),
                    params=params, user=user)


def _run_step(sched, step) -> list[Sequence]:
    """What the engine does with a step once its copies and forward ran; returns the step's sequences."""
    return sched.update_from_output(step)


def test_abort_before_the_first_step_under_global():
    """An add and an abort taken from the server's inbox in one batch: the request never reached a plan."""
    engine = LLMEngine(EngineArgs(model=DEMO_MODEL, schedule="global", kv_cache_memory="16MiB"))
    engine.add_request("kept", list(range(5, 40)), GREEDY)
    engine.add_request("gone", list(range(5, 30)), GREEDY)
    engine.abort_request("gone")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [o.request_id for o in outputs if o.finished] == ["kept"]
    assert_engine_clean(engine)


def test_swap_slots_return_when_the_last_sequence_finishes_in_its_swap_in_step():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    swap = SwapSpace(8)
    sched = make_scheduler("fcfs", kv=kv, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=32, swap=swap)
    seq = _seq(0, list(range(10, 21)))
    sched.add(seq)
    _run_step(sched, sched.schedule())
    seq.token_ids.append(7)
    sched.preempt(seq, SchedulerOutput())  # swapped out
    assert seq.swap_slots is not None and swap.num_free_slots < swap.num_slots
    step = sched.schedule()  # swapped back in
    assert step.swap_in
    _run_step(sched, step)
    sched.finish(seq)  # it ends in this step and nothing else runs: no further schedule() comes
    assert swap.num_free_slots == swap.num_slots
    swap.check_invariants()


def test_prefix_keys_are_sha256_chains_naming_model_dtype_and_block_size():
    tokens = list(range(100, 148))
    a = KVCacheManager(8, 16, key_namespace="model-a|float32|16")
    b = KVCacheManager(8, 16, key_namespace="model-a|bfloat16|16")
    seq_a, seq_b = _seq(0, tokens), _seq(1, tokens)
    a.find_cached_prefix(seq_a)
    b.find_cached_prefix(seq_b)
    assert all(isinstance(k, bytes) and len(k) == 32 for k in seq_a.block_keys)
    assert len(seq_a.block_keys) == 3  # every full block has its key
    assert not set(seq_a.block_keys) & set(seq_b.block_keys)  # other dtype, other KV
    # the same tokens give the same keys in another process (a disk tier or another worker reads them)
    code = ("from sharekv.kv.manager import KVCacheManager; from tests.test_churn_regressions import _seq; "
            "kv = KVCacheManager(8, 16, key_namespace='model-a|float32|16'); s = _seq(0, list(range(100, 148))); "
            "kv.find_cached_prefix(s); print(s.block_keys[1].hex())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}, cwd=".").stdout.strip()
    assert other == seq_a.block_keys[1].hex()
    # a block's key depends on every token before it, not only on its own tokens
    c = KVCacheManager(8, 16, key_namespace="model-a|float32|16")
    seq_c = _seq(2, [0] + tokens[1:])
    c.find_cached_prefix(seq_c)
    assert seq_c.block_keys[1] != seq_a.block_keys[1]


def test_fair_forgets_users_with_nothing_in_flight():
    kv = KVCacheManager(num_blocks=64, block_size=4)
    sched = make_scheduler("fair", kv=kv, max_num_batched_tokens=256, max_num_seqs=8, max_model_len=64)
    for i in range(300):
        seq = _seq(i, [5 + i % 7] * 6, user=f"user-{i}")
        sched.add(seq)
        for s in _run_step(sched, sched.schedule()):
            sched.finish(s)
    assert not sched.has_unfinished()
    fair = sched.policy("fair")
    assert len(fair.served) == len(fair.in_flight) == len(fair.running_per_user) == 0
    # a heavy user that goes idle and returns is lifted to the least-served active user, not below
    heavy, light = _seq(1000, [9] * 40, user="heavy"), _seq(1001, [8] * 6, user="light")
    sched.add(light)
    fair.served["light"] = 500.0
    sched.add(heavy)
    assert fair.served["heavy"] == 500.0


def test_a_group_pins_the_indexed_copy_of_a_prefix_two_leaders_computed_in_one_step():
    """Two documents behind one system prompt: both groups' leaders compute the system prompt in the same
    step. The second group must pin the blocks the prefix index holds, so that once the first group has
    ended and its blocks were reused, the second group's members still find the whole prefix."""
    bs = 4
    kv = KVCacheManager(num_blocks=40, block_size=bs)
    sched = make_scheduler("global", kv=kv, max_num_batched_tokens=512, max_num_seqs=16, max_model_len=128)
    system = list(range(100, 116))  # 4 blocks
    docs = [list(range(200, 216)), list(range(300, 316))]  # 4 blocks each
    seqs = []
    for d, doc in enumerate(docs):
        for q in range(2):
            seqs.append(_seq(len(seqs), system + doc + [400 + 10 * d + q, 401], max_tokens=1))
            sched.add(seqs[-1])
    leaders = _run_step(sched, sched.schedule())
    assert len(leaders) == 2  # one per document group, in the same step
    sched.schedule()  # the groups pin their prefixes and start their members
    groups = {sched.policy("global").group_of[s.seq_id] for s in leaders}
    for group in groups:
        assert group.pinned
        for i, block in enumerate(group.pinned):
            assert kv.pool.lookup(group.leader.block_keys[i]) is block


def test_native_kernel_build_is_keyed_on_the_cpu():
    from sharekv.model.native import cpu_signature, module_name

    assert cpu_signature().startswith(platform.machine())
    avx2 = module_name(b"source", "x86_64 avx avx2 fma sse4_2")
    assert avx2 != module_name(b"source", "x86_64 avx avx2 avx512f avx512bw fma sse4_2")
    assert avx2 == module_name(b"source", "x86_64 avx avx2 fma sse4_2")
    assert avx2 != module_name(b"other source", "x86_64 avx avx2 fma sse4_2")


def test_native_build_survives_a_lock_left_by_a_killed_process(tmp_path):
    """A process killed while torch held its build lock (a plain file) left it behind; the next start must
    not wait on it forever."""
    import os

    from sharekv.model import native

    if native.cpu_kernels() is None:  # builds once here if no earlier test did
        pytest.skip("no compiler here: the torch path runs, nothing is built or locked")
    name = native.module_name(native.sources_bytes(), native.cpu_signature())
    build_dir = os.path.join(native.default_cache_dir(), "torch_extensions", name)
    open(os.path.join(build_dir, "lock"), "w").close()
    code = "from sharekv.model import native; assert native._build() is not None"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert not os.path.exists(os.path.join(build_dir, "lock"))
