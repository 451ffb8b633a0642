"""JobClient.list_all against a scripted server: it follows page tokens, and falls back to
GetJobs on a server that has no ListJobs (UNIMPLEMENTED)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from jobworker.api import worker_pb2
from jobworker.client import RpcError
from tests.integration.test_client_transport import (
    FakeConnection,
    ServerCall,
    client_for,
    fake_server,
)

if TYPE_CHECKING:
    from tests.conftest import TestPKI

UNIMPLEMENTED, PERMISSION_DENIED = 12, 7
PAGES = {"": (["1", "2"], "t2"), "t2": (["3"], "t3"), "t3": (["4"], "")}


def jobs(ids: list[str]) -> list[worker_pb2.Job]:
    return [worker_pb2.Job(id=job_id, command="echo", status="COMPLETED") for job_id in ids]


def method(call: ServerCall) -> str:
    return call.headers[":path"].rsplit("/", 1)[1]


async def paging_server(conn: FakeConnection, call: ServerCall) -> None:
    assert method(call) == "ListJobs"
    token = worker_pb2.ListJobsReq.FromString(call.request).pageToken
    ids, following = PAGES[token]
    page = worker_pb2.ListJobsRes(jobs=jobs(ids), nextPageToken=following)
    await conn.respond(call, page.SerializeToString())


async def server_without_list_jobs(conn: FakeConnection, call: ServerCall) -> None:
    if method(call) == "ListJobs":
        await conn.trailers_only(call, UNIMPLEMENTED, "unknown method")
    else:
        await conn.respond(call, worker_pb2.Jobs(jobs=jobs(["1", "2"])).SerializeToString())


async def denying_server(conn: FakeConnection, call: ServerCall) -> None:
    await conn.trailers_only(call, PERMISSION_DENIED, "role guest is not allowed ...")


async def test_list_all_follows_the_page_tokens(test_pki: TestPKI) -> None:
    async with fake_server(test_pki, paging_server) as server:
        async with client_for(test_pki, server.address) as client:
            listed = await client.list_all()
        assert [job.id for job in listed] == ["1", "2", "3", "4"]
        tokens = [worker_pb2.ListJobsReq.FromString(c.request).pageToken for c in server.calls]
        assert tokens == ["", "t2", "t3"]


async def test_list_all_falls_back_to_get_jobs_without_list_jobs(test_pki: TestPKI) -> None:
    async with fake_server(test_pki, server_without_list_jobs) as server:
        async with client_for(test_pki, server.address) as client:
            listed = await client.list_all()
        assert [job.id for job in listed] == ["1", "2"]
        assert [method(call) for call in server.calls] == ["ListJobs", "GetJobs"]


async def test_list_all_reports_other_errors_as_they_are(test_pki: TestPKI) -> None:
    async with fake_server(test_pki, denying_server) as server:
        async with client_for(test_pki, server.address) as client:
            with pytest.raises(RpcError) as caught:
                await client.list_all()
        assert caught.value.code_name == "PERMISSION_DENIED"
        assert [method(call) for call in server.calls] == ["ListJobs"]
