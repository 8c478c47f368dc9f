"""Hooking into vLLM's worker classes, refusing loudly where a vLLM release lacks what is hooked."""

import functools


def _original(cls, name: str):
    original = getattr(cls, name, None)
    if original is None:
        from vllm import __version__

        raise RuntimeError(f"sleepd cannot run vLLM {__version__}: {cls.__module__}.{cls.__qualname__} has no "
                           f"{name}(); sleepd supports vLLM 0.24.0 to 0.33.0 (see docs/vllm.md)")
    return original


def run_after(cls, name: str, step) -> None:
    """`cls.name(...)` runs as before, then `step(self)`."""
    original = _original(cls, name)

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        step(self)
        return result

    setattr(cls, name, wrapper)


def replace(cls, name: str, function) -> None:
    """`cls.name` becomes `function`, checking first that vLLM has it."""
    _original(cls, name)
    setattr(cls, name, function)


def run_within(cls, name: str, context) -> None:
    """`cls.name(...)` runs inside the context manager `context(self)`."""
    original = _original(cls, name)

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        with context(self):
            return original(self, *args, **kwargs)

    setattr(cls, name, wrapper)
