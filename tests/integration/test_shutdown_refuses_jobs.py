"""From the first moment of a shutdown (health NOT_SERVING), CreateJob is refused with
UNAVAILABLE ``server shutting down``, while the server still waits to tell its health
watchers before it sends GOAWAY; the other RPCs go on until then."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc
import pytest
import trio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jobworker.api import worker_pb2, worker_pb2_grpc
from tests.integration.attacks.tools import (
    RawH2,
    StreamState,
    client_ssl_context,
    grpc_frame,
    in_thread,
)

if TYPE_CHECKING:
    from tests.conftest import TestPKI
    from tests.integration.conftest import ServerFactory

TIMEOUT = 10
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def open_stuck_watcher(address: str, test_pki: TestPKI) -> RawH2:
    """A Watch stream whose client grants no flow-control window: the server cannot hand it
    NOT_SERVING, so its shutdown waits the whole delivery bound before GOAWAY."""
    watcher = await RawH2.connect(
        address, client_ssl_context(test_pki, "noou-client"), window=0, auto_ack=False
    )
    stream_id = watcher.conn.get_next_available_stream_id()
    watcher.conn.send_headers(
        stream_id,
        [
            (":method", "POST"),
            (":scheme", "https"),
            (":path", "/grpc.health.v1.Health/Watch"),
            (":authority", "localhost"),
            ("te", "trailers"),
            ("content-type", "application/grpc"),
        ],
    )
    watcher.streams[stream_id] = StreamState()
    request = health_pb2.HealthCheckRequest(service="").SerializeToString()
    watcher.send_data(stream_id, grpc_frame(request), end_stream=True)
    await watcher.flush()
    # The response headers: the Watch handler runs (and waits on the window for its first
    # message), so the shutdown will wait for it.
    await watcher.until(lambda: bool(watcher.streams[stream_id].headers), timeout=TIMEOUT)
    return watcher


async def test_create_job_is_refused_once_health_is_not_serving(
    server_factory: ServerFactory,
    grpc_credentials_for: Callable[[str], grpc.ChannelCredentials],
    test_pki: TestPKI,
) -> None:
    with server_factory() as srv:
        channel = grpc.secure_channel(srv.address, grpc_credentials_for("admin-client"))
        admin = worker_pb2_grpc.JobServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        try:
            job = await in_thread(
                admin.CreateJob,
                worker_pb2.CreateJobReq(command="sleep", args=["60"]),
                timeout=TIMEOUT,
            )
            watcher = await open_stuck_watcher(srv.address, test_pki)
            try:
                srv.process.send_signal(signal.SIGTERM)
                with trio.fail_after(TIMEOUT):
                    while True:
                        response = await in_thread(
                            health.Check, health_pb2.HealthCheckRequest(), timeout=TIMEOUT
                        )
                        if response.status == NOT_SERVING:
                            break
                        await trio.sleep(0.02)  # polling the status, within the deadline
                # The connection is still up (no GOAWAY before the watcher is told, or
                # 1 s): the job service answers, but starts nothing.
                with pytest.raises(grpc.RpcError) as refused:
                    await in_thread(
                        admin.CreateJob, worker_pb2.CreateJobReq(command="true"), timeout=TIMEOUT
                    )
                assert (refused.value.code(), refused.value.details()) == (
                    grpc.StatusCode.UNAVAILABLE,
                    "server shutting down",
                )
                running = await in_thread(
                    admin.GetJob, worker_pb2.GetJobReq(id=job.id), timeout=TIMEOUT
                )
                assert running.status == "RUNNING"
            finally:
                await watcher.aclose()
        finally:
            channel.close()
        assert srv.process.wait(TIMEOUT) == 0
    assert sorted(path.name for path in (srv.data_dir / "jobs").iterdir()) == [job.id]
    assert "method=CreateJob op=create_job job=- outcome=UNAVAILABLE" in srv.log_text()
