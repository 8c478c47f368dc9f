"""A process's lease with the daemon: the stream a SleepClient's session or a Controller
runs on, which lasts as long as the daemon and the process both do. Opening it, and
opening it again after the daemon went away (a restart), are the same for both."""

import queue
import threading
import time
from typing import Callable

import grpc

from sleepd.proto import sleepd_pb2_grpc as pb_grpc

from .control import control_channel
from .errors import SleepdError, as_sleepd_error
from .fd_socket import ANSWER_SECONDS, FdConnection

# Between two tries to attach again.
RETRY_SECONDS = 0.2


class Lease:
    """One attach: the fd socket connection that vouches for this process, the channel whose requests
    carry its token, a stub on it, the queue of messages to send on the stream (None half-closes it),
    the stream, and `answer`, the daemon's first message on it, its answer to the attach."""

    def __init__(self, socket_path: str, method: str, attach_message: Callable[[FdConnection], object]):
        """Calls the stream method `method` (Session, Control), whose first message is `attach_message`
        of the fd socket connection (which holds the token it may carry)."""
        self.channel, self.fd_socket = control_channel(socket_path)
        self.stub = pb_grpc.SleepdStub(self.channel)
        self.outgoing: queue.Queue = queue.Queue()
        self.outgoing.put(attach_message(self.fd_socket))
        self.stream = getattr(self.stub, method)(iter(self.outgoing.get, None))
        # The stream lives as long as the lease, so no deadline bounds it: only the wait for the answer is.
        silent = threading.Timer(ANSWER_SECONDS, self.stream.cancel)
        silent.start()
        try:
            with as_sleepd_error():
                self.answer = next(self.stream)
        except SleepdError as error:
            self.close()
            if error.code is grpc.StatusCode.CANCELLED and not silent.is_alive():
                raise SleepdError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"sleepd did not answer the attach within {ANSWER_SECONDS:g} s") from None
            raise
        finally:
            silent.cancel()

    def close(self) -> None:
        self.fd_socket.close()
        self.channel.close()


def attach_again(attach: Callable[[], Lease], seconds: float, closing: Callable[[], bool]) -> Lease | None:
    """Calls `attach` until it returns a new lease, RETRY_SECONDS apart: that lease; None once
    `closing()` says its owner is closing; after `seconds`, TimeoutError naming the last failure."""
    deadline = time.monotonic() + seconds
    why = ""
    while not closing():
        if time.monotonic() >= deadline:
            raise TimeoutError(why)
        try:
            return attach()
        except (SleepdError, OSError) as error:
            why = str(error)
            time.sleep(RETRY_SECONDS)
    return None
