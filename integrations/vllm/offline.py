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
reach the engine core take one lock (EngineLock), sleep and wake before steps.

An engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) runs only
when the user's thread steps it, so vLLM refuses to sleep it waiting for
requests in flight. There the controller does that wait itself: new requests
queue in the scheduler, as vLLM's own waiting sleep has them, the user's steps
finish those in flight, and the sleep lands between two steps once none is
left, keeping the queued ones for the wake.
"""

import contextlib
import functools
import inspect
import logging
import os
import sys
import threading
import time

import grpc

from sleepd.client import Controller, SleepdError

from .controller import check_plain_level
from .patching import run_after

log = logging.getLogger(f"vllm.{__name__}")

ENGINE_MODULE = "vllm.v1.engine.llm_engine"
# The other LLMEngine methods that reach the engine core, serialised with sleep, wake_up, add_request and
# step; those a release lacks are skipped.
SERIALISED = ("abort_request", "collective_rpc", "is_sleeping", "reset_prefix_cache", "reset_mm_cache",
              "reset_encoder_cache", "release_kv_cache_memory", "start_profile", "stop_profile", "add_lora",
              "remove_lora", "list_loras", "pin_lora")


# How long an in-process engine's sleep waits for the user's steps to finish the requests in flight (the
# daemon's default controller_timeout).
DRAIN_SECONDS = 300


class OfflineController:
    def __init__(self, engine, model: str, lock: "EngineLock"):
        self.model = model
        self._engine = engine
        self._lock = lock
        self._core = _engine_core_here(engine)
        # Whether the engine's own sleep ran (whoever called it) and no full wake_up since; changed
        # under the engine lock, so a request is never added to an engine that is going to sleep.
        self.asleep = False
        # vLLM 0.24's LLMEngine.sleep may lack the pause mode; detect it rather than guess.
        self._sleep_takes_mode = "mode" in inspect.signature(type(engine).sleep).parameters
        self.controller = Controller.connect(model, on_sleep=self._sleep, on_wake=self._wake)

    def _sleep(self, level: int, tags: list[str], actions: dict[str, str]) -> None:
        check_plain_level(level, tags, actions)
        if self._core is not None:
            self._sleep_once_drained(level)
        elif self._sleep_takes_mode:
            self._engine.sleep(level, mode="wait")  # requests in flight finish first
        else:
            self._engine.sleep(level)

    def _sleep_once_drained(self, level: int) -> None:
        """An engine core in this process: requests in flight finish in the user's steps, new ones queue
        (vLLM's PAUSED_NEW, what its waiting sleep sets), then the sleep keeps the queued ones."""
        scheduler = self._core.scheduler
        with self._lock.held(urgent=True):
            scheduler.set_pause_state(type(scheduler.pause_state).PAUSED_NEW)
        deadline = time.monotonic() + DRAIN_SECONDS
        try:
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"requests in flight did not finish within {DRAIN_SECONDS} s (is anything "
                                       "stepping the engine?); the sleep is given up and new requests run again")
                with self._lock.held(urgent=True):
                    # Under PAUSED_NEW only the requests in flight count. A batch still queued for the device
                    # (async scheduling) may outlive its requests: "keep" synchronises the device first.
                    if not scheduler.has_unfinished_requests():
                        self._engine.sleep(level, mode="keep")
                        return
                    ours = self._lock.turn + 1  # this hold letting go
                self._lock.wait_for_another_turn(ours)  # the user's thread steps the engine
        except BaseException:
            with self._lock.held(urgent=True):
                if not self.asleep:  # the queued requests must not wait for a wake nobody will ask for
                    self._core.resume_scheduler()
            raise

    def _wake(self, tags: list[str]) -> None:
        if self.asleep:  # requests that found it asleep together each ask; the first one wakes it
            self._engine.wake_up(tags or None)

    def awake_for_request(self) -> bool:
        """Before a request reaches an engine that sleeps: wakes it through the daemon (or waits for
        a wake). False when the daemon is unreachable (restarting): vLLM takes it as it is."""
        try:
            self.controller.ensure_awake()
        except SleepdError as error:
            if error.code != grpc.StatusCode.UNAVAILABLE:
                raise
            log.warning("sleepd is unreachable, so %s takes a request without waiting for it: %s", self.model, error)
            return False
        if self.asleep:  # the daemon has it awake and vLLM does not know: wake vLLM itself
            self._engine.wake_up()
        return True


