"""Standard gRPC tooling works against the daemon's Unix socket: health checks (what a
Kubernetes probe or a load balancer asks) and server reflection (what grpcurl asks)."""

import signal

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from support import wait_for

SLEEPD = "sleepd.v1.Sleepd"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


@pytest.fixture
def backend():
    """Health and reflection do not depend on the memory backend: the host backend is enough."""
    return "host"


@pytest.fixture
def channel(daemon):
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        yield channel


def check(channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                     timeout=10).status


def reflect(channel, **request) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**request)]),
                                               timeout=10))
    assert len(responses) == 1, responses
    assert not responses[0].HasField("error_response"), responses[0].error_response
    return responses[0]


def test_a_started_daemon_reports_serving_for_the_server_and_for_sleepd(channel):
    assert check(channel, "") == health_pb2.HealthCheckResponse.SERVING
    assert check(channel, SLEEPD) == health_pb2.HealthCheckResponse.SERVING


def test_health_of_a_service_the_daemon_does_not_serve_is_not_found(channel):
    with pytest.raises(grpc.RpcError) as error:
        check(channel, "no.such.Service")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_stopping_daemon_reports_not_serving_to_a_watcher(daemon, channel):
    updates = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SLEEPD),
                                                        timeout=30)
    assert next(updates).status == health_pb2.HealthCheckResponse.SERVING
    daemon.process.send_signal(signal.SIGTERM)
    # NOT_SERVING comes before the server goes away (the stream may end right after it).
    assert next(updates).status == health_pb2.HealthCheckResponse.NOT_SERVING
    wait_for(lambda: daemon.process.poll() is not None, what="the daemon to exit")
    assert daemon.process.returncode == 0, daemon.log()


def test_reflection_lists_sleepd_health_and_reflection(channel):
    response = reflect(channel, list_services="")
    names = {service.name for service in response.list_services_response.service}
    assert names == {SLEEPD, HEALTH, REFLECTION}


def test_reflection_describes_sleep_and_wake(channel):
    response = reflect(channel, file_containing_symbol=SLEEPD)
    files = [descriptor_pb2.FileDescriptorProto.FromString(blob)
             for blob in response.file_descriptor_response.file_descriptor_proto]
    services = {f"{file.package}.{service.name}": service for file in files for service in file.service}
    assert SLEEPD in services, sorted(services)
    methods = {method.name: method for method in services[SLEEPD].method}
    assert {"Sleep", "Wake"} <= set(methods)
    assert methods["Sleep"].input_type == ".sleepd.v1.SleepRequest"
    assert methods["Wake"].input_type == ".sleepd.v1.WakeRequest"
    # A client can also resolve the request types it names, from the same response.
    messages = {f".{file.package}.{message.name}" for file in files for message in file.message_type}
    assert {methods["Sleep"].input_type, methods["Wake"].input_type, methods["Sleep"].output_type} <= messages
