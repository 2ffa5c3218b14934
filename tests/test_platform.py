"""The platform layer: device choice, distributed start-up, and megatron-core / DeepSpeed on a CPU-only torch.

Distributed tests run 2 real gloo ranks in spawned processes (pipeline.platform.testing.run_distributed); the worker
functions (leading underscore) run inside those ranks and return plain values for the test to check.
"""

import os
import platform as host
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist

from pipeline.errors import ConfigError, PlatformError
from pipeline.platform import (
    Platform,
    deepspeed_config_for_cpu,
    detect_platform,
    init_distributed,
    megatron_cpu,
    patch_deepspeed_for_cpu,
    patch_megatron_for_cpu,
    set_threads_per_rank,
    tune_host_malloc,
)
from pipeline.platform.device import LAUNCHER_VARS
from pipeline.platform.testing import DistributedTestFailure, run_distributed

needs_cpu_only_torch = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU substitutes")

# ---------------------------------------------------------------------------------------------------------------
# Device, backend, threads
# ---------------------------------------------------------------------------------------------------------------


@needs_cpu_only_torch
def test_detect_platform_is_cpu_gloo_here():
    platform = detect_platform()
    assert platform == Platform(device=torch.device("cpu"), backend="gloo", cuda=False)
    assert detect_platform("cpu") == platform


@needs_cpu_only_torch
def test_asking_for_cuda_without_it_is_a_platform_error():
    with pytest.raises(PlatformError, match="CUDA was asked for"):
        detect_platform("cuda")


def test_bad_platform_requests_are_platform_errors():
    with pytest.raises(PlatformError, match="device preference"):
        detect_platform("tpu")
    with pytest.raises(PlatformError, match="needs a CUDA device"):
        Platform(device=torch.device("cpu"), backend="nccl", cuda=False)
    with pytest.raises(PlatformError, match="not supported"):
        Platform(device=torch.device("cpu"), backend="mpi", cuda=False)


def test_set_threads_per_rank_splits_cores_between_local_ranks(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        assert set_threads_per_rank(1) == 1 == torch.get_num_threads()
        assert os.environ["OMP_NUM_THREADS"] == "1"
        if not torch.cuda.is_available():
            cores = len(os.sched_getaffinity(0))
            monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 2))  # more ranks than cores: still one thread each
            assert set_threads_per_rank() == 1
            monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
            assert set_threads_per_rank() == cores == torch.get_num_threads()
        for bad in (0, -2, 1.5, True, "4"):
            with pytest.raises(PlatformError, match="positive integer"):
                set_threads_per_rank(bad)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
        with pytest.raises(PlatformError, match="LOCAL_WORLD_SIZE"):
            set_threads_per_rank()
    finally:
        torch.set_num_threads(before)


HOST_MALLOC_PROBE = """
import ctypes, torch
from pipeline.platform import tune_host_malloc

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
tuned = tune_host_malloc()
tensor = torch.empty(4 << 20)  # 16 MiB
own_pages = mallinfo2().hblkhd >= 16 << 20  # mapped apart, to be unmapped when freed
del tensor
kept = mallinfo2().fordblks >= 16 << 20  # freed into the heap: the next tensor reuses its pages
print(tuned, own_pages, kept)
"""


