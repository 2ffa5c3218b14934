"""CPU substitutes for the five megatron-core 0.16.1 code paths that assume CUDA (see shared/PLATFORM.md).

    1. cuda_device_calls     torch.cuda.current_device/synchronize/Stream/Event/current_stream/default_stream/stream
                             -> CPU equivalents (embedding and linear init, Router.gating, the alltoall dispatcher)
    2. rng_tracker           tensor_parallel/random.py: the RNG tracker forks CPU generator states instead of CUDA ones
    3. causal_mask           transformer/utils.py get_default_causal_mask (and its sliding-window twin) -> device="cpu"
    4. te_general_gemm       transformer/moe/moe_utils.py names te_general_gemm without TransformerEngine -> None
    5. alltoall_split_sizes  token_dispatcher.py gives all_to_all_single numpy splits only for CUDA tensors -> CPU too

Each is applied only on a CPU-only torch (torch.cuda.is_available() is False, where the replaced CUDA paths could only
raise), and as narrowly as the upstream code allows: the megatron module attribute that is called where there is one,
torch.cuda itself only for the direct `torch.cuda.X` calls spread over dozens of megatron modules.
`UPSTREAM_PINS` holds the sha256 of each upstream function a substitute replaces or relies on;
tests/test_platform_pins.py fails when an upgrade changes one, so the substitute gets re-checked instead of drifting.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable, Collection

import torch

from pipeline.errors import PlatformError

# Which upstream functions (module:qualname) each substitute replaces or depends on.
SUBSTITUTES: dict[str, tuple[str, ...]] = {
    "cuda_device_calls": (
        "megatron.core.tensor_parallel.layers:VocabParallelEmbedding.__init__",
        "megatron.core.tensor_parallel.mappings:_AllToAll.forward",
        "megatron.core.transformer.moe.router:Router.gating",
        "megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher.__init__",
        "megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize",
    ),
    "rng_tracker": (
        "megatron.core.tensor_parallel.random:_get_cuda_rng_state",
        "megatron.core.tensor_parallel.random:_set_cuda_rng_state",
        "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.add",
        "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.fork",
        "megatron.core.tensor_parallel.random:model_parallel_cuda_manual_seed",
        "megatron.core.tensor_parallel.random:initialize_rng_tracker",  # still picks CudaRNGStatesTracker
    ),
    "causal_mask": (
        "megatron.core.transformer.utils:get_default_causal_mask",
        "megatron.core.transformer.utils:get_sliding_window_causal_mask",
        "megatron.core.fusions.fused_softmax:FusedScaleMaskSoftmax.forward_torch_softmax",
    ),
    "te_general_gemm": (
        "megatron.core.transformer.moe.moe_utils:RouterGatingLinearFunction.forward",
        "megatron.core.transformer.moe.moe_utils:RouterGatingLinearFunction.backward",
    ),
    "alltoall_split_sizes": (
        "megatron.core.transformer.moe.moe_utils:maybe_move_tensor_to_cpu",
        "megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize",
    ),
}

# sha256 of inspect.getsource(upstream) in megatron-core 0.16.1.
# fmt: off
UPSTREAM_PINS: dict[str, str] = {
    "megatron.core.tensor_parallel.layers:VocabParallelEmbedding.__init__":
        "9c2259ce5a00d7010f771313101e4d802d5f0b64d5e48cb692a68d804be57cc4",
    "megatron.core.tensor_parallel.mappings:_AllToAll.forward":
        "a4e3e4984091d25faa93564e96562a4390734744e442646541d478c933025ab1",
    "megatron.core.transformer.moe.router:Router.gating":
        "642d0c2eb9ba6638b306d44a28621be1098d2ab63d14b0ee463194f529be5079",
    "megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher.__init__":
        "dfafd17183db3f0cd29e5248d882efc7ef48330c7a1beb732e565feaf129722d",
    "megatron.core.transformer.moe.token_dispatcher:MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize":
        "306811df71072b74a18efdbb0b22229771225b71edff95d5231bf391e2813adb",
    "megatron.core.tensor_parallel.random:_get_cuda_rng_state":
        "aa26caaa069c5c4feff0f9f4e69f0f2ab6d6fc7940f71c3a6d0fe9303447d3dc",
    "megatron.core.tensor_parallel.random:_set_cuda_rng_state":
        "b179c9d95438b61c1d9b58e8e13cc6534f2ae2f870d991c42438de53829ed398",
    "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.add":
        "e5e9ab39a7c1e085fe0b95cb0ef4e25f5c43e3ad9caf876813ef78e3f52f0eec",
    "megatron.core.tensor_parallel.random:CudaRNGStatesTracker.fork":
        "6821e1e397253d43b111f5cb8f7feab6301faacf24deaece01416a7c644322d5",
    "megatron.core.tensor_parallel.random:model_parallel_cuda_manual_seed":
        "7423a4a62741adea516a50b3dc5f3305d0129448a42363d55cd56227c12f3da8",
    "megatron.core.tensor_parallel.random:initialize_rng_tracker":
        "4bc461df7c7f7a432894774e2e5304db3daf14227abeebcf81cd48d3124d0a88",
    "megatron.core.transformer.utils:get_default_causal_mask":
        "4638b2c6665fc284592df1e01a55f8af25dbf21fdd06201e20de90427dcd8e6b",
    "megatron.core.transformer.utils:get_sliding_window_causal_mask":
        "3b5690434c3b131dc3cf96e48f54f57e58b361f87fccd78d6cdad4e9167feee6",
    "megatron.core.fusions.fused_softmax:FusedScaleMaskSoftmax.forward_torch_softmax":
        "af74f78c0020665e76a920c6bfb27dd14c64db230b349c88067f6233c9acc33d",
    "megatron.core.transformer.moe.moe_utils:RouterGatingLinearFunction.forward":
        "dcba4f9f02b30a3662d27126739a667cbaf345a82443d1a0cff5792491b95580",
    "megatron.core.transformer.moe.moe_utils:RouterGatingLinearFunction.backward":
        "222f6d592730bd2833e8eee669fc55412b40f923a810e9c2b65f707784db4bbf",
    "megatron.core.transformer.moe.moe_utils:maybe_move_tensor_to_cpu":
        "8fc5847a887d73195b064efc01599f8768a48bbe3327b8fa50f34112cbbf1153",
}
# fmt: on

_applied: set[str] = set()


def patch_megatron_for_cpu(skip: Collection[str] = ()) -> list[str]:
    """Apply the CPU substitutes; returns the names in effect, in SUBSTITUTES order. Idempotent.

    With CUDA it returns [] and changes nothing, except that 4 (te_general_gemm) is applied whenever TransformerEngine
    is absent: that NameError is about the missing library, not the device, and defining the name is a no-op where TE
    is installed. Call it before building megatron models, and before any
    `from megatron... import model_parallel_cuda_manual_seed` (a name bound earlier keeps the upstream function).
    `skip` leaves substitutes out (tests show each is needed).
    """
    if torch.cuda.is_available():
        _apply_te_general_gemm()
        return []
    unknown = sorted(set(skip) - set(SUBSTITUTES))
    if unknown:
        raise PlatformError(f"unknown megatron substitute(s) {unknown}: expected names from {list(SUBSTITUTES)}")
    try:
        importlib.import_module("megatron.core")
    except ImportError as err:
        raise PlatformError(f"megatron-core is not installed (needed for training): {err}") from err
    for name, apply in _APPLY.items():
        if name not in skip and name not in _applied:
            apply()
            _applied.add(name)
    return [name for name in SUBSTITUTES if name in _applied]


# ----------------------------------------------------------------------------------------------------------------
# 1. cuda_device_calls. Megatron calls torch.cuda.X directly in dozens of modules (embedding/linear init
#    `device=torch.cuda.current_device()`, router.py Router.gating `.to(torch.cuda.current_device())`,
#    token_dispatcher.py MoEAlltoAllTokenDispatcher `torch.cuda.Stream()` and the streams and events of
#    `_maybe_dtoh_and_synchronize`). On a CPU-only torch each raises "Torch not compiled with CUDA enabled";
#    CPU work is synchronous, so streams and events are no-ops.
# ----------------------------------------------------------------------------------------------------------------


class CpuEvent:
    """torch.cuda.Event on CPU: work is synchronous, so an event is complete the moment it is recorded."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False):
        self._recorded_at: float | None = None

    def record(self, stream=None):
        self._recorded_at = time.perf_counter()

    def query(self) -> bool:
        return True

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def elapsed_time(self, end_event: CpuEvent) -> float:
        """Milliseconds between two recorded events, as torch.cuda.Event.elapsed_time."""
        if self._recorded_at is None or end_event._recorded_at is None:
            raise RuntimeError("both events must be recorded before elapsed_time")
        return (end_event._recorded_at - self._recorded_at) * 1000.0


