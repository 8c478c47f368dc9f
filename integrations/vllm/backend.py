"""Registers the `sleepd` sleep-mode backend where vLLM has pluggable backends."""

NAME = "sleepd"


def register() -> None:
    try:
        from vllm.device_allocator.sleep_mode_backend import SleepModeBackendFactory
    except ImportError:
        return  # a release before pluggable sleep-mode backends: the allocator swap is all there is
    SleepModeBackendFactory.register_backend(NAME, "sleepd.integrations.vllm.sleep_backend", "SleepdBackend")