@pytest.mark.skipif(host.libc_ver()[0] != "glibc", reason="mallopt's settings (and mallinfo2) are glibc's")
def test_tuned_host_malloc_keeps_freed_tensors_in_the_heap():
    def probe(setting: str) -> str:
        env = {**os.environ, "MOE_MALLOC_TUNING": setting}
        out = subprocess.run([sys.executable, "-c", HOST_MALLOC_PROBE], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    # glibc's own rule (off) maps a 16 MiB block apart and unmaps it when freed: the next one faults in fresh pages.
    assert probe("auto") == "True False True"
    assert probe("off") == "False True False"


def test_bad_host_malloc_settings_are_config_errors(monkeypatch):
    monkeypatch.setenv("MOE_MALLOC_TUNING", "yes")
    with pytest.raises(ConfigError, match=r"^MOE_MALLOC_TUNING: expected one of auto, off, got 'yes'$"):
        tune_host_malloc()


def test_init_distributed_rejects_bad_setups(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(PlatformError, match="WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        init_distributed(detect_platform("cpu"))
    with pytest.raises(PlatformError, match="timeout"):
        init_distributed(detect_platform("cpu"), timeout_s=0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(PlatformError, match="RANK=2 is not below WORLD_SIZE=2"):
        init_distributed(detect_platform("cpu"))
    assert not dist.is_initialized()


def _single_process_without_launcher():
    for name in LAUNCHER_VARS:
        os.environ.pop(name, None)
    first = init_distributed(timeout_s=30)
    again = init_distributed(timeout_s=30)  # idempotent
    total = torch.ones(3)
    dist.all_reduce(total)
    return first, again, dist.get_backend(), total.tolist(), {name: os.environ.get(name) for name in LAUNCHER_VARS}


def test_init_distributed_without_a_launcher_is_a_world_of_one():
    [(first, again, backend, total, env)] = run_distributed(
        _single_process_without_launcher, world_size=1, init_process_group=False, timeout_s=60
    )
    assert (first.rank, first.world_size, first.local_rank) == (0, 1, 0) and again == first
    assert backend == ("nccl" if torch.cuda.is_available() else "gloo")
    assert total == [1.0, 1.0, 1.0]
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and int(env["MASTER_PORT"]) > 0


# ---------------------------------------------------------------------------------------------------------------
# The multi-process test helper itself: failures and hangs must surface, never block
# ---------------------------------------------------------------------------------------------------------------


def _rank1_raises_while_rank0_waits():
    if dist.get_rank() == 1:
        raise ValueError("rank 1 broke on purpose")
    dist.barrier()  # never completes: rank 1 is gone


def _sleep_forever():
    time.sleep(600)


def test_run_distributed_reports_a_failing_rank_with_its_traceback():
    with pytest.raises(DistributedTestFailure, match="rank 1 broke on purpose") as failure:
        run_distributed(_rank1_raises_while_rank0_waits, world_size=2, timeout_s=60)  # spawning 2 ranks: seconds
    assert "--- rank 1 ---" in str(failure.value) and "ValueError" in str(failure.value)


def test_run_distributed_fails_a_hang_after_its_timeout():
    start = time.monotonic()
    with pytest.raises(DistributedTestFailure, match="timed out after 3s"):
        run_distributed(_sleep_forever, world_size=2, timeout_s=3, init_process_group=False)
    assert time.monotonic() - start < 20


# ---------------------------------------------------------------------------------------------------------------
# gloo all_to_all_single with uneven and zero-size splits
# ---------------------------------------------------------------------------------------------------------------

# SPLITS[src][dst]: rows rank src sends to rank dst. Rank 0 sends nothing to itself; rank 1 sends 2 to rank 0.
SPLITS = [[0, 3], [2, 1]]


def _row(src: int, dst: int, i: int) -> list[float]:
    return [100.0 * src + 10.0 * dst + i, -(100.0 * src + 10.0 * dst + i)]


def _all_to_all_uneven():
    rank = dist.get_rank()
    world = dist.get_world_size()
    rows = [_row(rank, dst, i) for dst in range(world) for i in range(SPLITS[rank][dst])]
    send = torch.tensor(rows, dtype=torch.float32).reshape(-1, 2)
    recv_splits = [SPLITS[src][rank] for src in range(world)]
    recv = torch.empty(sum(recv_splits), 2)
    dist.all_to_all_single(recv, send, output_split_sizes=recv_splits, input_split_sizes=SPLITS[rank])
    return recv.tolist()


def test_gloo_all_to_all_single_with_uneven_and_zero_splits():
    received = run_distributed(_all_to_all_uneven, world_size=2, timeout_s=60)
    for rank, rows in enumerate(received):
        expected = [_row(src, rank, i) for src in range(2) for i in range(SPLITS[src][rank])]
        assert rows == expected, f"rank {rank} received {rows}, expected {expected}"
    assert received[0] == [_row(1, 0, 0), _row(1, 0, 1)]  # nothing from itself (zero-size split)


# ---------------------------------------------------------------------------------------------------------------
# megatron-core on CPU
# ---------------------------------------------------------------------------------------------------------------


def _megatron_expert_parallel_groups():
    assert patch_megatron_for_cpu() == list(megatron_cpu.SUBSTITUTES)
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.initialize_model_parallel(expert_model_parallel_size=2)
    ep_group = parallel_state.get_expert_model_parallel_group()
    total = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(total, group=ep_group)

    # The RNG tracker on CPU: named states forked and restored, expert state per EP rank, dense state shared.
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        dense_draw = torch.randn(4)
    with tracker.fork(tensor_parallel.get_expert_parallel_rng_tracker_name()):
        expert_draw = torch.randn(4)
    restored = torch.equal(before, torch.get_rng_state())
    with tracker.fork():
        next_dense_draw = torch.randn(4)  # the forked state advanced, it was not re-seeded

    result = {
        "ep_size": parallel_state.get_expert_model_parallel_world_size(),
        "ep_rank": parallel_state.get_expert_model_parallel_rank(),
        "ep_ranks": dist.get_process_group_ranks(ep_group),
        "tp_size": parallel_state.get_tensor_model_parallel_world_size(),
        "dp_size": parallel_state.get_data_parallel_world_size(),
        "ep_sum": total.item(),
        "dense_draw": dense_draw,
        "next_dense_draw": next_dense_draw,
        "expert_draw": expert_draw,
        "rng_restored": restored,
    }
    parallel_state.destroy_model_parallel()
    return result


@needs_cpu_only_torch
@pytest.mark.slow  # every EP=2 training test initializes model parallelism the same way
def test_megatron_initialize_model_parallel_with_ep2_on_cpu():
    ranks = run_distributed(_megatron_expert_parallel_groups, world_size=2, timeout_s=120)
    for rank, got in enumerate(ranks):
        assert (got["ep_size"], got["ep_rank"], got["ep_ranks"]) == (2, rank, [0, 1])
        assert (got["tp_size"], got["dp_size"], got["ep_sum"]) == (1, 2, 3.0)
        assert got["rng_restored"], "the tracker fork did not restore the default CPU generator state"
        assert not torch.equal(got["dense_draw"], got["next_dense_draw"])
    assert torch.equal(ranks[0]["dense_draw"], ranks[1]["dense_draw"]), "model-parallel RNG must match at TP=1"
    assert not torch.equal(ranks[0]["expert_draw"], ranks[1]["expert_draw"]), "expert RNG must differ per EP rank"


HIDDEN, VOCAB, SEQ, BATCH, EXPERTS = 32, 64, 8, 2, 4


def _build_moe_gpt(seed: int):
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    config = TransformerConfig(
        num_layers=2,
        hidden_size=HIDDEN,
        ffn_hidden_size=2 * HIDDEN,
        num_attention_heads=4,
        num_moe_experts=EXPERTS,
        moe_router_topk=2,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_aux_loss_coeff=0.01,
        expert_model_parallel_size=2,
        use_cpu_initialization=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=False,
    )
    spec = get_gpt_layer_local_spec(num_experts=EXPERTS, moe_grouped_gemm=False)
    return GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope")


def _moe_gpt_loss(model):
    # Different tokens on each rank, so the two ranks exchange uneven token counts in the all-to-all.
    generator = torch.Generator().manual_seed(100 + dist.get_rank())
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    # attention_mask=None: megatron builds its default causal mask (substitute 3).
    per_token = model(tokens, positions, attention_mask=None, labels=torch.roll(tokens, -1, dims=1))
    return per_token.float().mean()


def _moe_gpt_forward_backward():
    from megatron.core import parallel_state

    applied = patch_megatron_for_cpu()
    assert patch_megatron_for_cpu() == applied  # idempotent
    parallel_state.initialize_model_parallel(expert_model_parallel_size=2)
    model = _build_moe_gpt(seed=1234)
    same_seed = {name: p.detach().clone() for name, p in _build_moe_gpt(seed=1234).named_parameters()}
    loss = _moe_gpt_loss(model)
    loss.backward()
    params = dict(model.named_parameters())
    result = {
        "loss": loss.item(),
        "grads_finite": all(p.grad is not None and torch.isfinite(p.grad).all() for p in params.values()),
        "weights": {name: p.detach().clone() for name, p in params.items()},
        "deterministic": all(torch.equal(same_seed[name], p) for name, p in params.items()),
        "expert_grad_norm": sum(p.grad.norm().item() for n, p in params.items() if "local_experts" in n),
    }
    parallel_state.destroy_model_parallel()
    return result


@pytest.mark.slow  # CI time: every EP=2 training test runs the same forward and backward
@needs_cpu_only_torch
def test_moe_gpt_forward_backward_with_ep2_on_cpu():
    ranks = run_distributed(_moe_gpt_forward_backward, world_size=2, timeout_s=180)
    for rank, got in enumerate(ranks):
        assert torch.isfinite(torch.tensor(got["loss"])), f"rank {rank} loss {got['loss']}"
        assert got["grads_finite"], f"rank {rank} has a missing or non-finite gradient"
        assert got["expert_grad_norm"] > 0, f"rank {rank}: no gradient reached its experts"
        assert got["deterministic"], f"rank {rank}: the same seed built different weights"
    weights0, weights1 = ranks[0]["weights"], ranks[1]["weights"]
    assert weights0.keys() == weights1.keys()
    experts = [name for name in weights0 if ".local_experts." in name]
    dense = [name for name in weights0 if ".local_experts." not in name]
    assert len(experts) == 2 * 2 * (EXPERTS // 2)  # layers x (fc1, fc2) x local experts
    for name in experts:
        assert not torch.equal(weights0[name], weights1[name]), f"expert weight {name} is the same on both EP ranks"
    for name in dense:
        assert torch.equal(weights0[name], weights1[name]), f"dense weight {name} differs between ranks"


def _expect_failure(step, error_type, message: str, raised_in: str) -> str:
    """Run `step`, which must raise `error_type` (with `message`) from inside the upstream function `raised_in`."""
    try:
        step()
    except error_type as err:
        frames = [frame.name for frame in traceback.extract_tb(err.__traceback__)]
        assert message in str(err), f"{type(err).__name__} without {message!r}: {err}"
        assert raised_in in frames, f"{type(err).__name__} raised outside {raised_in}: {frames}"
        return f"{type(err).__name__} in {raised_in}: {str(err).splitlines()[0]}"
    raise AssertionError(f"expected {error_type.__name__} ({message!r}) from {raised_in} without the substitute")


def _each_substitute_is_needed():
    """Add the substitutes one at a time; each step fails as upstream does without it, then passes with it."""
    from megatron.core import parallel_state, tensor_parallel

    def with_only(*names):
        return patch_megatron_for_cpu(skip=set(megatron_cpu.SUBSTITUTES) - set(names))

    assert with_only() == []
    parallel_state.initialize_model_parallel(expert_model_parallel_size=2)
    no_cuda = "Torch not compiled with CUDA enabled"
    failures = {}

    seed = lambda: tensor_parallel.model_parallel_cuda_manual_seed(1)
    failures["rng_tracker"] = _expect_failure(seed, AssertionError, no_cuda, raised_in="add")
    with_only("rng_tracker")
    build = lambda: _build_moe_gpt(seed=1)
    failures["cuda_device_calls"] = _expect_failure(build, AssertionError, no_cuda, raised_in="current_device")
    with_only("rng_tracker", "cuda_device_calls")
    model = build()
    loss = lambda: _moe_gpt_loss(model)
    failures["causal_mask"] = _expect_failure(loss, AssertionError, no_cuda, raised_in="get_default_causal_mask")
    with_only("rng_tracker", "cuda_device_calls", "causal_mask")
    failures["te_general_gemm"] = _expect_failure(loss, NameError, "te_general_gemm", raised_in="forward")
    with_only("rng_tracker", "cuda_device_calls", "causal_mask", "te_general_gemm")
    failures["alltoall_split_sizes"] = _expect_failure(
        loss, TypeError, "all_to_all_single", raised_in="all_to_all_single"
    )
    assert with_only(*megatron_cpu.SUBSTITUTES) == list(megatron_cpu.SUBSTITUTES)
    loss().backward()
    parallel_state.destroy_model_parallel()
    return failures


@needs_cpu_only_torch
def test_each_megatron_substitute_is_needed():
    ranks = run_distributed(_each_substitute_is_needed, world_size=2, timeout_s=180)
    assert ranks[0].keys() == ranks[1].keys() == set(megatron_cpu.SUBSTITUTES)


def test_megatron_patch_is_a_no_op_when_cuda_is_available(monkeypatch):
    originals = {name: getattr(torch.cuda, name) for name in ("current_device", "Stream", "Event", "stream")}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert patch_megatron_for_cpu() == []
    assert patch_deepspeed_for_cpu() == []
    config = {"fp16": {"enabled": True}, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}
    assert deepspeed_config_for_cpu(config) == config
    assert {name: getattr(torch.cuda, name) for name in originals} == originals


def test_cpu_stand_ins_for_cuda_streams_and_events():
    assert torch.ones(2).to(megatron_cpu.cpu_current_device()).device.type == "cpu"
    side = megatron_cpu.CpuStream()
    default = megatron_cpu.cpu_current_stream()
    with megatron_cpu.cpu_stream(side):
        assert megatron_cpu.cpu_current_stream() is side and side != default
        side.wait_stream(default)
        start = side.record_event()
    end = megatron_cpu.CpuEvent()
    end.record()
    end.synchronize()
    assert megatron_cpu.cpu_current_stream() is default and start.query() and end.elapsed_time(start) <= 0.0
    with megatron_cpu.cpu_stream(None):
        assert megatron_cpu.cpu_current_stream() is default


def test_unknown_substitute_names_are_platform_errors():
    if torch.cuda.is_available():
        pytest.skip("the patch is a no-op with CUDA")
    with pytest.raises(PlatformError, match="unknown megatron substitute"):
        patch_megatron_for_cpu(skip={"no_such_substitute"})


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed on CPU
# ---------------------------------------------------------------------------------------------------------------


def _deepspeed_init_and_step():
    start = time.perf_counter()
    info = init_distributed(detect_platform("cpu"), timeout_s=60, use_deepspeed=True)
    init_s = time.perf_counter() - start
    import deepspeed
    import deepspeed.comm as ds_comm

    total = torch.tensor([float(info.rank + 1)])
    ds_comm.all_reduce(total)
    # The rewritten config builds torch.optim.AdamW, not FusedAdam (which would JIT-compile for ~84 s).
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    config = deepspeed_config_for_cpu(
        {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
    )
    engine, optimizer, _, _ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
    loss = engine(torch.ones(2, 4)).sum()
    engine.backward(loss)
    engine.step()
    return {
        "init_s": init_s,
        "sum": total.item(),
        "shm_op": ds_comm.comm.cdb.shm_comm_op,
        "optimizer": type(optimizer).__module__ + "." + type(optimizer).__name__,
        "weight": engine.module.weight.detach().clone(),
    }


@needs_cpu_only_torch
def test_deepspeed_init_distributed_on_cpu_skips_the_jit_compile():
    ranks = run_distributed(_deepspeed_init_and_step, world_size=2, timeout_s=120, init_process_group=False)
    for got in ranks:
        assert got["init_s"] < 30, f"deepspeed.init_distributed took {got['init_s']:.0f}s: did the shm op JIT-compile?"
        assert got["sum"] == 3.0 and got["shm_op"] is None
        assert got["optimizer"] == "torch.optim.adamw.AdamW"
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])  # data-parallel step kept the replicas equal


@needs_cpu_only_torch
def test_deepspeed_config_for_cpu():
    config = {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}, "bf16": {"enabled": True}}
    rewritten = deepspeed_config_for_cpu(config)
    assert rewritten["optimizer"]["params"] == {"lr": 1e-3, "torch_adam": True}
    assert "torch_adam" not in config["optimizer"]["params"]  # the caller's dict is untouched
    assert deepspeed_config_for_cpu({"optimizer": {"type": "adamw"}})["optimizer"]["params"]["torch_adam"] is True
    assert deepspeed_config_for_cpu({"optimizer": {"type": "SGD", "params": {"lr": 1}}}) == {
        "optimizer": {"type": "SGD", "params": {"lr": 1}}
    }
    with pytest.raises(PlatformError, match="fp16"):
        deepspeed_config_for_cpu({"fp16": {"enabled": True}})
    with pytest.raises(PlatformError, match="compiled DeepSpeed op"):
        deepspeed_config_for_cpu({"optimizer": {"type": "Lamb"}})
    with pytest.raises(PlatformError, match="torch_adam is false"):
        deepspeed_config_for_cpu({"optimizer": {"type": "Adam", "params": {"torch_adam": False}}})
