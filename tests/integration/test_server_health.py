"""The standard health service, probed by grpcio's own health stub (as grpc_health_probe or a
load balancer would): Check, Watch, List, any CA-verified certificate, shutdown."""

from __future__ import annotations

import queue
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

if TYPE_CHECKING:
    from tests.integration.conftest import ServerFactory, ServerProc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
TIMEOUT = 10


def health(channel: grpc.Channel) -> health_pb2_grpc.HealthStub:
    return health_pb2_grpc.HealthStub(channel)


@pytest.mark.parametrize("service", ["", "job_worker.JobService"])
@pytest.mark.parametrize("stem", ["admin-client", "viewer-client", "guest-client", "noou-client"])
def test_check_is_serving_for_any_verified_certificate(
    grpc_channel_for: Callable[[str], grpc.Channel], stem: str, service: str
) -> None:
    stub = health(grpc_channel_for(stem))
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
    assert response.status == SERVING


def test_check_of_an_unknown_service_is_not_found(
    grpc_channel_for: Callable[[str], grpc.Channel],
) -> None:
    stub = health(grpc_channel_for("guest-client"))
    with pytest.raises(grpc.RpcError) as info:
        stub.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "unknown service: no.Such"


def test_list_names_both_services(grpc_channel_for: Callable[[str], grpc.Channel]) -> None:
    response = health(grpc_channel_for("noou-client")).List(
        health_pb2.HealthListRequest(), timeout=TIMEOUT
    )
    assert {name: value.status for name, value in response.statuses.items()} == {
        "": SERVING,
        "job_worker.JobService": SERVING,
    }


def test_watch_sends_the_status_at_once_and_stays_open(
    grpc_channel_for: Callable[[str], grpc.Channel],
) -> None:
    stub = health(grpc_channel_for("viewer-client"))
    known = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
    unknown = stub.Watch(health_pb2.HealthCheckRequest(service="no.Such"), timeout=TIMEOUT)
    assert next(known).status == SERVING
    assert next(unknown).status == SERVICE_UNKNOWN  # the standard: not an error for Watch
    # Both streams are still open: cancelling them is the client's doing, not an end.
    known.cancel()
    unknown.cancel()
    assert known.code() == unknown.code() == grpc.StatusCode.CANCELLED


def test_health_probes_stay_out_of_the_info_audit_log(
    grpc_channel_for: Callable[[str], grpc.Channel], server: ServerProc
) -> None:
    stub = health(grpc_channel_for("guest-client"))
    stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    with pytest.raises(grpc.RpcError):  # a guest is still nobody for the job service
        grpc_channel_for("guest-client").unary_unary("/job_worker.JobService/GetJobs")(
            b"", timeout=TIMEOUT
        )
    log = server.wait_for_log("outcome=PERMISSION_DENIED")
    assert "method=GetJobs op=list_jobs job=- outcome=PERMISSION_DENIED" in log
    assert "op=health_check" not in log


def test_watch_sees_not_serving_before_the_connection_closes_on_sigterm(
    server_factory: ServerFactory,
    grpc_credentials_for: Callable[[str], grpc.ChannelCredentials],
) -> None:
    with server_factory() as srv:
        channel = grpc.secure_channel(srv.address, grpc_credentials_for("noou-client"))
        statuses: queue.Queue[object] = queue.Queue()

        def watch() -> None:
            call = health(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            try:
                for response in call:
                    statuses.put(response.status)
            except grpc.RpcError as exc:
                statuses.put(exc.code())
            else:
                statuses.put("ended")

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            assert statuses.get(timeout=TIMEOUT) == SERVING
            srv.process.send_signal(signal.SIGTERM)
            assert statuses.get(timeout=TIMEOUT) == NOT_SERVING
            # then the connection closes: the stream ends with UNAVAILABLE
            assert statuses.get(timeout=TIMEOUT) == grpc.StatusCode.UNAVAILABLE
            assert srv.process.wait(TIMEOUT) == 0
        finally:
            channel.close()
            watcher.join(TIMEOUT)