class CpuStream:
    """torch.cuda.Stream on CPU. Unlike torch.cpu.Stream, record_event returns an event (the dispatcher syncs on it)."""

    def __init__(self, device=None, priority: int = 0, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event: CpuEvent | None = None) -> CpuEvent:
        event = event or CpuEvent()
        event.record(self)
        return event

    def query(self) -> bool:
        return True

    def synchronize(self):
        pass


_DEFAULT_STREAM = CpuStream()
_current_stream = _DEFAULT_STREAM


def cpu_current_device() -> torch.device:
    # torch.cuda.current_device() returns an index, which `.to(index)` reads as cuda:index; the device works the same
    # in every megatron call site (`device=...`, `.to(device=...)`) and lands on CPU.
    return torch.device("cpu")


def cpu_synchronize(device=None):
    pass


def cpu_current_stream(device=None) -> CpuStream:
    return _current_stream


def cpu_default_stream(device=None) -> CpuStream:
    return _DEFAULT_STREAM


@contextlib.contextmanager
def cpu_stream(stream: CpuStream | None):
    """torch.cuda.stream: make `stream` current inside the block (None leaves the current one, as upstream)."""
    global _current_stream
    previous = _current_stream
    if stream is not None:
        _current_stream = stream
    try:
        yield
    finally:
        _current_stream = previous


