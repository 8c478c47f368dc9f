"""The daemon's state on disk, so that a restarted daemon finds its models again.

One JSON file under the state directory, replaced atomically (write, fsync,
rename) after every change that matters. Backups are recorded before engines
are told to unmap, so a crash at any point leaves a file that names every
backup whose region an engine may no longer hold.
"""

import json
import logging
import os
import threading

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
VERSION = 1
# How long a restarted daemon waits for engines to attach again and hand back their memory.
REATTACH_SECONDS = 60


class StateStore:
    def __init__(self, directory: str):
        self.path = os.path.join(directory, STATE_FILE)
        self._lock = threading.Lock()
        self._written = -1

    def load(self) -> dict | None:
        try:
            with open(self.path) as file:
                state = json.load(file)
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as error:
            log.error("ignoring unreadable state file %s: %s", self.path, error)
            return None
        if state.get("version") != VERSION:
            log.error("ignoring state file %s of version %s", self.path, state.get("version"))
            return None
        return state

    def save(self, state: dict, sequence: int) -> None:
        """Writes `state` unless a newer snapshot (higher sequence) is on disk already."""
        with self._lock:
            if sequence <= self._written:
                return
            temporary = self.path + ".tmp"
            with open(temporary, "w") as file:
                json.dump({"version": VERSION, **state}, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
            self._written = sequence

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def backup_pieces(state: dict) -> list[list[tuple[int, int, int]]]:
    """The (slab, offset, length) pieces of every backup the state records."""
    return [[tuple(piece) for piece in region["backup"]]
            for model in state["models"] for rank in model["ranks"] for region in rank["regions"]
            if region["backup"]]
