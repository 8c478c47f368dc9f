"""vLLM on its CPU platform, which refuses sleep mode by itself: with sleepd, the
worker's weights and KV cache live in sleepd regions (host backend), and vLLM's
`sleep`/`wake_up` offload, discard and restore them through the daemon, so a
sleep frees them as the kernel sees it.

Linear layers compute from their weights in sleepd memory (torch's linear)
instead of the private packed copies vLLM's CPU kernels make: sleepd could
neither free those nor let a weight update reach them.
"""

import contextlib

from . import kv_cache, session, weight_sets
from .patching import replace, run_after, run_within

# The host backend has no devices of its own: every CPU rank uses the daemon's first.
HOST_DEVICE = 0


def _attach(worker) -> None:
    session.attach(worker, device=HOST_DEVICE)


@contextlib.contextmanager
def _loading(worker):
    """The model loads with this rank's weight set in reach: joined, or loaded, adopted and committed."""
    client = session.allocator().client
    with weight_sets.serving(worker, client, own=lambda model: client.adopt(model, tag="weights")):
        yield


def _adopt_weights(worker) -> None:
    # What the loader did not put in sleepd already (all of it where weight sets are off; LoRA's tensors).
    session.allocator().client.adopt(worker.model_runner.get_model(), tag="weights")


@contextlib.contextmanager
def _kv_cache_in_sleepd(worker):
    with kv_cache.allocated_in_sleepd(session.allocator().client) as regions:
        yield
    kv_cache.check_in_sleepd(worker.model_runner, regions)


def _sleep(worker, level: int = 1) -> None:
    if level == 2:
        # As vLLM does on a GPU: level 2 discards weights but keeps buffers (rotary tables and the like).
        worker._sleepd_saved_buffers = {name: buffer.clone()
                                        for name, buffer in worker.model_runner.get_model().named_buffers()}
    session.allocator().sleep(offload_tags=("weights",) if level == 1 else ())


def _wake_up(worker, tags: list[str] | None = None) -> None:
    session.allocator().wake_up(tags)
    saved = getattr(worker, "_sleepd_saved_buffers", None)
    if saved and (tags is None or "weights" in tags):
        for name, buffer in worker.model_runner.get_model().named_buffers():
            if name in saved:
                buffer.copy_(saved[name])
        worker._sleepd_saved_buffers = None
    # Older releases (0.24 among them) reset quantised-KV scales here, as their GPU worker does.
    post_wake = getattr(worker.model_runner, "post_kv_cache_wake_up", None)
    if post_wake and (tags is None or "kv_cache" in tags):
        post_wake()


def _discard(worker, tags: tuple[str, ...]) -> None:
    session.allocator().discard(tags)


def _linear_from_weights(original):
    def dispatch(layer, remove_weight: bool) -> None:
        if layer.weight.is_meta or layer.weight.ndim != 2:
            return original(layer, remove_weight)  # not a plain linear layer: vLLM's own handling
        import torch

        layer.cpu_linear = torch.nn.functional.linear
    return dispatch


def install() -> None:
    from vllm.model_executor.layers import utils as layer_utils
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.worker.cpu_worker import CPUWorker

    CpuPlatform.is_sleep_mode_available = lambda self: True
    run_after(CPUWorker, "init_device", _attach)
    weight_sets.install()
    run_within(CPUWorker, "load_model", _loading)
    run_after(CPUWorker, "load_model", _adopt_weights)
    run_within(CPUWorker, "initialize_from_config", _kv_cache_in_sleepd)
    replace(CPUWorker, "sleep", _sleep)
    replace(CPUWorker, "wake_up", _wake_up)
    if hasattr(CPUWorker, "discard"):  # selective discard came after 0.24
        replace(CPUWorker, "discard", _discard)
    # Releases without this dispatch computed from the weights themselves.
    if hasattr(layer_utils, "dispatch_cpu_unquantized_gemm"):
        layer_utils.dispatch_cpu_unquantized_gemm = _linear_from_weights(layer_utils.dispatch_cpu_unquantized_gemm)
