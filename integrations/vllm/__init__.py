"""vLLM on sleepd, unchanged: the `vllm.general_plugins` entry point.

vLLM calls `register()` in every process it starts (API server, engine core,
workers). It does nothing unless $SLEEPD_MODEL is set; then each vLLM worker
attaches to the daemon as one rank of that model, and vLLM's sleep mode
(`sleep`, `wake_up`, `/sleep`, `/wake_up`, `/is_sleeping`) acts through it.
The API server, or the process of an `LLM` or `AsyncLLM`, attaches as the model's controller,
so sleeps from outside vLLM (sleepctl, eviction) run as vLLM's own, and
requests wake the model.
See docs/vllm.md.
"""

import os

MODEL_VARIABLE = "SLEEPD_MODEL"
_registered = False


def register() -> None:
    global _registered
    if _registered or not os.environ.get(MODEL_VARIABLE):
        return  # vLLM may load plugins more than once in a process
    _registered = True
    from vllm.platforms import current_platform

    from . import api_server, async_engine, backend, offline

    if current_platform.is_cpu():
        from . import cpu

        cpu.install()
    elif current_platform.is_cuda():
        from . import cuda

        cuda.install()
    elif getattr(current_platform, "device_type", "") == "npu":  # vllm-ascend's out-of-tree platform
        from . import ascend

        ascend.install()
    else:
        raise RuntimeError(f"{MODEL_VARIABLE} is set, but sleepd does not run vLLM on the "
                           f"{type(current_platform).__name__} platform: unset it, or run on CUDA, an Ascend NPU "
                           "(vllm-ascend) or CPU")
    backend.register()
    api_server.install()  # only in vLLM's API server: its controller and wake on request
    offline.install()  # only where an LLM builds its engine
    async_engine.install()  # only where an AsyncLLM is used outside vllm serve
