"""The `sleepd` sleep-mode backend, for vLLM releases with pluggable backends
(`vllm.device_allocator.sleep_mode_backend`): `--sleep-mode-backend sleepd`.
It keeps the default `cumem` backend's policy (runtime state and CUDA graph
pools offloaded at every level, weights at level 1), through the daemon."""

from vllm.device_allocator.sleep_mode_backend import SleepModeBackend

from . import session

KEPT_AT_EVERY_LEVEL = ("runtime", "cudagraph")


class SleepdBackend(SleepModeBackend):
    def suspend(self, level: int = 1) -> None:
        self._state = "SUSPENDED"
        offload = ("weights", *KEPT_AT_EVERY_LEVEL) if level == 1 else KEPT_AT_EVERY_LEVEL
        session.allocator().sleep(offload_tags=offload)

    def resume(self, tags: list[str] | None = None) -> None:
        self._state = "RESUMING"
        session.allocator().wake_up(tags)
        self._state = "RUNNING"

    def discard(self, tags: tuple[str, ...]) -> None:
        session.allocator().discard(tags)
        self._state = "SUSPENDED"

    @classmethod
    def preserves_communicators(cls) -> bool:
        return True  # only memory moves; communicators stay as they are
