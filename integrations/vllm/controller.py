"""vLLM's front ends on sleepd. The one that owns the engine client (vLLM's API
server, an AsyncLLM) attaches as the model's controller: sleeps and wakes asked
from outside vLLM (sleepctl, eviction, idle sleep, swap) run as vLLM's own, so
its scheduler pauses before the workers' memory goes, and `/is_sleeping`
knows. Further API servers of the same engine (--api-server-count) are second
front ends: their requests wake the model through the daemon, which asks the
controller.

The daemon calls back on the controller's own thread, while vLLM's engine
client belongs to the server's event loop: each callback hands the engine's
coroutine to that loop and waits for it.
"""

import asyncio
import contextlib
import logging
import os

import grpc

from sleepd.client import Controller, SleepdError, Waker
from sleepd.client.awake import wake_on_request

# Under vLLM's own logger, whose handler survives the logging setup of vLLM's HTTP server.
log = logging.getLogger(f"vllm.{__name__}")


def _vllm_action(level: int, tag: str) -> str:
    """What vLLM's own sleep does to a tag: level 1 offloads the weights, anything else is discarded."""
    return "offload" if level == 1 and tag == "weights" else "discard"


def check_plain_level(level: int, tags: list[str], actions: dict[str, str]) -> None:
    """Refuses what vLLM's own sleep cannot do: it sleeps all of its memory, by level."""
    if level not in (1, 2):
        raise ValueError(f"vLLM's sleep has levels 1 and 2 for memory; level {level} only pauses its "
                         "scheduler, which sleepd cannot see: sleep it at level 1 or 2")
    differing = {tag: action for tag, action in actions.items() if action != _vllm_action(level, tag)}
    if tags or differing:
        raise ValueError(f"vLLM sleeps all of its memory by level (level {level} offloads "
                         f"{'weights' if level == 1 else 'nothing'}): it cannot sleep tags {tags} or "
                         f"take actions {differing}; ask for a plain level")


class FrontEnd:
    """One of vLLM's front ends to the model (an API server process, an AsyncLLM): each request waits
    until the model is awake, through `waker` (anything with ensure_awake)."""

    def __init__(self, engine_client, loop: asyncio.AbstractEventLoop, model: str):
        self.model = model
        self._engine, self._loop = engine_client, loop
        self._admitted = 0  # requests past their wait for the model and not yet answered (on the loop only)
        self._straggler_wake: asyncio.Task | None = None
        self.waker = None  # set by the subclass, once it is connected

    async def serve(self, answer) -> None:
        """Awaits `answer()` once the model is awake (see admitted)."""
        async with self.admitted():
            await answer()

    @contextlib.asynccontextmanager
    async def admitted(self):
        """Enters once the model is awake: woken through the daemon, or (SLEEPD_WAKE_ON_REQUEST=0)
        by someone else; the request counts as admitted until the block ends. The wait runs in a
        thread, because the wake may come back to the loop this is awaited on."""
        self._admitted += 1
        try:
            try:
                await asyncio.to_thread(self.waker.ensure_awake)
            except SleepdError as error:
                if error.code != grpc.StatusCode.UNAVAILABLE:
                    raise
                # The daemon is away (restarting): vLLM serves on as it is, and holds requests while asleep.
                log.warning("sleepd is unreachable, so %s is served without waiting for it: %s", self.model, error)
            self._admission_started()
            yield
        finally:
            self._admitted -= 1

    def _admission_started(self) -> None:
        """Runs on the loop each time a request is admitted."""

    def _wake_for_stragglers(self) -> None:
        """A request admitted while the model was awake can reach vLLM after its scheduler paused for a
        sleep: queued, it would wait for a wake nobody asks for. It asked for the model, so wake it."""
        if self._admitted and wake_on_request() and self._straggler_wake is None:
            self._straggler_wake = self._loop.create_task(self._ensure_awake_for_stragglers())  # held: tasks are weak

    async def _ensure_awake_for_stragglers(self) -> None:
        try:
            await asyncio.to_thread(self.waker.ensure_awake)
        except SleepdError as error:
            log.error("%s slept with requests queued in vLLM, and waking it for them failed: %s", self.model, error)
        finally:
            self._straggler_wake = None


class EngineController(FrontEnd):
    """The front end that controls the model: the daemon's sleeps and wakes run as vLLM's own."""

    def __init__(self, engine_client, loop: asyncio.AbstractEventLoop, model: str):
        super().__init__(engine_client, loop, model)
        self.waker = Controller.connect(model, on_sleep=self._sleep, on_wake=self._wake)

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _sleep(self, level: int, tags: list[str], actions: dict[str, str]) -> None:
        check_plain_level(level, tags, actions)
        # vLLM pauses its scheduler first. "wait": requests in flight finish, new ones queue until the
        # wake (vLLM's default mode aborts them). 0.24 to 0.33 take it.
        self._run(self._sleep_then_serve_stragglers(level))

    async def _sleep_then_serve_stragglers(self, level: int) -> None:
        await self._engine.sleep(level, mode="wait")
        self._wake_for_stragglers()

    def _wake(self, tags: list[str]) -> None:
        self._run(self._wake_up(tags or None))

    async def _wake_up(self, tags: list[str] | None) -> None:
        # Requests that found the model asleep together each ask for a wake; the first one does it.
        if await self._engine.is_sleeping():
            await self._engine.wake_up(tags)


class SecondFrontEnd(FrontEnd):
    """A front end beside the controlling one (vLLM's --api-server-count: the API servers share one
    engine core). Its requests wake the model through the daemon, which asks the controller. It does
    not see the controller's sleeps, so while it has requests admitted it watches vLLM for one."""

    WATCH_SECONDS = 0.5

    def __init__(self, engine_client, loop: asyncio.AbstractEventLoop, model: str):
        super().__init__(engine_client, loop, model)
        self.waker = Waker(model)
        self._watch: asyncio.Task | None = None

    def _admission_started(self) -> None:
        if self._watch is None:
            self._watch = self._loop.create_task(self._watch_for_a_sleep())  # held: tasks are weak

    async def _watch_for_a_sleep(self) -> None:
        try:
            while self._admitted:
                await asyncio.sleep(self.WATCH_SECONDS)
                if self._admitted and await self._engine.is_sleeping():
                    self._wake_for_stragglers()
        except Exception as error:  # the engine is gone: vLLM fails the requests itself
            log.error("%s: watching vLLM for a sleep failed: %s", self.model, error)
        finally:
            self._watch = None


_current: FrontEnd | None = None


def current() -> FrontEnd | None:
    """This process's front end (vLLM's API server, or an AsyncLLM's), once its engine is up and it attached."""
    return _current


def attach(engine_client, what: str = "vLLM's API server") -> None:
    """Attaches this process (on its running event loop) as $SLEEPD_MODEL's controller, or as a second
    front end where another process controls it."""
    global _current
    model, loop = os.environ["SLEEPD_MODEL"], asyncio.get_running_loop()
    try:
        _current = EngineController(engine_client, loop, model)
    except SleepdError as error:
        if error.code != grpc.StatusCode.ALREADY_EXISTS:
            raise RuntimeError(f"{what} could not attach as {model}'s sleepd controller: {error.message}") from None
        # Several API servers (--api-server-count) share one engine; the first controls it.
        _current = SecondFrontEnd(engine_client, loop, model)
        log.info("%s serves %s beside its sleepd controller (another front end of this vLLM): its requests "
                 "wake the model through the daemon", what, model)
        return
    log.info("%s attached to sleepd as %s's controller", what, model)
