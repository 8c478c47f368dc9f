"""Joining vLLM's AsyncLLM used directly (an RL framework's own server, an async
script), outside `vllm serve`: the process attaches as the model's controller,
as the API server does, and a `generate()` while the model sleeps wakes it first.

The controller needs the event loop the engine runs on: it attaches when the
AsyncLLM is made inside a running loop, else at its first `generate()`. In
vLLM's API server nothing changes here (api_server.py attaches there).
"""

import contextlib
import functools
import importlib
import multiprocessing

from . import api_server, controller
from .patching import run_after

ASYNC_MODULE = "vllm.v1.engine.async_llm"
WHAT = "vLLM's AsyncLLM"


def _attach_once(engine) -> None:
    if getattr(engine, "_sleepd_tried", False):
        return
    engine._sleepd_tried = True
    if getattr(engine.vllm_config.model_config, "enable_sleep_mode", False):
        controller.attach(engine, WHAT)  # else its workers refused to attach already, saying why


def _attach_if_in_a_loop(engine) -> None:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return  # made outside a loop: it attaches at its first generate()
    _attach_once(engine)


def _awake_first(generate):
    @functools.wraps(generate)
    async def wrapper(self, *args, **kwargs):
        _attach_once(self)
        engine = controller.current()
        async with engine.admitted() if engine is not None else contextlib.nullcontext():
            async for output in generate(self, *args, **kwargs):
                yield output
    return wrapper


def install() -> None:
    if api_server.serving_module() is not None or multiprocessing.parent_process() is not None:
        return  # vLLM's API server (it attaches with its app), or a process vLLM started
    # A script may build its engine arguments (which loads this plugin) before it imports AsyncLLM.
    engine_class = importlib.import_module(ASYNC_MODULE).AsyncLLM
    engine_class.generate = _awake_first(engine_class.generate)
    run_after(engine_class, "__init__", _attach_if_in_a_loop)
