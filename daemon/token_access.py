"""Who may import a region's token, on a backend that shares tokens (ACL).

The runtime lets a process import a token only once the exporter (the daemon)
has put the id the runtime knows it by on the token's allow-list. That id
(aclrtDeviceGetBareTgid) is the pid in the runtime's PID namespace, which inside
a container differs from the pid SO_PEERCRED reports, so the engine reports it
itself. Where the daemon sees pids as the runtime does (its own two ids agree),
the report must match the peer's credentials: an engine cannot get a token
authorised for another process. The check is never switched off.
"""

import os

from .errors import denied, invalid


class TokenAccess:
    def __init__(self, native):
        self._pids_agree = native.device_pid() == os.getpid()

    def check(self, peer_pid: int, device_pid: int | None) -> int:
        """The id to authorise for a peer whose credentials say `peer_pid`."""
        if device_pid is None:
            raise invalid("this daemon shares memory as ACL tokens: a request for memory must name the device_pid "
                          "aclrtDeviceGetBareTgid reports; update the client")
        if self._pids_agree and device_pid != peer_pid:
            raise denied(f"fetch names device pid {device_pid}, but the kernel says this is pid {peer_pid}, "
                         "in the daemon's PID namespace; a process may fetch tokens only for itself")
        return device_pid
