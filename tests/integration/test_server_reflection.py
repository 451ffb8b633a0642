"""Server reflection, as generic clients (grpcurl, grpcui, Postman) use it: grpcio-reflection's
own descriptor database over a grpcio channel, not our code, and raw v1 streams."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

SERVICES = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "job_worker.JobService",
]
JOB_RPCS = {"CreateJob", "GetJob", "StopJob", "GetJobs", "GetJobsStream"}
TIMEOUT = 10


def v1_info(channel: grpc.Channel) -> grpc.StreamStreamMultiCallable:
    """grpc.reflection.v1's one RPC (v1 has the same messages as v1alpha, renamed)."""
    return channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )


@pytest.mark.parametrize("stem", ["admin-client", "viewer-client"])
def test_a_reflection_client_lists_and_describes_the_job_service(
    grpc_channel_for: Callable[[str], grpc.Channel], stem: str
) -> None:
    database = ProtoReflectionDescriptorDatabase(grpc_channel_for(stem))
    assert sorted(database.get_services()) == SERVICES
    pool = descriptor_pool.DescriptorPool(database)
    service = pool.FindServiceByName("job_worker.JobService")
    assert set(service.methods_by_name) >= JOB_RPCS
    stream = service.methods_by_name["GetJobsStream"]
    assert stream.server_streaming
    assert not stream.client_streaming
    assert stream.output_type.full_name == "job_worker.DataChunk"
    create = pool.FindMessageTypeByName("job_worker.CreateJobReq")
    assert {"command", "args", "maxCPU", "maxMemory", "maxIOBPS"} <= set(create.fields_by_name)
    assert create.fields_by_name["args"].is_repeated
    # health and reflection describe themselves too
    health = pool.FindServiceByName("grpc.health.v1.Health")
    assert {"Check", "Watch"} <= set(health.methods_by_name)
    info = pool.FindServiceByName("grpc.reflection.v1.ServerReflection")
    bidi = info.methods_by_name["ServerReflectionInfo"]
    assert bidi.client_streaming
    assert bidi.server_streaming
    assert bidi.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"


def test_v1_answers_several_requests_on_one_stream_in_order(
    grpc_channel_for: Callable[[str], grpc.Channel],
) -> None:
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="job_worker.Job"),
        reflection_pb2.ServerReflectionRequest(file_by_filename="no/such.proto"),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.Such"),
    ]
    responses = list(v1_info(grpc_channel_for("viewer-client"))(iter(requests), timeout=TIMEOUT))
    assert [r.original_request for r in responses] == requests
    assert [s.name for s in responses[0].list_services_response.service] == SERVICES
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(data)
        for data in responses[1].file_descriptor_response.file_descriptor_proto
    ]
    assert files[0].package == "job_worker"
    assert "Job" in {m.name for m in files[0].message_type}
    for missing, name in ((responses[2], "no/such.proto"), (responses[3], "no.Such")):
        assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
        assert missing.error_response.error_message == f"not found: {name}"


@pytest.mark.parametrize("stem", ["guest-client", "noou-client"])
def test_reflection_is_denied_without_a_role(
    grpc_channel_for: Callable[[str], grpc.Channel], stem: str
) -> None:
    channel = grpc_channel_for(stem)
    with pytest.raises(grpc.RpcError) as info:
        list(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    role = "guest" if stem == "guest-client" else "none"
    assert info.value.details() == f"role {role} is not allowed to perform operation reflection"
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.RpcError) as info:
        list(v1_info(channel)(iter([request]), timeout=TIMEOUT))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
