"""Joining vLLM's Python API (`LLM`): once its engine (LLMEngine) is built, the
process attaches as the model's controller, so sleeps from outside vLLM
(sleepctl, eviction, idle sleep, swap) run as the engine's own, and a request
added while the model sleeps wakes it first (SLEEPD_WAKE_ON_REQUEST=0: waits
for a wake).

vLLM loads general plugins while `LLM` builds its engine arguments, before the
engine, so wrapping `LLMEngine.__init__` here catches this process's engine.
The engine belongs to the user's thread (`LLM.generate` adds requests and steps
it), and its client is not thread-safe (one socket to the engine core), while
the daemon's callbacks arrive on the controller's thread: the engine calls that
reach the engine core take one lock. An engine core in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) runs only when the user's thread steps it,
so a sleep waiting for requests in flight would wait forever: there no
controller attaches, and outside sleeps are refused as without one.
"""

import functools
import inspect
import logging
import os
import sys
import threading

from sleepd.client import Controller

from .controller import check_plain_level
from .patching import run_after

log = logging.getLogger(f"vllm.{__name__}")

ENGINE_MODULE = "vllm.v1.engine.llm_engine"
# The other LLMEngine methods that send to the engine core, serialised with sleep, wake_up and add_request.
SERIALISED = ("abort_request", "step", "collective_rpc", "reset_prefix_cache")


class OfflineController:
    def __init__(self, engine, model: str):
        self.model = model
        self._engine = engine
        # Whether the engine's own sleep ran (whoever called it) and no full wake_up since; changed
        # under the engine lock, so a request is never added to an engine that is going to sleep.
        self.asleep = False
        # vLLM 0.24's LLMEngine.sleep may lack the pause mode; detect it rather than guess.
        self._sleep_takes_mode = "mode" in inspect.signature(type(engine).sleep).parameters
        self.controller = Controller.connect(model, on_sleep=self._sleep, on_wake=self._wake)

    def _sleep(self, level: int, tags: list[str], actions: dict[str, str]) -> None:
        check_plain_level(level, tags, actions)
        if self._sleep_takes_mode:
            self._engine.sleep(level, mode="wait")  # requests in flight finish first
        else:
            self._engine.sleep(level)

    def _wake(self, tags: list[str]) -> None:
        if self.asleep:  # requests that found it asleep together each ask; the first one wakes it
            self._engine.wake_up(tags or None)


def _attach(engine) -> None:
    model = os.environ["SLEEPD_MODEL"]
    if not getattr(engine.vllm_config.model_config, "enable_sleep_mode", False):
        return  # its workers refused to attach already, saying why
    if not getattr(engine, "multiprocess_mode", True):
        log.warning("%s: vLLM's engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), where a "
                    "sleep cannot wait for requests in flight; no sleepd controller attaches, so sleeps from "
                    "outside vLLM are refused", model)
        return
    engine._sleepd_controller = OfflineController(engine, model)
    log.info("attached to sleepd as %s's controller", model)


def _controller(engine) -> OfflineController | None:
    return getattr(engine, "_sleepd_controller", None)


def _wrap(cls, name: str, make) -> None:
    original = getattr(cls, name)
    setattr(cls, name, functools.wraps(original)(make(original)))


def install() -> None:
    module = sys.modules.get(ENGINE_MODULE)
    engine_class = getattr(module, "LLMEngine", None)
    if engine_class is None:
        return  # LLM's engine is not loaded here: no LLM in this process
    lock = threading.RLock()

    def serialised(original):
        def call(self, *args, **kwargs):
            with lock:
                return original(self, *args, **kwargs)
        return call

    def sleep(original):
        def call(self, *args, **kwargs):
            with lock:
                result = original(self, *args, **kwargs)
                if controller := _controller(self):
                    controller.asleep = True
            return result
        return call

    def wake_up(original):
        def call(self, *args, **kwargs):
            with lock:
                fully_awake = original(self, *args, **kwargs)
                if controller := _controller(self):
                    controller.asleep = fully_awake is False  # None (older vLLM): every tag woke
            return fully_awake
        return call

    def add_request(original):
        def call(self, *args, **kwargs):
            controller = _controller(self)
            while True:
                if controller is not None and controller.asleep:
                    controller.controller.ensure_awake()  # outside the lock: the wake comes back through it
                with lock:
                    if controller is None or not controller.asleep:
                        return original(self, *args, **kwargs)
        return call

    for name in SERIALISED:
        if callable(getattr(engine_class, name, None)):
            _wrap(engine_class, name, serialised)
    _wrap(engine_class, "sleep", sleep)
    _wrap(engine_class, "wake_up", wake_up)
    _wrap(engine_class, "add_request", add_request)
    run_after(engine_class, "__init__", _attach)
