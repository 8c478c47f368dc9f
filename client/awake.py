"""Waiting for a model to be awake before serving a request: the one call behind
SleepClient.ensure_awake and Controller.ensure_awake."""

import os

from sleepd.proto import sleepd_pb2 as pb

# SLEEPD_WAKE_ON_REQUEST=0: a request that finds its model asleep waits for a wake instead of waking it.
WAKE_ON_REQUEST = "SLEEPD_WAKE_ON_REQUEST"


def wake_on_request() -> bool:
    return os.environ.get(WAKE_ON_REQUEST, "1").strip().lower() not in ("0", "false", "no", "off")


def ensure_awake_request(model: str, evict: bool, wake: bool | None, timeout: float) -> pb.EnsureAwakeRequest:
    if timeout < 0:
        raise ValueError("timeout must be zero (the daemon's limit) or positive")
    wake = wake_on_request() if wake is None else wake
    return pb.EnsureAwakeRequest(model=model, evict=evict, wait_only=not wake, timeout_seconds=timeout)
