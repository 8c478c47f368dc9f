"""Joining vLLM's API server process (`vllm serve`), which owns the engine client:
its routes that run the model wake it on requests, and once the engine is up the
process attaches as the model's controller.

vLLM loads general plugins in the API server after its serving module is
imported and before it builds the app, so the plugin finds that module among
those loaded and wraps two functions it calls by name: `build_app(...)` (the
FastAPI app, before it starts) and `init_app_state(engine_client, ...)` (run on
the server's event loop with the engine client). In any other process (engine
core, workers, an `LLM` script) no serving module is loaded and nothing changes.
"""

import functools
import sys

from . import controller
from .wake_on_request import wrap_model_routes

# Where `run_server_worker` is defined: 0.29 has it in the first (run), 0.27 in the second (run).
SERVING_MODULES = ("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.openai.api_server")
HOOKED = ("build_app", "init_app_state")


def serving_module():
    for name in SERVING_MODULES:
        module = sys.modules.get(name)
        serve = getattr(module, "run_server_worker", None)
        if serve is not None and serve.__module__ == name:  # defined there, not re-exported
            return module
    return None


def _waking_on_requests(build_app):
    @functools.wraps(build_app)
    def wrapper(*args, **kwargs):
        app = build_app(*args, **kwargs)
        wrap_model_routes(app)
        return app
    return wrapper


def _then_attach(init_app_state):
    @functools.wraps(init_app_state)
    async def wrapper(engine_client, *args, **kwargs):
        result = await init_app_state(engine_client, *args, **kwargs)
        controller.attach(engine_client)
        return result
    return wrapper


def install() -> None:
    module = serving_module()
    if module is None:
        return  # not vLLM's API server
    missing = [name for name in HOOKED if not callable(getattr(module, name, None))]
    if missing:
        from vllm import __version__

        raise RuntimeError(f"sleepd cannot control vLLM {__version__}'s API server: {module.__name__} has no "
                           f"{', '.join(missing)}; sleepd supports vLLM 0.24.0 to 0.33.0 (see docs/vllm.md)")
    module.build_app = _waking_on_requests(module.build_app)
    module.init_app_state = _then_attach(module.init_app_state)
