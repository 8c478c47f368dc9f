"""The /metrics HTTP endpoint: which view a request gets, by its bearer token, and a
server with a fixed number of worker threads. prometheus_client's own server starts
a thread per connection, so any local user holding idle or half-sent connections
grew the daemon by a thread each; here a connection waits in a short queue for a
worker, is closed at once when the queue is full, and is dropped by its worker
after READ_TIMEOUT seconds of silence."""

import hmac
import logging
import queue
import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

log = logging.getLogger(__name__)

WORKERS = 4
QUEUED = 16           # accepted connections waiting for a worker; more are closed unanswered
READ_TIMEOUT = 5.0    # seconds a worker waits for the next bytes of a request


def by_bearer_token(public, private, token: str):
    """A WSGI app: `private` for a request whose Authorization is `Bearer <token>`, `public` for one
    without Authorization, and 401 for wrong credentials (a scraper with a stale token shows as down
    rather than quietly losing series). With no token configured, only `public` is served."""
    expected = f"Bearer {token}".encode() if token else None

    def app(environ, start_response):
        given = environ.get("HTTP_AUTHORIZATION")
        if given is None:
            return public(environ, start_response)
        if expected is not None and hmac.compare_digest(given.encode("latin-1", "replace"), expected):
            return private(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                            ("WWW-Authenticate", 'Bearer realm="sleepd"')])
        why = "wrong bearer token" if expected is not None else "this daemon has no metrics.token_file"
        return [f"{why}; without an Authorization header /metrics serves the node's series only\n".encode()]
    return app


class _Handler(WSGIRequestHandler):
    timeout = READ_TIMEOUT

    def log_message(self, *args) -> None:
        pass  # a scrape is no news; wsgiref would write each one to stderr


class MetricsServer(WSGIServer):
    request_queue_size = 64

    def __init__(self, host: str, port: int, app):
        self.address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        super().__init__((host, port), _Handler)
        self.set_app(app)
        self._waiting: queue.Queue = queue.Queue(QUEUED)

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> None:
        for number in range(WORKERS):
            threading.Thread(target=self._work, name=f"metrics-{number}", daemon=True).start()
        threading.Thread(target=self.serve_forever, name="metrics-accept", daemon=True).start()

    def process_request(self, request, client_address) -> None:
        """Runs on the accepting thread: hands the connection to a worker, or closes it when all are behind."""
        try:
            self._waiting.put_nowait((request, client_address))
        except queue.Full:
            self.shutdown_request(request)

    def _work(self) -> None:
        while True:
            request, client_address = self._waiting.get()
            try:
                self.finish_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
            finally:
                self.shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        log.debug("metrics request from %s failed", client_address, exc_info=True)
