"""The gRPC service sleepd.v1.Sleepd: translates requests to the manager and
SleepdError to gRPC status codes."""

import logging
import threading

import grpc

from sleepd.proto import sleepd_pb2 as pb
from sleepd.proto import sleepd_pb2_grpc as pb_grpc

from .errors import SleepdError, invalid
from .manager import MemoryManager, OperationResult
from .rules import parse_action

log = logging.getLogger(__name__)


def _refusals(method):
    """Turns SleepdError into the status it names; counts every refusal."""

    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except SleepdError as error:
            if self._metrics:
                self._metrics.errors.labels(operation=method.__name__, code=error.code.name).inc()
            context.abort(error.code, error.message)

    wrapper.__name__ = method.__name__
    return wrapper


class SleepdService(pb_grpc.SleepdServicer):
    def __init__(self, manager: MemoryManager, metrics=None):
        self._manager = manager
        self._metrics = metrics

    def Session(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "attach":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a session must begin with an attach message")
        attach = first.attach
        try:
            session = self._manager.attach(attach.token, attach.model, attach.rank, attach.device)
        except SleepdError as error:
            context.abort(error.code, error.message)

        def read_acks():
            try:
                for message in request_iterator:
                    if message.WhichOneof("kind") == "ack":
                        session.acknowledge(message.ack)
            except grpc.RpcError:
                pass
            finally:
                self._manager.end_session(session, "session stream closed")

        threading.Thread(target=read_acks, name=f"session-{session.pid}", daemon=True).start()
        context.add_callback(lambda: self._manager.end_session(session, "session stream ended"))
        yield pb.DaemonCommand(attached=pb.Attached(session_id=session.id, backend=self._manager.backend.name))
        while (command := session.outbox.get()) is not None:
            yield command

    @_refusals
    def Allocate(self, request, context):
        return _region(self._manager.allocate(request.session_id, request.size, request.tag))

    @_refusals
    def Free(self, request, context):
        self._manager.free(request.session_id, request.region_id)
        return pb.FreeReply()

    @_refusals
    def Sleep(self, request, context):
        actions = {}
        for item in request.actions:
            if item.action == pb.ACTION_UNSPECIFIED:
                raise invalid(f"tag {item.tag!r} has no action; use offload or discard")
            actions[item.tag] = parse_action(pb.Action.Name(item.action))
        level = request.level if request.HasField("level") else 1
        return _reply(self._manager.sleep(request.model, level, list(request.tags), actions))

    @_refusals
    def Wake(self, request, context):
        return _reply(self._manager.wake(request.model, list(request.tags)))

    @_refusals
    def Status(self, request, context):
        manager = self._manager
        pool = manager.pool
        return pb.StatusReply(
            backend=manager.backend.name,
            devices=[pb.DeviceStatus(index=d.index, name=d.name, capacity=d.capacity, used=manager.backend.used(d.index))
                     for d in manager.backend.devices],
            pool=pb.PoolStatus(directory=pool.directory, budget=pool.budget, used=pool.used),
            models=[pb.ModelStatus(name=model.name, sleeping=model.sleeping, ranks=[
                pb.RankStatus(rank=rank.rank, device=rank.device, pid=rank.pid,
                              regions=[_region(region) for region in rank.regions])
                for rank in model.ranks]) for model in manager.snapshot(request.model)],
        )


def _region(region) -> pb.Region:
    return pb.Region(id=region.id, tag=region.tag, size=region.size, device=region.device, state=int(region.state))


def _reply(result: OperationResult) -> pb.OperationReply:
    return pb.OperationReply(
        model=result.model, bytes_offloaded=result.bytes_offloaded, bytes_discarded=result.bytes_discarded,
        bytes_restored=result.bytes_restored, bytes_zeroed=result.bytes_zeroed, regions=result.regions,
        seconds=result.seconds, sleeping=result.sleeping)
