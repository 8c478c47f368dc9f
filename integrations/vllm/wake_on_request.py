"""Wake on demand: a request that needs vLLM's model waits, before it reaches
vLLM, until the model is awake (`Controller.ensure_awake`): it wakes it
(evicting others as the daemon's policy allows), or with
SLEEPD_WAKE_ON_REQUEST=0 waits for someone else to. Awake, the call only
marks the model as active for eviction and idle sleep. While the daemon is
unreachable (restarting), requests go straight to vLLM.
"""

import json
import logging

from sleepd.client import SleepdError

from . import controller

# Under vLLM's own logger, whose handler survives the logging setup of vLLM's HTTP server.
log = logging.getLogger(f"vllm.{__name__}")

# vLLM's routes that run the model (0.32); health, metrics, tokenizing and the sleep endpoints do not.
MODEL_ROUTES = frozenset((
    "/v1/completions", "/v1/chat/completions", "/v1/chat/completions/batch", "/v1/responses", "/v1/messages",
    "/v1/embeddings", "/v1/audio/transcriptions", "/v1/audio/translations", "/v2/embed", "/pooling",
    "/classify", "/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank", "/generative_scoring",
    "/inference/v1/generate", "/invocations",
))


def wrap_model_routes(app) -> None:
    """Each of the app's routes that runs the model waits for it to be awake first. The routes are
    wrapped rather than the app: vLLM's app has built its middleware stack by the time it is returned."""
    for route in app.routes:
        if getattr(route, "path", None) in MODEL_ROUTES and "POST" in (getattr(route, "methods", None) or ()):
            route.app = WakeOnRequest(route.app)


class WakeOnRequest:
    """A route's ASGI app, behind a wait for the model (plain ASGI, so streamed answers pass untouched)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        engine = controller.current()
        if engine is None:
            return await self.app(scope, receive, send)
        try:
            await engine.serve(lambda: self.app(scope, receive, send))
        except SleepdError as error:
            log.error("a request for %s could not wait for it to be awake: %s", engine.model, error)
            await _refuse(send, f"sleepd could not make model {engine.model} awake: {error.message}")


async def _refuse(send, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "ServiceUnavailable", "code": 503}}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