def _apply_cuda_device_calls():
    replacements = {
        "current_device": cpu_current_device,
        "synchronize": cpu_synchronize,
        "Stream": CpuStream,
        "Event": CpuEvent,
        "current_stream": cpu_current_stream,
        "default_stream": cpu_default_stream,
        "stream": cpu_stream,
    }
    for attr, substitute in replacements.items():
        setattr(torch.cuda, attr, substitute)


# ----------------------------------------------------------------------------------------------------------------
# 2. rng_tracker. tensor_parallel/random.py keeps named CUDA generator states (data-parallel, model-parallel,
#    expert-parallel) and forks them around weight init and dropout: _get_cuda_rng_state raises on a CPU-only torch
#    and _set_cuda_rng_state / torch.cuda.manual_seed are silently queued forever. On CPU the device generator is the
#    CPU one, so the same named states are CPU generator states. That keeps expert weights different per EP rank
#    (seed + 1024 + 100 * ep_rank) and dense weights equal, as on GPU.
# ----------------------------------------------------------------------------------------------------------------


def _get_cpu_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    """random.py:_get_cuda_rng_state on CPU: the CPU generator's state (a fresh copy, so `clone` is implied)."""
    if graph_safe:
        raise PlatformError("CUDA-graph-safe RNG (use_cudagraphable_rng / cuda graphs) needs CUDA")
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device=-1, graph_safe: bool = False):
    """random.py:_set_cuda_rng_state on CPU."""
    if graph_safe:
        raise PlatformError("CUDA-graph-safe RNG (use_cudagraphable_rng / cuda graphs) needs CUDA")
    torch.set_rng_state(new_state)


def _cpu_tracker_add(self, name: str, seed: int):
    """random.py:CudaRNGStatesTracker.add with the state taken from a CPU generator seeded with `seed`."""
    self._is_initialized = True
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    if self.use_cudagraphable_rng:
        raise PlatformError("CUDA-graph-safe RNG (use_cudagraphable_rng / cuda graphs) needs CUDA")
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    self.states_[name] = generator.get_state()


def _make_cpu_tracker_fork(upstream_fork: Callable, default_name: str) -> Callable:
    @contextlib.contextmanager
    def fork(self, name: str = default_name):
        """random.py:CudaRNGStatesTracker.fork on CPU generator states.

        Same bookkeeping as upstream (nested forks included) without its "CPU RNG state changed within GPU RNG context"
        warning, which on CPU would fire on every fork: the forked generator is the CPU generator.
        """
        if name not in self.states_:
            raise Exception(f"cuda rng state {name} is not added")
        orig_state = _get_cpu_rng_state()
        orig_state_name = self._current_state_name
        if orig_state_name != "default-rng":
            self.states_[orig_state_name] = orig_state
        _set_cpu_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(
                    f"current state name {self._current_state_name} is not the same as the desired state name {name}."
                )
            self.states_[name] = _get_cpu_rng_state()
            if orig_state_name != "default-rng":
                orig_state = self.states_[orig_state_name]
            _set_cpu_rng_state(orig_state)
            self._current_state_name = orig_state_name

    fork.__upstream__ = upstream_fork
    return fork


def _make_cpu_manual_seed(upstream_seed: Callable) -> Callable:
    def model_parallel_cuda_manual_seed(seed: int, *args, **kwargs):
        """random.py:model_parallel_cuda_manual_seed, seeding the CPU generator where upstream seeds the CUDA one.

        Upstream's torch.cuda.manual_seed(seed) is a silent no-op without CUDA; the default state (used outside any
        fork, e.g. router init and dropout) would otherwise depend on whatever seeded the CPU generator before.
        """
        torch.manual_seed(seed)
        return upstream_seed(seed, *args, **kwargs)

    model_parallel_cuda_manual_seed.__upstream__ = upstream_seed
    return model_parallel_cuda_manual_seed


