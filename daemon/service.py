"""The gRPC service sleepd.v1.Sleepd: checks each request's right (auth.RIGHTS),
hands it to the operations, and turns SleepdError into the gRPC status it names."""

import logging
import threading
import time

import grpc

from sleepd.common.shown import shown
from sleepd.common.wire import TOKEN_METADATA
from sleepd.proto import sleepd_pb2 as pb
from sleepd.proto import sleepd_pb2_grpc as pb_grpc

from . import external
from .core import Core
from .errors import SleepdError, invalid, not_found
from .fanout import attached_message, region_message
from .views import OperationResult
from .registry import check_model_name, check_tag
from .regions import RegionState
from .rules import parse_action
from .swap import swap

log = logging.getLogger(__name__)

POLICY_FIELDS = ("priority", "pinned", "eviction_level", "idle_seconds")


def grpc_status(error: SleepdError) -> grpc.StatusCode:
    """The gRPC status of a refusal: the domain's codes are named as gRPC's."""
    return grpc.StatusCode[error.code.name]


def _refusals(method):
    """Turns SleepdError into the status it names; counts every refusal."""

    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except SleepdError as error:
            if self._core.metrics:
                self._core.metrics.errors.labels(operation=method.__name__, code=error.code.name).inc()
            context.abort(grpc_status(error), error.message)

    wrapper.__name__ = method.__name__
    return wrapper


