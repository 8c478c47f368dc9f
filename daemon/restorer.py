"""A swap's incoming side (executor.py, `Overlapped`): a thread that creates and fills the
target's regions as the victims' released bytes make room for them, in batches of
whatever fits, while the outgoing steps go on."""

import threading

from .errors import exhausted


class Restorer(threading.Thread):
    """A swap's incoming side: creates and fills the target's regions as room appears."""

    def __init__(self, materialize, room, target, regions: list, caller):
        super().__init__(name=f"swap-restore-{target.name}", daemon=True)
        # materialize(model, regions, caller): the executor's creating and filling of asleep regions.
        self._materialize, self._room_on_devices = materialize, room
        self._target, self._pending, self._caller = target, list(regions), caller
        self._changed = threading.Condition()
        self._senders_done = False
        self.error: Exception | None = None

    def room_changed(self) -> None:
        with self._changed:
            self._changed.notify_all()

    def finish(self) -> None:
        """Nothing more goes out: restore what fits, or fail; returns once the thread has ended."""
        with self._changed:
            self._senders_done = True
            self._changed.notify_all()
        self.join()

    def run(self) -> None:
        try:
            while self._pending:
                with self._changed:
                    self._changed.wait_for(lambda: self._fitting() or self._senders_done)
                    batch = self._fitting()
                    if not batch:
                        raise exhausted(f"swap to {self._target.name}: no room for region {self._pending[0].id} "
                                        "after the other models slept")
                # Everything that fits now goes in one request: fewer round trips to the mover.
                self._materialize(self._target, batch, self._caller)
                self._pending = self._pending[len(batch):]
        except Exception as error:  # reported by the swap, which rolls back
            self.error = error

    def _fitting(self) -> list:
        """The longest prefix of what is pending that fits in the room there is now."""
        devices = {region.device for region in self._pending}
        free = {device: self._room_on_devices.room_for(self._target.name, device) for device in devices}
        batch = []
        for region in self._pending:
            if free[region.device] < region.mapped_size:
                break
            free[region.device] -= region.mapped_size
            batch.append(region)
        return batch