def _engine_core_here(engine):
    """The engine core, when it runs in this process (its client is then vLLM's InprocClient); else None."""
    return getattr(engine.engine_core, "engine_core", None)


def _attach(engine, lock: "EngineLock") -> None:
    model = os.environ["SLEEPD_MODEL"]
    if not getattr(engine.vllm_config.model_config, "enable_sleep_mode", False):
        return  # its workers refused to attach already, saying why
    core = _engine_core_here(engine)
    if core is not None and not callable(getattr(core.scheduler, "set_pause_state", None)):
        from vllm import __version__

        log.warning("%s: vLLM %s's engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and "
                    "cannot pause its scheduler, so a sleep could not wait for requests in flight; no sleepd "
                    "controller attaches, and sleeps from outside vLLM are refused", model, __version__)
        return
    try:
        engine._sleepd_controller = OfflineController(engine, model, lock)
    except SleepdError as error:
        if error.code != grpc.StatusCode.ALREADY_EXISTS:
            raise RuntimeError(f"vLLM's LLM could not attach as {model}'s sleepd controller: {error.message}") from None
        log.warning("%s already has a sleepd controller (another LLM of this model); this one neither controls "
                    "it nor wakes it on requests", model)
        return
    log.info("attached to sleepd as %s's controller", model)


class EngineLock:
    """One lock over the engine calls that reach the engine core. Sleep and wake go first: a
    generate() steps in a loop and would take a plain lock back at once, so a step waits while
    one of them is waiting (an outside sleep lands between two steps, not after the batch)."""

    def __init__(self):
        self._lock = threading.RLock()
        self._turns = threading.Condition()
        self._urgent = 0  # sleeps and wakes waiting for the lock or holding it
        self._owner: int | None = None
        self.turn = 0  # how many times the lock was let go

    def wait_for_another_turn(self, turn: int, seconds: float = 1.0) -> None:
        """Returns once the lock was let go after its `turn`th time (or after `seconds`)."""
        with self._turns:
            self._turns.wait_for(lambda: self.turn > turn, timeout=seconds)

    @contextlib.contextmanager
    def held(self, urgent: bool = False, polite: bool = False):
        if polite and self._owner != threading.get_ident():  # the holder itself never waits for its turn
            with self._turns:
                self._turns.wait_for(lambda: self._urgent == 0)
        if urgent:
            with self._turns:
                self._urgent += 1
        try:
            with self._lock:
                outer, self._owner = self._owner, threading.get_ident()
                try:
                    yield
                finally:
                    self._owner = outer
        finally:
            with self._turns:
                self.turn += 1
                self._urgent -= urgent
                self._turns.notify_all()


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
    lock = EngineLock()

    def serialised(original):
        def call(self, *args, **kwargs):
            with lock.held():
                return original(self, *args, **kwargs)
        return call

    def sleep(original):
        def call(self, level: int = 1, *args, **kwargs):
            with lock.held(urgent=True):
                result = original(self, level, *args, **kwargs)
                if (controller := _controller(self)) and level >= 1:  # level 0 only pauses: no memory sleeps
                    controller.asleep = True
            return result
        return call

    def wake_up(original):
        def call(self, *args, **kwargs):
            with lock.held(urgent=True):
                fully_awake = original(self, *args, **kwargs)
                if controller := _controller(self):
                    controller.asleep = fully_awake is False  # None (older vLLM): every tag woke
            return fully_awake
        return call

    def awake_first(original):
        """A request added, or a step waiting for output, never meets an engine the model's sleep paused
        (a sleep that waits for requests in flight leaves queued ones queued): it wakes the model first."""
        def call(self, *args, **kwargs):
            controller = _controller(self)
            while True:
                if controller is not None and controller.asleep and not controller.awake_for_request():
                    break  # outside the lock: the wake comes back through it
                with lock.held(polite=True):
                    if controller is None or not controller.asleep:
                        return original(self, *args, **kwargs)
            with lock.held(polite=True):
                return original(self, *args, **kwargs)
        return call

    for name in SERIALISED:
        if callable(getattr(engine_class, name, None)):
            _wrap(engine_class, name, serialised)
    _wrap(engine_class, "sleep", sleep)
    _wrap(engine_class, "wake_up", wake_up)
    _wrap(engine_class, "add_request", awake_first)
    _wrap(engine_class, "step", awake_first)
    run_after(engine_class, "__init__", lambda engine: _attach(engine, lock))