def _apply_rng_tracker():
    import megatron.core.tensor_parallel as tensor_parallel
    from megatron.core.tensor_parallel import random

    _get_cpu_rng_state.__upstream__ = random._get_cuda_rng_state
    _set_cpu_rng_state.__upstream__ = random._set_cuda_rng_state
    _cpu_tracker_add.__upstream__ = random.CudaRNGStatesTracker.add
    # Module globals: fork, checkpointing (_get_all_rng_states/_set_all_rng_states) and convert_cuda_rng_state look
    # these up at call time.
    random._get_cuda_rng_state = _get_cpu_rng_state
    random._set_cuda_rng_state = _set_cpu_rng_state
    tracker = random.CudaRNGStatesTracker
    tracker.add = _cpu_tracker_add
    tracker.fork = _make_cpu_tracker_fork(tracker.fork, random._MODEL_PARALLEL_RNG_TRACKER_NAME)
    seed = _make_cpu_manual_seed(random.model_parallel_cuda_manual_seed)
    random.model_parallel_cuda_manual_seed = seed
    tensor_parallel.model_parallel_cuda_manual_seed = seed  # the name users import


# ----------------------------------------------------------------------------------------------------------------
# 3. causal_mask. transformer/utils.py get_default_causal_mask / get_sliding_window_causal_mask build the mask with
#    device="cuda"; fusions/fused_softmax.py FusedScaleMaskSoftmax.forward_torch_softmax calls them (imported by name)
#    whenever attention gets no explicit mask.
# ----------------------------------------------------------------------------------------------------------------


def cpu_default_causal_mask(sq: int) -> torch.Tensor:
    """utils.py:get_default_causal_mask on CPU: True above the diagonal (masked out)."""
    return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()


def cpu_sliding_window_causal_mask(sq: int, skv: int, window_size) -> torch.Tensor:
    """utils.py:get_sliding_window_causal_mask on CPU."""
    m = torch.ones(sq, skv, dtype=torch.bool, device="cpu")
    mu = torch.triu(m, diagonal=skv - sq - window_size[0])
    ml = torch.tril(mu, diagonal=skv - sq + window_size[1])
    return ~ml


def _apply_causal_mask():
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    cpu_default_causal_mask.__upstream__ = utils.get_default_causal_mask
    cpu_sliding_window_causal_mask.__upstream__ = utils.get_sliding_window_causal_mask
    for module in (utils, fused_softmax):  # the defining module and the one that imported the names
        module.get_default_causal_mask = cpu_default_causal_mask
        module.get_sliding_window_causal_mask = cpu_sliding_window_causal_mask


# ----------------------------------------------------------------------------------------------------------------
# 4. te_general_gemm. moe_utils.py imports te_general_gemm inside `try: import transformer_engine` and
#    RouterGatingLinearFunction.forward/backward test `te_general_gemm is not None`: without TransformerEngine the name
#    is undefined (NameError). None is what megatron.core.extensions.transformer_engine itself defines without TE, and
#    selects the torch.mm path.
# ----------------------------------------------------------------------------------------------------------------


def _apply_te_general_gemm():
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


# ----------------------------------------------------------------------------------------------------------------
# 5. alltoall_split_sizes. token_dispatcher.py MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize turns
#    input/output splits into host numpy arrays through moe_utils.maybe_move_tensor_to_cpu, which only converts
#    `tensor.is_cuda` tensors; on CPU the splits stay tensors and all_to_all_single raises TypeError.
# ----------------------------------------------------------------------------------------------------------------


def _make_split_sizes_to_host(upstream_move: Callable) -> Callable:
    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        """moe_utils.py:maybe_move_tensor_to_cpu that also gives numpy for a CPU tensor when `as_numpy` is asked."""
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.detach().numpy().copy()  # a copy, like upstream's device-to-host transfer
        return upstream_move(tensor, as_numpy=as_numpy, record_stream=record_stream)

    maybe_move_tensor_to_cpu.__upstream__ = upstream_move
    return maybe_move_tensor_to_cpu


def _apply_alltoall_split_sizes():
    from megatron.core.transformer.moe import token_dispatcher

    # Only the dispatcher's imported name: other moe_utils callers keep upstream behaviour.
    token_dispatcher.maybe_move_tensor_to_cpu = _make_split_sizes_to_host(token_dispatcher.maybe_move_tensor_to_cpu)


_APPLY: dict[str, Callable[[], None]] = {
    "cuda_device_calls": _apply_cuda_device_calls,
    "rng_tracker": _apply_rng_tracker,
    "causal_mask": _apply_causal_mask,
    "te_general_gemm": _apply_te_general_gemm,
    "alltoall_split_sizes": _apply_alltoall_split_sizes,
}
assert _APPLY.keys() == SUBSTITUTES.keys()