class SleepdService(pb_grpc.SleepdServicer):
    """One instance per listener. `identify` says who a caller is, and only the
    listener knows that: the Unix socket's service looks up the token the fd
    socket gave the caller; the TCP listener's service (tcp.py), reached only
    through its bearer-token check, answers the TCP admin. A peer's address is
    never evidence: any local process can choose the one gRPC reports.
    `wake_wait_limit` and `swap_batch` are those settings, for EnsureAwake and Swap."""

    def __init__(self, core: Core, wake_wait_limit: float, swap_batch: int, identify=None):
        self._core = core
        self._ops = core.operations
        self._wake_wait_limit = wake_wait_limit
        self._swap_batch = swap_batch
        self._identify = identify or self._token_holder

    def _token_holder(self, context):
        """The Unix socket's callers: whoever the fd socket gave the request's
        token to, or None (unauthenticated) without a valid one."""
        token = dict(context.invocation_metadata()).get(TOKEN_METADATA)
        return self._core.registry.caller(token) if token else None

    def _authorize(self, operation: str, context, models: list[str], policy_changes=None):
        """The caller, if it has the right `operation` needs on `models` (auth.RIGHTS); a model
        it may not see is NOT_FOUND, as one that does not exist is."""
        for name in models:
            check_model_name(name)
        caller, authorizer = self._identify(context), self._core.authorizer
        names = list(dict.fromkeys(models))
        authorizer.require(caller, operation, names, policy_changes)
        for name in names:
            self._core.registry.model(name, lambda owner: authorizer.sees(caller, owner))
        return caller

    def Session(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "attach":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a session must begin with an attach message")
        attach = first.attach
        try:
            session = self._ops.attach(attach.token, attach.model, attach.rank, attach.device, attach.device_uuid,
                                       attach.needs_controller)
        except SleepdError as error:
            context.abort(grpc_status(error), error.message)

        def read_acks():
            try:
                for message in request_iterator:
                    kind = message.WhichOneof("kind")
                    if kind == "ack":
                        session.acknowledge(_bounded_error(message.ack))
                    elif kind == "detach":
                        session.say_goodbye()
            except grpc.RpcError:
                pass
            finally:
                self._ops.end_session(session, "session stream closed")

        threading.Thread(target=read_acks, name=f"session-{session.pid}", daemon=True).start()
        # gRPC runs this callback on its own poller thread, which must never wait on
        # a model's lock (acks of other ranks arrive through it): reclaim elsewhere.
        context.add_callback(lambda: threading.Thread(
            target=self._ops.end_session, args=(session, "session stream ended"), daemon=True).start())
        yield attached_message(session, self._core.backend.name)
        while (command := session.outbox.get()) is not None:
            yield command

    def Control(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "attach":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a controller's stream must begin with an attach message")
        controllers = self._core.controllers
        try:
            caller = self._authorize("Control", context, [first.attach.model])
            controller = controllers.attach(caller, first.attach.model)
        except SleepdError as error:
            context.abort(grpc_status(error), error.message)

        def read_answers():
            try:
                for message in request_iterator:
                    if message.WhichOneof("kind") == "done":
                        controller.answer(_bounded_error(message.done))
            except grpc.RpcError:
                pass
            finally:
                controllers.end(controller, "its stream closed")

        threading.Thread(target=read_answers, name=f"controller-{controller.pid}", daemon=True).start()
        context.add_callback(lambda: controllers.end(controller, "its stream ended"))  # takes the registry lock only
        yield pb.ControlRequest(attached=pb.ControllerAttached())
        while (request := controller.outbox.get()) is not None:
            yield request
        if context.is_active():  # the daemon ended it: say why
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{controller.describe()} ended: {controller.ended}")

    def _from_rank(self, context, model: str) -> bool:
        """Whether the request comes from one of the model's own ranks (its engine's own API)."""
        token = dict(context.invocation_metadata()).get(TOKEN_METADATA)
        return bool(token) and self._core.registry.rank_of(token, model) is not None

    @_refusals
    def Allocate(self, request, context):
        return region_message(self._ops.allocate(request.session_id, request.size, request.tag, request.evict,
                                                 request.persist))

    @_refusals
    def Touch(self, request, context):
        self._ops.touch(request.session_id)
        return pb.TouchReply()

    @_refusals
    def Free(self, request, context):
        self._ops.free(request.session_id, request.region_id)
        return pb.FreeReply()

    @_refusals
    def Sleep(self, request, context):
        _check_tags([*request.tags, *(item.tag for item in request.actions)])
        self._authorize("Sleep", context, [request.model])
        actions = {}
        for item in request.actions:
            if item.action == pb.ACTION_UNSPECIFIED:
                raise invalid(f"tag {item.tag!r} has no action; use offload or discard")
            if item.action not in pb.Action.values():  # proto3 enums are open: any number decodes
                raise invalid(f"tag {item.tag!r} has action {item.action}, which does not exist; "
                              "use offload or discard")
            actions[item.tag] = parse_action(pb.Action.Name(item.action))
        level = request.level if request.HasField("level") else 1
        return _reply(external.sleep(self._ops, request.model, level, list(request.tags), actions,
                                     self._from_rank(context, request.model)))

    @_refusals
    def Wake(self, request, context):
        _check_tags(request.tags)
        caller = self._authorize("Wake", context, [request.model])
        return _reply(external.wake(self._ops, request.model, list(request.tags), request.evict, caller,
                                    self._from_rank(context, request.model)))

    @_refusals
    def EnsureAwake(self, request, context):
        caller = self._authorize("EnsureAwake", context, [request.model])
        if request.timeout_seconds < 0:
            raise invalid("timeout_seconds must be zero (the daemon's limit) or positive")
        waited, woke = external.ensure_awake(self._ops, request.model, request.evict, request.wait_only,
                                             request.timeout_seconds, caller, self._from_rank(context, request.model),
                                             self._wake_wait_limit)
        return pb.EnsureAwakeReply(waited_seconds=waited, woke=woke)

    @_refusals
    def Swap(self, request, context):
        caller = self._authorize("Swap", context, [request.to_model, *request.from_models])
        result = swap(self._ops, request.to_model, list(request.from_models), caller, self._swap_batch)
        return pb.SwapReply(slept=[_reply(r) for r in result.slept], woke=_reply(result.woke),
                            seconds=result.seconds, sequential_estimate_seconds=result.sequential_estimate_seconds)

    @_refusals
    def SetPolicy(self, request, context):
        changes = {field: getattr(request, field) if request.HasField(field) else None for field in POLICY_FIELDS}
        self._authorize("SetPolicy", context, [request.model], policy_changes=changes)
        return _policy(self._ops.set_policy(request.model, **changes))

    def Events(self, request, context):
        """Events of the models the caller may see: its own, or every model for an admin."""
        if request.model:
            try:
                check_model_name(request.model)
            except SleepdError as error:
                context.abort(grpc_status(error), error.message)
        caller, authorizer = self._identify(context), self._core.authorizer
        subscription = self._core.events.subscribe(request.model, lambda owner: authorizer.sees(caller, owner))
        context.add_callback(subscription.close)
        # The first message says the stream is live: nothing after it will be missed.
        yield pb.Event(time=time.time(), kind="subscribed", model=request.model, detail="events from here on")
        while context.is_active():
            event = subscription.get(timeout=1.0)
            if event is not None:
                yield pb.Event(time=event.time, kind=event.kind, model=event.model, detail=event.detail,
                               bytes=event.bytes)

    # ---- weight sets ----

    def _session(self, session_id: str):
        session = self._core.registry.session(session_id)
        return session, self._core.registry.model(session.model)

    @_refusals
    def CommitWeights(self, request, context):
        session, model = self._session(request.session_id)
        weight_set = self._ops.weight_sets.commit(session, model, list(request.region_ids), request.key,
                                                  request.manifest)
        return _weight_set(weight_set)

    @_refusals
    def JoinWeights(self, request, context):
        session, model = self._session(request.session_id)
        joined = self._ops.weight_sets.join(session, model, request.key)
        if joined is None:
            return pb.JoinWeightsReply(found=False)
        weight_set, views = joined
        return pb.JoinWeightsReply(found=True, weight_set=_weight_set(weight_set), manifest=weight_set.manifest,
                                   regions=[region_message(view) for view in views])

    @_refusals
    def LeaveWeights(self, request, context):
        session, model = self._session(request.session_id)
        views = self._ops.weight_sets.leave(session, model, request.weight_set)
        return pb.LeaveWeightsReply(regions=[region_message(view) for view in views])

    @_refusals
    def ListWeightSets(self, request, context):
        caller = self._identify(context)
        return pb.ListWeightSetsReply(weight_sets=[_weight_set(s) for s in self._ops.weight_sets.listed(caller)])

    @_refusals
    def DropWeightSet(self, request, context):
        return _weight_set(self._ops.weight_sets.drop(request.weight_set, self._identify(context)))

    @_refusals
    def Status(self, request, context):
        """Devices and the pool for anyone; models only those the caller may see."""
        if request.model:
            check_model_name(request.model)
        core, caller = self._core, self._identify(context)
        visible = [model for model in core.registry.snapshot() if core.authorizer.sees(caller, model.owner_uid)]
        models = [model for model in visible if not request.model or model.name == request.model]
        if request.model and not models:
            raise not_found(f"model {request.model!r} is not attached "
                            f"(attached: {', '.join(m.name for m in visible) or 'none you may see'})")
        return pb.StatusReply(
            backend=core.backend.name,
            devices=[_device(core, device) for device in core.backend.devices],
            pool=pb.PoolStatus(directory=core.pool.directory, budget=core.pool.budget, used=core.pool.used),
            models=[pb.ModelStatus(name=model.name, sleeping=model.sleeping, policy=_policy(model.policy),
                                   idle_seconds=model.idle_seconds, needs_controller=model.needs_controller,
                                   controller_pid=model.controller_pid, ranks=[
                pb.RankStatus(rank=rank.rank, device=rank.device, pid=rank.pid, orphaned=rank.orphaned,
                              regions=[region_message(region) for region in rank.regions])
                for rank in model.ranks]) for model in models],
        )


def _check_tags(tags) -> None:
    for tag in tags:
        check_tag(tag)


def _bounded_error(answer):
    """An engine's or controller's answer, its error text escaped and bounded before the daemon
    keeps it: that text ends up in an admin's terminal and in the log."""
    answer.error = shown(answer.error)
    return answer


def _device(core: Core, device) -> pb.DeviceStatus:
    status = pb.DeviceStatus(index=device.index, name=device.name, uuid=device.uuid, capacity=device.capacity,
                             reserve=device.reserve, budget=device.budget, used=core.backend.used(device.index),
                             free=core.backend.free(device.index), committed=core.room.committed(device.index))
    driver = core.backend.driver_memory(device.index)
    if driver is not None:
        status.driver_used, status.driver_free = driver.used, driver.free
    return status


def _reply(result: OperationResult) -> pb.OperationReply:
    return pb.OperationReply(
        model=result.model, bytes_offloaded=result.bytes_offloaded, bytes_discarded=result.bytes_discarded,
        bytes_restored=result.bytes_restored, bytes_zeroed=result.bytes_zeroed, regions=result.region_count,
        seconds=result.seconds, sleeping=result.sleeping, evicted=result.evicted)


def _weight_set(weight_set) -> pb.WeightSet:
    # Read without the set's lock: a listing may be a moment old, never inconsistent in one field.
    views = list(weight_set.views.values())
    engines = {}
    for view in views:
        session = view.session
        engine = engines.setdefault(id(session), pb.WeightSetEngine(model=session.model, rank=session.rank,
                                                                     pid=session.pid, awake=True))
        engine.awake &= view.state is RegionState.MAPPED
    return pb.WeightSet(id=weight_set.id, key=weight_set.key, bytes=weight_set.size, where=weight_set.where(),
                        device=weight_set.device, owner_uid=weight_set.owner_uid, regions=len(weight_set.regions),
                        engines=list(engines.values()), idle_seconds=time.monotonic() - weight_set.last_used)


def _policy(policy) -> pb.ModelPolicy:
    return pb.ModelPolicy(priority=policy.priority, pinned=policy.pinned, eviction_level=policy.eviction_level,
                          idle_seconds=policy.idle_seconds)
