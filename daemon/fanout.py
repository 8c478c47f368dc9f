"""Commands to a model's ranks: the only code that builds the messages the
daemon sends engines on their session streams, and the one place that waits
for their acks. Each command carries everything its rank must do (all of its
regions), so a step costs one round trip per rank, whatever the region count.
"""

import time
from concurrent.futures import TimeoutError as FutureTimeout

from sleepd.proto import sleepd_pb2 as pb

from .errors import Code, SleepdError
from .regions import Region, RegionState
from .sessions import RankLost, Session

Failures = list[tuple[Session, Exception]]


def region_message(region: Region) -> pb.Region:
    return pb.Region(id=region.id, tag=region.tag, size=region.size, device=region.device, state=int(region.state),
                     persist=region.persist, mapped_size=region.mapped_size, weight_set=region.weight_set)


def attached_message(session: Session, backend_name: str) -> pb.DaemonCommand:
    """The first message of a session stream: who it is, and the regions it already owns."""
    return pb.DaemonCommand(attached=pb.Attached(
        session_id=session.id, backend=backend_name, resuming=session.returning,
        regions=[region_message(region) for region in sorted(session.regions.values(), key=lambda r: r.id)]))


def owners(regions) -> list[Session]:
    """The live sessions owning `regions`, each once, in a stable order. An
    orphaned rank's regions are mapped by nobody, so there is no one to ask."""
    return list({r.session.id: r.session for r in regions if r.session.ended is None}.values())


class Fanout:
    """`hook_timeout` bounds the steps in which engines run hooks (quiesce, resume, tags awake);
    `device_step_timeout` the unmap and remap rounds, which run while the daemon holds the
    device's lock: one slow engine then fails its own operation instead of holding up the device.
    A step given a `timeout` of its own (an eviction's bound) waits for the shorter of the two;
    0 sends without waiting."""

    def __init__(self, hook_timeout: float, device_step_timeout: float):
        self.hook_timeout = hook_timeout
        self.device_step_timeout = device_step_timeout

    def quiesce(self, sessions, level: int, timeout: float | None = None):
        return self._all(sessions, lambda session: pb.DaemonCommand(quiesce=pb.Quiesce(level=level)),
                         self.hook_timeout, timeout)

    def resume(self, sessions, timeout: float | None = None):
        return self._all(sessions, lambda session: pb.DaemonCommand(resume=pb.Resume()), self.hook_timeout, timeout)

    def unmap(self, sessions, after: dict[Region, RegionState], timeout: float | None = None):
        """Each rank unmaps its regions among `after`, which says the state each goes to."""
        return self._all(sessions, lambda session: pb.DaemonCommand(unmap=pb.Unmap(regions=[
            {"region_id": region.id, "state": state} for region, state in after.items() if region.session is session])),
            self.device_step_timeout, timeout)

    def remap(self, sessions, regions, timeout: float | None = None):
        return self._all(sessions, lambda session: pb.DaemonCommand(remap=pb.Remap(
            region_ids=sorted(region.id for region in regions if region.session is session))),
            self.device_step_timeout, timeout)

    def tags_awake(self, sessions, regions):
        """Each rank runs the wake hooks of the tags of its regions among `regions`, mapped again."""
        return self._all(sessions, lambda session: pb.DaemonCommand(tags_awake=pb.TagsAwake(
            tags=sorted({region.tag for region in regions if region.session is session}))), self.hook_timeout)

    @staticmethod
    def _all(sessions, command, bound: float, timeout: float | None = None) -> tuple[Failures, list[Session]]:
        """Sends each session its command and waits for every ack, within `bound` (or `timeout`,
        if shorter). Returns the failures and the sessions that acknowledged success."""
        futures = [(session, session.send(command(session))) for session in sessions]
        limit = bound if timeout is None else min(timeout, bound)
        deadline = time.monotonic() + limit
        failures, done = [], []
        for session, future in futures:
            try:
                ack = future.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                failures.append((session, TimeoutError(f"did not answer within {limit:g} s")))
                continue
            except RankLost as error:
                failures.append((session, error))
                continue
            if ack.ok:
                done.append(session)
            else:
                failures.append((session, RuntimeError(ack.error)))
        return failures, done


def rank_failure(what: str, failures: Failures) -> SleepdError:
    details = "; ".join(f"{session.describe()}: {error}" for session, error in failures)
    if any(isinstance(error, TimeoutError) for _, error in failures):
        code = Code.DEADLINE_EXCEEDED
    elif any(isinstance(error, RankLost) for _, error in failures):
        code = Code.UNAVAILABLE
    else:
        code = Code.ABORTED
    return SleepdError(code, f"{what} failed and was rolled back: {details}")
